"""The supervisor: one process, one loop. It never runs job code. (Its one
other thread is shutdown.py's bound on a storage call that may hang.)

Signal handlers only queue the signal (and wake the loop through a pipe);
the loop waits on that pipe and on the children's result pipes with a
timeout, then does whatever is due: collect finished children and record
their outcome, heartbeat (which also takes the fleet chores that are due:
reaping dead servers, promoting scheduled jobs, sweeping), claim new jobs.
The shutdown sequence lives in shutdown.py and is called from here.
"""

import logging
import os
import select
import signal
import socket

from supervisor import systemd
from supervisor.children import IdleSlot, RunningJob, spawn
from supervisor.config import Config, format_duration
from supervisor.database import bounds_for, ensure_schema, make_engine
from supervisor.dbtime import to_iso
from supervisor.errors import EXIT_OK, StorageRefused, StorageUnavailable
from supervisor.jobprocess import Assignment
from supervisor.logs import event
from supervisor.outcomes import write_outcome
from supervisor.processes import (
    become_subreaper,
    clock,
    has_children,
    is_same_process,
    kill_tree,
    set_title,
    signal_group,
    start_time,
    tree_rss,
)
from supervisor.records import Job
from supervisor.recurring import EntryError, Schedule, entry_from_row, not_allowed
from supervisor.storage import LIVE_SERVER_STATES, Storage
from supervisor.targets import AllowList, TargetRefused, job_import_path
from supervisor.wakeup import Wakeups

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
QUIET_SIGNAL = signal.SIGTSTP  # as Sidekiq: stop claiming, keep running jobs
SWEEP_EVERY_S = 300.0
CLAIM_BATCH = 4
KILL_REAP_TIMEOUT_S = 5.0  # SIGKILLed processes in D state may take a moment
MAX_BACKOFF_S = 5.0


class Supervisor:
    """The supervisor process's state and its verbs. `clock` is injected so
    that its decisions (deadlines, waits, the fence) can be tested without
    real time passing; in production it is processes.clock."""

    def __init__(self, config: Config, clock=clock):
        self.clock = clock
        self.config = config
        self.db_bounds = bounds_for(config.server.heartbeat_interval, config.server.dead_after)
        self.allow = AllowList(config.jobs.allow, config.jobs.allow_commands)
        self.import_path = job_import_path(config.jobs.path)
        self.storage: Storage | None = None
        self.server_id: str | None = None
        self.running: dict[int, RunningJob] = {}  # by child pid
        self.slots: dict[int, IdleSlot] = {}  # children between jobs, by pid (jobs.reuse_processes)
        self.signals: list[tuple[int, float]] = []  # (signal, when it came)
        self.stop_signal: int | None = None  # the signal that began shutdown
        self.stop_signal_at: float | None = None
        self.hurry = False  # a second stop signal: skip what waiting is left
        self.claiming = True
        self.quiet = False  # asked not to claim (SIGTSTP, `shiftchange quiet`), still serving
        self.quiet_wanted = False  # SIGTSTP came; storage does not know yet
        self.idle = True  # the last claim found nothing
        self.notified = False  # a NOTIFY came since the last claim
        self.dropping = False  # outcomes are not ours to record any more
        self.exit_requested = False
        self.draining = False  # shutdown step 2: the loop runs, claiming has stopped
        # outcomes to record: (job, kind, error, result JSON, claim in doubt: see _record)
        self.pending: list[tuple[Job, str, str | None, str | None, bool]] = []
        self.last_beat_sent = self.clock()
        self.beat_failing_since: float | None = None
        self.fenced = False  # we killed our children for want of a heartbeat
        self.next_beat = self.next_claim = 0.0
        self.next_watchdog = 0.0
        self.watchdog = systemd.watchdog_interval()
        self.wakeups: Wakeups | None = None
        # Recurring jobs: the entries this server watches, and the offset of
        # the database clock from self.clock, measured at each heartbeat.
        self.schedule = Schedule()
        self.db_offset: float | None = None
        self.next_recurring = float("inf")  # self.clock time of the next tick
        self.bad_entries: set[str] = set()  # API entries we could not read, logged once

    # --- signals -----------------------------------------------------------------

    def install_signals(self) -> None:
        self.wakeup_r, wakeup_w = os.pipe()
        os.set_blocking(self.wakeup_r, False)
        os.set_blocking(wakeup_w, False)
        signal.set_wakeup_fd(wakeup_w, warn_on_full_buffer=False)
        for sig in (*STOP_SIGNALS, QUIET_SIGNAL, signal.SIGCHLD):
            signal.signal(sig, self._queue_signal)

    def _queue_signal(self, signum, _frame) -> None:
        # Only queue: logging, killing and waiting happen in the loop.
        self.signals.append((signum, self.clock()))

    def handle_signals(self) -> None:
        while self.signals:
            signum, at = self.signals.pop(0)
            if signum == signal.SIGCHLD:
                continue  # collect_children runs on every wake-up anyway
            if signum == QUIET_SIGNAL:
                self.quiet_wanted = True  # written to storage by the loop
                self._note_quiet(True, f"received {signal.Signals(signum).name}")
                continue
            if self.stop_signal is None:
                self.stop_signal, self.stop_signal_at = signum, at
                event("received %s: shutting down", signal.Signals(signum).name, event="signal")
            elif not self.hurry:
                self.hurry = True
                event("received %s again: skipping the waits", signal.Signals(signum).name, event="signal")

    def wait(self, timeout: float) -> None:
        """Sleep until a signal, a child's message, news of claimable jobs,
        or `timeout` seconds."""
        fds = [self.wakeup_r, *(child.results for child in self.running.values())]
        listening = self.wakeups.fileno() if self.wakeups and self.claiming else None
        if listening is not None:
            fds.append(listening)
        try:
            ready, _, _ = select.select(fds, [], [], max(0.0, timeout))
        except InterruptedError:
            ready = []
        if listening in ready and self.wakeups.drain():
            self.next_claim = self.clock()  # news, or LISTEN broke: look now
            self.notified = True  # a job was announced: claim without probing first
        try:
            while os.read(self.wakeup_r, 4096):
                pass
        except BlockingIOError:
            pass
        self.handle_signals()

    # --- start -------------------------------------------------------------------

    def start(self) -> bool:
        """Connect (retrying with backoff), create the schema on an empty
        database, reap our own dead previous incarnation, register. False
        when a stop signal came first. An error that retrying cannot fix
        (no such database, authentication failed) is raised at once."""
        # database.retry_for counts from the first failure, not from start-up:
        # a run slow to start (a loaded host) still retries before giving up.
        give_up_at = None
        delay = 0.2
        engine = make_engine(self.config.database.url, bounds=self.db_bounds,
                             sqlite_synchronous=self.config.database.sqlite_synchronous, batches=True)
        while True:
            try:
                ensure_schema(engine)
                self.storage = Storage(engine, self.config.server.release_window)
                self.storage.prepare_handoff()  # nothing slow at SIGTERM
                self.wakeups = Wakeups(engine)
                self._reap_previous_incarnation()
                self._register()
                return True
            except StorageRefused:
                raise
            except StorageUnavailable as exc:
                if give_up_at is None:
                    give_up_at = self.clock() + self.config.database.retry_for
                if self.clock() + delay > give_up_at:
                    raise StorageUnavailable(
                        f"{exc} (gave up after database.retry_for = {self.config.database.retry_for:g}s)"
                    ) from None
                event("%s; retrying in %.1fs", exc, delay, level=logging.WARNING, event="db_unreachable")
                self.wait(delay)
                if self.stop_signal is not None:
                    return False
                delay = min(delay * 2, MAX_BACKOFF_S)

    def _register(self) -> None:
        server = self.config.server
        self.last_beat_sent = self.clock()
        self.server_id = self.storage.register_server(
            name=server.name,
            host=socket.gethostname(),
            pid=os.getpid(),
            pid_started_at=start_time(os.getpid()),
            queues=server.queues,
            concurrency=server.concurrency,
            dead_after=server.dead_after,
            release=server.release,
        )
        self.beat_failing_since = None
        self.next_beat = self.clock() + server.heartbeat_interval
        self.quiet_wanted = self.quiet_wanted or self.quiet  # a new registration stays quiet
        event(
            "server %s registered as %s (release %s, pid %d, queues %s, concurrency %d)",
            server.name, self.server_id, server.release or "none", os.getpid(), ",".join(server.queues),
            server.concurrency, event="registered", server=self.server_id, release=server.release,
        )

    def _reap_previous_incarnation(self) -> None:
        """A server of ours with this name on this host whose process is
        provably gone (pid dead, or reused by another process) is reaped
        now instead of after dead_after. One we cannot prove dead is left
        to the heartbeat check."""
        for old in self.storage.servers(states=LIVE_SERVER_STATES, host=socket.gethostname()):
            if old.name != self.config.server.name or is_same_process(old.pid, old.pid_started_at) is not False:
                continue
            taken = self.storage.reap_server(
                old.id, f"previous incarnation {old.id} of {old.name} (pid {old.pid}) is gone"
            )
            event("reaped our previous incarnation (%s, pid %d, is gone): requeued jobs %s", old.id, old.pid,
                  [t.id for t in taken], event="reaped", server=old.id)

    # --- the loop ---------------------------------------------------------------------

    def serve(self) -> None:
        """Run until a stop signal or a deliberate handoff; returns then."""
        systemd.notify("READY=1", f"STATUS=serving as {self.server_id}")
        while self.stop_signal is None and not self.exit_requested:
            self.tick()

    def drain(self, seconds: float) -> None:
        """Shutdown step 2: let running jobs finish for up to `seconds`.
        The whole loop keeps running -- heartbeats, the children's deadline
        renewal, lease checks, recording outcomes -- only claiming has
        stopped: a drain may last far longer than dead_after, and a server
        that went silent while draining would be reaped and its jobs run
        twice. A second stop signal, or finding that someone else stopped
        this server, ends it early."""
        deadline = self.clock() + seconds
        self.draining = True
        self.next_beat = self.clock()  # learn at once whether `shiftchange handoff` took our jobs
        try:
            while self.running and self.clock() < deadline and not self.hurry and not self.exit_requested:
                self.tick(deadline)
        finally:
            self.draining = False

    def tick(self, until: float | None = None) -> None:
        """One turn of the loop: wait for something to do (at most until
        `until`), collect finished children, heartbeat and claim when due."""
        self.wait(min(self._next_wake(), until if until is not None else float("inf")) - self.clock())
        # Outcomes first, even when a stop signal came: a job whose code
        # finished is recorded as done, never handed off to run again.
        self.collect_children()
        if self._stop_now():
            return  # the shutdown sequence starts now, not after a heartbeat
        self.enforce_timeouts()
        now = self.clock()
        # Each step below is a database call; each asks _stop_now() last.
        # (Re)connect the LISTEN socket here, never inside wait()'s select
        # path, and not while heartbeats fail: each attempt on a dead
        # network would hold the loop for the connect timeout.
        if (self.wakeups and self.claiming and self.server_id and self.beat_failing_since is None
                and not self._stop_now() and self.wakeups.listen(self.server_id)):
            self.next_claim = now  # what was enqueued while we did not listen
        if self.quiet_wanted and self.server_id and not self._stop_now():
            self._record_quiet()
        if now >= self.next_beat and not self._stop_now():
            self.beat()
        if self.claiming and now >= self.next_recurring and self.beat_failing_since is None and not self._stop_now():
            self.enqueue_recurring()
        if self.claiming and not self.quiet and now >= self.next_claim and self.server_id and not self._stop_now():
            self.claim()
        self._ping_watchdog()

    def _stop_now(self) -> bool:
        """Whether the shutdown sequence must start. Asked again before each
        database call of a turn, so a stop signal that came during one (a
        heartbeat, a claim) is answered before the next, not after the
        turn's last: beside 64 CPU-bound jobs a turn took up to 100 ms
        (docs/benchmarks.md, section 10)."""
        self.handle_signals()
        return self.exit_requested or (self.stop_signal is not None and not self.draining)

    def _next_wake(self) -> float:
        wakes = [self.next_beat, *self._timeout_deadlines()]
        if self.claiming:
            wakes.append(self.next_recurring)
        if self.claiming and not self.quiet and len(self.running) < self.config.server.concurrency:
            wakes.append(self.next_claim)
        if self.watchdog:
            wakes.append(self.next_watchdog)
        return min(wakes)

    def _ping_watchdog(self) -> None:
        if self.watchdog and self.clock() >= self.next_watchdog:
            systemd.notify("WATCHDOG=1", f"STATUS={len(self.running)} jobs running")
            self.next_watchdog = self.clock() + self.watchdog

    # --- claiming and spawning ---------------------------------------------------------

    def poll_every(self) -> float:
        """Seconds between an idle server's polls: on PostgreSQL, while
        LISTEN works, NOTIFY wakes us and polling is only a safety net."""
        server = self.config.server
        return server.safety_poll if self.wakeups and self.wakeups.listening else server.poll_interval

    def claim(self) -> None:
        free = self.config.server.concurrency - len(self.running)
        self.next_claim = self.clock() + self.poll_every()
        if free <= 0 or self.clock() > self.fence_deadline() - self.config.server.heartbeat_interval:
            return  # a job started now would be fenced before the next heartbeat
        if self.beat_failing_since is not None:
            return  # the database is failing us: another call would only wait too
        # A few at a time: a fork under a full CPU load can take 100 ms, and
        # signals and heartbeats must not wait for dozens of them.
        batch = min(free, CLAIM_BATCH)
        try:
            notified, self.notified = self.notified, False
            if self.idle and not notified and not self._anything_due():
                return
            jobs = self.storage.claim(self.server_id, self.config.server.queues, batch,
                                      release=self.config.server.release)
        except StorageUnavailable as exc:
            event("cannot claim: %s", exc, level=logging.WARNING, event="db_unreachable")
            return
        for job in jobs:
            self._start_job(job)
        self.idle = not jobs
        if len(jobs) == batch:
            self.next_claim = self.clock()  # there may be more waiting

    def _anything_due(self) -> bool:
        """An idle server's poll: one cheap read instead of a claiming
        transaction. A job held until later (a handoff's or a requeue's
        hold, whose end no NOTIFY announces) brings the next poll forward
        to that moment."""
        wait = self.storage.due_in(self.config.server.queues)
        if wait is not None and wait > 0:
            self.next_claim = min(self.next_claim, self.clock() + wait)
        return wait is not None and wait <= 0

    def _start_job(self, job) -> None:
        try:
            if job.kind == "command":
                self.allow.check_command(job.target)
            else:
                self.allow.check_callable(job.target)
        except TargetRefused as exc:
            self._refuse(job, str(exc))
            return
        child = self._handed_to_slot(job) or spawn(self._assignment(job), self.fence_deadline(), self.clock())
        self.running[child.pid] = child
        event("job %d (%s) claimed: attempt %d, lease %d, child pid %d", job.id, job.target,
              job.attempts, job.lease, child.pid, event="claimed", job=job.id, server=self.server_id)

    def _refuse(self, job, why: str) -> None:
        event("job %d (%s) refused: %s", job.id, job.target, why, level=logging.WARNING, event="refused", job=job.id)
        self.pending.append((job, "refused", why, None, False))
        self.record_pending()

    def _assignment(self, job) -> Assignment:
        jobs = self.config.jobs
        return Assignment(job, self.server_id, self.config.database.url, self.allow, jobs.nice, self.db_bounds,
                          retry_backoff=jobs.retry_backoff, engine=self.storage.engine,
                          import_path=self.import_path, reuse=jobs.reuse_processes and job.kind == "callable",
                          max_jobs=jobs.max_jobs_per_process, max_memory=jobs.max_memory_per_process,
                          scheduling=jobs.scheduling, sqlite_synchronous=self.config.database.sqlite_synchronous,
                          queues=tuple(self.config.server.queues),
                          release=self.config.server.release,
                          heartbeat_interval=self.config.server.heartbeat_interval)

    def _handed_to_slot(self, job) -> RunningJob | None:
        """Run a callable job in an idle slot, if there is one: no fork."""
        if job.kind != "callable" or not self.config.jobs.reuse_processes:
            return None
        for pid in reversed(list(self.slots)):  # the most recently used: its memory is warm
            slot = self.slots[pid]
            if slot.retiring:
                continue
            del self.slots[pid]
            child = slot.assign(job, self.server_id, self.fence_deadline(), self.clock())
            if child is not None:
                return child
            self.slots[pid] = slot  # dismissed: reaped when it exits
        return None

    def dismiss_idle_slots(self) -> None:
        """Idle slots exit (killing their job processes) once their lifeline
        closes; none is needed once claiming stops."""
        for slot in self.slots.values():
            if not slot.retiring:
                slot.dismiss()

    def fence_deadline(self) -> float:
        """When children must stop if no heartbeat succeeds before: half a
        heartbeat before any other server could declare us dead (it counts
        dead_after from our last heartbeat, which was sent after this)."""
        server = self.config.server
        return self.last_beat_sent + server.dead_after - server.heartbeat_interval / 2

    # --- children ending -------------------------------------------------------------------

    def collect_children(self) -> None:
        """Read the children's messages and reap those that exited, also
        any orphaned descendants that re-parented to us (we are a subreaper,
        and may be PID 1 in a container)."""
        for child in list(self.running.values()):
            child.read()
            while child is not None and child.ended_in_slot():
                del self.running[child.pid]
                self._finish(child)
                child = self._next_in_slot(child)
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid in self.slots:
                self.slots.pop(pid).close()
            child = self.running.pop(pid, None)
            if child is not None:
                child.read()
                child.close()
                self._finish_reaped(child, status)

    def _finish_reaped(self, child: RunningJob, status: int) -> None:
        """A child exited and was reaped, its messages read: finish its run,
        and the runs of the jobs it claimed and ran since we last read it
        (a slot may have claimed one with an outcome and run it to its end
        before we saw either); `status` is the last run's."""
        while child.ended_in_slot() and (after := self._next_in_slot(child, exited=True)) is not None:
            self._finish(child)
            child = after
        child.status = status
        self._finish(child)

    def _next_in_slot(self, child: RunningJob, exited: bool = False) -> RunningJob | None:
        """After a job ended in a slot: the run of the job the slot claimed
        with its outcome, now running (returned, to read on: the slot may
        have said more already); or the slot waits, idle, for a `J` line,
        or retires. `exited`: the slot's process is gone already, and so
        is the run it went on to (returned, for the caller to finish)."""
        slot = child.idle_slot()
        chained = child.chained()
        successor = None
        if chained is not None:
            job, refused = chained
            if refused:  # the slot did not start it: the supervisor's refusal, as in _start_job
                self._refuse(job, refused)
            else:
                successor = child.successor(job, self.clock())
                event("job %d (%s) claimed: attempt %d, lease %d, child pid %d (by its reused process, with "
                      "the outcome of job %d)", job.id, job.target, job.attempts, job.lease, child.pid,
                      child.job.id, event="claimed", job=job.id, server=self.server_id)
                if slot.retiring:
                    # We stopped the run before (memory, lost lease, timeout)
                    # as the slot claimed this one: it goes with the slot.
                    successor.given_back = f"its reused process was stopped at the end of job {child.job.id}"
        if exited:
            return successor
        if successor is None:
            self.slots[child.pid] = slot
        else:
            self.running[child.pid] = successor
            if not slot.retiring:
                return successor
        if slot.retiring:
            slot.dismiss()  # it may not know (a timeout's notice that crossed its end)
            if successor is not None:
                successor.lifeline = -1  # closed with the slot's
        return None

    def _finish(self, child: RunningJob) -> None:
        recorded = child.recorded()
        if recorded:  # durable already, written by the run's own side
            self.next_claim = self.clock()
            self._log_outcome(child.job, *recorded, by=" (recorded by the job's side)")
            return
        kind, error = child.outcome(stopping=self.stop_signal is not None)
        seconds = self.clock() - child.started
        if self.dropping or kind == "dropped":
            why = error if kind == "dropped" else "its job was handed off when this server began to stop"
            event("job %d (%s): this run ended after %.2fs but no longer owns the job (%s); nothing "
                  "recorded, the job's new run decides its outcome", child.job.id, child.job.target, seconds,
                  why, event="dropped", job=child.job.id)
            return
        self.next_claim = self.clock()
        self.pending.append((child.job, kind, error, child.result(), child.claim_in_doubt()))
        self.record_pending()

    def record_pending(self) -> None:
        """Write finished jobs' outcomes, fenced by their lease. Kept in
        memory and retried while the database is unreachable."""
        while self.pending:
            job = self.pending[0][0]
            try:
                self._record(*self.pending[0])
            except StorageUnavailable as exc:
                event("cannot record job %d yet: %s", job.id, exc, level=logging.WARNING,
                      event="db_unreachable", job=job.id)
                return
            self.pending.pop(0)

    def _record(self, job, kind: str, error: str | None, result: str | None, claim_in_doubt: bool) -> None:
        """One pending outcome. `claim_in_doubt`: the run's slot gave up on
        its own write of it, which would also claim the slot's next job."""
        state = write_outcome(self.storage, job, self.server_id, kind, error, self.config.jobs.retry_backoff,
                              result)
        self._log_outcome(job, kind, error, state)
        if claim_in_doubt and state == "stale":
            self._give_back_claims_of(job)

    def _give_back_claims_of(self, job) -> None:
        """Our write of a run's outcome was refused as stale, and its slot
        had given up on its own write, which would also claim the slot's
        next job: if that write committed after all, what it claimed is
        ours and runs nowhere. Give it back (storage.give_back_claims_of)."""
        for claimed, state in self.storage.give_back_claims_of(job.id, job.lease, self.server_id):
            event("job %d (%s) given back (%s): its reused process claimed it with the outcome of job %d, "
                  "in a write it had given up on", claimed.id, claimed.target, state, job.id,
                  event="handed_off", job=claimed.id)

    def _log_outcome(self, job, kind: str, error: str | None, state: str, by: str = "") -> None:
        level = logging.INFO if state in ("succeeded", "enqueued") else logging.WARNING
        event("job %d (%s) %s%s", job.id, job.target, describe_outcome(job, kind, state, error), by,
              level=level, event="stale_write" if state == "stale" else kind, job=job.id, state=state)

    # --- heartbeat ------------------------------------------------------------------------

    def beat(self) -> None:
        """Once per heartbeat_interval: enforce memory limits (the database
        is not needed for that); heartbeat and renew the children's
        deadline, or fence ourselves when we cannot prove we are alive;
        then kill runs whose lease an operator took, do the fleet chores
        this beat took (reap dead servers, promote due jobs, sweep old
        ones) and record pending outcomes."""
        server = self.config.server
        sent = self.clock()
        self.next_beat = sent + server.heartbeat_interval
        self._enforce_memory_limit()
        try:
            beat = self.storage.beat(self.server_id, self.fleet_chores(), recurring=True)
        except StorageUnavailable as exc:
            self._beat_failed(exc)
            return
        # The database's time was taken before this moment: an offset
        # measured now makes our estimate of it late, never early.
        if beat.now is not None:
            self.db_offset = beat.now - self.clock()
        state = beat.state
        if self.beat_failing_since is not None:
            self.beat_failing_since = None
            event("database reachable again", event="db_reachable")
        if state not in ("running", "quiet") or self.fenced:
            self._lost_server(state)
            return
        self.last_beat_sent = sent
        self._note_quiet(state == "quiet" or self.quiet_wanted, "asked from outside")
        for child in self.running.values():
            child.renew(self.fence_deadline())
        # Each step from here is a database call or more; a stop signal ends
        # the list (the chores fall to the next interval's server).
        try:
            for step in (self._kill_runs_of_lost_jobs, *self._chores(beat.chores), self.record_pending,
                         lambda: self.watch_recurring(beat.recurring)):
                if self._stop_now():
                    return
                step()
        except StorageUnavailable as exc:
            event("reaping, promotion and retention skipped until the next heartbeat: %s", exc,
                  level=logging.WARNING, event="db_unreachable")

    def _record_quiet(self) -> None:
        """Make a SIGTSTP durable, so `status` shows it and a restart of the
        loop (a new registration) keeps it."""
        try:
            self.storage.set_quiet([self.server_id], True)
            self.quiet_wanted = False
        except StorageUnavailable as exc:
            event("cannot record that this server is quiet yet: %s", exc, level=logging.WARNING,
                  event="db_unreachable")

    def _note_quiet(self, quiet: bool, why: str) -> None:
        if quiet == self.quiet:
            return
        self.quiet = quiet
        if quiet:
            event("server %s is quiet (%s): it claims nothing new and keeps running its %d jobs",
                  self.config.server.name, why, len(self.running), event="quiet", server=self.server_id)
        else:
            event("server %s is no longer quiet: claiming again", self.config.server.name,
                  event="unquiet", server=self.server_id)
            self.next_claim = self.clock()

    def _kill_runs_of_lost_jobs(self) -> None:
        """An operator may requeue or delete a job while it runs here; its
        run must stop before the hold on the requeued job ends."""
        leases = {child.job.id: child.job.lease for child in self.running.values()}
        try:
            lost = set(self.storage.lost_leases(self.server_id, leases))
        except StorageUnavailable:
            return  # the next heartbeat checks again
        for child in self.running.values():
            if child.job.id in lost and not child.lease_lost:
                child.lease_lost = True
                kill_tree(child.pid)
                event("job %d was requeued or deleted while it ran here: killed its run",
                      child.job.id, level=logging.WARNING, event="lease_lost", job=child.job.id)

    def _beat_failed(self, exc) -> None:
        if self.beat_failing_since is None:
            self.beat_failing_since = self.clock()
            event("cannot heartbeat: %s; children stop in %.1fs unless it recovers",
                  exc, max(0.0, self.fence_deadline() - self.clock()), level=logging.WARNING, event="db_unreachable")
        if not self.fenced and self.clock() >= self.fence_deadline():
            event("no heartbeat for too long: killing all children (another server may take their jobs)",
                  level=logging.ERROR, event="fenced")
            self.kill_all("fenced: could not heartbeat")
            self.claiming = False
            self.fenced = True

    def _lost_server(self, state: str | None) -> None:
        """Someone decided this server is finished (or we fenced ourselves).
        Kill the children at once; their jobs belong to others now."""
        self.kill_all(f"server is {state}")
        name = self.config.server.name
        if state in ("dead", None):
            what_next = "stopping" if self.stop_signal is not None else "registering anew"
            event("server %s was declared dead: its heartbeat was older than dead_after (a partition "
                  "or an outage?) and other servers took its jobs; %s", name, what_next,
                  level=logging.WARNING, event="declared_dead", server=self.server_id)
        if state in ("stopping", "stopped"):
            event("server %s was handed off from outside (state %s): exiting", name, state,
                  level=logging.WARNING, event="handed_off", server=self.server_id)
            self.exit_requested = True
            return
        if self.stop_signal is not None:
            # Shutting down anyway: the handoff that follows requeues what is
            # still ours; registering again would only be undone.
            event("server %s is %s while shutting down: children killed, not registering again",
                  name, state, level=logging.WARNING, event="lost_server", server=self.server_id)
            self.exit_requested = True
            return
        try:
            if state == "running":  # fenced ourselves; nobody reaped us
                self.storage.reap_server(self.server_id, "its server fenced itself (no heartbeat)")
            self._register()
            self.fenced = False
            self.claiming = self.stop_signal is None
        except StorageUnavailable as exc:
            event("cannot register again yet: %s", exc, level=logging.WARNING, event="db_unreachable")

    # --- verbs of the shutdown sequence (shutdown.py calls them in order) ---------------

    def stop_claiming(self) -> None:
        self.claiming = False
        # A running slot may still claim its next job with its outcome until
        # it retires: at the drain's stop notice, or when it is killed. A
        # claim that lands before the handoff's commit is handed off with
        # the others; none can land after it (the server is `stopping`).
        # No message to the children here: 64 of them woken at once beside
        # the handoff's commit would delay it (docs/benchmarks.md, section 10).
        self.dismiss_idle_slots()

    def ignore_outcomes(self) -> None:
        """From the handoff commit on, what the children do is not ours to record."""
        self.dropping = True

    def notice_stop_to_children(self) -> None:
        """The drain's stop notice: `current_job().stopping`, SIGTERM for commands."""
        for child in self.running.values():
            child.notice_stop()

    def signal_children(self, sig: int) -> None:
        for child in self.running.values():
            signal_group(child.pid, sig)

    def stop_reason(self) -> str:
        name = signal.Signals(self.stop_signal).name if self.stop_signal else "a stop request"
        return f"server {self.config.server.name} ({self.server_id}) received {name}"

    def kill_all(self, reason: str) -> None:
        """SIGKILL every child's tree now and drop their outcomes."""
        dropping, self.dropping = self.dropping, True
        try:
            # One walk of our whole tree, not one per child: each walk reads
            # /proc for every process on the host. We are a subreaper: with
            # no child at all, nothing is below us.
            if has_children():
                kill_tree(os.getpid(), include_root=False)
            for child in self.running.values():
                signal_group(child.pid, signal.SIGKILL)
            self._reap_everything(self.clock() + KILL_REAP_TIMEOUT_S)
        finally:
            self.dropping = dropping
        for child in self.running.values():
            event("job %d: child %d not reaped after SIGKILL (%s)", child.job.id, child.pid, reason,
                  level=logging.ERROR, event="kill_failed")

    def _reap_everything(self, deadline: float) -> None:
        """Collect our children and every orphan that re-parented to us, so
        none is left a zombie for init when we exit."""
        while self.clock() < deadline:
            self.collect_children()
            if not has_children():
                return  # nothing at all left below us
            self.wait(min(0.01, deadline - self.clock()))  # SIGCHLD wakes us sooner

    def wait_for_children(self, deadline: float, hurry_ends_wait: bool = False) -> None:
        """Collect children until none is left or `deadline` passes."""
        while self.running and self.clock() < deadline and not (hurry_ends_wait and self.hurry):
            self.wait(deadline - self.clock())
            self.collect_children()

    def fleet_chores(self) -> dict[str, float]:
        """Housekeeping the fleet needs once per interval, done by whichever
        server's heartbeat takes it first (storage.beat). Reaping stays
        due every heartbeat_interval, so a crash is still recovered within
        dead_after + one heartbeat; a little early (0.8), so that the
        server's own next beat never just misses it."""
        every = self.config.server.heartbeat_interval * 0.8
        return {"reap": every, "promote": every, "sweep": SWEEP_EVERY_S}

    def _chores(self, chores) -> list:
        """The fleet chores this heartbeat took, as steps to run."""
        steps = {"reap": self._reap_dead_servers,  # invariant 1: a dead server's jobs are requeued
                 "promote": self.storage.promote_due, "sweep": self._sweep}
        return [steps[chore] for chore in steps if chore in chores]

    # --- recurring jobs --------------------------------------------------------------

    def watch_recurring(self, rows) -> None:
        """After a heartbeat: watch the config's entries and those added
        through the API (`rows`, read by the heartbeat). A new one costs one
        read, for its last tick; then the loop wakes at the next tick."""
        entries = list(self.config.recurring)
        for row in rows:
            try:
                entries.append(entry_from_row(row.name, row.definition, row.added_at))
            except (EntryError, ValueError) as exc:
                if row.name not in self.bad_entries:
                    self.bad_entries.add(row.name)
                    event("recurring entry %s (added through the API) is ignored: %s", row.name, exc,
                          level=logging.WARNING, event="recurring_invalid")
        unseen = self.schedule.unseen(entries)
        last = {name: tick for name, (tick, _) in self.storage.last_ticks(unseen).items()} if unseen else {}
        self.schedule.watch(entries, last, self.clock() + self.db_offset)
        for entry in (e for e in self.schedule.entries if e.name in unseen):
            watch = self.schedule.watches[entry.name]
            event("recurring %s (%s, from the %s): watching from %s; ticks missed before then follow "
                  "missed: %s", entry.name, entry.schedule, entry.source, to_iso(watch.since), entry.missed,
                  event="recurring_watch", recurring=entry.name, since=watch.since)
            refused = not_allowed(entry, self.allow)
            if refused:
                event("%s on this server; another server may run it", refused, level=logging.WARNING,
                      event="recurring_not_allowed")
        self._plan_recurring()

    def _plan_recurring(self) -> None:
        due = self.schedule.next_due()
        self.next_recurring = float("inf") if due is None else due - self.db_offset

    def enqueue_recurring(self) -> None:
        """Enqueue the ticks that are due (Schedule.due) in one transaction;
        the database lets one server enqueue each tick (Storage.enqueue_ticks).
        If the database cannot be reached, the ticks stay due and are tried
        again after the next heartbeat."""
        now = self.clock() + self.db_offset
        due = self.schedule.due(now)
        try:
            done = self.storage.enqueue_ticks([(e.name, tick, e.job(self.config.jobs)) for e, tick in due],
                                              self.server_id) if due else []
        except StorageUnavailable as exc:
            event("recurring ticks not enqueued, tried again after the next heartbeat: %s", exc,
                  level=logging.WARNING, event="db_unreachable")
            self.next_recurring = self.next_beat
            return
        self.schedule.done_until(now)
        for name, tick, job_id in done:
            if job_id is not None:
                event("recurring %s: enqueued job %d for its tick at %s", name, job_id, to_iso(tick),
                      event="recurring_enqueued", job=job_id)
        self._plan_recurring()

    def _reap_dead_servers(self) -> None:
        """Requeue the jobs of every server whose heartbeat is older than
        its dead_after (by the database clock)."""
        taken_back = self.storage.reap()
        names = {s.id: s.name for s in self.storage.servers()} if taken_back else {}
        for taken in taken_back:
            what = "failed: past max_interruptions" if taken.failed else "requeued"
            event("job %d %s: its server %s stopped heartbeating", taken.id, what,
                  names.get(taken.server, taken.server), event="reaped", job=taken.id, server=taken.server)

    def _sweep(self) -> None:
        """Retention: delete jobs finished more than jobs.keep_finished ago."""
        removed = self.storage.sweep(self.config.jobs.keep_finished)
        self.storage.sweep_ticks(self.config.jobs.keep_finished)
        if removed:
            event("retention: deleted %d finished jobs", removed, event="sweep")

    def enforce_timeouts(self) -> None:
        """A run past its job's timeout (counted from its claim: time spent
        enqueued or handed off never counts) gets the shutdown's stop: a
        stop notice, then after shutdown.kill_after SIGKILL to its whole
        tree. It fails as an attempt (see RunningJob.outcome)."""
        now = self.clock()
        for child in self.running.values():
            limit = child.job.timeout
            if limit is None:
                continue
            if child.timed_out is None and now >= child.started + limit:
                child.notice_timeout(f"timed out after {format_duration(limit)}")
                child.kill_at = now + self.config.shutdown.kill_after
                event("job %d (%s) %s: stop notice, SIGKILL in %gs", child.job.id, child.job.target,
                      child.timed_out, self.config.shutdown.kill_after, level=logging.WARNING,
                      event="timed_out", job=child.job.id)
            elif child.kill_at is not None and now >= child.kill_at and child.kill_reason is None:
                child.kill_reason = child.timed_out
                kill_tree(child.pid)

    def _timeout_deadlines(self) -> list[float]:
        """When enforce_timeouts() has something to do next."""
        return [
            child.kill_at if child.timed_out else child.started + child.job.timeout
            for child in self.running.values()
            if child.job.timeout is not None and child.kill_reason is None
        ]

    def _enforce_memory_limit(self) -> None:
        limit = self.config.jobs.memory_limit
        if not limit:
            return
        for child in self.running.values():
            used = tree_rss(child.pid)
            if used > limit and child.kill_reason is None:
                child.kill_reason = (
                    f"memory limit exceeded: the job's processes used {used / 2**20:.0f} MiB, "
                    f"more than jobs.memory_limit ({limit / 2**20:.0f} MiB)"
                )
                kill_tree(child.pid)
                event("job %d killed: %s", child.job.id, child.kill_reason, level=logging.WARNING,
                      event="memory_limit", job=child.job.id)


def describe_outcome(job, kind: str, state: str, error: str | None) -> str:
    """What happened to a run, why, and what comes next, in one phrase."""
    why = f": {error.strip().splitlines()[-1]}" if error and error.strip() else ""
    attempt = f"attempt {job.attempts} of {job.max_attempts}"
    if state == "stale":
        return (f"run ended '{kind}', not recorded: lease {job.lease} is no longer current (the job was "
                f"handed off, reaped or requeued, and belongs to another run)")
    if state == "succeeded":
        return "succeeded"
    if kind == "handoff":
        nxt = "back in the queue, to resume elsewhere" if state == "enqueued" else (
            "failed: interrupted more often than max_interruptions allows")
        return f"handed off{why}; {nxt}"
    if state == "scheduled":
        return f"failed ({attempt}){why}; a retry is scheduled"
    if kind == "refused":
        return f"refused{why}; failed without a retry"
    return f"failed for good ({attempt}){why}"


def run_supervisor(config: Config) -> int:
    """`shiftchange run`: serve until stopped; returns the exit code."""
    from supervisor.shutdown import shut_down, stop_after_external_handoff

    set_title(f"shiftchange: supervisor {config.server.name}")
    sup = Supervisor(config)
    sup.install_signals()
    become_subreaper()  # double-forked descendants of jobs stay findable
    if not sup.start():
        event("stopped before registering: nothing to hand off", event="stopped")
        return EXIT_OK
    sup.serve()
    if sup.exit_requested:
        return stop_after_external_handoff(sup)
    return shut_down(sup)
