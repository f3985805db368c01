"""Creating and listing mailing lists."""

import re
import secrets
from dataclasses import dataclass

from sqlalchemy import Connection

from mailer.domain.addresses import parse_address
from mailer.errors import Conflict, InvalidInput
from mailer.services.ports import Clock
from mailer.services.subscriptions import clean_name
from mailer.store import lists
from mailer.store.db import Database
from mailer.store.lists import ListRow

SLUG = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,62})")


@dataclass(frozen=True, slots=True)
class ListSummary:
    list: ListRow
    counts: dict[str, int]


class Lists:
    def __init__(self, db: Database, clock: Clock) -> None:
        self._db = db
        self._clock = clock

    async def create(
        self, slug: str, name: str, description: str = "", from_addr: str | None = None
    ) -> ListRow:
        """Create a list; the slug is its public handle (lower-case letters, digits, dashes)."""
        if not SLUG.fullmatch(slug):
            raise InvalidInput(
                f"list slug {slug!r} must be 1-63 lower-case letters, digits or dashes"
            )
        clean = clean_name(name)
        if clean is None:
            raise InvalidInput("the list needs a name")
        if len(description) > 2000:
            raise InvalidInput("the description is longer than 2000 characters")
        sender = parse_address(from_addr).email if from_addr else None
        now = self._clock.now()

        def tx(conn: Connection) -> ListRow:
            if lists.slug_taken(conn, slug):
                raise Conflict(f"a list named {slug!r} already exists")
            return lists.create(
                conn,
                uid=secrets.token_urlsafe(8),
                slug=slug,
                name=clean,
                description=description,
                from_addr=sender,
                now=now,
            )

        return await self._db.write(tx)

    async def summaries(self) -> list[ListSummary]:
        return [ListSummary(row, counts) for row, counts in await self._db.read(lists.with_counts)]
