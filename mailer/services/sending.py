"""The send path: claim (with the consent check) -> build -> hand off -> record.

Every message, the confirmation request included, goes through ``Sender.send_one``; there
is no other way out. The SMTP connection (and a rate-limit token) is taken *before* the
claim, so nothing waits between the consent check and the hand-off. Each send task claims
one message at a time; throughput comes from many tasks sharing each group commit, and from
recording outcomes in batches that ride along with the next claims.
"""

import asyncio
import logging
import random
from dataclasses import dataclass
from datetime import timedelta

from mailer.domain.ratelimit import TokenBucket
from mailer.domain.retry import next_attempt
from mailer.errors import MailerError, MissingUnsubscribe
from mailer.services.messages import Built, MessageFactory
from mailer.services.metrics import Metrics
from mailer.services.ports import Clock, MailConnection, MailTransport
from mailer.statuses import MessageKind, OutboxStatus
from mailer.store import campaigns, outbox
from mailer.store.campaigns import CampaignRow
from mailer.store.db import Database
from mailer.store.outbox import Claimed, Outcome
from mailer.transport.outcomes import PermFail, RelayDown, Sent, TempFail, Unknown

log = logging.getLogger("mailer.sending")

RELAY_BACKOFF_START = 30.0
RELAY_BACKOFF_MAX = 900.0


@dataclass(frozen=True, slots=True)
class SendPolicy:
    give_up_after: timedelta = timedelta(hours=24)
    rate_per_second: float = 0.0
    """Messages per second for this process; 0 means as fast as the relay takes them."""


class Recorder:
    """Collects outcomes and writes them in batches (one transaction per flush).

    A message stays ``sending`` until its outcome is written; a crash in between leaves it
    to ``fail_interrupted`` at the next start: reported, never sent twice (G6).
    """

    def __init__(self, db: Database, clock: Clock) -> None:
        self._db = db
        self._clock = clock
        self._pending: list[Outcome] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="mailer-recorder")

    def add(self, outcome: Outcome) -> None:
        self._pending.append(outcome)
        self._wake.set()

    async def stop(self) -> None:
        """Write everything still pending, then end."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._pending = self._pending, []
            if batch:
                try:
                    await self._db.write(outbox.record, batch, self._clock.now())
                except Exception:
                    log.exception("outbox.record_failed count=%d", len(batch))
            if self._stopping and not self._pending:
                return


class Sender:
    def __init__(
        self,
        db: Database,
        transport: MailTransport,
        factory: MessageFactory,
        clock: Clock,
        metrics: Metrics,
        policy: SendPolicy,
    ) -> None:
        self._db = db
        self._transport = transport
        self._factory = factory
        self._clock = clock
        self._metrics = metrics
        self._policy = policy
        self._rng = random.Random()
        self.recorder = Recorder(db, clock)
        self._lanes: list[int] = []
        self._campaigns: dict[int, CampaignRow] = {}
        self._bucket = (
            TokenBucket(policy.rate_per_second, max(1.0, policy.rate_per_second))
            if policy.rate_per_second > 0
            else None
        )
        self._relay_backoff = 0.0
        self._relay_closed_until = 0.0

    def set_lanes(self, running: list[int]) -> None:
        """The running campaigns, whose messages are claimed after the direct lane."""
        self._lanes = running

    async def recover(self) -> int:
        """Report messages a crash left mid-hand-off as failed (never resent: G6)."""
        return await self._db.write(outbox.fail_interrupted, self._clock.now())

    def relay_wait(self) -> float:
        """Seconds still to wait before the relay or the rate limit allows a message."""
        now = self._clock.monotonic()
        if now < self._relay_closed_until:
            return self._relay_closed_until - now
        if self._bucket is not None:
            return self._bucket.take(now)
        return 0.0

    async def send_one(self, task: int = 0) -> bool:
        """Claim one due message and hand it off; return False when none was due."""
        async with self._transport.connection() as conn:
            checked = self._clock.monotonic()
            lanes = self._lanes
            if lanes:
                turn = task % len(lanes)
                lanes = lanes[turn:] + lanes[:turn]
            message = await self._db.write(outbox.claim_next, self._clock.now(), [None, *lanes])
            if message is None:
                return False
            await self._deliver(conn, message, checked)
        return True

    async def _build(self, message: Claimed) -> Built:
        if message.kind is MessageKind.CONFIRM:
            return self._factory.confirm(message)
        assert message.campaign_id is not None
        campaign = self._campaigns.get(message.campaign_id)
        if campaign is None or message.kind is MessageKind.PREVIEW:
            campaign = await self._db.read(campaigns.get, message.campaign_id)
            self._campaigns[message.campaign_id] = campaign
        return self._factory.campaign(message, campaign)

    async def _deliver(self, conn: MailConnection, message: Claimed, checked: float) -> None:
        try:
            built = await self._build(message)
        except MissingUnsubscribe as exc:
            self._record(message, OutboxStatus.FAILED, f"not sent: {exc.message}")
            return
        except Exception as exc:  # a bug or a broken template: nothing has left the machine
            log.exception("outbox.build_failed outbox_id=%d", message.outbox_id)
            detail = exc.message if isinstance(exc, MailerError) else type(exc).__name__
            reason = f"not sent: the message could not be built ({detail})"
            self._record(message, OutboxStatus.FAILED, reason)
            return
        try:
            result = await conn.send(built.sender, message.email, built.data, built.smtputf8)
        except Exception as exc:  # transports return outcomes; this is a bug mid-hand-off
            log.exception("outbox.send_raised outbox_id=%d", message.outbox_id)
            result = Unknown(f"the hand-off raised {type(exc).__name__}; may have been delivered")
        match result:
            case Sent():
                self._metrics.handoff.observe(self._clock.monotonic() - checked)
                self._relay_backoff = 0.0
                self._record(message, OutboxStatus.SENT, None)
            case PermFail(reason=reason) as refused:
                bounced = message.email_hash if refused.no_such_mailbox else None
                self._record(message, OutboxStatus.FAILED, reason, bounced)
            case Unknown(reason=reason):
                self._record(message, OutboxStatus.UNKNOWN, reason)
            case TempFail(reason=reason, relay_backoff=backoff):
                if backoff:
                    self._close_relay(reason)
                self._retry(message, reason)
            case RelayDown(reason=reason):
                self._close_relay(reason)
                now = self._clock.now()
                self.recorder.add(
                    Outcome(message.outbox_id, OutboxStatus.QUEUED, reason, now, charged=False)
                )

    def _close_relay(self, reason: str) -> None:
        """A 421 or an unusable relay: every task waits, with a doubling pause."""
        self._relay_backoff = min(
            RELAY_BACKOFF_MAX, max(RELAY_BACKOFF_START, self._relay_backoff * 2)
        )
        self._relay_closed_until = self._clock.monotonic() + self._relay_backoff
        log.error("relay.backoff seconds=%.0f reason=%s", self._relay_backoff, reason)

    def _record(
        self,
        message: Claimed,
        status: OutboxStatus,
        reason: str | None,
        bounced_hash: str | None = None,
    ) -> None:
        self.recorder.add(Outcome(message.outbox_id, status, reason, None, True, bounced_hash))
        self._metrics.messages.labels(message.kind.value, status.value).inc()

    def _retry(self, message: Claimed, reason: str) -> None:
        now = self._clock.now()
        at = next_attempt(
            message.attempts, message.queued_at, now, self._policy.give_up_after, self._rng.random()
        )
        if at is None:
            self._record(message, OutboxStatus.FAILED, f"gave up retrying: {reason}")
            return
        self.recorder.add(Outcome(message.outbox_id, OutboxStatus.QUEUED, reason, at))
