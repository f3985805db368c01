"""SMTP out through aiosmtplib, each failure mapped to the right outcome.

Everything before ``DATA`` is safe to retry; an explicit reply code is never ambiguous
(4xx temporary, 5xx permanent, 421 also backs the relay off); only a lost connection or a
timeout during ``DATA`` is ``Unknown`` and must not be retried (research/reliability-plan.md).

aiosmtplib connects (TLS, EHLO, STARTTLS, AUTH). When the relay offers PIPELINING (RFC
2920), a message's MAIL FROM, RCPT TO and DATA then go in one write and their replies are
read in order (``replies.Replies``): two round trips per message instead of four. Otherwise
aiosmtplib sends them one at a time. Both ways map every reply and fault to the same outcome.
"""

import asyncio
import re
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import cast

import aiosmtplib

from mailer.transport.outcomes import Outcome, PermFail, RelayDown, Sent, TempFail, Unknown
from mailer.transport.replies import Replies

_GONE = TempFail("connection lost at MAIL FROM")
_ACCEPTED = {"MAIL FROM": (250,), "RCPT TO": (250, 251), "DATA": (354,)}
"""The replies that let a pipelined transaction go on (as aiosmtplib accepts them)."""
_ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\b")


def _enhanced(message: str) -> str | None:
    """The RFC 3463 enhanced status code a reply text starts with, if any."""
    found = _ENHANCED.match(message.strip())
    return found.group(1) if found else None


@dataclass(frozen=True, slots=True)
class RelayConfig:
    host: str
    port: int
    tls: str = "none"  # none | starttls | tls
    username: str | None = None
    password: str | None = None
    timeout: float = 30.0
    local_hostname: str | None = None


class SmtpPool:
    """A small pool of reusable SMTP connections to one relay."""

    def __init__(self, relay: RelayConfig, size: int = 4) -> None:
        self.relay = relay
        self._idle: list[tuple[aiosmtplib.SMTP, Replies | None]] = []
        self._slots = asyncio.Semaphore(size)

    def _client(self) -> aiosmtplib.SMTP:
        r = self.relay
        return aiosmtplib.SMTP(
            hostname=r.host,
            port=r.port,
            use_tls=r.tls == "tls",
            start_tls=r.tls == "starttls",
            validate_certs=r.tls != "none",
            tls_context=ssl.create_default_context() if r.tls != "none" else None,
            username=r.username,
            password=r.password,
            timeout=r.timeout,
            local_hostname=r.local_hostname,
        )

    @asynccontextmanager
    async def connection(self) -> AsyncIterator["Connection"]:
        """Lend one connection (opened lazily at first send); return it to the pool after."""
        async with self._slots:
            client, replies = self._idle.pop() if self._idle else (self._client(), None)
            lease = Connection(client, replies)
            try:
                yield lease
            finally:
                if client.is_connected and not lease.broken:
                    self._idle.append((client, lease.replies))
                else:
                    _drop(client)

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for client, replies in idle:
            try:
                if replies is None:
                    await client.quit()
                else:
                    replies.write(b"QUIT\r\n")
                    await replies.read()
            except aiosmtplib.SMTPException:
                pass
            _drop(client)


def _content(data: bytes) -> bytes:
    """What follows the 354: the message with CRLF line endings, dot-stuffed (RFC 5321
    section 4.5.2), ending in the lone dot.

    A message already in wire form (every CR and LF part of a CRLF pair, ending in one), as
    every message mailer builds is, needs one ``bytes.replace``; aiosmtplib rewrites every
    line ending and dot-stuffs with regular expressions (about 8 % of the event loop per
    message). Any other message has its line endings made CRLF first, as aiosmtplib does.
    """
    pairs = data.count(b"\r\n")
    if pairs != data.count(b"\r") or pairs != data.count(b"\n") or not data.endswith(b"\r\n"):
        lines = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        data = b"\r\n".join(lines)
        data = data if data.endswith(b"\r\n") else data + b"\r\n"
    stuffed = (b"." if data.startswith(b".") else b"") + data.replace(b"\r\n.", b"\r\n..")
    return stuffed + b".\r\n"


def _path(address: str, encoding: str) -> bytes:
    """``<address>`` for MAIL FROM or RCPT TO; refuses what could smuggle in a command."""
    if any(c < " " or c in "<>\x7f" for c in address):
        raise ValueError("the address holds a control character or an angle bracket")
    return b"<" + address.encode(encoding) + b">"


async def _data(client: aiosmtplib.SMTP, data: bytes) -> aiosmtplib.SMTPResponse:
    """``DATA`` one step at a time, through aiosmtplib's protocol. A reply to the message
    that is lost, late or unreadable closes the connection and raises
    ``SMTPServerDisconnected`` or ``SMTPTimeoutError``: the relay may have taken it."""
    start = await client.execute_command(b"DATA")
    if start.code != aiosmtplib.SMTPStatus.start_input:
        raise aiosmtplib.SMTPDataError(start.code, start.message)
    protocol = client.protocol
    if protocol is None:
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    try:
        protocol.write(_content(data))
        response = await protocol.read_response(timeout=client.timeout)
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
        client.close()
        raise
    except aiosmtplib.SMTPResponseException as exc:  # unreadable: it may have taken the message
        client.close()
        raise aiosmtplib.SMTPServerDisconnected(f"unreadable reply: {exc.message}") from exc
    if response.code != aiosmtplib.SMTPStatus.completed:
        raise aiosmtplib.SMTPDataError(response.code, response.message)
    return response


def _no_reply_to_data(exc: Exception) -> Unknown:
    """No (readable) reply once DATA was sent: the relay may have taken the message."""
    return Unknown(f"no reply to DATA ({type(exc).__name__}); may have been delivered")


def _drop(client: aiosmtplib.SMTP) -> None:
    if client.is_connected:
        client.close()


class Connection:
    """One lent SMTP connection. ``send`` never raises for SMTP trouble: it returns an outcome."""

    def __init__(self, client: aiosmtplib.SMTP, replies: Replies | None = None) -> None:
        self._client = client
        self.replies = replies
        """Set while the connection pipelines: its transport's replies are read here."""
        self.broken = False

    async def send(self, sender: str, recipient: str, data: bytes, smtputf8: bool) -> Outcome:
        reused = self._client.is_connected
        while True:
            down = await self._ready()
            if down is not None:
                return down
            if smtputf8 and not self._client.supports_extension("smtputf8"):
                return PermFail(0, "the relay does not offer SMTPUTF8, needed for this address")
            encoding = "utf-8" if smtputf8 else "ascii"  # aiosmtplib encodes addresses as ASCII
            if self.replies is not None:
                outcome = await self._pipelined(sender, recipient, data, smtputf8, encoding)
            else:
                outcome = await self._step_by_step(sender, recipient, data, smtputf8, encoding)
            if outcome is not _GONE or not reused:
                break
            # A pooled connection the relay closed while it sat idle: nothing of this
            # message was sent yet, so reconnect once and carry on.
            reused = self.broken = False
            _drop(self._client)
        if outcome is _GONE:
            self.broken = True
        return outcome

    async def _ready(self) -> Outcome | None:
        """Connect (and EHLO) if needed; a ``RelayDown`` when the relay cannot be used.

        A new connection to a relay that offers PIPELINING has its replies read by
        ``Replies`` from then on.
        """
        client = self._client
        if self.replies is not None and not self.replies.in_step:
            _drop(client)  # it spoke out of turn (or is gone): its next reply is not ours
        try:
            if not client.is_connected:
                await client.connect()
            if client.is_ehlo_or_helo_needed:
                await client.ehlo()  # learn the extensions (SMTPUTF8) before MAIL FROM
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            self.broken = True
            return RelayDown(f"cannot use the relay ({type(exc).__name__}): {exc}")
        transport = cast(asyncio.Transport, client.transport)  # uvloop's is no subclass
        if self.replies is None or self.replies.transport is not transport:
            self.replies = None
            if client.supports_extension("pipelining"):
                self.replies = Replies.take_over(transport, client.timeout)
        return None

    async def _step_by_step(
        self, sender: str, recipient: str, data: bytes, smtputf8: bool, encoding: str
    ) -> Outcome:
        options = ["SMTPUTF8"] if smtputf8 else []
        refused = await self._mail(sender, options, encoding)
        if refused is not None:
            return refused
        return await self._recipient_and_data(recipient, data, encoding)

    async def _pipelined(
        self, sender: str, recipient: str, data: bytes, smtputf8: bool, encoding: str
    ) -> Outcome:
        """MAIL FROM, RCPT TO and DATA in one write; their replies read in order (RFC 2920).

        The first refusal decides the outcome, as it does step by step; the remaining replies
        are read so that the connection stays in step. Silence (a lost connection, a timeout)
        maps by the command it left unanswered, as step by step.
        """
        replies = self.replies
        assert replies is not None
        try:
            mail = b"MAIL FROM:" + _path(sender, encoding) + (b" SMTPUTF8" if smtputf8 else b"")
            rcpt = b"RCPT TO:" + _path(recipient, encoding)
        except (ValueError, UnicodeEncodeError) as exc:
            return PermFail(0, f"not sent: {exc}")
        try:
            replies.write(mail + b"\r\n" + rcpt + b"\r\nDATA\r\n")
        except aiosmtplib.SMTPException:
            return _GONE
        refusal: Outcome | None = None
        for step, accepted in _ACCEPTED.items():
            try:
                reply = await replies.read()
            except aiosmtplib.SMTPException as exc:
                self._close()
                return refusal if refusal is not None else self._unanswered(step, exc)
            if refusal is None and reply.code not in accepted:
                refusal = self._refused(step, reply.code, reply.message)
        if refusal is not None:
            if reply.code == aiosmtplib.SMTPStatus.start_input:  # DATA taken after a refusal:
                self._close()  # this relay is out of step with us; start afresh
                return refusal
            return await self._abandon(refusal)
        try:
            replies.write(_content(data))
            reply = await replies.read()
        except aiosmtplib.SMTPException as exc:  # a malformed reply too: it may have taken it
            self._close()
            return _no_reply_to_data(exc)
        if reply.code != aiosmtplib.SMTPStatus.completed:
            return self._refused("DATA", reply.code, reply.message)
        return Sent(f"{reply.code} {reply.message}")

    def _unanswered(self, step: str, exc: Exception) -> Outcome:
        """A command left without a (readable) reply, pipelined or step by step."""
        if isinstance(exc, aiosmtplib.SMTPResponseException):  # malformed: nothing taken yet
            return self._refused(step, exc.code, exc.message)
        if step == "MAIL FROM":
            return _GONE
        if step == "RCPT TO":
            return TempFail(f"connection lost at RCPT TO: {exc}")
        return _no_reply_to_data(exc)

    def _close(self) -> None:
        self.broken = True
        _drop(self._client)

    async def _mail(self, sender: str, options: list[str], encoding: str) -> Outcome | None:
        try:
            await self._client.mail(sender, options=options, encoding=encoding)
        except aiosmtplib.SMTPResponseException as exc:
            return await self._abandon(self._refused("MAIL FROM", exc.code, exc.message))
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            return self._unanswered("MAIL FROM", exc)
        return None

    async def _abandon(self, outcome: Outcome) -> Outcome:
        """End a transaction left open by a refusal (RSET), so the connection can be reused."""
        if self._client.is_connected and not self.broken:
            try:
                if self.replies is None:
                    await self._client.rset()
                else:
                    self.replies.write(b"RSET\r\n")
                    reset = await self.replies.read()
                    if reset.code != aiosmtplib.SMTPStatus.completed:
                        self.broken = True
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                self.broken = True
        return outcome

    async def _recipient_and_data(self, recipient: str, data: bytes, encoding: str) -> Outcome:
        client = self._client
        try:
            await client.rcpt(recipient, encoding=encoding)
        except aiosmtplib.SMTPResponseException as exc:
            return await self._abandon(self._refused("RCPT TO", exc.code, exc.message))
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            self.broken = True
            return self._unanswered("RCPT TO", exc)
        try:
            response = await _data(client, data)
        except aiosmtplib.SMTPResponseException as exc:
            # A refusal of the DATA verb itself (before 354) leaves the transaction open.
            return await self._abandon(self._refused("DATA", exc.code, exc.message))
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            self.broken = True
            return self._unanswered("DATA", exc)
        return Sent(f"{response.code} {response.message}")

    def _refused(self, step: str, code: int, message: str) -> Outcome:
        """What a reply other than the expected one means, pipelined or step by step."""
        if step == "MAIL FROM" and code >= 500:  # our sender or account, not the recipient
            return RelayDown(f"the relay refuses our sender: {code} {message}")
        reason = f"{step}: {code} {message}"
        if code == 421 or not self._client.is_connected:
            self.broken = True
        if 400 <= code < 500:
            return TempFail(reason, relay_backoff=code == 421)
        if code >= 500:
            return PermFail(code, reason, _enhanced(message))
        self.broken = True
        return TempFail(reason)
