"""PostgreSQL, the scale-out path: several workers share one database.

* **Transactions** (``write``, ``read``) go through an asyncpg ``AsyncEngine``; the same
  synchronous store function runs through ``run_sync``. There is no pre-ping: a connection
  found dead mid-use is invalidated by SQLAlchemy (``is_disconnect``) and the pool opens a
  new one at the next checkout, so one transaction fails and the next one works. A write
  that lost a race (unique violation, serialization failure, deadlock) runs again.
* **Peeks**, the per-message consent probe right before a hand-off, skip SQLAlchemy: each
  statement is compiled once to PostgreSQL SQL with ``$n`` parameters and runs as one
  autocommit ``fetch`` on a raw asyncpg pool (a single SELECT's snapshot is its own; no
  transaction, no pre-ping, no rollback, no reset on release: one round trip). asyncpg
  prepares it once per connection.
  When the server dropped the connection, every pooled one is replaced and the peek runs
  once more; any other error reaches the sender as before.
"""

import asyncio
import contextlib
import logging
import random
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg
from sqlalchemy import Connection, Select, event
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from mailer.store.db import ERASED_TABLES, Database, DatabaseClosed

T = TypeVar("T")
log = logging.getLogger("mailer.db")

ENGINE_POOL_SIZE = 10
PEEK_CONNECTIONS = 4
"""A peek holds its connection for one round trip (~0.15 ms): a few serve every SMTP
connection, and every worker's share of ``max_connections`` stays small."""
PEEK_SETTINGS = {
    "plan_cache_mode": "force_generic_plan",
    "enable_seqscan": "off",
    "enable_hashjoin": "off",
    "enable_mergejoin": "off",
}
"""The peek connections' planner settings. Peeks look rows up by primary key, so each is
planned once per connection (a custom plan at every bind cost more server CPU than running
it), and only as nested loops over indexes. A generic plan made while a table is small or
not yet analysed (a campaign's first probe, its fan-out under way) otherwise keeps a
sequential scan of the outbox, or a hash of every campaign, for the connection's life: the
several-message probe took 2.6 ms instead of 0.1."""
WRITE_ATTEMPTS = 4
RACES = frozenset({"23505", "40001", "40P01"})
"""SQLSTATEs of a lost race: unique violation, serialization failure, deadlock."""
RETRY_PAUSE = 0.005
"""Up to this many seconds (times the attempt) of random pause before running again."""


@dataclass(frozen=True, slots=True)
class _Peek:
    """A statement compiled once for ``fetch``: its SQL, how to bind, how to read."""

    statement: Select[Any]  # held so that its id() is not reused while cached
    sql: str
    binds: tuple[tuple[str, Any, Callable[[Any], Any] | None], ...]
    results: tuple[Callable[[Any], Any] | None, ...]

    def args(self, params: dict[str, Any]) -> list[Any]:
        """The positional ``$n`` values for ``params`` (defaults from the statement)."""
        out = []
        for name, default, process in self.binds:
            value = params.get(name, default)
            out.append(value if process is None else process(value))
        return out

    def row(self, record: asyncpg.Record) -> tuple[Any, ...]:
        """The record as the SQLAlchemy path returns it (result types applied)."""
        return tuple(v if p is None else p(v) for v, p in zip(record, self.results, strict=True))


def _compile(statement: Select[Any], dialect: Dialect) -> _Peek:
    compiled = statement.compile(dialect=dialect)
    names = compiled.positiontup or []
    binds = tuple(
        (
            name,
            compiled.binds[name].effective_value,
            compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect),
        )
        for name in names
    )
    results = tuple(
        column.type.dialect_impl(dialect).result_processor(dialect, None)
        for column in statement.selected_columns
    )
    return _Peek(statement, str(compiled), binds, results)


async def _keep(conn: asyncpg.Connection) -> None:
    """No reset on release (asyncpg's default is a round trip): a peek changes no session
    state, it only runs one SELECT."""


def _dropped(conn: "asyncpg.pool.PoolConnectionProxy[asyncpg.Record]") -> bool:
    """Whether the server closed the pooled connection that just failed."""
    try:
        return conn.is_closed()
    except asyncpg.InterfaceError:  # the pool already took it back, as it does when closed
        return True


class PostgresDatabase(Database):
    dialect = "postgresql"

    def __init__(self, url: str, peek_connections: int = PEEK_CONNECTIONS) -> None:
        self._engine: AsyncEngine = create_async_engine(url, pool_size=ENGINE_POOL_SIZE)
        self._opened: weakref.WeakSet[asyncpg.Connection] = weakref.WeakSet()
        event.listen(self._engine.sync_engine, "connect", self._track)
        self._peek_connections = peek_connections
        self._pool: asyncio.Future[asyncpg.Pool] | None = None
        self._peeks: dict[int, _Peek] = {}
        self._closed = False

    def _track(self, dbapi_connection: Any, _record: Any) -> None:
        """Remember every connection the engine opens, for ``close``."""
        self._opened.add(dbapi_connection.driver_connection)

    def _check_open(self) -> None:
        if self._closed:  # a disposed engine would quietly open new connections
            raise DatabaseClosed("the database is closed")

    async def write(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` in a transaction; run it again when it lost a race to another one.

        Store functions check, then insert (``people.ensure``, ``suppression.put``): two
        concurrent ones can both find nothing and one insert then violates a unique key. They
        only touch the connection, so the whole function runs again, and now finds the row.
        """
        self._check_open()
        attempt = 1
        while True:
            try:
                async with self._engine.begin() as conn:
                    return await conn.run_sync(fn, *args)
            except DBAPIError as exc:
                state = getattr(exc.orig, "sqlstate", None)
                if attempt == WRITE_ATTEMPTS or state not in RACES:
                    raise
                log.info("db.write_retry sqlstate=%s attempt=%d", state, attempt)
                await asyncio.sleep(random.uniform(0, RETRY_PAUSE * attempt))
                attempt += 1

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        self._check_open()
        async with self._engine.connect() as conn:
            result = await conn.run_sync(fn, *args)
            await conn.rollback()
            return result

    async def peek(self, statement: Select[Any], params: dict[str, Any]) -> tuple[Any, ...] | None:
        rows = await self.peek_all(statement, params)
        return rows[0] if rows else None

    async def peek_all(
        self, statement: Select[Any], params: dict[str, Any]
    ) -> list[tuple[Any, ...]]:
        self._check_open()
        peek = self._peeks.get(id(statement))
        if peek is None:
            peek = _compile(statement, self._engine.dialect)
            self._peeks[id(statement)] = peek
        pool, args = await self._peek_pool(), peek.args(params)
        for attempt in range(2):
            async with pool.acquire() as conn:
                try:
                    records = await conn.fetch(peek.sql, *args)
                    break
                except Exception:
                    if attempt or not _dropped(conn):
                        raise
            # The server dropped it while idle in the pool (a restart, an idle timeout): so
            # maybe the others too. Replace them all and run the read again.
            await pool.expire_connections()
        return [peek.row(record) for record in records]

    async def _peek_pool(self) -> asyncpg.Pool:
        """The raw pool for peeks, opened at the first one (by one caller; others wait)."""
        if self._pool is None:
            self._pool = asyncio.ensure_future(self._open_pool())
        try:
            return await asyncio.shield(self._pool)
        except BaseException:
            if self._pool.done() and self._pool.exception() is not None:
                self._pool = None  # could not connect: try again at the next peek
            raise

    async def _open_pool(self) -> asyncpg.Pool:
        args, kwargs = self._engine.dialect.create_connect_args(self._engine.url)
        settings = {**kwargs.pop("server_settings", {}), **PEEK_SETTINGS}
        return await asyncpg.create_pool(
            *args,
            min_size=1,
            max_size=self._peek_connections,
            reset=_keep,
            server_settings=settings,
            **kwargs,
        )

    async def run_outside_transaction(self, fn: Callable[[Connection], T]) -> T:
        self._check_open()
        async with self._engine.connect() as conn:
            result = await conn.run_sync(fn)
            await conn.commit()
            return result

    async def compact_erased(self) -> None:
        """``VACUUM`` the tables that held the person: their dead rows are no longer reachable
        by any query or snapshot. PostgreSQL has no ``secure_delete``: until the space is
        reused, page free space and the write-ahead log may still hold old images."""
        async with self._engine.connect() as conn:
            auto = await conn.execution_options(isolation_level="AUTOCOMMIT")
            await auto.exec_driver_sql(f"VACUUM {', '.join(ERASED_TABLES)}")

    async def close(self) -> None:
        """Close every pooled connection; calling it again does nothing."""
        if self._closed:
            return
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is not None:
            # Let a pool still being opened finish (cancelling it midway could orphan the
            # connection it was making), then close it.
            with contextlib.suppress(Exception):
                await (await asyncio.shield(pool)).close()
        await self._engine.dispose()
        # A connection a cancelled task never gave back is not the pool's to close: end it
        # here, rather than leave it to the garbage collector after the loop is gone.
        for conn in list(self._opened):
            if not conn.is_closed():
                conn.terminate()
