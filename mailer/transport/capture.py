"""The embedded capture SMTP server: accepts everything on loopback, keeps it in a Maildir.

Used when no relay is configured, so a new user sees every message in ``var/outbox/``.
"""

import asyncio
import mailbox
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import Envelope, Session


class MaildirHandler:
    """aiosmtpd handler that stores each accepted message in a Maildir."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._maildir = mailbox.Maildir(str(path), create=True)

    async def handle_EHLO(
        self, server: Any, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        """Offer PIPELINING, as production relays do, so a local run sends the way a real one
        does (aiosmtpd answers pipelined commands in order; it only does not say so)."""
        session.host_name = hostname
        return [*responses[:1], "250-PIPELINING", *responses[1:]]

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or envelope.content
        raw = content if isinstance(content, bytes) else str(content).encode("utf-8")
        self._maildir.add(mailbox.MaildirMessage(raw))
        return "250 2.0.0 captured"


class CaptureServer:
    """An aiosmtpd server on the running event loop, bound to a loopback port."""

    def __init__(self, path: Path, host: str = "127.0.0.1", port: int = 0) -> None:
        self.path = path
        self.host = host
        self._port = port
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None, "capture server not started"
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        handler = MaildirHandler(self.path)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: SMTPServer(handler, enable_SMTPUTF8=True, hostname="mailer-capture"),
            host=self.host,
            port=self._port,
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
