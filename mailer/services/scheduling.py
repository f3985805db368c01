"""The scheduler: starts due campaigns, fans them out in chunks, and finishes them."""

import logging
from collections.abc import Callable
from datetime import datetime

from sqlalchemy import Connection

from mailer.errors import Conflict
from mailer.services.ports import Clock
from mailer.statuses import CampaignStatus
from mailer.store import campaigns
from mailer.store.db import Database

log = logging.getLogger("mailer.scheduler")

FANOUT_CHUNK = 2000
"""Recipients queued per transaction: short enough that an unsubscribe never waits long."""


class Scheduler:
    """One ``tick`` does a bounded amount of work and says whether more is waiting now."""

    def __init__(
        self,
        db: Database,
        clock: Clock,
        set_lanes: Callable[[list[int]], None],
        on_queued: Callable[[], None],
    ) -> None:
        self._db = db
        self._clock = clock
        self._set_lanes = set_lanes
        self._on_queued = on_queued

    async def tick(self) -> bool:
        now = self._clock.now()
        for campaign_id in await self._db.read(campaigns.due, now):
            try:
                await self._db.write(campaigns.transition, campaign_id, "start", now)
                log.info("campaign.started id=%d", campaign_id)
            except Conflict:
                pass  # paused, cancelled or started elsewhere in the meantime
        running = await self._db.read(campaigns.with_status, CampaignStatus.RUNNING)
        self._set_lanes([campaign_id for campaign_id, _ in running])
        more = False
        for campaign_id, fanned_out in running:
            if not fanned_out:
                queued, done = await self._db.write(
                    campaigns.fan_out, campaign_id, FANOUT_CHUNK, self._clock.now()
                )
                if queued:
                    self._on_queued()
                more |= not done
            elif await self._db.write(_finish_if_done, campaign_id, self._clock.now()):
                log.info("campaign.sent id=%d", campaign_id)
        return more


def _finish_if_done(conn: Connection, campaign_id: int, now: datetime) -> bool:
    """Mark a fully fanned-out campaign sent once nothing is queued or in hand-off."""
    if campaigns.has_open(conn, campaign_id):
        return False
    try:
        campaigns.transition(conn, campaign_id, "finish", now)
    except Conflict:
        return False
    return True
