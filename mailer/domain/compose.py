"""Building the wire form of a message. Refuses any message that cannot be stopped (G3)."""

import re
from dataclasses import dataclass
from email.headerregistry import Address as HeaderAddress
from email.message import EmailMessage
from email.policy import SMTP, SMTPUTF8, Policy

from mailer.errors import MissingUnsubscribe

ONE_CLICK = "List-Unsubscribe=One-Click"
MAX_LINE = 998
"""RFC 5322's hard line limit. With the default 78, the email package re-encodes a long
``List-Unsubscribe`` URL as an RFC 2047 encoded-word, which one-click clients cannot read."""
_ASCII_POLICY: Policy = SMTP.clone(max_line_length=MAX_LINE)
_UTF8_POLICY: Policy = SMTPUTF8.clone(max_line_length=MAX_LINE)


_CONTROL = re.compile(r"[\x00-\x1f\x7f\u0085\u2028\u2029]")


def is_one_line(text: str) -> bool:
    """True when ``text`` holds no control character or line separator: safe in a header."""
    return _CONTROL.search(text) is None


@dataclass(frozen=True, slots=True)
class Rendered:
    """The bodies of one message, rendered from templates."""

    subject: str
    text: str
    html: str


@dataclass(frozen=True, slots=True)
class Envelope:
    """Who the message is from and to, and the list headers that come with it."""

    from_name: str
    from_addr: str
    to_addr: str
    list_id: str
    unsubscribe_url: str
    message_id: str
    date: str
    """RFC 5322 date, e.g. from ``email.utils.format_datetime``."""
    smtputf8: bool = False
    unsubscribe_mailto: str | None = None
    """A ``mailto:`` URL offered after the https one when inbound mail is configured."""


def check_stoppable(rendered: Rendered, unsubscribe_url: str) -> None:
    """Raise ``MissingUnsubscribe`` unless both parts show the unsubscribe link."""
    if not unsubscribe_url:
        raise MissingUnsubscribe("the message has no unsubscribe link")
    if unsubscribe_url not in rendered.text:
        raise MissingUnsubscribe("the text part does not show the unsubscribe link")
    if unsubscribe_url not in rendered.html:
        raise MissingUnsubscribe("the HTML part does not show the unsubscribe link")


def compose(envelope: Envelope, rendered: Rendered) -> bytes:
    """Return the message as bytes ready for SMTP ``DATA``, with the RFC 8058/2369/2919 headers."""
    check_stoppable(rendered, envelope.unsubscribe_url)
    msg = EmailMessage()
    local, _, domain = envelope.from_addr.rpartition("@")
    msg["From"] = HeaderAddress(envelope.from_name, local, domain)
    msg["To"] = envelope.to_addr
    msg["Subject"] = rendered.subject
    msg["Date"] = envelope.date
    msg["Message-ID"] = envelope.message_id
    msg["List-Id"] = envelope.list_id
    msg["List-Unsubscribe"] = list_unsubscribe(envelope)
    msg["List-Unsubscribe-Post"] = ONE_CLICK
    msg.set_content(rendered.text, subtype="plain", cte=transfer_encoding(rendered.text))
    msg.add_alternative(rendered.html, subtype="html", cte=transfer_encoding(rendered.html))
    return msg.as_bytes(policy=_UTF8_POLICY if envelope.smtputf8 else _ASCII_POLICY)


def list_unsubscribe(envelope: Envelope) -> str:
    """The RFC 2369 value: the one-click https URL first (RFC 8058), then any ``mailto:``."""
    if envelope.unsubscribe_mailto is None:
        return f"<{envelope.unsubscribe_url}>"
    return f"<{envelope.unsubscribe_url}>, <{envelope.unsubscribe_mailto}>"


def transfer_encoding(body: str) -> str:
    """``7bit`` when the body is ASCII with lines within RFC 5322's limit (links stay whole and
    readable in the raw message), else ``quoted-printable``."""
    if body.isascii() and all(len(line) <= MAX_LINE for line in body.splitlines()):
        return "7bit"
    return "quoted-printable"


def list_id_header(name: str, slug: str, domain: str) -> str:
    """An RFC 2919 ``List-Id``: ``"Name" <slug.domain>``."""
    safe = name.replace("\\", "").replace('"', "")
    return f'"{safe}" <{slug}.{domain}>'
