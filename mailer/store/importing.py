"""Bulk statements for ``mailer subscriber import``: one statement per chunk instead of per row.

The reads that decide each row, and the creation of people and their pending subscriptions,
are batched here. The confirmation request and the ledger entry go through the opt-in's own
``outbox.enqueue`` and ``ledger.append``, one per person: they carry the send path's and the
evidence chain's rules, which must not exist twice.
"""

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, bindparam, insert, or_, select, update

from mailer.statuses import SubscriptionStatus
from mailer.store.tables import subscribers, subscriptions, suppressions


@dataclass(frozen=True, slots=True)
class Known:
    """What a chunk's addresses already have in the database, keyed by address hash."""

    subscriber_ids: dict[str, int]
    suppressed: dict[str, str]
    """address hash -> suppression reason"""
    statuses: dict[int, str]
    """subscriber id -> status of their subscription to the list being imported into"""


_SUBSCRIBERS = select(subscribers.c.email_hash, subscribers.c.id).where(
    subscribers.c.email_hash.in_(bindparam("hashes", expanding=True))
)
_SUPPRESSED = select(suppressions.c.email_hash, suppressions.c.reason).where(
    suppressions.c.email_hash.in_(bindparam("hashes", expanding=True))
)
_STATUSES = select(subscriptions.c.subscriber_id, subscriptions.c.status).where(
    subscriptions.c.list_id == bindparam("lid"),
    subscriptions.c.subscriber_id.in_(bindparam("sids", expanding=True)),
)


def known(conn: Connection, list_id: int, hashes: Collection[str]) -> Known:
    """Subscriber ids, suppressions and subscription statuses on ``list_id`` for ``hashes``.

    Callers keep ``hashes`` to a chunk (hundreds): each is one bound parameter.
    """
    if not hashes:
        return Known({}, {}, {})
    keys = list(hashes)
    ids = {str(h): int(i) for h, i in conn.execute(_SUBSCRIBERS, {"hashes": keys})}
    reasons = {str(h): str(r) for h, r in conn.execute(_SUPPRESSED, {"hashes": keys})}
    statuses: dict[int, str] = {}
    if ids:
        params = {"lid": list_id, "sids": list(ids.values())}
        statuses = {int(s): str(st) for s, st in conn.execute(_STATUSES, params)}
    return Known(ids, reasons, statuses)


@dataclass(frozen=True, slots=True)
class Joiner:
    """An address about to be asked to confirm: ``subscriber_id`` is None for a new person."""

    email: str
    email_hash: str
    name: str | None
    subscriber_id: int | None


_INSERT_SUBSCRIBERS = insert(subscribers)
_FILL_NAMES = (
    update(subscribers)
    .where(
        subscribers.c.id == bindparam("b_id"),
        or_(subscribers.c.name.is_(None), subscribers.c.name == ""),
    )
    .values(name=bindparam("b_name"))
)
_INSERT_SUBSCRIPTIONS = insert(subscriptions)


def add_pending(
    conn: Connection, list_id: int, joiners: Sequence[Joiner], now: datetime
) -> list[int]:
    """Create the people who are new and a ``pending`` subscription to ``list_id`` for each;
    return their subscriber ids, in order.

    Does for a chunk what ``people.ensure`` and ``people.set_status(PENDING)`` do for one
    person, with the same rules: a name is only filled in, never overwritten. Every joiner
    must have no subscription to ``list_id`` yet (the unique constraint refuses a second).
    """
    new = [j for j in joiners if j.subscriber_id is None]
    ids: dict[str, int] = {}
    if new:
        conn.execute(
            _INSERT_SUBSCRIBERS,
            [
                {"email": j.email, "email_hash": j.email_hash, "name": j.name, "created_at": now}
                for j in new
            ],
        )
        hashes = [j.email_hash for j in new]
        ids = {str(h): int(i) for h, i in conn.execute(_SUBSCRIBERS, {"hashes": hashes})}
    names = [
        {"b_id": j.subscriber_id, "b_name": j.name}
        for j in joiners
        if j.subscriber_id is not None and j.name
    ]
    if names:
        conn.execute(_FILL_NAMES, names)
    result = [ids[j.email_hash] if j.subscriber_id is None else j.subscriber_id for j in joiners]
    if result:
        conn.execute(
            _INSERT_SUBSCRIPTIONS,
            [
                {
                    "subscriber_id": sid,
                    "list_id": list_id,
                    "status": SubscriptionStatus.PENDING.value,
                    "created_at": now,
                    "updated_at": now,
                    "confirmed_at": None,
                }
                for sid in result
            ],
        )
    return result
