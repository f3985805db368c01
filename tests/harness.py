"""Test harness: a scriptable aiosmtpd sink on loopback, database snapshots, polling helpers."""

import asyncio
import email
import email.policy
import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import Envelope, Session

Hook = Callable[[str], Awaitable[str | None]]


@dataclass
class Captured:
    mail_from: str
    rcpt_tos: list[str]
    raw: bytes

    @property
    def message(self) -> EmailMessage:
        """The parsed message. Parsed from text so SMTPUTF8 (UTF-8) headers read back intact."""
        text = self.raw.decode("utf-8", errors="surrogateescape")
        parsed = email.message_from_string(text, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed


@dataclass
class SinkServer:
    """A real SMTP server on 127.0.0.1 that records what it accepts.

    Faults are scripted per recipient: ``rcpt_replies[addr]`` answers RCPT with that reply,
    ``data_replies[addr]`` answers end-of-DATA with it, ``drop_in_data`` holds addresses for
    which the server keeps the message and closes the connection without replying, and
    ``before_data_reply`` is awaited (with the recipient) before each DATA reply.
    """

    messages: list[Captured] = field(default_factory=list)
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    data_replies: dict[str, str] = field(default_factory=dict)
    drop_in_data: set[str] = field(default_factory=set)
    before_data_reply: Hook | None = None
    _server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: SMTPServer(self, enable_SMTPUTF8=True, hostname="sink"),
            host="127.0.0.1",
            port=0,
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def handle_RCPT(
        self, server: Any, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        reply = self.rcpt_replies.get(address)
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
        rcpt = envelope.rcpt_tos[0]
        raw = envelope.original_content or b""
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
        self.messages.append(Captured(str(envelope.mail_from), list(envelope.rcpt_tos), raw))
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


def snapshot(db_path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, read through a separate sqlite3 connection."""
    conn = sqlite3.connect(db_path)
    try:
        names = [
            r[0]
            for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'"
            )
        ]
        return {n: sorted(conn.execute(f'SELECT * FROM "{n}"').fetchall(), key=repr) for n in names}
    finally:
        conn.close()


def query(db_path: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """Run one statement through a separate sqlite3 connection; a write is committed."""
    conn = sqlite3.connect(db_path)
    try:
        with conn:
            return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


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
