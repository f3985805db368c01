"""Checking the consent ledger's hash chain."""

from collections.abc import Iterator
from dataclasses import dataclass

from sqlalchemy import Connection

from mailer.domain.ledger import Break, Entry, first_break
from mailer.store import ledger
from mailer.store.db import Database


@dataclass(frozen=True, slots=True)
class Verification:
    entries: int
    problem: Break | None


def _check(conn: Connection) -> Verification:
    seen = [0]

    def rows() -> Iterator[tuple[Entry, str, str | None, str | None]]:
        for record in ledger.chain(conn):
            seen[0] += 1
            yield record.entry, record.hash, record.ip, record.user_agent

    problem = first_break(rows())
    return Verification(seen[0], problem)


async def verify(db: Database) -> Verification:
    """Walk the whole chain in order; report the first broken link, if any."""
    return await db.read(_check)
