"""Campaigns: rows, status changes by compare-and-set, SQL fan-out and progress counts."""

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Connection,
    bindparam,
    exists,
    func,
    insert,
    literal,
    select,
    true,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from mailer.domain.lifecycle import check_transition
from mailer.errors import NotFound
from mailer.statuses import (
    CampaignKind,
    CampaignStatus,
    MessageKind,
    OutboxStatus,
    SubscriptionStatus,
)
from mailer.store.outbox import CAMPAIGN_KINDS
from mailer.store.tables import campaigns as t
from mailer.store.tables import lists, outbox, subscribers, subscriptions, suppressions


@dataclass(frozen=True, slots=True)
class CampaignRow:
    """A campaign with its list; an announcement has no list (the ``list_*`` fields are None)."""

    id: int
    list_id: int | None
    list_slug: str | None
    list_name: str | None
    list_uid: str | None
    list_from: str | None
    subject: str
    body: str
    template: str
    status: str
    scheduled_at: datetime | None
    fanout_done: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    kind: str = CampaignKind.NEWSLETTER.value

    @property
    def is_announcement(self) -> bool:
        return self.kind == CampaignKind.ANNOUNCEMENT


_COLS = (
    t.c.id,
    t.c.list_id,
    lists.c.slug,
    lists.c.name,
    lists.c.uid,
    lists.c.from_addr,
    t.c.subject,
    t.c.body,
    t.c.template,
    t.c.status,
    t.c.scheduled_at,
    t.c.fanout_done,
    t.c.created_at,
    t.c.started_at,
    t.c.finished_at,
    t.c.kind,
)


def _row(values: tuple[Any, ...]) -> CampaignRow:
    return CampaignRow(*values)


_SELECT = select(*_COLS).outerjoin(lists, lists.c.id == t.c.list_id)
_BY_ID = _SELECT.where(t.c.id == bindparam("cid"))
_STATUS = select(t.c.status).where(t.c.id == bindparam("cid"))
_INSERT = insert(t)


def create(
    conn: Connection,
    *,
    list_id: int | None,
    subject: str,
    body: str,
    template: str,
    now: datetime,
    kind: CampaignKind = CampaignKind.NEWSLETTER,
) -> int:
    values = {
        "kind": kind.value,
        "list_id": list_id,
        "subject": subject,
        "body": body,
        "template": template,
        "status": CampaignStatus.DRAFT.value,
        "scheduled_at": None,
        "fanout_cursor": 0,
        "fanout_done": False,
        "created_at": now,
        "updated_at": now,
        "started_at": None,
        "finished_at": None,
    }
    key = conn.execute(_INSERT, values).inserted_primary_key
    assert key is not None
    return int(key[0])


def get(conn: Connection, campaign_id: int) -> CampaignRow:
    row = conn.execute(_BY_ID, {"cid": campaign_id}).first()
    if row is None:
        raise NotFound(f"no campaign {campaign_id}")
    return _row(tuple(row))


def all_rows(conn: Connection) -> list[CampaignRow]:
    return [_row(tuple(r)) for r in conn.execute(_SELECT.order_by(t.c.id))]


def transition(
    conn: Connection, campaign_id: int, action: str, now: datetime, **values: Any
) -> CampaignStatus:
    """Move a campaign along its lifecycle by compare-and-set; return the new status."""
    current = conn.execute(_STATUS, {"cid": campaign_id}).scalar_one_or_none()
    if current is None:
        raise NotFound(f"no campaign {campaign_id}")
    target = check_transition(action, current)
    changes: dict[str, Any] = {"status": target.value, "updated_at": now, **values}
    if target is CampaignStatus.RUNNING and action in ("send", "start"):
        changes["started_at"] = now
    if target in (CampaignStatus.SENT, CampaignStatus.CANCELLED):
        changes["finished_at"] = now
    done = conn.execute(
        update(t).where(t.c.id == campaign_id, t.c.status == current).values(**changes)
    )
    if done.rowcount != 1:  # another process moved it first: report what happened
        return transition(conn, campaign_id, action, now, **values)
    return target


def due(conn: Connection, now: datetime) -> list[int]:
    """Scheduled campaigns whose time has come."""
    q = select(t.c.id).where(t.c.status == CampaignStatus.SCHEDULED.value, t.c.scheduled_at <= now)
    return [int(r[0]) for r in conn.execute(q)]


def with_status(conn: Connection, *statuses: CampaignStatus) -> list[tuple[int, bool]]:
    """``(id, fanout_done)`` of the campaigns in any of ``statuses``."""
    q = select(t.c.id, t.c.fanout_done).where(t.c.status.in_([s.value for s in statuses]))
    return [(int(r[0]), bool(r[1])) for r in conn.execute(q)]


_AUDIENCE = (
    select(subscriptions.c.subscriber_id)
    .join(subscribers, subscribers.c.id == subscriptions.c.subscriber_id)
    .outerjoin(suppressions, suppressions.c.email_hash == subscribers.c.email_hash)
    .where(
        subscriptions.c.list_id == bindparam("lid"),
        subscriptions.c.status == SubscriptionStatus.CONFIRMED.value,
        suppressions.c.email_hash.is_(None),
        subscriptions.c.subscriber_id > bindparam("cursor"),
    )
    .order_by(subscriptions.c.subscriber_id)
    .limit(bindparam("chunk"))
)
_FANOUT_COLUMNS = [
    "kind",
    "campaign_id",
    "list_id",
    "subscriber_id",
    "status",
    "attempts",
    "next_attempt_at",
    "checked_at",
    "created_at",
    "updated_at",
]


_PEOPLE = (
    select(subscriptions.c.subscriber_id)
    .join(subscribers, subscribers.c.id == subscriptions.c.subscriber_id)
    .outerjoin(suppressions, suppressions.c.email_hash == subscribers.c.email_hash)
    .where(
        subscriptions.c.status == SubscriptionStatus.CONFIRMED.value,
        suppressions.c.email_hash.is_(None),
        subscriptions.c.subscriber_id > bindparam("cursor"),
    )
    .group_by(subscriptions.c.subscriber_id)
    .order_by(subscriptions.c.subscriber_id)
    .limit(bindparam("chunk"))
)
"""Every person confirmed on at least one list and not suppressed, once each."""


def fan_out(conn: Connection, campaign_id: int, chunk: int, now: datetime) -> tuple[int, bool]:
    """Queue the next ``chunk`` recipients of a running campaign; return (queued, done).

    Recipients are taken in subscriber-id order after a cursor kept on the campaign, in the
    same transaction, so a crash between chunks resumes where it stopped; the outbox's
    unique constraint makes a repeated chunk harmless. The campaign row is locked first, so
    schedulers of several workers take turns and each reads the cursor the last one left.
    Only confirmed, unsuppressed people are queued here (for a newsletter, of its list; for an
    announcement, of any list, once each); the send-time check decides again for each message.
    """
    row = conn.execute(  # locked: concurrent schedulers (PostgreSQL) fan out one at a time
        select(t.c.list_id, t.c.fanout_cursor, t.c.fanout_done, t.c.status, t.c.kind)
        .where(t.c.id == campaign_id)
        .with_for_update()
    ).one()
    list_id, cursor, done = row[0], int(row[1]), bool(row[2])
    if done or row[3] != CampaignStatus.RUNNING:  # cancelled or paused since the caller looked
        return 0, done
    params: dict[str, object] = {"cursor": cursor, "chunk": chunk}
    if row[4] == CampaignKind.ANNOUNCEMENT:
        recipients, kind = _PEOPLE.subquery(), MessageKind.ANNOUNCEMENT
    else:
        recipients, kind = _AUDIENCE.subquery(), MessageKind.CAMPAIGN
        params["lid"] = list_id
    last, count = conn.execute(
        select(func.max(recipients.c.subscriber_id), func.count()), params
    ).one()
    if count:
        source = select(
            literal(kind.value),
            literal(campaign_id),
            literal(list_id, outbox.c.list_id.type),
            recipients.c.subscriber_id,
            literal(OutboxStatus.QUEUED.value),
            literal(0),
            literal(now, outbox.c.next_attempt_at.type),
            literal(None, outbox.c.checked_at.type),
            literal(now, outbox.c.created_at.type),
            literal(now, outbox.c.updated_at.type),
        ).where(true())  # SQLite parses INSERT ... SELECT ... ON CONFLICT only with a WHERE
        dialect_insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
        conn.execute(
            dialect_insert(outbox).from_select(_FANOUT_COLUMNS, source).on_conflict_do_nothing(),
            params,
        )
    finished = count < chunk
    conn.execute(
        update(t)
        .where(t.c.id == campaign_id)
        .values(fanout_cursor=last if count else cursor, fanout_done=finished, updated_at=now)
    )
    return int(count), finished


_OPEN = select(
    exists().where(
        outbox.c.campaign_id == bindparam("cid"),
        outbox.c.status.in_([OutboxStatus.QUEUED.value, OutboxStatus.SENDING.value]),
        outbox.c.kind.in_(CAMPAIGN_KINDS),
    )
)


def has_open(conn: Connection, campaign_id: int) -> bool:
    """Whether any message of a campaign is still queued (retries included) or in hand-off."""
    return bool(conn.execute(_OPEN, {"cid": campaign_id}).scalar_one())


_PREVIEW_IN_HAND = select(
    exists().where(
        outbox.c.campaign_id == bindparam("cid"),
        outbox.c.subscriber_id == bindparam("sid"),
        outbox.c.kind == MessageKind.PREVIEW.value,
        outbox.c.status == OutboxStatus.SENDING.value,
    )
)


def preview_in_hand(conn: Connection, campaign_id: int, subscriber_id: int) -> bool:
    """Whether this person's preview copy of the campaign is being handed off right now."""
    return bool(conn.execute(_PREVIEW_IN_HAND, {"cid": campaign_id, "sid": subscriber_id}).scalar())


def skip_queued(conn: Connection, campaign_id: int, reason: str, limit: int, now: datetime) -> int:
    """Mark up to ``limit`` still-queued messages of a cancelled campaign as skipped."""
    ids = (
        select(outbox.c.id)
        .where(
            outbox.c.campaign_id == campaign_id,
            outbox.c.kind.in_(CAMPAIGN_KINDS),
            outbox.c.status == OutboxStatus.QUEUED.value,
        )
        .limit(limit)
        .scalar_subquery()
    )
    result = conn.execute(
        update(outbox)
        .where(outbox.c.id.in_(ids), outbox.c.status == OutboxStatus.QUEUED.value)
        .values(status=OutboxStatus.SKIPPED.value, reason=reason, updated_at=now)
    )
    return int(result.rowcount)


def progress(conn: Connection, campaign_id: int) -> dict[str, dict[str, int]]:
    """Counts per outbox state and, for the unhappy states, per reason."""
    q = (
        select(outbox.c.status, outbox.c.reason, func.count())
        .where(outbox.c.campaign_id == campaign_id, outbox.c.kind.in_(CAMPAIGN_KINDS))
        .group_by(outbox.c.status, outbox.c.reason)
    )
    states: dict[str, int] = {s.value: 0 for s in OutboxStatus}
    reasons: dict[str, int] = {}
    for status, reason, n in conn.execute(q):
        states[status] += int(n)
        if reason is not None and status != OutboxStatus.QUEUED.value:
            key = f"{status}: {_reason_class(reason)}"
            reasons[key] = reasons.get(key, 0) + int(n)
    return {"states": states, "reasons": reasons}


def _reason_class(reason: str) -> str:
    """Group reasons: SMTP replies by step and code, the rest as written."""
    step, sep, rest = reason.partition(": ")
    if sep and rest[:3].isdigit():
        return f"{step}: {rest[:3]}"
    return reason


def audience(conn: Connection, list_id: int) -> dict[str, int]:
    """Who would receive mail to a list now, and who would not, by reason."""
    q = (
        select(subscriptions.c.status, suppressions.c.reason, func.count())
        .join(subscribers, subscribers.c.id == subscriptions.c.subscriber_id)
        .outerjoin(suppressions, suppressions.c.email_hash == subscribers.c.email_hash)
        .where(subscriptions.c.list_id == list_id)
        .group_by(subscriptions.c.status, suppressions.c.reason)
    )
    counts: dict[str, int] = {"will-receive": 0}
    for status, reason, n in conn.execute(q):
        if status == SubscriptionStatus.CONFIRMED.value:
            key = "will-receive" if reason is None else f"suppressed-{reason}"
        elif status == SubscriptionStatus.PENDING.value:
            key = "unconfirmed"
        else:
            key = status
        counts[key] = counts.get(key, 0) + int(n)
    return counts


def audience_people(conn: Connection) -> dict[str, int]:
    """Who a policy announcement would reach now: people confirmed on any list, by reason."""
    confirmed = (
        select(subscriptions.c.subscriber_id)
        .where(subscriptions.c.status == SubscriptionStatus.CONFIRMED.value)
        .group_by(subscriptions.c.subscriber_id)
        .subquery()
    )
    q = (
        select(suppressions.c.reason, func.count())
        .select_from(confirmed)
        .join(subscribers, subscribers.c.id == confirmed.c.subscriber_id)
        .outerjoin(suppressions, suppressions.c.email_hash == subscribers.c.email_hash)
        .group_by(suppressions.c.reason)
    )
    counts: dict[str, int] = {"will-receive": 0}
    for reason, n in conn.execute(q):
        counts["will-receive" if reason is None else f"suppressed-{reason}"] = int(n)
    return counts
