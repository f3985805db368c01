"""The database runner: one transaction per call, one code path for SQLite and PostgreSQL.

Store functions are plain synchronous functions over a SQLAlchemy ``Connection``.

* **SQLite** (the embedded default, ``store/sqlite.py``): a writer thread with group commit
  and a reader thread, each owning one connection. That is an order of magnitude faster than
  a pooled async driver (``research/perf-baseline.md`` sections 5-6).
  ``sqlite+aiosqlite://`` URLs are accepted and driven this way.
* **PostgreSQL** (``store/postgres.py``): an asyncpg ``AsyncEngine``; the same function runs
  through ``run_sync``. Peeks go straight to a raw asyncpg pool.
"""

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Select, text
from sqlalchemy.engine import make_url

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

    async def peek_all(
        self, statement: Select[Any], params: dict[str, Any]
    ) -> list[tuple[Any, ...]]:
        """Every row of such a read, in one round trip (engines where round trips cost)."""
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
        from mailer.store.postgres import PostgresDatabase

        url = parsed.set(drivername="postgresql+asyncpg").render_as_string(False)
        return PostgresDatabase(url)
    raise ConfigError(f"setting MAILER_DATABASE_URL: unsupported database {backend!r}")


def ping(conn: Connection) -> bool:
    """A trivial query, for health checks."""
    return bool(conn.execute(text("SELECT 1")).scalar_one() == 1)
