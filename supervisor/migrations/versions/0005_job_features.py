"""The job features of 0.2 (issue 13): results.

Additive: release 0.1.0 (schema 0002) keeps running on this schema. It
never reads or writes the new columns: a job it completes keeps a NULL
result (see docs/design.md, "What an older server does with each new
feature").

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

from supervisor.tables import LongText

revision = "0005"
# 0004 (releases) is on another branch; until it is merged this chains from
# 0003, and the merge sets it to "0004".
down_revision = "0003"
branch_labels = None
depends_on = None

# Expand/contract (docs/design.md, "Schema upgrades"): this step only adds,
# so servers may apply it at start and older releases keep working.
additive = True


def upgrade():
    # A callable's return value, or a command's exit code and last output
    # lines: JSON, written by the same lease-fenced write as the outcome.
    op.add_column("shiftchange_jobs", sa.Column("result", LongText))


def downgrade():
    raise NotImplementedError("shiftchange never migrates down")
