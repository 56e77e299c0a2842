"""End-to-end scenarios: real supervisors, real signals, real databases
(SQLite and PostgreSQL; the first on MariaDB too). Named as the situations
they prove."""

import json
import os
import signal

import psutil
import pytest

from harness import events_of, freeze, read_lines, runs, wait_for

pytestmark = pytest.mark.slow


def state_of(queue, job_id):
    return queue.get(job_id).state


def running_on(queue, job_id, server_id):
    job = queue.get(job_id)
    return job.state == "processing" and job.server == server_id




def assert_no_overlap(records):
    assert read_lines(records / "overlaps") == [], "two runs of one job were alive at once"




def test_sigterm_hands_a_cpu_bound_job_off_before_killing_it(any_queue, db_url, supervisors, records):
    # On every database: MariaDB's handoff is a batch of its own (Storage._batched_handoff).
    queue = any_queue
    old = supervisors(db_url, "old", shutdown={"kill_after": "1500ms"})
    old_server = old.wait_registered(queue)
    job = queue.enqueue("scjobs:spin", [str(records)])
    wait_for(lambda: runs(records, job.id), what="the job to start")
    (child_pid,) = [int(p) for p in runs(records, job.id)]

    old.send(signal.SIGTERM)
    wait_for(lambda: state_of(queue, job.id) == "enqueued", timeout=5, what="the handoff commit")
    assert psutil.pid_exists(child_pid), "the handoff must be durable before the child is killed"
    assert "handed_off" in events_of(queue, job.id)
    assert old.wait(timeout=1.5 + 5) == 0
    assert old.survivors() == []
    assert {s.id: s.state for s in queue.servers()}[old_server.id] == "stopped"

    new = supervisors(db_url, "new")
    new.wait_registered(queue)
    wait_for(lambda: state_of(queue, job.id) == "succeeded", what="the job to finish on the new server")
    done = queue.get(job.id)
    assert (done.interruptions, done.attempts) == (1, 1)
    assert len(runs(records, job.id)) == 2
    assert_no_overlap(records)


def test_rolling_deploy_moves_the_job_to_the_running_new_server(queue, e2e_db_url, supervisors, records):
    old = supervisors(e2e_db_url, "old", shutdown={"kill_after": "0s"})
    old.wait_registered(queue)
    job = queue.enqueue("scjobs:spin", [str(records)])
    wait_for(lambda: runs(records, job.id), what="the job to start on old")
    new = supervisors(e2e_db_url, "new")
    new_server = new.wait_registered(queue)

    old.send(signal.SIGTERM)
    wait_for(lambda: queue.get(job.id).server == new_server.id, timeout=10, what="the new server to take the job")
    assert old.wait() == 0
    wait_for(lambda: state_of(queue, job.id) == "succeeded", what="the job to succeed on new")
    assert_no_overlap(records)
    assert old.survivors() == []


def test_kill_9_of_the_supervisor_kills_its_children_and_another_server_recovers(queue, e2e_db_url, supervisors, records):
    old = supervisors(e2e_db_url, "old")
    old.wait_registered(queue)
    job = queue.enqueue("scjobs:with_grandchild", [str(records)])
    wait_for(lambda: read_lines(records / "grandchild"), what="the grandchild to start")
    survivor = supervisors(e2e_db_url, "survivor")
    survivor.wait_registered(queue)

    old.send(signal.SIGKILL)
    wait_for(lambda: not old.survivors(), timeout=5, what="the dead supervisor's tree to die on its own")
    wait_for(lambda: state_of(queue, job.id) == "succeeded", timeout=30, what="the survivor to finish the job")
    assert "reaped" in events_of(queue, job.id)
    assert_no_overlap(records)


def test_a_frozen_supervisor_is_reaped_its_children_fence_themselves_and_it_records_nothing(
    queue, e2e_db_url, supervisors, records
):
    frozen = supervisors(e2e_db_url, "frozen")
    frozen_server = frozen.wait_registered(queue)
    job = queue.enqueue("scjobs:spin", [str(records)])
    wait_for(lambda: runs(records, job.id), what="the job to start")
    (child_pid,) = [int(p) for p in runs(records, job.id)]
    freeze(frozen, e2e_db_url, frozen_server.id, job.id)  # between transactions: SQLite's lock stays free
    survivor = supervisors(e2e_db_url, "survivor")
    survivor_server = survivor.wait_registered(queue)

    # The frozen server's children stop before it can be declared dead...
    wait_for(lambda: not psutil.pid_exists(child_pid), timeout=10, what="the child to fence itself")
    # ...and only then does another server run the job.
    wait_for(lambda: state_of(queue, job.id) == "succeeded", timeout=30, what="the survivor to finish the job")
    assert queue.get(job.id).server == survivor_server.id
    assert {s.id: s.state for s in queue.servers()}[frozen_server.id] == "dead"

    frozen.proc.send_signal(signal.SIGCONT)
    wait_for(lambda: any(s.pid == frozen.pid and s.state == "running" and s.id != frozen_server.id
                         for s in queue.servers()), timeout=10, what="the thawed supervisor to register anew")
    assert all(e.server != frozen_server.id for e in queue.get(job.id).events if e.kind == "succeeded")
    assert_no_overlap(records)


def test_a_setsid_grandchild_that_ignores_sigterm_is_dead_after_shutdown(queue, e2e_db_url, supervisors, records):
    sup = supervisors(e2e_db_url, "s1", shutdown={"kill_after": "300ms"})
    sup.wait_registered(queue)
    queue.enqueue("scjobs:with_grandchild", [str(records)])
    (grandchild,) = wait_for(lambda: read_lines(records / "grandchild"), what="the grandchild")
    assert psutil.Process(int(grandchild)).ppid() != 1  # re-parented to a subreaper of ours
    sup.send(signal.SIGTERM)
    assert sup.wait() == 0
    assert not psutil.pid_exists(int(grandchild))
    assert sup.survivors() == []


def test_bad_targets_fail_with_readable_errors_while_the_supervisor_keeps_serving(queue, e2e_db_url, supervisors, records):
    sup = supervisors(e2e_db_url, "s1", jobs={"allow": ["scjobs:*", "nowhere.module:*"], "max_attempts": 1})
    sup.wait_registered(queue)
    expected = {
        queue.enqueue("nowhere.module:run").id: "ModuleNotFoundError",
        queue.enqueue("os:system", ["touch " + str(records / "pwned")]).id: "not allowed by jobs.allow",
        queue.enqueue("scjobs:raise_error").id: "ValueError: this job always raises",
        queue.enqueue("scjobs:exit_3").id: "exit status 3",
        queue.enqueue("scjobs:segfault").id: "SIGSEGV",
        queue.enqueue("scjobs:close_stdout").id: None,
        queue.enqueue("scjobs:missing_function").id: "AttributeError",
        queue.enqueue_command(["/bin/sh", "-c", "touch " + str(records / "pwned")]).id: "command jobs are disabled",
    }
    for job_id, error in expected.items():
        wait_for(lambda: state_of(queue, job_id) in ("failed", "succeeded"), what=f"job {job_id} to end")
        job = queue.get(job_id)
        if error is None:
            assert job.state == "succeeded"
        else:
            assert job.state == "failed" and error in job.error, job.error
    assert not (records / "pwned").exists()
    last = queue.enqueue("scjobs:quick", [str(records)])
    wait_for(lambda: state_of(queue, last.id) == "succeeded", what="the supervisor to keep serving")
    assert sup.proc.poll() is None


def test_a_job_failing_once_is_retried_and_succeeds(queue, e2e_db_url, supervisors, records):
    sup = supervisors(e2e_db_url, "s1")
    sup.wait_registered(queue)
    job = queue.enqueue("scjobs:fail_once", [str(records)], max_attempts=2)
    wait_for(lambda: state_of(queue, job.id) == "succeeded", what="the retry to succeed")
    assert events_of(queue, job.id) == ["enqueued", "claimed", "retry_scheduled", "claimed", "succeeded"]


def test_a_second_sigterm_skips_the_kill_after_wait(queue, e2e_db_url, supervisors, records):
    sup = supervisors(e2e_db_url, "s1", shutdown={"kill_after": "60s"})
    sup.wait_registered(queue)
    job = queue.enqueue("scjobs:spin", [str(records)])
    wait_for(lambda: runs(records, job.id), what="the job to start")
    sup.send(signal.SIGTERM)
    wait_for(lambda: state_of(queue, job.id) == "enqueued", what="the handoff")
    sup.send(signal.SIGTERM)
    assert sup.wait(timeout=10) == 0  # far less than kill_after
    assert sup.survivors() == []


def test_the_memory_limit_ends_a_job_with_a_clear_error(queue, e2e_db_url, supervisors):
    sup = supervisors(e2e_db_url, "s1", jobs={"memory_limit": "200MiB", "max_attempts": 1})
    sup.wait_registered(queue)
    job = queue.enqueue("scjobs:hog_memory", [400])
    wait_for(lambda: state_of(queue, job.id) == "failed", what="the memory limit to end the job")
    assert "memory limit exceeded" in queue.get(job.id).error


def test_logs_say_what_happened_to_which_job(queue, e2e_db_url, supervisors, records):
    sup = supervisors(e2e_db_url, "s1", log={"format": "json"})
    sup.wait_registered(queue)
    job = queue.enqueue("scjobs:quick", [str(records)])
    wait_for(lambda: state_of(queue, job.id) == "succeeded", what="the job")
    sup.send(signal.SIGTERM)
    sup.wait()
    lines = [json.loads(line) for line in sup.log().splitlines()]
    mine = [line["event"] for line in lines if line.get("job") == job.id]
    assert mine[:2] == ["claimed", "succeeded"]
    assert any(line.get("event") == "handed_off" for line in lines)


def test_job_processes_yield_the_cpu_to_their_supervisor_and_child(queue, e2e_db_url, supervisors, records):
    sup = supervisors(e2e_db_url, "s1", jobs={"nice": 7})
    sup.wait_registered(queue)
    job = queue.enqueue("scjobs:report_niceness", [str(records)])
    wait_for(lambda: state_of(queue, job.id) == "succeeded", what="the job")
    base = psutil.Process(sup.pid).nice()
    assert read_lines(records / "niceness") == [f"{base + 7} {base}"]


@pytest.mark.parametrize("scheduling, policy", [("idle", os.SCHED_IDLE), ("batch", os.SCHED_BATCH),
                                                ("normal", os.SCHED_OTHER)])
def test_job_processes_run_in_the_scheduling_class_of_jobs_scheduling(queue, e2e_db_url, supervisors, records,
                                                                      scheduling, policy):
    """jobs.scheduling: the job's process (and what it forks) is in that
    class; its child and the supervisor stay normal, so they preempt it."""
    sup = supervisors(e2e_db_url, "s1", jobs={"scheduling": scheduling})
    sup.wait_registered(queue)
    job = queue.enqueue("scjobs:report_scheduling", [str(records)])
    wait_for(lambda: state_of(queue, job.id) == "succeeded", what="the job")
    mine, child, _ = read_lines(records / "scheduling")[0].split()
    assert (int(mine), int(child)) == (policy, os.SCHED_OTHER)
    assert os.sched_getscheduler(sup.pid) == os.SCHED_OTHER
