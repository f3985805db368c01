"""The runtime loop: N send tasks plus the scheduler, until told to stop."""

import asyncio
import contextlib
import logging

from mailer.services.metrics import Metrics
from mailer.services.scheduling import Scheduler
from mailer.services.sending import Sender

log = logging.getLogger("mailer.worker")


class Worker:
    """Runs ``tasks`` send tasks (one SMTP connection each) and the campaign scheduler; with
    ``lease_every`` (a database shared with other senders), also renews this sender's leases
    and reaps expired ones that often.

    ``wake()`` makes idle tasks look for work at once (something was just queued here);
    work queued by another process is found within ``poll_seconds``.
    """

    def __init__(
        self,
        sender: Sender,
        scheduler: Scheduler,
        metrics: Metrics,
        tasks: int,
        poll_seconds: float,
        lease_every: float | None = None,
    ) -> None:
        self._sender = sender
        self._scheduler = scheduler
        self._metrics = metrics
        self._tasks_wanted = tasks
        self._poll = poll_seconds
        self._lease_every = lease_every
        self._wake = asyncio.Event()
        self._tick = asyncio.Event()
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def wake(self) -> None:
        self._wake.set()

    def reschedule(self) -> None:
        """Run the scheduler now (a campaign was started, paused or resumed here)."""
        self._tick.set()
        self._wake.set()

    async def start(self) -> None:
        interrupted = await self._sender.recover()
        if interrupted:
            log.warning("outbox.interrupted count=%d (reported failed, not resent)", interrupted)
        self._sender.recorder.start()
        await self._scheduler.tick()
        self._tasks = [
            asyncio.create_task(self._send_loop(), name=f"mailer-send-{i}")
            for i in range(self._tasks_wanted)
        ]
        self._tasks.append(asyncio.create_task(self._schedule_loop(), name="mailer-scheduler"))
        if self._lease_every is not None:
            self._tasks.append(
                asyncio.create_task(self._lease_loop(self._lease_every), name="mailer-leases")
            )

    async def stop(self) -> None:
        """Let each task finish the message in hand, write every outcome, then end."""
        self._stopping.set()
        self._wake.set()
        self._tick.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await self._sender.release()
        await self._sender.recorder.stop()

    async def _send_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                wait = await self._sender.relay_wait()
            except Exception:
                log.exception("worker.rate_limit_error")
                wait = self._poll
            if wait > 0:
                await self._idle(self._wake, min(wait, self._poll))
                continue
            try:
                self._metrics.worker_busy.inc()
                try:
                    did = await self._sender.send_one()
                finally:
                    self._metrics.worker_busy.dec()
            except Exception:
                log.exception("worker.error")
                did = False
            if not did:
                await self._idle(self._wake, self._poll)

    async def _schedule_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                more = await self._scheduler.tick()
            except Exception:
                log.exception("scheduler.error")
                more = False
            if not more:
                await self._idle(self._tick, self._poll)

    async def _lease_loop(self, every: float) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), every)
                return
            try:
                _, reaped = await self._sender.keep_leases()
            except Exception:
                log.exception("leases.error")
                continue
            if reaped:
                log.warning("outbox.interrupted count=%d (expired leases reaped)", reaped)

    async def _idle(self, event: asyncio.Event, seconds: float) -> None:
        if self._stopping.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), seconds)
        event.clear()
