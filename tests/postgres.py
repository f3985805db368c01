"""PostgreSQL for the tests that need several senders: a fresh database per test.

They run in the ``--db=postgresql`` pass (``make test`` runs it when ``MAILER_TEST_POSTGRES_URL``
names a database whose user may create databases; CI sets it); elsewhere they are skipped.
"""

import os
import secrets
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from sqlalchemy.engine import make_url

PG_URL = os.environ.get("MAILER_TEST_POSTGRES_URL", "")

requires_postgres = pytest.mark.skipif(
    "config.getoption('--db') != 'postgresql'",
    reason="several senders need PostgreSQL: they run in the --db=postgresql pass "
    "(make test runs it when MAILER_TEST_POSTGRES_URL is set)",
)


def _dsn(url: str) -> str:
    """A URL asyncpg itself accepts (no SQLAlchemy driver suffix)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    """The URL of a new, empty database, dropped after the test."""
    name = f"mailer_test_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(_dsn(PG_URL))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def fetch(url: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Run one statement on its own connection; return the rows as tuples."""
    conn = await asyncpg.connect(_dsn(url))
    try:
        return [tuple(r) for r in await conn.fetch(sql, *args)]
    finally:
        await conn.close()
