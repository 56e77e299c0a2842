"""jobs.reuse_processes (issue 11): callable jobs run one after another in a
reused job process, recycled after jobs.max_jobs_per_process jobs, above
jobs.max_memory_per_process, and after any run that leaves it in doubt.
Judged from the jobs' side: each job says which process ran it. Real
supervisors on every database."""

import signal
from pathlib import Path

import pytest

from harness import alive, events_of, wait_for
from supervisor import Queue

ONE_SLOT = {"server": {"concurrency": 1}}


@pytest.fixture
def q(db_url):
    with Queue(db_url) as opened:
        yield opened


def start(supervisors, url, q, **jobs):
    sup = supervisors(url, "s1", **ONE_SLOT, jobs={"allow": ["reusejobs:*"], **jobs})
    sup.wait_registered(q)
    return sup


def results(q, ids):
    return [q.result(job_id, timeout=60) for job_id in ids]


def pid_written(records, job_id):
    path = Path(records, f"{job_id}.pid")
    return wait_for(lambda: path.exists() and path.read_text() and int(path.read_text()), what="the job's pid")


def test_a_reused_process_runs_max_jobs_then_is_recycled_and_shares_module_state(q, db_url, supervisors):
    start(supervisors, db_url, q, max_jobs_per_process=3)
    ids = [q.enqueue("reusejobs:whoami").id for _ in range(7)]
    ran = results(q, ids)
    pids = [pid for pid, _ in ran]
    assert pids[0] == pids[1] == pids[2] != pids[3] == pids[4] == pids[5] != pids[6], pids
    # What a job leaves in module globals, the next job of the process sees.
    assert [count for _, count in ran] == [1, 2, 3, 1, 2, 3, 1]


def test_without_reuse_every_job_gets_a_fresh_process(q, db_url, supervisors):
    start(supervisors, db_url, q, reuse_processes=False)
    ran = results(q, [q.enqueue("reusejobs:whoami").id for _ in range(3)])
    assert len({pid for pid, _ in ran}) == 3 and [count for _, count in ran] == [1, 1, 1]


def test_a_process_above_max_memory_is_recycled(q, db_url, supervisors):
    start(supervisors, db_url, q, max_memory_per_process="150MiB")
    first = q.enqueue("reusejobs:whoami").id
    leaker = q.enqueue("reusejobs:leak", [200]).id
    after = [q.enqueue("reusejobs:whoami").id for _ in range(2)]
    (first_pid, _), leaker_pid, (next_pid, count), (last_pid, _) = results(q, [first, leaker, *after])
    assert first_pid == leaker_pid  # reused until the leak
    assert next_pid != leaker_pid and count == 1  # a fresh process after it
    assert last_pid == next_pid


def test_a_timeout_in_a_reused_process_kills_it_and_a_fresh_one_follows(queue, e2e_db_url, supervisors, records):
    start(supervisors, e2e_db_url, queue)
    (first_pid, _), = results(queue, [queue.enqueue("reusejobs:whoami").id])
    slow = queue.enqueue("reusejobs:record_and_sleep", [str(records)], timeout="1s", max_attempts=1).id
    assert pid_written(records, slow) == first_pid  # it ran in the reused process
    assert wait_for(lambda: queue.get(slow).state == "failed" and queue.get(slow)).error.startswith("timed out")
    wait_for(lambda: not alive(first_pid), what="the timed-out process to be killed")
    (pid, count), = results(queue, [queue.enqueue("reusejobs:whoami").id])
    assert pid != first_pid and count == 1


def test_a_lost_lease_in_a_reused_process_kills_it_and_records_nothing(queue, e2e_db_url, supervisors, records):
    start(supervisors, e2e_db_url, queue)
    (first_pid, _), = results(queue, [queue.enqueue("reusejobs:whoami").id])
    slow = queue.enqueue("reusejobs:record_and_sleep", [str(records)]).id
    assert pid_written(records, slow) == first_pid
    queue.requeue(slow)  # an operator takes the job away while it runs
    wait_for(lambda: not alive(first_pid), what="the run of the requeued job to be killed")
    # Its next run, in a fresh process.
    wait_for(lambda: pid_written(records, slow) != first_pid, what="the job's next run")
    assert not {"succeeded", "failed", "retry_scheduled", "stale_write"} & set(events_of(queue, slow))


def test_sigterm_hands_off_a_job_running_in_a_reused_process(queue, e2e_db_url, supervisors, records):
    sup = start(supervisors, e2e_db_url, queue)
    (first_pid, _), = results(queue, [queue.enqueue("reusejobs:whoami").id])
    job = queue.enqueue("reusejobs:record_and_sleep", [str(records)]).id
    assert pid_written(records, job) == first_pid
    sup.send(signal.SIGTERM)
    assert sup.wait() == 0
    handed = queue.get(job)
    assert handed.state == "enqueued" and handed.interruptions == 1, handed
    assert not sup.survivors()
