"""The database runner: one transaction per call, one code path for SQLite and PostgreSQL.

Store functions are plain synchronous functions over a SQLAlchemy ``Connection``.

* **SQLite** (the embedded default, ``store/sqlite.py``): a writer thread with group commit
  and a reader thread, each owning one connection. That is an order of magnitude faster than
  a pooled async driver (``research/perf-baseline.md`` sections 5-6).
  ``sqlite+aiosqlite://`` URLs are accepted and driven this way.
* **PostgreSQL**: an asyncpg ``AsyncEngine``; the same function runs through ``run_sync``.
"""

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Select, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from mailer.errors import ConfigError

T = TypeVar("T")

ERASED_TABLES = ("subscriber", "subscription", "outbox", "consent_event")
"""Tables an erasure deletes rows from or blanks values in."""


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

    async def peek(self, statement: Select[Any], params: dict[str, Any]) -> tuple[Any, ...] | None:
        """One row of a small read on the send path's hot loop, as of this instant."""
        raise NotImplementedError

    async def lock_sender(self) -> None:
        """Become the only process sending from this database, or raise ``Conflict``.

        A no-op where several senders coordinate through leases (PostgreSQL).
        """

    async def checkpoint(self) -> None:
        """Fold the write-ahead log into the database after many writes (no-op where none)."""

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
        from mailer.store.sqlite import SqliteDatabase

        return SqliteDatabase(Path(parsed.database))
    if backend == "postgresql":
        return PostgresDatabase(parsed.set(drivername="postgresql+asyncpg").render_as_string(False))
    raise ConfigError(f"setting MAILER_DATABASE_URL: unsupported database {backend!r}")


class PostgresDatabase(Database):
    dialect = "postgresql"

    def __init__(self, url: str) -> None:
        self._engine: AsyncEngine = create_async_engine(url, pool_size=10, pool_pre_ping=True)
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:  # a disposed engine would quietly open new connections
            raise DatabaseClosed("the database is closed")

    async def write(self, fn: Callable[..., T], *args: Any) -> T:
        self._check_open()
        async with self._engine.begin() as conn:
            return await conn.run_sync(fn, *args)

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        self._check_open()
        async with self._engine.connect() as conn:
            result = await conn.run_sync(fn, *args)
            await conn.rollback()
            return result

    async def peek(self, statement: Select[Any], params: dict[str, Any]) -> tuple[Any, ...] | None:
        self._check_open()
        async with self._engine.connect() as conn:
            row = (await conn.execute(statement, params)).first()
            return None if row is None else tuple(row)

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
        if not self._closed:
            self._closed = True
            await self._engine.dispose()


def ping(conn: Connection) -> bool:
    """A trivial query, for health checks."""
    return bool(conn.execute(text("SELECT 1")).scalar_one() == 1)
