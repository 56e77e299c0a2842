"""Databases and supervisor processes for the benchmarks."""

import os
import signal
import statistics
import tempfile
from pathlib import Path

from sqlalchemy import create_engine, text

from supervisor import Queue
from supervisor.database import _driver_url
from supervisor.dbapi import command_bounds, open_reader
from supervisor.launcher import SupervisorProcess, merge, wait_for, write_config
from supervisor.logs import first_event

REPO = Path(__file__).resolve().parents[1]
SERVER_URLS = {
    "postgresql": os.environ.get("SHIFTCHANGE_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"),
    "mariadb": os.environ.get("SHIFTCHANGE_BENCH_MYSQL_URL", "mysql://root@127.0.0.1:3306/test"),
}
# Another name lets two benchmark runs share one server without dropping
# each other's database.
BENCH_DB = os.environ.get("SHIFTCHANGE_BENCH_DB", "shiftchange_bench")
BASE_SETTINGS = {
    "server": {"heartbeat_interval": "1s", "dead_after": "10s", "poll_interval": "200ms"},
    "shutdown": {"kill_after": "0s"},
    "jobs": {"allow": ["benchmarks.bjobs:*"], "max_interruptions": 1000},
    "log": {"level": "info", "format": "json"},  # numbers are read from the events' fields
}


def fresh_database(kind: str, workdir: Path) -> str:
    """An empty database of `kind` with the schema created."""
    if kind == "sqlite":
        path = workdir / "bench.db"
        for suffix in ("", "-wal", "-shm"):
            Path(str(path) + suffix).unlink(missing_ok=True)
        url = f"sqlite:///{path}"
    else:
        admin = create_engine(_driver_url(SERVER_URLS[kind]), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            force = " WITH (FORCE)" if kind == "postgresql" else ""
            conn.execute(text(f"DROP DATABASE IF EXISTS {BENCH_DB}{force}"))
            conn.execute(text(f"CREATE DATABASE {BENCH_DB}"))
        admin.dispose()
        url = _driver_url(SERVER_URLS[kind]).set(database=BENCH_DB).render_as_string(hide_password=False)
    Queue(url).close()  # creates the schema
    return url


def wait_until(predicate, timeout: float, interval: float = 0.001):
    return wait_for(predicate, timeout, interval=interval)


class StateCounter:
    """Counts a state's jobs from outside over a bare DB-API connection,
    for a benchmark that polls every millisecond: one such read costs a
    fraction of a millisecond of CPU, where Queue.counts() cost one or two
    and kept one of two cores busy beside the supervisor it was timing."""

    def __init__(self, url: str):
        self.reader = open_reader(url, command_bounds(1.0, 10.0))
        self.reader.connection.rollback()  # opening it read the schema: a snapshot to leave

    def __call__(self, state: str) -> int:
        try:
            return self.reader.fetch(f"SELECT COUNT(*) FROM shiftchange_jobs WHERE state = '{state}'")[0][0]
        finally:
            self.reader.connection.rollback()  # the next read sees what committed since

    def close(self) -> None:
        self.reader.close()


class Supervisor(SupervisorProcess):
    """A `shiftchange run` process for a benchmark, started at once."""

    def __init__(self, url: str, workdir: Path, name: str, wrapper: list[str] | None = None,
                 code: Path | None = None, **settings):
        config_path = write_config(workdir / f"{name}.yaml", url, merge(BASE_SETTINGS, settings))
        # `wrapper` stands for `python -m supervisor` to measure it (count_statements);
        # `code`: another checkout to run (a before/after on one machine at one time).
        super().__init__(name, config_path, workdir, env=dict(os.environ, PYTHONPATH=str(code or REPO)),
                         command=wrapper)
        self.start()

    def handoff_ms(self) -> float | None:
        """What the supervisor itself measured: signal -> handoff committed."""
        handed_off = first_event(self.log(), "handed_off")
        return handed_off["ms"] if handed_off else None

    def kill(self, sig=signal.SIGKILL):
        os.kill(self.pid, sig)


def read_marker(path: Path) -> list[tuple[float, int, int]]:
    """(start clock, pid, overlap flag) for each run recorded in `path`."""
    if not path.exists():
        return []
    return [(float(a), int(b), int(c)) for a, b, c in (line.split() for line in path.read_text().splitlines())]


def summary(samples: list[float], unit: str) -> dict:
    if not samples:
        return {"n": 0}
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {
        "n": len(ordered),
        f"p50_{unit}": round(statistics.median(ordered), 3),
        f"p99_{unit}": round(p99, 3),
        f"min_{unit}": round(ordered[0], 3),
        f"max_{unit}": round(ordered[-1], 3),
    }


def temp_workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="shiftchange-bench-"))
