"""Jobs for tests/test_reuse.py: each tells which process ran it."""

import os
import time
from pathlib import Path

from supervisor import HandOff, current_job

runs_here = 0  # module state: shared by the jobs a reused process runs
_kept = []  # memory a job leaks on purpose


def whoami():
    """(pid, how many jobs this process has run, this one included)."""
    global runs_here
    runs_here += 1
    return [os.getpid(), runs_here]


def leak(mib):
    """Keep `mib` MiB alive after the job (a leak), touched so it is resident."""
    _kept.append(b"x" * (mib * 2**20))
    return os.getpid()


def record_and_sleep(record_dir, seconds=600.0):
    """Write our pid, then sleep, deaf to the stop notice."""
    Path(record_dir, f"{current_job().id}.pid").write_text(str(os.getpid()))
    time.sleep(seconds)


def record_and_wait_for_stop(record_dir):
    """Write our pid, wait for the stop notice, hand off."""
    Path(record_dir, f"{current_job().id}.pid").write_text(str(os.getpid()))
    current_job().wait_stopping(600)
    raise HandOff("stop notice seen")


def run_when_told(record_dir):
    """Append our pid to <id>.runs, then return once `go` exists (deaf to
    the stop notice); the pid."""
    record = Path(record_dir, f"{current_job().id}.runs")
    with record.open("a") as f:
        f.write(f"{os.getpid()}\n")
    while not Path(record_dir, "go").exists():
        time.sleep(0.01)
    return os.getpid()


def count_run(record_dir):
    """Append our pid to <id>.runs; the pid."""
    with Path(record_dir, f"{current_job().id}.runs").open("a") as f:
        f.write(f"{os.getpid()}\n")
    return os.getpid()
