"""Token buckets kept in the database, so a rate holds for every sender together."""

from datetime import datetime

from sqlalchemy import Connection, bindparam, select, update
from sqlalchemy.dialects import postgresql, sqlite

from mailer.domain.ratelimit import grant
from mailer.store.dbclock import database_now
from mailer.store.tables import rate_buckets as t

_LOCK = select(t.c.tokens, t.c.updated_at).where(t.c.name == bindparam("b_name")).with_for_update()
_SET = (
    update(t)
    .where(t.c.name == bindparam("b_name"))
    .values(tokens=bindparam("b_tokens"), updated_at=bindparam("b_at"))
)


def take(
    conn: Connection, name: str, want: int, rate: float, burst: float, now: datetime
) -> tuple[int, float]:
    """Take up to ``want`` tokens from bucket ``name``; return ``(granted, wait)``.

    The row is locked for the transaction, refilled by the database time elapsed since its
    last refill, and created full on first use. ``wait``: seconds until a token is there,
    when none was granted.
    """
    clock = database_now(conn, now)
    row = conn.execute(_LOCK, {"b_name": name}).first()
    if row is None:  # first use; another sender may be creating it at this very moment
        dialect_insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
        created = dialect_insert(t).values(name=name, tokens=burst, updated_at=clock)
        conn.execute(created.on_conflict_do_nothing())
        row = conn.execute(_LOCK, {"b_name": name}).one()
    tokens, elapsed = float(row[0]), (clock - row[1]).total_seconds()
    got, left, wait = grant(tokens, elapsed, rate, burst, want)
    conn.execute(_SET, {"b_name": name, "b_tokens": left, "b_at": clock})
    return got, wait
