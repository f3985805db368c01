"""Mailing lists."""

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, RowMapping, bindparam, func, insert, select

from mailer.statuses import SubscriptionStatus
from mailer.store.tables import lists, subscriptions


@dataclass(frozen=True, slots=True)
class ListRow:
    id: int
    uid: str
    slug: str
    name: str
    description: str
    from_addr: str | None


def _row(m: RowMapping) -> ListRow:
    return ListRow(m["id"], m["uid"], m["slug"], m["name"], m["description"], m["from_addr"])


_COLS = (
    lists.c.id,
    lists.c.uid,
    lists.c.slug,
    lists.c.name,
    lists.c.description,
    lists.c.from_addr,
)


def slug_taken(conn: Connection, slug: str) -> bool:
    return conn.execute(select(lists.c.id).where(lists.c.slug == slug)).first() is not None


def create(
    conn: Connection,
    *,
    uid: str,
    slug: str,
    name: str,
    description: str,
    from_addr: str | None,
    now: datetime,
) -> ListRow:
    new_id = conn.execute(
        insert(lists).values(
            uid=uid,
            slug=slug,
            name=name,
            description=description,
            from_addr=from_addr,
            created_at=now,
        )
    ).inserted_primary_key
    assert new_id is not None
    return ListRow(int(new_id[0]), uid, slug, name, description, from_addr)


_BY_SLUG = select(*_COLS).where(lists.c.slug == bindparam("slug"))
_BY_UID = select(*_COLS).where(lists.c.uid == bindparam("uid"))


def by_slug(conn: Connection, slug: str) -> ListRow | None:
    m = conn.execute(_BY_SLUG, {"slug": slug}).mappings().first()
    return None if m is None else _row(m)


def by_uid(conn: Connection, uid: str) -> ListRow | None:
    m = conn.execute(_BY_UID, {"uid": uid}).mappings().first()
    return None if m is None else _row(m)


def with_counts(conn: Connection) -> list[tuple[ListRow, dict[str, int]]]:
    """Every list with its subscription counts per status."""
    counts: dict[int, dict[str, int]] = {}
    q = select(subscriptions.c.list_id, subscriptions.c.status, func.count()).group_by(
        subscriptions.c.list_id, subscriptions.c.status
    )
    for list_id, status, n in conn.execute(q):
        counts.setdefault(list_id, {})[status] = n
    rows = conn.execute(select(*_COLS).order_by(lists.c.slug)).mappings()
    empty = {s.value: 0 for s in SubscriptionStatus}
    return [(_row(m), {**empty, **counts.get(m["id"], {})}) for m in rows]
