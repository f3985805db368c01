"""Subscribers and their subscriptions."""

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, insert, select, update
from sqlalchemy import delete as sa_delete

from mailer.statuses import SubscriptionStatus
from mailer.store.tables import lists, subscribers, subscriptions


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


def by_hash(conn: Connection, email_hash: str) -> SubscriberRow | None:
    row = conn.execute(select(*_COLS).where(subscribers.c.email_hash == email_hash)).first()
    if row is None:
        return None
    return SubscriberRow(*row)


def ensure(
    conn: Connection, *, email: str, email_hash: str, name: str | None, now: datetime
) -> int:
    """Return the subscriber id for ``email_hash``, creating the subscriber if needed.

    A name is only ever filled in, never overwritten by a later request.
    """
    found = conn.execute(
        select(subscribers.c.id, subscribers.c.name).where(subscribers.c.email_hash == email_hash)
    ).first()
    if found is None:
        key = conn.execute(
            insert(subscribers).values(
                email=email, email_hash=email_hash, name=name, created_at=now
            )
        ).inserted_primary_key
        assert key is not None
        return int(key[0])
    if name and not found[1]:
        conn.execute(update(subscribers).where(subscribers.c.id == found[0]).values(name=name))
    return int(found[0])


def subscription_status(conn: Connection, subscriber_id: int, list_id: int) -> str | None:
    return conn.execute(
        select(subscriptions.c.status).where(
            subscriptions.c.subscriber_id == subscriber_id, subscriptions.c.list_id == list_id
        )
    ).scalar_one_or_none()


def set_status(
    conn: Connection, subscriber_id: int, list_id: int, status: SubscriptionStatus, now: datetime
) -> str | None:
    """Set (creating if needed) a subscription's status; return the status it had before."""
    before = subscription_status(conn, subscriber_id, list_id)
    stamp = now
    values: dict[str, object] = {"status": status.value, "updated_at": stamp}
    if status is SubscriptionStatus.CONFIRMED:
        values["confirmed_at"] = stamp
    if before is None:
        conn.execute(
            insert(subscriptions).values(
                subscriber_id=subscriber_id, list_id=list_id, created_at=stamp, **values
            )
        )
    elif before != status:
        conn.execute(
            update(subscriptions)
            .where(
                subscriptions.c.subscriber_id == subscriber_id,
                subscriptions.c.list_id == list_id,
            )
            .values(**values)
        )
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
