"""The runtime loop: N send tasks that claim and hand off messages until told to stop."""

import asyncio
import contextlib
import logging

from mailer.services.metrics import Metrics
from mailer.services.sending import Sender

log = logging.getLogger("mailer.worker")


class Worker:
    """Runs ``concurrency`` send tasks. ``wake()`` makes idle tasks look for work at once."""

    def __init__(
        self, sender: Sender, metrics: Metrics, concurrency: int, poll_seconds: float
    ) -> None:
        self._sender = sender
        self._metrics = metrics
        self._concurrency = concurrency
        self._poll = poll_seconds
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def wake(self) -> None:
        self._wake.set()

    async def start(self) -> None:
        interrupted = await self._sender.recover()
        if interrupted:
            log.warning("outbox.interrupted count=%d (reported failed, not resent)", interrupted)
        self._tasks = [
            asyncio.create_task(self._loop(), name=f"mailer-send-{i}")
            for i in range(self._concurrency)
        ]

    async def stop(self) -> None:
        """Let each task finish the message in hand, then end."""
        self._stopping.set()
        self._wake.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self._metrics.worker_busy.inc()
                try:
                    did = await self._sender.send_next()
                finally:
                    self._metrics.worker_busy.dec()
            except Exception:
                log.exception("worker.error")
                did = False
            if not did:
                await self._idle()

    async def _idle(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), self._poll)
        self._wake.clear()
