"""Applying the Alembic migrations that ship inside the package."""

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection

from mailer.store.db import Database

SCRIPTS = Path(__file__).resolve().parent.parent / "migrations"


def _config(conn: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(SCRIPTS))
    if conn is not None:
        cfg.attributes["connection"] = conn
    return cfg


def head() -> str | None:
    return ScriptDirectory.from_config(_config()).get_current_head()


def current(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


async def upgrade(db: Database) -> tuple[str | None, str | None]:
    """Bring the schema to the newest revision; return (before, after)."""

    def run(conn: Connection) -> tuple[str | None, str | None]:
        before = current(conn)
        conn.commit()  # reading the revision autobegan a transaction; Alembic begins its own
        command.upgrade(_config(conn), "head")
        after = current(conn)
        conn.commit()
        return before, after

    return await db.run_outside_transaction(run)


async def revision(db: Database) -> str | None:
    return await db.read(current)
