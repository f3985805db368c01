"""First-run set-up: the var/ directory, the signing keys, the schema and instance secrets."""

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Connection

from mailer.config import Settings
from mailer.errors import ConfigError, NotInitialised
from mailer.store import instance, migrate
from mailer.store.db import Database

HASH_KEY = "address_hash_key"
INSTANCE_ID = "instance_id"


@dataclass(frozen=True, slots=True)
class InitReport:
    created_key_file: bool
    revision_before: str | None
    revision_after: str | None


def _write_private(path: Path, content: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(content)


async def initialise(settings: Settings, db: Database) -> InitReport:
    """Create what a new installation needs; safe to run again (nothing is replaced)."""
    settings.var_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    created = False
    if not settings.secret_keys and not settings.secret_keys_file.exists():
        _write_private(settings.secret_keys_file, secrets.token_urlsafe(32) + "\n")
        created = True
    before, after = await migrate.upgrade(db)

    def seed(conn: Connection) -> None:
        instance.get_or_create(conn, HASH_KEY, secrets.token_hex(32))
        instance.get_or_create(conn, INSTANCE_ID, secrets.token_hex(6))

    await db.write(seed)
    return InitReport(created, before, after)


def secret_keys(settings: Settings) -> list[str]:
    """The signing keys: ``MAILER_SECRET_KEYS`` if set, else ``var/secret_keys`` (first signs)."""
    if settings.secret_keys:
        return [k.get_secret_value() for k in settings.secret_keys]
    path = settings.secret_keys_file
    if not path.exists():
        raise NotInitialised("no secret key: set MAILER_SECRET_KEYS or run `mailer init`")
    if path.stat().st_mode & 0o077:
        raise ConfigError(f"{path} must be readable by its owner only (chmod 600)")
    keys = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not keys:
        raise ConfigError(f"{path} holds no key")
    return keys


@dataclass(frozen=True, slots=True)
class InstanceSecrets:
    hash_key: bytes
    instance_id: str


async def instance_secrets(db: Database) -> InstanceSecrets:
    """Check the schema is current and read the per-installation values."""
    current = await migrate.revision(db)
    if current is None:
        raise NotInitialised("the database has no schema yet: run `mailer init`")
    if current != migrate.head():
        raise NotInitialised("the database schema is out of date: run `mailer db upgrade`")

    def read(conn: Connection) -> tuple[str | None, str | None]:
        return instance.get(conn, HASH_KEY), instance.get(conn, INSTANCE_ID)

    hash_key, instance_id = await db.read(read)
    if hash_key is None or instance_id is None:
        raise NotInitialised("the database is not initialised: run `mailer init`")
    return InstanceSecrets(bytes.fromhex(hash_key), instance_id)
