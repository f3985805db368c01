"""The Alembic migrations build exactly the schema the models describe."""

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, text

from mailer.config import Settings
from mailer.store import migrate
from mailer.store.tables import metadata
from tests.conftest import init_db, make_settings
from tests.databases import SQLITE, active


async def test_migrated_schema_matches_models(tmp_path: Path) -> None:
    """After `init` on an empty database, autogenerate finds no difference from the models."""
    db = tmp_path / "mailer.db"
    settings: Settings = make_settings(tmp_path, database_url=active.empty(db))
    await init_db(settings)
    engine = create_engine(active.sync_url(db))
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, metadata) == []
        assert migrate.current(conn) == migrate.head()
        if active.name == SQLITE:
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    engine.dispose()


async def test_init_twice_keeps_instance_secrets(tmp_path: Path) -> None:
    """Running init again changes neither the address-hash key nor the instance id."""
    settings = make_settings(tmp_path)
    await init_db(settings)
    engine = create_engine(active.sync_url(tmp_path / "mailer.db"))
    read = text("SELECT name, value FROM instance_setting ORDER BY name")
    with engine.connect() as conn:
        first = conn.execute(read).all()
    await init_db(settings)
    with engine.connect() as conn:
        assert conn.execute(read).all() == first
    assert [name for name, _ in first] == ["address_hash_key", "instance_id"]
    engine.dispose()
