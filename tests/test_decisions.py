"""The fast tier: the supervisor's decisions without processes, databases
or real time. A fake clock stands in for CLOCK_BOOTTIME and a storage that
records its calls stands in for the database, so each rule is checked on
its own in milliseconds. The end-to-end tests prove the same rules with
real supervisors; these say which rule broke."""

import os
import signal

import pytest

from supervisor.children import RunningJob
from supervisor.config import Config, JobsConfig, ServerConfig, ShutdownConfig
from supervisor.errors import StorageUnavailable
from supervisor.jobprocess import reason_to_retire
from supervisor.loop import Supervisor, describe_outcome
from supervisor.records import Job
from supervisor.shutdown import HOLD_MARGIN_S, shut_down
from supervisor.storage import Beat, Requeued


class FakeClock:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


def a_job(kind="callable", **changes):
    values = dict(id=7, state="processing", queue="default", kind=kind, target="app:work", args=[], kwargs={},
                  priority=0, attempts=1, max_attempts=3, interruptions=0, max_interruptions=10,
                  server="s1", lease=4, run_at=0.0, created_at=0.0, started_at=0.0, finished_at=None, error=None)
    values.update(changes)
    return Job(**values)


def ended(code, how="exit status 0", stop_noticed=False):
    return {"event": "exit", "code": code, "how": how, "stop_noticed": stop_noticed}


def run(kind="callable", messages=(), **flags):
    child = RunningJob(job=a_job(kind), pid=1, lifeline=-1, results=-1, started=0.0)
    child.messages = list(messages)
    for name, value in flags.items():
        setattr(child, name, value)
    return child


# --- how a run ended, and what that means for its job ------------------------------

@pytest.mark.parametrize("child, stopping, expected", [
    (run(messages=[{"event": "result", "outcome": "succeeded"}, ended(0)]), False, "succeeded"),
    (run(messages=[{"event": "result", "outcome": "failed", "error": "E"}, ended(0)]), False, "failed"),
    (run(messages=[{"event": "result", "outcome": "handoff"}, ended(0)]), False, "handoff"),
    (run(messages=[{"event": "result", "outcome": "lease_lost"}, ended(0)]), False, "dropped"),
    (run(messages=[ended(-9, "killed by SIGKILL")]), False, "failed"),  # no result: the process died
    (run(messages=[ended(-15, "killed by SIGTERM")]), True, "handoff"),  # the deploy's SIGTERM
    (run(messages=[ended(-15, "killed by SIGTERM")]), False, "failed"),  # someone else's SIGTERM
    (run(messages=[{"event": "fenced", "reason": "late"}]), False, "handoff"),  # deadline passed
    (run(messages=[ended(0)], kill_reason="memory limit exceeded"), False, "failed"),
    (run(messages=[{"event": "result", "outcome": "succeeded"}], lease_lost=True), False, "dropped"),
    (run("command", [ended(0)]), False, "succeeded"),
    (run("command", [ended(75, "exit status 75")]), False, "handoff"),  # EX_TEMPFAIL
    (run("command", [ended(-15, "killed by SIGTERM", stop_noticed=True)]), False, "handoff"),
    (run("command", [ended(2, "exit status 2")]), False, "failed"),
    (run(status=9), False, "failed"),  # the child itself vanished
], ids=lambda value: None)
def test_what_a_run_ended_as(child, stopping, expected):
    kind, _ = child.outcome(stopping=stopping)
    assert kind == expected


def test_an_outcome_the_run_recorded_itself_stands_whatever_else_is_known():
    child = run(messages=[ended(0) | {"recorded": "succeeded", "outcome": "succeeded"}], kill_reason="memory")
    assert child.recorded() == ("succeeded", None, "succeeded")
    assert run(messages=[ended(0)]).recorded() is None


# --- reusing job processes (jobs.reuse_processes) -------------------------------------

CLEAN = dict(alive=True, stopped=False, in_time=True, doubtful=False, jobs_run=1, max_jobs=1000,
             memory=100 * 2**20, max_memory=512 * 2**20, strays=False)


@pytest.mark.parametrize("change, retired", [
    ({}, None),  # a clean end: the next job runs in the same process
    ({"max_memory": None, "memory": 2**40}, None),  # no memory limit
    ({"alive": False}, "died"),
    ({"stopped": True}, "stopped"),  # a stop notice or a timeout: it may be cut short mid-way
    ({"in_time": False}, "deadline"),
    ({"doubtful": True}, "threads"),
    ({"strays": True}, "processes"),
    ({"jobs_run": 1000}, "max_jobs_per_process"),
    ({"memory": 513 * 2**20}, "max_memory_per_process"),
], ids=lambda value: None)
def test_when_a_slot_retires_its_job_process(change, retired):
    reason = reason_to_retire(**(CLEAN | change))
    assert (reason is None) if retired is None else (retired in reason)


def test_a_slot_takes_the_next_job_only_when_it_said_so_and_was_not_killed():
    said_next = [ended(0) | {"next": True}]
    assert run(messages=said_next, slot=True).ended_in_slot()
    assert not run(messages=said_next).ended_in_slot()  # a fresh child: its exit ends the job
    assert not run(messages=said_next, slot=True).idle_slot().retiring
    assert run(messages=[ended(0) | {"next": False}], slot=True).idle_slot().retiring
    for killed in ({"kill_reason": "memory"}, {"lease_lost": True}, {"timed_out": "timed out after 1s"}):
        assert run(messages=said_next, slot=True, **killed).idle_slot().retiring


def test_a_job_handed_to_a_slot_that_ended_before_taking_it_is_given_back_not_failed():
    """The slot's job process died while it was idle, and the supervisor
    handed it a job before it saw the slot go: that run never began."""
    assert run(messages=[], slot=True, handed=True, status=0).outcome()[0] == "handoff"
    took = [{"event": "took", "job": 1}]
    assert run(messages=took, slot=True, handed=True, status=9).outcome()[0] == "failed"
    assert run(messages=[], slot=True, status=9).outcome()[0] == "failed"  # a fresh child's own job


def test_log_lines_say_what_happened_why_and_what_next():
    job = a_job(attempts=2, max_attempts=3)
    assert describe_outcome(job, "succeeded", "succeeded", None) == "succeeded"
    assert describe_outcome(job, "failed", "scheduled", "Traceback\nValueError: x") == (
        "failed (attempt 2 of 3): ValueError: x; a retry is scheduled")
    assert describe_outcome(job, "failed", "failed", "boom") == "failed for good (attempt 2 of 3): boom"
    assert describe_outcome(job, "handoff", "enqueued", "asked").endswith("back in the queue, to resume elsewhere")
    assert "lease 4 is no longer current" in describe_outcome(job, "succeeded", "stale", None)


# --- the fence ---------------------------------------------------------------------------

def supervisor(clock=None, **sections):
    config = Config(
        server=ServerConfig(name="s1", heartbeat_interval=1.0, dead_after=10.0, concurrency=2),
        shutdown=sections.get("shutdown", ShutdownConfig(drain=0.0, kill_after=2.0)),
        jobs=JobsConfig(),
    )
    return Supervisor(config, clock=clock or FakeClock())


def test_children_stop_half_a_heartbeat_before_anyone_may_reap_their_server():
    clock = FakeClock(500.0)
    sup = supervisor(clock)
    sup.last_beat_sent = 500.0  # measured BEFORE the heartbeat was sent
    assert sup.fence_deadline() == 500.0 + 10.0 - 0.5


def test_no_claim_when_a_new_job_would_be_fenced_before_the_next_heartbeat():
    clock = FakeClock(500.0)
    sup = supervisor(clock)
    sup.last_beat_sent, sup.server_id = 500.0, "s1"
    sup.storage = RecordingStorage()
    clock.now = 500.0 + 10.0 - 0.5 - 1.0 + 0.01  # later than the fence minus one heartbeat
    sup.claim()
    assert sup.storage.calls == []


# --- signals -----------------------------------------------------------------------------

def test_the_first_stop_signal_starts_the_shutdown_the_second_hurries_it():
    clock = FakeClock(10.0)
    sup = supervisor(clock)
    sup._queue_signal(signal.SIGTERM, None)
    clock.now = 11.0
    sup._queue_signal(signal.SIGINT, None)
    sup.handle_signals()
    assert (sup.stop_signal, sup.stop_signal_at, sup.hurry) == (signal.SIGTERM, 10.0, True)


def test_sigtstp_makes_a_server_quiet_without_stopping_it():
    sup = supervisor()
    sup._queue_signal(signal.SIGTSTP, None)
    sup.handle_signals()
    assert sup.quiet and sup.quiet_wanted and sup.stop_signal is None


class SignalDuring:
    """A storage that records every database call a turn makes, and brings
    the deploy's SIGTERM while `verb` waits for the database. Every call
    but the heartbeat fails, as an unreachable database would: each step
    of a turn outlives that."""

    def __init__(self, sup, verb):
        self.sup, self.verb, self.calls = sup, verb, []

    def __getattr__(self, verb):
        def call(*args, **kwargs):
            self.calls.append(verb)
            if verb == self.verb:
                self.sup._queue_signal(signal.SIGTERM, None)
            if verb == "beat":  # every fleet chore taken by this heartbeat
                return Beat("running", tuple(args[1]), now=self.sup.clock())
            raise StorageUnavailable("recorded, not run")

        return call


@pytest.mark.parametrize("during, calls", [
    ("beat", ["beat"]),
    ("lost_leases", ["beat", "lost_leases"]),  # the lease check after the heartbeat
])
def test_a_stop_signal_during_a_turn_is_answered_before_the_turns_next_database_call(during, calls):
    clock = FakeClock(100.0)
    sup = supervisor(clock)
    sup.storage, sup.server_id = SignalDuring(sup, during), "s1"
    sup.wakeup_r, _ = os.pipe()
    os.set_blocking(sup.wakeup_r, False)  # as install_signals makes it
    sup.next_beat = sup.next_claim = sup.next_recurring = 100.0  # the whole turn is due
    sup.tick()
    # No more calls (chores, pending outcomes, recurring ticks, a claim): the
    # shutdown sequence runs next.
    assert sup.storage.calls == calls and sup.stop_signal == signal.SIGTERM


# --- the shutdown sequence, in order ---------------------------------------------------------

class RecordingStorage:
    """Records the storage verbs the shutdown calls, in order."""

    def __init__(self, fail_handoff=False):
        self.calls = []
        self.fail_handoff = fail_handoff

    def handoff(self, server_id, hold, reason):
        self.calls.append(("handoff", server_id, hold))
        if self.fail_handoff:
            raise StorageUnavailable("cannot reach the database")
        return [Requeued(7, 5, False, server_id)]

    def release_handoff(self, server_id, held):
        self.calls.append(("release_handoff", server_id, [job.id for job in held]))

    def claim(self, *args, **kwargs):
        self.calls.append(("claim",))
        return []


def stopping_supervisor(storage, kill_after=2.0):
    sup = supervisor(shutdown=ShutdownConfig(drain=0.0, kill_after=kill_after))
    sup.storage, sup.server_id = storage, "s1"
    sup.stop_signal, sup.stop_signal_at = signal.SIGTERM, sup.clock()
    # Killing and reaping is the real-process tests' part: here it would
    # reap the test process's own children. Record when it happens instead.
    sup.kill_all = lambda reason: storage.calls.append(("kill_all",))
    return sup


def test_the_handoff_is_committed_and_held_before_the_children_die_and_the_hold_is_released():
    storage = RecordingStorage()
    sup = stopping_supervisor(storage, kill_after=3.0)
    assert shut_down(sup) == 0
    # Held until the children's own deadline (dead_after - heartbeat/2 after
    # the last heartbeat, which was just now) + half the margin: it outlasts
    # kill_after + the margin here (see test_shutdown_hold.py).
    assert sup.last_beat_sent == sup.clock()
    hold = 10.0 - 0.5 + HOLD_MARGIN_S / 2
    assert storage.calls == [("handoff", "s1", hold), ("kill_all",), ("release_handoff", "s1", [7])]
    assert not sup.claiming and sup.dropping


def test_a_handoff_that_cannot_be_committed_exits_1_and_never_releases_a_hold():
    storage = RecordingStorage(fail_handoff=True)
    sup = stopping_supervisor(storage)
    assert shut_down(sup) == 1
    assert [call[0] for call in storage.calls] == ["handoff", "kill_all"]  # children die all the same


# --- runs a slot claimed itself (chained claims) ------------------------------------------

class OutcomeStorage:
    """Records the outcome writes the supervisor makes itself."""

    def __init__(self):
        self.calls = []

    def fail(self, job_id, lease, server_id, error, **options):
        self.calls.append(("fail", job_id, error))
        return "failed"

    def give_back(self, job_id, lease, server_id, reason):
        self.calls.append(("give_back", job_id, reason))
        return "enqueued"


def chained_exit(next_job, recorded="succeeded"):
    from supervisor.jobprocess import encode_next_job

    return {"event": "exit", "code": None, "how": "its code ended", "next": True, "outcome": "succeeded",
            "recorded": recorded, "chained": encode_next_job(next_job, "s1", 99.0).decode()}


def slot_supervisor():
    sup = supervisor()
    sup.storage, sup.server_id = OutcomeStorage(), "s1"
    return sup


def test_a_slot_reaped_before_it_was_read_ends_the_runs_it_claimed_too():
    """The slot recorded job 7, claimed job 8 with that outcome, ran it and
    died of it, all before the supervisor read a line: job 8 is failed by
    the supervisor, not left `processing` with no run."""
    sup = slot_supervisor()
    second = a_job(id=8, lease=1)
    child = run(messages=[chained_exit(second), {"event": "took", "job": 8},
                          ended(-11, "killed by SIGSEGV") | {"next": False}], slot=True)
    sup._finish_reaped(child, status=11)
    assert sup.storage.calls == [("fail", 8, "the job's process ended without a result (killed by SIGSEGV)")]


def test_a_slot_read_alive_hands_over_to_the_run_of_the_job_it_claimed():
    sup = slot_supervisor()
    child = run(messages=[chained_exit(a_job(id=8, lease=1)), {"event": "took", "job": 8}], slot=True)
    sup.running[child.pid] = child
    successor = sup._next_in_slot(child)
    assert sup.running[child.pid] is successor and successor.job.id == 8
    assert successor.messages == [{"event": "took", "job": 8}] and not sup.slots and sup.storage.calls == []


def test_a_job_claimed_by_a_slot_we_were_killing_is_given_back_not_failed():
    sup = slot_supervisor()
    child = run(messages=[chained_exit(a_job(id=8, lease=1)), {"event": "took", "job": 8}], slot=True,
                kill_reason="memory limit exceeded")
    sup._finish_reaped(child, status=9)
    assert sup.storage.calls == [("give_back", 8, "its reused process was stopped at the end of job 7")]
