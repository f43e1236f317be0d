"""instances.last_seen_at: when an identical copy of the instance last arrived (a duplicate)

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07 13:20:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # NULL: no duplicate has arrived since the row was made (every row before this migration).
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("last_seen_at", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("last_seen_at")
