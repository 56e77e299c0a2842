"""The job features of 0.2 (issue 13): results, unique jobs, timeouts.

Additive: release 0.1.0 (schema 0002) keeps running on this schema. It
never reads or writes the new columns: a job it completes keeps a NULL
result (see docs/design.md, "What an older server does with each new
feature"). Nor does it clear `unique_active` when it finishes a job: a
producer that collides with such a finished holder clears it then.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

from supervisor.tables import Epoch, LongText

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

# Expand/contract (docs/design.md, "Schema upgrades"): this step only adds,
# so servers may apply it at start and older releases keep working.
additive = True


def upgrade():
    # A callable's return value, or a command's exit code and last output
    # lines: JSON, written by the same lease-fenced write as the outcome.
    op.add_column("shiftchange_jobs", sa.Column("result", LongText))
    # Unique jobs: the key a producer gave, and the same key only while the
    # job is enqueued, scheduled or processing. NULLs never collide (on all
    # three databases), so the unique index holds one active job per key;
    # MariaDB has no partial indexes, hence the second column.
    op.add_column("shiftchange_jobs", sa.Column("unique_key", sa.String(200)))
    op.add_column("shiftchange_jobs", sa.Column("unique_active", sa.String(200)))
    op.create_index("ux_shiftchange_jobs_unique_active", "shiftchange_jobs", ["unique_active"], unique=True)
    # Seconds a run may take from its claim; NULL: no limit.
    op.add_column("shiftchange_jobs", sa.Column("timeout", Epoch))


def downgrade():
    raise NotImplementedError("shiftchange never migrates down")
