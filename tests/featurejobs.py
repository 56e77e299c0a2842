"""Jobs for tests/test_job_features.py: each leaves facts on disk."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def returns(value):
    return value


def returns_object():
    return object()


def stubborn_tree(record_dir, seconds=600.0):
    """Start a grandchild in its own session; both ignore SIGTERM and record
    their pids, then sleep far past any timeout."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    code = "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
    grandchild = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    Path(record_dir, "pids").write_text(f"{os.getpid()} {grandchild.pid}\n")
    time.sleep(seconds)


def sleep(seconds, record_dir=None):
    time.sleep(seconds)
    if record_dir:
        with open(Path(record_dir, "done"), "a") as f:
            f.write(f"{os.getpid()}\n")
    return seconds


def record_run(path):
    """A recurring job: append this job's id, one line per run."""
    from supervisor import current_job

    with open(path, "a") as f:
        f.write(f"{current_job().id}\n")


def returns_when_told(record_dir, value):
    """Say it is about to return, wait until the test says go, return `value`."""
    Path(record_dir, "ready").write_text("")
    while not Path(record_dir, "go").exists():
        time.sleep(0.01)
    return value
