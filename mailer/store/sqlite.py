"""SQLite, the embedded default: one writer thread with group commit, one reader thread.

* **Writes** go to a single writer thread that owns one connection. It takes every
  transaction waiting in its queue, runs each inside its own ``SAVEPOINT`` within one
  ``BEGIN IMMEDIATE`` transaction (so a failing one is rolled back alone), commits once, and
  only then answers each caller. With ``synchronous=FULL`` every commit is an fsync (about
  4 ms on this class of disk); sharing it keeps each acknowledged write durable (G2: an
  unsubscribe is answered only once it is on disk) while throughput grows with concurrency
  instead of being capped at one fsync per request.
* **Reads** run on a separate thread and connection: WAL readers never wait for the writer.
* **Peeks**, the per-message consent check right before a hand-off, run on the event loop's
  own thread through a read-only stdlib connection: a prepared one-row SELECT costs about
  10 µs there, against ~100 µs for a hop to another thread (perf-baseline.md §9.3). Each runs
  in its own implicit read transaction, so it sees every commit that has been acknowledged.

* **Checkpoints** run once a second on their own thread and connection (``PASSIVE``: they
  never block a reader or the writer). SQLite would otherwise checkpoint inside whichever
  COMMIT crosses the WAL size limit, which put the database file's fsync on the send path.

Pragmas: WAL, ``synchronous=FULL``, a busy timeout, foreign keys, ``secure_delete``, and
``wal_autocheckpoint=0`` (see above).
"""

import asyncio
import contextlib
import fcntl
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Select, create_engine, event
from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite
from sqlalchemy.engine import Engine
from sqlalchemy.pool import NullPool

from mailer.errors import Conflict
from mailer.store.db import Database, DatabaseClosed

T = TypeVar("T")

BUSY_TIMEOUT_MS = 10_000
_NAMED = SQLiteDialect_pysqlite(paramstyle="named")
MAX_BATCH = 256
CHECKPOINT_SECONDS = 1.0
WAL_LIMIT = 64 * 1024 * 1024
"""At most this many transactions share one commit."""


@dataclass
class _Job:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    future: Future[Any] = field(default_factory=Future)
    raw: bool = False
    """Run alone, outside any transaction (migrations, checkpoints)."""


class SqliteDatabase(Database):
    dialect = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._engine = _sqlite_engine(path)
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mailer-sqlite-read")
        self._reader_local = threading.local()
        self._lock = threading.Lock()
        self._closed = False
        self._peek_conn: sqlite3.Connection | None = None
        self._stop_checkpoints = threading.Event()
        self._next_wal_check = 0.0
        self._checkpointer: threading.Thread | None = None
        self._peeks: dict[int, tuple[Select[Any], str, dict[str, Any]]] = {}
        """Per statement (held, so that its id() is not reused): its SQL and default binds,
        worked out once (``Compiled.params`` rebuilds them at every call)."""
        self._sender_lock: int | None = None

    # -- the public interface ------------------------------------------------------------

    async def write(self, fn: Callable[..., T], *args: Any) -> T:
        result: T = await self._enqueue(_Job(fn, args))
        return result

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise DatabaseClosed("the database is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._reader, self._read_now, fn, args)

    async def run_outside_transaction(self, fn: Callable[[Connection], T]) -> T:
        result: T = await self._enqueue(_Job(fn, (), raw=True))
        return result

    async def peek(self, statement: Select[Any], params: dict[str, Any]) -> tuple[Any, ...] | None:
        if self._closed:
            raise DatabaseClosed("the database is closed")
        peek = self._peeks.get(id(statement))
        if peek is None:
            compiled = statement.compile(dialect=_NAMED)
            peek = self._peeks[id(statement)] = (statement, str(compiled), compiled.params)
        _, sql, defaults = peek
        if self._peek_conn is None:
            self._peek_conn = sqlite3.connect(
                f"file:{self.path}?mode=ro", uri=True, isolation_level=None
            )
            self._peek_conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        row = self._peek_conn.execute(sql, {**defaults, **params}).fetchone()
        return None if row is None else tuple(row)

    async def lock_sender(self) -> None:
        """Hold an exclusive lock on ``<database>.sender.lock`` until ``close`` (or death).

        SQLite has one writer and no leases: a second sending process would report the first
        one's messages as interrupted. Several senders need PostgreSQL.
        """
        if self._sender_lock is not None:
            return
        self._create_private()
        fd = os.open(f"{self.path}.sender.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise Conflict(
                f"another mailer process is already sending from {self.path}; SQLite serves "
                "one sender (stop it, or use PostgreSQL to run several workers)"
            ) from None
        self._sender_lock = fd

    async def checkpoint(self) -> None:
        """Copy the WAL into the database and truncate it, on the writer thread.

        A long run of writes (an import) needs this now and then: the checkpoint thread's
        PASSIVE checkpoints never catch up with a writer that never pauses, and the WAL (and
        its mapped index) would grow by gigabytes. Writes queue behind it meanwhile. A reader
        of an older snapshot makes it stop short (busy); the next call finishes the work.
        """

        def truncate(conn: Connection) -> None:
            raw = conn.connection.driver_connection  # autocommit mode: no BEGIN is issued
            assert raw is not None
            raw.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()

        await self._enqueue(_Job(truncate, (), raw=True))

    async def compact_erased(self) -> None:
        """``secure_delete`` zeroes freed pages; a truncating checkpoint empties the WAL.

        The checkpoint waits (busy timeout) for readers of older snapshots; if one still
        holds on, the WAL keeps the old page images, so this raises instead of returning.
        """

        def checkpoint(conn: Connection) -> int:
            raw = conn.connection.driver_connection  # autocommit mode: no BEGIN is issued
            assert raw is not None
            busy, _, _ = raw.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            return int(busy)

        if await self._enqueue(_Job(checkpoint, (), raw=True)):
            raise Conflict(
                "the erasure is committed, but another connection is still reading an older "
                "snapshot, so the write-ahead log keeps erased data; run the erase again "
                "when it is done"
            )

    async def close(self) -> None:
        """Finish queued writes, close both connections; calling it again does nothing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            writer = self._writer
        if writer is not None:
            self._jobs.put(None)
            await asyncio.to_thread(writer.join)
        if self._checkpointer is not None:
            self._stop_checkpoints.set()
            await asyncio.to_thread(self._checkpointer.join)
        if self._peek_conn is not None:
            self._peek_conn.close()
        if self._sender_lock is not None:
            os.close(self._sender_lock)  # closing the descriptor releases the lock
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._reader, self._close_reader)
        self._reader.shutdown(wait=True)
        self._engine.dispose()

    # -- writer thread -------------------------------------------------------------------

    async def _enqueue(self, job: _Job) -> Any:
        with self._lock:
            if self._closed:
                raise DatabaseClosed("the database is closed")
            if self._writer is None:
                self._writer = threading.Thread(
                    target=self._write_loop, name="mailer-sqlite-write", daemon=True
                )
                self._writer.start()
                self._checkpointer = threading.Thread(
                    target=self._checkpoint_loop, name="mailer-sqlite-checkpoint", daemon=True
                )
                self._checkpointer.start()
            self._jobs.put(job)
        return await asyncio.wrap_future(job.future)

    def _create_private(self) -> None:
        """Personal data: owner only, created so before SQLite would create it (0644)."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path.touch(mode=0o600)

    def _connect(self) -> Connection:
        self._create_private()
        return self._engine.connect()

    def _write_loop(self) -> None:
        conn = self._connect()
        conn.execution_options(mailer_write=True)
        try:
            stopping = False
            while not stopping:
                first = self._jobs.get()
                if first is None:
                    break
                batch = [first]
                while len(batch) < MAX_BATCH and not batch[-1].raw:
                    try:
                        nxt = self._jobs.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is None:
                        stopping = True
                        break
                    batch.append(nxt)
                raw = batch.pop() if batch[-1].raw else None
                if batch:
                    _commit_together(conn, batch)
                    self._bound_wal(conn)
                if raw is not None:
                    _run_raw(conn, raw)
        finally:
            conn.close()

    def _checkpoint_loop(self) -> None:
        self._create_private()  # this thread can win the race with the writer to create it
        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            while not self._stop_checkpoints.wait(CHECKPOINT_SECONDS):
                # busy or locked for a moment: the next second tries again
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        finally:
            conn.close()

    def _bound_wal(self, conn: Connection) -> None:
        """The safety net: a writer that never pauses starves the PASSIVE checkpoints, so past
        ``WAL_LIMIT`` bytes the writer truncates the WAL itself, between two batches."""
        now = time.monotonic()
        if now < self._next_wal_check:
            return
        try:
            size = os.stat(f"{self.path}-wal").st_size
        except OSError:
            return
        if size <= WAL_LIMIT:
            return
        self._next_wal_check = now + 5.0  # a reader holding an old snapshot: try later
        raw = conn.connection.driver_connection
        assert raw is not None
        raw.execute("PRAGMA busy_timeout=50")  # never stall the writer behind a long read
        try:
            with contextlib.suppress(sqlite3.Error):
                raw.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        finally:
            raw.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")

    # -- reader thread -------------------------------------------------------------------

    def _read_now(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        conn: Connection | None = getattr(self._reader_local, "conn", None)
        if conn is None:
            conn = self._reader_local.conn = self._connect()
            conn.execution_options(mailer_write=False)
        with conn.begin():
            return fn(conn, *args)

    def _close_reader(self) -> None:
        conn: Connection | None = getattr(self._reader_local, "conn", None)
        if conn is not None:
            conn.close()
            self._reader_local.conn = None


def _commit_together(conn: Connection, batch: list[_Job]) -> None:
    """Run every job in one transaction, each in its own savepoint; one commit for all."""
    outcomes: list[tuple[_Job, Any, BaseException | None]] = []
    try:
        with conn.begin():
            for job in batch:
                if not job.future.set_running_or_notify_cancel():
                    continue
                if len(batch) == 1:
                    outcomes.append((job, job.fn(conn, *job.args), None))
                    continue
                try:
                    with conn.begin_nested():
                        outcomes.append((job, job.fn(conn, *job.args), None))
                except Exception as exc:
                    outcomes.append((job, None, exc))
    except BaseException as exc:  # the commit itself (or a lone job) failed: nobody succeeded
        for job in batch:
            if not job.future.done():
                job.future.set_exception(exc)
        if not isinstance(exc, Exception):
            raise
        return
    for job, result, error in outcomes:
        if error is None:
            job.future.set_result(result)
        else:
            job.future.set_exception(error)


def _run_raw(conn: Connection, job: _Job) -> None:
    if not job.future.set_running_or_notify_cancel():
        return
    try:
        job.future.set_result(job.fn(conn))
    except Exception as exc:
        job.future.set_exception(exc)
    finally:
        if conn.in_transaction():
            conn.rollback()


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
        cur.execute("PRAGMA wal_autocheckpoint=0")  # the checkpoint thread does it
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        write = conn.get_execution_options().get("mailer_write", True)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine
