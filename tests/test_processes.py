"""Process identity: a recycled pid is never mistaken for the process that
registered, and a process that cannot be identified is never declared dead."""

import os
import subprocess

from supervisor.processes import is_same_process, set_scheduling, start_time


def test_a_live_process_with_its_start_time_is_itself():
    assert is_same_process(os.getpid(), start_time(os.getpid())) is True


def test_a_pid_now_held_by_a_later_process_is_provably_not_it():
    assert is_same_process(os.getpid(), start_time(os.getpid()) - 3600) is False


def test_a_pid_with_no_process_is_provably_gone():
    child = subprocess.Popen(["true"])
    child.wait()
    assert is_same_process(child.pid, 0.0) is False


def test_a_live_pid_without_a_start_time_cannot_be_judged():
    assert is_same_process(os.getpid(), None) is None


def policy_after_set_scheduling(kind: str) -> tuple[bool, int]:
    """(set_scheduling's answer, the policy) in a forked process: a process
    cannot leave SCHED_IDLE unprivileged, so the test's own must not try."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        ok = set_scheduling(kind)
        os.write(write_end, f"{int(ok)} {os.sched_getscheduler(0)}".encode())
        os._exit(0)
    os.close(write_end)
    answer = os.read(read_end, 100).decode().split()
    os.close(read_end)
    os.waitpid(pid, 0)
    return bool(int(answer[0])), int(answer[1])


def test_jobs_scheduling_puts_a_process_in_that_class():
    assert policy_after_set_scheduling("idle") == (True, os.SCHED_IDLE)
    assert policy_after_set_scheduling("batch") == (True, os.SCHED_BATCH)
    assert policy_after_set_scheduling("normal") == (True, os.SCHED_OTHER)
