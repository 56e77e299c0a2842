"""procrastinate 3 peer: PostgreSQL via psycopg 3, ``procrastinate worker`` processes.

Each run applies procrastinate's schema inside a fresh PostgreSQL schema named after
the run id (connections set ``search_path`` to it) and drops it with CASCADE at the end,
so nothing collides with other tables in the ``test`` database.  Worker processes load
``worker_app``; the run id reaches them through ``SCBENCH_RUN_ID``.
"""

from __future__ import annotations

import os

import procrastinate
import psycopg
from procrastinate.schema import SchemaManager

from . import common

NAME = "procrastinate"


def make_app(schema: str) -> procrastinate.App:
    connector = procrastinate.PsycopgConnector(
        conninfo=common.PG_DSN, kwargs={"options": f"-c search_path={schema}"})
    app = procrastinate.App(connector=connector)
    for job_name, fn in {"busy": common.busy_job, **common.JOBS}.items():
        app.task(name=job_name, queue=schema)(fn)  # queue = run id: NOTIFY channels are database-wide
    return app


def _drop_schema(schema: str) -> None:
    """Drop the run's schema over a fresh connection, retrying briefly (PostgreSQL may be restarting)."""

    def attempt() -> bool:
        try:
            with psycopg.connect(common.PG_DSN, autocommit=True, connect_timeout=5) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            return True
        except psycopg.OperationalError:
            return False

    if not common.wait_until(attempt, 30.0, interval_s=1.0):
        raise RuntimeError(f"could not drop schema {schema!r}; drop it by hand")


worker_app = make_app(os.environ.get("SCBENCH_RUN_ID", "public"))


class ProcrastinatePeer:
    name = NAME
    version = procrastinate.__version__
    ready_pattern = r"Starting worker on"

    def setup(self, run_id: str) -> None:
        self.run_id = run_id
        self.conn = psycopg.connect(common.PG_DSN, autocommit=True)
        self.conn.execute(f'CREATE SCHEMA "{run_id}"')
        self.conn.execute(f'SET search_path TO "{run_id}"')
        self.conn.execute(SchemaManager.get_schema())  # no params: sent as one multi-statement script
        self.app = make_app(run_id)
        self.app.open()

    def teardown(self) -> None:
        if hasattr(self, "app"):
            self.app.close()
        if hasattr(self, "conn"):
            self.conn.close()
            _drop_schema(self.run_id)

    def worker_env(self) -> dict[str, str]:
        return {"SCBENCH_RUN_ID": self.run_id}

    def worker_argv(self, name: str, concurrency: int) -> list[str]:
        return common.python_argv(
            "-m", "procrastinate", "--app", "benchmarks.peers.procrastinate_peer.worker_app",
            "--log-level", "info", "worker", "--name", name, "--queues", self.run_id,
            "--concurrency", str(concurrency))

    def throughput_workers(self, concurrency: int) -> list[tuple[str, int]]:
        return [("T", concurrency)]  # one worker, --concurrency = requested total

    def enqueue_busy(self, marker: str, seconds: float) -> int:
        return self.app.tasks["busy"].defer(marker_path=marker, seconds=seconds)

    def job_state(self, job_id: int) -> tuple[str, dict]:
        status = self.conn.execute("SELECT status FROM procrastinate_jobs WHERE id = %s", (job_id,)).fetchone()[0]
        counts = dict(self.conn.execute("SELECT status, count(*) FROM procrastinate_jobs GROUP BY status").fetchall())
        workers = self.conn.execute("SELECT count(*) FROM procrastinate_workers").fetchone()[0]
        return status, {"jobs_by_status": counts, "registered_workers": workers}

    def enqueue_many(self, job: str, marker: str, n: int) -> None:
        self.app.tasks[job].batch_defer(*({"marker_path": marker} for _ in range(n)))

    def all_finished(self, n: int) -> bool:
        row = self.conn.execute(
            "SELECT count(*) FROM procrastinate_jobs WHERE status NOT IN ('todo', 'doing')").fetchone()
        return row[0] >= n


def takeover(grace_s: float = 5.0, observe_s: float = 120.0) -> dict:
    return common.disruption(ProcrastinatePeer(), "takeover", grace_s, observe_s)


def crash(observe_s: float = 120.0) -> dict:
    return common.disruption(ProcrastinatePeer(), "crash", 0.0, observe_s)


def throughput(n_jobs: int = 2000, concurrency: int = 2, job: str = "noop") -> dict:
    return common.throughput(ProcrastinatePeer(), n_jobs, concurrency, job)
