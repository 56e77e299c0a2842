"""Job functions for the chaos and load runs (run by the supervisors' job
processes). Only the standard library is imported at module level: the load
run imports this module once per job.

Every chaos job records its run in `<records>/job-<id>` as JSON lines:

    {"ev": "start", "pid": P, "ct": create_time, "t": clock, "attempt": A, "sup": S}
    {"ev": "proc", "pid": G, "ct": create_time}          (a grandchild)
    {"ev": "end", "pid": P, "t": clock, "how": "returned" | "raised",
     "attempt": A, "completed": C}

S is the pid of the supervisor that runs it. C is true when the job's code
ran to its end: it returned, or raised the failure it was designed to raise
(not LeaseLost halfway through). Each such record is one completion of the
job's code, as its own side saw it: the run judges "ran twice" by them, not
by the queue's events. A run killed by a signal writes no "end". So that two runs alive at once are
caught even then, each run checks at its start, under a lock on that file,
that no process recorded by an earlier run of the same job is still alive
(same pid AND same start time, so a recycled pid is not mistaken for it;
a run that recorded its end is over even if its process lives on, reused
for other jobs); if one is, it appends a line to `<records>/overlaps`.
"""

import fcntl
import json
import os
import signal
import time
from contextlib import contextmanager
from pathlib import Path

FAIL_MARK = "designed to fail"


class DesignedFailure(RuntimeError):
    """The failure a chaos job raises on purpose, at the end of its work."""


def clock() -> float:
    """CLOCK_BOOTTIME: one clock for every process of this host."""
    return time.clock_gettime(getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC))


@contextmanager
def _locked(path: Path):
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when closed, or when we die
        f.seek(0)
        yield f


def _append(path: Path, record: dict) -> None:
    with _locked(path) as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def _identity(pid: int) -> float | None:
    """The process's start time, None if it is gone or a zombie."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc.create_time()
    except psutil.NoSuchProcess:
        return None


def read_records(path: Path) -> list[dict]:
    """A job's records; a line cut short by SIGKILL is skipped."""
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


@contextmanager
def recorded_run(records: str):
    """Record this run's start (after checking no earlier run is alive) and
    its end; yields the job context."""
    from supervisor import current_job

    job = current_job()
    path = Path(records) / f"job-{job.id}"
    me = os.getpid()
    with _locked(path) as f:
        earlier = [json.loads(line) for line in f.read().splitlines() if line.startswith("{")]
        alive = [pid for pid, ct in _unended(earlier) if _identity(pid) == ct]
        if alive:
            _append(Path(records) / "overlaps",
                    {"job": job.id, "pid": me, "t": clock(), "alive": alive})
        f.write(json.dumps({"ev": "start", "pid": me, "ct": _identity(me), "t": clock(),
                            "attempt": job.attempt, "interruptions": job.interruptions,
                            "sup": _supervisor_pid()}) + "\n")
    end = {"ev": "end", "pid": me, "attempt": job.attempt}
    try:
        yield job
    except BaseException as exc:
        _append(path, {**end, "t": clock(), "how": "raised", "completed": isinstance(exc, DesignedFailure)})
        raise
    _append(path, {**end, "t": clock(), "how": "returned", "completed": True})


def _unended(records: list[dict]) -> list[tuple[int, float]]:
    """(pid, start time) of the processes of earlier runs that may still run
    the job: a run's process until it recorded its end (a reused process
    lives on to run other jobs, or this one again, after that), and every
    process a run started."""
    unended = []
    for record in records:
        if record.get("ev") == "end":
            unended = [(pid, ct) for pid, ct in unended if pid != record["pid"]]
        elif "ct" in record:
            unended.append((record["pid"], record["ct"]))
    return unended


def _supervisor_pid() -> int | None:
    """The job's process runs under its child, which runs under the supervisor."""
    import psutil

    try:
        return psutil.Process(os.getppid()).ppid()
    except psutil.NoSuchProcess:
        return None


def _burn(seconds: float) -> None:
    end = clock() + seconds
    while clock() < end:
        sum(range(2000))


# --- the chaos mix -------------------------------------------------------------


def sleeper(records, seconds):
    """Plain I/O-bound work."""
    with recorded_run(records):
        time.sleep(seconds)


def cpu(records, seconds):
    """CPU-bound and deaf to SIGTERM, like code pinned at 100%."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with recorded_run(records):
        _burn(seconds)


def steps(records, count, step_seconds):
    """Works in steps, checkpointing after each, resuming from the last
    checkpoint. LeaseLost from checkpoint() is let through: the run is over."""
    with recorded_run(records) as job:
        done = (job.checkpoint_data or {"step": 0})["step"]
        for step in range(done + 1, count + 1):
            time.sleep(step_seconds)
            job.checkpoint({"step": step, "pid": os.getpid()})


def grandchild(records, seconds):
    """Starts a grandchild that leaves the process group (setsid, double
    fork), ignores SIGTERM and never ends by itself; then works."""
    with recorded_run(records) as job:
        path = Path(records) / f"job-{job.id}"
        ready_r, ready_w = os.pipe()  # the grandchild is recorded before we go on
        middle = os.fork()
        if middle == 0:
            os.setsid()
            if os.fork() == 0:
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                me = os.getpid()
                _append(path, {"ev": "proc", "pid": me, "ct": _identity(me)})
                os.write(ready_w, b"x")
                while True:
                    time.sleep(1)
            os._exit(0)
        os.close(ready_w)
        os.waitpid(middle, 0)
        os.read(ready_r, 1)  # EOF instead if the grandchild died first
        os.close(ready_r)
        _burn(seconds)


def fail_first(records, seconds):
    """Fails its first attempt, succeeds after."""
    with recorded_run(records) as job:
        time.sleep(seconds)
        if job.attempt == 1:
            raise DesignedFailure(f"first attempt fails on purpose (job {job.id})")


def always_fail(records, seconds):
    """Fails every attempt: must end `failed` after max_attempts."""
    with recorded_run(records) as job:
        time.sleep(seconds)
        raise DesignedFailure(f"{FAIL_MARK} (job {job.id}, attempt {job.attempt})")


# --- the load run ----------------------------------------------------------------


def noop(producer, n):
    """Nothing to do: the load run measures the queue, not the job."""
