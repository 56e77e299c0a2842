"""The edges of the deploy lifecycle, with real supervisors: a drain longer
than dead_after, a restart while the predecessor is a zombie, operator
typos, and what `ps` shows. Judged from the jobs' own records too."""

import json
import signal
import subprocess
import sys

import psutil
import pytest

from harness import read_lines, runs, wait_for

pytestmark = pytest.mark.slow



def completions(records, job_id):
    return read_lines(records / f"job-{job_id}.done")


def cli(sup, *args):
    return subprocess.run(
        [sys.executable, "-m", "supervisor", *args, "--config", str(sup.config_path)],
        capture_output=True, text=True, timeout=60,
    )


def test_a_drain_longer_than_dead_after_lets_the_job_finish_on_its_own_server(any_queue, db_url, supervisors, records):
    # The job needs ~5 s more after SIGTERM; dead_after is 3 s. A supervisor
    # that stopped heartbeating while it drained would have its job fenced
    # by its own child and reaped by green, and the job would run twice.
    settings = dict(server={"heartbeat_interval": "500ms", "dead_after": "3s"},
                    shutdown={"drain": "20s", "kill_after": "1s"})
    blue = supervisors(db_url, "blue", **settings)
    blue_server = blue.wait_registered(any_queue)
    job = any_queue.enqueue("scjobs:finish_after", [str(records), 5.5])
    wait_for(lambda: runs(records, job.id), what="the job to start on blue")
    green = supervisors(db_url, "green", **settings)
    green.wait_registered(any_queue)

    blue.send(signal.SIGTERM)
    assert blue.wait(timeout=30) == 0
    done = any_queue.get(job.id)
    assert done.state == "succeeded"
    assert len(runs(records, job.id)) == 1 and len(completions(records, job.id)) == 1
    kinds = [e.kind for e in done.events]
    assert "handed_off" not in kinds and "reaped" not in kinds, kinds
    assert [e.server for e in done.events if e.kind == "succeeded"] == [blue_server.id]
    assert done.interruptions == 0
    assert {s.id: s.state for s in any_queue.servers()}[blue_server.id] == "stopped"
    assert blue.survivors() == []


def test_a_drain_hands_off_only_what_still_runs_at_its_end(queue, e2e_db_url, supervisors, records):
    blue = supervisors(e2e_db_url, "blue", server={"heartbeat_interval": "500ms", "dead_after": "3s"},
                       shutdown={"drain": "4s", "kill_after": "0s"})
    blue.wait_registered(queue)
    short = queue.enqueue("scjobs:finish_after", [str(records), 1.0])
    long = queue.enqueue("scjobs:spin", [str(records)])
    wait_for(lambda: runs(records, short.id) and runs(records, long.id), what="both jobs to start")
    blue.send(signal.SIGTERM)
    assert blue.wait(timeout=20) == 0
    assert queue.get(short.id).state == "succeeded" and len(completions(records, short.id)) == 1
    handed = queue.get(long.id)
    assert (handed.state, handed.interruptions) == ("enqueued", 1)
    assert "handed_off" in [e.kind for e in handed.events]


def test_a_restart_while_the_predecessor_is_a_zombie_reaps_it_at_once(any_queue, db_url, supervisors, records):
    # dead_after is a minute, and the killed supervisor is left a zombie (its
    # parent, this test, does not collect it): only knowing that a zombie is
    # dead explains a prompt requeue.
    slow_reaping = {"server": {"heartbeat_interval": "1s", "dead_after": "60s"}}
    first = supervisors(db_url, "worker", **slow_reaping)
    old_server = first.wait_registered(any_queue)
    job = any_queue.enqueue("scjobs:spin", [str(records), 60.0, 0.3])
    wait_for(lambda: runs(records, job.id), what="the job to start")
    first.send(signal.SIGKILL)
    wait_for(lambda: psutil.Process(first.pid).status() == psutil.STATUS_ZOMBIE, what="a zombie")
    wait_for(lambda: not first.survivors(), timeout=5, what="its children to die with it")

    second = supervisors(db_url, "worker", **slow_reaping)
    second.wait_registered(any_queue)
    wait_for(lambda: any_queue.get(job.id).state == "succeeded", timeout=30, what="the job to rerun on the restart")
    reaped = [e for e in any_queue.get(job.id).events if e.kind == "reaped"]
    assert len(reaped) == 1 and "previous incarnation" in reaped[0].detail
    assert {s.id: s.state for s in any_queue.servers()}[old_server.id] == "dead"
    assert read_lines(records / "overlaps") == []


def test_handoff_of_a_server_name_nobody_has_fails_and_lists_the_names(queue, e2e_db_url, supervisors):
    sup = supervisors(e2e_db_url, "web-1")
    sup.wait_registered(queue)
    typo = cli(sup, "handoff", "--server", "web-l")
    assert typo.returncode == 1
    assert "web-l" in typo.stderr and "web-1" in typo.stderr, typo.stderr
    assert len(typo.stderr.strip().splitlines()) == 1
    assert sup.proc.poll() is None  # nothing was stopped
    assert [s.state for s in queue.servers()] == ["running"]


def test_handoff_of_a_known_server_that_already_stopped_succeeds(queue, e2e_db_url, supervisors):
    sup = supervisors(e2e_db_url, "web-1")
    sup.wait_registered(queue)
    sup.send(signal.SIGTERM)
    assert sup.wait() == 0
    again = cli(sup, "handoff", "--server", "web-1")
    assert again.returncode == 0 and "nothing to hand off" in again.stdout


def test_requeue_of_a_succeeded_job_needs_force(queue, e2e_db_url, supervisors, records):
    sup = supervisors(e2e_db_url, "web-1")
    sup.wait_registered(queue)
    job = queue.enqueue("scjobs:quick", [str(records)])
    wait_for(lambda: queue.get(job.id).state == "succeeded", what="the job to succeed")
    refused = cli(sup, "requeue", str(job.id))
    assert refused.returncode == 1 and "--force" in refused.stderr
    assert queue.get(job.id).state == "succeeded"
    assert len(read_lines(records / "quick")) == 1
    forced = cli(sup, "requeue", "--force", str(job.id))
    assert forced.returncode == 0, forced.stderr
    wait_for(lambda: len(read_lines(records / "quick")) == 2, what="the forced rerun")


def test_ps_tells_the_supervisor_its_children_and_jobs_apart(queue, e2e_db_url, supervisors, records):
    sup = supervisors(e2e_db_url, "P4")
    sup.wait_registered(queue)
    job = queue.enqueue("scjobs:spin", [str(records)])
    wait_for(lambda: runs(records, job.id), what="the job to start")
    (job_pid,) = [int(p) for p in runs(records, job.id)]
    titles = {
        "supervisor": " ".join(psutil.Process(sup.pid).cmdline()).strip(),
        "child": " ".join(psutil.Process(job_pid).parent().cmdline()).strip(),
        "job": " ".join(psutil.Process(job_pid).cmdline()).strip(),
    }
    assert titles == {
        "supervisor": "shiftchange: supervisor P4",
        "child": f"shiftchange: child of job {job.id}",
        "job": f"shiftchange: job {job.id} scjobs:spin",
    }


def server_row(queue, server_id):
    return next(s for s in queue.servers() if s.id == server_id)


def test_a_quiet_server_claims_nothing_but_finishes_its_jobs_and_heartbeats(any_queue, db_url, supervisors, records):
    sup = supervisors(db_url, "web-1", server={"heartbeat_interval": "300ms", "dead_after": "3s"})
    server = sup.wait_registered(any_queue)
    running = any_queue.enqueue("scjobs:finish_after", [str(records), 1.5])
    wait_for(lambda: runs(records, running.id), what="the job to start")

    sup.send(signal.SIGTSTP)  # Sidekiq's quiet signal; the process must not stop
    wait_for(lambda: server_row(any_queue, server.id).quiet, what="the quiet flag in storage")
    status = json.loads(cli(sup, "status", "--json").stdout)
    assert [s["state"] for s in status["servers"] if s["id"] == server.id] == ["quiet"]
    waiting = any_queue.enqueue("scjobs:quick", [str(records)])

    wait_for(lambda: any_queue.get(running.id).state == "succeeded", what="the running job to finish here")
    finished = any_queue.get(running.id)
    assert [e.kind for e in finished.events].count("claimed") == 1 and finished.interruptions == 0
    beat = server_row(any_queue, server.id).heartbeat_at
    wait_for(lambda: server_row(any_queue, server.id).heartbeat_at > beat + 0.5, what="two more heartbeats")
    assert any_queue.get(waiting.id).state == "enqueued", "a quiet server claimed a job"
    assert sup.proc.poll() is None and server_row(any_queue, server.id).state == "running"

    undo = cli(sup, "quiet", "--undo", "--server", "web-1")
    assert undo.returncode == 0 and "claiming again" in undo.stdout, undo.stderr
    wait_for(lambda: read_lines(records / "quick"), what="the waiting job to run once unquieted")
    assert "is quiet" in sup.log() and "no longer quiet" in sup.log()


def test_shiftchange_quiet_from_outside_and_its_typo_check(queue, e2e_db_url, supervisors, records):
    sup = supervisors(e2e_db_url, "web-1")
    server = sup.wait_registered(queue)
    done = cli(sup, "quiet", "--server", "web-1", "--json")
    assert done.returncode == 0 and json.loads(done.stdout) == [{"id": server.id, "name": "web-1", "quiet": True}]
    job = queue.enqueue("scjobs:quick", [str(records)])
    wait_for(lambda: "is quiet" in sup.log(), what="the supervisor to notice at its heartbeat")
    assert queue.get(job.id).state == "enqueued"
    typo = cli(sup, "quiet", "--server", "web-l")
    assert typo.returncode == 1 and "web-1" in typo.stderr
