"""The inbound addresses: a message's VERP bounce address, its ``mailto:`` unsubscribe address,
and the one feedback-loop address. Minted here, and read back at RCPT time.

All live on the bounce domain. ``bounces+TOKEN`` is each message's envelope sender, so DSNs
come back to it; ``unsubscribe+TOKEN`` is in its ``List-Unsubscribe``; ``fbl`` is the plain
address registered with mailbox providers' feedback loops. Every other address is refused,
so the listener never accepts mail it would then have to bounce (no backscatter, no relay).
"""

import re
from dataclasses import dataclass
from enum import StrEnum

from mailer.domain.tokens import RowPurpose, RowTokens
from mailer.errors import BadToken

BOUNCE_LOCAL = "bounces"
UNSUBSCRIBE_LOCAL = "unsubscribe"
FBL_LOCAL = "fbl"
MAILTO_SUBJECT = "unsubscribe"
_PURPOSES = {BOUNCE_LOCAL: RowPurpose.BOUNCE, UNSUBSCRIBE_LOCAL: RowPurpose.UNSUBSCRIBE}
_TAGGED = re.compile(r"(bounces|unsubscribe)\+([0-9a-z-]{1,40})@([0-9a-z.-]{1,253})", re.I)


class Refusal(StrEnum):
    """Why an address is refused at RCPT time."""

    NOT_OUR_DOMAIN = "not-our-domain"
    """Relaying: we only ever receive for the bounce domain."""
    NO_SUCH_MAILBOX = "no-such-mailbox"
    """Our domain, but no such local part, or a token that is not genuine."""


@dataclass(frozen=True, slots=True)
class BounceBox:
    """The VERP address of one message: what comes back here is about that message."""

    outbox_id: int


@dataclass(frozen=True, slots=True)
class UnsubscribeBox:
    """The ``mailto:`` unsubscribe address of one message."""

    outbox_id: int


@dataclass(frozen=True, slots=True)
class FeedbackLoopBox:
    """The address registered for feedback-loop (ARF) complaint reports."""


Mailbox = BounceBox | UnsubscribeBox | FeedbackLoopBox


class InboundAddresses:
    """Mints the addresses a message carries and resolves an incoming recipient to a mailbox."""

    def __init__(self, tokens: RowTokens, domain: str) -> None:
        self._tokens = tokens
        self.domain = domain.lower()

    @property
    def feedback_loop(self) -> str:
        return f"{FBL_LOCAL}@{self.domain}"

    def bounce(self, outbox_id: int) -> str:
        """The envelope sender (MAIL FROM) of message ``outbox_id``."""
        token = self._tokens.mint(RowPurpose.BOUNCE, outbox_id)
        return f"{BOUNCE_LOCAL}+{token}@{self.domain}"

    def unsubscribe_mailto(self, outbox_id: int) -> str:
        """The RFC 2369 ``mailto:`` URL of message ``outbox_id`` (without angle brackets)."""
        token = self._tokens.mint(RowPurpose.UNSUBSCRIBE, outbox_id)
        return f"mailto:{UNSUBSCRIBE_LOCAL}+{token}@{self.domain}?subject={MAILTO_SUBJECT}"

    def resolve(self, address: str) -> Mailbox | Refusal:
        """The mailbox an envelope recipient names, or why it is refused. Case is ignored."""
        local, at, domain = address.strip().rpartition("@")
        if not at or domain.lower().rstrip(".") != self.domain:
            return Refusal.NOT_OUR_DOMAIN
        local = local.lower()
        if local == FBL_LOCAL:
            return FeedbackLoopBox()
        tag, plus, token = local.partition("+")
        purpose = _PURPOSES.get(tag)
        if not plus or purpose is None:
            return Refusal.NO_SUCH_MAILBOX
        try:
            outbox_id = self._tokens.read(purpose, token)
        except BadToken:
            return Refusal.NO_SUCH_MAILBOX
        if purpose is RowPurpose.BOUNCE:
            return BounceBox(outbox_id)
        return UnsubscribeBox(outbox_id)

    def found_in(self, text: str) -> list[BounceBox | UnsubscribeBox]:
        """Every genuine tagged address of ours that ``text`` (a header value) mentions."""
        found: list[BounceBox | UnsubscribeBox] = []
        for match in _TAGGED.finditer(text):
            box = self.resolve(match.group(0))
            if isinstance(box, BounceBox | UnsubscribeBox):
                found.append(box)
        return found
