"""priors in policies: the rule's priors frozen on the job, and the priors a job uses

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05 02:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # No job asked for priors before this migration: the new column is NULL for them all.
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("priors", sa.JSON(), nullable=True))
    op.create_table(
        "job_priors",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_fk", sa.Integer(), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("series_uid", sa.String(length=64), nullable=False),
        sa.Column("study_date", sa.String(length=8), nullable=True),
        sa.Column("archive", sa.String(length=64), nullable=False),
        sa.Column("retrieved_at", sa.Float(), nullable=True),
        sa.Column("sop_count", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["job_fk"], ["jobs.id"], name=op.f("fk_job_priors_job_fk_jobs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_priors")),
        sa.UniqueConstraint("job_fk", "series_uid", name="uq_job_priors_job_fk_series_uid"),
    )
    with op.batch_alter_table("job_priors", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_job_priors_job_fk"), ["job_fk"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("job_priors", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_job_priors_job_fk"))
    op.drop_table("job_priors")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("priors")
