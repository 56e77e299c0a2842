"""`shiftchange demo`: watch a rolling deploy move long jobs from one
supervisor to another, offline, on a scratch SQLite database.

The demo plays the deploy tool. It enqueues long CPU-bound jobs that ignore
SIGTERM (supervisor.demo_jobs:crunch), starts supervisor "old", waits until
every job is running and has saved a checkpoint, starts supervisor "new" (the
new release is up), then sends SIGTERM to "old" and narrates what happens:
the handoff commit, the takeover on "new", the resumed steps. It ends with a
table, and exits 1 if what it set out to show did not happen (every job
handed off by "old" and succeeded on "new"); proving the invariants is the
chaos run's job, not the demo's.

Everything is synchronised by polling the database (or a process) against a
deadline; the short sleeps only pace those polls. Every process the demo
starts is stopped in a finally block, and the temporary directory goes with it.
"""

import json
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from supervisor.logs import first_event
from supervisor.launcher import SupervisorProcess
from supervisor.processes import clock, die_with_parent
from supervisor.queue import Queue

TARGET = "supervisor.demo_jobs:crunch"
STEPS = 20
STEP_SECONDS = 0.4
DEPLOY_AT_STEP = 3  # deploy once every job has checkpointed at least this far
KILL_AFTER_S = 1.0
POLL_S = 0.01  # pace of the demo's polls; the handoff itself takes milliseconds
START_TIMEOUT_S = 20.0  # a supervisor registering, jobs reaching DEPLOY_AT_STEP
HANDOVER_TIMEOUT_S = 20.0  # from the SIGTERM until every job runs on new
STOP_TIMEOUT_S = 10.0  # a supervisor exiting after SIGTERM
FINISHED = ("succeeded", "failed")
# A user's own settings must not point the demo's supervisors elsewhere.
IGNORED_ENV = ("SHIFTCHANGE_DATABASE_URL", "SHIFTCHANGE_CONFIG")


class DemoFailed(Exception):
    """Something the demo set out to show did not happen."""


class Started(SupervisorProcess):
    """A supervisor process the demo started, and what the demo saw of it."""

    server_id: str | None = None
    exited_at: float | None = None  # by clock()


@dataclass
class Deploy:
    """What the demo saw after sending SIGTERM to old."""

    signalled_at: float  # clock(), like every time below
    left_old: dict[int, float] = field(default_factory=dict)  # job id -> seen requeued or on new
    handoff_seen_at: float | None = None  # every job has left old
    handoff_told: bool = False
    handoff_log_ms: float | None = None
    claimed_by_new: dict[int, float] = field(default_factory=dict)  # job id -> clock()
    resumed_at_step: dict[int, int] = field(default_factory=dict)


@dataclass
class Run:
    """One run of a job (one process), from the trace file crunch writes."""

    pid: int
    interruptions: int
    start: int
    done: list[int] = field(default_factory=list)


def run_demo(jobs_count: int) -> int:
    """The `shiftchange demo` command; returns the exit code."""
    # A SIGTERM (a CI timeout, `kill`) must run the clean-up like Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)
    with tempfile.TemporaryDirectory(prefix="shiftchange-demo-") as workdir:
        demo = Demo(Path(workdir), jobs_count)
        try:
            problems = demo.run()
        except DemoFailed as exc:
            problems = [str(exc)]
        finally:
            demo.clean_up()
        if problems:
            demo.report_failure(problems)
            return 1
        print(f"\nOK: all {jobs_count} jobs moved from old to new in the deploy, resumed from their "
              "checkpoints, and succeeded on new.")
        return 0


class Demo:
    def __init__(self, workdir: Path, jobs_count: int):
        self.dir = workdir
        self.jobs_count = jobs_count
        self.url = f"sqlite:///{workdir / 'demo.db'}"
        self.config_path = workdir / "shiftchange.yaml"
        self.trace_path = workdir / "trace.jsonl"
        self.queue: Queue | None = None
        self.job_ids: list[int] = []
        self.started: list[Started] = []
        self.deploy: Deploy | None = None

    # --- the story, in order ------------------------------------------------------

    def run(self) -> list[str]:
        """Play the deploy; returns the problems found (none: success)."""
        self.intro()
        self.write_config()
        self.queue = Queue(self.url)  # creates the schema before any supervisor starts
        self.enqueue_jobs()
        old = self.start_supervisor("old")
        self.wait_until_checkpointed(old)
        new = self.start_supervisor("new")
        self.say("the new release is up: new will take the jobs over\n")
        self.deploy = self.hand_over(old, new)
        self.wait_until_finished(new)
        self.stop_new(new)
        jobs = {job_id: self.queue.get(job_id) for job_id in self.job_ids}
        runs = self.read_trace()
        self.print_summary(jobs, runs)
        return self.check(jobs, old, new)

    def intro(self) -> None:
        print(f"shiftchange demo: {self.jobs_count} long CPU-bound jobs ({STEPS} steps of "
              f"{STEP_SECONDS:g}s each, SIGTERM ignored, a checkpoint after every step)\n"
              "move from supervisor 'old' to supervisor 'new' in a rolling deploy.\n"
              f"Scratch database: {self.url} (removed at the end)\n", flush=True)

    def write_config(self) -> None:
        config = {
            "database": {"url": self.url},
            "server": {
                "concurrency": self.jobs_count,
                # Short intervals so the demo is quick; see docs/deploying.md
                # for production values.
                "heartbeat_interval": "500ms",
                "dead_after": "3s",
                "poll_interval": "100ms",
            },
            "shutdown": {"kill_after": f"{KILL_AFTER_S:g}s"},
            "jobs": {"allow": ["supervisor.demo_jobs:*"]},
            "log": {"format": "json"},  # the demo reads old's handed_off event
        }
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    def enqueue_jobs(self) -> None:
        kwargs = {"steps": STEPS, "step_seconds": STEP_SECONDS, "trace": str(self.trace_path)}
        self.job_ids = [self.queue.enqueue(TARGET, kwargs=kwargs).id for _ in range(self.jobs_count)]
        self.say(f"enqueued jobs {_ids(self.job_ids)} ({TARGET})")

    def start_supervisor(self, name: str) -> Started:
        env = {k: v for k, v in os.environ.items() if k not in IGNORED_ENV}
        # die_with_parent: even a kill -9 of the demo leaves nothing running.
        started = Started(name, self.config_path, self.dir, env=env, preexec_fn=die_with_parent).start()
        self.started.append(started)
        server = self.poll(f"supervisor {name} registers", START_TIMEOUT_S,
                           lambda: self.registered(started), alive=[started])
        started.server_id = server.id
        self.say(f"supervisor {name} started (pid {started.pid}), registered as server {server.id}")
        return started

    def registered(self, started: Started):
        for server in self.queue.servers():
            if server.name == started.name and server.pid == started.pid and server.state == "running":
                return server
        return None

    def wait_until_checkpointed(self, old: Started) -> None:
        """Deploy only once every job runs on old and has saved progress, so
        that resuming from a checkpoint is visible."""

        def ready():
            jobs = self.current_jobs()
            ok = all(job.state == "processing" and job.server == old.server_id
                     and _step(job.checkpoint) >= DEPLOY_AT_STEP for job in jobs.values())
            return jobs if ok else None

        jobs = self.poll(f"every job runs on old with a checkpoint at step >= {DEPLOY_AT_STEP}",
                         START_TIMEOUT_S, ready, alive=[old])
        steps = ", ".join(str(_step(jobs[i].checkpoint)) for i in self.job_ids)
        self.say(f"jobs {_ids(self.job_ids)} running on old; checkpoints saved at steps {steps}")

    def hand_over(self, old: Started, new: Started) -> Deploy:
        """SIGTERM to old, then watch until the handoff is committed, every
        job runs on new, and old has exited."""
        jobs = self.current_jobs()
        steps = ", ".join(str(_step(jobs[i].checkpoint)) for i in self.job_ids if i in jobs)
        self.say(f"while new started, the jobs went on on old: last checkpoints now at steps {steps}")
        print("deploy: stopping old (t = 0 at the SIGTERM)", flush=True)
        deploy = Deploy(signalled_at=clock())
        self.deploy = deploy
        os.kill(old.pid, signal.SIGTERM)
        self.say(f"SIGTERM to old (pid {old.pid})", at=deploy.signalled_at)

        def handed_over():
            jobs = self.current_jobs()
            self.note_handoff(deploy, jobs, old)
            self.note_takeovers(deploy, jobs, new)
            self.note_exit(old)
            return (deploy.handoff_told and old.exited_at is not None
                    and len(deploy.resumed_at_step) == len(self.job_ids))

        self.poll("the jobs are handed over to new and old exits", HANDOVER_TIMEOUT_S,
                  handed_over, alive=[new])
        return deploy

    def note_handoff(self, deploy: Deploy, jobs: dict, old: Started) -> None:
        """The handoff is committed once no job is processing on old any more
        (requeued, or already claimed by new)."""
        for job_id, job in jobs.items():
            if job_id not in deploy.left_old and job.server != old.server_id:
                deploy.left_old[job_id] = clock()
        if deploy.handoff_seen_at is None and len(deploy.left_old) == len(self.job_ids):
            deploy.handoff_seen_at = max(deploy.left_old.values())
        if deploy.handoff_seen_at is None or deploy.handoff_told:
            return
        # Old logs its own measure just after the commit; give it until it exits.
        handed_off = first_event(old.log(), "handed_off")
        if handed_off is None and old.proc.poll() is None:
            return
        deploy.handoff_log_ms = handed_off.get("ms") if handed_off else None
        measured = f"old log: {deploy.handoff_log_ms:g} ms" if handed_off else "no handed_off event in old's log"
        self.say(f"handoff committed: jobs {_ids(self.job_ids)} requeued in one transaction, "
                 f"held until old's runs are dead ({measured})", at=deploy.handoff_seen_at)
        deploy.handoff_told = True

    def note_takeovers(self, deploy: Deploy, jobs: dict, new: Started) -> None:
        """A job is taken over once new has claimed it and its new run has
        started (the trace says from which step)."""
        runs = None
        for job_id, job in jobs.items():
            if job.server == new.server_id and job_id not in deploy.claimed_by_new:
                deploy.claimed_by_new[job_id] = clock()
            if job_id not in deploy.claimed_by_new or job_id in deploy.resumed_at_step:
                continue
            runs = runs if runs is not None else self.read_trace()
            if len(runs.get(job_id, [])) >= 2:
                step = runs[job_id][-1].start
                deploy.resumed_at_step[job_id] = step
                self.say(f"job {job_id} running on new, resumed at step {step} (the last checkpoint old "
                         f"saved before the handoff)")

    def note_exit(self, old: Started) -> None:
        if old.exited_at is None and old.proc.poll() is not None:
            old.exited_at = clock()
            took = old.exited_at - self.deploy.signalled_at
            self.say(f"old exited {old.proc.returncode} after {took:.2f}s")

    def wait_until_finished(self, new: Started) -> None:
        announced: set[int] = set()

        def finished():
            for job_id, job in self.current_jobs().items():
                if job.state in FINISHED and job_id not in announced:
                    announced.add(job_id)
                    where = "on new" if job.server == new.server_id else f"on server {job.server}"
                    self.say(f"job {job_id} {job.state} {where}")
            return len(announced) == len(self.job_ids)

        self.poll("every job finishes", STEPS * STEP_SECONDS + START_TIMEOUT_S, finished, alive=[new])

    def stop_new(self, new: Started) -> None:
        """The end of the demo, not part of the deploy: new hands nothing off."""
        os.kill(new.pid, signal.SIGTERM)
        self.say(f"SIGTERM to new (pid {new.pid})")
        code = new.wait(STOP_TIMEOUT_S)
        if code is None:
            raise DemoFailed(f"supervisor new did not exit within {STOP_TIMEOUT_S:g}s of SIGTERM")
        self.say(f"new exited {code}")

    # --- the summary and the checks ------------------------------------------------

    def print_summary(self, jobs: dict, runs: dict) -> None:
        deploy = self.deploy
        header = f"{'job':>4}  {'handoff ms':>10}  {'takeover s':>10}  {'resumed at':>10}  {'state':<10}  events"
        print("\n" + header + "\n" + "-" * len(header))
        for job_id in self.job_ids:
            job = jobs[job_id]
            handoff_ms = _since(deploy, deploy.left_old.get(job_id), 1000, "{:.1f}")
            takeover_s = _since(deploy, deploy.claimed_by_new.get(job_id), 1, "{:.2f}")
            job_runs = runs.get(job_id, [])
            resumed = f"step {job_runs[-1].start}" if len(job_runs) >= 2 else "-"
            kinds = ", ".join(e.kind for e in job.events or [])
            print(f"{job_id:>4}  {handoff_ms:>10}  {takeover_s:>10}  {resumed:>10}  {job.state:<10}  {kinds}")
        log_ms = f"{deploy.handoff_log_ms:g} ms" if deploy.handoff_log_ms is not None else "not logged"
        print(f"\nhandoff ms: SIGTERM -> the demo saw the job requeued; takeover s: SIGTERM -> the demo "
              f"saw it claimed by new (polling every {POLL_S * 1000:g} ms).\n"
              f"The handoff commit as old measured it: {log_ms}.")
        print("stale_write: a run on old tried to save a checkpoint after the handoff; its lease was "
              "no longer current, so the write was refused and that run stopped.")

    def check(self, jobs: dict, old: Started, new: Started) -> list[str]:
        """What the demo set out to show, in a line each when it did not
        happen. (That no step ran twice, nothing was lost and no two runs
        overlapped is the chaos run's to prove: chaos/checks.py.)"""
        problems = []
        if old.proc.returncode != 0:
            problems.append(f"supervisor old exited {old.proc.returncode}, not 0: the handoff was not committed")
        if self.deploy.handoff_log_ms is None:
            problems.append("old's log has no handed_off event")
        for job_id in self.job_ids:
            job = jobs[job_id]
            if job.state != "succeeded" or job.server != new.server_id:
                problems.append(f"job {job_id} ended {job.state} on server {job.server}, not succeeded on new: "
                                f"{(job.error or '').strip()}")
        return problems

    def report_failure(self, problems: list[str]) -> None:
        err = sys.stderr
        print("\nshiftchange demo: FAILED", file=err)
        for problem in problems:
            print(f"  - {problem}", file=err)
        for started in self.started:
            tail = started.log().splitlines()[-25:]
            print(f"\nlast lines of supervisor {started.name}'s log:", file=err)
            print("\n".join(f"  {line}" for line in tail) or "  (empty)", file=err)

    # --- helpers --------------------------------------------------------------------

    def say(self, message: str, at: float | None = None) -> None:
        """A line of the narrative; timed from the SIGTERM once the deploy began."""
        if self.deploy is None:
            print(f"  {message}", flush=True)
            return
        seconds = (clock() if at is None else at) - self.deploy.signalled_at
        print(f"t=+{seconds:.3f}s {message}", flush=True)

    def poll(self, what: str, timeout: float, check, alive: list[Started]):
        """Call `check` until it returns something truthy (returned) or
        `timeout` passes (DemoFailed). A supervisor in `alive` that exits
        meanwhile fails the demo at once, with its exit code."""
        deadline = clock() + timeout
        while True:
            for started in alive:
                if started.proc.poll() is not None:
                    raise DemoFailed(f"supervisor {started.name} exited {started.proc.returncode} "
                                     f"while waiting until {what}")
            result = check()
            if result:
                return result
            if clock() >= deadline:
                raise DemoFailed(f"timed out after {timeout:g}s waiting until {what}{self.job_states()}")
            time.sleep(POLL_S)

    def current_jobs(self) -> dict:
        """The demo's jobs (without events: cheap enough to poll), failing
        the demo as soon as one has failed."""
        jobs = {job.id: job for job in self.queue.jobs(limit=len(self.job_ids) + 10) if job.id in self.job_ids}
        for job in jobs.values():
            # `scheduled` is a failed run waiting for its retry.
            if job.state in ("failed", "scheduled"):
                raise DemoFailed(f"job {job.id} failed (attempt {job.attempts}, now {job.state}): "
                                 f"{(job.error or '').strip()}")
        return jobs

    def job_states(self) -> str:
        try:
            jobs = self.current_jobs()
        except Exception:
            return ""
        return "; jobs now: " + ", ".join(
            f"{i} {jobs[i].state} on {jobs[i].server or '-'} at step {_step(jobs[i].checkpoint)}"
            for i in self.job_ids if i in jobs
        )

    def read_trace(self) -> dict[int, list[Run]]:
        """The runs of each job, in order, from crunch's trace file."""
        runs: dict[int, list[Run]] = {}
        try:
            lines = self.trace_path.read_text().splitlines()
        except FileNotFoundError:
            return runs
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line being written right now
            job_runs = runs.setdefault(entry["job"], [])
            if entry["event"] == "start":
                job_runs.append(Run(entry["pid"], entry["interruptions"], entry["step"]))
            elif job_runs and job_runs[-1].pid == entry["pid"]:
                job_runs[-1].done.append(entry["step"])
            else:  # a late line from an earlier run: file it with its own run
                for run in job_runs:
                    if run.pid == entry["pid"]:
                        run.done.append(entry["step"])
        return runs

    def clean_up(self) -> None:
        """Stop every supervisor the demo started (their children die with
        them), and let go of the database before its directory goes."""
        for started in self.started:
            _stop(started)
        if self.queue is not None:
            self.queue.close()


# --- functions without state --------------------------------------------------------



def _since(deploy: Deploy, moment: float | None, scale: float, form: str) -> str:
    return "-" if moment is None else form.format((moment - deploy.signalled_at) * scale)


def _step(checkpoint) -> int:
    return (checkpoint or {}).get("step", 0) if isinstance(checkpoint, dict) else 0


def _ids(ids) -> str:
    return ", ".join(map(str, ids))



def _interrupt(signum, _frame):
    raise KeyboardInterrupt(f"received {signal.Signals(signum).name}")


def _stop(started: Started) -> None:
    """SIGTERM (the supervisor hands off and kills its children), then, if
    that does not end it, SIGKILL it and everything below it."""
    if started.proc is None or started.proc.poll() is not None:
        return
    started.send(signal.SIGTERM)
    if started.wait(STOP_TIMEOUT_S) is None:
        started.destroy()
