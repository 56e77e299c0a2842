"""Jobs for the rolling-upgrade test. Both the previous release and this
one run them, so they use only the API that 0.1.0 had (current_job,
checkpoint, checkpoint_data). Each records what it did under `record_dir`.
"""

import os
import time
from pathlib import Path

import psutil

from supervisor import current_job


def _log(record_dir, name, line):
    with open(Path(record_dir) / name, "a") as f:
        f.write(line + "\n")


def count(record_dir, steps=10, step_seconds=0.2):
    """Add 1..steps, one step at a time, checkpointing the running total:
    whichever servers run it, however often it is handed off, it ends with
    the same total, and writes it once."""
    job = current_job()
    runs = Path(record_dir) / f"job-{job.id}.runs"
    earlier = [int(line.split()[0]) for line in runs.read_text().splitlines()] if runs.exists() else []
    alive = [pid for pid in earlier if _alive(pid)]
    if alive:  # two runs at once, whichever releases run them: a broken invariant
        _log(record_dir, "overlaps", f"job {job.id} started in {os.getpid()} while {alive} alive")
    _log(record_dir, runs.name, f"{os.getpid()} {job.interruptions}")
    saved = job.checkpoint_data or {"step": 0, "total": 0}
    step, total = saved["step"], saved["total"]
    while step < steps:
        time.sleep(step_seconds)
        step += 1
        total += step
        job.checkpoint({"step": step, "total": total})
    _log(record_dir, f"job-{job.id}.done", f"{total} {os.getpid()}")


def _alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
