"""PostgreSQL's own store paths: the raw-pool peek and retried concurrent writes."""

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy import Connection, Select, String, func, select, text
from sqlalchemy.exc import DBAPIError

from mailer.store import outbox
from mailer.store.outbox import Lease
from mailer.store.postgres import PEEK_SETTINGS, PostgresDatabase, _compile
from tests.conftest import STAFF
from tests.harness import SinkServer
from tests.postgres import fetch, pg_url, requires_postgres
from tests.test_leases import campaign_rows

__all__ = ["pg_url"]
pytestmark = requires_postgres


def through_sqlalchemy(
    statement: Select[Any], params: dict[str, Any]
) -> Callable[[Connection], tuple[Any, ...] | None]:
    """A store function running ``statement`` the way every other read does."""

    def run(conn: Connection) -> tuple[Any, ...] | None:
        row = conn.execute(statement, params).first()
        return None if row is None else tuple(row)

    return run


def through_sqlalchemy_all(
    statement: Select[Any], params: dict[str, Any]
) -> Callable[[Connection], list[tuple[Any, ...]]]:
    """Every row of ``statement``, read the way every other read does."""

    def run(conn: Connection) -> list[tuple[Any, ...]]:
        return [tuple(row) for row in conn.execute(statement, params)]

    return run


async def test_peek_returns_what_the_sqlalchemy_path_returns(
    tmp_path: Path, sink: SinkServer, pg_url: str
) -> None:
    """Same values and types (aware UTC datetimes), defaults bound, no row for no match; the
    several-message probe reads each row as the one-message probe does, with the clock."""
    async with campaign_rows(tmp_path, sink, pg_url, 3) as (m, _, cid):
        claimed = await m.db.write(outbox.claim_batch, datetime.now(UTC), [cid], 2, Lease("a", 30))
        oids = [c.outbox_id for c in claimed]
        many = await m.db.peek_all(outbox.PROBES, {"oids": [*oids, 10**9]})
        alike = await m.db.read(through_sqlalchemy_all(outbox.PROBES, {"oids": oids}))
        unclocked = [row[:7] + row[8:] for row in many]  # each read has its own clock
        assert sorted(unclocked) == sorted(row[:7] + row[8:] for row in alike)
        by_id = {row[-1]: row for row in many}
        assert sorted(by_id) == sorted(oids)  # one row each, none for an unknown id
        for c in claimed:
            params = {"oid": c.outbox_id}
            row = await m.db.peek(outbox.PROBE, params)
            assert row == await m.db.read(through_sqlalchemy(outbox.PROBE, params))
            assert row is not None and row[3] is True  # confirmed anywhere: the bound default
            assert row[4:6] == ("sending", c.fence)
            timed = by_id[c.outbox_id]
            assert timed[:7] == row
            for moment in timed[6:8]:
                assert isinstance(moment, datetime) and moment.utcoffset() is not None
                assert moment.tzinfo == UTC
            assert 25 < (timed[6] - timed[7]).total_seconds() <= 30
        assert await m.db.peek(outbox.PROBE, {"oid": 10**9}) is None
        assert await m.db.peek_all(outbox.PROBES, {"oids": [10**9]}) == []


async def test_peeks_run_generic_plans_of_index_lookups(
    tmp_path: Path, sink: SinkServer, pg_url: str
) -> None:
    """The probe is looked up by primary key: its connections plan it once, not per message
    (a custom plan at every bind cost more server CPU than running it), and by index only.
    Other connections keep the server's defaults."""
    async with campaign_rows(tmp_path, sink, pg_url, 0) as (m, _, _cid):
        for name, value in PEEK_SETTINGS.items():
            setting = select(func.current_setting(name, type_=String))
            assert await m.db.peek(setting, {}) == (value,)
            assert await m.db.read(through_sqlalchemy(setting, {})) != (value,)


async def test_the_direct_lane_claim_reads_only_the_direct_lane_index(
    tmp_path: Path, sink: SinkServer, pg_url: str
) -> None:
    """With a campaign's rows queued and no statistics yet (just after a fan-out), the direct
    lane's claim, as the claim runs it, uses the partial index over that lane (without it,
    PostgreSQL read every queued campaign row to find none)."""
    async with campaign_rows(tmp_path, sink, pg_url, 500) as (m, _, _cid):

        def plan(conn: Connection) -> str:
            compiled = outbox.claim_statement(None, conn).compile(
                dialect=conn.dialect, compile_kwargs={"render_postcompile": True}
            )
            params = {"now": datetime.now(UTC), "limit": 16, "cid": None}
            rows = conn.exec_driver_sql(f"EXPLAIN {compiled}", tuple(
                compiled.construct_params(params)[name] for name in compiled.positiontup or []
            ))  # fmt: skip
            return "\n".join(str(r[0]) for r in rows)

        shown = await m.db.read(plan)
        assert "ix_outbox_direct_due" in shown, shown
        lease = Lease("x", 30)
        assert await m.db.write(outbox.claim_batch, datetime.now(UTC), [None], 16, lease) == []


async def test_close_ends_connections_still_in_use(pg_url: str) -> None:
    """Closing the database ends a connection a task still holds (the pool cannot: it is not
    checked in), instead of leaving it to the garbage collector after the loop has gone."""
    db = PostgresDatabase(pg_url)

    def slow(conn: Connection) -> None:
        conn.execute(text("SELECT pg_sleep(5)"))

    running = asyncio.ensure_future(db.read(slow))
    await asyncio.sleep(0.3)
    await db.close()
    with pytest.raises(DBAPIError):
        await asyncio.wait_for(running, 2)  # not the 5 s of the sleep


async def test_peek_survives_its_connections_being_killed(
    tmp_path: Path, sink: SinkServer, pg_url: str
) -> None:
    """Connections the server dropped while idle are replaced without failing a peek."""
    async with campaign_rows(tmp_path, sink, pg_url, 1) as (m, _, cid):
        (c,) = await m.db.write(outbox.claim_batch, datetime.now(UTC), [cid], 1, Lease("a", 30))
        params = {"oid": c.outbox_id}
        expected = await m.db.peek(outbox.PROBE, params)
        for _ in range(3):
            killed = await fetch(
                pg_url,
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()",
            )
            assert killed  # the peek pool's connection (and the engine's) were there
            assert await m.db.peek(outbox.PROBE, params) == expected
        # The engine's connections were killed too: the next transaction still works.
        for _ in range(2):
            try:
                assert await m.db.read(through_sqlalchemy(outbox.PROBE, params)) == expected
                break
            except Exception as exc:  # at most one failure: the read after the loop must work
                print(f"first transaction after the kill failed: {exc!r}")
        assert await m.db.read(through_sqlalchemy(outbox.PROBE, params)) == expected


async def test_racing_opt_ins_and_suppressions_all_succeed(
    tmp_path: Path, sink: SinkServer, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Two requests for the same new address at once: both check, both insert; the loser's
    transaction runs again and finds the row, instead of failing with a unique violation."""
    async with campaign_rows(tmp_path, sink, pg_url, 0) as (m, _, _cid):
        addresses = [f"racer{i}@example.org" for i in range(8)]
        with caplog.at_level(logging.INFO, logger="mailer.db"):
            for address in addresses:
                opt_ins = [m.consent.request_opt_in(address, "news", None, STAFF) for _ in "ab"]
                assert len(await asyncio.gather(*opt_ins)) == 2
                assert sorted(
                    await asyncio.gather(*(m.people.suppress(address, STAFF) for _ in "ab"))
                ) == [False, True]
        assert "sqlstate=23505" in caplog.text  # the race did happen, and was run again
        for address in addresses:
            hashed = (await m.people.show(address)).email_hash
            rows = await fetch(
                pg_url, "SELECT count(*) FROM subscriber WHERE email_hash = $1", hashed
            )
            assert rows == [(1,)]
            rows = await fetch(
                pg_url, "SELECT reason FROM suppression WHERE email_hash = $1", hashed
            )
            assert rows == [("manual",)]


async def test_the_probe_is_planned_as_index_lookups_on_tables_not_yet_analysed(
    tmp_path: Path, sink: SinkServer, pg_url: str
) -> None:
    """A peek connection plans the probe once and keeps the plan; made while the tables are
    small and have no statistics (a campaign's first probe), the plan must still look every
    row up by index. With generic plans alone, PostgreSQL plans sequential scans and hash
    joins here, which then read whole tables at every probe once they have grown."""
    async with campaign_rows(tmp_path, sink, pg_url, 50) as (m, _, _cid):
        peek = _compile(outbox.PROBES, m.db._engine.dialect)
        assert peek.args({"oids": [1, 2]}) == ["confirmed", 1, [1, 2]]
        dsn = pg_url.replace("postgresql+asyncpg://", "postgresql://")

        async def plan(settings: dict[str, str]) -> str:
            conn = await asyncpg.connect(dsn, server_settings=settings)
            try:
                await conn.execute(f"PREPARE probe AS {peek.sql}")
                rows = await conn.fetch("EXPLAIN EXECUTE probe('confirmed', 1, '{1,2}')")
                return "\n".join(row[0] for row in rows)
            finally:
                await conn.close()

        shown = await plan(PEEK_SETTINGS)
        for way in ("Seq Scan", "Hash", "Merge"):
            assert way not in shown, shown
        assert "Index Scan using pk_outbox" in shown or "Bitmap Index Scan on pk_outbox" in shown
        assert "Seq Scan on outbox" in await plan({"plan_cache_mode": "force_generic_plan"})
