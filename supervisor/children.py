"""The supervisor's side of its children: fork one per job (or hand the
next callable job to an idle slot: see jobprocess.py), talk to it, read how
the job ended, and decide what that means for the job (unless the run's own
side recorded it already: see outcomes.py)."""

import json
import os
import signal
import sys
from dataclasses import dataclass, field

from supervisor.jobprocess import Assignment, command_outcome, decode_next_job, encode_next_job, run_child
from supervisor.processes import describe_status, signal_group
from supervisor.records import Job

# A job larger than this (its arguments, its checkpoint) gets a fresh child,
# which receives it as memory: one write of it into an idle slot's empty
# lifeline pipe (64 KiB) must never be partial.
MAX_HANDED_JOB_BYTES = 60_000


@dataclass
class RunningJob:
    """A job running in a child process of this supervisor."""

    job: Job
    pid: int  # the child's pid, also its process group id
    lifeline: int  # write end: stop notices and deadline renewals
    results: int  # read end: JSON lines from the child and the job
    started: float  # by the supervisor's clock
    messages: list[dict] = field(default_factory=list)
    kill_reason: str | None = None  # set when the supervisor kills it on purpose
    lease_lost: bool = False  # an operator took the job away: record nothing
    status: int | None = None  # waitpid status once reaped
    timed_out: str | None = None  # "timed out after 30m", once its timeout passed
    kill_at: float | None = None  # when a timed-out run's tree gets SIGKILL
    slot: bool = False  # the child may stay for another job (jobs.reuse_processes)
    handed: bool = False  # given to an idle slot, which says "took" once it has it
    given_back: str | None = None  # claimed by its slot, which was stopped before it could run it
    _buffer: bytes = b""

    def tell(self, line: str) -> None:
        """Send a lifeline line; a child that is gone does not need it."""
        try:
            os.write(self.lifeline, line.encode() + b"\n")
        except (BlockingIOError, BrokenPipeError, OSError):
            pass

    def notice_stop(self) -> None:
        self.tell("S")

    def notice_timeout(self, reason: str) -> None:
        """The stop notice of a run past its timeout: the same stop as a
        shutdown's, but its end is a failure, never a handoff."""
        self.timed_out = reason
        self.tell("T" + reason)

    def renew(self, deadline: float) -> None:
        self.tell(f"R{deadline:.6f}")

    def read(self) -> None:
        """Take whatever the child has written so far."""
        while True:
            try:
                data = os.read(self.results, 65536)
            except (BlockingIOError, InterruptedError):
                return
            if not data:
                return
            self._buffer += data
            *lines, self._buffer = self._buffer.split(b"\n")
            for line in lines:
                try:
                    self.messages.append(json.loads(line))
                except ValueError:
                    pass  # not from the child: the job's process holds no end of this pipe

    def ended_in_slot(self) -> bool:
        """A slot reported its job's end and lives on: the job is over
        without the child exiting."""
        return self.slot and self._message("exit") is not None

    def chained(self) -> tuple[Job, str | None] | None:
        """The job its slot claimed with this job's outcome (see
        jobprocess.Child._claim_next), and why the slot does not run it
        when the allow-list refuses its target; None when it claimed none."""
        ended = self._message("exit") or {}
        if not ended.get("chained"):
            return None
        job, _, _ = decode_next_job(ended["chained"].encode())
        return job, ended.get("refused")

    def successor(self, job: Job, started: float) -> "RunningJob":
        """The run of `job` in this slot after this one: what the child
        said after this job's `exit` is the next job's."""
        ended = next(i for i, m in enumerate(self.messages) if isinstance(m, dict) and m.get("event") == "exit")
        later, self.messages = self.messages[ended + 1:], self.messages[:ended + 1]
        return RunningJob(job=job, pid=self.pid, lifeline=self.lifeline, results=self.results, started=started,
                          messages=later, slot=True, handed=True, _buffer=self._buffer)

    def idle_slot(self) -> "IdleSlot":
        """What is left of this child once its job ended in it: a slot that
        takes the next job, or one that is retiring (it exits by itself)."""
        ended = self._message("exit") or {}
        takes_next = bool(ended.get("next")) and not (self.kill_reason or self.lease_lost or self.timed_out)
        return IdleSlot(self.pid, self.lifeline, self.results, retiring=not takes_next)

    def close(self) -> None:
        for fd in (self.lifeline, self.results):
            try:
                os.close(fd)
            except OSError:
                pass

    def _message(self, event: str) -> dict | None:
        found = [m for m in self.messages if isinstance(m, dict) and m.get("event") == event]
        return found[0] if found else None

    def recorded(self) -> tuple[str, str | None, str] | None:
        """(what happened, error text, the job's new state) when the child
        already recorded the outcome in storage (see outcomes.py); None when
        the supervisor must record it. A recorded
        outcome stands whatever else the supervisor knows: the write was
        fenced by the run's lease, so when it applied the run still owned
        the job, and the job is no longer `processing`."""
        for message in self.messages:
            if isinstance(message, dict) and message.get("recorded"):
                return message.get("outcome"), message.get("error"), message["recorded"]
        return None

    def claim_in_doubt(self) -> bool:
        """The child gave up on an outcome write that would also claim its
        next job (and may still commit: see Supervisor._record)."""
        return bool((self._message("result") or {}).get("claimed"))

    def result(self) -> str | None:
        """The run's result (JSON text) as the child relayed it: what a
        callable returned, or a command's exit code and last output lines."""
        for event in ("result", "exit"):
            message = self._message(event)
            if message and message.get("result") is not None:
                return message["result"]
        return None

    def outcome(self, stopping: bool = False) -> tuple[str, str | None]:
        """(what happened, error text): succeeded, failed, handoff or
        dropped (the run lost its job; nothing may be recorded). While the
        supervisor is `stopping`, a job killed by SIGTERM was interrupted by
        the deploy (some platforms signal every process), not failed.

        A job its child stopped because the deadline passed is handed off:
        no heartbeat of ours failed (or the supervisor would be dropping
        outcomes), the loop was just late renewing it, so our server may
        still hold the lease and nobody else would requeue the job. The give
        back is fenced by the lease, and the child reaped the job's tree."""
        if self.given_back:
            return "handoff", self.given_back  # stopped for the run before it: an interruption, not an attempt
        kind, error = self._outcome()
        ended = self._message("exit")
        if self.timed_out and kind in ("failed", "handoff"):
            return "failed", self.timed_out  # an attempt: retried while attempts are left
        if stopping and kind == "failed" and ended and ended.get("code") == -signal.SIGTERM:
            return "handoff", "the job's process received SIGTERM while its server was stopping"
        return kind, error

    def _outcome(self) -> tuple[str, str | None]:
        if self.lease_lost:
            return "dropped", "the job was requeued or deleted while it ran"
        fenced = self._message("fenced")
        if fenced:
            return "handoff", f"its child stopped it: {fenced.get('reason')}"
        if self.kill_reason:
            return "failed", self.kill_reason
        if self.handed and self._message("took") is None:
            # The slot ended (its job process had died while it was idle)
            # before it read the job: this run never began.
            return "handoff", "its reused process ended before it took the job"
        result = self._message("result")
        ended = self._message("exit")
        if result:
            kind = {"lease_lost": "dropped"}.get(result.get("outcome"), result.get("outcome"))
            return kind, result.get("error")
        if ended and self.job.kind == "command":
            return command_outcome(ended["how"], ended.get("code"), bool(ended.get("stop_noticed")))
        if ended:
            return "failed", f"the job's process ended without a result ({ended['how']})"
        how = describe_status(self.status) if self.status is not None else "vanished"
        return "failed", f"the job's child process {how} before the job ended"


@dataclass
class IdleSlot:
    """A child between jobs, its job process still alive (see jobprocess.py)."""

    pid: int
    lifeline: int
    results: int
    retiring: bool = False  # it exits by itself: no job for it

    def assign(self, job: Job, server_id: str, deadline: float, started: float) -> RunningJob | None:
        """Hand this slot `job`; None when it cannot take it (then the job
        gets a fresh child)."""
        line = encode_next_job(job, server_id, deadline) + b"\n"
        if self.retiring or len(line) > MAX_HANDED_JOB_BYTES:
            return None
        try:
            written = os.write(self.lifeline, line)
        except OSError:
            written = 0  # it died (and is not reaped yet)
        if written != len(line):
            self.dismiss(kill=written > 0)  # half a line must never be read as a job
            return None
        return RunningJob(job=job, pid=self.pid, lifeline=self.lifeline, results=self.results, started=started,
                          slot=True, handed=True)

    def dismiss(self, kill: bool = False) -> None:
        """Let it go: at its lifeline's EOF it kills its job process and
        exits (or now, with `kill`)."""
        self.retiring = True
        if kill:
            signal_group(self.pid, signal.SIGKILL)
        try:
            os.close(self.lifeline)
        except OSError:
            pass
        self.lifeline = -1

    def close(self) -> None:
        for fd in (self.lifeline, self.results):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass


def spawn(assignment: Assignment, deadline: float, started: float) -> RunningJob:
    """Fork a child for one job. The child runs jobprocess.run_child."""
    lifeline_r, lifeline_w = os.pipe()
    results_r, results_w = os.pipe()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()  # or the child would inherit and repeat buffered output
    pid = os.fork()
    if pid == 0:
        os.close(lifeline_w)
        os.close(results_r)
        run_child(assignment, lifeline_r, results_w, deadline)
    try:
        os.setpgid(pid, pid)  # as the child does: the group exists from now on
    except OSError:
        pass  # the child has exec'd or exited already; its own call did it
    os.close(lifeline_r)
    os.close(results_w)
    os.set_blocking(lifeline_w, False)
    os.set_blocking(results_r, False)
    return RunningJob(job=assignment.job, pid=pid, lifeline=lifeline_w, results=results_r, started=started,
                      slot=assignment.reuse and assignment.job.kind == "callable")
