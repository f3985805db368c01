"""Alembic environment: always driven programmatically with a live connection."""

from alembic import context
from sqlalchemy import Connection

from mailer.store.tables import metadata

connection: Connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
