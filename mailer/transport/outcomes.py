"""What handing a message to SMTP can come to. The sender ``match``es on these."""

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Sent:
    reply: str


@dataclass(frozen=True, slots=True)
class TempFail:
    """Refused for now (4xx) before the message was accepted: safe to retry."""

    reason: str
    relay_backoff: bool = False


@dataclass(frozen=True, slots=True)
class RelayDown:
    """The relay could not be used at all (connect, greeting, EHLO, STARTTLS, AUTH).

    It says nothing about the recipient: the message goes back to the queue uncharged and
    every send task waits for the relay.
    """

    reason: str


@dataclass(frozen=True, slots=True)
class PermFail:
    """Refused for good (5xx). ``enhanced`` is the RFC 3463 status code when the relay gave one."""

    code: int
    reason: str
    enhanced: str | None = None

    @property
    def no_such_mailbox(self) -> bool:
        """A hard bounce: no such mailbox (5.1.1), or its domain takes no mail (5.1.10)."""
        return self.enhanced in ("5.1.1", "5.1.10")


@dataclass(frozen=True, slots=True)
class Unknown:
    """The connection failed inside ``DATA`` without a reply: it may have been delivered.

    Never retried (G6: at most once); reported as failed with this reason.
    """

    reason: str


Outcome = Sent | TempFail | RelayDown | PermFail | Unknown
