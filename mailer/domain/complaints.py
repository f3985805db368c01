"""Reading a feedback-loop complaint (ARF, RFC 5965) and finding whom it is about. Pure.

A report's own claims are not evidence: anyone can send an ARF report naming any address.
So a complaint counts only when the complained-about message, enclosed in the report, carries
a *signed* token of ours: its VERP envelope sender (``Original-Mail-From``, or the
``Return-Path`` the receiving system added), the ``mailto:`` unsubscribe address, or the
https unsubscribe link in its ``List-Unsubscribe``. Whoever can show such a token had the
message itself. An address in ``Original-Rcpt-To`` or in the enclosed ``To`` is never used
(providers redact it anyway).
"""

import email
import email.policy
from dataclasses import dataclass
from email.message import Message

from mailer.domain.inbound import InboundAddresses
from mailer.domain.tokens import TokenCodec
from mailer.errors import BadToken

COMPLAINT_TYPES = frozenset({"abuse", "fraud"})
"""Feedback types that are a person's complaint. ``not-spam``, ``virus``, ``auth-failure``
(RFC 6591) and ``other`` are not, and change nothing."""
FIELD_MAX = 200


@dataclass(frozen=True, slots=True)
class FeedbackReport:
    """The parts of an ARF report that matter here."""

    feedback_type: str
    user_agent: str | None
    fields: Message
    """The machine-readable ``message/feedback-report`` part."""
    original: Message | None
    """The enclosed message, or its headers (``text/rfc822-headers``)."""

    @property
    def is_complaint(self) -> bool:
        return self.feedback_type in COMPLAINT_TYPES


@dataclass(frozen=True, slots=True)
class Delivery:
    """The complaint names one message we sent (a signed row token)."""

    outbox_id: int


@dataclass(frozen=True, slots=True)
class Person:
    """The complaint names a person by the keyed hash in a signed unsubscribe link."""

    subject_hash: str


Target = Delivery | Person


def read_report(message: Message) -> FeedbackReport | None:
    """The ARF report in ``message``, or ``None`` when it is not one."""
    if message.get_content_type() != "multipart/report":
        return None
    if str(message.get_param("report-type", "")).lower() != "feedback-report":
        return None
    fields: Message | None = None
    original: Message | None = None
    for part in message.get_payload():
        if not isinstance(part, Message):
            continue
        kind = part.get_content_type()
        if kind == "message/feedback-report" and fields is None:
            fields = _enclosed(part)
        elif kind in ("message/rfc822", "text/rfc822-headers") and original is None:
            original = _enclosed(part)
    if fields is None:
        return None
    feedback_type = _field(fields, "feedback-type")
    if feedback_type is None:
        return None
    return FeedbackReport(feedback_type.lower(), _field(fields, "user-agent"), fields, original)


def complained_about(
    report: FeedbackReport, addresses: InboundAddresses, links: TokenCodec, base_url: str
) -> Target | None:
    """The message or person the report is about, from a signed token only; else ``None``.

    A row token (naming the very message) wins over a link token (naming the person).
    """
    values = report.fields.get_all("original-mail-from", [])
    if report.original is not None:
        values += report.original.get_all("return-path", [])
        values += report.original.get_all("list-unsubscribe", [])
    for value in values:
        found = addresses.found_in(str(value))
        if found:
            return Delivery(found[0].outbox_id)
    if report.original is None:
        return None
    prefix = f"{base_url}/unsubscribe/"
    for value in report.original.get_all("list-unsubscribe", []):
        for entry in str(value).replace(">", "<").split("<"):
            url = "".join(entry.split())  # a folded header may break the URL
            if not url.startswith(prefix):
                continue
            try:
                return Person(links.read_unsubscribe(url.removeprefix(prefix)).subject_hash)
            except BadToken:
                continue
    return None


def _enclosed(part: Message) -> Message | None:
    """The message inside a ``message/*`` part, or the headers of a ``text/rfc822-headers``."""
    payload = part.get_payload()
    if isinstance(payload, list):
        first = payload[0] if payload else None
        return first if isinstance(first, Message) else None
    raw = part.get_payload(decode=True)
    if not isinstance(raw, bytes):
        return None
    return email.message_from_bytes(raw, policy=email.policy.compat32)


def _field(fields: Message, name: str) -> str | None:
    value = fields.get(name)
    if value is None:
        return None
    return " ".join(str(value).split())[:FIELD_MAX] or None
