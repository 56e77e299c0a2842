"""Shared plumbing for the peer benchmarks: process control, polling, job bodies.

Every worker process we spawn carries an environment tag (``SCBENCH_PROC_TAG``).
Forked children inherit it, so we can find a worker's whole process tree even
when a child escaped its process group (RQ's work horse calls ``setpgrp``) or
was re-parented after its parent died.  This mimics a container runtime, which
kills every process of the container, not just one process group.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Protocol

REPO_ROOT = Path(__file__).resolve().parents[2]
REDIS_URL = os.environ.get("SCBENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
PG_DSN = os.environ.get("SCBENCH_PG_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=test")
TAG_VAR = "SCBENCH_PROC_TAG"
BUSY_JOB_SECONDS = 60.0
READY_TIMEOUT_S = 30.0
FIRST_START_TIMEOUT_S = 30.0


def new_run_id() -> str:
    # Lower-case letters/digits only: valid as a Redis key part, queue name and SQL schema name.
    return "scb" + uuid.uuid4().hex[:12]


def wait_until(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.02) -> bool:
    """Poll ``predicate`` until it is true or the deadline passes; return whether it became true."""
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(min(interval_s, max(0.0, deadline - time.monotonic())))


# ---------------------------------------------------------------- job bodies
# Workers import these by dotted path (benchmarks.peers.common.<name>).


def _append(path: str, data: bytes) -> None:
    # O_APPEND writes this small are atomic, so concurrent workers never interleave.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def busy_job(marker_path: str, seconds: float = BUSY_JOB_SECONDS) -> str:
    """Long CPU-bound job that ignores SIGTERM and records each start in ``marker_path``."""
    try:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except ValueError:
        pass  # not the main thread (procrastinate runs sync jobs in a thread): nothing to ignore
    start = {"pid": os.getpid(), "t": time.time(), "worker": os.environ.get(TAG_VAR, "?")}
    _append(marker_path, (json.dumps(start) + "\n").encode())
    deadline = time.monotonic() + seconds
    spins = 0
    while time.monotonic() < deadline:  # pure-Python busy loop: holds the CPU and the GIL
        spins += 1
    return "done"


def noop_job(marker_path: str) -> None:
    _append(marker_path, b".")  # one byte per finished job: cheap completion counter


def sleep10ms_job(marker_path: str) -> None:
    time.sleep(0.01)
    _append(marker_path, b".")


JOBS = {"noop": noop_job, "sleep10ms": sleep10ms_job}


def read_starts(marker_path: str) -> list[dict]:
    try:
        with open(marker_path) as f:
            return [json.loads(line) for line in f if line.endswith("\n")]
    except FileNotFoundError:
        return []


def count_done(marker_path: str) -> int:
    try:
        return os.path.getsize(marker_path)
    except FileNotFoundError:
        return 0


# ---------------------------------------------------------------- processes


def _proc_tag(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read().split(b"\0")
    except OSError:
        return None  # gone, or a kernel thread
    prefix = TAG_VAR.encode() + b"="
    for item in env:
        if item.startswith(prefix):
            return item[len(prefix):].decode()
    return None


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def pids_with_tag(match: Callable[[str], bool]) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            tag = _proc_tag(int(entry))
            if tag is not None and match(tag) and not _is_zombie(int(entry)):
                pids.append(int(entry))
    return pids


class Procs:
    """Spawns tagged worker processes for one run and guarantees they are all gone afterwards."""

    def __init__(self, run_id: str, workdir: str):
        self.run_id = run_id
        self.workdir = workdir
        self.mains: dict[str, subprocess.Popen] = {}

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        full_env = {**os.environ, **(env or {}), TAG_VAR: f"{self.run_id}:{name}",
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
        log = open(self.log_path(name), "wb")
        # New session: a terminal ^C to the benchmark must not reach workers directly.
        proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self.mains[name] = proc
        return proc

    def log_path(self, name: str) -> str:
        return os.path.join(self.workdir, f"worker-{name}.log")

    def wait_log(self, name: str, pattern: str, timeout_s: float = READY_TIMEOUT_S) -> bool:
        """Wait for a readiness line in the worker's log (each peer prints one when it starts consuming)."""
        regex = re.compile(pattern)

        def seen() -> bool:
            with open(self.log_path(name), errors="replace") as f:
                return bool(regex.search(f.read()))

        return wait_until(seen, timeout_s, interval_s=0.05)

    def tree(self, name: str) -> list[int]:
        tag = f"{self.run_id}:{name}"
        return pids_with_tag(lambda t: t == tag)

    def kill_tree(self, name: str) -> int:
        """SIGKILL every process of worker ``name``; return how many were still alive."""
        pids = self.tree(name)
        for pid in pids:
            _kill(pid, signal.SIGKILL)
        self._reap(name)
        wait_until(lambda: not self.tree(name), 10.0)
        return len(pids)

    def kill_all(self) -> None:
        prefix = f"{self.run_id}:"
        for pid in pids_with_tag(lambda t: t.startswith(prefix)):
            _kill(pid, signal.SIGKILL)
        # A process that rewrites its title (Celery's main process, through
        # setproctitle) may overwrite the environment that carries the tag:
        # the process group of each main process we started finds it anyway.
        for proc in self.mains.values():
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for name in self.mains:
            self._reap(name)
        wait_until(lambda: not pids_with_tag(lambda t: t.startswith(prefix)), 10.0)

    def _reap(self, name: str) -> None:
        try:
            self.mains[name].wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def tail(self, name: str, n: int = 20) -> str:
        with open(self.log_path(name), errors="replace") as f:
            return "".join(f.readlines()[-n:])


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def python_argv(*args: str) -> list[str]:
    return [sys.executable, *args]


def make_workdir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="scbench-")


# ---------------------------------------------------------------- Redis hygiene


def redis_cleanup(r: Any, pattern: str, run_id: str, shared_sets: tuple[str, ...] = ()) -> int:
    """Delete the keys matching ``pattern`` that belong to ``run_id``, and our members of shared sets."""
    keys = [k for k in r.scan_iter(match=pattern, count=1000) if run_id.encode() in k]
    for i in range(0, len(keys), 500):
        r.delete(*keys[i:i + 500])
    for set_key in shared_sets:
        ours = [m for m in r.smembers(set_key) if run_id.encode() in m]
        if ours:
            r.srem(set_key, *ours)
    return len(keys)


# ---------------------------------------------------------------- scenarios


class Peer(Protocol):
    """What a peer module provides to the shared scenario drivers."""

    name: str
    version: str
    ready_pattern: str  # regex printed in a worker's log once it consumes jobs

    def setup(self, run_id: str) -> None: ...
    def teardown(self) -> None: ...
    def worker_env(self) -> dict[str, str]: ...
    def worker_argv(self, name: str, concurrency: int) -> list[str]: ...
    def throughput_workers(self, concurrency: int) -> list[tuple[str, int]]: ...
    def enqueue_busy(self, marker: str, seconds: float) -> Any: ...
    def job_state(self, handle: Any) -> tuple[str, dict]: ...
    def enqueue_many(self, job: str, marker: str, n: int) -> None: ...
    def all_finished(self, n: int) -> bool: ...


def _run(peer: Peer, body: Callable[[Procs, str], dict]) -> dict:
    """Give ``body`` a fresh run id, temp dir and process set; always kill and clean up afterwards."""
    run_id = new_run_id()
    with make_workdir() as workdir:
        procs = Procs(run_id, workdir)
        try:
            peer.setup(run_id)
            return body(procs, workdir)
        finally:
            procs.kill_all()  # workers first, so nothing re-creates keys/rows while we clean
            peer.teardown()


def start_worker(peer: Peer, procs: Procs, name: str, concurrency: int) -> None:
    procs.spawn(name, peer.worker_argv(name, concurrency), peer.worker_env())
    if not procs.wait_log(name, peer.ready_pattern):
        raise RuntimeError(f"{peer.name} worker {name} not ready in {READY_TIMEOUT_S}s:\n{procs.tail(name)}")


def terminate_then_kill(procs: Procs, name: str, grace_s: float) -> bool:
    """Platform-style stop: SIGTERM the main process, after ``grace_s`` SIGKILL whatever is left.

    Returns whether the SIGKILL was needed.  Leftover children are killed even if the
    main process exited in time, as a container runtime would.
    """
    os.kill(procs.mains[name].pid, signal.SIGTERM)
    wait_until(lambda: not procs.tree(name), grace_s, interval_s=0.05)
    return procs.kill_tree(name) > 0


def disruption(peer: Peer, scenario: str, grace_s: float, observe_s: float,
               job_seconds: float = BUSY_JOB_SECONDS) -> dict:
    """takeover (SIGTERM + grace + SIGKILL tree) or crash (SIGKILL of A's main process alone)."""
    if scenario not in ("takeover", "crash"):
        raise ValueError(f"unknown scenario {scenario!r}")

    def body(procs: Procs, workdir: str) -> dict:
        marker = os.path.join(workdir, "starts.jsonl")
        start_worker(peer, procs, "A", 2)
        handle = peer.enqueue_busy(marker, job_seconds)
        if not wait_until(lambda: read_starts(marker), FIRST_START_TIMEOUT_S):
            raise RuntimeError(f"busy job never started on A:\n{procs.tail('A')}")
        # Rolling deploy: the replacement B is up and consuming before A is stopped.
        start_worker(peer, procs, "B", 2)
        t_disrupt, m_disrupt = time.time(), time.monotonic()
        extra = _stop_a(procs, scenario, grace_s)
        # The window counts from the SIGTERM/SIGKILL ("within observe_s of the deploy or crash").
        window = max(0.0, observe_s - (time.monotonic() - m_disrupt))
        restarted = wait_until(lambda: len(read_starts(marker)) >= 2, window, interval_s=0.05)
        observed_s = time.monotonic() - m_disrupt
        state, detail = peer.job_state(handle)
        if scenario == "crash":
            extra["a_children_alive_at_end"] = len(procs.tree("A"))
        starts = read_starts(marker)
        return {
            "peer": peer.name, "peer_version": peer.version, "scenario": scenario,
            "restarted": restarted,
            "seconds_to_restart": round(starts[1]["t"] - t_disrupt, 3) if restarted else None,
            "restarted_on": _worker_name(starts[1]) if restarted else None,
            "first_run_on": _worker_name(starts[0]),
            "job_state_after": state, "job_detail_after": detail,
            "observed_s": round(observed_s, 3), "observe_s": observe_s,
            "grace_s": grace_s if scenario == "takeover" else None, "job_seconds": job_seconds, **extra,
        }

    return _run(peer, body)


def _stop_a(procs: Procs, scenario: str, grace_s: float) -> dict:
    """Disrupt worker A; return scenario-specific facts for the result."""
    if scenario == "takeover":
        return {"sigkill_needed": terminate_then_kill(procs, "A", grace_s)}
    os.kill(procs.mains["A"].pid, signal.SIGKILL)
    procs.mains["A"].wait(timeout=5)
    # Children that outlive their main process (RQ's work horse does) keep running the job.
    return {"a_children_alive_after_kill": len(procs.tree("A"))}


def _worker_name(start: dict) -> str:
    return start["worker"].split(":", 1)[-1]


def throughput(peer: Peer, n_jobs: int, concurrency: int, job: str, timeout_s: float = 600.0) -> dict:
    """Enqueue everything first, then start workers and time until every job is finished."""
    if job not in JOBS:
        raise ValueError(f"unknown job {job!r}; expected one of {sorted(JOBS)}")

    def body(procs: Procs, workdir: str) -> dict:
        marker = os.path.join(workdir, "done.bin")
        m_enqueue = time.monotonic()
        peer.enqueue_many(job, marker, n_jobs)
        enqueue_s = time.monotonic() - m_enqueue
        m0 = time.monotonic()
        for name, conc in peer.throughput_workers(concurrency):
            procs.spawn(name, peer.worker_argv(name, conc), peer.worker_env())
        deadline = m0 + timeout_s
        got_first = wait_until(lambda: count_done(marker) > 0, timeout_s, interval_s=0.005)
        startup_s = time.monotonic() - m0
        # Finished = every job body ran (marker) and the peer itself no longer holds any as pending.
        completed = (got_first
                     and wait_until(lambda: count_done(marker) >= n_jobs, deadline - time.monotonic(), 0.005)
                     and wait_until(lambda: peer.all_finished(n_jobs), deadline - time.monotonic(), 0.005))
        wall_s = time.monotonic() - m0
        return {
            "peer": peer.name, "peer_version": peer.version, "scenario": "throughput", "job": job,
            "n_jobs": n_jobs, "concurrency": concurrency, "completed": completed,
            "jobs_done": count_done(marker), "wall_s": round(wall_s, 3),
            "jobs_per_second": round(n_jobs / wall_s, 1) if completed else None,
            "per_job_ms": round(wall_s * 1000 / n_jobs, 3) if completed else None,
            "startup_s": round(startup_s, 3),
            "jobs_per_second_after_first": (round((n_jobs - 1) / (wall_s - startup_s), 1)
                                            if completed and wall_s > startup_s else None),
            "enqueue_s": round(enqueue_s, 3),
        }

    return _run(peer, body)
