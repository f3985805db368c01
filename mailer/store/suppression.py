"""The suppression list, keyed by the address hash (never plaintext)."""

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, bindparam, delete, insert, select, update

from mailer.domain.consent import next_suppression
from mailer.statuses import SuppressionReason
from mailer.store.tables import subscribers, suppressions


@dataclass(frozen=True, slots=True)
class SuppressionRow:
    email_hash: str
    reason: str
    created_at: datetime
    email: str | None
    """The address, while a subscriber row still holds it (never after erasure)."""


_REASON = select(suppressions.c.reason).where(suppressions.c.email_hash == bindparam("h"))
_INSERT = insert(suppressions)
_UPDATE = update(suppressions).where(suppressions.c.email_hash == bindparam("b_h"))


def reason_for(conn: Connection, email_hash: str) -> str | None:
    return conn.execute(_REASON, {"h": email_hash}).scalar_one_or_none()


def put(conn: Connection, email_hash: str, reason: SuppressionReason, now: datetime) -> bool:
    """Suppress ``email_hash`` for ``reason``; return False if nothing changed.

    Which reason wins over an existing one is the domain's rule (``next_suppression``).
    """
    current = reason_for(conn, email_hash)
    stored = next_suppression(current, reason)
    if stored is None:
        return False
    if current is None:
        conn.execute(
            insert(suppressions).values(email_hash=email_hash, reason=stored.value, created_at=now)
        )
    else:
        conn.execute(
            update(suppressions)
            .where(suppressions.c.email_hash == email_hash)
            .values(reason=stored.value, created_at=now)
        )
    return True


def lift(conn: Connection, email_hash: str) -> bool:
    result = conn.execute(delete(suppressions).where(suppressions.c.email_hash == email_hash))
    return bool(result.rowcount)


def all_rows(conn: Connection) -> list[SuppressionRow]:
    q = (
        select(
            suppressions.c.email_hash,
            suppressions.c.reason,
            suppressions.c.created_at,
            subscribers.c.email,
        )
        .outerjoin(subscribers, subscribers.c.email_hash == suppressions.c.email_hash)
        .order_by(suppressions.c.created_at, suppressions.c.email_hash)
    )
    return [SuppressionRow(r[0], r[1], r[2], r[3]) for r in conn.execute(q)]
