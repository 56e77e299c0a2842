"""Job bodies for the shiftchange benchmarks (imported by the children)."""

import os
import signal
import time

import psutil

from supervisor.processes import clock


def _append(path, line):
    # O_APPEND writes this small are atomic: concurrent runs never interleave.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def spin(marker, seconds=600.0):
    """CPU-bound, ignores SIGTERM. Each run appends "<clock> <pid> <overlap>"
    to `marker`: overlap is 1 if an earlier run's process is still alive."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    started = clock()
    earlier = [int(line.split()[1]) for line in _read(marker)]
    overlap = any(_alive(pid) for pid in earlier)
    _append(marker, f"{started:.6f} {os.getpid()} {int(overlap)}")
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def noop():
    pass


def sleep_ms(ms):
    time.sleep(ms / 1000)


def _read(path):
    try:
        with open(path) as f:
            return [line for line in f.read().splitlines() if line]
    except FileNotFoundError:
        return []


def _alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def steps(record_dir, count=150, step_seconds=0.2):
    """A long checkpointing CPU-bound job: `count` steps of busy work,
    checkpointing after each and resuming after the last one saved; ignores
    SIGTERM. Each run appends "<clock> <pid> <overlap>" to job-N.runs (as
    spin does), each step "<step> <pid>" to job-N.steps, so the work redone
    is read from the job's own records."""
    from supervisor import current_job

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    job = current_job()
    runs = os.path.join(record_dir, f"job-{job.id}.runs")
    earlier = [int(line.split()[1]) for line in _read(runs)]
    _append(runs, f"{clock():.6f} {os.getpid()} {int(any(_alive(pid) for pid in earlier))}")
    first = (job.checkpoint_data or {"step": 0})["step"] + 1
    for step in range(first, count + 1):
        _append(os.path.join(record_dir, f"job-{job.id}.steps"), f"{step} {os.getpid()}")
        end = time.monotonic() + step_seconds
        while time.monotonic() < end:
            pass
        job.checkpoint({"step": step})


def count(marker, start_at, until):
    """CPU-bound work to weigh the jobs' own throughput: spin until
    `start_at` (CLOCK_BOOTTIME), then count loop turns until `until` and
    append the count to `marker`. Every job counts in the same window, so
    the sum is the work all of them got done in it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while clock() < start_at:
        pass
    turns = 0
    while clock() < until:
        turns += 1
    _append(marker, str(turns))
