"""Privacy-policy versions: publish one (and announce it to everyone once), list them.

The seed policy's promises: changes are publicly announced (``/privacy`` and one mail to every
confirmed person) and apply going forward only (no effective date in the past; each consent
event records the version in force when it happened).
"""

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date

from sqlalchemy import Connection

from mailer.errors import Conflict, InvalidInput
from mailer.services.campaigns import Campaigns
from mailer.services.ports import Clock
from mailer.statuses import CampaignKind
from mailer.store import campaigns, policy
from mailer.store.db import Database
from mailer.store.policy import PolicyRow

VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_SUMMARY = 100_000
TEMPLATE = "announcement"


@dataclass(frozen=True, slots=True)
class Published:
    version: str
    campaign_id: int


class Policy:
    def __init__(
        self, db: Database, clock: Clock, campaigns: Campaigns, on_change: Callable[[], None]
    ) -> None:
        self._db = db
        self._clock = clock
        self._campaigns = campaigns
        self._on_change = on_change

    async def publish(
        self, version: str, effective_on: date, summary: str, url: str | None
    ) -> Published:
        """Record a new version and start its announcement to every confirmed person."""
        if not VERSION.fullmatch(version):
            raise InvalidInput(
                f"version {version!r} must be 1-64 letters, digits, dots, dashes or underscores"
            )
        today = self._clock.now().date()
        if effective_on < today:
            raise InvalidInput(
                f"the effective date {effective_on} is in the past: a change applies going "
                "forward only"
            )
        if len(summary) > MAX_SUMMARY:
            raise InvalidInput(f"the summary is longer than {MAX_SUMMARY} characters")
        if url is not None and not url.startswith(("https://", "http://")):
            raise InvalidInput("--url must be an http(s) address")
        body = summary.strip() + (f"\n\nThe full policy: {url}\n" if url else "\n")
        subject = f"Our privacy policy changes on {effective_on.isoformat()} (version {version})"
        draft = self._campaigns.checked_draft(subject, body, TEMPLATE, None)  # G3 gate
        now = self._clock.now()

        def tx(conn: Connection) -> Published:
            if policy.version_taken(conn, version):
                raise Conflict(f"policy version {version!r} was already published")
            campaign_id = campaigns.create(
                conn,
                list_id=None,
                subject=draft.subject,
                body=body,
                template=TEMPLATE,
                now=now,
                kind=CampaignKind.ANNOUNCEMENT,
            )
            campaigns.transition(conn, campaign_id, "send", now)
            policy.create(
                conn,
                version=version,
                effective_on=effective_on,
                summary=summary.strip(),
                url=url,
                campaign_id=campaign_id,
                now=now,
            )
            return Published(version, campaign_id)

        published = await self._db.write(tx)
        self._on_change()
        return published

    async def history(self) -> list[PolicyRow]:
        return await self._db.read(policy.history)

    async def in_force(self) -> str | None:
        return await self._db.read(policy.in_force, self._clock.now().date())
