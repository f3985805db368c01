"""The outbox: one row per message, claimed with a send-time consent check (G1/G2, G6)."""

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection, and_, func, insert, select, update

from mailer.domain.consent import RequestHistory, may_send
from mailer.statuses import MessageKind, OutboxStatus
from mailer.store.tables import (
    lists,
    outbox,
    subscribers,
    subscriptions,
    suppressions,
)


@dataclass(frozen=True, slots=True)
class Claimed:
    """A message that passed its consent check and is now ``sending``: everything to render it."""

    outbox_id: int
    kind: MessageKind
    attempts: int
    email: str
    email_hash: str
    name: str | None
    list_uid: str | None
    list_slug: str | None
    list_name: str | None
    list_from: str | None
    queued_at: datetime


def enqueue(
    conn: Connection, *, kind: MessageKind, list_id: int | None, subscriber_id: int, now: datetime
) -> int:
    stamp = now
    key = conn.execute(
        insert(outbox).values(
            kind=kind.value,
            list_id=list_id,
            subscriber_id=subscriber_id,
            status=OutboxStatus.QUEUED.value,
            attempts=0,
            next_attempt_at=stamp,
            created_at=stamp,
            updated_at=stamp,
        )
    ).inserted_primary_key
    assert key is not None
    return int(key[0])


def confirm_history(
    conn: Connection, subscriber_id: int, list_id: int, now: datetime
) -> RequestHistory:
    """When this person was last sent a confirmation request for this list; how many today."""
    base = and_(outbox.c.subscriber_id == subscriber_id, outbox.c.kind == MessageKind.CONFIRM.value)
    last = conn.execute(
        select(func.max(outbox.c.created_at)).where(base, outbox.c.list_id == list_id)
    ).scalar_one()
    count = conn.execute(
        select(func.count()).where(base, outbox.c.created_at > now - timedelta(days=1))
    ).scalar_one()
    return RequestHistory(
        last_for_list=last,
        count_last_day=int(count),
    )


_CLAIM_COLS = (
    outbox.c.id,
    outbox.c.kind,
    outbox.c.attempts,
    subscribers.c.email,
    subscribers.c.email_hash,
    subscribers.c.name,
    lists.c.uid,
    lists.c.slug,
    lists.c.name,
    lists.c.from_addr,
    subscriptions.c.status,
    suppressions.c.reason,
    outbox.c.created_at,
)


def claim(conn: Connection, now: datetime, limit: int = 1) -> list[Claimed]:
    """Claim up to ``limit`` due messages, each only if its recipient's consent holds *now*.

    Runs inside one short write transaction: a row whose check fails becomes ``skipped`` with
    the reason; a row whose check passes becomes ``sending``. No network I/O happens here, and
    the caller hands each claimed message to SMTP right after this commits.
    """
    q = (
        select(*_CLAIM_COLS)
        .select_from(outbox)
        .join(subscribers, subscribers.c.id == outbox.c.subscriber_id)
        .outerjoin(lists, lists.c.id == outbox.c.list_id)
        .outerjoin(
            subscriptions,
            and_(
                subscriptions.c.subscriber_id == outbox.c.subscriber_id,
                subscriptions.c.list_id == outbox.c.list_id,
            ),
        )
        .outerjoin(suppressions, suppressions.c.email_hash == subscribers.c.email_hash)
        .where(
            outbox.c.status == OutboxStatus.QUEUED.value,
            outbox.c.next_attempt_at <= now,
        )
        .order_by(outbox.c.next_attempt_at, outbox.c.id)
        .limit(limit)
    )
    if conn.dialect.name == "postgresql":
        q = q.with_for_update(of=outbox, skip_locked=True)
    stamp = now
    claimed: list[Claimed] = []
    for r in conn.execute(q).all():
        kind = MessageKind(r[1])
        skip = may_send(kind, r[10], r[11])
        status = OutboxStatus.SENDING if skip is None else OutboxStatus.SKIPPED
        done = conn.execute(
            update(outbox)
            .where(outbox.c.id == r[0], outbox.c.status == OutboxStatus.QUEUED.value)
            .values(
                status=status.value, reason=None if skip is None else skip.value, updated_at=stamp
            )
        )
        if done.rowcount == 1 and skip is None:
            claimed.append(
                Claimed(r[0], kind, r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], r[12])
            )
    return claimed


def finish(
    conn: Connection, outbox_id: int, status: OutboxStatus, reason: str | None, now: datetime
) -> bool:
    """Record a final outcome, only over ``sending`` (compare-and-set)."""
    result = conn.execute(
        update(outbox)
        .where(outbox.c.id == outbox_id, outbox.c.status == OutboxStatus.SENDING.value)
        .values(
            status=status.value,
            reason=reason,
            attempts=outbox.c.attempts + 1,
            updated_at=now,
        )
    )
    return result.rowcount == 1


def retry_later(conn: Connection, outbox_id: int, reason: str, at: datetime, now: datetime) -> bool:
    """Put a temporarily failed message back in the queue for ``at`` (compare-and-set)."""
    result = conn.execute(
        update(outbox)
        .where(outbox.c.id == outbox_id, outbox.c.status == OutboxStatus.SENDING.value)
        .values(
            status=OutboxStatus.QUEUED.value,
            reason=reason,
            attempts=outbox.c.attempts + 1,
            next_attempt_at=at,
            updated_at=now,
        )
    )
    return result.rowcount == 1


def fail_interrupted(conn: Connection, now: datetime) -> int:
    """At start: messages left ``sending`` by a crash are reported failed, never resent (G6)."""
    result = conn.execute(
        update(outbox)
        .where(outbox.c.status == OutboxStatus.SENDING.value)
        .values(
            status=OutboxStatus.FAILED.value,
            reason="interrupted: the sender stopped during hand-off; not retried",
            updated_at=now,
        )
    )
    return int(result.rowcount)


def counts(conn: Connection) -> dict[str, int]:
    q = select(outbox.c.status, func.count()).group_by(outbox.c.status)
    return {status: int(n) for status, n in conn.execute(q)}
