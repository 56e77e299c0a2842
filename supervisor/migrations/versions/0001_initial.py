"""The first schema: jobs, servers and their event history.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

from supervisor.tables import Epoch, Id, LongText

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Expand/contract (docs/design.md, "Schema upgrades"): creates, removes nothing.
additive = True


def upgrade():
    op.create_table(
        "shiftchange_jobs",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("queue", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("target", sa.String(1000), nullable=False),
        sa.Column("args", LongText, nullable=False),
        sa.Column("kwargs", LongText, nullable=False),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("run_at", Epoch, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("max_attempts", sa.Integer, nullable=False),
        sa.Column("interruptions", sa.Integer, nullable=False),
        sa.Column("max_interruptions", sa.Integer, nullable=False),
        sa.Column("server_id", sa.String(32)),
        sa.Column("lease", sa.BigInteger, nullable=False),
        sa.Column("error", LongText),
        sa.Column("created_at", Epoch, nullable=False),
        sa.Column("started_at", Epoch),
        sa.Column("finished_at", Epoch),
        sqlite_autoincrement=True,
    )
    op.create_index(
        "ix_shiftchange_jobs_claim",
        "shiftchange_jobs",
        ["state", "queue", sa.text("priority DESC"), "id"],
    )
    op.create_index("ix_shiftchange_jobs_server", "shiftchange_jobs", ["server_id", "state"])
    op.create_index("ix_shiftchange_jobs_due", "shiftchange_jobs", ["state", "run_at"])
    op.create_index("ix_shiftchange_jobs_finished", "shiftchange_jobs", ["state", "finished_at"])

    op.create_table(
        "shiftchange_servers",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("pid_started_at", Epoch),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("queues", sa.Text, nullable=False),
        sa.Column("concurrency", sa.Integer, nullable=False),
        sa.Column("dead_after", Epoch, nullable=False),
        sa.Column("started_at", Epoch, nullable=False),
        sa.Column("heartbeat_at", Epoch, nullable=False),
        sa.Column("stopped_at", Epoch),
    )
    op.create_index(
        "ix_shiftchange_servers_liveness", "shiftchange_servers", ["state", "heartbeat_at"]
    )
    op.create_index("ix_shiftchange_servers_host", "shiftchange_servers", ["host", "name"])

    op.create_table(
        "shiftchange_events",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.BigInteger, nullable=False),
        sa.Column("at", Epoch, nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("server_id", sa.String(32)),
        sa.Column("detail", LongText),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_shiftchange_events_job", "shiftchange_events", ["job_id", "id"])
    op.create_index("ix_shiftchange_events_at", "shiftchange_events", ["at"])


def downgrade():
    op.drop_table("shiftchange_events")
    op.drop_table("shiftchange_servers")
    op.drop_table("shiftchange_jobs")
