"""Reading a bounce: is it one, hard or soft, and with which status code. Pure.

flufl.bounce (GNU Mailman's detectors) recognises RFC 3464 DSNs and the common non-standard
formats and says whether each failure is permanent or temporary. Which message bounced is
not taken from the report: the VERP address it came back to names it, signed.

The verdict:

* a permanent failure is a **hard** bounce, unless its status code is ``4.x.x`` (an MTA that
  gave up after temporary failures, e.g. Postfix's ``Action: failed`` / ``Status: 4.4.1``
  after its queue lifetime): that is **soft**;
* a temporary failure (``Action: delayed``, a delay warning) is **soft**;
* anything else (``Action: delivered`` or ``relayed``, auto-replies, replies) is not a bounce.
"""

import email
import email.policy
import re
from email.iterators import typed_subpart_iterator
from email.message import Message

from flufl.bounce import all_failures

from mailer.domain.feedback import Feedback, FeedbackKind

_STATUS = re.compile(r"\b([245]\.\d{1,3}\.\d{1,3})\b")
_REPLY_STATUS = re.compile(r"\b[45]\d\d[ -]([45]\.\d{1,3}\.\d{1,3})\b")
"""An SMTP reply with its enhanced status code, as quoted in a plain-text bounce."""
_TEXT_SCANNED = 20_000
"""Characters of a plain-text bounce searched for a status code."""


def parse(data: bytes) -> Message:
    """A received message, parsed leniently (reports come from every kind of MTA)."""
    return email.message_from_bytes(data, policy=email.policy.compat32)


def classify_bounce(message: Message) -> Feedback | None:
    """What a report that came back to a VERP address says, or ``None`` for no bounce."""
    temporary, permanent = all_failures(message)
    if not (temporary or permanent):
        return None
    status, detail = _dsn_status(message, permanent=bool(permanent)) or _text_status(message)
    if permanent and not (status or "").startswith("4."):
        return Feedback(FeedbackKind.HARD_BOUNCE, status, detail)
    return Feedback(FeedbackKind.SOFT_BOUNCE, status, detail)


def _dsn_status(message: Message, *, permanent: bool) -> tuple[str | None, str | None] | None:
    """Status and diagnostic of the first per-recipient DSN block with the verdict's action."""
    wanted = ("fail", "error") if permanent else ("delayed",)
    for part in typed_subpart_iterator(message, "message", "delivery-status"):
        blocks = part.get_payload()
        if not isinstance(blocks, list):
            continue
        for block in blocks:
            if not isinstance(block, Message):
                continue
            if not str(block.get("action", "")).strip().lower().startswith(wanted):
                continue
            found = _STATUS.search(str(block.get("status", "")))
            diagnostic = block.get("diagnostic-code")
            return (found.group(1) if found else None), _one_line(diagnostic)
    return None


def _text_status(message: Message) -> tuple[str | None, str | None]:
    """The first SMTP reply quoted in the notification text (not in the returned message)."""
    for part in _notification_texts(message):
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes):
            continue
        text = payload.decode(part.get_content_charset() or "utf-8", "replace")[:_TEXT_SCANNED]
        for line in text.splitlines():
            found = _REPLY_STATUS.search(line)
            if found:
                return found.group(1), _one_line(line)
    return None, None


def _notification_texts(message: Message) -> list[Message]:
    """The text/plain parts written by the reporting MTA, outside any enclosed message."""
    if message.get_content_maintype() == "message":
        return []
    if not message.is_multipart():
        return [message] if message.get_content_type() == "text/plain" else []
    found: list[Message] = []
    for part in message.get_payload():
        if isinstance(part, Message):
            found.extend(_notification_texts(part))
    return found


def _one_line(value: object) -> str | None:
    if value is None:
        return None
    return " ".join(str(value).split()) or None
