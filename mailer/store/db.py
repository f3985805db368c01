"""The database runner: one transaction per call, one code path for SQLite and PostgreSQL.

Store functions are plain synchronous functions over a SQLAlchemy ``Connection``.

* **SQLite** (the embedded default): every transaction runs on one dedicated thread that owns
  one connection: WAL, ``synchronous=FULL``, a busy timeout, and ``BEGIN IMMEDIATE`` for
  writes. One thread hop per transaction keeps the event loop free while staying an order of
  magnitude faster than a pooled async driver (``research/perf-baseline.md`` sections 5-6).
  ``sqlite+aiosqlite://`` URLs are accepted and driven this way.
* **PostgreSQL**: an asyncpg ``AsyncEngine``; the same function runs through ``run_sync``.
"""

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from sqlalchemy import Connection, create_engine, event, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from mailer.errors import ConfigError

T = TypeVar("T")
P = ParamSpec("P")

BUSY_TIMEOUT_MS = 10_000


class DatabaseClosed(RuntimeError):
    """A transaction was attempted after ``close()``."""


class Database:
    """Runs store functions as transactions. ``write`` takes the write lock up front."""

    dialect: str

    async def write(self, fn: Callable[..., T], *args: Any) -> T:
        raise NotImplementedError

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        raise NotImplementedError

    async def run_outside_transaction(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn`` on a connection with no transaction begun (migrations manage their own)."""
        raise NotImplementedError

    async def compact_erased(self) -> None:
        """Make erased rows unrecoverable from the database files (no-op where not needed)."""

    async def close(self) -> None:
        raise NotImplementedError


def open_database(url: str) -> Database:
    """Open the database named by a SQLAlchemy URL (sqlite or postgresql)."""
    try:
        parsed = make_url(url)
    except Exception:
        raise ConfigError(f"setting MAILER_DATABASE_URL: cannot parse {url!r}") from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            raise ConfigError("setting MAILER_DATABASE_URL: SQLite needs a file path")
        return SqliteDatabase(Path(parsed.database))
    if backend == "postgresql":
        return PostgresDatabase(parsed.set(drivername="postgresql+asyncpg").render_as_string(False))
    raise ConfigError(f"setting MAILER_DATABASE_URL: unsupported database {backend!r}")


class SqliteDatabase(Database):
    dialect = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._engine = _sqlite_engine(path)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mailer-sqlite")
        self._local = threading.local()
        self._closed = False

    def _connection(self) -> Connection:
        conn: Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.path.touch(mode=0o600)  # personal data: owner only, before SQLite creates it
            conn = self._local.conn = self._engine.connect()
        return conn

    def _transaction(self, write: bool, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        conn = self._connection()
        conn.execution_options(mailer_write=write)
        with conn.begin():
            return fn(conn, *args)

    async def _submit(self, job: Callable[[], T]) -> T:
        if self._closed:
            raise DatabaseClosed("the database is closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, job)

    async def write(self, fn: Callable[..., T], *args: Any) -> T:
        return await self._submit(lambda: self._transaction(True, fn, args))

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        return await self._submit(lambda: self._transaction(False, fn, args))

    async def run_outside_transaction(self, fn: Callable[[Connection], T]) -> T:
        def job() -> T:
            conn = self._connection()
            conn.execution_options(mailer_write=True)
            return fn(conn)

        return await self._submit(job)

    async def compact_erased(self) -> None:
        """``secure_delete`` zeroes freed pages; a truncating checkpoint empties the WAL."""

        def job() -> None:
            raw = self._connection().connection.driver_connection  # autocommit: no BEGIN
            assert raw is not None
            raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")

        await self._submit(job)

    async def close(self) -> None:
        """Close the connection and stop the thread; calling it again does nothing."""
        if self._closed:
            return
        self._closed = True

        def job() -> None:
            conn: Connection | None = getattr(self._local, "conn", None)
            if conn is not None:
                conn.close()
                self._local.conn = None
            self._engine.dispose()

        await asyncio.get_running_loop().run_in_executor(self._executor, job)
        self._executor.shutdown(wait=True)


def _sqlite_engine(path: Path) -> Engine:
    engine = create_engine(f"sqlite+pysqlite:///{path}", poolclass=NullPool)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA secure_delete=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        write = conn.get_execution_options().get("mailer_write", True)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


class PostgresDatabase(Database):
    dialect = "postgresql"

    def __init__(self, url: str) -> None:
        self._engine: AsyncEngine = create_async_engine(url, pool_size=10, pool_pre_ping=True)

    async def write(self, fn: Callable[..., T], *args: Any) -> T:
        async with self._engine.begin() as conn:
            return await conn.run_sync(fn, *args)

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        async with self._engine.connect() as conn:
            result = await conn.run_sync(fn, *args)
            await conn.rollback()
            return result

    async def run_outside_transaction(self, fn: Callable[[Connection], T]) -> T:
        async with self._engine.connect() as conn:
            result = await conn.run_sync(fn)
            await conn.commit()
            return result

    async def close(self) -> None:
        await self._engine.dispose()


def ping(conn: Connection) -> bool:
    """A trivial query, for health checks."""
    return bool(conn.execute(text("SELECT 1")).scalar_one() == 1)
