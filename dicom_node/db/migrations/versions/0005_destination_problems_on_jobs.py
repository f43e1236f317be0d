"""destination profile problems on jobs

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04 20:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable: jobs made before the checks ran before the gate were never checked there.
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("destination_problems", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("destination_problems")
