"""storage commitment transactions

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26 04:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A new table: existing deliveries have no transactions, so no defaults are needed.
    op.create_table(
        "storage_commitments",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("delivery_fk", sa.Integer(), nullable=False),
        sa.Column("attempt_fk", sa.Integer(), nullable=True),
        sa.Column("transaction_uid", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("references", sa.JSON(), nullable=False),
        sa.Column("requested_at", sa.Float(), nullable=False),
        sa.Column("deadline", sa.Float(), nullable=True),
        sa.Column("reported_at", sa.Float(), nullable=True),
        sa.Column("reported_by", sa.String(length=16), nullable=True),
        sa.Column("reported_via", sa.String(length=16), nullable=True),
        sa.Column("committed", sa.Integer(), nullable=True),
        sa.Column("failed", sa.Integer(), nullable=True),
        sa.Column("failures", sa.JSON(), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["attempt_fk"],
            ["delivery_attempts.id"],
            name=op.f("fk_storage_commitments_attempt_fk_delivery_attempts"),
        ),
        sa.ForeignKeyConstraint(
            ["delivery_fk"],
            ["deliveries.id"],
            name=op.f("fk_storage_commitments_delivery_fk_deliveries"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_storage_commitments")),
        sa.UniqueConstraint("transaction_uid", name=op.f("uq_storage_commitments_transaction_uid")),
    )
    with op.batch_alter_table("storage_commitments", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_storage_commitments_delivery_fk"), ["delivery_fk"], unique=False)
        batch_op.create_index(batch_op.f("ix_storage_commitments_state"), ["state"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("storage_commitments", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_storage_commitments_state"))
        batch_op.drop_index(batch_op.f("ix_storage_commitments_delivery_fk"))

    op.drop_table("storage_commitments")
