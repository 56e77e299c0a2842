"""What `shiftchange status` shows, as plain SQL and the records made of
its rows: the servers with their jobs in flight, job counts by queue and
state, the paused queues, and the database clock that heartbeat ages are
computed from.

One source for both ways of reading it: `status` runs these statements on
a bare DB-API connection (supervisor/dbapi.py: no SQLAlchemy import, issue
11), Storage runs them through SQLAlchemy's exec_driver_sql. Each function
takes `fetch(sql) -> rows`. The statements have no parameters, so they
read the same under every driver's parameter style.
"""

from collections import namedtuple
from dataclasses import dataclass

from supervisor.records import JOB_STATES, Server

# The database's current time in epoch seconds (supervisor/dbtime.py makes
# it SQLAlchemy's db_now()).
NOW_SQL = {
    # clock_timestamp(), not now(): now() is frozen at transaction start.
    "postgresql": "extract(epoch from clock_timestamp())::float8",
    "mysql": "(UNIX_TIMESTAMP(SYSDATE(6)) + 0e0)",
    "sqlite": "((julianday('now') - 2440587.5) * 86400.0)",
}
NOW_SQL["mariadb"] = NOW_SQL["mysql"]

SERVER_COLUMNS = ("id", "name", "host", "pid", "pid_started_at", "state", "queues", "concurrency", "dead_after",
                  "started_at", "heartbeat_at", "stopped_at", "version", "release", "quiet")
ServerRow = namedtuple("ServerRow", SERVER_COLUMNS)  # what Server.from_row reads
# Qualified names: `release` is a reserved word in MySQL, but not after a dot.
SERVERS_SQL = (f"SELECT {', '.join('s.' + name for name in SERVER_COLUMNS)} "
               "FROM shiftchange_servers s ORDER BY s.started_at DESC")
IN_FLIGHT_SQL = "SELECT id, server_id FROM shiftchange_jobs WHERE state = 'processing' ORDER BY id"
COUNTS_SQL = "SELECT queue, state, COUNT(*) FROM shiftchange_jobs GROUP BY queue, state"
PAUSED_SQL = "SELECT name FROM shiftchange_queues WHERE paused"


def read_now(fetch, dialect: str) -> float:
    """The database clock, in epoch seconds; `dialect` is SQLAlchemy's name."""
    return fetch(f"SELECT {NOW_SQL[dialect]}")[0][0]


def read_servers(fetch, dialect: str) -> list[Server]:
    """Every server, newest first, with the ids of its jobs in flight and
    its heartbeat's age by the database clock."""
    now = read_now(fetch, dialect)
    rows = fetch(SERVERS_SQL)
    in_flight: dict[str, list[int]] = {}
    for job_id, server_id in fetch(IN_FLIGHT_SQL):
        in_flight.setdefault(server_id, []).append(job_id)
    return [Server.from_row(ServerRow(*row), now, in_flight.get(row[0], [])) for row in rows]


def read_counts(fetch) -> dict[str, dict[str, int]]:
    """Job counts by queue and state, every state listed."""
    by_queue: dict[str, dict[str, int]] = {}
    for queue, state, count in fetch(COUNTS_SQL):
        by_queue.setdefault(queue, dict.fromkeys(JOB_STATES, 0))[state] = count
    return by_queue


def read_paused(fetch) -> set[str]:
    """The names of the paused queues."""
    return {name for (name,) in fetch(PAUSED_SQL)}


def totals(by_queue: dict[str, dict[str, int]]) -> dict[str, int]:
    """Job counts by state over all queues, every state listed."""
    summed = dict.fromkeys(JOB_STATES, 0)
    for by_state in by_queue.values():
        for state, count in by_state.items():
            summed[state] += count
    return summed


@dataclass(frozen=True)
class Snapshot:
    servers: list[Server]
    queues: dict[str, dict[str, int]]  # job counts by queue and state
    paused: set[str]

    @property
    def counts(self) -> dict[str, int]:
        return totals(self.queues)

    def to_dict(self, database: str) -> dict:
        """`status --json` (a contract); `database`: the masked URL."""
        return {"servers": [s.to_dict() for s in self.servers], "counts": self.counts, "queues": self.queues,
                "database": database, "paused": sorted(self.paused)}


def read_snapshot(fetch, dialect: str) -> Snapshot:
    return Snapshot(servers=read_servers(fetch, dialect), queues=read_counts(fetch), paused=read_paused(fetch))
