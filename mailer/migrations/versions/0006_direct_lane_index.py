"""a partial index over the direct lane's queued rows: its claim no longer reads the campaigns'

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-25 04:10:00.000000

The direct lane (confirmation requests, previews) is claimed before every campaign batch. Its
index ``(status, kind, next_attempt_at)`` let PostgreSQL, with statistics that had not caught
up with a fan-out, scan every queued campaign row and filter ``kind`` in the heap: about 1 ms
per claim at 20,000 queued, to find nothing. The partial index holds only direct-lane rows, so
the claim reads at most what it takes. The predicate is a copy: a migration keeps the text it
was written with, whatever ``mailer.models`` says later.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DIRECT_LANE_DUE = "status = 'queued' AND kind IN ('confirm', 'preview')"


def upgrade() -> None:
    op.create_index(
        "ix_outbox_direct_due",
        "outbox",
        ["next_attempt_at", "id"],
        postgresql_where=sa.text(DIRECT_LANE_DUE),
        sqlite_where=sa.text(DIRECT_LANE_DUE),
    )


def downgrade() -> None:
    op.drop_index("ix_outbox_direct_due", table_name="outbox")
