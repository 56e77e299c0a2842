"""Everything that runs inside a child: the child itself, and the job's process.

A child is forked by the supervisor for one job. It becomes the leader of a
new process group (in the supervisor's session) and a subreaper, and forks
the job's process below it. The child never runs job code: it stays small
so that it can always do its three duties, whatever the job's code is doing:

- kill the job's whole tree when the supervisor dies (lifeline EOF), even
  grandchildren that left the group;
- kill it when the supervisor stops renewing the lease deadline (the
  supervisor is frozen or cannot reach the database), one heartbeat before
  another server could declare that supervisor dead, so a job never runs in
  two places at once;
- report how the job's process ended, and record that outcome in storage
  itself (see outcomes.py): a callable's job process hands its outcome to
  the child the moment its code ends; for a command, the exit status is the
  outcome. So a frozen, starved or killed supervisor cannot turn a finished
  run into a rerun.

With `jobs.reuse_processes`, the child of a callable job is a *slot*: once
its job's outcome is recorded it stays, and so does its job process, and
runs the next callable job, so a short job costs no fork. It claims that
job itself, for its server, in the transaction that records the outcome
(storage.ClaimNext: one commit per job instead of two, and no round trip
through the supervisor), while its deadline is a heartbeat away or more
and no stop notice reached its job (a stop notice, the drain's included,
makes it retire); it tells the supervisor in its `exit` message.
Otherwise the supervisor hands it the next job on the lifeline (`J`
line). A slot keeps all three duties for each job; it retires (kills its whole tree and exits, like any child) after
jobs.max_jobs_per_process jobs, when its job process holds more than
jobs.max_memory_per_process, and after any run that leaves the process in
doubt: a stop notice, a timeout, a job that left processes or threads
running, a job process that died. Killing a slot is killing its job's tree,
exactly as before.

Messages to the supervisor are JSON lines on the results pipe.
The lifeline carries `S` (stop notice), `T<reason>` (timeout), `R<deadline>`
(renewal) and, to an idle slot, `J<next job>` lines.
"""

import asyncio
import base64
import inspect
import json
import os
import pickle
import select
import signal
import sys
import threading
import traceback
from dataclasses import dataclass, replace

from supervisor import jobcontext

from supervisor.errors import HandOff, InvalidJob, LeaseLost, StorageUnavailable
from supervisor.jobspec import to_json
from supervisor.outcomes import record_finished_run
from supervisor.processes import (
    become_subreaper,
    children_of,
    clock,
    close_fds_except,
    describe_status,
    die_with_parent,
    has_children,
    kill_tree,
    set_scheduling,
    rss,
    set_title,
)
from supervisor.records import Job
from supervisor.storage import ClaimNext
from supervisor.targets import AllowList, TargetRefused, extend_import_path, resolve_callable

CHECKPOINT_FD = 3  # where a command job writes checkpoint lines
HANDOFF_EXIT_CODE = 75  # EX_TEMPFAIL: a command's way of raising HandOff
OUTPUT_LINES = 20  # a command's last lines of output kept in its result
OUTPUT_TAIL_BYTES = 16384  # of which at most this much
_RESET_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD,
                  signal.SIGPIPE, signal.SIGXFSZ, signal.SIGQUIT)


@dataclass(frozen=True)
class Assignment:
    """What a child needs to run one job; crosses fork() as memory."""

    job: Job
    server_id: str
    database_url: str
    allow: AllowList
    nice: int = 0  # added to the job process's niceness
    database_bounds: object = None  # database.Bounds; None: the defaults
    retry_backoff: float = 10.0  # jobs.retry_backoff, for recording a failure here
    # The supervisor's engine, its dialect already set up (and its calls
    # bounded): reused, with a pool of its own, by the processes below, which
    # saves each job a new engine's set-up queries. None: build one from
    # database_url.
    engine: object = None
    import_path: tuple[str, ...] = ()  # put first on sys.path (targets.job_import_path)
    scheduling: str = "normal"  # jobs.scheduling: the job process's scheduling class
    reuse: bool = False  # a callable's child stays as a slot for further jobs
    max_jobs: int = 1  # jobs.max_jobs_per_process
    max_memory: int | None = None  # jobs.max_memory_per_process, bytes
    sqlite_synchronous: str = "full"  # database.sqlite_synchronous, for engines built here
    # A slot claims its next job itself (see ClaimNext) for its server's
    # queues and release, while its deadline is a heartbeat away or more.
    queues: tuple[str, ...] = ()
    release: str | None = None
    heartbeat_interval: float = 1.0


def encode_next_job(job: Job, server_id: str, deadline: float) -> bytes:
    """The `J` line that hands an idle slot its next job. Pickle: both ends
    are our own processes, and a Job (its events, its checkpoint) crosses
    whole, as it does a fork."""
    return b"J" + base64.b64encode(pickle.dumps((job, server_id, deadline)))


def decode_next_job(line: bytes) -> tuple[Job, str, float]:
    return pickle.loads(base64.b64decode(line[1:]))


def open_storage(assignment: Assignment, keep_connection: bool = False):
    """Storage on fresh connections of this process; never on the parent's.
    Its calls are bounded like the supervisor's: a checkpoint or an outcome
    during a network partition fails instead of hanging. `keep_connection`
    (a slot, which forks nothing more): SQLite too keeps its connection open
    between transactions; other databases pool theirs anyway."""
    from supervisor.database import DEFAULT_BOUNDS, make_engine
    from supervisor.storage import Storage

    engine = assignment.engine
    if engine is None or (keep_connection and engine.dialect.name == "sqlite"):
        return Storage(make_engine(assignment.database_url, bounds=assignment.database_bounds or DEFAULT_BOUNDS,
                                   sqlite_synchronous=assignment.sqlite_synchronous,
                                   keep_connection=keep_connection))
    # Forget the pooled connections inherited from the supervisor without
    # closing them (they are its); connections are opened anew from here.
    engine.dispose(close=False)
    return Storage(engine)


def send(fd: int, **message) -> None:
    """Write one message line; a supervisor that is gone cannot read it."""
    data = (json.dumps(message) + "\n").encode()
    try:
        while data:
            data = data[os.write(fd, data):]
    except OSError:
        pass


def run_child(assignment: Assignment, lifeline: int, results: int, deadline: float):
    """Entry point right after fork() in the supervisor. Never returns."""
    code = 70
    try:
        code = Child(assignment, lifeline, results, deadline).run()
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


class Child:
    def __init__(self, assignment, lifeline, results, deadline):
        self.assignment = assignment
        self.lifeline = lifeline
        self.results = results
        self.deadline = deadline
        self.job_pid = None
        self.job_status = None
        self.stop_noticed = False
        self.timed_out = None  # the supervisor's reason, once the run's timeout passed
        self.inbox = b""  # partial lifeline line
        self.checkpoint_lines = b""  # partial checkpoint line from a command
        self.storage = None  # opened on a command's first checkpoint, or for the outcome
        self.outcome_r = None  # a callable's outcome, sent by its job process
        self.outcome_data = b""
        self.output = {}  # a command's stdout/stderr pipe -> the fd it is passed on to
        self.output_tail = b""  # the end of a command's output, for its result
        self.next_job = None  # a `J` line read from the lifeline
        self.jobs_to_process = None  # a slot: where its job process reads its next job
        self.jobs_run = 0
        self.doubtful = False  # the job process says: do not reuse me
        self.supervisor_gone = False
        self.retired = None  # why this slot's job process runs no more jobs
        self.unrecorded = False  # the last outcome could not be recorded here
        self.chained = None  # the job this slot claimed with its last outcome

    def run(self) -> int:
        # Leader of its own process group, but in the supervisor's session:
        # with setsid() the kernel's autogroup scheduling would give every job
        # a CPU share equal to the supervisor's whole, whatever its niceness,
        # and 64 CPU-bound jobs made the handoff take 400 ms instead of 10.
        os.setpgid(0, 0)
        set_title(f"shiftchange: child of job {self.assignment.job.id}")
        become_subreaper()
        close_fds_except({self.lifeline, self.results})
        self.wakeup = self._own_signals()
        if self.assignment.job.kind == "command":
            self._start_command()
        else:
            self._start_job_process()
        while True:
            ended = self._watch()
            keep = ended and self._keeps_job_process()
            if not keep:
                self._clean_up_tree()
                self._drain_output()
            keep = self._report(ended, keep)
            if not keep or not self._take_next_job():
                break
        self._clean_up_tree()
        return 0

    def _start_command(self) -> None:
        self.notice, job_end = os.pipe()  # checkpoint lines from the command
        # Why an exec failed; closed by a successful exec (O_CLOEXEC).
        self.exec_error, exec_error_w = os.pipe2(os.O_CLOEXEC)
        # Its stdout and stderr pass through this child, which keeps
        # their last lines for the job's result.
        (out_r, out_w), (err_r, err_w) = os.pipe(), os.pipe()
        self.output = {out_r: 1, err_r: 2}
        self.job_pid = os.fork()
        if self.job_pid == 0:
            exec_command(self.assignment, self.results, job_end, exec_error_w, (out_w, err_w))
        for fd in (exec_error_w, out_w, err_w, job_end):
            os.close(fd)

    def _start_job_process(self) -> None:
        job_end, self.notice = os.pipe()  # stop notices to the job's process
        self.outcome_r, outcome_w = os.pipe()  # its outcome, once its code has ended
        os.set_blocking(self.outcome_r, False)
        jobs_r = None
        if self.assignment.reuse:
            jobs_r, self.jobs_to_process = os.pipe()
        self.job_pid = os.fork()
        if self.job_pid == 0:
            # The job's process gets no end of the results pipe: only this
            # child speaks to the supervisor (see _record_outcome).
            run_callable(self.assignment, job_end, outcome_w,
                         (self.lifeline, self.results, self.notice, self.wakeup, self.outcome_r,
                          self.jobs_to_process), jobs_r)
        for fd in (outcome_w, job_end, jobs_r):
            if fd is not None:
                os.close(fd)

    def _report(self, ended: bool, keep: bool) -> bool:
        """Record how the run ended and tell the supervisor (`next`: this
        slot takes another job; otherwise it exits now). Returns `next`."""
        if not ended:
            return False
        status = self.job_status
        if keep:
            how = "its code ended"
        else:
            how = describe_status(status) if status is not None else "killed after its code had ended"
        code = os.waitstatus_to_exitcode(status) if status is not None else None
        said = self._record_outcome(how, code, chain=keep)
        if keep and self.unrecorded:
            keep, self.retired = False, "its job's outcome could not be recorded here"
        if self.assignment.job.kind == "command":
            said.setdefault("result", self._command_result(code))  # for the supervisor to record
        if self.chained is not None:
            job, self.chained = self.chained, None
            line = encode_next_job(job, self.assignment.server_id, self.deadline)
            said["chained"] = line.decode()
            refused = self._refusal(job)
            if refused:  # claimed, but not for this slot to run: the supervisor records the refusal
                said["refused"] = refused
            else:
                self.next_job = line  # _take_next_job runs it without waiting
        send(self.results, event="exit", how=how, code=code, stop_noticed=self.stop_noticed, next=keep,
             retired=self.retired, **said)
        return keep

    def _refusal(self, job: Job) -> str | None:
        """Why the allow-list refuses a claimed job's target (the supervisor's
        check before it starts a job, made here for a job this slot claimed)."""
        try:
            self.assignment.allow.check_callable(job.target)
        except TargetRefused as exc:
            return str(exc)
        return None

    def _keeps_job_process(self) -> bool:
        """May the job process run another job? See reason_to_retire."""
        self.jobs_run += 1
        if self.jobs_to_process is None:
            return False  # not a slot: a command, or jobs.reuse_processes is off
        alive = self.job_status is None
        self.retired = reason_to_retire(
            alive=alive,
            stopped=self.stop_noticed or bool(self.timed_out) or self.supervisor_gone,
            in_time=clock() < self.deadline,
            doubtful=self.doubtful,
            jobs_run=self.jobs_run,
            max_jobs=self.assignment.max_jobs,
            memory=rss(self.job_pid) if alive and self.assignment.max_memory else 0,
            max_memory=self.assignment.max_memory,
            # Anything the job started that still runs: re-parented to us
            # (we are a subreaper), or still below the job process.
            strays=alive and (children_of(os.getpid()) != {self.job_pid} or bool(children_of(self.job_pid))),
        )
        return self.retired is None

    def _take_next_job(self) -> bool:
        """Wait, idle, for the supervisor's next job and pass it to the job
        process. False when there will be none: the supervisor closed the
        lifeline (it is gone, or stopping), or the job process died. A job
        this slot claimed itself is there already (_report)."""
        while self.next_job is None:
            try:
                ready, _, _ = select.select([self.lifeline, self.wakeup, self.outcome_r], [], [])
            except InterruptedError:
                continue
            if self.lifeline in ready and not self._read_lifeline():
                return False
            if self.wakeup in ready:
                os.read(self.wakeup, 4096)
                if self._reap():
                    return False
            if self.outcome_r in ready:
                return False  # EOF: the job process is gone
        line, self.next_job = self.next_job, None
        job, server_id, self.deadline = decode_next_job(line)
        send(self.results, event="took", job=job.id)  # from here on, what happens is this job's
        self.assignment = replace(self.assignment, job=job, server_id=server_id)
        self.stop_noticed, self.timed_out, self.outcome_data = False, None, b""
        set_title(f"shiftchange: child of job {job.id}")
        try:
            os.write(self.jobs_to_process, line + b"\n")  # blocks at most until the job process reads it
        except OSError:
            return False
        return True

    def _record_outcome(self, how: str, code: int | None, chain: bool = False) -> dict:
        """Record how the run ended, from here (see outcomes.py): what a
        callable's job process said when its code ended, or a command's exit
        (by itself, or by the SIGTERM of our stop notice). A command's death
        by any other signal is left to the supervisor: only it knows whether
        it killed the job for its memory or a lost lease, or whether its
        server is stopping. With `chain` (the slot keeps its job process),
        the same transaction may claim the slot's next job (self.chained).
        Returns what the exit message adds."""
        if self.assignment.job.kind == "command":
            if code < 0 and not (self.stop_noticed and code == -signal.SIGTERM):
                return {}
            exec_error = os.read(self.exec_error, 65536).decode(errors="replace")
            kind, error = ("failed", exec_error) if exec_error else command_outcome(how, code, self.stop_noticed)
            result = self._command_result(code)
        else:
            delivered = self._delivered_outcome()
            if delivered is None:
                return {}  # the job's process died before its code ended
            kind, error, result = delivered
        if self.timed_out and kind in ("failed", "handoff"):
            kind, error = "failed", self.timed_out  # not a handoff: its time is up
        claim = self._claim_next(kind) if chain else None
        recorded = record_finished_run(self._kept_storage, self.assignment.job, self.assignment.server_id,
                                       kind, error, self.assignment.retry_backoff, result=result,
                                       then_claim=claim)
        if recorded and claim is not None and claim.claimed:
            self.chained = claim.claimed[0]
        if recorded:
            return {"outcome": kind, "error": error, "recorded": recorded}
        self.unrecorded = True  # a write may still be in flight on the kept connection
        if self.assignment.job.kind != "command":
            # Not recorded (the database did not answer): relay what the job's
            # process said, for the supervisor to record; `claimed`: the
            # write we gave up on would also claim our next job.
            send(self.results, event="result", outcome=kind, error=error, result=result,
                 claimed=claim is not None)
        return {}

    def _claim_next(self, kind: str) -> ClaimNext | None:
        """What this slot claims with its outcome, if it may claim: a
        success or a failure (never a give back: it could take back its
        own job) in a slot that keeps its job process (so no stop notice
        reached it: the drain's makes it retire), its deadline at least a
        heartbeat away (as for the supervisor's own claims: a job started
        now must not be fenced before the next renewal)."""
        assignment = self.assignment
        if kind not in ("succeeded", "failed") or clock() > self.deadline - assignment.heartbeat_interval:
            return None
        return ClaimNext(assignment.server_id, assignment.queues, assignment.release, callables_only=True,
                         after=(assignment.job.id, assignment.job.lease))

    def _command_result(self, code: int | None) -> str:
        """A command's result: its exit code (negative: the signal that
        killed it) and its last lines of output."""
        lines = self.output_tail.decode(errors="replace").splitlines()[-OUTPUT_LINES:]
        return json.dumps({"exit_code": code, "output": lines}, ensure_ascii=False)

    def _pass_output(self, fd: int) -> bool:
        """Pass what a command wrote on to our own stdout or stderr, and
        keep its end; False at EOF."""
        try:
            data = os.read(fd, 65536)
        except (BlockingIOError, InterruptedError):
            return True
        if not data:
            return False
        self.output_tail = (self.output_tail + data)[-OUTPUT_TAIL_BYTES:]
        try:
            while data:
                data = data[os.write(self.output[fd], data):]
        except OSError:
            pass  # nobody reads our output: the tail is kept all the same
        return True

    def _drain_output(self) -> None:
        """Read what the ended command's tree left in its output pipes (the
        tree is dead: no writer is left)."""
        for fd in self.output:
            os.set_blocking(fd, False)
            while self._pass_output(fd) and select.select([fd], [], [], 0)[0]:
                pass

    def _read_outcome(self) -> bool:
        """Take what the job's process has sent of its outcome; False at EOF."""
        try:
            data = os.read(self.outcome_r, 1 << 20)
        except BlockingIOError:
            return True
        self.outcome_data += data
        return bool(data)

    def _delivered_outcome(self) -> tuple[str, str | None, str | None] | None:
        """(outcome, error, result JSON) once the job's process sent its
        whole outcome line."""
        if self.outcome_r is None:
            return None
        while self._read_outcome() and not self.outcome_data.endswith(b"\n"):
            if not select.select([self.outcome_r], [], [], 0)[0]:
                break
        if not self.outcome_data.endswith(b"\n"):
            return None
        try:
            message = json.loads(self.outcome_data)
            self.doubtful = bool(message.get("doubtful"))
            return message["outcome"], message.get("error"), message.get("result")
        except (ValueError, KeyError, TypeError):
            return None

    def _kept_storage(self):
        """The connection this child keeps for checkpoints and the outcome."""
        if self.storage is None:
            # A slot forked its job process already and forks nothing more.
            self.storage = open_storage(self.assignment, keep_connection=self.jobs_to_process is not None)
        return self.storage

    def _own_signals(self) -> int:
        """Replace the supervisor's handlers: the child outlives SIGTERM to
        its group (it must report and clean up after the job), and wakes on
        SIGCHLD through a wakeup pipe."""
        signal.set_wakeup_fd(-1)
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        for sig in _RESET_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, lambda *_: None)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        return wake_r

    def _watch(self) -> bool:
        """Wait for the job's process to end. False when it was killed
        because the supervisor is gone or stopped renewing the deadline."""
        watched = [self.lifeline, self.wakeup]
        if self.assignment.job.kind == "command":
            watched += [self.notice, *self.output]
        else:
            watched.append(self.outcome_r)  # a long traceback may not fit the pipe's buffer
        while True:
            timeout = self.deadline - clock()
            if timeout <= 0:
                if self._delivered_outcome() is not None:
                    return True  # its code has ended: kill what is left, record what it said
                send(self.results, event="fenced", reason="the supervisor stopped renewing the lease")
                return False
            try:
                ready, _, _ = select.select(watched, [], [], timeout)
            except InterruptedError:
                ready = []
            if self.lifeline in ready and not self._read_lifeline():
                # The supervisor is gone: the job must stop now. If its code
                # has ended, it runs no job code any more, and its outcome is
                # recorded all the same: a finished run must not become a rerun.
                self.supervisor_gone = True
                return self._delivered_outcome() is not None
            if self.wakeup in ready:
                os.read(self.wakeup, 4096)
            if self.assignment.job.kind == "command" and self.notice in ready:
                if not self._read_checkpoints():
                    watched.remove(self.notice)
            if self.outcome_r in ready:
                if not self._read_outcome():
                    watched.remove(self.outcome_r)
                elif self.jobs_to_process is not None and self._delivered_outcome() is not None:
                    return True  # a slot's job process lives on for the next job
            for fd in self.output:
                if fd in ready and not self._pass_output(fd):
                    watched.remove(fd)
            if self._reap():
                return True

    def _read_lifeline(self) -> bool:
        data = os.read(self.lifeline, 4096)
        if not data:
            return False  # the supervisor is gone: nobody may keep running
        self.inbox += data
        *lines, self.inbox = self.inbox.split(b"\n")
        for line in lines:
            if line == b"S":
                self._notice_stop()
            elif line.startswith(b"T"):  # the stop of a run past its timeout
                self.timed_out = line[1:].decode(errors="replace")
                self._notice_stop()
            elif line.startswith(b"R"):
                self.deadline = float(line[1:])
            elif line.startswith(b"J"):
                self.next_job = line
        return True

    def _notice_stop(self):
        if self.stop_noticed:
            return
        self.stop_noticed = True
        if self.assignment.job.kind == "command":
            _signal(self.job_pid, signal.SIGTERM)  # a script's stop notice
        else:
            try:
                os.write(self.notice, b"S")
            except OSError:
                pass

    def _read_checkpoints(self) -> bool:
        """Command jobs write one JSON document a line to fd 3."""
        data = os.read(self.notice, 1 << 20)
        if not data:
            return False
        self.checkpoint_lines += data
        *lines, self.checkpoint_lines = self.checkpoint_lines.split(b"\n")
        for line in filter(None, (line.strip() for line in lines)):
            self._save_checkpoint(line)
        return True

    def _save_checkpoint(self, line: bytes) -> None:
        job = self.assignment.job
        try:
            json.loads(line)
        except ValueError:
            send(self.results, event="result", outcome="failed",
                 error=f"checkpoint written to fd {CHECKPOINT_FD} is not JSON: {line[:200]!r}")
            _signal(self.job_pid, signal.SIGKILL)
            return
        try:
            saved = self._kept_storage().checkpoint(job.id, job.lease, self.assignment.server_id, line.decode())
        except StorageUnavailable as exc:
            # Skipped, not fatal: the command goes on and its next line may
            # land. If the outage outlasts the lease, the deadline stops it.
            print(f"shiftchange: job {job.id}: checkpoint not saved: {exc}", file=sys.stderr, flush=True)
            return
        if not saved:
            send(self.results, event="result", outcome="lease_lost", error="checkpoint refused: lease lost")
            _signal(self.job_pid, signal.SIGKILL)

    def _reap(self) -> bool:
        """Collect every exited child (orphans re-parent to us); True once
        the job's own process has ended."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return self.job_status is not None
            if pid == 0:
                return self.job_status is not None
            if pid == self.job_pid:
                self.job_status = status

    def _clean_up_tree(self) -> None:
        """Nothing the job started may outlive it: kill what is left of the
        tree (grandchildren that left the group included) and reap it. We
        are a subreaper, so with no child left there is no descendant left,
        and the usual case needs no walk of /proc."""
        if not has_children():
            return
        kill_tree(os.getpid(), include_root=False)
        while True:
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                return
            except InterruptedError:
                continue


def reason_to_retire(*, alive: bool, stopped: bool, in_time: bool, doubtful: bool, jobs_run: int,
                     max_jobs: int, memory: int, max_memory: int | None, strays: bool) -> str | None:
    """Why a slot's job process must not run another job, or None when it
    may: only one that finished its job cleanly, in time, with nothing of
    the job left running, under jobs.max_jobs_per_process and
    jobs.max_memory_per_process. After a stop notice or a timeout the
    job's state is in doubt (it may have been cut short mid-way)."""
    if not alive:
        return "its job process died"
    if stopped:
        return "its job was stopped (stop notice, timeout or the supervisor gone)"
    if not in_time:
        return "its deadline passed (the supervisor stopped renewing it)"
    if doubtful:
        return "the job left threads running or closed or redirected stdout or stderr"
    if strays:
        return "the job left processes running"
    if jobs_run >= max_jobs:
        return f"it ran {jobs_run} jobs (jobs.max_jobs_per_process)"
    if max_memory and memory > max_memory:
        return f"it holds {memory / 2**20:.0f} MiB (jobs.max_memory_per_process: {max_memory / 2**20:.0f} MiB)"
    return None


def command_outcome(how: str, code: int, stop_noticed: bool) -> tuple[str, str | None]:
    """What a command's end means: exit 0 succeeded; EX_TEMPFAIL, or death
    by SIGTERM after the stop notice, asks for a handoff; anything else failed."""
    if code == 0:
        return "succeeded", None
    if code == HANDOFF_EXIT_CODE or (stop_noticed and code == -signal.SIGTERM):
        return "handoff", f"the command asked to be handed off ({how})"
    return "failed", f"the command ended with {how}"


def _signal(pid, sig):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


# --- the job's own process ---------------------------------------------------------


def _become_job_process(nice: int, scheduling: str = "normal"):
    die_with_parent()  # if the child dies, so does the job
    if os.getppid() == 1:
        os._exit(1)
    # CPU-bound jobs at the supervisor's priority starve it: with 64 of them on
    # two cores, a handoff measured 5 s instead of milliseconds. The child
    # stays at the supervisor's priority so its deadline is always kept.
    os.nice(nice)
    set_scheduling(scheduling)
    signal.set_wakeup_fd(-1)
    for sig in _RESET_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def run_callable(assignment: Assignment, stop_notices: int, outcome_fd: int, close: tuple,
                 next_jobs: int | None = None):
    """Import and call the job's target; report how it ended to the child,
    which records it (or relays it to the supervisor). In a slot
    (`next_jobs`), then read the next job from the child and run it, until
    the child closes that pipe or dies. Never returns."""
    for fd in close:
        if fd is not None:
            os.close(fd)
    _become_job_process(assignment.nice, assignment.scheduling)
    storage = []  # one connection per process, for every job's checkpoints

    def kept_storage():
        if not storage:
            storage.append(open_storage(assignment))
        return storage[0]

    threading.Thread(target=_watch_stop_notices, args=(stop_notices,), daemon=True).start()
    threads, stdio = threading.active_count(), _stdio()
    jobs = os.fdopen(next_jobs, "rb") if next_jobs is not None else None
    while True:
        outcome, error, result = _run_job(assignment, kept_storage)
        # A job that left threads running shares them with the next one: no.
        # Nor one that closed or redirected stdout or stderr (the next job's
        # output and tracebacks would be lost).
        doubtful = threading.active_count() > threads or _stdio() != stdio
        # First to the child, which records it: from this moment a dying or
        # late supervisor no longer turns the finished run into a rerun.
        send(outcome_fd, outcome=outcome, error=error, result=result, doubtful=doubtful)
        _flush_stdio()
        line = jobs.readline().rstrip(b"\n") if jobs else b""
        if not line:
            os._exit(0)
        job, server_id, _ = decode_next_job(line)
        assignment = replace(assignment, job=job, server_id=server_id)


def _stdio() -> tuple:
    """What stdout and stderr are (device and inode; None when closed)."""
    def identity(fd):
        try:
            found = os.fstat(fd)
        except OSError:
            return None
        return found.st_dev, found.st_ino

    return identity(1), identity(2)


def _run_job(assignment: Assignment, open_storage_of_run) -> tuple[str, str | None, str | None]:
    """One run of a callable job in this process: (outcome, error, result JSON)."""
    job = assignment.job
    set_title(f"shiftchange: job {job.id} {job.target}")
    context = jobcontext.JobContext(job, job.lease, assignment.server_id, open_storage_of_run)
    jobcontext._enter(context)
    if _stop_noticed.is_set():  # it came before the job's context existed
        context._notice_stop()
    outcome, error, value = "succeeded", None, None
    try:
        assignment.allow.check_callable(job.target)  # again, before any import
        extend_import_path(assignment.import_path)
        function = resolve_callable(job.target)
        value = call_job(function, job.args, job.kwargs)
    except HandOff as exc:
        outcome, error = "handoff", str(exc) or "the job raised HandOff"
    except LeaseLost as exc:
        outcome, error = "lease_lost", str(exc)
    except WorkNotDone as exc:
        outcome, error = "failed", str(exc)
    except SystemExit as exc:
        if exc.code not in (None, 0):
            outcome, error = "failed", f"the job called sys.exit({exc.code!r})"
    except BaseException:
        outcome, error = "failed", traceback.format_exc()
    finally:
        jobcontext._enter(None)
    if outcome == "succeeded":
        return result_of(value)
    return outcome, error, None


def result_of(value) -> tuple[str, str | None, str | None]:
    """(outcome, error, result JSON) of a run whose code returned `value`:
    a value that is not JSON fails the run (it could not be stored)."""
    try:
        return "succeeded", None, to_json(value, "the job's return value")
    except InvalidJob as exc:
        return "failed", f"{exc}; return JSON data (None, numbers, strings, lists, dicts) or nothing", None


class WorkNotDone(Exception):
    """The job's target returned something that means its work never ran."""


def call_job(function, args, kwargs):
    """Run the job's target to completion; returns its result. A coroutine
    function (or any call whose result is awaitable) runs in an event loop of
    its own, one per job; a result that means the work did not happen (a
    generator's body runs only when iterated) raises WorkNotDone instead of
    passing for success."""
    result = function(*args, **kwargs)
    if inspect.isawaitable(result):
        result = asyncio.run(_await_all(result))
    if inspect.isgenerator(result) or inspect.isasyncgen(result):
        raise WorkNotDone(
            f"the job's target returned {type(result).__name__} {getattr(result, '__qualname__', '')!r} "
            "instead of running: its body only runs when iterated; do the work in a plain "
            "function or an `async def` without `yield`"
        )
    return result


async def _await_all(awaitable):
    """Await `awaitable`, and whatever awaitable it resolves to in turn (an
    async function that returns a coroutine has not done its work yet)."""
    result = await awaitable
    while inspect.isawaitable(result):
        result = await result
    return result


_stop_noticed = threading.Event()  # this job process got a stop notice


def _watch_stop_notices(fd: int) -> None:
    """Pass stop notices to the running job. A slot sends one only while a
    job runs, and retires after it, so a notice never reaches a later job."""
    try:
        while os.read(fd, 1):
            _stop_noticed.set()  # before reading _current: see _run_job
            context = jobcontext._current
            if context is not None:
                context._notice_stop()
    except OSError:
        pass


def exec_command(assignment: Assignment, results: int, checkpoint_fd: int, exec_error: int, output=None):
    """Replace this process with the job's command. Never returns. If it
    cannot, the reason goes to `exec_error` (for the child, which records
    the failure) and to the supervisor. `output`: the pipes its stdout and
    stderr go to."""
    job = assignment.job
    _become_job_process(assignment.nice, assignment.scheduling)
    if output:
        for fd, pipe in zip((1, 2), output):
            os.dup2(pipe, fd)
    if results == CHECKPOINT_FD:
        results = os.dup(results)
    if exec_error == CHECKPOINT_FD:
        exec_error = os.dup(exec_error)  # close-on-exec, as the original was
    try:
        path = assignment.allow.check_command(job.target)
        os.dup2(checkpoint_fd, CHECKPOINT_FD)
        os.set_inheritable(CHECKPOINT_FD, True)  # the only fd the command inherits
        env = dict(os.environ)
        env.update(
            SHIFTCHANGE_JOB_ID=str(job.id),
            SHIFTCHANGE_ATTEMPT=str(job.attempts),
            SHIFTCHANGE_INTERRUPTIONS=str(job.interruptions),
            SHIFTCHANGE_CHECKPOINT="" if job.checkpoint is None else json.dumps(job.checkpoint),
            SHIFTCHANGE_CHECKPOINT_FD=str(CHECKPOINT_FD),
        )
        _flush_stdio()
        os.execve(path, job.argv, env)
    except BaseException as exc:
        reason = str(exc) if not isinstance(exc, OSError) else f"cannot execute {job.target!r}: {exc.strerror}"
        try:
            os.write(exec_error, reason.encode()[:4096])
        except OSError:
            pass
        send(results, event="result", outcome="failed", error=reason)
        os._exit(127)


def _flush_stdio():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
