"""The suite's databases: SQLite files by default, PostgreSQL with ``pytest --db=postgresql``.

Tests name a database by a path (``tmp_path / "mailer.db"``). On SQLite that is the file; on
PostgreSQL the path is a key for a database of this run's pool, taken on first use:

* The first one is migrated by the product's own Alembic upgrade; the others are
  ``CREATE DATABASE ... TEMPLATE`` copies of it (~0.1 s instead of ~0.2 s).
* At the end of each test its databases are emptied (``TRUNCATE ... RESTART IDENTITY``,
  ~30 ms, against ~0.3 s to create and drop one) and go back to the pool; one whose schema a
  test changed is dropped instead. ``empty`` gives a database with no schema at all.
* Names are ``mailer_test_<pid>_<n>``; all are dropped when the run ends, and a run also
  drops those of earlier runs whose process is gone (killed before it could clean up).

Test databases use ``synchronous_commit=off``: a killed *client* loses nothing (the crash
tests kill mailer, never the server), and each commit no longer waits for an fsync.

Helpers read and write through a separate connection, with ``?`` placeholders on both.
"""

import contextlib
import os
import re
import sqlite3
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import count
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy.engine import make_url

SQLITE = "sqlite"
POSTGRESQL = "postgresql"
URL_VARIABLE = "MAILER_TEST_POSTGRES_URL"
_PREFIX = "mailer_test_"


class SqlConnection:
    """A DB-API-like connection with ``?`` placeholders on both engines; ``with`` commits."""

    def __init__(self, raw: sqlite3.Connection | psycopg.Connection[Any]) -> None:
        self.raw = raw

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """Run one statement; returns a cursor (``fetchone``/``fetchall``)."""
        if isinstance(self.raw, sqlite3.Connection):
            return self.raw.execute(sql, params)
        return self.raw.execute(_pg_placeholders(sql), tuple(params))  # type: ignore[arg-type]

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """Run one statement once per row of parameters."""
        if isinstance(self.raw, sqlite3.Connection):
            self.raw.executemany(sql, rows)
        else:
            self.raw.cursor().executemany(_pg_placeholders(sql), [tuple(r) for r in rows])

    def commit(self) -> None:
        self.raw.commit()

    def close(self) -> None:
        self.raw.close()

    def __enter__(self) -> "SqlConnection":
        return self

    def __exit__(self, kind: object, *_: object) -> None:
        if kind is None:
            self.raw.commit()
        else:
            self.raw.rollback()


def _pg_placeholders(sql: str) -> str:
    return sql.replace("%", "%%").replace("?", "%s")


class PostgresPool:
    """This run's PostgreSQL databases (see the module docstring)."""

    def __init__(self, server_url: str) -> None:
        self._server = make_url(server_url)
        self._prefix = f"{_PREFIX}{os.getpid()}_"
        self._numbers = count(1)
        self._free: list[str] = []
        self._taken: dict[Path, str] = {}
        self._kept: dict[Path, str] = {}
        self._conns: dict[str, psycopg.Connection[Any]] = {}
        self._template: str | None = None
        self._admin = psycopg.connect(self.conninfo(None), autocommit=True)
        self._admin.execute("SET lock_timeout = '10s'")
        self._drop_orphans()

    def conninfo(self, name: str | None) -> str:
        """A libpq URL for database ``name`` (``None``: the one named by the variable)."""
        url = self._server.set(drivername="postgresql")
        if name is not None:
            url = url.set(database=name)
        return url.render_as_string(hide_password=False)

    def url(self, path: Path) -> str:
        """The ``MAILER_DATABASE_URL`` of the migrated database known as ``path``."""
        return self._mailer_url(self.name(path))

    def name(self, path: Path) -> str:
        if path in self._kept:
            return self._kept[path]
        if path not in self._taken:
            self._taken[path] = self._free.pop() if self._free else self._create()
        return self._taken[path]

    def keep(self, path: Path) -> None:
        """Keep ``path``'s database past the end of this test (a module fixture's data)."""
        self._kept[path] = self.name(path)
        del self._taken[path]

    def path_of(self, url: str) -> Path:
        """The path a test knows the database of ``url`` by."""
        name = make_url(url).database
        for path, taken in [*self._taken.items(), *self._kept.items()]:
            if taken == name:
                return path
        raise KeyError(url)

    def empty(self, path: Path) -> str:
        """A database with no schema at all, known as ``path`` from now on; its URL."""
        assert path not in self._taken, f"{path} is already in use"
        name = self._new_name()
        self._admin.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        self._tune(name)
        self._taken[path] = name
        return self._mailer_url(name)

    def copy(self, source: Path, target: Path) -> str:
        """A copy of ``source``'s database, known as ``target``; its URL."""
        assert target not in self._taken, f"{target} is already in use"
        src = self.name(source)
        self._close(src)
        name = self._new_name()
        self._admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{src}"')
        self._tune(name)
        self._taken[target] = name
        return self._mailer_url(name)

    def connect(self, path: Path) -> SqlConnection:
        """The cached helper connection to ``path``'s database (closed when the test ends)."""
        name = self.name(path)
        conn = self._conns.get(name)
        if conn is None or conn.closed:
            conn = self._conns[name] = psycopg.connect(self.conninfo(name))
            conn.execute("SET statement_timeout = '20s'")
            conn.execute("SET TIME ZONE 'UTC'")  # naive timestamps tests write mean UTC
            conn.commit()
        return SqlConnection(conn)

    def release(self) -> None:
        """End of a test: empty its databases and give them back (or drop changed ones)."""
        taken, self._taken = self._taken, {}
        for name in taken.values():
            self._close(name)
            if self._reset(name):
                self._free.append(name)
            else:
                self._drop(name)

    def close(self) -> None:
        """End of the run: drop every database it made."""
        self.release()
        self._taken, self._kept = self._kept, {}
        self.release()
        for name in [*self._free, *([self._template] if self._template else [])]:
            self._drop(name)
        self._free.clear()
        self._admin.close()

    # -- internals -----------------------------------------------------------------------

    def _mailer_url(self, name: str) -> str:
        url = self._server.set(drivername="postgresql+asyncpg", database=name)
        return url.render_as_string(hide_password=False)

    def _new_name(self) -> str:
        return f"{self._prefix}{next(self._numbers)}"

    def _create(self) -> str:
        if self._template is None:
            self._template = self._new_name()
            self._admin.execute(f'CREATE DATABASE "{self._template}" TEMPLATE template0')
            _migrate(self._mailer_url(self._template))
        name = self._new_name()
        self._admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{self._template}"')
        self._tune(name)
        return name

    def _tune(self, name: str) -> None:
        self._admin.execute(f'ALTER DATABASE "{name}" SET synchronous_commit = off')

    def _close(self, name: str) -> None:
        conn = self._conns.pop(name, None)
        if conn is not None:
            conn.close()
        # whatever a test left connected (a killed process's sessions end on their own)
        self._admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )

    def _reset(self, name: str) -> bool:
        """Empty every table of a database still at the head revision; False otherwise."""
        from mailer.store.migrate import head

        try:
            with psycopg.connect(self.conninfo(name), autocommit=True) as conn:
                conn.execute("SET synchronous_commit = off")
                version = conn.execute("SELECT version_num FROM alembic_version").fetchall()
                if version != [(head(),)]:
                    return False
                tables = conn.execute(
                    "SELECT string_agg(quote_ident(tablename), ', ') FROM pg_tables"
                    " WHERE schemaname = 'public' AND tablename <> 'alembic_version'"
                ).fetchone()
                assert tables is not None
                conn.execute(f"TRUNCATE {tables[0]} RESTART IDENTITY CASCADE")
        except psycopg.Error:
            return False
        return True

    def _drop(self, name: str) -> None:
        self._admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def _drop_orphans(self) -> None:
        """Drop the databases of earlier runs whose pytest process no longer exists."""
        rows = self._admin.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s", (f"{_PREFIX}%",)
        ).fetchall()
        for (name,) in rows:
            found = re.fullmatch(rf"{_PREFIX}(\d+)_\d+", name)
            if found and not _alive(int(found.group(1))):
                self._drop(name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _migrate(url: str) -> None:
    """Bring a new database to the head revision the way `mailer init` does."""
    import asyncio

    from mailer.store import migrate
    from mailer.store.db import open_database

    async def run() -> None:
        db = open_database(url)
        try:
            await migrate.upgrade(db)
        finally:
            await db.close()

    # a test's event loop may be running on this thread: migrate on another one
    with ThreadPoolExecutor(max_workers=1) as thread:
        thread.submit(asyncio.run, run()).result()


Db = Path | str
"""A database as tests name it: its path, or the ``MAILER_DATABASE_URL`` the mailer was given."""


class Backend:
    """The engine this run tests against; ``active`` is the one in use."""

    def __init__(self) -> None:
        self.pool: PostgresPool | None = None

    @property
    def name(self) -> str:
        return SQLITE if self.pool is None else POSTGRESQL

    def url(self, path: Path) -> str:
        """``MAILER_DATABASE_URL`` for the (migrated, on PostgreSQL) database at ``path``."""
        if self.pool is None:
            return f"sqlite+aiosqlite:///{path}"
        return self.pool.url(path)

    def empty(self, path: Path) -> str:
        """``MAILER_DATABASE_URL`` for a database at ``path`` with no schema yet."""
        if self.pool is None:
            return f"sqlite+aiosqlite:///{path}"
        return self.pool.empty(path)

    def copy(self, source: Path, target: Path) -> str:
        """Copy the database at ``source`` to ``target`` (its mailer must be stopped)."""
        if self.pool is None:
            for suffix in ("", "-wal"):
                src = source.with_name(source.name + suffix)
                if src.exists():
                    target.with_name(target.name + suffix).write_bytes(src.read_bytes())
            return self.url(target)
        return self.pool.copy(source, target)

    def sync_url(self, db: Db) -> str:
        """A SQLAlchemy URL with a synchronous driver, for a plain ``create_engine``."""
        if self.pool is None:
            return f"sqlite:///{self.path(db)}"
        url = make_url(self.pool.url(self.path(db))).set(drivername="postgresql+psycopg")
        return url.render_as_string(hide_password=False)

    def keep(self, path: Path) -> None:
        """Keep ``path``'s database for the rest of the run (a module-scoped fixture's)."""
        if self.pool is not None:
            self.pool.keep(path)

    def path(self, db: Db) -> Path:
        """The path of a database named by path or URL."""
        if isinstance(db, Path):
            return db
        if self.pool is None or make_url(db).get_backend_name() == SQLITE:
            database = make_url(db).database
            assert database is not None
            return Path(database)
        return self.pool.path_of(db)

    @contextlib.contextmanager
    def connect(self, db: Db) -> Iterator[SqlConnection]:
        """A separate connection to ``db`` (``?`` placeholders); ``with conn:`` commits."""
        if self.pool is None:
            conn = SqlConnection(sqlite3.connect(self.path(db), timeout=10))
            conn.execute("PRAGMA foreign_keys = ON")  # as the mailer's own connections
            try:
                yield conn
            finally:
                conn.close()
            return
        conn = self.pool.connect(self.path(db))
        try:
            yield conn
        finally:
            conn.raw.rollback()  # never leave a transaction (and its locks) open

    def tables(self, db: Db) -> list[str]:
        """The names of the mailer's tables (Alembic's bookkeeping included)."""
        sql = (
            "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'"
            if self.pool is None
            else "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        )
        with self.connect(db) as conn:
            return [row[0] for row in conn.execute(sql).fetchall()]


active = Backend()
"""The backend of this run: set once by ``tests/conftest.py`` from ``--db``."""
