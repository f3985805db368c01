"""delivery feedback: bounces and complaints per outbox row, soft-bounce scores

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 09:10:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql import sqltypes

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "bounce_score",
        sa.Column("email_hash", sa.String(length=32), nullable=False),
        sa.Column("soft_count", sa.Integer(), nullable=False),
        sa.Column("since", sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("email_hash", name=op.f("pk_bounce_score")),
    )
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.add_column(sa.Column("feedback", sqltypes.AutoString(length=16), nullable=True))
        batch_op.add_column(
            sa.Column("feedback_detail", sqltypes.AutoString(length=400), nullable=True)
        )
        batch_op.add_column(sa.Column("feedback_at", sqltypes.UTCDateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.drop_column("feedback_at")
        batch_op.drop_column("feedback_detail")
        batch_op.drop_column("feedback")
    op.drop_table("bounce_score")
