"""Fleet chores: one row per housekeeping task the fleet needs once per
interval (reaping dead servers, promoting due scheduled jobs, sweeping
finished ones), with the database time at which it is next due. The server
whose UPDATE moves `due_at` forward does the chore; every other server's
UPDATE matches no row (see docs/design.md, "Fleet chores").

Additive: older servers never read the table and keep reaping and
promoting on every heartbeat themselves, which stays correct (both verbs
are idempotent and safe to run concurrently). Rows are created by the
servers that use them, so the table starts empty.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

from supervisor.tables import Epoch

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# Expand/contract (docs/design.md, "Schema upgrades"): this step only adds.
additive = True


def upgrade():
    op.create_table(
        "shiftchange_chores",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("due_at", Epoch, nullable=False, server_default=sa.text("0")),
        sa.Column("runs", sa.BigInteger, nullable=False, server_default=sa.text("0")),
    )


def downgrade():
    raise NotImplementedError("shiftchange never migrates down")
