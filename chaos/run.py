"""`python -m chaos run`: three supervisors sharing one database, jobs of
every kind, ~90 s of faults, then a clean drain and a check of every
invariant."""

import json
import math
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from sqlalchemy.engine import make_url

from chaos import checks
from chaos.jobs import clock
from chaos.cluster import (
    DEAD_AFTER,
    Supervisor,
    TreeWatcher,
    child_env,
    database_url,
    drop_postgres,
    ensure_pg_running,
    pg_cluster,
    pg_ctl,
    pg_ready,
    write_config,
)
from chaos.relay import Relay
from supervisor.database import SQLITE_BUSY_TIMEOUT_S, ensure_schema, make_engine
from supervisor.jobspec import new_job
from supervisor.storage import Storage

NAMES = ("alpha", "bravo", "charlie")
# (kind, share of the jobs). Durations are log-uniform over 50 ms - 3 s.
MIX = (("sleeper", 0.30), ("cpu", 0.20), ("steps", 0.15), ("grandchild", 0.10),
       ("fail_first", 0.15), ("always_fail", 0.10))
SUPERVISOR_FAULTS = ("deploy", "kill_supervisor", "kill_group", "freeze", "handoff")
EXIT_WAIT_S = 15.0  # a SIGTERMed supervisor must be gone by then (DB down included)


def plan_jobs(rng: random.Random, count: int, records: Path):
    """(kind, args) for each job, in a seeded mix."""
    kinds = [kind for kind, _ in MIX]
    weights = [share for _, share in MIX]
    planned = []
    for _ in range(count):
        kind = rng.choices(kinds, weights)[0]
        seconds = round(math.exp(rng.uniform(math.log(0.05), math.log(3.0))), 3)
        if kind == "steps":
            n = max(2, round(seconds / 0.1))
            args = [str(records), n, round(seconds / n, 3)]
        else:
            args = [str(records), seconds]
        planned.append((kind, args))
    return planned


def enqueue(storage: Storage, planned) -> dict[int, str]:
    specs = [new_job(f"chaos.jobs:{kind}", args, max_attempts=3, max_interruptions=50)
             for kind, args in planned]
    ids = storage.enqueue(*specs)
    return {job_id: kind for job_id, (kind, _) in zip(ids, planned)}


class Chaos:
    def __init__(self, db: str, seconds: float, job_count: int, seed: int, run_dir: Path):
        self.db, self.seconds, self.job_count, self.seed = db, seconds, job_count, seed
        self.rng = random.Random(seed)
        self.run_dir = run_dir
        self.records = run_dir / "records"
        self.records.mkdir()
        self.violations: list[str] = []
        self.actions = Counter()
        self.faults: list[dict] = []  # supervisor faults by the jobs' clock, for checks.completions
        self.db_faults: list[dict] = []
        self.log = open(run_dir / "chaos.log", "a")
        self.watcher = TreeWatcher().start()
        self.sups: list[Supervisor] = []
        self.relay: Relay | None = None  # the first supervisor's path to PostgreSQL

    def note(self, message: str) -> None:
        self.log.write(f"{time.monotonic():.3f} {message}\n")
        self.log.flush()

    # --- set-up -------------------------------------------------------------------

    def set_up(self) -> None:
        # A database of its own: two runs on one machine (two engineers, or
        # a run beside the test suite) must never share, or even drop, one.
        self.pg_database = f"shiftchange_chaos_{os.getpid()}"
        self.url = database_url(self.db, self.run_dir, self.pg_database)
        engine = make_engine(self.url)
        ensure_schema(engine)
        self.engine = engine
        self.storage = Storage(engine)
        self.config = write_config(self.run_dir / "chaos.yaml", self.url)
        self.sups = [Supervisor(name, self.config, self.run_dir, self.watcher) for name in NAMES]
        if self.db == "postgresql":
            # The first supervisor reaches the database through a relay that
            # can black-hole its traffic (a network partition).
            url = make_url(self.url)
            self.relay = Relay(url.host, url.port)
            relayed = url.set(port=self.relay.port).render_as_string(hide_password=False)
            self.sups[0].config_path = write_config(self.run_dir / "chaos-relayed.yaml", relayed)
        for sup in self.sups:
            sup.start()
        planned = plan_jobs(self.rng, self.job_count, self.records)
        self.plan = enqueue(self.storage, planned)
        (self.run_dir / "plan.json").write_text(json.dumps(self.plan))

    # --- supervisor faults ------------------------------------------------------------

    def supervisor_fault(self, sup: Supervisor, fault: str) -> None:
        self.note(f"{fault} {sup.name} pid {sup.pid}")
        self.faults.append({"fault": fault, "sup": sup.pid, "t": clock()})
        getattr(self, f"_{fault}")(sup)
        self.actions[fault] += 1

    def _deploy(self, sup):
        """Rolling deploy: SIGTERM, the process must exit, a new one starts."""
        sup.signal(signal.SIGTERM)
        self._must_exit(sup, "SIGTERM")
        sup.start()

    def _kill_supervisor(self, sup):
        sup.signal(signal.SIGKILL)
        sup.wait(EXIT_WAIT_S)
        time.sleep(self.rng.uniform(0, 2 * DEAD_AFTER))  # sometimes reaped by others first
        sup.start()

    def _kill_group(self, sup):
        sup.kill_tree()
        sup.wait(EXIT_WAIT_S)
        time.sleep(self.rng.uniform(0, 2 * DEAD_AFTER))
        sup.start()

    def _freeze(self, sup):
        """SIGSTOP for longer than dead_after: its children must fence
        themselves, others reap it, and when thawed it registers anew."""
        sup.signal(signal.SIGSTOP)
        time.sleep(DEAD_AFTER + self.rng.uniform(0.5, 1.5))
        sup.signal(signal.SIGCONT)

    def _handoff(self, sup):
        """`shiftchange handoff --server NAME` from outside, then restart."""
        cli = subprocess.Popen(
            [sys.executable, "-m", "supervisor", "handoff", "--server", sup.name, "--timeout", "5",
             "--config", str(self.config)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env(), cwd=self.run_dir,
        )
        # Reap the supervisor as soon as it exits, as systemd or a container
        # runtime would: the CLI waits for its pid to disappear, and a zombie
        # left unreaped by its parent would look alive to it.
        while cli.poll() is None:
            sup.proc.poll()
            time.sleep(0.02)
        output = cli.stdout.read().strip()
        self.note(f"handoff {sup.name}: exit {cli.returncode}: {output[-500:]}")
        if cli.returncode != 0:
            self.actions["handoff_cli_failed"] += 1  # e.g. the database is down: fall back
            sup.signal(signal.SIGTERM)
        elif sup.wait(2.0) is None:
            # The CLI stops only registered servers; this process had not
            # registered yet (still starting, or waiting for the database).
            # A platform would SIGTERM it next, and so do we.
            self.actions["handoff_found_it_unregistered"] += 1
            sup.signal(signal.SIGTERM)
        self._must_exit(sup, "handoff")
        sup.start()

    def _must_exit(self, sup, why: str) -> None:
        code = sup.wait(EXIT_WAIT_S)
        if code is None:
            self.violations.append(f"{sup.name} (pid {sup.pid}) still running {EXIT_WAIT_S:g}s after {why}")
            sup.kill_tree()
            sup.wait(EXIT_WAIT_S)
        self.note(f"{sup.name} exited with {code} after {why}")

    # --- database faults ---------------------------------------------------------------

    def database_faults(self, stop: threading.Event) -> None:
        """Once a restart, once a network partition of one supervisor
        (PostgreSQL) and once an outage, each longer than dead_after, at a
        third, a half and two thirds of the run."""
        began = time.monotonic()
        faults = [(self.seconds / 3, self.db_restart), (2 * self.seconds / 3, self.db_outage)]
        if self.relay is not None:
            faults.insert(1, (self.seconds / 2, self.db_black_hole))
        for at, fault in faults:
            if stop.wait(max(0.0, began + at - time.monotonic())):
                return
            started, started_clock = time.monotonic(), clock()
            outcome = fault()
            self.faults.append({"fault": f"db_{outcome['fault']}", "sup": None, "t": started_clock,
                                "until": clock()})
            outcome["seconds"] = round(time.monotonic() - started, 2)
            outcome["at"] = round(started - began, 1)
            self.db_faults.append(outcome)
            self.note(f"database fault: {outcome}")

    def db_restart(self) -> dict:
        if self.db == "postgresql":
            if pg_cluster() is None:
                return {"fault": "restart", "skipped": "no pg_ctlcluster on this host"}
            output = pg_ctl("restart")
            return {"fault": "restart", "ready": ensure_pg_running(), "output": output[-200:]}
        # SQLite has no server: the nearest thing is a writer that holds the
        # lock for longer than dead_after but less than the busy timeout, so
        # every call stalls instead of failing.
        return self._sqlite_lock("stall", DEAD_AFTER + 1.0)

    def db_outage(self) -> dict:
        hold = DEAD_AFTER + 2.0
        if self.db == "postgresql":
            if pg_cluster() is None:
                return {"fault": "outage", "skipped": "no pg_ctlcluster on this host"}
            pg_ctl("stop")
            down = not pg_ready()
            time.sleep(hold)
            pg_ctl("start")
            return {"fault": "outage", "was_down": down, "ready": ensure_pg_running()}
        # Held past the busy timeout, so calls fail with "database is locked".
        return self._sqlite_lock("outage", SQLITE_BUSY_TIMEOUT_S + hold)

    def db_black_hole(self) -> dict:
        """The relayed supervisor's traffic goes nowhere for longer than
        dead_after: nothing is refused or closed, nothing answers. It must
        fence its jobs, obey signals meanwhile, and register anew after."""
        hold = DEAD_AFTER + self.rng.uniform(1.0, 3.0)
        self.relay.black_hole()
        time.sleep(hold)
        self.relay.heal()
        return {"fault": "black_hole", "supervisor": self.sups[0].name, "held": round(hold, 2)}

    def _sqlite_lock(self, name: str, hold: float) -> dict:
        conn = sqlite3.connect(self.url.removeprefix("sqlite:///"), timeout=30, isolation_level=None)
        try:
            conn.execute("BEGIN EXCLUSIVE")
            time.sleep(hold)
            conn.execute("ROLLBACK")
        finally:
            conn.close()
        return {"fault": name, "how": f"BEGIN EXCLUSIVE held for {hold:g}s"}

    # --- the run -----------------------------------------------------------------------

    def chaos(self) -> None:
        stop = threading.Event()
        db_thread = threading.Thread(target=self.database_faults, args=(stop,), daemon=True)
        db_thread.start()
        end = time.monotonic() + self.seconds
        try:
            while time.monotonic() < end:
                sup = self.rng.choice(self.sups)
                fault = self.rng.choice(SUPERVISOR_FAULTS)
                self.supervisor_fault(sup, fault)
                time.sleep(self.rng.uniform(0.2, 1.5))
        finally:
            stop.set()
            db_thread.join()

    def drain(self, timeout: float) -> float:
        """Every supervisor running, no more faults: wait until no job is
        left to run. Returns the seconds it took."""
        for sup in self.sups:
            if not sup.running():
                sup.start()
        began = time.monotonic()
        while time.monotonic() - began < timeout:
            try:
                counts = self.storage.counts().get("default", {})
            except Exception as exc:  # the database may still be coming back
                self.note(f"drain: {exc}")
                counts = {"unknown": 1}
            if not any(counts.get(s) for s in ("enqueued", "scheduled", "processing", "unknown")):
                return time.monotonic() - began
            time.sleep(0.5)
        self.violations.append(f"jobs still not finished {timeout:g}s after the chaos ended: {counts}")
        return time.monotonic() - began

    def stop_all(self) -> None:
        for sup in self.sups:
            if sup.running():
                sup.signal(signal.SIGTERM)
        for sup in self.sups:
            if sup.proc is not None:
                self._must_exit(sup, "the final SIGTERM")

    def check(self) -> dict:
        self.engine.dispose()  # pooled connections may predate the database restart
        rows, history, now = checks.load_state(self.engine)
        found = {
            "final state": checks.final_states(self.plan, rows, now),
            "event history": [v for job_id in self.plan
                              for v in checks.replay(job_id, rows.get(job_id), history.get(job_id, []))],
            "failures": checks.unexpected_failures(self.plan, history),
        }
        run_violations, run_counts = checks.runs(self.plan, rows, self.records)
        found["runs"] = run_violations
        found["completions"], completion_counts = checks.completions(self.plan, history, self.records, self.faults)
        processes = dict(self.watcher.seen)
        processes.update(checks.recorded_processes(self.plan, self.records))
        deadline = time.monotonic() + 5  # a killed process may take a moment to go
        while checks.survivors(processes) and time.monotonic() < deadline:
            time.sleep(0.1)
        found["processes"] = checks.survivors(processes)
        for name, listed in found.items():
            self.violations += checks.limited(listed, name)
        states = Counter(row.state for row in rows.values())
        return {
            "states": dict(states),
            "designed_to_fail": sum(kind == "always_fail" for kind in self.plan.values()),
            "kinds": dict(Counter(self.plan.values())),
            "events": checks.event_counts(history),
            **run_counts,
            **completion_counts,
            "processes_seen": len(processes),
            "processes_left": len(found["processes"]),
            "violations_by_check": {name: len(v) for name, v in found.items()},
        }

    def clean_up(self) -> None:
        """Whatever happened: nothing of ours keeps running, PostgreSQL is up."""
        for sup in self.sups:
            if sup.running():
                sup.signal(signal.SIGCONT)
                sup.kill_tree()
                sup.wait(5)
        self.watcher.stop()
        if self.relay is not None:
            self.relay.close()
        for (pid, created), _ in list(self.watcher.seen.items()):
            if checks.alive(pid, created):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self.db == "postgresql" and not ensure_pg_running():
            self.violations.append("PostgreSQL did not come back up")
        if self.db == "postgresql" and getattr(self, "engine", None) is not None:
            self.engine.dispose()
            drop_postgres(self.pg_database)


def run(db: str, seconds: float, job_count: int, seed: int | None, keep: bool) -> int:
    seed = seed if seed is not None else random.SystemRandom().randrange(1 << 30)
    run_dir = Path(tempfile.mkdtemp(prefix="shiftchange-chaos-"))
    chaos = Chaos(db, seconds, job_count, seed, run_dir)
    report = {"mode": "chaos", "db": db, "seed": seed, "seconds": seconds, "jobs": job_count}
    began = time.monotonic()
    try:
        chaos.set_up()
        chaos.chaos()
        report["drain_seconds"] = round(chaos.drain(timeout=max(120.0, job_count * 0.5)), 1)
        chaos.stop_all()
        report.update(chaos.check())
    except BaseException as exc:
        chaos.violations.append(f"the chaos run itself failed: {type(exc).__name__}: {exc}")
        raise
    finally:
        chaos.clean_up()
        report["actions"] = dict(chaos.actions)
        report["db_faults"] = chaos.db_faults
        report["total_seconds"] = round(time.monotonic() - began, 1)
        report["violations"] = chaos.violations
        if chaos.violations or keep:
            report["run_dir"] = str(run_dir)  # logs, records and plan for a post-mortem
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
        print(json.dumps(report, indent=1))
        sys.stdout.flush()
    return 1 if chaos.violations else 0
