"""Inbound mail, from raw bytes to consent state: the listener's ``Mailboxes`` port.

* ``bounces+TOKEN@``: the report is about the message the token names. An ARF complaint
  counts as one (see below); else flufl.bounce decides hard, soft or no bounce (an
  auto-reply changes nothing).
* ``unsubscribe+TOKEN@``: any mail to it unsubscribes the recipient of that message, with
  the scope of its one-click link, like the ``POST`` (subject and body are not read).
* ``fbl@``: ARF reports; a complaint suppresses as ``complained`` only when the enclosed
  message carries a signed token of ours (``domain/complaints.py``). Anything else there is
  accepted and dropped.

Every recipient was vetted at RCPT time; nothing is ever sent in reply.
"""

import asyncio
import logging

from mailer.domain.bounces import classify_bounce, parse
from mailer.domain.complaints import (
    Delivery,
    FeedbackReport,
    Person,
    complained_about,
    read_report,
)
from mailer.domain.feedback import Feedback, FeedbackKind
from mailer.domain.inbound import (
    BounceBox,
    FeedbackLoopBox,
    InboundAddresses,
    Refusal,
    UnsubscribeBox,
)
from mailer.domain.ledger import Evidence
from mailer.domain.tokens import TokenCodec
from mailer.services.feedback import FeedbackService
from mailer.statuses import Channel

COMPLAINT = Feedback(FeedbackKind.COMPLAINT)
log = logging.getLogger("mailer.inbound")


class InboundMail:
    """Turns each accepted message into a bounce, complaint or unsubscribe, or nothing."""

    def __init__(
        self,
        addresses: InboundAddresses,
        links: TokenCodec,
        base_url: str,
        feedback: FeedbackService,
    ) -> None:
        self._addresses = addresses
        self._links = links
        self._base_url = base_url
        self._feedback = feedback

    def check(self, address: str) -> Refusal | None:
        """``None`` for one of our inbound addresses (with a genuine token), else why not."""
        box = self._addresses.resolve(address)
        return box if isinstance(box, Refusal) else None

    async def deliver(self, recipient: str, data: bytes, peer: str | None) -> str:
        """Act on one message for one recipient; return a log summary (no address or token)."""
        box = self._addresses.resolve(recipient)
        if isinstance(box, Refusal):  # vetted at RCPT time; only a changed key could do this
            return f"refused:{box}"
        if isinstance(box, UnsubscribeBox):
            evidence = Evidence(channel=Channel.MAIL.value, actor="subscriber", ip=peer)
            applied = await self._feedback.unsubscribe_delivery(box.outbox_id, evidence)
            return f"unsubscribe:{applied} outbox_id={box.outbox_id}"
        try:  # parsing up to 10 MiB is CPU work: off the loop that also sends
            report, bounce = await asyncio.to_thread(_read, data, isinstance(box, BounceBox))
        except Exception:  # a report no parser can read: retrying would not help
            log.warning("inbound.unreadable", exc_info=True)
            return "unreadable"
        if report is not None:
            fallback = box.outbox_id if isinstance(box, BounceBox) else None
            return await self._complaint(report, fallback, peer)
        if isinstance(box, FeedbackLoopBox):
            return "fbl:not-a-report"
        if bounce is None:
            return f"bounce:not-a-bounce outbox_id={box.outbox_id}"
        evidence = Evidence(channel=Channel.BOUNCE.value, actor="dsn", ip=peer)
        applied = await self._feedback.for_delivery(box.outbox_id, bounce, evidence)
        return f"bounce:{bounce.kind}:{bounce.status or '-'}:{applied} outbox_id={box.outbox_id}"

    async def _complaint(
        self, report: FeedbackReport, fallback: int | None, peer: str | None
    ) -> str:
        """An ARF report. At a VERP address, that address's signed token names the message
        when the enclosed copy carries none."""
        if not report.is_complaint:
            return f"complaint:ignored-type:{report.feedback_type[:20]}"
        target = complained_about(report, self._addresses, self._links, self._base_url)
        if target is None and fallback is not None:
            target = Delivery(fallback)
        evidence = Evidence(
            channel=Channel.COMPLAINT.value,
            actor="feedback-loop",
            ip=peer,
            user_agent=report.user_agent,
        )
        match target:
            case Delivery(outbox_id=outbox_id):
                applied = await self._feedback.for_delivery(outbox_id, COMPLAINT, evidence)
                return f"complaint:{applied} outbox_id={outbox_id}"
            case Person(subject_hash=subject):
                applied = await self._feedback.for_subject(subject, COMPLAINT, evidence)
                return f"complaint:{applied} by-link"
        return "complaint:unsigned-ignored"


def _read(data: bytes, may_bounce: bool) -> tuple[FeedbackReport | None, Feedback | None]:
    """The ARF report in a message or, failing that and where bounces arrive, its bounce."""
    message = parse(data)
    report = read_report(message)
    if report is not None or not may_bounce:
        return report, None
    return None, classify_bounce(message)
