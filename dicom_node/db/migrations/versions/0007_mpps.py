"""modality performed procedure steps (MPPS) as a completeness signal

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05 09:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A new table: no study has a procedure step before this migration.
    op.create_table(
        "mpps",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sop_uid", sa.String(length=64), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("calling_ae", sa.String(length=16), nullable=True),
        sa.Column("peer_host", sa.String(length=255), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("referenced", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.Column("settled_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_mpps")),
        sa.UniqueConstraint("sop_uid", name=op.f("uq_mpps_sop_uid")),
    )
    with op.batch_alter_table("mpps", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_mpps_study_uid"), ["study_uid"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("mpps", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_mpps_study_uid"))
    op.drop_table("mpps")
