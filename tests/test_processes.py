"""Process identity: a recycled pid is never mistaken for the process that
registered, and a process that cannot be identified is never declared dead."""

import os
import subprocess

from supervisor.processes import is_same_process, start_time


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
