"""instance roles (own outputs returned, other AI outputs) and output SOP lookup

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04 21:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # NULL: an acquired instance (every row made before this migration is one).
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("role", sa.String(16), nullable=True))
    op.create_index("ix_job_outputs_sop_uid", "job_outputs", ["sop_uid"])


def downgrade() -> None:
    op.drop_index("ix_job_outputs_sop_uid", table_name="job_outputs")
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("role")
