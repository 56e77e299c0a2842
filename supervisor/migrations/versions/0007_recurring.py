"""Recurring jobs (issue 13): the entries added through the API, one row
per enqueued tick, and on each job the entry and tick that enqueued it.

The primary key (name, tick_at) of shiftchange_recurring_ticks is what
makes each tick run exactly once across the fleet: the server whose insert
creates the row enqueues the job in the same transaction (docs/design.md,
"Recurring jobs: exactly once per tick").

Additive: older servers never read the new tables or columns, and run no
recurring entries; jobs they insert leave the two columns NULL.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

from supervisor.tables import Epoch, LongText

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

# Expand/contract (docs/design.md, "Schema upgrades"): this step only adds.
additive = True


def upgrade():
    op.create_table(
        "shiftchange_recurring",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("definition", LongText, nullable=False),
        sa.Column("added_at", Epoch, nullable=False),
        sa.Column("changed_at", Epoch, nullable=False),
    )
    op.create_table(
        "shiftchange_recurring_ticks",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("tick_at", Epoch, primary_key=True),
        sa.Column("job_id", sa.BigInteger),
        sa.Column("server_id", sa.String(32)),
        sa.Column("enqueued_at", Epoch, nullable=False),
    )
    op.add_column("shiftchange_jobs", sa.Column("recurring", sa.String(200)))
    op.add_column("shiftchange_jobs", sa.Column("recurring_tick", Epoch))


def downgrade():
    raise NotImplementedError("shiftchange never migrates down")
