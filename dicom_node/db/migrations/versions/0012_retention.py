"""retention: when a study's files were removed by the retention rule ([retention])

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07 10:20:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # NULL: the files are on disk (every row made before this migration).
    with op.batch_alter_table("studies") as batch:
        batch.add_column(sa.Column("purged_at", sa.Float(), nullable=True))
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("purged_at", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("purged_at")
    with op.batch_alter_table("studies") as batch:
        batch.drop_column("purged_at")
