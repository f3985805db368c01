"""The Recorder (services/sending.py): outcome writes, their batching, and claims that carry
them. On the pass's real database (SQLite, or PostgreSQL with --db=postgresql)."""

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from mailer.services.ports import SystemClock
from mailer.services.sending import Recorder
from mailer.statuses import OutboxStatus
from mailer.store import outbox
from mailer.store.db import Database
from mailer.store.outbox import Claimed, Lease, Outcome
from tests.databases import active
from tests.harness import SinkServer, query, wait_until
from tests.test_leases import campaign_rows

LINGER = 0.3


class Counted:
    """The mailer's database, with the store function of every write recorded; with a
    ``gate``, outcome writes wait for it before they begin."""

    def __init__(self, db: Database, gate: asyncio.Event | None = None) -> None:
        self._db = db
        self._gate = gate
        self.writes: list[Callable[..., Any]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)

    async def write(self, fn: Callable[..., Any], *args: Any) -> Any:
        self.writes.append(fn)
        if self._gate is not None and fn is outbox.record:
            await self._gate.wait()
        return await self._db.write(fn, *args)


def rows_of(tmp_path: Path, sink: SinkServer, count: int) -> Any:
    """A mailer (no sender) with a running campaign fanned out to ``count`` people."""
    return campaign_rows(tmp_path, sink, active.url(tmp_path / "mailer.db"), count)


def recording(db: Database, **options: Any) -> tuple[Counted, Recorder]:
    """A running recorder writing through ``db``, with its writes counted."""
    counted = Counted(db, options.pop("gate", None))
    recorder = Recorder(counted, SystemClock(), **options)  # type: ignore[arg-type]
    recorder.start()
    return counted, recorder


def sent(c: Claimed) -> Outcome:
    return Outcome(c.outbox_id, c.fence, OutboxStatus.SENT, None, None)


async def claim(db: Database, cid: int, count: int) -> list[Claimed]:
    return await db.write(outbox.claim_batch, datetime.now(UTC), [cid], count, Lease("me", 30))


def statuses(settings_url: str) -> dict[str, int]:
    return dict(query(settings_url, "SELECT status, count(*) FROM outbox GROUP BY status"))


async def test_with_linger_outcomes_added_meanwhile_share_one_write(
    tmp_path: Path, sink: SinkServer
) -> None:
    async with rows_of(tmp_path, sink, 3) as (m, settings, cid):
        a, b, c = await claim(m.db, cid, 3)
        db, recorder = recording(m.db, linger=LINGER, most=3)
        recorder.add(sent(a))
        await asyncio.sleep(LINGER / 3)
        assert db.writes == []  # still lingering
        recorder.add(sent(b))
        await wait_until(lambda: statuses(settings.database_url).get("sent") == 2, what="a, b")
        assert db.writes == [outbox.record]  # both in one write
        started = time.monotonic()
        recorder.add(sent(c))
        await recorder.stop()  # a stop writes what is pending at once
        assert time.monotonic() - started < LINGER
        assert statuses(settings.database_url) == {"sent": 3}
        assert db.writes == [outbox.record, outbox.record]


async def test_with_most_outcomes_pending_the_write_goes_at_once(
    tmp_path: Path, sink: SinkServer
) -> None:
    async with rows_of(tmp_path, sink, 2) as (m, settings, cid):
        a, b = await claim(m.db, cid, 2)
        db, recorder = recording(m.db, linger=30.0, most=2)
        recorder.add(sent(a))
        recorder.add(sent(b))
        await wait_until(
            lambda: statuses(settings.database_url) == {"sent": 2}, timeout=5, what="no linger"
        )
        assert db.writes == [outbox.record]
        await recorder.stop()


async def test_a_claim_carries_the_pending_outcomes_and_gives_them_back_if_it_fails(
    tmp_path: Path, sink: SinkServer
) -> None:
    """The claim's turn takes every pending outcome into its own transaction; a claim that
    failed leaves them pending, for the recorder to write."""
    async with rows_of(tmp_path, sink, 4) as (m, settings, cid):
        a, b = await claim(m.db, cid, 2)
        db, recorder = recording(m.db, linger=30.0, most=10)
        recorder.add(sent(a))
        async with recorder.turn() as carried:
            assert carried == [sent(a)]
            more = await db.write(
                outbox.claim_batch, datetime.now(UTC), [cid], 1, Lease("me", 30), carried
            )
        assert len(more) == 1
        assert statuses(settings.database_url) == {"sent": 1, "sending": 2, "queued": 1}
        assert db.writes == [outbox.claim_batch]  # the recorder wrote nothing itself

        recorder.add(sent(b))

        async def failing_claim() -> None:
            async with recorder.turn() as carried:
                assert carried == [sent(b)]
                raise RuntimeError("the claim failed")

        with pytest.raises(RuntimeError):
            await failing_claim()
        await recorder.stop()
        assert statuses(settings.database_url) == {"sent": 2, "sending": 1, "queued": 1}


async def test_a_claim_waits_for_the_outcome_write_in_flight(
    tmp_path: Path, sink: SinkServer
) -> None:
    """One write of outcomes in flight at a time: what bounds the rows one crash can leave
    ``sending`` (tests/test_crash.py, CRASH_BOUND)."""
    async with rows_of(tmp_path, sink, 1) as (m, _, cid):
        (a,) = await claim(m.db, cid, 1)
        release = asyncio.Event()
        db, recorder = recording(m.db, gate=release)
        recorder.add(sent(a))
        await wait_until(lambda: db.writes == [outbox.record], what="the write in flight")
        entered = asyncio.Event()

        async def claim_turn() -> None:
            async with recorder.turn():
                entered.set()

        turn = asyncio.ensure_future(claim_turn())
        await asyncio.sleep(0.1)
        assert not entered.is_set()
        release.set()
        await asyncio.wait_for(turn, 5)
        await recorder.stop()
