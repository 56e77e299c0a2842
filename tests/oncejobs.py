"""Jobs for tests/test_finished_once.py. Each appends to files under
`record_dir` when its code starts and when it completes, so the tests count
completions from the job's side, not from the queue's events."""

import os
import time
from pathlib import Path

from supervisor import current_job


def _log(record_dir, name, line):
    with open(Path(record_dir) / name, "a") as f:
        f.write(line + "\n")


def work(record_dir, seconds):
    job = current_job()
    _log(record_dir, f"job-{job.id}.started", str(os.getpid()))
    time.sleep(seconds)
    _log(record_dir, f"job-{job.id}.completed", str(os.getpid()))


def work_then_fail(record_dir, seconds):
    job = current_job()
    _log(record_dir, f"job-{job.id}.started", str(os.getpid()))
    time.sleep(seconds)
    _log(record_dir, f"job-{job.id}.completed", str(os.getpid()))
    raise RuntimeError(f"job {job.id} fails on purpose after its work")


def mark(record_dir):
    """A sentinel: claimed after any job enqueued before it."""
    _log(record_dir, f"job-{current_job().id}.completed", str(os.getpid()))
