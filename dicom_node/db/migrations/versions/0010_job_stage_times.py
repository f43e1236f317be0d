"""Seconds each stage of a job's run took (inference time per pipeline and stage, /metrics)

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05 22:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "job_stage_times",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_fk", sa.Integer(), nullable=False),
        sa.Column("stage", sa.String(length=64), nullable=False),
        sa.Column("seconds", sa.Float(), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["job_fk"], ["jobs.id"], name=op.f("fk_job_stage_times_job_fk_jobs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_stage_times")),
    )
    with op.batch_alter_table("job_stage_times", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_job_stage_times_job_fk"), ["job_fk"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("job_stage_times", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_job_stage_times_job_fk"))
    op.drop_table("job_stage_times")
