"""Servers record their shiftchange version, release and quiet flag; a
table of per-queue settings (paused).

Additive: release 0.1.0 (schema 0002) keeps running on this schema. The
rows it inserts into shiftchange_servers get the defaults (NULL version and
release, quiet false), and it never reads shiftchange_queues.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

from supervisor.tables import Epoch

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# Expand/contract (docs/design.md, "Schema upgrades"): this step only adds,
# so servers may apply it at start and older releases keep working.
additive = True


def upgrade():
    op.add_column("shiftchange_servers", sa.Column("version", sa.String(32)))
    op.add_column("shiftchange_servers", sa.Column("release", sa.String(200)))
    op.add_column(
        "shiftchange_servers",
        sa.Column("quiet", sa.Boolean, nullable=False, server_default=sa.false()),
    )
    op.create_table(
        "shiftchange_queues",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("paused", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("changed_at", Epoch),
    )


def downgrade():
    raise NotImplementedError("shiftchange never migrates down")
