"""SMTP out through aiosmtplib, step by step, so each failure maps to the right outcome.

Everything before ``DATA`` is safe to retry; an explicit reply code is never ambiguous
(4xx temporary, 5xx permanent, 421 also backs the relay off); only a lost connection or a
timeout during ``DATA`` is ``Unknown`` and must not be retried (research/reliability-plan.md).
"""

import asyncio
import re
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiosmtplib

from mailer.transport.outcomes import Outcome, PermFail, RelayDown, Sent, TempFail, Unknown

_GONE = TempFail("connection lost at MAIL FROM")
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
        self._idle: list[aiosmtplib.SMTP] = []
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
            client = self._idle.pop() if self._idle else self._client()
            lease = Connection(client)
            try:
                yield lease
            finally:
                if client.is_connected and not lease.broken:
                    self._idle.append(client)
                else:
                    _drop(client)

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for client in idle:
            try:
                await client.quit()
            except aiosmtplib.SMTPException:
                _drop(client)


async def _data(client: aiosmtplib.SMTP, data: bytes) -> aiosmtplib.SMTPResponse:
    """``DATA``, sending a message that is already in wire form as it is.

    aiosmtplib's ``data`` rewrites every line ending and dot-stuffs with regular expressions,
    about 8 % of the event loop's time per message here. A message whose every CR and LF is
    part of a CRLF pair needs only the dot-stuffing (RFC 5321 section 4.5.2), one
    ``bytes.replace``; any other goes through aiosmtplib. Same replies, same exceptions, and
    the connection is closed on a lost or timed-out reply, as aiosmtplib does.
    """
    pairs = data.count(b"\r\n")
    if pairs != data.count(b"\r") or pairs != data.count(b"\n") or not data.endswith(b"\r\n"):
        return await client.data(data)
    stuffed = (b"." if data.startswith(b".") else b"") + data.replace(b"\r\n.", b"\r\n..")
    start = await client.execute_command(b"DATA")
    if start.code != aiosmtplib.SMTPStatus.start_input:
        raise aiosmtplib.SMTPDataError(start.code, start.message)
    protocol = client.protocol
    if protocol is None:
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    try:
        protocol.write(stuffed + b".\r\n")
        response = await protocol.read_response(timeout=client.timeout)
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
        client.close()
        raise
    if response.code != aiosmtplib.SMTPStatus.completed:
        raise aiosmtplib.SMTPDataError(response.code, response.message)
    return response


def _drop(client: aiosmtplib.SMTP) -> None:
    if client.is_connected:
        client.close()


class Connection:
    """One lent SMTP connection. ``send`` never raises for SMTP trouble: it returns an outcome."""

    def __init__(self, client: aiosmtplib.SMTP) -> None:
        self._client = client
        self.broken = False

    async def send(self, sender: str, recipient: str, data: bytes, smtputf8: bool) -> Outcome:
        client = self._client
        reused = client.is_connected
        down = await self._ready()
        if down is not None:
            return down
        if smtputf8 and not client.supports_extension("smtputf8"):
            return PermFail(0, "the relay does not offer SMTPUTF8, needed for this address")
        options = ["SMTPUTF8"] if smtputf8 else []
        encoding = "utf-8" if smtputf8 else "ascii"  # aiosmtplib encodes addresses as ASCII
        refused = await self._mail(sender, options, encoding)
        if refused is _GONE and reused:
            # A pooled connection the relay closed while it sat idle: nothing of this
            # message was sent yet, so reconnect once and carry on.
            _drop(client)
            down = await self._ready()
            if down is not None:
                return down
            refused = await self._mail(sender, options, encoding)
        if refused is not None:
            if refused is _GONE:
                self.broken = True
            return refused
        return await self._recipient_and_data(recipient, data, encoding)

    async def _ready(self) -> Outcome | None:
        """Connect (and EHLO) if needed; a ``RelayDown`` when the relay cannot be used."""
        client = self._client
        try:
            if not client.is_connected:
                await client.connect()
            if client.is_ehlo_or_helo_needed:
                await client.ehlo()  # learn the extensions (SMTPUTF8) before MAIL FROM
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            self.broken = True
            return RelayDown(f"cannot use the relay ({type(exc).__name__}): {exc}")
        return None

    async def _mail(self, sender: str, options: list[str], encoding: str) -> Outcome | None:
        try:
            await self._client.mail(sender, options=options, encoding=encoding)
        except aiosmtplib.SMTPResponseException as exc:
            if exc.code >= 500:  # our sender address or account is refused, not the recipient
                return await self._abandon(
                    RelayDown(f"the relay refuses our sender: {exc.code} {exc.message}")
                )
            return await self._abandon(self._refused("MAIL FROM", exc))
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            return _GONE
        return None

    async def _abandon(self, outcome: Outcome) -> Outcome:
        """End a transaction left open by a refusal (RSET), so the connection can be reused."""
        if self._client.is_connected and not self.broken:
            try:
                await self._client.rset()
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                self.broken = True
        return outcome

    async def _recipient_and_data(self, recipient: str, data: bytes, encoding: str) -> Outcome:
        client = self._client
        try:
            await client.rcpt(recipient, encoding=encoding)
        except aiosmtplib.SMTPResponseException as exc:
            return await self._abandon(self._refused("RCPT TO", exc))
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            self.broken = True
            return TempFail(f"connection lost at RCPT TO: {exc}")
        try:
            response = await _data(client, data)
        except aiosmtplib.SMTPResponseException as exc:
            # A refusal of the DATA verb itself (before 354) leaves the transaction open.
            return await self._abandon(self._refused("DATA", exc))
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            self.broken = True
            return Unknown(f"no reply to DATA ({type(exc).__name__}); may have been delivered")
        return Sent(f"{response.code} {response.message}")

    def _refused(self, step: str, exc: aiosmtplib.SMTPResponseException) -> Outcome:
        reason = f"{step}: {exc.code} {exc.message}"
        if exc.code == 421 or not self._client.is_connected:
            self.broken = True
        if 400 <= exc.code < 500:
            return TempFail(reason, relay_backoff=exc.code == 421)
        if exc.code >= 500:
            return PermFail(exc.code, reason, _enhanced(exc.message))
        self.broken = True
        return TempFail(reason)
