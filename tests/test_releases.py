"""Releases: a job taken back from a server of release R is left to a live
server of another release for a bounded window, so a rolling deploy moves
each job once; without releases nothing changes. Storage rules on SQLite,
PostgreSQL and MariaDB; the whole deploy with real supervisors in
test_rolling_deploy.py."""

import pytest
from sqlalchemy import event, select, update

from supervisor import Queue
from supervisor.storage import Storage
from supervisor.tables import jobs, servers


@pytest.fixture
def queue(db_url):
    with Queue(db_url) as q:
        yield q


def register(queue, name, release=None, queues=("default",), dead_after=10.0):
    return queue.storage.register_server(
        name=name, host="test-host", pid=1, pid_started_at=None,
        queues=queues, concurrency=4, dead_after=dead_after, release=release,
    )


def claim(queue, server_id, release, limit=5, queues=("default",)):
    return [job.id for job in queue.storage.claim(server_id, list(queues), limit, release=release)]


def avoid(queue, job_id):
    with queue.engine.connect() as conn:
        row = conn.execute(select(jobs.c.avoid_release, jobs.c.avoid_until).where(jobs.c.id == job_id)).first()
    return row.avoid_release, row.avoid_until


def handed_off_by(queue, name, release, hold=0.0):
    """A job run by a new server `name` of `release`, handed off by it."""
    sid = register(queue, name, release)
    job = queue.enqueue("app:f")
    assert claim(queue, sid, release, limit=1) == [job.id]
    queue.storage.handoff(sid, hold, f"{name} received SIGTERM")
    return job.id


# --- what a take-back records ----------------------------------------------------


def test_a_handoff_records_the_release_and_a_window_after_the_hold(queue):
    job_id = handed_off_by(queue, "old-1", "r1", hold=5.0)
    release, until = avoid(queue, job_id)
    now, run_at = queue.storage.now(), queue.get(job_id).run_at
    assert release == "r1"
    # The window (60 s by default) counts from the end of the hold.
    assert run_at + 59 < until <= run_at + 61 and until > now + 60


@pytest.mark.parametrize("how", ["reap", "reap_server", "give_back"])
def test_reaps_and_a_jobs_own_handoff_record_the_release_too(queue, how):
    sid = register(queue, "old-1", "r1", dead_after=5)
    job = queue.enqueue("app:f")
    (claimed,) = queue.storage.claim(sid, ["default"], 1, release="r1")
    if how == "reap":
        with queue.engine.begin() as conn:
            conn.execute(update(servers).values(heartbeat_at=servers.c.heartbeat_at - 60))
        assert [t.id for t in queue.storage.reap()] == [job.id]
    elif how == "reap_server":
        queue.storage.reap_server(sid, "pid gone")
    else:
        assert queue.storage.give_back(job.id, claimed.lease, sid, "HandOff") == "enqueued"
    assert avoid(queue, job.id)[0] == "r1"


def test_a_server_without_release_records_nothing(queue):
    job_id = handed_off_by(queue, "plain", None)
    assert avoid(queue, job_id) == (None, None)


def test_a_later_take_back_replaces_the_preference(queue):
    job_id = handed_off_by(queue, "old-1", "r1")
    sid = register(queue, "plain", None)
    assert claim(queue, sid, None) == [job_id]
    queue.storage.handoff(sid, 0, "stop")
    assert avoid(queue, job_id) == (None, None)


# --- the claim rule -----------------------------------------------------------------


def test_the_same_release_leaves_the_job_to_a_live_server_of_another(queue):
    job_id = handed_off_by(queue, "old-1", "r1")
    old_2 = register(queue, "old-2", "r1")
    new_1 = register(queue, "new-1", "r2")
    assert claim(queue, old_2, "r1") == []
    other = queue.enqueue("app:f").id  # never handed off: anyone takes it
    assert claim(queue, old_2, "r1") == [other]
    assert claim(queue, new_1, "r2") == [job_id]


def test_with_no_other_release_up_the_same_release_takes_it_at_once(queue):
    job_id = handed_off_by(queue, "old-1", "r1")
    old_2 = register(queue, "old-2", "r1")
    assert claim(queue, old_2, "r1") == [job_id]


@pytest.mark.parametrize("other", ["quiet", "stale heartbeat", "stopping", "other queue", "no release"])
def test_a_server_that_will_not_take_the_job_does_not_count(queue, other):
    job_id = handed_off_by(queue, "old-1", "r1")
    old_2 = register(queue, "old-2", "r1")
    new = register(queue, "new-1", None if other == "no release" else "r2",
                   queues=("reports",) if other == "other queue" else ("default",), dead_after=5)
    with queue.engine.begin() as conn:
        change = {"quiet": dict(quiet=True), "stale heartbeat": dict(heartbeat_at=servers.c.heartbeat_at - 6),
                  "stopping": dict(state="stopping")}.get(other)
        if change:
            conn.execute(update(servers).where(servers.c.id == new).values(**change))
    assert claim(queue, old_2, "r1") == [job_id]


def test_after_the_window_any_server_takes_it(queue):
    job_id = handed_off_by(queue, "old-1", "r1")
    old_2 = register(queue, "old-2", "r1")
    register(queue, "new-1", "r2")  # up, but (say) too busy to claim
    assert claim(queue, old_2, "r1") == []
    with queue.engine.begin() as conn:  # the window ends
        conn.execute(update(jobs).values(avoid_until=jobs.c.avoid_until - 3600))
    assert claim(queue, old_2, "r1") == [job_id]


def test_a_zero_window_switches_the_preference_off(db_url):
    with Queue(db_url) as queue:
        queue.storage = Storage(queue.engine, release_window=0.0)
        job_id = handed_off_by(queue, "old-1", "r1")
        old_2 = register(queue, "old-2", "r1")
        register(queue, "new-1", "r2")
        assert avoid(queue, job_id) == (None, None)  # switched off: no preference recorded
        assert claim(queue, old_2, "r1") == [job_id]


def test_only_the_queues_another_release_serves_wait(queue):
    sid = register(queue, "old-1", "r1", queues=("default", "reports"))
    a = queue.enqueue("app:f").id
    b = queue.enqueue("app:f", queue="reports").id
    assert sorted(claim(queue, sid, "r1", queues=("default", "reports"))) == [a, b]
    queue.storage.handoff(sid, 0, "stop")
    old_2 = register(queue, "old-2", "r1", queues=("default", "reports"))
    register(queue, "new-1", "r2", queues=("default",))
    assert claim(queue, old_2, "r1", queues=("default", "reports")) == [b]


def test_other_releases_and_servers_without_release_take_it_at_once(queue):
    job_id = handed_off_by(queue, "old-1", "r1")
    register(queue, "new-1", "r2")
    plain = register(queue, "plain", None)
    assert claim(queue, plain, None) == [job_id]


def test_the_sqlite_idle_probe_agrees_with_the_claim(queue):
    handed_off_by(queue, "old-1", "r1")
    register(queue, "new-1", "r2")
    assert queue.storage._anything_due(["default"], "r1") is False
    assert queue.storage._anything_due(["default"], "r2") is True
    assert queue.storage._anything_due(["default"]) is True


# --- without releases, the claim is what it was ----------------------------------------


def test_without_a_release_the_claim_sends_exactly_the_old_statements(queue):
    """No condition on avoid_* or releases and no look at other servers in
    any statement of a claim by a server without release, also when jobs
    carry a preference (the claimed rows are read whole, new columns too)."""
    handed_off_by(queue, "old-1", "r1")
    register(queue, "new-1", "r2")
    plain = register(queue, "plain", None)
    statements = []

    def seen(conn, cursor, statement, *args):
        statements.append(statement)

    event.listen(queue.engine, "before_cursor_execute", seen)
    try:
        assert len(claim(queue, plain, None)) == 1
        queue.storage._anything_due(["default"])
    finally:
        event.remove(queue.engine, "before_cursor_execute", seen)
    # (a claim's UPDATE ... RETURNING names every column after its WHERE)
    conditions = [s.split("WHERE", 1)[1].split(" RETURNING ")[0] for s in statements if "WHERE" in s]
    assert conditions and not [c for c in conditions if "avoid_" in c or "release" in c]
    assert not [s for s in statements if "shiftchange_servers.queues" in s]


def test_servers_record_and_show_their_release(queue):
    register(queue, "new-1", "2024.06.01-abc123")
    register(queue, "plain", None)
    shown = {s.name: (s.release, s.to_dict()["release"]) for s in queue.servers()}
    assert shown == {"new-1": ("2024.06.01-abc123",) * 2, "plain": (None, None)}
