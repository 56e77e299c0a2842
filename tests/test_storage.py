"""Every job and server transition, on SQLite, PostgreSQL and MariaDB."""

import json
import multiprocessing
import time

import pytest
from sqlalchemy import select, update

from supervisor import Queue
from supervisor.errors import InvalidJob, JobNotFound, StorageUnavailable
from supervisor.jobspec import new_job
from supervisor.tables import events, jobs, servers


@pytest.fixture
def queue(db_url):
    with Queue(db_url) as q:
        yield q


def register(queue, name="s1", dead_after=10.0, queues=("default",)):
    return queue.storage.register_server(
        name=name, host="test-host", pid=1, pid_started_at=None,
        queues=queues, concurrency=4, dead_after=dead_after,
    )


def age_heartbeat(queue, server_id, seconds):
    """Make a server look as if it stopped heartbeating `seconds` ago."""
    with queue.engine.begin() as conn:
        conn.execute(update(servers).where(servers.c.id == server_id)
                     .values(heartbeat_at=servers.c.heartbeat_at - seconds))


def kinds(queue, job_id):
    return [e.kind for e in queue.get(job_id).events]


def claim_one(queue, server_id):
    (job,) = queue.storage.claim(server_id, ["default"], 1)
    return job


# --- enqueue -------------------------------------------------------------------


def test_enqueue_returns_an_id_and_records_an_event(queue):
    job = queue.enqueue("app.tasks:work", [1, "two"], {"three": 3}, priority=5)
    assert isinstance(job.id, int)
    got = queue.get(job.id)
    assert (got.state, got.args, got.kwargs, got.priority, got.attempts) == ("enqueued", [1, "two"], {"three": 3}, 5, 0)
    assert got.server is None and got.interruptions == 0
    assert kinds(queue, job.id) == ["enqueued"]


def test_a_command_job_keeps_its_argv(queue):
    job = queue.enqueue_command(["/bin/echo", "hi", "there"])
    got = queue.get(job.id)
    assert (got.kind, got.target, got.args, got.argv) == ("command", "/bin/echo", ["hi", "there"], ["/bin/echo", "hi", "there"])


def test_a_delayed_job_is_scheduled_until_due(queue):
    sid = register(queue)
    later = queue.enqueue("app.tasks:work", delay=3600)
    assert queue.get(later.id).state == "scheduled"
    assert queue.storage.claim(sid, ["default"], 5) == []
    with queue.engine.begin() as conn:  # its time comes
        conn.execute(update(jobs).values(run_at=jobs.c.run_at - 7200))
    assert queue.storage.promote_due() == 1
    assert queue.get(later.id).state == "enqueued"
    assert claim_one(queue, sid).id == later.id


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda q: q.enqueue("app:f", [object()]), "JSON-serialisable"),
        (lambda q: q.enqueue("app:f", [float("nan")]), "JSON-serialisable"),
        (lambda q: q.enqueue("app:f", kwargs={"when": time}), "JSON-serialisable"),
        (lambda q: q.enqueue("", []), "empty"),
        (lambda q: q.enqueue("app.f", []), "package.module:function"),
        (lambda q: q.enqueue("app:_private", []), "package.module:function"),
        (lambda q: q.enqueue("app:f", queue=""), "queue name"),
        (lambda q: q.enqueue("app:f", queue="bad queue; drop table"), "queue name"),
        (lambda q: q.enqueue("app:f", ["x" * (1 << 20)]), "limit"),
        (lambda q: q.enqueue_command([]), "non-empty argv"),
        (lambda q: q.enqueue("app:f", args="not a list"), "args must be a list"),
    ],
)
def test_bad_jobs_are_refused_at_enqueue_with_a_clear_error(queue, call, message):
    with pytest.raises(InvalidJob, match=message):
        call(queue)
    assert queue.jobs() == []  # nothing half-written


def test_unicode_and_sql_looking_values_round_trip(queue):
    args = ["'; DROP TABLE shiftchange_jobs; --", "zürich ☃ 東京", {"nested": [None, True]}]
    job = queue.enqueue("app.tasks:work", args, queue="reports:eu-1")
    assert queue.get(job.id).args == args
    assert queue.get(job.id).queue == "reports:eu-1"


# --- claim -----------------------------------------------------------------------------


def test_claim_takes_highest_priority_then_oldest(queue):
    sid = register(queue)
    low = queue.enqueue("app:f", priority=0)
    high_old = queue.enqueue("app:f", priority=9)
    high_new = queue.enqueue("app:f", priority=9)
    other_queue = queue.enqueue("app:f", queue="other", priority=99)
    claimed = queue.storage.claim(sid, ["default"], 10)
    assert [j.id for j in claimed] == [high_old.id, high_new.id, low.id]
    assert queue.get(other_queue.id).state == "enqueued"
    for job in claimed:
        assert (job.state, job.server, job.attempts, job.lease) == ("processing", sid, 1, 1)
        assert job.started_at is not None
        assert kinds(queue, job.id) == ["enqueued", "claimed"]


def test_a_server_that_is_not_running_claims_nothing(queue):
    sid = register(queue)
    queue.enqueue("app:f")
    queue.storage.handoff(sid, 0, "stopping")
    assert queue.storage.claim(sid, ["default"], 1) == []


# --- heartbeat ----------------------------------------------------------------------------


def test_heartbeat_reports_what_others_decided(queue):
    sid = register(queue)
    assert queue.storage.heartbeat(sid) == "running"
    queue.storage.reap_server(sid, "proven dead")
    assert queue.storage.heartbeat(sid) == "dead"
    other = register(queue, "s2")
    queue.storage.handoff(other, 0, "deploy")
    assert queue.storage.heartbeat(other) == "stopping"
    assert queue.storage.heartbeat("no-such-server") is None


def test_heartbeat_uses_the_database_clock(queue):
    sid = register(queue)
    age_heartbeat(queue, sid, 100)
    before = queue.storage.servers()[0].heartbeat_age
    queue.storage.heartbeat(sid)
    after = queue.storage.servers()[0].heartbeat_age
    assert before >= 100 > 5 > after


# --- results and fencing --------------------------------------------------------------------


def test_complete_marks_success_and_clears_the_checkpoint(queue):
    sid = register(queue)
    queue.enqueue("app:f")
    job = claim_one(queue, sid)
    assert queue.storage.checkpoint(job.id, job.lease, sid, json.dumps({"step": 3}))
    assert queue.get(job.id).checkpoint == {"step": 3}
    assert queue.storage.complete(job.id, job.lease, sid)
    done = queue.get(job.id)
    assert (done.state, done.checkpoint, done.error) == ("succeeded", None, None)
    assert done.finished_at is not None
    assert kinds(queue, job.id)[-1] == "succeeded"


def test_failure_retries_with_backoff_then_fails_with_the_error(queue):
    sid = register(queue)
    queue.enqueue("app:f", max_attempts=2)
    job = claim_one(queue, sid)
    assert queue.storage.fail(job.id, job.lease, sid, "Traceback...\nValueError: one", retry_backoff=60) == "scheduled"
    retry = queue.get(job.id)
    assert retry.state == "scheduled" and retry.server is None
    assert 55 < retry.run_at - queue.storage.now() <= 60
    with queue.engine.begin() as conn:
        conn.execute(update(jobs).values(run_at=jobs.c.run_at - 120))
    queue.storage.promote_due()
    job = claim_one(queue, sid)
    assert job.attempts == 2
    assert queue.storage.fail(job.id, job.lease, sid, "Traceback...\nValueError: two", retry_backoff=60) == "failed"
    failed = queue.get(job.id)
    assert failed.state == "failed" and failed.error.endswith("ValueError: two")
    assert kinds(queue, job.id) == ["enqueued", "claimed", "retry_scheduled", "claimed", "failed"]


def test_a_refused_job_fails_without_retry(queue):
    sid = register(queue)
    queue.enqueue("app:f", max_attempts=5)
    job = claim_one(queue, sid)
    assert queue.storage.fail(job.id, job.lease, sid, "not allowed", retry=False, retry_backoff=1) == "failed"


@pytest.mark.parametrize("how", ["handoff", "reap", "requeue"])
def test_a_run_that_lost_its_job_can_write_nothing(queue, how):
    sid = register(queue)
    queue.enqueue("app:f")
    old = claim_one(queue, sid)
    if how == "handoff":
        queue.storage.handoff(sid, 0, "deploy")
    elif how == "reap":
        age_heartbeat(queue, sid, 60)
        queue.storage.reap()
    else:
        queue.requeue(old.id)
        with queue.engine.begin() as conn:  # its hold (the server's dead_after) ends
            conn.execute(update(jobs).values(run_at=jobs.c.run_at - 100))
    new_server = register(queue, "s2")
    new = claim_one(queue, new_server)
    assert new.id == old.id and new.lease > old.lease
    queue.storage.checkpoint(new.id, new.lease, new_server, json.dumps("new run's progress"))

    assert not queue.storage.complete(old.id, old.lease, sid)
    assert queue.storage.fail(old.id, old.lease, sid, "late", retry_backoff=1) == "stale"
    assert not queue.storage.checkpoint(old.id, old.lease, sid, json.dumps("zombie progress"))
    assert queue.storage.give_back(old.id, old.lease, sid, "zombie") == "stale"

    now = queue.get(old.id)
    assert (now.state, now.server, now.lease, now.checkpoint) == ("processing", new_server, new.lease, "new run's progress")
    assert now.error is None
    assert kinds(queue, old.id).count("stale_write") == 4
    assert queue.storage.complete(new.id, new.lease, new_server)


# --- handoff, release, reap -----------------------------------------------------------------


def test_handoff_requeues_in_one_transaction_and_holds_the_jobs(queue):
    sid = register(queue)
    for _ in range(3):
        queue.enqueue("app:f")
    claimed = queue.storage.claim(sid, ["default"], 3)
    held = queue.storage.handoff(sid, 3600, "server s1 received SIGTERM")
    assert sorted(h.id for h in held) == sorted(j.id for j in claimed)
    assert queue.storage.servers()[0].state == "stopping"
    for job in claimed:
        now = queue.get(job.id)
        assert (now.state, now.server, now.interruptions, now.attempts) == ("enqueued", None, 1, 0)
        assert now.lease == job.lease + 1
        assert now.run_at > queue.storage.now() + 3000  # held
        assert now.events[-1].kind == "handed_off" and "SIGTERM" in now.events[-1].detail
    successor = register(queue, "s2")
    assert queue.storage.claim(successor, ["default"], 3) == []  # not while held
    queue.storage.release_handoff(sid, held)
    assert queue.storage.servers(states=["stopped"])[0].id == sid
    again = queue.storage.claim(successor, ["default"], 3)
    assert sorted(j.id for j in again) == sorted(j.id for j in claimed)
    assert all(j.attempts == 1 for j in again)  # the interruption used no attempt


def test_preparing_the_handoff_changes_nothing(queue):
    """The supervisor runs it at start to compile the handoff's statements."""
    sid = register(queue)
    queue.enqueue("app:f")
    job = claim_one(queue, sid)
    before = queue.get(job.id)
    queue.storage.prepare_handoff()
    after = queue.get(job.id)
    assert (after.state, after.server, after.lease, after.run_at) == (before.state, sid, before.lease, before.run_at)
    assert len(after.events) == len(before.events)
    assert queue.storage.servers()[0].state == "running"


def test_release_leaves_a_job_that_changed_meanwhile_alone(queue):
    sid = register(queue)
    queue.enqueue("app:f")
    job = claim_one(queue, sid)
    held = queue.storage.handoff(sid, 3600, "deploy")
    queue.requeue(job.id)  # an operator acted in between: new lease
    with queue.engine.begin() as conn:
        conn.execute(update(jobs).values(run_at=jobs.c.run_at + 500))
    queue.storage.release_handoff(sid, held)
    assert queue.get(job.id).run_at > queue.storage.now() + 400


def test_past_max_interruptions_a_job_fails_as_poison(queue):
    register(queue)
    queue.enqueue("app:f", max_interruptions=1, unique_key="only-one")
    for n in range(2):
        server = register(queue, f"s{n}")
        job = claim_one(queue, server)
        held = queue.storage.handoff(server, 0, "deploy")
        if n == 0:  # the first interruption is allowed: requeued
            requeued = queue.get(job.id)
            assert not held[0].failed
            assert (requeued.state, requeued.server, requeued.interruptions, requeued.attempts) == \
                ("enqueued", None, 1, 0)
    assert held[0].failed
    poisoned = queue.get(job.id)
    assert poisoned.state == "failed" and "max_interruptions" in poisoned.error
    assert (poisoned.interruptions, poisoned.attempts, poisoned.lease) == (2, 0, job.lease + 1)
    assert poisoned.finished_at is not None
    assert [e.kind for e in poisoned.events][-1] == "failed"
    assert poisoned.events[-1].detail == "deploy (past max_interruptions: failed)"
    assert queue.enqueue("app:f", unique_key="only-one") != job.id  # the key is free again


def test_reap_requeues_the_jobs_of_silent_servers_only(queue):
    quiet, alive = register(queue, "quiet", dead_after=10), register(queue, "alive", dead_after=10)
    queue.enqueue("app:f")
    queue.enqueue("app:f")
    lost = claim_one(queue, quiet)
    kept = claim_one(queue, alive)
    age_heartbeat(queue, quiet, 9)
    assert queue.storage.reap() == []  # 9 s is not dead_after yet
    age_heartbeat(queue, quiet, 2)
    taken = queue.storage.reap()
    assert [t.id for t in taken] == [lost.id]
    assert {s.name: s.state for s in queue.storage.servers()} == {"quiet": "dead", "alive": "running"}
    requeued = queue.get(lost.id)
    assert (requeued.state, requeued.interruptions, requeued.events[-1].kind) == ("enqueued", 1, "reaped")
    assert requeued.events[-1].detail == f"server {quiet} stopped heartbeating"
    assert queue.get(kept.id).state == "processing"
    assert queue.storage.reap() == []  # idempotent


def test_reap_recovers_a_processing_job_whose_server_row_is_gone(queue):
    sid = register(queue)
    queue.enqueue("app:f")
    job = claim_one(queue, sid)
    with queue.engine.begin() as conn:
        conn.execute(servers.delete())
    assert [t.id for t in queue.storage.reap()] == [job.id]


@pytest.mark.parametrize("skew", [-3600, 3600])
def test_a_wrong_host_clock_neither_reaps_early_nor_keeps_alive_late(queue, monkeypatch, skew):
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + skew)
    fresh, silent = register(queue, "fresh"), register(queue, "silent")
    queue.storage.heartbeat(fresh)
    age_heartbeat(queue, silent, 11)
    queue.storage.reap()
    assert {s.name: s.state for s in queue.storage.servers()} == {"fresh": "running", "silent": "dead"}


# --- operators ------------------------------------------------------------------------------


def test_requeue_delete_get_list_and_count(queue):
    sid = register(queue)
    a = queue.enqueue("app:f", max_attempts=1)
    b = queue.enqueue("app:g", queue="other")
    job = claim_one(queue, sid)
    queue.storage.fail(job.id, job.lease, sid, "boom", retry_backoff=1)
    assert queue.get(a.id).state == "failed"
    again = queue.requeue(a.id)
    assert (again.state, again.attempts, again.error) == ("enqueued", 0, "boom")
    assert again.events[-1].kind == "requeued"
    assert [j.id for j in queue.jobs(queue="other")] == [b.id]
    assert [j.id for j in queue.jobs(state="enqueued")] == [b.id, a.id]
    assert queue.counts()["enqueued"] == 2
    assert queue.queue_counts()["other"]["enqueued"] == 1
    queue.delete(b.id)
    with pytest.raises(JobNotFound):
        queue.get(b.id)
    with pytest.raises(JobNotFound):
        queue.delete(b.id)
    with queue.engine.connect() as conn:
        assert conn.execute(select(events).where(events.c.job_id == b.id)).all() == []


def test_servers_list_their_jobs_in_flight(queue):
    sid = register(queue)
    queue.enqueue("app:f")
    job = claim_one(queue, sid)
    (server,) = queue.servers()
    assert (server.name, server.state, server.jobs) == ("s1", "running", [job.id])
    data = server.to_dict()
    assert set(data) >= {"id", "name", "host", "pid", "state", "started_at", "heartbeat_at", "jobs"}
    assert data["heartbeat_at"].endswith("Z")


def test_sweep_deletes_old_finished_jobs_and_their_events(queue):
    sid = register(queue)
    old, recent, waiting = (queue.enqueue("app:f") for _ in range(3))
    for _ in range(2):
        job = claim_one(queue, sid)
        queue.storage.complete(job.id, job.lease, sid)
    with queue.engine.begin() as conn:
        conn.execute(update(jobs).where(jobs.c.id == old.id).values(finished_at=jobs.c.finished_at - 8 * 86400))
    assert queue.storage.sweep(7 * 86400, batch=1) == 1
    assert sorted(j.id for j in queue.jobs()) == [recent.id, waiting.id]
    with queue.engine.connect() as conn:
        assert conn.execute(select(events).where(events.c.job_id == old.id)).all() == []


# --- concurrency: several OS processes claiming at once ---------------------------------------


def _claimer(url, name, out):
    with Queue(url) as q:
        sid = register(q, name)
        taken, idle_since = [], time.monotonic()
        while time.monotonic() - idle_since < 1.0:
            got = q.storage.claim(sid, ["default"], 3)
            for job in got:
                taken.append(job.id)
                assert q.storage.complete(job.id, job.lease, sid)
            if got:
                idle_since = time.monotonic()
        out.put(taken)


def test_concurrent_claimers_never_share_a_job(db_url):
    with Queue(db_url) as q:
        q.storage.enqueue(*(new_job("app:f") for _ in range(300)))
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_claimer, args=(db_url, f"c{i}", out)) for i in range(4)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    claimed = [job_id for taken in results for job_id in taken]
    assert len(claimed) == 300 and len(set(claimed)) == 300
    assert sum(1 for taken in results if taken) >= 2  # they really competed
    with Queue(db_url) as q:
        assert q.counts()["succeeded"] == 300


# --- bad databases ------------------------------------------------------------------------------


def test_an_unreachable_database_is_one_clear_error_without_the_password():
    with pytest.raises(StorageUnavailable) as caught:
        Queue("postgresql://app:s3cret@127.0.0.1:1/nothing")
    message = str(caught.value)
    assert "cannot reach the database" in message and "127.0.0.1:1" in message
    assert "s3cret" not in message and "\n" not in message


def test_requeue_of_a_succeeded_job_is_refused_unless_forced(queue):
    from supervisor.errors import ActionRefused

    sid = register(queue)
    queue.enqueue("app:f")
    job = claim_one(queue, sid)
    assert queue.storage.complete(job.id, job.lease, sid)
    with pytest.raises(ActionRefused, match="--force"):
        queue.requeue(job.id)
    assert queue.get(job.id).state == "succeeded"  # nothing changed
    assert [e.kind for e in queue.get(job.id).events][-1] == "succeeded"
    again = queue.requeue(job.id, force=True)
    assert (again.state, again.attempts) == ("enqueued", 0)


def test_requeue_of_a_running_job_holds_it_until_its_run_is_surely_stopped(queue):
    sid = register(queue, dead_after=30)
    queue.enqueue("app:f")
    job = claim_one(queue, sid)
    queue.requeue(job.id)
    assert 25 < queue.get(job.id).run_at - queue.storage.now() <= 30
    assert queue.storage.lost_leases(sid, {job.id: job.lease}) == [job.id]


def test_lost_leases_names_only_the_jobs_taken_away(queue):
    sid = register(queue)
    kept, taken, deleted, done, retried = (queue.enqueue("app:f") for _ in range(5))
    claimed = {j.id: j.lease for j in queue.storage.claim(sid, ["default"], 5)}
    queue.requeue(taken.id)
    queue.delete(deleted.id)
    # Finished by their own runs (same lease): not lost, nothing to kill.
    assert queue.storage.complete(done.id, claimed[done.id], sid)
    assert queue.storage.fail(retried.id, claimed[retried.id], sid, "boom", retry_backoff=60) == "scheduled"
    assert sorted(queue.storage.lost_leases(sid, claimed)) == sorted([taken.id, deleted.id])
    assert queue.storage.lost_leases(sid, {}) == []
