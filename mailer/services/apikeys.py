"""API keys for other services: shown once, stored as a hash, revocable at once."""

import hashlib
import re
import secrets

from sqlalchemy import Connection

from mailer.errors import Conflict, InvalidInput, NotFound, Unauthorized
from mailer.services.ports import Clock
from mailer.store import apikeys
from mailer.store.apikeys import ApiKeyRow
from mailer.store.db import Database

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
PREFIX = "mk_"


def key_hash(key: str) -> str:
    """Keys are 256-bit random strings, so a plain SHA-256 is a safe, fast stored form."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class ApiKeys:
    def __init__(self, db: Database, clock: Clock) -> None:
        self._db = db
        self._clock = clock

    async def create(self, name: str) -> str:
        """Create a key named ``name``; return the key itself, which is never stored."""
        if not NAME.fullmatch(name):
            raise InvalidInput(
                f"key name {name!r} must be 1-64 letters, digits, dots, dashes or underscores"
            )
        key = PREFIX + secrets.token_urlsafe(32)
        now = self._clock.now()

        def tx(conn: Connection) -> None:
            if apikeys.name_taken(conn, name):
                raise Conflict(f"an API key named {name!r} already exists")
            apikeys.create(conn, name=name, prefix=key[:8], key_hash=key_hash(key), now=now)

        await self._db.write(tx)
        return key

    async def all(self) -> list[ApiKeyRow]:
        return await self._db.read(apikeys.all_keys)

    async def revoke(self, name: str) -> None:
        if not await self._db.write(apikeys.revoke, name, self._clock.now()):
            raise NotFound(f"no active API key named {name!r}")

    async def authenticate(self, authorization: str | None) -> ApiKeyRow:
        """Return the active key named by an ``Authorization: Bearer`` header, or refuse."""
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthorized("missing or malformed bearer key")
        found = await self._db.read(apikeys.active_by_hash, key_hash(key.strip()))
        if found is None:
            raise Unauthorized("unknown or revoked key")
        return found
