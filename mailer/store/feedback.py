"""Delivery feedback in the database: marks on outbox rows, and soft-bounce scores."""

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, bindparam, delete, insert, select, update

from mailer.domain.feedback import SoftBounces
from mailer.statuses import MessageKind
from mailer.store.tables import bounce_scores, lists, outbox, subscribers


@dataclass(frozen=True, slots=True)
class Delivery:
    """An outbox row as feedback about it needs it: whose it was, for which list, its mark."""

    outbox_id: int
    kind: MessageKind
    email_hash: str
    list_uid: str | None
    feedback: str | None


_DELIVERY = (
    select(
        outbox.c.id,
        outbox.c.kind,
        subscribers.c.email_hash,
        lists.c.uid,
        outbox.c.feedback,
    )
    .select_from(
        outbox.join(subscribers, subscribers.c.id == outbox.c.subscriber_id).outerjoin(
            lists, lists.c.id == outbox.c.list_id
        )
    )
    .where(outbox.c.id == bindparam("oid"))
)
_MARK = update(outbox).where(outbox.c.id == bindparam("b_id"))
_SCORE = select(bounce_scores.c.soft_count, bounce_scores.c.since).where(
    bounce_scores.c.email_hash == bindparam("h")
)
_INSERT_SCORE = insert(bounce_scores)
_UPDATE_SCORE = update(bounce_scores).where(bounce_scores.c.email_hash == bindparam("b_h"))
_DELETE_SCORE = delete(bounce_scores).where(bounce_scores.c.email_hash == bindparam("h"))


def delivery(conn: Connection, outbox_id: int) -> Delivery | None:
    """The delivery an outbox id names; ``None`` once its person was erased."""
    row = conn.execute(_DELIVERY, {"oid": outbox_id}).first()
    if row is None:
        return None
    return Delivery(row[0], MessageKind(row[1]), row[2], row[3], row[4])


def mark(conn: Connection, outbox_id: int, kind: str, detail: str, now: datetime) -> None:
    conn.execute(
        _MARK, {"b_id": outbox_id, "feedback": kind, "feedback_detail": detail, "feedback_at": now}
    )


def soft_bounces(conn: Connection, email_hash: str) -> SoftBounces | None:
    row = conn.execute(_SCORE, {"h": email_hash}).first()
    return None if row is None else SoftBounces(int(row[0]), row[1])


def save_soft_bounces(conn: Connection, email_hash: str, counted: SoftBounces) -> None:
    values = {"soft_count": counted.count, "since": counted.since}
    if conn.execute(_UPDATE_SCORE, {"b_h": email_hash, **values}).rowcount == 0:
        conn.execute(_INSERT_SCORE, {"email_hash": email_hash, **values})


def forget_soft_bounces(conn: Connection, email_hash: str) -> None:
    """Drop an address's soft-bounce count (erasure, or once it is suppressed anyway)."""
    conn.execute(_DELETE_SCORE, {"h": email_hash})
