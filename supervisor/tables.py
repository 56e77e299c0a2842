"""The schema, as SQLAlchemy Core tables.

Tables are prefixed ``shiftchange_`` so they can live beside an application's
own. Times are float epoch seconds from the database clock (see dbtime.py).
This is the *current* schema; migrations/versions/ holds how each version
came to be, and tests check that both agree.
"""

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Double,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    false,
    text,
)

# The prefix and the version tables' names: see revisions.py.
from supervisor.revisions import COMPAT_TABLE, JOBS_TABLE, PREFIX, VERSION_TABLE  # noqa: F401

metadata = MetaData()



class LongText(TypeDecorator):
    """Text, and MEDIUMTEXT on MySQL and MariaDB, whose TEXT stops at 64 KiB
    (arguments may be up to 1 MiB). The MySQL dialect is imported only
    there: importing it cost every command, `status` on SQLite included,
    about 50 ms."""

    impl = Text
    cache_ok = True

    def load_dialect_impl(self, dialect):
        if dialect.name in ("mysql", "mariadb"):
            from sqlalchemy.dialects.mysql import MEDIUMTEXT

            return dialect.type_descriptor(MEDIUMTEXT())
        return dialect.type_descriptor(Text())


# SQLite only aliases the rowid for a plain INTEGER primary key.
Id = BigInteger().with_variant(Integer(), "sqlite")
Epoch = Double()  # float seconds since the epoch, from the database clock

jobs = Table(
    JOBS_TABLE,
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("queue", String(200), nullable=False),
    Column("kind", String(16), nullable=False),  # "callable" or "command"
    Column("target", String(1000), nullable=False),
    Column("args", LongText, nullable=False),  # JSON array
    Column("kwargs", LongText, nullable=False),  # JSON object
    Column("priority", Integer, nullable=False, default=0),
    Column("state", String(16), nullable=False),
    Column("run_at", Epoch, nullable=False),  # not claimable before this
    Column("attempts", Integer, nullable=False, default=0),
    Column("max_attempts", Integer, nullable=False),
    Column("interruptions", Integer, nullable=False, default=0),
    Column("max_interruptions", Integer, nullable=False),
    Column("server_id", String(32)),  # set while processing
    Column("lease", BigInteger, nullable=False, default=0),  # fencing token
    Column("checkpoint", LongText),  # JSON, added by revision 0002
    Column("error", LongText),
    Column("created_at", Epoch, nullable=False),
    Column("started_at", Epoch),
    Column("finished_at", Epoch),
    # Added by revision 0004. The release of the server this job was last
    # taken back from (handoff, reap, HandOff), and until when servers of
    # that release leave it to a live server of another release; NULL when
    # that server had no release. A 0.1.0 server neither writes nor reads them.
    Column("avoid_release", String(200)),
    Column("avoid_until", Epoch),
    # Added by revision 0006; a 0.1.0 server leaves them NULL.
    Column("result", LongText),  # JSON: a callable's return value, a command's exit code and output
    Column("unique_key", String(200)),  # given by the producer
    # = unique_key while enqueued, scheduled or processing; NULL otherwise.
    Column("unique_active", String(200)),
    Column("timeout", Double),  # seconds a run may take from its claim; NULL: no limit
    # Added by revision 0007: the recurring entry and tick that enqueued it.
    Column("recurring", String(200)),
    Column("recurring_tick", Epoch),
    sqlite_autoincrement=True,  # never reuse the id of a deleted job
)
# Claims read only the `enqueued` slice of this index, in claim order, so
# their cost stays flat however many finished jobs remain in the table.
Index(
    "ix_shiftchange_jobs_claim",
    jobs.c.state,
    jobs.c.queue,
    jobs.c.priority.desc(),
    jobs.c.id,
)
Index("ix_shiftchange_jobs_server", jobs.c.server_id, jobs.c.state)
Index("ix_shiftchange_jobs_due", jobs.c.state, jobs.c.run_at)
Index("ix_shiftchange_jobs_finished", jobs.c.state, jobs.c.finished_at)
# One active job per unique key, enforced by the database (NULLs never collide).
Index("ux_shiftchange_jobs_unique_active", jobs.c.unique_active, unique=True)

servers = Table(
    PREFIX + "servers",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("pid_started_at", Epoch),  # psutil create_time, fences pid reuse
    Column("state", String(16), nullable=False),
    Column("queues", Text, nullable=False),  # JSON array
    Column("concurrency", Integer, nullable=False),
    Column("dead_after", Epoch, nullable=False),  # seconds, the server's own
    Column("started_at", Epoch, nullable=False),
    Column("heartbeat_at", Epoch, nullable=False),
    Column("stopped_at", Epoch),
    # Added by revision 0003; a 0.1.0 server leaves them at their defaults.
    Column("version", String(32)),  # shiftchange version the server runs
    Column("release", String(200)),  # the deploy release it belongs to
    # Alive but not claiming. `state` stays `running`, so an older server's
    # reaper still sees a quiet server as alive.
    Column("quiet", Boolean, nullable=False, server_default=false()),
)
Index("ix_shiftchange_servers_liveness", servers.c.state, servers.c.heartbeat_at)
Index("ix_shiftchange_servers_host", servers.c.host, servers.c.name)

events = Table(
    PREFIX + "events",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("job_id", BigInteger, nullable=False),
    Column("at", Epoch, nullable=False),
    Column("kind", String(32), nullable=False),
    Column("server_id", String(32)),
    Column("detail", LongText),
    sqlite_autoincrement=True,
)
Index("ix_shiftchange_events_job", events.c.job_id, events.c.id)
Index("ix_shiftchange_events_at", events.c.at)

# Added by revision 0003: per-queue settings; a paused queue is not claimed
# from (by servers of 0.2 and later: 0.1.0 knows nothing of it).
queues = Table(
    PREFIX + "queues",
    metadata,
    Column("name", String(200), primary_key=True),
    Column("paused", Boolean, nullable=False, server_default=false()),
    Column("changed_at", Epoch),
)

# Added by revision 0005: fleet chores (reap, promote, sweep), each due at
# `due_at` by the database clock and done by whichever server moves it on
# first. Servers of 0.2 and earlier never read it.
chores = Table(
    PREFIX + "chores",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("due_at", Epoch, nullable=False, server_default=text("0")),
    Column("runs", BigInteger, nullable=False, server_default=text("0")),  # times taken, for operators
)

# Added by revision 0007: recurring jobs. Entries added through the API
# (Queue.add_recurring); entries of a server's config are not stored here.
recurring = Table(
    PREFIX + "recurring",
    metadata,
    Column("name", String(200), primary_key=True),
    Column("definition", LongText, nullable=False),  # JSON: the entry's keys but name
    Column("added_at", Epoch, nullable=False),  # missed ticks are counted from here
    Column("changed_at", Epoch, nullable=False),
)

# One row per recurring entry and tick that was enqueued. The primary key is
# what makes a tick run exactly once however many servers run: the server
# whose insert creates the row enqueues the job in the same transaction;
# every other server's insert finds the row and does nothing.
recurring_ticks = Table(
    PREFIX + "recurring_ticks",
    metadata,
    Column("name", String(200), primary_key=True),
    Column("tick_at", Epoch, primary_key=True),  # the scheduled time, epoch seconds
    Column("job_id", BigInteger),
    Column("server_id", String(32)),  # the server that enqueued it
    Column("enqueued_at", Epoch, nullable=False),
)
