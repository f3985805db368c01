"""Privacy-policy versions."""

from dataclasses import dataclass
from datetime import date, datetime

from sqlalchemy import Connection, bindparam, insert, select

from mailer.store.tables import policy_versions as t


@dataclass(frozen=True, slots=True)
class PolicyRow:
    id: int
    version: str
    effective_on: date
    summary: str
    url: str | None
    published_at: datetime
    campaign_id: int | None


_COLS = (
    t.c.id,
    t.c.version,
    t.c.effective_on,
    t.c.summary,
    t.c.url,
    t.c.published_at,
    t.c.campaign_id,
)
_IN_FORCE = (
    select(t.c.version)
    .where(t.c.effective_on <= bindparam("today"))
    .order_by(t.c.effective_on.desc(), t.c.id.desc())
    .limit(1)
)


def version_taken(conn: Connection, version: str) -> bool:
    return conn.execute(select(t.c.id).where(t.c.version == version)).first() is not None


def create(
    conn: Connection,
    *,
    version: str,
    effective_on: date,
    summary: str,
    url: str | None,
    campaign_id: int | None,
    now: datetime,
) -> int:
    values = {
        "version": version,
        "effective_on": effective_on,
        "summary": summary,
        "url": url,
        "published_at": now,
        "campaign_id": campaign_id,
    }
    key = conn.execute(insert(t), values).inserted_primary_key
    assert key is not None
    return int(key[0])


def history(conn: Connection) -> list[PolicyRow]:
    """Every version, oldest first."""
    rows = conn.execute(select(*_COLS).order_by(t.c.effective_on, t.c.id))
    return [PolicyRow(*r) for r in rows]


def in_force(conn: Connection, today: date) -> str | None:
    """The version in force on ``today``: the latest whose effective date has come."""
    return conn.execute(_IN_FORCE, {"today": today}).scalar_one_or_none()
