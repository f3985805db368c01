"""Campaign use cases: create, preview, audience, schedule, send, pause, resume, cancel."""

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any

from jinja2 import TemplateError
from sqlalchemy import Connection

from mailer.domain.addresses import address_hash, parse_address
from mailer.domain.compose import is_one_line
from mailer.domain.consent import may_send
from mailer.errors import Conflict, InvalidInput, NotFound
from mailer.render import Renderer
from mailer.services.messages import MessageFactory
from mailer.services.ports import Clock
from mailer.statuses import CampaignKind, CampaignStatus, MessageKind
from mailer.store import campaigns, lists, outbox, people, suppression
from mailer.store.campaigns import CampaignRow
from mailer.store.db import Database
from mailer.store.lists import ListRow
from mailer.store.outbox import Claimed

MAX_SUBJECT = 250
MAX_BODY = 1_000_000
TEMPLATE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
CANCEL_CHUNK = 2000


@dataclass(frozen=True, slots=True)
class Report:
    campaign: CampaignRow
    states: dict[str, int]
    reasons: dict[str, int]

    def as_json(self) -> dict[str, Any]:
        c = self.campaign
        return {
            "id": c.id,
            "list": c.list_slug,
            "subject": c.subject,
            "status": c.status,
            "scheduled_at": c.scheduled_at,
            "started_at": c.started_at,
            "finished_at": c.finished_at,
            "fanned_out": c.fanout_done,
            "total": sum(self.states.values()),
            "states": self.states,
            "reasons": self.reasons,
        }


class Campaigns:
    def __init__(
        self,
        db: Database,
        clock: Clock,
        renderer: Renderer,
        factory: MessageFactory,
        hash_key: bytes,
        on_change: Callable[[], None],
    ) -> None:
        self._db = db
        self._clock = clock
        self._renderer = renderer
        self._factory = factory
        self._hash_key = hash_key
        self._on_change = on_change

    async def create(self, list_slug: str, subject: str, body: str, template: str) -> int:
        """Create a draft; refuse a subject, body or template that could not be sent as is."""
        found = await self._db.read(lists.by_slug, list_slug)
        if found is None:
            raise NotFound(f"no list named {list_slug!r}")
        draft = self.checked_draft(subject, body, template, found)
        now = self._clock.now()

        def tx(conn: Connection) -> int:
            target = lists.by_slug(conn, list_slug)
            if target is None:
                raise NotFound(f"no list named {list_slug!r}")
            return campaigns.create(
                conn,
                list_id=target.id,
                subject=draft.subject,
                body=body,
                template=template,
                now=now,
            )

        return await self._db.write(tx)

    def checked_draft(
        self, subject: str, body: str, template: str, target: ListRow | None
    ) -> CampaignRow:
        """An unsaved draft that has passed every check, the G3 render included.

        ``target`` is the list; ``None`` makes a policy announcement (to every person).
        """
        subject = subject.strip()
        if not subject or len(subject) > MAX_SUBJECT or not is_one_line(subject):
            raise InvalidInput(f"the subject must be 1-{MAX_SUBJECT} characters on one line")
        if not body.strip():
            raise InvalidInput("the body is empty")
        if len(body) > MAX_BODY:
            raise InvalidInput(f"the body is longer than {MAX_BODY} characters")
        if not TEMPLATE_NAME.fullmatch(template) or not self._renderer.has_email(template):
            raise InvalidInput(f"no email template named {template!r} in templates/email/")
        draft = CampaignRow(
            id=0,
            list_id=None if target is None else target.id,
            list_slug=None if target is None else target.slug,
            list_name=None if target is None else target.name,
            list_uid=None if target is None else target.uid,
            list_from=None if target is None else target.from_addr,
            subject=subject,
            body=body,
            template=template,
            status=CampaignStatus.DRAFT.value,
            scheduled_at=None,
            fanout_done=False,
            created_at=self._clock.now(),
            started_at=None,
            finished_at=None,
            kind=(CampaignKind.NEWSLETTER if target else CampaignKind.ANNOUNCEMENT).value,
        )
        try:
            self.sample(draft)  # G3: refuse it now, before anything is stored
        except TemplateError as exc:
            raise InvalidInput(f"template {template!r} cannot render a campaign: {exc}") from None
        return draft

    async def get(self, campaign_id: int) -> CampaignRow:
        return await self._db.read(campaigns.get, campaign_id)

    async def all(self) -> list[CampaignRow]:
        return await self._db.read(campaigns.all_rows)

    def sample(self, campaign: CampaignRow) -> bytes:
        """The campaign as one made-up recipient would get it (nothing is queued or sent)."""
        fake = Claimed(
            outbox_id=0,
            kind=MessageKind.PREVIEW,
            attempts=0,
            email="preview@example.org",
            email_hash="0" * 32,
            name=None,
            list_uid=campaign.list_uid,
            list_slug=campaign.list_slug,
            list_name=campaign.list_name,
            list_from=campaign.list_from,
            queued_at=self._clock.now(),
            campaign_id=campaign.id,
            fence=0,
        )
        return self._factory.campaign(fake, campaign).data

    async def preview_to(self, campaign_id: int, raw_email: str) -> None:
        """Queue one real copy to a test address, which must be a confirmed subscriber (G1)."""
        address = parse_address(raw_email)
        subject = address_hash(self._hash_key, address)
        now = self._clock.now()

        def tx(conn: Connection) -> None:
            campaign = campaigns.get(conn, campaign_id)
            if campaign.list_id is None:
                raise InvalidInput(
                    "an announcement goes to everyone at once; print it with "
                    "`mailer campaign preview ID` instead"
                )
            person = people.by_hash(conn, subject)
            status = (
                None
                if person is None
                else people.subscription_status(conn, person.id, campaign.list_id)
            )
            if person is None or (
                may_send(MessageKind.PREVIEW, status, suppression.reason_for(conn, subject))
                is not None
            ):
                raise Conflict(
                    f"previews go only to confirmed subscribers of {campaign.list_slug!r} (G1); "
                    "subscribe the test address and confirm it first"
                )
            if campaigns.preview_in_hand(conn, campaign.id, person.id):
                raise Conflict("the last preview to that address is being sent; try again soon")
            outbox.enqueue_preview(
                conn,
                campaign_id=campaign.id,
                list_id=campaign.list_id,
                subscriber_id=person.id,
                now=now,
            )

        await self._db.write(tx)
        self._on_change()

    async def audience(self, campaign_id: int) -> dict[str, int]:
        campaign = await self.get(campaign_id)
        if campaign.list_id is None:
            return await self._db.read(campaigns.audience_people)
        return await self._db.read(campaigns.audience, campaign.list_id)

    async def schedule(self, campaign_id: int, at: datetime) -> None:
        if at.tzinfo is None:
            raise InvalidInput("give the time with a UTC offset, e.g. 2026-12-01T09:00+01:00")
        if at <= self._clock.now():
            raise InvalidInput("that time has already passed")
        await self._act(campaign_id, "schedule", scheduled_at=at)

    async def send(self, campaign_id: int) -> None:
        """Start sending now (from draft or scheduled)."""
        await self._act(campaign_id, "send")

    async def pause(self, campaign_id: int) -> None:
        await self._act(campaign_id, "pause")

    async def resume(self, campaign_id: int) -> None:
        await self._act(campaign_id, "resume")

    async def cancel(self, campaign_id: int) -> int:
        """Stop for good; every message not yet handed off is reported skipped. Returns those."""
        await self._act(campaign_id, "cancel")
        skipped = 0
        while True:
            n = await self._db.write(
                campaigns.skip_queued, campaign_id, "cancelled", CANCEL_CHUNK, self._clock.now()
            )
            skipped += n
            if n < CANCEL_CHUNK:
                return skipped

    async def report(self, campaign_id: int) -> Report:
        def tx(conn: Connection) -> Report:
            progress = campaigns.progress(conn, campaign_id)
            return Report(campaigns.get(conn, campaign_id), progress["states"], progress["reasons"])

        return await self._db.read(tx)

    async def _act(self, campaign_id: int, action: str, **values: Any) -> CampaignStatus:
        status = await self._db.write(
            partial(campaigns.transition, **values), campaign_id, action, self._clock.now()
        )
        self._on_change()
        return status
