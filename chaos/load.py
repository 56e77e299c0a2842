"""`python -m chaos load`: producers enqueue while supervisors drain; no job
may be lost or run twice. Prints throughput."""

import json
import os
import multiprocessing
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import func, select

from chaos.cluster import Supervisor, TreeWatcher, alive, database_url, write_config
from supervisor.database import ensure_schema, make_engine
from supervisor.jobspec import new_job
from supervisor.storage import Storage
from supervisor.tables import events, jobs

BATCH = 250


def produce(url: str, producer: int, count: int) -> tuple[int, float, list[int]]:
    """Runs in a producer process: enqueue `count` no-op jobs in batches.
    Returns (producer, seconds taken, the ids it was given)."""
    storage = Storage(make_engine(url))
    began = time.monotonic()
    ids = []
    for start in range(0, count, BATCH):
        specs = [new_job("chaos.jobs:noop", [producer, n]) for n in range(start, min(count, start + BATCH))]
        ids += storage.enqueue(*specs)
    storage.engine.dispose()
    return producer, time.monotonic() - began, ids


def duplicates(conn, kind: str) -> int:
    """Jobs with more than one event of `kind`."""
    per_job = (select(events.c.job_id).where(events.c.kind == kind)
               .group_by(events.c.job_id).having(func.count() > 1).subquery())
    return conn.execute(select(func.count()).select_from(per_job)).scalar_one()


def check(engine, given: set[int], expected: int) -> tuple[dict, list[str]]:
    with engine.connect() as conn:
        states = dict(conn.execute(select(jobs.c.state, func.count()).group_by(jobs.c.state)).all())
        stored = set(conn.execute(select(jobs.c.id)).scalars())
        counts = {kind: n for kind, n in conn.execute(
            select(events.c.kind, func.count()).group_by(events.c.kind)).all()}
        claimed_twice = duplicates(conn, "claimed")
        succeeded_twice = duplicates(conn, "succeeded")
    violations = []
    if len(given) != expected:
        violations.append(f"producers were given {len(given)} distinct ids for {expected} jobs")
    if given - stored:
        violations.append(f"{len(given - stored)} enqueued jobs are lost (no row)")
    if states.get("succeeded", 0) != expected:
        violations.append(f"{states.get('succeeded', 0)} of {expected} jobs succeeded: {states}")
    if claimed_twice:
        violations.append(f"{claimed_twice} jobs were claimed (run) more than once")
    if succeeded_twice:
        violations.append(f"{succeeded_twice} jobs have more than one 'succeeded' event")
    if counts.get("succeeded", 0) != expected:
        violations.append(f"{counts.get('succeeded', 0)} 'succeeded' events for {expected} jobs")
    return {"states": states, "events": counts, "claimed_twice": claimed_twice,
            "succeeded_twice": succeeded_twice}, violations


def wait_drained(storage: Storage, expected: int, timeout: float) -> tuple[bool, float]:
    """Poll until `expected` jobs succeeded; (drained?, when) on the monotonic clock."""
    deadline = time.monotonic() + timeout
    last_print = 0.0
    while time.monotonic() < deadline:
        done = storage.counts().get("default", {}).get("succeeded", 0)
        if done >= expected:
            return True, time.monotonic()
        if time.monotonic() - last_print > 10:
            print(f"load: {done}/{expected} succeeded", file=sys.stderr, flush=True)
            last_print = time.monotonic()
        time.sleep(0.2)
    return False, time.monotonic()


def load(db: str, job_count: int, producers: int, supervisors: int, concurrency: int, keep: bool) -> int:
    run_dir = Path(tempfile.mkdtemp(prefix="shiftchange-load-"))
    report = {"mode": "load", "db": db, "jobs": job_count, "producers": producers,
              "supervisors": supervisors, "concurrency": concurrency}
    violations: list[str] = []
    watcher = TreeWatcher(interval=0.5).start()
    sups: list[Supervisor] = []
    try:
        url = database_url(db, run_dir, f"shiftchange_load_{os.getpid()}")  # never shared with another run
        engine = make_engine(url)
        ensure_schema(engine)
        storage = Storage(engine)
        config = write_config(run_dir / "load.yaml", url,
                              {"server": {"concurrency": concurrency}, "log": {"level": "warning"}})
        sups = [Supervisor(f"load{i + 1}", config, run_dir, watcher).start() for i in range(supervisors)]
        shares = [job_count // producers + (i < job_count % producers) for i in range(producers)]
        began = time.monotonic()
        with multiprocessing.get_context("spawn").Pool(producers) as pool:
            produced = pool.starmap(produce, [(url, i, n) for i, n in enumerate(shares)])
        enqueued_at = time.monotonic()
        given = {job_id for _, _, ids in produced for job_id in ids}
        drained, done_at = wait_drained(storage, job_count, timeout=max(120.0, job_count / 10))
        if not drained:
            violations.append(f"not drained within {max(120.0, job_count / 10):g}s")
        report.update({
            "enqueue_seconds": round(enqueued_at - began, 1),
            "enqueue_jobs_per_s": round(job_count / max(enqueued_at - began, 1e-9)),
            "total_seconds": round(done_at - began, 1),
            "jobs_per_s": round(job_count / max(done_at - began, 1e-9), 1),
        })
        for sup in sups:
            sup.signal(signal.SIGTERM)
        for sup in sups:
            if sup.wait(15) is None:
                violations.append(f"{sup.name} did not exit after SIGTERM")
        counts, found = check(engine, given, job_count)
        report.update(counts)
        violations += found
        time.sleep(0.5)
        left = [pid for (pid, created) in watcher.seen if alive(pid, created)]
        report["processes_seen"] = len(watcher.seen)
        if left:
            violations.append(f"processes still alive: {left[:20]}")
    except BaseException as exc:
        violations.append(f"the load run itself failed: {type(exc).__name__}: {exc}")
        raise
    finally:
        for sup in sups:
            if sup.running():
                sup.kill_tree()
        watcher.stop()
        report["violations"] = violations
        if violations or keep:
            report["run_dir"] = str(run_dir)
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
        print(json.dumps(report, indent=1))
        sys.stdout.flush()
    return 1 if violations else 0
