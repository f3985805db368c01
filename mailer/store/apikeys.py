"""API keys: only a SHA-256 of each key is stored."""

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, bindparam, insert, select, update

from mailer.store.tables import api_keys as t


@dataclass(frozen=True, slots=True)
class ApiKeyRow:
    id: int
    name: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None


_COLS = (t.c.id, t.c.name, t.c.prefix, t.c.created_at, t.c.revoked_at)


def name_taken(conn: Connection, name: str) -> bool:
    return conn.execute(select(t.c.id).where(t.c.name == name)).first() is not None


def create(conn: Connection, *, name: str, prefix: str, key_hash: str, now: datetime) -> None:
    conn.execute(insert(t).values(name=name, prefix=prefix, key_hash=key_hash, created_at=now))


_ACTIVE = select(*_COLS).where(t.c.key_hash == bindparam("h"), t.c.revoked_at.is_(None))


def active_by_hash(conn: Connection, key_hash: str) -> ApiKeyRow | None:
    r = conn.execute(_ACTIVE, {"h": key_hash}).first()
    return None if r is None else ApiKeyRow(*r)


def all_keys(conn: Connection) -> list[ApiKeyRow]:
    return [ApiKeyRow(*r) for r in conn.execute(select(*_COLS).order_by(t.c.name))]


def revoke(conn: Connection, name: str, now: datetime) -> bool:
    result = conn.execute(
        update(t).where(t.c.name == name, t.c.revoked_at.is_(None)).values(revoked_at=now)
    )
    return bool(result.rowcount)
