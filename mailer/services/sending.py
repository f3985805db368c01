"""The send path: claim -> consent check -> build -> hand off -> record.

Every message, the confirmation request included, goes through ``Sender.send_one``; there
is no other way out.

* **Claim** (a write, so an fsync): rows are reserved in small batches into a shared
  prefetch buffer, ``sending`` from then on. The claim already skips anyone who left.
* **Consent check** (G1/G2): after the task holds its SMTP connection and rate-limit token,
  and right before the hand-off, one read (``outbox.PROBE``) looks at the recipient's
  subscription, suppression and the campaign's status *as of now*. Anyone who unsubscribed
  after the claim is skipped; a paused campaign's message goes back to the queue uncharged;
  a cancelled one's is skipped. Nothing waits between this check and the hand-off, and its
  time is recorded as ``checked_at``. On PostgreSQL, checks that begin while another one's
  query is in flight share the next query (``SharedProbe``), never one already sent.
* **Record**: outcomes are written in batches, one write in flight at a time; a claim
  carries every outcome pending when it starts, in its own transaction.
* **Leases** (several senders on PostgreSQL): a claim leases each row to this sender until a
  database-clock deadline, under a new fence. The consent probe reads the row's fence and
  lease end with the database clock in the same round trip; the message goes only if the
  claim is still this sender's and has more than a margin to run, and only if the local
  monotonic clock, checked again right before the hand-off, agrees (a sender frozen between
  the probe and the send notices). Outcomes are written under the fence.

A crash leaves the buffered and in-flight rows ``sending``: at most the prefetch buffer plus
one message per connection (``Recorder``). On SQLite (one sender) the next start reports them
failed (``interrupted``); on PostgreSQL any live sender does so once their lease has
expired. Either way they are never sent twice (G6); the buffer is small to keep that few.
"""

import asyncio
import contextlib
import logging
import math
import random
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from mailer.domain.consent import may_send
from mailer.domain.retry import next_attempt
from mailer.errors import MailerError, MissingUnsubscribe
from mailer.services.messages import Built, MessageFactory
from mailer.services.metrics import Metrics
from mailer.services.ports import Clock, MailConnection, MailTransport, NoSigner, Signer
from mailer.services.probing import SharedProbe
from mailer.services.throttle import Throttle
from mailer.statuses import CampaignStatus, MessageKind, OutboxStatus
from mailer.store import campaigns, outbox
from mailer.store.campaigns import CampaignRow
from mailer.store.db import Database
from mailer.store.outbox import Claimed, Lease, Outcome
from mailer.transport.outcomes import PermFail, RelayDown, Sent, TempFail, Unknown

log = logging.getLogger("mailer.sending")

PREFETCH_PER_CONNECTION = 4
"""Claimed rows a sender keeps buffered, per SMTP connection. A claim is a write transaction
of two SELECTs and an UPDATE; four per connection rather than two cut the workers' CPU per
message by about 9 % on PostgreSQL (bench/send.py). A crash reports at most this buffer plus
the messages in hand as interrupted, never resent."""
RECORD_LINGER = 0.01
"""Seconds an outcome write waits for more outcomes where several senders share PostgreSQL:
one commit per ~20 messages instead of per ~3 took 8 % off two workers' CPU per message
(bench/send.py). A flush goes at once when a buffer's worth is pending."""
RELAY_BACKOFF_START = 30.0
RELAY_BACKOFF_MAX = 900.0


@dataclass(frozen=True, slots=True)
class SendPolicy:
    give_up_after: timedelta = timedelta(hours=24)
    lease_seconds: float = 60.0
    """How long a claim holds without renewal; checked only where ``shared``."""
    shared: bool = False
    """Other processes may send from this database (PostgreSQL): leases are checked, and
    expired ones reaped while running instead of every leftover row at start."""

    @property
    def lease_margin(self) -> float:
        """A message goes only if its lease has more than this left: time for the hand-off."""
        return self.lease_seconds / 4


@dataclass(frozen=True, slots=True)
class Go:
    """The probe passed: hand the message off before ``deadline`` (local monotonic clock)."""

    deadline: float


class Recorder:
    """Collects outcomes and writes them in batches.

    A message stays ``sending`` until its outcome is written; a crash in between leaves it
    to be reported failed (interrupted), never sent twice (G6). The sender has one write of
    outcomes in flight at a time: the recorder's own, or a claim, which carries every
    outcome pending when it starts (``turn``). So once a claim commits, every message handed
    over before it began is written, and one crash leaves at most the prefetch buffer plus
    the messages in hand ``sending``.

    With ``linger`` (PostgreSQL, where each transaction is its own commit), the recorder's
    own write first waits that long for more outcomes, unless ``most`` are already pending.
    """

    def __init__(self, db: Database, clock: Clock, linger: float = 0.0, most: int = 1) -> None:
        self._db = db
        self._clock = clock
        self._linger = linger
        self._most = most
        self._pending: list[Outcome] = []
        self._wake = asyncio.Event()
        self._full = asyncio.Event()
        self._writing = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="mailer-recorder")

    def add(self, outcome: Outcome) -> None:
        self._pending.append(outcome)
        self._wake.set()
        if len(self._pending) >= self._most:
            self._full.set()

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[list[Outcome]]:
        """The sender's one write in flight, with every outcome pending as it starts; if the
        write fails, they are pending again."""
        async with self._writing:
            batch = self._take()
            try:
                yield batch
            except BaseException:
                self._pending[:0] = batch
                if self._pending:
                    self._wake.set()
                raise

    async def stop(self) -> None:
        """Write everything still pending, then end."""
        self._stopping = True
        self._wake.set()
        self._full.set()
        if self._task is not None:
            await self._task

    def _take(self) -> list[Outcome]:
        batch, self._pending = self._pending, []
        if not self._stopping:
            self._full.clear()
        return batch

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            if self._linger and not self._full.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._full.wait(), self._linger)
            self._wake.clear()
            async with self._writing:
                batch = self._take()
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
        owner: str,
        prefetch: int = 8,
        signer: Signer | None = None,
        throttle: Throttle | None = None,
    ) -> None:
        self._db = db
        self._signer = signer or NoSigner()
        self._transport = transport
        self._factory = factory
        self._clock = clock
        self._metrics = metrics
        self._policy = policy
        self._rng = random.Random()
        linger = RECORD_LINGER if policy.shared else 0.0
        self.recorder = Recorder(db, clock, linger, most=prefetch)
        self._lanes: list[int] = []
        self._campaigns: dict[int, CampaignRow] = {}
        self._throttle = throttle
        self.lease = Lease(owner, policy.lease_seconds)
        self._shared_probe = SharedProbe(db, outbox.PROBES) if policy.shared else None
        self._relay_backoff = 0.0
        self._relay_closed_until = 0.0
        self._prefetch = prefetch
        self._buffer: deque[Claimed] = deque()
        self._filling: asyncio.Future[None] | None = None
        self._turn = 0

    def set_lanes(self, running: list[int]) -> None:
        """The running campaigns, whose messages are claimed after the direct lane."""
        self._lanes = running

    async def recover(self) -> int:
        """At start, report messages a crash left mid-hand-off as failed (never resent: G6).

        Shared database: only rows whose lease expired (other senders hold the rest). SQLite:
        this is its only sender, so every row left ``sending`` is a leftover.
        """
        if self._policy.shared:
            return await self._db.write(outbox.reap_expired, self._clock.now())
        await self._db.lock_sender()
        return await self._db.write(outbox.fail_interrupted, self._clock.now())

    async def keep_leases(self) -> tuple[int, int]:
        """Renew this sender's live claims, then reap everyone's expired ones; both counts."""
        now = self._clock.now()
        renewed = await self._db.write(outbox.renew, self.lease, now)
        reaped = await self._db.write(outbox.reap_expired, now)
        if reaped:
            self._metrics.leases_reaped.inc(reaped)
        return renewed, reaped

    async def relay_wait(self) -> float:
        """Seconds still to wait before the relay or the rate limit allows a message."""
        now = self._clock.monotonic()
        if now < self._relay_closed_until:
            return self._relay_closed_until - now
        if self._throttle is not None:
            return await self._throttle.wait()  # spent only when a message is really taken
        return 0.0

    async def send_one(self) -> bool:
        """Hand off one due message (or settle it without sending); False when none was due.

        The message is built and signed first, so that nothing but the consent check stands
        between that check and the hand-off.
        """
        async with self._transport.connection() as conn:
            message = await self._next()
            if message is None:
                return False
            if self._throttle is not None:
                self._throttle.spend()
            ready = await self._prepare(message)
            checked = self._clock.monotonic()
            checked_at = self._clock.now()  # before the probe, whose snapshot is no older
            verdict = await self._check(message, checked, checked_at)
            if not isinstance(verdict, Go):
                if verdict is not None:
                    self.recorder.add(verdict)
                return True
            if isinstance(ready, str):  # could not be built: nothing has left the machine
                self._finish(message, checked_at, OutboxStatus.FAILED, ready)
                return True
            await self._deliver(conn, message, ready, checked, checked_at, verdict.deadline)
        return True

    async def release(self) -> None:
        """On a clean stop: claimed messages not yet handed off go back to the queue."""
        now = self._clock.now()
        while self._buffer:
            message = self._buffer.popleft()
            self.recorder.add(_requeue(message, now))

    async def _next(self) -> Claimed | None:
        if not self._buffer:
            await self._fill()
        elif len(self._buffer) <= self._prefetch // 2 and self._filling is None:
            self._filling = asyncio.ensure_future(self._claim())
        return self._buffer.popleft() if self._buffer else None

    async def _fill(self) -> None:
        if self._filling is None:
            self._filling = asyncio.ensure_future(self._claim())
        await asyncio.shield(self._filling)

    async def _claim(self) -> None:
        try:
            lanes = self._lanes
            if lanes:
                self._turn = (self._turn + 1) % len(lanes)
                lanes = lanes[self._turn :] + lanes[: self._turn]
            room = max(1, self._prefetch - len(self._buffer))
            async with self.recorder.turn() as outcomes:
                claimed = await self._db.write(
                    outbox.claim_batch,
                    self._clock.now(),
                    [None, *lanes],
                    room,
                    self.lease,
                    outcomes,
                )
            self._buffer.extend(claimed)
        finally:
            self._filling = None

    async def _check(self, message: Claimed, started: float, now: datetime) -> Outcome | Go | None:
        """The check right before hand-off, begun at ``started`` (monotonic) and ``now`` (taken
        just before it, so a check recorded after an opt-out's answer did see that opt-out).

        ``Go`` when the message may be handed off; an outcome when it must not go; None when
        this sender no longer holds the row (its lease was reaped or taken): nothing to write.
        """
        row = await self._probe(message.outbox_id)
        oid, fence = message.outbox_id, message.fence
        if row is None:  # the person was erased since the claim, and the row with them
            return Outcome(oid, fence, OutboxStatus.SKIPPED, "erased", None)
        subscription, suppressed, campaign_status, confirmed_anywhere, status, held = row[:6]
        if status != OutboxStatus.SENDING or held != fence:
            self._metrics.leases_lost.inc()
            log.warning("lease.lost outbox_id=%d (reaped or claimed elsewhere; not sent)", oid)
            return None
        deadline = math.inf
        if self._policy.shared:
            left = (row[6] - row[7]).total_seconds() - self._policy.lease_margin
            if left <= 0:  # still ours, but too close to its end to start a hand-off
                return self._refuse(message, "probe")
            deadline = started + left  # the lease was read after ``started``: conservative
        if (
            message.campaign_id is not None
            and message.kind is not MessageKind.PREVIEW
            and (campaign_status != CampaignStatus.RUNNING)
        ):
            if campaign_status == CampaignStatus.PAUSED:  # back to the queue, uncharged
                return Outcome(oid, fence, OutboxStatus.QUEUED, None, now, False, None, now)
            reason = str(campaign_status)
            return Outcome(oid, fence, OutboxStatus.SKIPPED, reason, None, True, None, now)
        skip = may_send(message.kind, subscription, suppressed, bool(confirmed_anywhere))
        if skip is None:
            return Go(deadline)
        self._metrics.messages.labels(message.kind.value, "skipped").inc()
        return Outcome(oid, fence, OutboxStatus.SKIPPED, skip.value, None, True, None, now)

    async def _probe(self, outbox_id: int) -> tuple[Any, ...] | None:
        """The message's probe row as of now: shared with concurrent checks where that saves
        round trips (PostgreSQL), else one prepared read on the loop's own connection."""
        if self._shared_probe is not None:
            return await self._shared_probe.read(outbox_id)
        return await self._db.peek(outbox.PROBE, {"oid": outbox_id})

    def _refuse(self, message: Claimed, where: str) -> Outcome:
        """The lease is (nearly) over before the hand-off: back to the queue, uncharged.

        The row is still ours unless reaped meanwhile, and then the fenced write lands nowhere.
        """
        self._metrics.lease_refusals.labels(where).inc()
        log.warning("lease.refused outbox_id=%d at=%s (too late)", message.outbox_id, where)
        return _requeue(message, self._clock.now())

    async def _build(self, message: Claimed) -> Built:
        if message.kind is MessageKind.CONFIRM:
            return self._factory.confirm(message)
        assert message.campaign_id is not None
        campaign = self._campaigns.get(message.campaign_id)
        if campaign is None or message.kind is MessageKind.PREVIEW:
            campaign = await self._db.read(campaigns.get, message.campaign_id)
            self._campaigns[message.campaign_id] = campaign
        return self._factory.campaign(message, campaign)

    async def _prepare(self, message: Claimed) -> tuple[Built, bytes] | str:
        """The message and its signed bytes; or, when it cannot be built, the failure reason."""
        try:
            built = await self._build(message)
            return built, self._signer.sign(built.data, built.filled)
        except MissingUnsubscribe as exc:
            return f"not sent: {exc.message}"
        except Exception as exc:  # a bug or a broken template: nothing has left the machine
            log.exception("outbox.build_failed outbox_id=%d", message.outbox_id)
            detail = exc.message if isinstance(exc, MailerError) else type(exc).__name__
            return f"not sent: the message could not be built ({detail})"

    def _finish(
        self,
        message: Claimed,
        checked_at: datetime,
        status: OutboxStatus,
        reason: str | None,
        bounced: str | None = None,
    ) -> None:
        self.recorder.add(
            Outcome(
                message.outbox_id, message.fence, status, reason, None, True, bounced, checked_at
            )
        )
        self._metrics.messages.labels(message.kind.value, status.value).inc()

    async def _deliver(
        self,
        conn: MailConnection,
        message: Claimed,
        ready: tuple[Built, bytes],
        checked: float,
        checked_at: datetime,
        deadline: float,
    ) -> None:
        oid, fence = message.outbox_id, message.fence

        def done(status: OutboxStatus, reason: str | None, bounced: str | None = None) -> None:
            self._finish(message, checked_at, status, reason, bounced)

        built, data = ready
        if self._clock.monotonic() >= deadline:  # frozen or slow since the probe
            self.recorder.add(self._refuse(message, "hand-off"))
            return
        try:
            result = await conn.send(built.sender, message.email, data, built.smtputf8)
        except Exception as exc:  # transports return outcomes; this is a bug mid-hand-off
            log.exception("outbox.send_raised outbox_id=%d", message.outbox_id)
            result = Unknown(f"the hand-off raised {type(exc).__name__}; may have been delivered")
        match result:
            case Sent():
                self._metrics.handoff.observe(self._clock.monotonic() - checked)
                if self._relay_backoff:
                    self._relay_backoff = 0.0
                    self._metrics.relay_backoff.set(0)
                done(OutboxStatus.SENT, None)
            case PermFail(reason=reason) as refused:
                done(
                    OutboxStatus.FAILED,
                    reason,
                    message.email_hash if refused.no_such_mailbox else None,
                )
            case Unknown(reason=reason):
                done(OutboxStatus.UNKNOWN, reason)
            case TempFail(reason=reason, relay_backoff=backoff):
                if backoff:
                    self._close_relay(reason)
                at = next_attempt(
                    message.attempts,
                    message.queued_at,
                    self._clock.now(),
                    self._policy.give_up_after,
                    self._rng.random(),
                )
                if at is None:
                    done(OutboxStatus.FAILED, f"gave up retrying: {reason}")
                else:
                    self.recorder.add(
                        Outcome(oid, fence, OutboxStatus.QUEUED, reason, at, True, None, checked_at)
                    )
            case RelayDown(reason=reason):
                self._close_relay(reason)
                now = self._clock.now()
                self.recorder.add(
                    Outcome(oid, fence, OutboxStatus.QUEUED, reason, now, False, None, checked_at)
                )

    def _close_relay(self, reason: str) -> None:
        """A 421 or an unusable relay: every task waits, with a doubling pause."""
        self._relay_backoff = min(
            RELAY_BACKOFF_MAX, max(RELAY_BACKOFF_START, self._relay_backoff * 2)
        )
        self._relay_closed_until = self._clock.monotonic() + self._relay_backoff
        self._metrics.relay_backoff.set(self._relay_backoff)
        log.error("relay.backoff seconds=%.0f reason=%s", self._relay_backoff, reason)


def _requeue(message: Claimed, now: datetime) -> Outcome:
    """Back to the queue at once, uncharged: it was never handed off."""
    return Outcome(message.outbox_id, message.fence, OutboxStatus.QUEUED, None, now, False)
