"""leases on claimed outbox rows, and the shared rate bucket

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql import sqltypes

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.add_column(sa.Column("lease_owner", sqltypes.AutoString(length=80), nullable=True))
        batch_op.add_column(sa.Column("lease_until", sqltypes.UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column("fence", sa.Integer(), nullable=False, server_default="0"))
    op.create_table(
        "rate_bucket",
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("tokens", sa.Float(), nullable=False),
        sa.Column("updated_at", sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_rate_bucket")),
    )


def downgrade() -> None:
    op.drop_table("rate_bucket")
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.drop_column("fence")
        batch_op.drop_column("lease_until")
        batch_op.drop_column("lease_owner")
