"""python -m benchmarks.fleet [--db postgresql,mariadb] [--servers 10,40] [--code DIR]

What N idle servers cost one database, and whether they still pick up jobs
and recover a crashed server in time (issue 19). For each database and N:

- transactions per second over a window (PostgreSQL: pg_stat_database
  xact_commit of the benchmark's database; MariaDB: SHOW GLOBAL STATUS
  Com_commit + Com_rollback and Questions, minus a window with no server,
  since MariaDB counts the whole instance);
- CPU of the supervisors, and of the database server's processes (minus the
  same window with no server: the machine is shared);
- pickup latency: enqueue -> the job's first line of code, with every
  server idle (a pause between jobs), p50 and p99;
- crash recovery (largest N only): kill -9 the supervisor running a job ->
  the job's code running again elsewhere.

`--code DIR` runs the supervisors from another checkout (e.g. main, for
"before" figures). Prints one JSON line per measurement; default settings
(heartbeat 1 s, dead_after 10 s, poll 200 ms) unless --set is given.
"""

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml
from sqlalchemy import create_engine, text

from benchmarks.procs import SERVER_URLS
from supervisor import Queue
from supervisor.database import _driver_url

REPO = Path(__file__).resolve().parents[1]
BENCH_DB = "shiftchange_fleet_bench"
JOBS = '''
import os, time

def started(path):
    with open(path, "a") as f:
        f.write(f"{time.time():.6f} {os.getpid()}\\n")

def hold(path):
    started(path)
    time.sleep(600)
'''


def admin_engine(kind):
    return create_engine(_driver_url(SERVER_URLS[kind]), isolation_level="AUTOCOMMIT")


def fresh_database(kind) -> str:
    admin = admin_engine(kind)
    with admin.connect() as conn:
        force = " WITH (FORCE)" if kind == "postgresql" else ""
        conn.execute(text(f"DROP DATABASE IF EXISTS {BENCH_DB}{force}"))
        conn.execute(text(f"CREATE DATABASE {BENCH_DB}"))
    admin.dispose()
    return _driver_url(SERVER_URLS[kind]).set(database=BENCH_DB).render_as_string(hide_password=False)


def commits(kind, admin) -> float:
    """Committed transactions so far (PostgreSQL: this database's only)."""
    with admin.connect() as conn:
        if kind == "postgresql":
            conn.execute(text("SELECT pg_stat_clear_snapshot()"))
            return conn.execute(text("SELECT xact_commit + xact_rollback FROM pg_stat_database "
                                     "WHERE datname = :d"), {"d": BENCH_DB}).scalar_one()
        status = dict(conn.execute(text(
            "SHOW GLOBAL STATUS WHERE Variable_name IN ('Com_commit', 'Com_rollback', 'Questions')")).all())
        return int(status["Com_commit"]) + int(status["Com_rollback"]), int(status["Questions"])


def db_processes(kind):
    names = {"postgresql": ("postgres",), "mariadb": ("mariadbd", "mysqld")}[kind]
    return [p for p in psutil.process_iter(["name"]) if p.info["name"] in names]


def cpu_seconds(procs) -> float:
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


def window(kind, admin, supervisors, seconds):
    """Transactions/s, supervisor CPU % and database CPU % over `seconds`."""
    dbs = db_processes(kind)  # PostgreSQL backends come and go: counted per window
    sups = [psutil.Process(p.pid) for p in supervisors]
    before = commits(kind, admin), cpu_seconds(sups), cpu_seconds(dbs), time.monotonic()
    time.sleep(seconds)  # the measurement window
    after = commits(kind, admin), cpu_seconds(sups), cpu_seconds(db_processes(kind) if kind == "postgresql" else dbs), time.monotonic()
    elapsed = after[3] - before[3]
    if kind == "postgresql":
        tx, questions = (after[0] - before[0]) / elapsed, None
    else:
        tx, questions = (after[0][0] - before[0][0]) / elapsed, (after[0][1] - before[0][1]) / elapsed
    return {"tx_per_s": tx, "questions_per_s": questions,
            "supervisor_cpu_pct": 100 * (after[1] - before[1]) / elapsed,
            "db_cpu_pct": 100 * (after[2] - before[2]) / elapsed}


def start_servers(url, workdir, code, n, settings):
    config = {
        "database": {"url": url},
        "server": {"heartbeat_interval": "1s", "dead_after": "10s", "poll_interval": "200ms", "concurrency": 1,
                   **settings},
        "shutdown": {"kill_after": "0s"},
        "jobs": {"allow": ["fleetjobs:*"], "max_interruptions": 1000},
        "log": {"level": "warning"},
    }
    (workdir / "fleet.yaml").write_text(yaml.safe_dump(config))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(code), str(workdir)]))
    env.pop("NOTIFY_SOCKET", None)
    procs = []
    for i in range(n):
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "supervisor", "run", "--config", str(workdir / "fleet.yaml"), "--name", f"f{i}"],
            stdout=subprocess.DEVNULL, stderr=open(workdir / f"f{i}.log", "w"), env=env, cwd=workdir,
            start_new_session=True,
        ))
        if i == 0:
            time.sleep(3.0)  # the first one creates the schema alone
    return procs


def wait_until(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.1)


def lines(path):
    try:
        return Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []


def pickup(queue, workdir, jobs, gap):
    """Enqueue -> job code running, one job at a time, every server idle."""
    marker = workdir / "pickup"
    latencies = []
    for i in range(jobs):
        time.sleep(gap * (0.5 + random.random()))  # idle servers, a random phase against their polls
        t0 = time.time()
        queue.enqueue("fleetjobs:started", [str(marker)])
        wait_until(lambda: len(lines(marker)) > i, 30, "a job to start")
        latencies.append(float(lines(marker)[i].split()[0]) - t0)
    latencies.sort()
    return {"pickup_p50_ms": 1000 * statistics.median(latencies),
            "pickup_p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            "pickup_max_ms": 1000 * latencies[-1], "jobs": jobs}


def recovery(queue, workdir, procs):
    """kill -9 the supervisor running a job -> its code running again."""
    marker = workdir / "recovery"
    job = queue.enqueue("fleetjobs:hold", [str(marker)])
    wait_until(lambda: len(lines(marker)) >= 1, 30, "the held job to start")
    server = queue.get(job.id).server
    pid = next(s.pid for s in queue.servers() if s.id == server)
    killed = time.time()
    os.killpg(pid, signal.SIGKILL)
    wait_until(lambda: len(lines(marker)) >= 2, 60, "the job to run again")
    return {"recovery_s": float(lines(marker)[1].split()[0]) - killed}


def measure(kind, n, code, seconds, pickups, settings, crash):
    workdir = Path(tempfile.mkdtemp(prefix="fleet-"))
    (workdir / "fleetjobs.py").write_text(JOBS)
    url = fresh_database(kind)
    admin = admin_engine(kind)
    baseline = window(kind, admin, [], seconds) if kind == "mariadb" else None
    db_idle = window(kind, admin, [], seconds)["db_cpu_pct"] if kind == "postgresql" else baseline["db_cpu_pct"]
    procs = start_servers(url, workdir, code, n, settings)
    try:
        queue = Queue(url)
        wait_until(lambda: sum(s.state == "running" for s in queue.servers()) >= n, 120, f"{n} servers")
        time.sleep(15.0)  # past start-up (PostgreSQL flushes idle backends' counters up to 10 s late)
        idle = window(kind, admin, procs, seconds)
        if baseline is not None:  # MariaDB counts every database of the instance
            idle["tx_per_s"] -= baseline["tx_per_s"]
            idle["questions_per_s"] -= baseline["questions_per_s"]
        idle["db_cpu_pct"] -= db_idle
        result = {"measurement": "fleet_idle", "db": kind, "servers": n, "window_s": seconds,
                  "tx_per_s_per_server": idle["tx_per_s"] / n, **idle,
                  "load_1m": os.getloadavg()[0], "code": str(code), "settings": settings}
        result.update(pickup(queue, workdir, pickups, gap=1.0))
        if crash:
            result.update(recovery(queue, workdir, procs))
        queue.close()
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}
    finally:
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in procs:
            proc.wait()
        admin.dispose()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fleet")
    parser.add_argument("--db", default="postgresql,mariadb")
    parser.add_argument("--servers", default="10,40")
    parser.add_argument("--code", default=str(REPO), help="checkout whose supervisor the servers run")
    parser.add_argument("--seconds", type=float, default=20.0, help="the idle measurement window")
    parser.add_argument("--pickups", type=int, default=40)
    parser.add_argument("--set", action="append", default=[], help="server setting, e.g. safety_poll=5s")
    options = parser.parse_args(argv)
    settings = dict(item.split("=", 1) for item in options.set)
    sizes = [int(n) for n in options.servers.split(",")]
    for kind in options.db.split(","):
        for n in sizes:
            print(json.dumps(measure(kind, n, options.code, options.seconds, options.pickups, settings,
                                     crash=n == max(sizes))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
