"""The clock leases and the shared rate bucket are measured on: the database server's own."""

from datetime import datetime

from sqlalchemy import Connection, func, select

_CLOCK = select(func.clock_timestamp())


def database_now(conn: Connection, fallback: datetime) -> datetime:
    """PostgreSQL's clock (one clock for every sender, whatever machine it runs on).

    SQLite serves one sending process, whose own clock is ``fallback``.
    """
    if conn.dialect.name != "postgresql":
        return fallback
    now: datetime = conn.execute(_CLOCK).scalar_one()
    return now
