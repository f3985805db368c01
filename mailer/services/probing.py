"""Consent checks that share a round trip (several senders on PostgreSQL).

Each message's check right before its hand-off is one read of ``outbox.PROBES``. On
PostgreSQL a read is a round trip that costs both ends more than the read itself (about
40 µs of server CPU and as much in the sender for one row, against about 10 µs a row for
eight). So a sender's checks take turns: at most ``IN_FLIGHT`` queries run at once, and
every check that starts meanwhile waits for the next query, which reads them all.

G2 holds because a check only ever joins a query that has not been sent yet: the snapshot
it reads is taken after the check began, so it sees every unsubscribe answered before that.
"""

import asyncio
from typing import Any

from sqlalchemy import Select

from mailer.store.db import Database

IN_FLIGHT = 1
"""Probe queries a sender runs at once; the checks that start meanwhile wait for the next."""


class SharedProbe:
    """Reads the probe rows of concurrent checks in as few queries as G2 allows."""

    def __init__(self, db: Database, statement: Select[Any]) -> None:
        self._db = db
        self._statement = statement
        self._running: set[asyncio.Task[None]] = set()
        self._waiting: list[tuple[int, asyncio.Future[tuple[Any, ...] | None]]] = []
        self._flushing = False

    async def read(self, outbox_id: int) -> tuple[Any, ...] | None:
        """The row of ``outbox_id`` (its id last) as of a moment after this call began, or
        None when there is none; raises what the query raised."""
        answer: asyncio.Future[tuple[Any, ...] | None] = asyncio.get_running_loop().create_future()
        self._waiting.append((outbox_id, answer))
        self._schedule()
        return await answer

    def _schedule(self) -> None:
        # The next query goes out once this turn of the event loop is over, so that checks
        # begun in the same turn (replies read in one batch) share it.
        if not self._flushing and self._waiting and len(self._running) < IN_FLIGHT:
            self._flushing = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flushing = False
        batch = [(oid, answer) for oid, answer in self._waiting if not answer.done()]
        self._waiting = []
        if batch:
            task = asyncio.create_task(self._query(batch), name="mailer-probe")
            self._running.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._schedule()

    async def _query(self, batch: list[tuple[int, asyncio.Future[tuple[Any, ...] | None]]]) -> None:
        try:
            rows = await self._db.peek_all(self._statement, {"oids": [oid for oid, _ in batch]})
        except BaseException as exc:
            for _, answer in batch:
                if not answer.done():
                    if isinstance(exc, asyncio.CancelledError):
                        answer.cancel()
                    else:
                        answer.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        found = {row[-1]: row for row in rows}
        for oid, answer in batch:
            if not answer.done():
                answer.set_result(found.get(oid))
