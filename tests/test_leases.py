"""Leases, fencing and the shared rate limit: what lets several senders share one database."""

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Select

from mailer.bootstrap import Mailer, open_mailer
from mailer.config import Settings
from mailer.domain.ratelimit import grant
from mailer.domain.tokens import TokenCodec
from mailer.errors import Conflict
from mailer.services.messages import MessageConfig, MessageFactory
from mailer.services.ports import SystemClock
from mailer.services.sending import Sender, SendPolicy
from mailer.statuses import OutboxStatus
from mailer.store import campaigns, outbox
from mailer.store.db import Database
from mailer.store.outbox import Lease, Outcome
from mailer.transport.smtp import RelayConfig, SmtpPool
from tests.conftest import SECRET, init_db, make_settings, seed_confirmed, sqlite_only
from tests.harness import SinkServer, wait_until
from tests.postgres import fetch, pg_url, requires_postgres

__all__ = ["pg_url"]


def test_grant_refills_by_elapsed_time_and_takes_whole_tokens() -> None:
    """The shared bucket's arithmetic: refill capped at the burst, whole tokens, a wait."""
    assert grant(0.0, 1.0, 10.0, 20.0, 5) == (5, 5.0, 0.0)
    assert grant(3.0, 100.0, 10.0, 20.0, 64) == (20, 0.0, 0.0)  # capped at the burst
    assert grant(0.25, 0.0, 2.0, 2.0, 4) == (0, 0.25, 0.375)  # 0.75 token missing at 2/s
    assert grant(1.5, -5.0, 2.0, 2.0, 1) == (1, 0.5, 0.0)  # a clock going back adds nothing


@sqlite_only
async def test_second_sender_on_sqlite_is_refused(tmp_path: Path, sink: SinkServer) -> None:
    """SQLite has no leases: a second sending process would fail the first one's messages."""
    settings = make_settings(tmp_path, smtp_host="127.0.0.1", smtp_port=sink.port)
    await init_db(settings)
    async with open_mailer(settings, sending=True):
        with pytest.raises(Conflict, match="another mailer process is already sending"):
            async with open_mailer(settings, sending=True):
                pass  # pragma: no cover
    async with open_mailer(settings, sending=True):  # the first one's end released it
        pass


@asynccontextmanager
async def campaign_rows(
    tmp_path: Path, sink: SinkServer, url: str, count: int, **overrides: Any
) -> AsyncIterator[tuple[Mailer, Settings, int]]:
    """A PostgreSQL mailer (no sender) with a running campaign fanned out to ``count`` people."""
    settings = make_settings(
        tmp_path, smtp_host="127.0.0.1", smtp_port=sink.port, database_url=url, **overrides
    )
    await init_db(settings)
    async with open_mailer(settings) as m:
        target = await m.lists.create("news", "Example News")
        await seed_confirmed(m, target.id, [f"r{i}@example.org" for i in range(count)])
        cid = await m.campaigns.create("news", "Leases", "Hello.", "campaign")
        await m.campaigns.send(cid)
        await m.db.write(campaigns.fan_out, cid, count, m.clock.now())
        yield m, settings, cid


@requires_postgres
async def test_only_expired_leases_are_reaped_and_stale_outcomes_land_nowhere(
    tmp_path: Path, sink: SinkServer, pg_url: str
) -> None:
    """A live sender's claims survive another sender's start and reaping; fences hold."""
    async with campaign_rows(tmp_path, sink, pg_url, 4) as (m, _, cid):
        now = datetime.now(UTC)
        live = await m.db.write(outbox.claim_batch, now, [cid], 2, Lease("live", 30))
        short = await m.db.write(outbox.claim_batch, now, [cid], 2, Lease("frozen", 0.3))
        assert len(live) == len(short) == 2
        assert await m.db.write(outbox.reap_expired, now) == 0  # nothing expired yet
        await asyncio.sleep(0.4)
        assert await m.db.write(outbox.renew, Lease("frozen", 30), now) == 0  # too late
        assert await m.db.write(outbox.renew, Lease("live", 30), now) == 2
        assert await m.db.write(outbox.reap_expired, now) == 2  # only the expired two
        states = dict(await fetch(pg_url, "SELECT lease_owner, status FROM outbox"))
        assert states == {"live": "sending", "frozen": "failed"}

        def done(c: outbox.Claimed, fence: int) -> Outcome:
            return Outcome(c.outbox_id, fence, OutboxStatus.SENT, None, None)

        async def status(c: outbox.Claimed) -> str:
            rows = await fetch(pg_url, "SELECT status FROM outbox WHERE id = $1", c.outbox_id)
            return str(rows[0][0])

        # The frozen sender wakes up: its outcomes land nowhere, the rows stay reported.
        await m.db.write(outbox.record, [done(c, c.fence) for c in short], now)
        assert [await status(c) for c in short] == ["failed", "failed"]
        # A live claim put back and claimed again: the first claim's fence no longer writes.
        back = Outcome(live[0].outbox_id, live[0].fence, OutboxStatus.QUEUED, None, now, False)
        await m.db.write(outbox.record, [back], now)
        again = await m.db.write(outbox.claim_batch, now, [cid], 1, Lease("other", 30))
        assert [c.outbox_id for c in again] == [live[0].outbox_id]
        assert again[0].fence == live[0].fence + 1
        await m.db.write(outbox.record, [done(live[0], live[0].fence)], now)
        assert await status(again[0]) == "sending"
        await m.db.write(outbox.record, [done(again[0], again[0].fence)], now)
        assert await status(again[0]) == "sent"


class JumpingClock(SystemClock):
    """The real clock, whose monotonic time can be moved ahead (a process frozen meanwhile)."""

    def __init__(self) -> None:
        self.ahead = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.ahead


class FreezeAfterFirstProbe:
    """The mailer's database, except that after the first probe's answer ``seconds`` pass
    (the process froze between the consent check and the hand-off)."""

    def __init__(self, db: Database, clock: JumpingClock, seconds: float) -> None:
        self._db, self._clock, self._seconds, self.peeks = db, clock, seconds, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)

    async def peek_all(self, statement: Select[Any], params: dict[str, Any]) -> Any:
        rows = await self._db.peek_all(statement, params)
        self.peeks += 1
        if self.peeks == 1:
            self._clock.ahead += self._seconds
        return rows


@requires_postgres
async def test_sender_frozen_between_probe_and_send_does_not_hand_off(
    tmp_path: Path, sink: SinkServer, pg_url: str
) -> None:
    """The local clock is checked right before the hand-off: time lost after the probe counts."""
    async with campaign_rows(tmp_path, sink, pg_url, 1) as (m, settings, cid):
        clock = JumpingClock()
        factory = MessageFactory(
            m.renderer,
            TokenCodec([SECRET], clock=time.time),
            clock,
            MessageConfig(settings.base_url, settings.from_addr, "test"),
        )
        policy = SendPolicy(lease_seconds=2.0, shared=True)
        db = FreezeAfterFirstProbe(m.db, clock, policy.lease_seconds)
        async with AsyncExitStack() as stack:
            pool = SmtpPool(RelayConfig("127.0.0.1", sink.port), size=1)
            stack.push_async_callback(pool.close)
            sender = Sender(db, pool, factory, clock, m.metrics, policy, "me")  # type: ignore[arg-type]
            sender.set_lanes([cid])
            sender.recorder.start()
            stack.push_async_callback(sender.recorder.stop)
            assert await sender.send_one() is True
            assert sink.messages == []  # the probe passed, but the hand-off was too late

            async def requeued() -> bool:
                rows = await fetch(pg_url, "SELECT status, fence FROM outbox")
                return rows == [("queued", 1)]

            await wait_until(requeued, what="the refused message back in the queue")
            assert await sender.send_one() is True
        assert len(sink.messages) == 1
        assert await fetch(pg_url, "SELECT status, fence, lease_owner FROM outbox") == [
            ("sent", 2, "me")
        ]
        refused = m.metrics.lease_refusals.labels("hand-off")._value.get()
        assert refused == 1


RATE = 20.0
WINDOW = 3.0


@requires_postgres
async def test_rate_limit_holds_for_all_workers_together(
    tmp_path: Path, sink: SinkServer, pg_url: str
) -> None:
    """Three workers with MAILER_SMTP_RATE=20 send about 20 messages/s together, not 60."""
    async with (
        campaign_rows(tmp_path, sink, pg_url, 200, smtp_rate=RATE, smtp_connections=2) as (
            _,
            settings,
            _,
        ),
        AsyncExitStack() as stack,
    ):
        for _ in range(3):
            await stack.enter_async_context(open_mailer(settings, sending=True))
        await wait_until(lambda: len(sink.messages) > 0, what="the first message")
        start, first = time.monotonic(), len(sink.messages)
        await asyncio.sleep(WINDOW)
        sent = len(sink.messages) - first
        elapsed = time.monotonic() - start
    burst, held = RATE, 3 * 1  # the bucket's burst, and one batch held by each worker
    assert sent <= RATE * elapsed + burst + held, sent
    assert sent >= 0.7 * RATE * WINDOW, sent  # and the workers do use the rate
    owners = await fetch(pg_url, "SELECT count(DISTINCT lease_owner) FROM outbox")
    assert owners == [(3,)]
