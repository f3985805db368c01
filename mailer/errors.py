"""The error tree. Errors carry data; only the edges (web, cli) turn them into output."""


class MailerError(Exception):
    """Base of every error mailer raises on purpose. ``code`` is stable and machine-readable."""

    code = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(MailerError):
    code = "bad_config"


class InvalidInput(MailerError):
    """The request or command itself is malformed (bad JSON, missing field)."""

    code = "bad_request"


class InvalidAddress(MailerError):
    code = "invalid_address"


class NotFound(MailerError):
    code = "not_found"


class Conflict(MailerError):
    """The request is well-formed but clashes with what exists (duplicate slug, ...)."""

    code = "conflict"


class Unauthorized(MailerError):
    code = "unauthorized"


class BadWebhookSignature(Unauthorized):
    """A relay webhook whose signature is missing, wrong, or outside the replay window."""

    code = "bad_signature"


class TooLarge(MailerError):
    """A request body over the route's size limit."""

    code = "too_large"


class RateLimited(MailerError):
    code = "rate_limited"

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class BadToken(MailerError):
    """A link token is tampered, expired, or meant for another purpose."""

    code = "bad_token"


class MissingUnsubscribe(MailerError):
    """A message was about to leave without its unsubscribe link or headers (G3)."""

    code = "missing_unsubscribe"


class NotInitialised(MailerError):
    code = "not_initialised"
