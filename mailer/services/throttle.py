"""The send rate (``MAILER_SMTP_RATE``): per process on SQLite, per deployment on PostgreSQL.

A send task asks ``wait()`` before it takes a message and calls ``spend()`` only when it
really took one, so idle polls never drain the budget.
"""

import asyncio
import math
from typing import Protocol

from mailer.domain.ratelimit import TokenBucket
from mailer.services.ports import Clock
from mailer.store import ratebucket
from mailer.store.db import Database

SMTP_BUCKET = "smtp"
BATCH_SECONDS = 0.05
"""A shared-bucket take asks for this many seconds' worth of the rate (at least one token),
so the round trip is paid once per batch of messages, not per message."""
MAX_BATCH = 64


class Throttle(Protocol):
    async def wait(self) -> float:
        """Seconds until a message may be taken (0.0: now)."""
        ...

    def spend(self) -> None:
        """A message was taken: use one token (possibly going into debt)."""
        ...


class LocalThrottle:
    """One process's own token bucket (the only sender of a SQLite database)."""

    def __init__(self, rate: float, clock: Clock) -> None:
        self._bucket = TokenBucket(rate, max(1.0, rate))
        self._clock = clock

    async def wait(self) -> float:
        return self._bucket.wait(self._clock.monotonic())

    def spend(self) -> None:
        self._bucket.spend(self._clock.monotonic())


class SharedThrottle:
    """Tokens taken in small batches from a bucket row every sender shares.

    The sum of all senders stays within the rate (plus one second's burst and one batch per
    sender held locally). One take is in flight per process at a time; tasks share its result.
    """

    def __init__(self, db: Database, clock: Clock, rate: float) -> None:
        self._db = db
        self._clock = clock
        self._rate = rate
        self._burst = max(1.0, rate)
        self._batch = max(1, min(MAX_BATCH, int(rate * BATCH_SECONDS)))
        self._tokens = 0.0
        self._taking: asyncio.Future[float] | None = None

    async def wait(self) -> float:
        if self._tokens >= 1.0:
            return 0.0
        if self._taking is None:
            self._taking = asyncio.ensure_future(self._take())
        return await asyncio.shield(self._taking)

    def spend(self) -> None:
        self._tokens -= 1.0

    async def _take(self) -> float:
        try:
            debt = math.ceil(-self._tokens) if self._tokens < 0 else 0
            got, wait = await self._db.write(
                ratebucket.take,
                SMTP_BUCKET,
                self._batch + debt,
                self._rate,
                self._burst,
                self._clock.now(),
            )
            self._tokens += got
            if self._tokens >= 1.0:
                return 0.0
            return max(wait, (1.0 - self._tokens) / self._rate)
        finally:
            self._taking = None
