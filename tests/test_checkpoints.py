"""Checkpoints and cooperative stop: long jobs resume where a deploy or a
crash interrupted them, and a run that lost its job cannot overwrite the
progress of the run that has it now."""

import json
import signal

import pytest

from harness import read_lines, wait_for
from supervisor import LeaseLost, NotInJob, Queue, current_job
from supervisor.jobcontext import JobContext
from supervisor.storage import Storage

pytestmark = pytest.mark.slow


def steps_run(records, job_id):
    """[(step, pid)] in the order the job's runs did them."""
    return [tuple(map(int, line.split())) for line in read_lines(records / f"job-{job_id}.steps")]


def checkpoint_of(queue, job_id):
    return queue.get(job_id).checkpoint


@pytest.mark.parametrize("interruption", ["sigterm", "kill -9"])
def test_a_ten_step_job_resumes_at_step_7_after_step_6s_checkpoint(queue, e2e_db_url, supervisors, records, interruption):
    old = supervisors(e2e_db_url, "old")
    old.wait_registered(queue)
    job = queue.enqueue("scjobs:steps", [str(records)], {"count": 10, "step_seconds": 0.05, "hold_after": 6})
    wait_for(lambda: checkpoint_of(queue, job.id) == {"step": 6}, what="step 6's checkpoint")
    wait_for(lambda: [step for step, _ in steps_run(records, job.id)] == [1, 2, 3, 4, 5, 6, 7], what="step 7 to begin")
    old_pid = steps_run(records, job.id)[0][1]

    old.send(signal.SIGTERM if interruption == "sigterm" else signal.SIGKILL)
    new = supervisors(e2e_db_url, "new")
    new.wait_registered(queue)
    wait_for(lambda: queue.get(job.id).state == "succeeded", timeout=30, what="the job to finish on new")

    done = steps_run(records, job.id)
    resumed = [step for step, pid in done if pid != old_pid]
    assert resumed == [7, 8, 9, 10]
    first_six = [step for step, _ in done if step <= 6]
    assert first_six == [1, 2, 3, 4, 5, 6]  # none ran twice
    final = queue.get(job.id)
    assert final.checkpoint is None  # cleared on success
    assert final.interruptions == 1
    assert ("handed_off" if interruption == "sigterm" else "reaped") in [e.kind for e in final.events]


def test_a_job_that_hands_off_in_the_drain_window_is_requeued_not_failed(queue, e2e_db_url, supervisors, records):
    old = supervisors(e2e_db_url, "old", shutdown={"drain": "10s", "kill_after": "1s"})
    old.wait_registered(queue)
    job = queue.enqueue("scjobs:cooperative", [str(records)])
    wait_for(lambda: checkpoint_of(queue, job.id) == {"step": 3}, what="the job to wait at step 3")

    old.send(signal.SIGTERM)
    assert old.wait(timeout=10) == 0  # the drain ended as soon as the job handed off
    (handoff_line,) = read_lines(records / f"job-{job.id}.handoff")
    assert handoff_line.split()[0] == "3"
    requeued = queue.get(job.id)
    assert (requeued.state, requeued.attempts, requeued.interruptions) == ("enqueued", 0, 1)
    assert requeued.events[-1].kind == "handed_off" and "stopped cleanly" in requeued.events[-1].detail

    new = supervisors(e2e_db_url, "new")
    new.wait_registered(queue)
    wait_for(lambda: queue.get(job.id).state == "succeeded", what="the job to finish on new")
    assert read_lines(records / f"job-{job.id}.done")[0].split()[0] == "10"
    assert "failed" not in [e.kind for e in queue.get(job.id).events]


def test_a_run_whose_job_was_requeued_cannot_overwrite_the_checkpoint(queue, e2e_db_url, supervisors, records):
    sup = supervisors(e2e_db_url, "s1", server={"concurrency": 1})
    sup.wait_registered(queue)
    job = queue.enqueue("scjobs:checkpoint_forever", [str(records)])
    wait_for(lambda: (checkpoint_of(queue, job.id) or {}).get("n", 0) >= 3, what="the first run to checkpoint")
    queue.requeue(job.id)  # the run goes on for a moment, but owns the job no more
    frozen = checkpoint_of(queue, job.id)  # the last value the old run wrote
    seen = []

    def new_run_checkpointed():
        seen.append(checkpoint_of(queue, job.id))
        return seen[-1]["pid"] != frozen["pid"]

    wait_for(new_run_checkpointed, what="the new run's checkpoint")
    assert all(value == frozen for value in seen if value["pid"] == frozen["pid"])
    refused = read_lines(records / f"job-{job.id}.refused")
    assert refused == [f"{frozen['pid']} LeaseLost"] or "killed its run" in sup.log()
    assert queue.get(job.id).state == "processing"  # the old run's end recorded nothing


def test_non_json_checkpoint_data_fails_the_job_not_the_supervisor(queue, e2e_db_url, supervisors, records):
    sup = supervisors(e2e_db_url, "s1", jobs={"max_attempts": 1})
    sup.wait_registered(queue)
    job = queue.enqueue("scjobs:bad_checkpoint")
    wait_for(lambda: queue.get(job.id).state == "failed", what="the job to fail")
    assert "TypeError: checkpoint data must be JSON-serialisable" in queue.get(job.id).error
    after = queue.enqueue("scjobs:quick", [str(records)])
    wait_for(lambda: queue.get(after.id).state == "succeeded", what="the supervisor to keep serving")


def test_a_command_job_checkpoints_through_its_fd_and_resumes_from_the_environment(queue, e2e_db_url, supervisors, records):
    script = (
        'if [ -n "$SHIFTCHANGE_CHECKPOINT" ]; then echo "$SHIFTCHANGE_JOB_ID $SHIFTCHANGE_CHECKPOINT" > "$0"; exit 0; fi\n'
        "trap 'echo \"{\\\"step\\\": 2}\" >&\"$SHIFTCHANGE_CHECKPOINT_FD\"; exit 75' TERM\n"
        'echo started > "$0.started"\n'
        "while true; do sleep 0.05; done\n"
    )
    out = records / "command-out"
    old = supervisors(e2e_db_url, "old", shutdown={"drain": "10s"}, jobs={"allow_commands": ["/bin/sh"]})
    old.wait_registered(queue)
    job = queue.enqueue_command(["/bin/sh", "-c", script, str(out)])
    wait_for(lambda: (records / "command-out.started").exists(), what="the command to start")
    old.send(signal.SIGTERM)  # the stop notice for a command is SIGTERM
    assert old.wait(timeout=10) == 0
    assert queue.get(job.id).checkpoint == {"step": 2}
    new = supervisors(e2e_db_url, "new", jobs={"allow_commands": ["/bin/sh"]})
    new.wait_registered(queue)
    wait_for(lambda: queue.get(job.id).state == "succeeded", what="the resumed command to succeed")
    job_id, saved = out.read_text().split(" ", 1)
    assert int(job_id) == job.id and json.loads(saved) == {"step": 2}
    assert queue.get(job.id).interruptions == 1


def test_current_job_outside_a_job_is_a_clear_error():
    with pytest.raises(NotInJob, match="only available inside a running shiftchange job"):
        current_job()


def test_a_reaped_runs_checkpoint_is_refused_and_changes_nothing(e2e_db_url):
    with Queue(e2e_db_url) as queue:
        storage = queue.storage
        old_server = storage.register_server(name="old", host="h", pid=1, pid_started_at=None,
                                             queues=["default"], concurrency=1, dead_after=5)
        queue.enqueue("app:f")
        (job,) = storage.claim(old_server, ["default"], 1)
        zombie = JobContext(job, job.lease, old_server, lambda: Storage(queue.engine))
        zombie.checkpoint({"step": 1})
        storage.reap_server(old_server, "proven dead")
        new_server = storage.register_server(name="new", host="h", pid=2, pid_started_at=None,
                                             queues=["default"], concurrency=1, dead_after=5)
        (again,) = storage.claim(new_server, ["default"], 1)
        JobContext(again, again.lease, new_server, lambda: Storage(queue.engine)).checkpoint({"step": 2})
        with pytest.raises(LeaseLost):
            zombie.checkpoint({"step": 99})
        assert queue.get(job.id).checkpoint == {"step": 2}
