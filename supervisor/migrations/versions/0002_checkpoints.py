"""Checkpoints: a job's saved progress, so a handed-off job resumes.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

from supervisor.tables import LongText

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# Expand/contract (docs/design.md, "Schema upgrades"): only adds a column.
additive = True


def upgrade():
    op.add_column("shiftchange_jobs", sa.Column("checkpoint", LongText))


def downgrade():
    with op.batch_alter_table("shiftchange_jobs") as batch:
        batch.drop_column("checkpoint")
