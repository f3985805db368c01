"""The send path: claim (with the consent check) -> render -> hand off -> record.

Every message, the confirmation request included, goes through ``Sender.send_next``; there
is no other way out. The SMTP connection is taken *before* the claim, so nothing waits
between the consent check and the hand-off.
"""

import logging
import random
from dataclasses import dataclass
from datetime import timedelta

from mailer.domain.compose import Envelope, Rendered, compose, list_id_header
from mailer.domain.retry import next_attempt
from mailer.domain.tokens import LinkClaim, TokenCodec
from mailer.errors import MissingUnsubscribe
from mailer.render import Renderer
from mailer.services.metrics import Metrics
from mailer.services.ports import Clock, MailConnection, MailTransport
from mailer.statuses import MessageKind, OutboxStatus
from mailer.store import outbox
from mailer.store.db import Database
from mailer.store.outbox import Claimed
from mailer.transport.outcomes import PermFail, Sent, TempFail, Unknown

log = logging.getLogger("mailer.sending")


@dataclass(frozen=True, slots=True)
class SenderConfig:
    base_url: str
    from_addr: str
    instance_id: str
    give_up_after: timedelta = timedelta(hours=24)


class Sender:
    def __init__(
        self,
        db: Database,
        transport: MailTransport,
        renderer: Renderer,
        codec: TokenCodec,
        clock: Clock,
        metrics: Metrics,
        config: SenderConfig,
    ) -> None:
        self._db = db
        self._transport = transport
        self._renderer = renderer
        self._codec = codec
        self._clock = clock
        self._metrics = metrics
        self._config = config
        self._rng = random.Random()

    async def recover(self) -> int:
        """Report messages a crash left mid-hand-off as failed (never resent: G6)."""
        return await self._db.write(outbox.fail_interrupted, self._clock.now())

    async def send_next(self) -> bool:
        """Claim and send one due message; return False when none was due."""
        async with self._transport.connection() as conn:
            claimed = await self._db.write(outbox.claim, self._clock.now(), 1)
            for message in claimed:
                await self._deliver(conn, message)
        return bool(claimed)

    def build(self, message: Claimed) -> tuple[bytes, bool]:
        """Render and compose one claimed message; raise ``MissingUnsubscribe`` if unstoppable."""
        cfg = self._config
        sender = message.list_from or cfg.from_addr
        domain = sender.rpartition("@")[2]
        if message.kind is MessageKind.CONFIRM:
            claim = LinkClaim(message.email_hash, message.list_uid)
            unsubscribe = LinkClaim(message.email_hash, None)  # "this wasn't me" is global
            confirm_url = f"{cfg.base_url}/confirm/{self._codec.confirm_token(claim)}"
            unsubscribe_url = (
                f"{cfg.base_url}/unsubscribe/{self._codec.unsubscribe_token(unsubscribe)}"
            )
            rendered: Rendered = self._renderer.email(
                "confirm",
                f"Confirm your subscription to {message.list_name}",
                {
                    "list_name": message.list_name,
                    "confirm_url": confirm_url,
                    "unsubscribe_url": unsubscribe_url,
                },
            )
        else:
            raise MissingUnsubscribe(f"no template for {message.kind.value} messages yet")
        envelope = Envelope(
            from_name=message.list_name or "",
            from_addr=sender,
            to_addr=message.email,
            list_id=list_id_header(message.list_name or "", message.list_slug or "mail", domain),
            unsubscribe_url=unsubscribe_url,
            message_id=f"<{message.outbox_id}.{cfg.instance_id}@{domain}>",
            date=self._clock.now(),
            smtputf8=not (message.email.isascii() and sender.isascii()),
        )
        return compose(envelope, rendered), envelope.smtputf8

    async def _deliver(self, conn: MailConnection, message: Claimed) -> None:
        checked = self._clock.monotonic()
        try:
            data, smtputf8 = self.build(message)
        except MissingUnsubscribe as exc:
            await self._finish(message, OutboxStatus.FAILED, f"not sent: {exc.message}")
            return
        except Exception as exc:  # a bug or a broken template: nothing has left the machine
            log.exception("outbox.build_failed outbox_id=%d", message.outbox_id)
            reason = f"not sent: the message could not be built ({type(exc).__name__})"
            await self._finish(message, OutboxStatus.FAILED, reason)
            return
        sender = message.list_from or self._config.from_addr
        try:
            outcome = await conn.send(sender, message.email, data, smtputf8)
        except Exception as exc:  # transports return outcomes; this is a bug mid-hand-off
            log.exception("outbox.send_raised outbox_id=%d", message.outbox_id)
            outcome = Unknown(f"the hand-off raised {type(exc).__name__}; may have been delivered")
        match outcome:
            case Sent():
                self._metrics.handoff.observe(self._clock.monotonic() - checked)
                await self._finish(message, OutboxStatus.SENT, None)
            case PermFail(reason=reason):
                await self._finish(message, OutboxStatus.FAILED, reason)
            case Unknown(reason=reason):
                await self._finish(message, OutboxStatus.UNKNOWN, reason)
            case TempFail(reason=reason):
                await self._retry(message, reason)

    async def _finish(self, message: Claimed, status: OutboxStatus, reason: str | None) -> None:
        await self._db.write(outbox.finish, message.outbox_id, status, reason, self._clock.now())
        self._metrics.messages.labels(message.kind.value, status.value).inc()

    async def _retry(self, message: Claimed, reason: str) -> None:
        now = self._clock.now()
        at = next_attempt(
            message.attempts, message.queued_at, now, self._config.give_up_after, self._rng.random()
        )
        if at is None:
            await self._finish(message, OutboxStatus.FAILED, f"gave up retrying: {reason}")
            return
        await self._db.write(outbox.retry_later, message.outbox_id, reason, at, now)
