"""Consent checks that share a round trip (services/probing.py), against real PostgreSQL.

The probe rows come from the real database; a thin wrapper only counts the queries, holds
one in flight, or makes one fail.
"""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Select

from mailer.bootstrap import Mailer
from mailer.domain.ledger import Evidence
from mailer.services.probing import SharedProbe
from mailer.statuses import SubscriptionStatus
from mailer.store import outbox
from mailer.store.db import Database
from mailer.store.outbox import Claimed, Lease
from tests.harness import SinkServer
from tests.postgres import pg_url, requires_postgres
from tests.test_leases import campaign_rows

__all__ = ["pg_url"]
pytestmark = requires_postgres
EVIDENCE = Evidence(channel="api", actor="tests")


class Watched:
    """The mailer's database, with every ``peek_all`` recorded; ``hold`` keeps the next
    query's answer (already read) until ``release`` is set; ``fail`` makes the next one raise."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self.queries: list[list[int]] = []
        self.hold = False
        self.held = asyncio.Event()
        self.release = asyncio.Event()
        self.fail: Exception | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)

    async def peek_all(self, statement: Select[Any], params: dict[str, Any]) -> Any:
        self.queries.append(list(params["oids"]))
        if self.fail is not None:
            failure, self.fail = self.fail, None
            raise failure
        rows = await self._db.peek_all(statement, params)
        if self.hold:
            self.hold = False
            self.held.set()
            await self.release.wait()
        return rows


@asynccontextmanager
async def probing(
    tmp_path: Path, sink: SinkServer, url: str, count: int
) -> AsyncIterator[tuple[Mailer, list[Claimed], Watched, SharedProbe]]:
    """A campaign's ``count`` messages claimed, and a shared probe with its queries watched."""
    async with campaign_rows(tmp_path, sink, url, count) as (m, _, cid):
        claimed = await m.db.write(
            outbox.claim_batch, datetime.now(UTC), [cid], count, Lease("me", 30)
        )
        watched = Watched(m.db)
        yield m, claimed, watched, SharedProbe(watched, outbox.PROBES)  # type: ignore[arg-type]


async def test_concurrent_checks_share_one_query_and_each_gets_its_own_row(
    tmp_path: Path, sink: SinkServer, pg_url: str
) -> None:
    async with probing(tmp_path, sink, pg_url, 12) as (_, claimed, watched, probe):
        rows = await asyncio.gather(*(probe.read(c.outbox_id) for c in claimed))
        assert watched.queries == [[c.outbox_id for c in claimed]]  # begun in one turn: one query
        for c, row in zip(claimed, rows, strict=True):
            assert row is not None and row[-1] == c.outbox_id
            assert row[4:6] == ("sending", c.fence)
        assert await probe.read(10**9) is None  # no such row (an erased person's)


async def test_a_check_begun_while_a_query_is_in_flight_reads_after_it_began(
    tmp_path: Path, sink: SinkServer, pg_url: str
) -> None:
    """G2: a check never takes the answer of a query sent before it started. Checks that
    start while one is in flight wait for the next query, which sees what was committed
    meanwhile (here an unsubscribe answered between the two)."""
    async with probing(tmp_path, sink, pg_url, 3) as (m, claimed, watched, probe):
        first, second, third = claimed
        watched.hold = True
        early = asyncio.ensure_future(probe.read(first.outbox_id))
        await watched.held.wait()  # its query has read the database and is on its way back
        await m.consent.unsubscribe_address(second.email, "news", EVIDENCE)
        late = [asyncio.ensure_future(probe.read(c.outbox_id)) for c in (second, third)]
        await asyncio.sleep(0.05)
        assert not any(t.done() for t in late)  # waiting for the query in flight to end
        assert len(watched.queries) == 1
        watched.release.set()
        row_early, row_second, row_third = await early, *await asyncio.gather(*late)
        assert watched.queries == [[first.outbox_id], [second.outbox_id, third.outbox_id]]
        assert row_early is not None and row_early[0] == SubscriptionStatus.CONFIRMED
        assert row_second is not None and row_second[0] == SubscriptionStatus.UNSUBSCRIBED
        assert row_third is not None and row_third[0] == SubscriptionStatus.CONFIRMED


async def test_a_failed_query_fails_its_checks_and_the_next_ones_run_anew(
    tmp_path: Path, sink: SinkServer, pg_url: str
) -> None:
    async with probing(tmp_path, sink, pg_url, 3) as (_, claimed, watched, probe):
        watched.fail = ConnectionResetError("the server went away")
        results = await asyncio.gather(
            *(probe.read(c.outbox_id) for c in claimed[:2]), return_exceptions=True
        )
        assert [type(r) for r in results] == [ConnectionResetError, ConnectionResetError]
        row = await probe.read(claimed[2].outbox_id)
        assert row is not None and row[-1] == claimed[2].outbox_id
        assert len(watched.queries) == 2


async def test_a_cancelled_check_leaves_the_others_their_answers(
    tmp_path: Path, sink: SinkServer, pg_url: str
) -> None:
    """Cancelled while its query is in flight, or before its query is sent (then its id is
    not even asked for): either way the checks beside it get their rows."""
    async with probing(tmp_path, sink, pg_url, 4) as (_, claimed, watched, probe):
        first, second, third, fourth = claimed
        watched.hold = True
        in_flight = [asyncio.ensure_future(probe.read(c.outbox_id)) for c in (first, second)]
        await watched.held.wait()
        unsent = asyncio.ensure_future(probe.read(third.outbox_id))
        kept = asyncio.ensure_future(probe.read(fourth.outbox_id))
        await asyncio.sleep(0)
        in_flight[0].cancel()
        unsent.cancel()
        watched.release.set()
        rows = await asyncio.wait_for(asyncio.gather(in_flight[1], kept), 5)
        assert [row[-1] if row else None for row in rows] == [second.outbox_id, fourth.outbox_id]
        for cancelled in (in_flight[0], unsent):
            with pytest.raises(asyncio.CancelledError):
                await cancelled
        assert watched.queries == [[first.outbox_id, second.outbox_id], [fourth.outbox_id]]
