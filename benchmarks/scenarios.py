"""Each measurement of docs/benchmarks.md, as a function returning dicts.

Timings come from CLOCK_BOOTTIME (supervisor.processes.clock), which the
benchmark process, the supervisors and the jobs share, so "the job's code
started again" is read from the job's own record, not guessed from polling.
"""

import multiprocessing
import os
import resource
import signal
import statistics
import subprocess
import sys
import time

import psutil
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from benchmarks.procs import StateCounter, Supervisor, fresh_database, read_marker, summary, wait_until
from supervisor import Queue
from supervisor.errors import StorageUnavailable
from supervisor.jobspec import new_job
from supervisor.logs import read_events
from supervisor.processes import clock

SPIN = "benchmarks.bjobs:spin"


# --- 1. handoff commit ------------------------------------------------------------


def handoff_commit(kind, workdir, in_flight=(1, 8, 64), runs=20):
    """SIGTERM -> the in-flight jobs durable as `enqueued`, CPU-bound
    children ignoring SIGTERM."""
    for n in in_flight:
        samples = [handoff_once(kind, workdir, n, f"{kind}-{n}-{run}") for run in range(runs)]
        yield {"measurement": "handoff_commit", "db": kind, "in_flight": n, **handoff_summary(samples)}


def handoff_once(kind, workdir, n, tag, code=None, jobs=None, shutdown=None) -> tuple[float | None, float]:
    """One handoff of `n` spinning jobs: (as the supervisor measured it, or
    None when it logged none; as observed from outside), in ms. `code`:
    the checkout to run; `jobs`, `shutdown`: more settings of those sections."""
    url = fresh_database(kind, workdir)
    with Queue(url) as queue:
        markers = [workdir / f"h-{tag}-{i}" for i in range(n)]
        queue.storage.enqueue(*(new_job(SPIN, [str(marker)]) for marker in markers))
        sup = Supervisor(url, workdir, f"h-{tag}", code=code, server={"concurrency": n}, jobs=jobs or {},
                         shutdown=shutdown or {})
        counted = StateCounter(url)
        try:
            sup.wait_registered(queue)
            # In flight = every job's code running, not merely claimed.
            wait_until(lambda: all(marker.exists() for marker in markers), 60, 0.01)
            sent = clock()
            sup.kill(signal.SIGTERM)
            wait_until(lambda: counted("enqueued") == n, 10)
            observed = (clock() - sent) * 1000
            sup.proc.wait(30)
            return sup.handoff_ms(), observed
        finally:
            counted.close()
            sup.destroy()


def handoff_summary(samples) -> dict:
    internal = [ms for ms, _ in samples]
    return {"handoffs_failed": internal.count(None),  # no handed_off event: missed its 2 s bound
            "supervisor_measured": summary([ms for ms in internal if ms is not None], "ms"),
            "observed_from_outside": summary([ms for _, ms in samples], "ms")}


# --- 2. takeover --------------------------------------------------------------------


def takeover(kind, workdir, kill_after_values=("0s", "1s"), runs=20):
    """Rolling deploy, the new supervisor already running: SIGTERM to the
    old one -> the job's code running again on the new one."""
    for kill_after in kill_after_values:
        restart, old_exit, overlaps = [], [], 0
        for run in range(runs):
            url = fresh_database(kind, workdir)
            marker = workdir / f"takeover-{kind}-{kill_after}-{run}"
            with Queue(url) as queue:
                old = Supervisor(url, workdir, "old", server={"concurrency": 1}, shutdown={"kill_after": kill_after})
                new = None
                try:
                    old.wait_registered(queue)
                    queue.enqueue(SPIN, [str(marker)])
                    wait_until(lambda: len(read_marker(marker)) == 1, 30)
                    new = Supervisor(url, workdir, "new", server={"concurrency": 1})
                    new.wait_registered(queue)
                    sent = clock()
                    old.kill(signal.SIGTERM)
                    wait_until(lambda: len(read_marker(marker)) == 2, 30)
                    second = read_marker(marker)[1]
                    restart.append((second[0] - sent) * 1000)
                    overlaps += second[2]
                    old.proc.wait(30)
                    old_exit.append((clock() - sent) * 1000)
                finally:
                    old.destroy()
                    if new:
                        new.destroy()
        yield {"measurement": "takeover", "db": kind, "kill_after": kill_after,
               "job_running_again": summary(restart, "ms"), "old_supervisor_exit": summary(old_exit, "ms"),
               "overlapping_runs": overlaps}


# --- 3. crash recovery ----------------------------------------------------------------


def crash_recovery(kind, workdir, runs=3, settings=None):
    """kill -9 of the supervisor -> the job running on a surviving server."""
    profiles = settings or {
        "default (heartbeat 1s, dead_after 10s)": {"heartbeat_interval": "1s", "dead_after": "10s"},
        "aggressive (heartbeat 200ms, dead_after 2s)": {"heartbeat_interval": "200ms", "dead_after": "2s"},
    }
    for label, server in profiles.items():
        recovered = []
        overlaps = 0
        for run in range(runs):
            url = fresh_database(kind, workdir)
            marker = workdir / f"crash-{kind}-{len(label)}-{run}"
            with Queue(url) as queue:
                old = Supervisor(url, workdir, "old", server={**server, "concurrency": 1})
                survivor = Supervisor(url, workdir, "survivor", server={**server, "concurrency": 1})
                try:
                    old.wait_registered(queue)
                    survivor.wait_registered(queue)
                    queue.enqueue(SPIN, [str(marker)])
                    wait_until(lambda: len(read_marker(marker)) == 1, 30)
                    if read_marker(marker)[0][1] not in [p.pid for p in psutil.Process(old.pid).children(recursive=True)]:
                        old, survivor = survivor, old  # kill whichever runs it
                    sent = clock()
                    old.kill(signal.SIGKILL)
                    wait_until(lambda: len(read_marker(marker)) == 2, 60, 0.01)
                    second = read_marker(marker)[1]
                    recovered.append(second[0] - sent)
                    overlaps += second[2]
                finally:
                    old.destroy()
                    survivor.destroy()
        yield {"measurement": "crash_recovery", "db": kind, "settings": label,
               "job_running_again": summary(recovered, "s"), "overlapping_runs": overlaps}


# --- 4. throughput ---------------------------------------------------------------------


def throughput(kind, workdir, n_jobs=2000, concurrencies=(2, 4), repeats=3, job="noop"):
    """Jobs drained per second: enqueue first, then start the supervisor,
    until all succeeded (worker start-up included, as for the peers)."""
    target, args = ("benchmarks.bjobs:noop", []) if job == "noop" else ("benchmarks.bjobs:sleep_ms", [10])
    for concurrency in concurrencies:
        rates, cpu = [], []
        for run in range(repeats):
            url = fresh_database(kind, workdir)
            with Queue(url) as queue:
                queue.storage.enqueue(*(new_job(target, args) for _ in range(n_jobs)))
                used_before = _children_cpu()
                began = time.monotonic()
                sup = Supervisor(url, workdir, f"t{concurrency}-{run}", server={"concurrency": concurrency})
                try:
                    wait_until(lambda: queue.counts().get("succeeded", 0) == n_jobs, 600, 0.05)
                    rates.append(n_jobs / (time.monotonic() - began))
                    sup.send(signal.SIGTERM)  # so that it reaps its whole tree: all its CPU is counted
                    sup.wait(30)
                    cpu.append((_children_cpu() - used_before) / n_jobs * 1000)
                finally:
                    sup.destroy()
        rate = statistics.median(rates)
        # CPU per job (all processes, start-up included) is the number a loaded
        # machine distorts least: compare it when the load average is high.
        yield {"measurement": "throughput", "db": kind, "job": job, "concurrency": concurrency,
               "jobs": n_jobs, "jobs_per_second": round(rate, 1),
               "per_job_ms": round(1000 * concurrency / rate, 2), "runs": [round(r, 1) for r in rates],
               "cpu_ms_per_job": round(statistics.median(cpu), 2) if cpu else None,
               "load_average": round(os.getloadavg()[0], 1)}


def _children_cpu() -> float:
    """User + system seconds of every reaped descendant of this process."""
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


# --- 5. scale -----------------------------------------------------------------------------


def _add_finished(url, kind, count):
    """Insert `count` succeeded jobs in bulk, by SQL."""
    series = {
        "postgresql": f"SELECT g FROM generate_series(1, {count}) AS g",
        "mariadb": f"SELECT seq AS g FROM seq_1_to_{count}",
        "sqlite": f"WITH RECURSIVE s(g) AS (SELECT 1 UNION ALL SELECT g + 1 FROM s WHERE g < {count}) SELECT g FROM s",
    }[kind]
    with Queue(url) as queue, queue.engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO shiftchange_jobs (queue, kind, target, args, kwargs, priority, state, run_at,"
            " attempts, max_attempts, interruptions, max_interruptions, lease, created_at, finished_at)"
            f" SELECT 'default', 'callable', 'app:f', '[]', '{{}}', 0, 'succeeded', 0, 1, 3, 0, 10, 1, 0, 0 FROM ({series}) AS t"
        ))


def _claim_latency_ms(url, samples=50):
    with Queue(url) as queue:
        sid = queue.storage.register_server(name="bench", host="bench", pid=1, pid_started_at=None,
                                            queues=["default"], concurrency=1, dead_after=60)
        timings = []
        for _ in range(samples):
            queue.enqueue("app:f")
            began = time.perf_counter()
            (job,) = queue.storage.claim(sid, ["default"], 1)
            timings.append((time.perf_counter() - began) * 1000)
            queue.storage.complete(job.id, job.lease, sid)
        return statistics.median(timings)


def claim_at_scale(kind, workdir, small=10_000, large=1_000_000):
    result = {}
    for size in (small, large):
        url = fresh_database(kind, workdir)
        _add_finished(url, kind, size)
        result[size] = _claim_latency_ms(url)
    yield {"measurement": "claim_latency_vs_finished_jobs", "db": kind,
           f"claim_ms_with_{small}": round(result[small], 3), f"claim_ms_with_{large}": round(result[large], 3),
           "ratio": round(result[large] / result[small], 2)}


def _produce(url, count):
    with Queue(url) as queue:
        for _ in range(count):
            queue.storage.enqueue(new_job("benchmarks.bjobs:noop"))


def enqueue_rate(kind, workdir, producers=4, per_producer=1000):
    url = fresh_database(kind, workdir)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_produce, args=(url, per_producer)) for _ in range(producers)]
    began = time.monotonic()
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    seconds = time.monotonic() - began
    yield {"measurement": "enqueue_rate", "db": kind, "producers": producers,
           "jobs": producers * per_producer, "jobs_per_second": round(producers * per_producer / seconds, 1),
           "note": "one job per transaction; process start-up included"}


def idle_statements(kind, workdir, seconds=10.0):
    """Database statements per second of an idle supervisor (default
    settings), counted by a SQLAlchemy hook inside the supervisor."""
    url = fresh_database(kind, workdir)
    counts = workdir / "statements"
    counts.unlink(missing_ok=True)
    wrapper = [sys.executable, "-m", "benchmarks.count_statements", str(counts)]
    with Queue(url) as queue:
        sup = Supervisor(url, workdir, "idle", wrapper=wrapper)
        try:
            sup.wait_registered(queue)
            time.sleep(2.0)  # past start-up; this is a measurement window, not synchronisation
            window_start = clock()
            time.sleep(seconds)
            window_end = clock()
            sup.kill(signal.SIGTERM)
            sup.proc.wait(30)
        finally:
            sup.destroy()
    stamps = [float(line) for line in counts.read_text().split()]
    inside = [t for t in stamps if window_start <= t <= window_end]
    yield {"measurement": "idle_statements_per_second", "db": kind,
           "statements_per_second": round(len(inside) / seconds, 2),
           "settings": "heartbeat 1s, poll 200ms"}


# --- 6. footprint -------------------------------------------------------------------------


def footprint(kind, workdir, seconds=5.0):
    url = fresh_database(kind, workdir)
    with Queue(url) as queue:
        sup = Supervisor(url, workdir, "footprint", server={"concurrency": 1})
        try:
            sup.wait_registered(queue)
            proc = psutil.Process(sup.pid)
            proc.cpu_percent(None)
            time.sleep(seconds)  # measurement window
            cpu = proc.cpu_percent(None)
            idle_rss = proc.memory_info().rss
            queue.enqueue("benchmarks.bjobs:sleep_ms", [60_000])
            wait_until(lambda: len(proc.children(recursive=True)) >= 2, 30, 0.01)
            child, job = proc.children(recursive=True)[:2]
            child_mem, job_mem = child.memory_full_info(), job.memory_full_info()
        finally:
            sup.destroy()
    mib = 2**20
    yield {"measurement": "footprint", "db": kind, "idle_supervisor_cpu_percent": round(cpu, 2),
           "idle_supervisor_rss_mib": round(idle_rss / mib, 1),
           "child_rss_mib": round(child_mem.rss / mib, 1), "child_uss_mib": round(child_mem.uss / mib, 1),
           "job_process_rss_mib": round(job_mem.rss / mib, 1), "job_process_uss_mib": round(job_mem.uss / mib, 1)}


# --- 7. network partition ----------------------------------------------------------------


def partition(kind, workdir, runs=5, settings=None):
    """A supervisor reaching the database through a relay that black-holes
    its traffic: when it warns, when its job is fenced, how long a SIGTERM
    sent 1 s into the partition takes to end it, and how long `shiftchange
    status` through the same relay takes to give up."""
    from chaos.relay import Relay
    from sqlalchemy.engine import make_url

    profiles = settings or {
        "default (heartbeat 1s, dead_after 10s)": {"heartbeat_interval": "1s", "dead_after": "10s"},
        "fast (heartbeat 500ms, dead_after 3s)": {"heartbeat_interval": "500ms", "dead_after": "3s"},
    }
    if kind == "sqlite":
        return
    for label, server in profiles.items():
        warned, stopped, gave_up, codes = [], [], [], set()
        for run in range(runs):
            url = make_url(fresh_database(kind, workdir))
            marker = workdir / f"partition-{kind}-{len(label)}-{run}"
            with Queue(url.render_as_string(hide_password=False)) as queue, Relay(url.host, url.port) as relay:
                through = url.set(port=relay.port).render_as_string(hide_password=False)
                sup = Supervisor(through, workdir, f"blue{run}", server={**server, "concurrency": 1},
                                 shutdown={"kill_after": "1s"})
                try:
                    sup.wait_registered(queue)
                    queue.enqueue(SPIN, [str(marker)])
                    wait_until(lambda: read_marker(marker), 30)
                    began = clock()
                    relay.black_hole()
                    cli = subprocess.Popen([sys.executable, "-m", "supervisor", "status"], env=_env(through),
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    wait_until(lambda: clock() - began > 1.0, 5, 0.001)
                    sup.kill(signal.SIGTERM)
                    sent = clock()
                    codes.add(sup.proc.wait(60))
                    stopped.append(clock() - sent)
                    warned.append(_log_seconds(sup.log(), "cannot heartbeat", began))
                    cli.wait(60)
                    gave_up.append(clock() - began)
                finally:
                    sup.destroy()
        yield {"measurement": "partition", "db": kind, "settings": label,
               "sigterm_1s_into_partition_to_exit": summary(stopped, "s"), "exit_codes": sorted(codes),
               "status_command_gives_up": summary(gave_up, "s"),
               "first_warning_after": summary([w for w in warned if w is not None] or [0.0], "s")}


def _env(url):
    import os

    from benchmarks.procs import REPO

    env = {k: v for k, v in os.environ.items() if not k.startswith("SHIFTCHANGE_")}
    return dict(env, SHIFTCHANGE_DATABASE_URL=url, PYTHONPATH=str(REPO))


def _log_seconds(log, words, began):
    """Seconds from `began` (CLOCK_BOOTTIME) to the log line with `words`,
    from the line's wall-clock stamp."""
    import datetime

    for record in read_events(log):
        if words in record.get("message", ""):
            stamp = datetime.datetime.fromisoformat(record["at"].replace("Z", "+00:00")).timestamp()
            return stamp - (time.time() - (clock() - began))
    return None


# --- 8. rolling deploy ------------------------------------------------------------------


def _roll_once(kind, workdir, tag, releases, servers, concurrency, n_jobs, job_steps, step_seconds, apart):
    """One rolling deploy: `servers` old servers run `n_jobs` long
    checkpointing jobs; each is replaced in turn (start a new server, wait
    until it is registered as a readiness probe would, SIGTERM an old one,
    `apart` seconds between steps). Returns what the jobs recorded."""
    url = fresh_database(kind, workdir)
    records = workdir / f"roll-{tag}"
    records.mkdir()
    old_release, new_release = ("r1", "r2") if releases else (None, None)

    def settings(release):
        return {"concurrency": concurrency, **({"release": release} if release else {})}

    started = []
    with Queue(url) as queue:
        try:
            old = [Supervisor(url, workdir, f"{tag}-old-{i}", server=settings(old_release)) for i in range(servers)]
            started += old
            for sup in old:
                sup.wait_registered(queue)
            began = clock()
            ids = [queue.enqueue("benchmarks.bjobs:steps", [str(records), job_steps, step_seconds]).id
                   for _ in range(n_jobs)]
            wait_until(lambda: all((records / f"job-{i}.runs").exists() for i in ids), 60, 0.01)
            deploy_began = clock()
            for i, sup in enumerate(old):
                new = Supervisor(url, workdir, f"{tag}-new-{i}", server=settings(new_release))
                started.append(new)
                new.wait_registered(queue)
                sup.kill(signal.SIGTERM)
                if i < len(old) - 1:
                    time.sleep(apart)  # the deploy's pace, not synchronisation
            deploy_ended = clock()
            wait_until(lambda: queue.counts()["succeeded"] == n_jobs, 600, 0.05)
            finished = clock()
            interruptions = [queue.get(i).interruptions for i in ids]
        finally:
            for sup in started:
                sup.destroy()
    runs = {i: read_marker(records / f"job-{i}.runs") for i in ids}
    steps = {i: [line.split()[0] for line in (records / f"job-{i}.steps").read_text().splitlines()] for i in ids}
    return {
        "interruptions": interruptions,
        "runs": [len(runs[i]) for i in ids],
        "overlaps": sum(flag for i in ids for _, _, flag in runs[i]),
        "steps_redone": sum(len(steps[i]) - len(set(steps[i])) for i in ids),
        "deploy_s": deploy_ended - deploy_began,
        "all_finished_s": finished - began,
    }


def rolling_deploy(kind, workdir, runs=3, servers=4, concurrency=3, n_jobs=8, job_steps=150,
                   step_seconds=0.2, apart=2.0):
    """Issue 14: a rolling deploy of `servers` servers, before (no release
    set anywhere) and after (old servers r1, new ones r2)."""
    for releases in (False, True):
        results, repeated = [], 0
        while len(results) < runs:
            tag = f"{kind}-{int(releases)}-{len(results)}-{repeated}"
            try:
                results.append(_roll_once(kind, workdir, tag, releases, servers, concurrency,
                                          n_jobs, job_steps, step_seconds, apart))
            except (StorageUnavailable, OperationalError, TimeoutError):
                # The database went away in the middle (a restart on a shared
                # machine): the run's numbers mean nothing; run it again.
                repeated += 1
                if repeated > 5:
                    raise
        every = [n for r in results for n in r["interruptions"]]
        yield {
            "measurement": "rolling_deploy", "db": kind, "releases": releases,
            "servers": servers, "concurrency": concurrency, "jobs": n_jobs,
            "job_seconds": round(job_steps * step_seconds, 1), "runs": runs,
            "interruptions_max": max(every), "interruptions_mean": round(statistics.mean(every), 3),
            "jobs_interrupted_twice_or_more": sum(1 for n in every if n >= 2),
            "runs_seen_by_jobs_max": max(n for r in results for n in r["runs"]),
            "steps_redone_per_deploy": [r["steps_redone"] for r in results],
            "all_finished_s": [round(r["all_finished_s"], 1) for r in results],
            "deploy_s": [round(r["deploy_s"], 1) for r in results],
            "overlapping_runs": sum(r["overlaps"] for r in results),
            "per_run_interruptions": [r["interruptions"] for r in results],
            "runs_repeated_after_a_database_restart": repeated,
        }
