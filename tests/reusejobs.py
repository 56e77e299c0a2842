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
