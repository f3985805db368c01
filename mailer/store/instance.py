"""Per-installation values generated once: the address-hash key and the instance id."""

from sqlalchemy import Connection, insert, select

from mailer.store.tables import instance_settings as t


def get_or_create(conn: Connection, name: str, make: str) -> str:
    """Return the stored value of ``name``, storing ``make`` first if there is none."""
    found = conn.execute(select(t.c.value).where(t.c.name == name)).scalar_one_or_none()
    if found is not None:
        return str(found)
    conn.execute(insert(t).values(name=name, value=make))
    return make


def get(conn: Connection, name: str) -> str | None:
    found = conn.execute(select(t.c.value).where(t.c.name == name)).scalar_one_or_none()
    return None if found is None else str(found)
