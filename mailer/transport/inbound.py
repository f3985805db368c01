"""The inbound SMTP listener: receives bounces, complaints and ``mailto:`` unsubscribes.

It only ever *receives*. A recipient is accepted at RCPT time only when ``Mailboxes.check``
says it is one of ours, so mail for anyone else is refused before its data is sent: the
listener is no relay and never has to bounce what it accepted (no backscatter). No AUTH (no
TLS, and aiosmtpd offers AUTH only over TLS), a size limit, an idle timeout, and a cap on
recipients per message. What a message means is the ``Mailboxes`` port's business; a failure
there answers ``451`` so the sender's MTA tries again later.
"""

import asyncio
import logging
import weakref
from typing import Any, Protocol

from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import Envelope, Session

from mailer.domain.inbound import Refusal

log = logging.getLogger("mailer.inbound")

MAX_MESSAGE_BYTES = 10 * 1024 * 1024
"""A DSN or ARF report quotes one of our messages; 10 MiB is plenty."""
IDLE_TIMEOUT_SECONDS = 60
MAX_RECIPIENTS = 20
REFUSALS = {
    Refusal.NOT_OUR_DOMAIN: "550 5.7.1 Relaying denied",
    Refusal.NO_SUCH_MAILBOX: "550 5.1.1 No such mailbox here",
}


class Mailboxes(Protocol):
    """What the listener asks of the application."""

    def check(self, address: str) -> Refusal | None:
        """``None`` to accept ``address`` as a recipient, else why not. Must be quick."""
        ...

    async def deliver(self, recipient: str, data: bytes, peer: str | None) -> str:
        """Act on one accepted message for one recipient; return a short log summary that
        holds no address or token. Raise to have the sender retry later."""
        ...


class _Handler:
    def __init__(self, mailboxes: Mailboxes) -> None:
        self._mailboxes = mailboxes

    async def handle_RCPT(
        self, server: Any, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        refused = self._mailboxes.check(address)
        if refused is not None:
            return REFUSALS[refused]
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            return "452 4.5.3 Too many recipients"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or envelope.content or b""
        data = content if isinstance(content, bytes) else str(content).encode("utf-8")
        peer = session.peer[0] if isinstance(session.peer, tuple) else None
        done = []
        try:
            for recipient in envelope.rcpt_tos:
                done.append(await self._mailboxes.deliver(recipient, data, peer))
        except Exception:
            log.exception("inbound.failed bytes=%d done=%s", len(data), ",".join(done) or "-")
            return "451 4.3.0 Temporary failure, please try again later"
        log.info("inbound.message bytes=%d %s", len(data), ", ".join(done))
        return "250 2.0.0 OK"


class InboundServer:
    """The listener, an aiosmtpd server on the running event loop (no thread)."""

    def __init__(self, mailboxes: Mailboxes, host: str, port: int, hostname: str) -> None:
        self.host = host
        self._port = port
        self._hostname = hostname
        self._handler = _Handler(mailboxes)
        self._server: asyncio.Server | None = None
        self._live: weakref.WeakSet[SMTPServer] = weakref.WeakSet()

    @property
    def port(self) -> int:
        """The port it listens on (the one picked when configured as 0)."""
        assert self._server is not None, "inbound listener not started"
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._connection, host=self.host, port=self._port)

    def _connection(self) -> SMTPServer:
        session = SMTPServer(
            self._handler,
            hostname=self._hostname,
            data_size_limit=MAX_MESSAGE_BYTES,
            enable_SMTPUTF8=True,
            timeout=IDLE_TIMEOUT_SECONDS,
        )
        self._live.add(session)
        return session

    async def stop(self) -> None:
        """Stop listening and hang up on connected clients (their MTAs will retry)."""
        if self._server is not None:
            self._server.close()
            for session in list(self._live):
                if session.transport is not None:
                    session.transport.close()
            await self._server.wait_closed()
            self._server = None
