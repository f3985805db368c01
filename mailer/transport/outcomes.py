"""What handing a message to SMTP can come to. The sender ``match``es on these."""

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Sent:
    reply: str


@dataclass(frozen=True, slots=True)
class TempFail:
    """Refused for now (4xx) or not reached at all, before ``DATA``: safe to retry."""

    reason: str
    relay_backoff: bool = False


@dataclass(frozen=True, slots=True)
class PermFail:
    """Refused for good (5xx)."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class Unknown:
    """The connection failed inside ``DATA`` without a reply: it may have been delivered.

    Never retried (G6: at most once); reported as failed with this reason.
    """

    reason: str


Outcome = Sent | TempFail | PermFail | Unknown
