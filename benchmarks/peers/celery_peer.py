"""Celery 5 peer: Redis broker, Redis result backend, acks_late + reject_on_worker_lost, prefork pool.

Worker processes load ``worker_app`` (``-A benchmarks.peers.celery_peer:worker_app``);
the run id reaches them through ``SCBENCH_RUN_ID``.  All Redis keys of a run, broker
and results alike, live under ``scbench:<run_id>:`` (kombu/celery ``global_keyprefix``),
so cleanup is a prefix delete.
"""

from __future__ import annotations

import os

import celery
import redis
from celery import Celery

from . import common

NAME = "celery"


def _prefix(run_id: str) -> str:
    return f"scbench:{run_id}:"


def make_app(run_id: str) -> Celery:
    app = Celery("scbench", broker=common.REDIS_URL, backend=common.REDIS_URL, set_as_current=False)
    app.conf.update(
        task_acks_late=True,              # ack only after the task ran: the at-least-once setting
        task_reject_on_worker_lost=True,  # requeue if the pool child dies mid-task
        task_track_started=True,          # so the backend shows STARTED for the running job
        task_default_queue=run_id,
        broker_transport_options={"global_keyprefix": _prefix(run_id)},
        result_backend_transport_options={"global_keyprefix": _prefix(run_id)},
        broker_connection_retry_on_startup=True,
    )
    for job_name, fn in {"busy": common.busy_job, **common.JOBS}.items():
        app.task(name=f"scbench.{job_name}")(fn)
    return app


worker_app = make_app(os.environ.get("SCBENCH_RUN_ID", "idle"))


class CeleryPeer:
    name = NAME
    version = celery.__version__
    ready_pattern = r"@\S+ ready\."

    def setup(self, run_id: str) -> None:
        self.run_id = run_id
        self.app = make_app(run_id)
        self.redis = redis.Redis.from_url(common.REDIS_URL)

    def teardown(self) -> None:
        if hasattr(self, "app"):
            self.app.close()
            common.redis_cleanup(self.redis, _prefix(self.run_id) + "*", self.run_id)
            self.redis.close()

    def worker_env(self) -> dict[str, str]:
        return {"SCBENCH_RUN_ID": self.run_id}

    def worker_argv(self, name: str, concurrency: int) -> list[str]:
        return common.python_argv(
            "-m", "celery", "-A", "benchmarks.peers.celery_peer:worker_app", "worker",
            "--pool", "prefork", "--concurrency", str(concurrency),
            "--hostname", f"{name}-{self.run_id}@%h", "--queues", self.run_id, "--loglevel", "INFO")

    def throughput_workers(self, concurrency: int) -> list[tuple[str, int]]:
        return [("T", concurrency)]  # one worker, --concurrency = requested total

    def enqueue_busy(self, marker: str, seconds: float) -> str:
        return self.app.send_task("scbench.busy", args=[marker, seconds]).id

    def job_state(self, task_id: str) -> tuple[str, dict]:
        prefix = _prefix(self.run_id)
        detail = {"queue_length": self.redis.llen(prefix + self.run_id),
                  "unacked_messages": self.redis.hlen(prefix + "unacked")}
        return self.app.AsyncResult(task_id).state, detail

    def enqueue_many(self, job: str, marker: str, n: int) -> None:
        with self.app.producer_or_acquire() as producer:
            for _ in range(n):
                self.app.send_task(f"scbench.{job}", args=[marker], producer=producer)

    def all_finished(self, n: int) -> bool:
        # Everything delivered and acked (acks_late: the ack follows the task body and result store).
        prefix = _prefix(self.run_id)
        return self.redis.llen(prefix + self.run_id) == 0 and self.redis.hlen(prefix + "unacked") == 0


def takeover(grace_s: float = 5.0, observe_s: float = 120.0) -> dict:
    return common.disruption(CeleryPeer(), "takeover", grace_s, observe_s)


def crash(observe_s: float = 120.0) -> dict:
    return common.disruption(CeleryPeer(), "crash", 0.0, observe_s)


def throughput(n_jobs: int = 2000, concurrency: int = 2, job: str = "noop") -> dict:
    return common.throughput(CeleryPeer(), n_jobs, concurrency, job)
