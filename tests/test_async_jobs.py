"""`async def` jobs run to completion in their job process, with the same
outcomes as sync jobs; a target whose work did not happen is never recorded
as succeeded. Real supervisors, on SQLite and PostgreSQL."""

import signal

import pytest

from harness import freeze, read_lines, wait_for

pytestmark = pytest.mark.slow
ALLOW = {"allow": ["asyncjobs:*"], "max_attempts": 1}


def finished(queue, *jobs):
    return all(queue.get(job.id).state in ("succeeded", "failed") for job in jobs)


def test_coroutine_jobs_and_awaitable_results_run_to_completion(queue, e2e_db_url, supervisors, records):
    sup = supervisors(e2e_db_url, "s1", jobs=ALLOW)
    sup.wait_registered(queue)
    jobs = [queue.enqueue(f"asyncjobs:{name}", [str(records)])
            for name in ("sleep_then_write", "returns_coroutine", "returns_coroutine_too")]
    wait_for(lambda: finished(queue, *jobs), what="the async jobs to finish")
    for job in jobs:
        assert queue.get(job.id).state == "succeeded", queue.get(job.id).error
        assert len(read_lines(records / f"job-{job.id}.ran")) == 1, f"job {job.target} did not run its code"
    assert "was never awaited" not in sup.log()


@pytest.mark.parametrize("target, kind", [("asyncjobs:generator", "generator"),
                                          ("asyncjobs:async_generator", "async_generator")])
def test_a_target_whose_work_did_not_happen_fails_with_a_clear_error(
    queue, e2e_db_url, supervisors, records, target, kind
):
    sup = supervisors(e2e_db_url, "s1", jobs=ALLOW)
    sup.wait_registered(queue)
    job = queue.enqueue(target, [str(records)])
    wait_for(lambda: finished(queue, job), what="the job to end")
    ended = queue.get(job.id)
    assert ended.state == "failed"
    assert f"returned {kind}" in ended.error and "only runs when iterated" in ended.error
    assert "Traceback" not in ended.error  # one clear line, not a stack
    assert read_lines(records / f"{kind}.ran") == []


def test_an_exception_in_a_coroutine_fails_the_job_with_its_traceback(queue, e2e_db_url, supervisors, records):
    sup = supervisors(e2e_db_url, "s1", jobs=ALLOW)
    sup.wait_registered(queue)
    job = queue.enqueue("asyncjobs:raise_error", [str(records)], max_attempts=2)
    wait_for(lambda: finished(queue, job), what="the job to fail twice")
    ended = queue.get(job.id)
    assert ended.state == "failed" and ended.attempts == 2
    assert "ValueError: async job raised on purpose" in ended.error
    assert "retry_scheduled" in [e.kind for e in ended.events]
    assert read_lines(records / f"job-{job.id}.ran") == ["raising", "raising"]


def test_an_async_job_awaits_the_stop_notice_checkpoints_and_hands_off(queue, e2e_db_url, supervisors, records):
    old = supervisors(e2e_db_url, "old", jobs=ALLOW, shutdown={"drain": "20s", "kill_after": "1s"})
    old.wait_registered(queue)
    job = queue.enqueue("asyncjobs:hand_off_when_stopping", [str(records)])
    wait_for(lambda: read_lines(records / f"job-{job.id}.waiting"), what="the job to await the stop notice")
    assert queue.get(job.id).checkpoint == {"step": 1}
    # Another task of the job ticks while it awaits the notice: the wait does
    # not block its event loop.
    wait_for(lambda: len(read_lines(records / f"job-{job.id}.ticks")) >= 3, what="the other task to tick")

    old.send(signal.SIGTERM)
    assert old.wait(timeout=15) == 0  # the drain ended as soon as the job handed off
    (stopped,) = read_lines(records / f"job-{job.id}.stopped")
    noticed, ticks = stopped.split()
    assert noticed == "True"
    assert int(ticks) >= 3  # the other task ran while the job awaited the notice
    handed = queue.get(job.id)
    assert handed.state == "enqueued" and handed.checkpoint == {"step": 2}
    assert "handed_off" in [e.kind for e in handed.events]
    assert not any(e.kind in ("failed", "retry_scheduled") for e in handed.events)

    new = supervisors(e2e_db_url, "new", jobs=ALLOW)
    new.wait_registered(queue)
    wait_for(lambda: queue.get(job.id).state == "succeeded", what="the job to finish on new")
    assert [line.split()[0] for line in read_lines(records / f"job-{job.id}.resumed")] == ["2"]


def test_lease_lost_in_a_coroutine_records_nothing(queue, e2e_db_url, supervisors, records):
    # A frozen supervisor cannot kill the run itself, and dead_after is long
    # enough that the child's fence stays far away: only the job's own
    # checkpoint can find out that the job was taken.
    sup = supervisors(e2e_db_url, "s1", jobs=ALLOW, server={"heartbeat_interval": "500ms", "dead_after": "20s"})
    server = sup.wait_registered(queue)
    job = queue.enqueue("asyncjobs:checkpoint_until_lease_lost", [str(records)])
    wait_for(lambda: queue.get(job.id).checkpoint, what="the first checkpoint")
    freeze(sup, e2e_db_url, server.id, job.id)
    queue.delete(job.id)
    wait_for(lambda: read_lines(records / f"job-{job.id}.lease_lost"), what="the job to get LeaseLost")
    sup.proc.send_signal(signal.SIGCONT)
    wait_for(lambda: f"job {job.id} (asyncjobs:" in sup.log() and "no longer owns the job" in sup.log(),
             what="the supervisor to drop the outcome")
    assert queue.jobs() == []  # nothing recorded about the deleted job


def test_the_memory_limit_ends_an_async_job(queue, e2e_db_url, supervisors):
    sup = supervisors(e2e_db_url, "s1", jobs={**ALLOW, "memory_limit": "200MiB"})
    sup.wait_registered(queue)
    job = queue.enqueue("asyncjobs:hog_memory", [400])
    wait_for(lambda: finished(queue, job), what="the memory limit to end the job")
    assert "memory limit exceeded" in queue.get(job.id).error


# --- in-process units ----------------------------------------------------------------


def test_call_job_awaits_every_awaitable_and_refuses_generators():
    import asyncio

    from supervisor.jobprocess import WorkNotDone, call_job

    async def answer():
        await asyncio.sleep(0)
        return 42

    assert call_job(answer, [], {}) == 42
    assert call_job(lambda: answer(), [], {}) == 42

    def gen():
        yield 1

    with pytest.raises(WorkNotDone, match="returned generator"):
        call_job(gen, [], {})


def test_wait_stopping_async_wakes_on_the_notice_from_another_thread():
    import asyncio
    import threading
    from types import SimpleNamespace

    from supervisor.jobcontext import JobContext

    job = SimpleNamespace(id=1, attempts=1, interruptions=0, checkpoint=None)
    context = JobContext(job, 1, "server", open_storage=None)

    async def scenario():
        assert await context.wait_stopping_async(0.01) is False  # no notice yet
        threading.Timer(0.05, context._notice_stop).start()
        assert await asyncio.wait_for(context.wait_stopping_async(30), 10) is True
        assert await context.wait_stopping_async(30) is True  # already stopping: at once

    asyncio.run(scenario())
