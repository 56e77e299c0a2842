"""Jobs remember the release of the server they were last taken back from,
and until when servers of that release leave them to another release: a
rolling deploy then moves each job once (docs/design.md, "Releases and
rolling deploys").

Additive: release 0.1.0 (schema 0002) keeps running on this schema. It
never writes these columns (its handoffs and reaps leave them as they
were) and never reads them, so it ignores the preference and claims such
a job like any other.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

from supervisor.tables import Epoch

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# Expand/contract (docs/design.md, "Schema upgrades"): this step only adds
# nullable columns, so servers may apply it at start and older releases keep
# working.
additive = True


def upgrade():
    op.add_column("shiftchange_jobs", sa.Column("avoid_release", sa.String(200)))
    op.add_column("shiftchange_jobs", sa.Column("avoid_until", Epoch))


def downgrade():
    raise NotImplementedError("shiftchange never migrates down")
