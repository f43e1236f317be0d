"""jobs.urgency: the rule's urgency (0 normal, 1 urgent); queued jobs are taken most urgent first

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07 16:40:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Every job made before this migration is of normal urgency (what a rule without
    # ``urgency`` says).
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("urgency", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("urgency")
