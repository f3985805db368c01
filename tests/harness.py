"""Test harness: a scriptable aiosmtpd sink on loopback, database snapshots, polling helpers."""

import asyncio
import email
import email.policy
import ssl
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from typing import Any

import aiohttp
from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session, syntax

from tests.databases import Db, active

Hook = Callable[[str], Awaitable[str | None]]


@dataclass
class Captured:
    mail_from: str
    rcpt_tos: list[str]
    raw: bytes
    mail_at: float = 0.0
    """``time.monotonic()`` when this transaction's MAIL FROM arrived (its hand-off began)."""

    @property
    def message(self) -> EmailMessage:
        """The parsed message. Parsed from text so SMTPUTF8 (UTF-8) headers read back intact."""
        text = self.raw.decode("utf-8", errors="surrogateescape")
        parsed = email.message_from_string(text, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed


@dataclass(frozen=True)
class SinkEvent:
    """One thing the sink saw: ``stage`` is connect, auth, ehlo, mail, rcpt, data, rset or read.

    ``at`` is ``time.monotonic()`` (system-wide on Linux, so comparable with the test's own).
    ``detail`` is the address for mail/rcpt/data, the EHLO name, ok/refused for auth, or for
    a read that starts with MAIL FROM the verbs it holds (``MAIL,RCPT,DATA`` when pipelined).
    """

    at: float
    stage: str
    detail: str


class _Banner(asyncio.Protocol):
    """A relay that answers a new connection with one line (or nothing) and hangs up."""

    def __init__(self, banner: str) -> None:
        self._banner = banner

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._banner and isinstance(transport, asyncio.WriteTransport):
            transport.write(self._banner.encode("ascii") + b"\r\n")
        transport.close()


class _FaultSMTP(SMTPServer):
    """aiosmtpd's server with a per-connection transaction count and a scriptable DATA verb."""

    transactions = 0
    """MAIL FROM commands seen on this connection."""

    def data_received(self, data: bytes) -> None:
        if data.startswith(b"MAIL FROM:"):  # how the client grouped a transaction's commands
            verbs = (line.split(b":")[0].split(b" ")[0] for line in data.split(b"\r\n") if line)
            self.event_handler._log("read", ",".join(v.decode("ascii", "replace") for v in verbs))
        super().data_received(data)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        sink = self.event_handler
        rcpts = self.envelope.rcpt_tos if self.envelope is not None else []
        reply = sink.data_command_replies.get(rcpts[0]) if rcpts else None
        if reply is None:
            await super().smtp_DATA(arg)
        elif reply == "":
            _hang_up(self)
        else:
            await self.push(reply)


def _hang_up(server: SMTPServer) -> None:
    if server.transport is not None:
        server.transport.close()


@dataclass
class SinkServer:
    """A real SMTP server on 127.0.0.1 that records what it accepts.

    Faults are scripted per recipient: ``rcpt_replies[addr]`` answers RCPT with that reply,
    ``data_replies[addr]`` answers end-of-DATA with it, ``drop_in_data`` holds addresses for
    which the server keeps the message and closes the connection without replying, and
    ``before_data_reply`` is awaited (with the recipient) before each DATA reply.

    Further faults, all off by default (a reply of ``""`` means: close the connection
    instead of answering):

    * ``greeting``: every new connection gets this banner line and is closed at once
      (e.g. ``"421 4.3.2 busy"``); ``""`` closes without any banner.
    * ``ehlo_reply``: EHLO is answered with this one line instead of the extensions.
    * ``mail_reply``: every MAIL FROM is answered with this (it names no recipient).
    * ``nth_mail_reply``: ``(n, reply)``: the n-th MAIL FROM of each connection gets
      ``reply`` (a relay's per-connection rate limit, e.g. ``(5, "421 4.7.0 slow down")``).
    * ``drop_at_rcpt``: addresses whose RCPT TO closes the connection without a reply.
    * ``data_command_replies[addr]``: answer the DATA verb itself (before any 354).
    * ``rcpt_delays[addr]`` / ``data_delays[addr]``: seconds to wait before answering RCPT
      / the end of DATA (the message is stored first, so a client timeout leaves one copy).
    * ``smtputf8``: whether EHLO offers SMTPUTF8.
    * ``pipelining``: whether EHLO offers PIPELINING (RFC 2920), as real relays do (aiosmtpd
      answers pipelined commands in order either way; it only does not say so itself).
    * ``tls_context``: offer STARTTLS with this server context.
    * ``auth_password``: offer AUTH (PLAIN, LOGIN) without TLS and accept only this password.

    ``events`` logs what arrived, in order; ``drop_connections`` / ``silence_connections``
    act on the connections open now (a relay closing idle ones, or one gone quiet).
    """

    messages: list[Captured] = field(default_factory=list)
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    data_replies: dict[str, str] = field(default_factory=dict)
    drop_in_data: set[str] = field(default_factory=set)
    before_data_reply: Hook | None = None
    greeting: str | None = None
    ehlo_reply: str | None = None
    mail_reply: str | None = None
    nth_mail_reply: tuple[int, str] | None = None
    drop_at_rcpt: set[str] = field(default_factory=set)
    data_command_replies: dict[str, str] = field(default_factory=dict)
    rcpt_delays: dict[str, float] = field(default_factory=dict)
    data_delays: dict[str, float] = field(default_factory=dict)
    smtputf8: bool = True
    pipelining: bool = True
    tls_context: ssl.SSLContext | None = None
    auth_password: str | None = None
    events: list[SinkEvent] = field(default_factory=list)
    _server: asyncio.Server | None = None
    _live: "weakref.WeakSet[SMTPServer]" = field(default_factory=weakref.WeakSet)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._connection, host="127.0.0.1", port=0)

    def _connection(self) -> asyncio.BaseProtocol:
        self._log("connect", "")
        if self.greeting is not None:
            return _Banner(self.greeting)
        auth: dict[str, Any] = {}
        if self.auth_password is not None:
            auth = {"authenticator": self._authenticate, "auth_require_tls": False}
        server = _FaultSMTP(
            self,
            enable_SMTPUTF8=self.smtputf8,
            hostname="sink",
            tls_context=self.tls_context,
            **auth,
        )
        self._live.add(server)
        return server

    def _log(self, stage: str, detail: str) -> None:
        self.events.append(SinkEvent(time.monotonic(), stage, detail))

    def seen(self, stage: str) -> list[SinkEvent]:
        """The events of one stage, in order of arrival."""
        return [e for e in self.events if e.stage == stage]

    def drop_connections(self) -> int:
        """Close every connection open now (as a relay does with idle ones); return how many."""
        live = [s for s in self._live if s.transport is not None]
        for server in live:
            _hang_up(server)
        return len(live)

    def silence_connections(self) -> int:
        """Stop reading from every connection open now, which then never answers again."""
        live = [s for s in self._live if s.transport is not None]
        for server in live:
            assert isinstance(server.transport, asyncio.ReadTransport)
            server.transport.pause_reading()
        return len(live)

    def _authenticate(
        self, server: Any, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        password = self.auth_password
        ok = isinstance(data, LoginPassword) and password is not None
        ok = ok and data.password == str(password).encode("utf-8")
        self._log("auth", "ok" if ok else "refused")
        return AuthResult(success=ok, handled=False)  # handled=False: aiosmtpd replies 235/535

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def handle_EHLO(
        self, server: Any, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        self._log("ehlo", hostname)
        session.host_name = hostname  # what aiosmtpd does itself when there is no hook
        if self.ehlo_reply is None:
            if self.pipelining:
                return [*responses[:1], "250-PIPELINING", *responses[1:]]
            return responses
        if self.ehlo_reply == "":
            _hang_up(server)
            return []
        return [self.ehlo_reply]

    async def handle_MAIL(
        self, server: Any, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        self._log("mail", address)
        server.transactions += 1
        reply = self.mail_reply
        if self.nth_mail_reply is not None and server.transactions == self.nth_mail_reply[0]:
            reply = self.nth_mail_reply[1]
        if reply == "":
            _hang_up(server)
            return "250 never seen by the client"
        if reply is not None:
            return reply
        envelope.mail_from = address  # what aiosmtpd does itself when there is no hook
        envelope.mail_options.extend(options)
        envelope.mail_at = time.monotonic()  # type: ignore[attr-defined]
        return "250 OK"

    async def handle_RSET(self, server: Any, session: Session, envelope: Envelope) -> str:
        self._log("rset", "")
        return "250 OK"

    async def handle_RCPT(
        self, server: Any, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        self._log("rcpt", address)
        delay = self.rcpt_delays.get(address)
        if delay:
            await asyncio.sleep(delay)
        if address in self.drop_at_rcpt:
            _hang_up(server)
            return "250 never seen by the client"
        reply = self.rcpt_replies.get(address)
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
        rcpt = envelope.rcpt_tos[0]
        raw = envelope.original_content or b""
        self._log("data", rcpt)
        if self.before_data_reply is not None:
            override = await self.before_data_reply(rcpt)
            if override is not None:
                return override
        if rcpt in self.drop_in_data:
            self.messages.append(Captured(str(envelope.mail_from), list(envelope.rcpt_tos), raw))
            server.transport.close()
            return "250 never seen by the client"
        reply = self.data_replies.get(rcpt)
        if reply is not None:
            return reply
        mail_at = getattr(envelope, "mail_at", 0.0)
        self.messages.append(
            Captured(str(envelope.mail_from), list(envelope.rcpt_tos), raw, mail_at)
        )
        delay = self.data_delays.get(rcpt)
        if delay:
            await asyncio.sleep(delay)
        return "250 OK"

    def to(self, address: str) -> list[Captured]:
        return [m for m in self.messages if address in m.rcpt_tos]


async def wait_until(
    predicate: Callable[[], bool | Awaitable[bool]], timeout: float = 5.0, what: str = "condition"
) -> None:
    """Poll ``predicate`` until it holds; fail the test after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def wait_healthy(http: aiohttp.ClientSession, base: str, what: str) -> None:
    """Wait until the mailer process at ``base`` answers ``/healthz`` with 200 and ``ok``."""

    async def healthy() -> bool:
        try:
            async with http.get(f"{base}/healthz") as r:
                return r.status == 200 and (await r.json())["status"] == "ok"
        except aiohttp.ClientError:
            return False

    await wait_until(healthy, timeout=20, what=what)


def snapshot(db: Db) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, read through a separate connection."""
    with active.connect(db) as conn:
        return {
            n: sorted(conn.execute(f'SELECT * FROM "{n}"').fetchall(), key=repr)
            for n in active.tables(db)
        }


def query(db: Db, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """Run one statement (``?`` placeholders) through a separate connection; a write commits."""
    with active.connect(db) as conn, conn:
        cursor = conn.execute(sql, params)
        return cursor.fetchall() if cursor.description else []


def as_utc(value: str | datetime) -> datetime:
    """A timestamp column read back: a string on SQLite, a datetime on PostgreSQL."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class MutableClock:
    """A clock tests move by hand: ``now()`` starts at the real time, ``advance`` moves it."""

    def __init__(self) -> None:
        self._now = datetime.now(UTC)
        self._mono = 1000.0

    def now(self) -> datetime:
        return self._now

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        self._now += timedelta(seconds=seconds)
        self._mono += seconds
