"""Rolling deploys with real supervisors: servers of release r1 replaced one
at a time by servers of r2 move each job once; a job left to a busy other
release is taken by its own release after the window; with no other
release up, or no release at all, a handed-off job moves at once; and
`shiftchange handoff --release`. Judged from the jobs' own records (runs,
steps) and the interruptions column."""

import json
import os
import signal
import subprocess
import sys
from collections import Counter

import pytest
from sqlalchemy import select

from harness import read_lines, wait_for
from supervisor import Queue
from supervisor.tables import jobs as jobs_table

pytestmark = pytest.mark.slow
STEPS = "scjobs:steps_until_told"


def runs(records, job_id):
    return read_lines(records / f"job-{job_id}.runs")


def steps(records, job_id):
    return [int(line.split()[0]) for line in read_lines(records / f"job-{job_id}.steps")]


def avoid(queue, job_id):
    with queue.engine.connect() as conn:
        return tuple(conn.execute(
            select(jobs_table.c.avoid_release, jobs_table.c.avoid_until).where(jobs_table.c.id == job_id)
        ).first())


def jobs_on(queue, server_id):
    return [s.jobs for s in queue.servers() if s.id == server_id][0]


def running_on(queue, job_id, server_id):
    job = queue.get(job_id)
    return job.state == "processing" and job.server == server_id


def release_of_server(queue):
    return {s.id: s.release for s in queue.servers()}


def cli(config_path, *args, timeout=60):
    return subprocess.run(
        [sys.executable, "-m", "supervisor", *args, "--config", str(config_path)],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, "COLUMNS": "250"},
    )


def finish_all(queue, records, job_ids):
    (records / "finish").touch()
    wait_for(lambda: all(queue.get(j).state == "succeeded" for j in job_ids), 60, "the jobs to finish")


def test_a_rolling_deploy_moves_each_job_once(db_url, supervisors, records):
    """Two servers of r1 (concurrency 2) run three long checkpointing
    CPU-bound jobs; each is replaced by a server of r2, one at a time. The
    first one stopped holds two jobs while the other old server has a free
    slot and polls 20 times as often as the new ones: without releases it
    could take a job that it hands off again a moment later."""
    r1 = {"release": "r1", "concurrency": 2, "release_window": "1m"}
    r2 = {"release": "r2", "concurrency": 2, "release_window": "1m", "poll_interval": "1s"}
    with Queue(db_url) as queue:
        old = {name: supervisors(db_url, name, server=r1) for name in ("old-1", "old-2")}
        ids = {name: sup.wait_registered(queue).id for name, sup in old.items()}
        job_ids = [queue.enqueue(STEPS, [str(records)]).id for _ in range(3)]
        wait_for(lambda: all(runs(records, j) for j in job_ids), 60, "every job to start")
        for number, name in enumerate(sorted(old, key=lambda n: -len(jobs_on(queue, ids[n]))), 1):
            supervisors(db_url, f"new-{number}", server=r2).wait_registered(queue)
            moving = jobs_on(queue, ids[name])
            old[name].send(signal.SIGTERM)
            assert old[name].wait() == 0
            wait_for(
                lambda: all(queue.get(j).state == "processing"
                            and release_of_server(queue)[queue.get(j).server] == "r2" for j in moving),
                30, f"the jobs of {name} to run on the new release",
            )
        finish_all(queue, records, job_ids)

        assert read_lines(records / "overlaps") == []
        for job_id in job_ids:
            job = queue.get(job_id)
            # Every job ran on an old server that was stopped, then on a new
            # one that was not: exactly one interruption, seen by the job too.
            assert job.interruptions == 1 and len(runs(records, job_id)) == 2, (job_id, runs(records, job_id))
            done = steps(records, job_id)
            redone = [step for step, count in Counter(done).items() if count > 1]
            assert sorted(set(done)) == list(range(1, max(done) + 1))  # resumed from its checkpoint
            assert len(redone) <= 1 and Counter(done).most_common(1)[0][1] <= 2
            claims = [e.server for e in job.events if e.kind == "claimed"]
            assert [release_of_server(queue)[s] for s in claims] == ["r1", "r2"]


def test_a_job_left_to_a_busy_release_is_taken_by_its_own_after_the_window(e2e_db_url, supervisors, records):
    """No starvation: the only server of r2 is busy, so once the window has
    passed a server of r1 takes the job that another r1 server handed off."""
    with Queue(e2e_db_url) as queue:
        supervisors(e2e_db_url, "new-1", server={"release": "r2", "concurrency": 1}).wait_registered(queue)
        blocker = queue.enqueue(STEPS, [str(records)]).id
        wait_for(lambda: runs(records, blocker), 30, "the blocker to keep the new server busy")
        r1 = {"release": "r1", "concurrency": 1, "release_window": "2s"}
        old_1 = supervisors(e2e_db_url, "old-1", server=r1)
        old_1.wait_registered(queue)
        job = queue.enqueue(STEPS, [str(records)]).id
        wait_for(lambda: runs(records, job), 30, "the job to start on old-1")
        old_2 = supervisors(e2e_db_url, "old-2", server=r1).wait_registered(queue)
        old_1.send(signal.SIGTERM)
        assert old_1.wait() == 0
        release, until = avoid(queue, job)
        assert release == "r1"
        wait_for(lambda: running_on(queue, job, old_2.id), 60, "old-2 to take the job after the window")
        claimed = [e for e in queue.get(job).events if e.kind == "claimed"][-1]
        assert claimed.server == old_2.id and claimed.at >= until  # not before the window ended
        finish_all(queue, records, [job, blocker])
        assert read_lines(records / "overlaps") == []
        assert queue.get(job).interruptions == 1 and len(runs(records, job)) == 2


@pytest.mark.parametrize("release", ["r1", None], ids=["same-release", "no-release"])
def test_with_no_other_release_up_a_handed_off_job_moves_at_once(e2e_db_url, supervisors, records, release):
    """A restart within one release (or a deploy without releases, as
    before releases existed): nothing to wait for, the job moves at once,
    long before a 5 minute window would end."""
    settings = {"concurrency": 1, "release_window": "5m", **({"release": release} if release else {})}
    with Queue(e2e_db_url) as queue:
        a = supervisors(e2e_db_url, "a", server=settings)
        a.wait_registered(queue)
        job = queue.enqueue(STEPS, [str(records)]).id
        wait_for(lambda: runs(records, job), 30, "the job to start on a")
        b = supervisors(e2e_db_url, "b", server=settings).wait_registered(queue)
        a.send(signal.SIGTERM)
        assert a.wait() == 0
        assert avoid(queue, job)[0] == release
        wait_for(lambda: running_on(queue, job, b.id), 30, "b to take the job at once")
        assert b.release == release
        finish_all(queue, records, [job])
        assert read_lines(records / "overlaps") == [] and queue.get(job).interruptions == 1


def test_handoff_release_stops_every_server_of_that_release(e2e_db_url, supervisors, records):
    with Queue(e2e_db_url) as queue:
        r1 = {"release": "r1", "concurrency": 1}
        old = [supervisors(e2e_db_url, name, server=r1) for name in ("old-a", "old-b")]
        old_ids = {sup.wait_registered(queue).id for sup in old}
        job_ids = [queue.enqueue(STEPS, [str(records)]).id for _ in range(2)]
        wait_for(lambda: all(runs(records, j) for j in job_ids), 30, "both jobs to start")
        new = supervisors(e2e_db_url, "new-1", server={"release": "r2", "concurrency": 2})
        new_id = new.wait_registered(queue).id

        status = cli(new.config_path, "status")
        assert status.returncode == 0 and "release" in status.stdout and "r1" in status.stdout

        done = cli(new.config_path, "handoff", "--release", "r1", "--json")
        assert done.returncode == 0, done.stderr
        reports = json.loads(done.stdout)
        assert {r["id"] for r in reports} == old_ids
        assert sorted(j for r in reports for j in r["jobs"]) == sorted(job_ids)
        assert all(sup.proc.poll() is not None for sup in old)
        assert {s.id: s.state for s in queue.servers()} == {**dict.fromkeys(old_ids, "stopped"), new_id: "running"}
        wait_for(lambda: all(running_on(queue, j, new_id) for j in job_ids), 30, "the new release to take both")

        unknown = cli(new.config_path, "handoff", "--release", "r9")
        assert unknown.returncode == 1 and "r9" in unknown.stderr and "r2" in unknown.stderr
        both = cli(new.config_path, "handoff", "--release", "r2", "--server", "new-1")
        assert both.returncode == 2 and "not both" in both.stderr
        assert new.proc.poll() is None  # neither touched the running server
        finish_all(queue, records, job_ids)
        assert read_lines(records / "overlaps") == []
