"""Subscribers and their subscriptions."""

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, bindparam, func, insert, select, update
from sqlalchemy import delete as sa_delete

from mailer.statuses import SubscriptionStatus
from mailer.store.tables import campaigns, lists, outbox, subscribers, subscriptions


@dataclass(frozen=True, slots=True)
class SubscriberRow:
    id: int
    email: str
    email_hash: str
    name: str | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class SubscriptionRow:
    list_id: int
    list_uid: str
    list_slug: str
    list_name: str
    status: str
    created_at: datetime
    updated_at: datetime
    confirmed_at: datetime | None


_COLS = (
    subscribers.c.id,
    subscribers.c.email,
    subscribers.c.email_hash,
    subscribers.c.name,
    subscribers.c.created_at,
)


_BY_HASH = select(*_COLS).where(subscribers.c.email_hash == bindparam("h"))
_INSERT_SUBSCRIBER = insert(subscribers)
_FILL_NAME = update(subscribers).where(subscribers.c.id == bindparam("b_id"))
_STATUS = select(subscriptions.c.status).where(
    subscriptions.c.subscriber_id == bindparam("sid"), subscriptions.c.list_id == bindparam("lid")
)
_INSERT_SUBSCRIPTION = insert(subscriptions)
_ONE_SUBSCRIPTION = (
    subscriptions.c.subscriber_id == bindparam("b_sid"),
    subscriptions.c.list_id == bindparam("b_lid"),
)
_SET_STATUS = update(subscriptions).where(*_ONE_SUBSCRIPTION)
"""Statements are built once: building them per call costs more than SQLite running them."""


def by_hash(conn: Connection, email_hash: str) -> SubscriberRow | None:
    row = conn.execute(_BY_HASH, {"h": email_hash}).first()
    return None if row is None else SubscriberRow(*row)


def ensure(
    conn: Connection, *, email: str, email_hash: str, name: str | None, now: datetime
) -> int:
    """Return the subscriber id for ``email_hash``, creating the subscriber if needed.

    A name is only ever filled in, never overwritten by a later request.
    """
    found = by_hash(conn, email_hash)
    if found is None:
        values = {"email": email, "email_hash": email_hash, "name": name, "created_at": now}
        key = conn.execute(_INSERT_SUBSCRIBER, values).inserted_primary_key
        assert key is not None
        return int(key[0])
    if name and not found.name:
        conn.execute(_FILL_NAME, {"b_id": found.id, "name": name})
    return found.id


def subscription_status(conn: Connection, subscriber_id: int, list_id: int) -> str | None:
    return conn.execute(_STATUS, {"sid": subscriber_id, "lid": list_id}).scalar_one_or_none()


def set_status(
    conn: Connection, subscriber_id: int, list_id: int, status: SubscriptionStatus, now: datetime
) -> str | None:
    """Set (creating if needed) a subscription's status; return the status it had before."""
    before = subscription_status(conn, subscriber_id, list_id)
    values: dict[str, object] = {"status": status.value, "updated_at": now}
    if status is SubscriptionStatus.CONFIRMED:
        values["confirmed_at"] = now
    if before is None:
        values.update(subscriber_id=subscriber_id, list_id=list_id, created_at=now)
        values.setdefault("confirmed_at", None)
        conn.execute(_INSERT_SUBSCRIPTION, values)
    elif before != status:
        conn.execute(_SET_STATUS, {"b_sid": subscriber_id, "b_lid": list_id, **values})
    return before


def unsubscribe_all(conn: Connection, subscriber_id: int, now: datetime) -> int:
    """Mark every pending or confirmed subscription of a person unsubscribed; return how many."""
    result = conn.execute(
        update(subscriptions)
        .where(
            subscriptions.c.subscriber_id == subscriber_id,
            subscriptions.c.status != SubscriptionStatus.UNSUBSCRIBED.value,
        )
        .values(status=SubscriptionStatus.UNSUBSCRIBED.value, updated_at=now)
    )
    return int(result.rowcount)


def subscriptions_of(conn: Connection, subscriber_id: int) -> list[SubscriptionRow]:
    q = (
        select(
            lists.c.id,
            lists.c.uid,
            lists.c.slug,
            lists.c.name,
            subscriptions.c.status,
            subscriptions.c.created_at,
            subscriptions.c.updated_at,
            subscriptions.c.confirmed_at,
        )
        .join(lists, lists.c.id == subscriptions.c.list_id)
        .where(subscriptions.c.subscriber_id == subscriber_id)
        .order_by(lists.c.slug)
    )
    return [SubscriptionRow(*r) for r in conn.execute(q)]


def delete(conn: Connection, subscriber_id: int) -> None:
    """Delete a person; their subscriptions and outbox rows go with them (ON DELETE CASCADE)."""
    conn.execute(sa_delete(subscribers).where(subscribers.c.id == subscriber_id))


@dataclass(frozen=True, slots=True)
class DeliveryRow:
    """One message meant for a person (an outbox row), as a subject-access export shows it."""

    id: int
    kind: str
    list_slug: str | None
    campaign_id: int | None
    campaign_subject: str | None
    status: str
    reason: str | None
    attempts: int
    created_at: datetime
    updated_at: datetime
    checked_at: datetime | None
    feedback: str | None
    feedback_detail: str | None
    feedback_at: datetime | None


def deliveries_of(conn: Connection, subscriber_id: int) -> list[DeliveryRow]:
    """Every outbox row addressed to a person, oldest first, with its list and campaign."""
    q = (
        select(
            outbox.c.id,
            outbox.c.kind,
            lists.c.slug,
            outbox.c.campaign_id,
            campaigns.c.subject,
            outbox.c.status,
            outbox.c.reason,
            outbox.c.attempts,
            outbox.c.created_at,
            outbox.c.updated_at,
            outbox.c.checked_at,
            outbox.c.feedback,
            outbox.c.feedback_detail,
            outbox.c.feedback_at,
        )
        .select_from(outbox)
        .outerjoin(lists, lists.c.id == outbox.c.list_id)
        .outerjoin(campaigns, campaigns.c.id == outbox.c.campaign_id)
        .where(outbox.c.subscriber_id == subscriber_id)
        .order_by(outbox.c.created_at, outbox.c.id)
    )
    return [DeliveryRow(*tuple(r)) for r in conn.execute(q)]


def count_deliveries(conn: Connection, subscriber_id: int) -> int:
    q = select(func.count()).select_from(outbox).where(outbox.c.subscriber_id == subscriber_id)
    return int(conn.execute(q).scalar_one())


def count_subscriptions(conn: Connection, subscriber_id: int) -> int:
    q = (
        select(func.count())
        .select_from(subscriptions)
        .where(subscriptions.c.subscriber_id == subscriber_id)
    )
    return int(conn.execute(q).scalar_one())
