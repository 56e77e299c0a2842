"""Job functions the end-to-end tests enqueue (tests/ is on the children's
PYTHONPATH). Each records what it did in files under `record_dir`, so tests
read facts from disk instead of guessing from timing.

A run's record line: "<event> <pid> <monotonic time> <extra>". A run that
starts while an earlier run of the same job is still alive writes
"overlap", which the tests treat as a broken invariant.
"""

import ctypes
import os
import signal
import time
from pathlib import Path

import psutil

from supervisor import HandOff, current_job


def _log(record_dir, name, line):
    with open(Path(record_dir) / name, "a") as f:
        f.write(line + "\n")
        f.flush()


def _start(record_dir):
    """Record this run's start, and whether an earlier run is still alive."""
    job = current_job()
    path = Path(record_dir) / f"job-{job.id}.runs"
    earlier = path.read_text().split() if path.exists() else []
    alive = [pid for pid in earlier if _alive(int(pid))]
    if alive:
        _log(record_dir, "overlaps", f"job {job.id} started in {os.getpid()} while {alive} alive")
    _log(record_dir, f"job-{job.id}.runs", str(os.getpid()))
    return job


def _alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _burn(seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sum(range(1000))


def spin(record_dir, first_run_seconds=60.0, later_seconds=0.3):
    """CPU-bound, ignores SIGTERM like code pinned at 100% would."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    job = _start(record_dir)
    _burn(first_run_seconds if job.interruptions == 0 else later_seconds)
    _log(record_dir, f"job-{job.id}.done", str(os.getpid()))


def quick(record_dir=None):
    if record_dir:
        _log(record_dir, "quick", str(os.getpid()))


def fail_once(record_dir):
    job = _start(record_dir)
    if job.attempt == 1:
        raise RuntimeError("first attempt fails on purpose")


def raise_error():
    raise ValueError("this job always raises")


def exit_3():
    os._exit(3)


def segfault():
    ctypes.string_at(0)


def close_stdout():
    os.close(1)


def hog_memory(megabytes):
    block = bytearray(megabytes * 2**20)
    for i in range(0, len(block), 4096):
        block[i] = 1
    _burn(30)


def with_grandchild(record_dir):
    """Fork a grandchild that leaves the process group (setsid), ignores
    SIGTERM and runs forever; then spin."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    job = _start(record_dir)
    pid = os.fork()
    if pid == 0:
        os.setsid()
        if os.fork() == 0:  # double fork: re-parented away from the job
            _log(record_dir, "grandchild", str(os.getpid()))
            while True:
                time.sleep(0.1)
        os._exit(0)
    os.waitpid(pid, 0)
    _burn(60 if job.interruptions == 0 else 0.2)


def steps(record_dir, count=10, step_seconds=0.2, hold_after=None):
    """Work in `count` steps, checkpointing after each; resume where the
    checkpoint says. With `hold_after`, the first run stays in step
    hold_after + 1 (ignoring SIGTERM) until it is killed."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    job = _start(record_dir)
    first = (job.checkpoint_data or {"step": 0})["step"] + 1
    for step in range(first, count + 1):
        _log(record_dir, f"job-{job.id}.steps", f"{step} {os.getpid()}")
        _burn(step_seconds)
        if hold_after is not None and step == hold_after + 1 and job.interruptions == 0:
            _burn(120)
        job.checkpoint({"step": step})


def checkpoint_forever(record_dir):
    """Checkpoint a counter as fast as the database lets it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    job = _start(record_dir)
    n = 0
    while True:
        n += 1
        try:
            job.checkpoint({"n": n, "pid": os.getpid()})
        except Exception as exc:
            _log(record_dir, f"job-{job.id}.refused", f"{os.getpid()} {type(exc).__name__}")
            raise
        time.sleep(0.02)


def cooperative(record_dir):
    """Steps until told the server is stopping; then save and hand off."""
    job = _start(record_dir)
    step = (job.checkpoint_data or {"step": 0})["step"]
    while step < 10:
        if job.stopping:
            _log(record_dir, f"job-{job.id}.handoff", f"{step} {os.getpid()}")
            raise HandOff(f"stopped cleanly after step {step}")
        step += 1
        job.checkpoint({"step": step})
        if job.interruptions == 0 and step >= 3:
            job.wait_stopping(60)
        else:
            time.sleep(0.05)
    _log(record_dir, f"job-{job.id}.done", f"{step} {os.getpid()}")


def bad_checkpoint():
    current_job().checkpoint({"not json": object()})


def report_niceness(record_dir):
    _log(record_dir, "niceness", f"{os.nice(0)} {psutil.Process(os.getppid()).nice()}")


def report_scheduling(record_dir):
    """The scheduling policy of this job process and of its child (its
    parent), and PRAGMA synchronous on this run's own database connection."""
    from sqlalchemy import text

    engine = current_job()._storage_for_run().engine
    with engine.connect() as conn:
        synchronous = conn.execute(text("PRAGMA synchronous")).scalar() if engine.dialect.name == "sqlite" else -1
    _log(record_dir, "scheduling", f"{os.sched_getscheduler(0)} {os.sched_getscheduler(os.getppid())} {synchronous}")


def finish_after(record_dir, seconds):
    """Take `seconds` whatever happens (a stop notice included), then record
    that the job's code completed."""
    job = _start(record_dir)
    time.sleep(seconds)
    _log(record_dir, f"job-{job.id}.done", str(os.getpid()))


def until_file(record_dir, name, timeout=60.0):
    """Run until the test creates `name` in `record_dir` (so a test can
    look at the job while it runs, without racing its end)."""
    job = _start(record_dir)
    deadline = time.monotonic() + timeout
    while not (Path(record_dir) / name).exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    _log(record_dir, f"job-{job.id}.done", str(os.getpid()))


def steps_until_told(record_dir, step_seconds=0.1):
    """CPU-bound steps, checkpointing after each and resuming where the
    checkpoint says, until the file `finish` appears in `record_dir`: a job
    that is surely still running while a test deploys around it. Each
    step is recorded as "<step> <pid>" in job-N.steps."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    job = _start(record_dir)
    step = (job.checkpoint_data or {"step": 0})["step"]
    while not (Path(record_dir) / "finish").exists():
        step += 1
        _log(record_dir, f"job-{job.id}.steps", f"{step} {os.getpid()}")
        _burn(step_seconds)
        job.checkpoint({"step": step})
    _log(record_dir, f"job-{job.id}.done", str(os.getpid()))
