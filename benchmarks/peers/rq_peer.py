"""RQ peer: plain ``rq worker`` processes (one job at a time each, forking a work horse per job).

RQ reads ``RQ_KEY_PREFIX`` when it is imported, so we set it before importing rq, and pass
the same value to the workers: benchmark keys never mix with a real app's ``rq:`` keys.
Each run uses its run id as queue name, job-id prefix and worker-name prefix, and cleanup
deletes exactly the keys (and shared-set members) carrying that run id.
"""

from __future__ import annotations

import os

os.environ.setdefault("RQ_KEY_PREFIX", "scbench_rq")

import redis  # noqa: E402
import rq  # noqa: E402
from rq import Queue  # noqa: E402
from rq.defaults import RQ_KEY_PREFIX  # noqa: E402  (whatever rq actually uses, if imported earlier)
from rq.job import Job  # noqa: E402

from . import common  # noqa: E402

NAME = "rq"


class RqPeer:
    name = NAME
    version = rq.__version__
    ready_pattern = r"Listening on"

    def setup(self, run_id: str) -> None:
        self.run_id = run_id
        self.redis = redis.Redis.from_url(common.REDIS_URL)
        self.queue = Queue(run_id, connection=self.redis)

    def teardown(self) -> None:
        if hasattr(self, "redis"):
            shared = (f"{RQ_KEY_PREFIX}:workers", f"{RQ_KEY_PREFIX}:queues")
            common.redis_cleanup(self.redis, f"{RQ_KEY_PREFIX}:*", self.run_id, shared)
            # Maintenance lock without a run id; it sits under our benchmark-only prefix.
            self.redis.delete(f"{RQ_KEY_PREFIX}:clean_groups")
            self.redis.close()

    def worker_env(self) -> dict[str, str]:
        return {"RQ_KEY_PREFIX": RQ_KEY_PREFIX}

    def worker_argv(self, name: str, concurrency: int) -> list[str]:
        # An rq worker runs one job at a time; `concurrency` is met with more workers.
        return common.python_argv("-m", "rq.cli", "worker", "--url", common.REDIS_URL,
                                  "--name", f"{self.run_id}-{name}", self.run_id)

    def throughput_workers(self, concurrency: int) -> list[tuple[str, int]]:
        return [(f"T{i}", 1) for i in range(concurrency)]

    def enqueue_busy(self, marker: str, seconds: float) -> str:
        job = self.queue.enqueue(common.busy_job, marker, seconds,
                                 job_id=f"{self.run_id}-busy", job_timeout=3600)
        return job.id

    def job_state(self, job_id: str) -> tuple[str, dict]:
        # cleanup=False: observing must not trigger RQ's own registry maintenance.
        detail = {"queued": self.queue.count,
                  "started_registry": self.queue.started_job_registry.get_job_count(cleanup=False),
                  "failed_registry": self.queue.failed_job_registry.get_job_count(cleanup=False)}
        status = Job.fetch(job_id, connection=self.redis).get_status()
        return str(getattr(status, "value", status)), detail

    def enqueue_many(self, job: str, marker: str, n: int) -> None:
        func = common.JOBS[job]
        datas = [Queue.prepare_data(func, args=(marker,), job_id=f"{self.run_id}-{i}") for i in range(n)]
        self.queue.enqueue_many(datas)

    def all_finished(self, n: int) -> bool:
        return (self.queue.count == 0
                and self.queue.started_job_registry.get_job_count(cleanup=False) == 0)


def takeover(grace_s: float = 5.0, observe_s: float = 120.0) -> dict:
    return common.disruption(RqPeer(), "takeover", grace_s, observe_s)


def crash(observe_s: float = 120.0) -> dict:
    return common.disruption(RqPeer(), "crash", 0.0, observe_s)


def throughput(n_jobs: int = 2000, concurrency: int = 2, job: str = "noop") -> dict:
    return common.throughput(RqPeer(), n_jobs, concurrency, job)
