"""A reused job process claims its next job in the transaction that
records its outcome (storage.ClaimNext; issue 11): with exactly the checks
of the supervisor's own claim, only callable jobs, never with a give back,
and what a write given up on may have claimed is given back. Storage on
SQLite, PostgreSQL and MariaDB; then real supervisors, judged from the
jobs' side (which process ran each job, how often)."""

import signal
import threading
from pathlib import Path

import pytest
from sqlalchemy import select, text

from conftest import database_url
from harness import events_of, read_lines, wait_for
from supervisor import Queue
from supervisor.database import Bounds, make_engine
from supervisor.storage import ClaimNext, Storage
from supervisor.tables import jobs, servers
from test_storage import claim_one, register


@pytest.fixture
def q(db_url):
    with Queue(db_url) as opened:
        yield opened


def chain(server_id, job, **extra):
    return ClaimNext(server_id, ("default",), callables_only=True, after=(job.id, job.lease), **extra)


def claimed_detail(queue, job_id) -> str:
    return [e.detail for e in queue.get(job_id).events if e.kind == "claimed"][-1]


# --- storage -------------------------------------------------------------------------


def test_complete_claims_the_next_callable_in_the_same_write(q):
    server = register(q)
    first = q.enqueue("app:a")
    command = q.enqueue_command(["true"], priority=5)  # first in line, but a command needs a fresh child
    second = q.enqueue("app:b")
    running = claim_one(q, server)
    assert running.id == command.id  # the supervisor's claim takes commands too
    running = q.storage.claim(server, ["default"], 1)[0]
    assert running.id == first.id
    wanted = chain(server, running)
    assert q.storage.complete(running.id, running.lease, server, None, wanted)
    (taken,) = wanted.claimed
    assert (taken.id, taken.state, taken.server, taken.attempts) == (second.id, "processing", server, 1)
    assert claimed_detail(q, second.id) == f"attempt 1, lease {taken.lease}, with the outcome of job {first.id} (lease {running.lease})"
    assert q.get(first.id).state == "succeeded"


def test_a_failure_claims_too_and_a_stale_write_claims_nothing(q):
    server = register(q)
    jobs = [q.enqueue("app:a", max_attempts=1) for _ in range(3)]
    running = claim_one(q, server)
    wanted = chain(server, running)
    assert q.storage.fail(running.id, running.lease, server, "boom", retry_backoff=1, then_claim=wanted) == "failed"
    assert [j.id for j in wanted.claimed] == [jobs[1].id]
    q.requeue(jobs[1].id)  # an operator takes it: that run's lease is gone
    late = chain(server, wanted.claimed[0])
    assert not q.storage.complete(jobs[1].id, wanted.claimed[0].lease, server, None, late)
    assert late.claimed is None and q.get(jobs[2].id).state == "enqueued"


@pytest.mark.parametrize("why", ["paused", "quiet", "stopping"])
def test_the_claim_with_an_outcome_has_the_supervisor_s_checks(q, why):
    server = register(q)
    running = (q.enqueue("app:a"), claim_one(q, server))[1]
    waiting = q.enqueue("app:b")
    if why == "paused":
        q.pause("default")
    elif why == "quiet":
        q.storage.set_quiet([server])
    else:
        q.storage.handoff([server], 0.0, "a deploy")
        running = q.get(running.id)  # taken back: the run's write is stale now
    wanted = chain(server, running)
    q.storage.complete(running.id, running.lease, server, None, wanted)
    assert not wanted.claimed and q.get(waiting.id).state == "enqueued"


def test_what_a_write_given_up_on_claimed_is_found_and_given_back(q):
    server = register(q)
    first, second = q.enqueue("app:a"), q.enqueue("app:b")
    running = claim_one(q, server)
    probe = chain(server, running)
    assert q.storage.settled_claim(probe) is None  # not committed: write again
    late = chain(server, running)
    assert q.storage.complete(running.id, running.lease, server, None, late)  # the write that landed unseen
    assert q.storage.settled_claim(probe) == "succeeded"
    assert [j.id for j in probe.claimed] == [second.id]
    (given, state), = q.storage.give_back_claims_of(running.id, running.lease, server)
    back = q.get(second.id)
    assert (given.id, state, back.state, back.attempts, back.interruptions) == (second.id, "enqueued", "enqueued", 0, 1)
    assert q.storage.give_back_claims_of(running.id, running.lease, server) == []  # once only
    assert q.get(first.id).state == "succeeded"


# --- real supervisors ----------------------------------------------------------------

ONE_SLOT = {"server": {"concurrency": 1}, "jobs": {"allow": ["reusejobs:*"], "allow_commands": ["true"]}}


def start(supervisors, url, q, **settings):
    sup = supervisors(url, "s1", **{**ONE_SLOT, **settings})
    sup.wait_registered(q)
    return sup


def runs(records, job_id) -> list[str]:
    return read_lines(Path(records) / f"{job_id}.runs")


def test_a_slot_runs_the_jobs_it_claims_in_its_own_process(q, db_url, supervisors):
    ids = [q.enqueue("reusejobs:whoami").id for _ in range(4)]
    # A slot's claim skips its server's row while a heartbeat of that
    # server holds it (storage._claim_in: waiting could deadlock with a
    # handoff), and the supervisor claims for the idle slot instead. With
    # the harness's 200 ms beats that happened to about one run in twenty;
    # with beats 30 s apart none falls inside these few jobs.
    start(supervisors, db_url, q, server={"concurrency": 1, "heartbeat_interval": "30s", "dead_after": "90s"})
    ran = [q.result(job_id, timeout=60) for job_id in ids]
    assert len({pid for pid, _ in ran}) == 1 and [count for _, count in ran] == [1, 2, 3, 4]
    for before, after in zip(ids, ids[1:]):
        assert claimed_detail(q, after).endswith(f"with the outcome of job {before} (lease 1)")


def test_a_slot_leaves_paused_queues_commands_and_refused_targets_to_the_supervisor(
        queue, e2e_db_url, supervisors, records):
    start(supervisors, e2e_db_url, queue, jobs={"allow": ["reusejobs:run_when_told", "reusejobs:count_run"],
                                                "allow_commands": ["true"]})
    first = queue.enqueue("reusejobs:run_when_told", [str(records)]).id
    wait_for(lambda: runs(records, first), what="the first job to start")
    refused = queue.enqueue("reusejobs:whoami").id  # not on this server's allow-list
    command = queue.enqueue_command(["true"]).id
    last = queue.enqueue("reusejobs:count_run", [str(records)]).id
    Path(records, "go").write_text("")
    slot_pid = queue.result(first, timeout=60)
    assert "reusejobs:whoami" in queue.get(refused).error and queue.get(refused).state == "failed"
    assert queue.result(command, timeout=60) is not None  # a fresh child ran it
    assert "with the outcome" not in claimed_detail(queue, command)
    wait_for(lambda: queue.get(last).state == "succeeded", what="the last job")
    assert [int(pid) for pid in runs(records, last)] == [slot_pid]  # the slot lived on after the refusal


def test_no_chained_claim_from_a_paused_queue(queue, e2e_db_url, supervisors, records):
    start(supervisors, e2e_db_url, queue)
    first = queue.enqueue("reusejobs:run_when_told", [str(records)]).id
    wait_for(lambda: runs(records, first), what="the first job to start")
    waiting = queue.enqueue("reusejobs:count_run", [str(records)]).id
    queue.pause("default")
    Path(records, "go").write_text("")
    queue.result(first, timeout=60)
    # The claim would have been in the write that recorded the outcome.
    assert queue.get(waiting).state == "enqueued" and events_of(queue, waiting) == ["enqueued"]
    queue.resume("default")
    wait_for(lambda: queue.get(waiting).state == "succeeded", what="the job, once its queue is resumed")
    assert len(runs(records, waiting)) == 1


def test_a_draining_slot_claims_nothing_more(queue, e2e_db_url, supervisors, records):
    sup = start(supervisors, e2e_db_url, queue, shutdown={"drain": "60s"}, log={"format": "json"})
    first = queue.enqueue("reusejobs:run_when_told", [str(records)]).id
    wait_for(lambda: runs(records, first), what="the first job to start")
    waiting = queue.enqueue("reusejobs:count_run", [str(records)]).id
    wait_for(lambda: queue.get(waiting).state == "enqueued")
    sup.send(signal.SIGTERM)
    wait_for(lambda: any(e.get("event") == "draining" for e in sup.events()), what="the drain to begin")
    Path(records, "go").write_text("")
    assert sup.wait() == 0
    assert queue.get(first).state == "succeeded"
    assert queue.get(waiting).state == "enqueued" and runs(records, waiting) == []


def test_no_job_is_lost_or_run_twice_when_the_slot_gives_up_on_its_write(server_queue, server_db_url, supervisors, records):
    """The first job's row is locked while its slot records the outcome: the
    slot gives up (RECORD_TIMEOUT_S), the supervisor records it; the job the
    slot's write would have claimed runs once, wherever it is claimed. (Not
    on SQLite: a lock that stops the slot's write stops the heartbeat too.)"""
    q, db_url = server_queue, server_db_url
    sup = start(supervisors, db_url, q, log={"format": "json"})
    first = q.enqueue("reusejobs:run_when_told", [str(records)]).id
    wait_for(lambda: runs(records, first), what="the first job to start")
    second = q.enqueue("reusejobs:count_run", [str(records)]).id
    locker = make_engine(db_url, bounds=Bounds(connect=5, statement=60.0, keepalive_idle=10))
    with locker.connect() as conn:
        locked = conn.begin()
        conn.execute(text("SELECT id FROM shiftchange_jobs WHERE id = :id FOR UPDATE"), {"id": first})
        Path(records, "go").write_text("")
        wait_for(lambda: any(e.get("event") == "db_unreachable" and e.get("job") == first for e in sup.events()),
                 timeout=30, what="the slot to give up and the supervisor to try")
        locked.rollback()
    locker.dispose()
    wait_for(lambda: q.get(second).state == "succeeded", timeout=30, what="the second job")
    assert q.get(first).state == "succeeded" and events_of(q, first).count("succeeded") == 1
    assert len(runs(records, first)) == 1 and len(runs(records, second)) == 1


@pytest.fixture(params=["postgresql", "mariadb", "mariadb, batched"])
def handing_off_queue(request, tmp_path):
    """A Queue on PostgreSQL and MariaDB, and on MariaDB once more with the
    supervisor's own engine, whose handoff is one batch of statements
    (Storage._batched_handoff)."""
    kind, _, batched = request.param.partition(", ")
    url = database_url(kind, tmp_path)
    with Queue(url) as q:
        if batched:
            q.storage = Storage(make_engine(url, batches=True))
        yield q
        q.storage.engine.dispose()


def _waiting_on_a_lock(queue, *mariadb_statements: str) -> bool:
    """Is a handoff's statement waiting for a row lock? (MariaDB's lock
    tables lag behind: there, is a statement that can only be in progress
    while it waits, one of `mariadb_statements` (LIKE patterns), running?)"""
    if queue.engine.dialect.name == "postgresql":
        sql = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
    else:
        running = " OR ".join(f"info LIKE '{statement}'" for statement in mariadb_statements)
        sql = f"SELECT count(*) FROM information_schema.PROCESSLIST WHERE ID <> CONNECTION_ID() AND ({running})"
    with queue.engine.connect() as conn:
        return conn.execute(text(sql)).scalar_one() > 0


def _handoff_in_a_thread(q, sid) -> tuple[threading.Thread, dict]:
    outcome = {}

    def hand_off():
        try:
            outcome["held"] = q.storage.handoff(sid, 0.0, "deploy")
        except Exception as exc:  # the test says what it was
            outcome["error"] = exc

    thread = threading.Thread(target=hand_off)
    thread.start()
    return thread, outcome


def test_a_slots_claim_never_waits_for_a_handoff_that_waits_for_the_slot(handing_off_queue):
    """A slot's outcome write locks its job's row, then its claim reads the
    server row under a share lock; a handoff locks the server row and the
    jobs' rows (MariaDB: in that order). Were the claim to wait for the
    server row, the two would deadlock and the handoff fail (seen in CI on
    MariaDB: error 1213, the handoff not committed). The claim skips a
    locked server row instead: it claims nothing, commits, and the handoff
    goes on without the finished job."""
    q = handing_off_queue
    sid = register(q)
    q.enqueue("app:f")
    finished = claim_one(q, sid)
    q.enqueue("app:f")  # what the slot would claim next
    slot = q.engine.connect()
    slot_tx = slot.begin()
    # The slot's outcome write, paused before its claim.
    slot.execute(jobs.update().where(jobs.c.id == finished.id).values(state="succeeded"))
    handoff, outcome = _handoff_in_a_thread(q, sid)
    try:
        assert wait_for(lambda: _waiting_on_a_lock(q, "SELECT shiftchange_jobs.id%FOR UPDATE"), 10), \
            "the handoff never waited for the slot's row"
        claimed = q.storage._claim_in(slot, ClaimNext(sid, ("default",), None, 1))
        slot_tx.commit()
    finally:
        slot.close()
        handoff.join(10)
    assert "error" not in outcome, outcome.get("error")
    assert finished.id not in [job.id for job in outcome["held"]]
    assert q.get(finished.id).state == "succeeded"
    if claimed:  # PostgreSQL: its handoff locks the server row last; step 6 takes it back
        q.storage.release_handoff(sid, outcome["held"])
        assert q.get(claimed[0].id).state == "enqueued"


def test_a_claim_committed_while_the_handoff_waits_for_it_is_handed_off_too(handing_off_queue):
    """A slot's claim checks its server row under a share lock; a handoff
    that must wait for that lock may have taken its snapshot before the
    claim commits (PostgreSQL runs the handoff as one statement). The job
    claimed then must not stay `processing` under a stopped server until a
    reaper finds it: release_handoff, once every run is dead, takes it back."""
    q = handing_off_queue
    sid = register(q)
    q.enqueue("app:f")
    running = claim_one(q, sid)
    late = q.enqueue("app:f").id
    slot = q.engine.connect()
    slot_tx = slot.begin()
    # The slot's outcome-and-claim transaction, paused after its server check.
    slot.execute(select(servers.c.id).where(servers.c.id == sid).with_for_update(read=True))
    handoff, handed = _handoff_in_a_thread(q, sid)
    try:
        assert wait_for(lambda: _waiting_on_a_lock(q, "UPDATE shiftchange_servers SET state=%stopping%",
                                                     "SELECT shiftchange_jobs.id%LEFT OUTER JOIN%FOR UPDATE"), 10), \
            "the handoff never waited for the slot's lock"
        slot.execute(jobs.update().where(jobs.c.id == late)
                     .values(state="processing", server_id=sid, lease=jobs.c.lease + 1))
        slot_tx.commit()
    finally:
        slot.close()
        handoff.join(10)
    assert "error" not in handed, handed.get("error")
    assert running.id in [job.id for job in handed["held"]]
    q.storage.release_handoff(sid, handed["held"])
    after = q.get(late)
    assert (after.state, after.server) == ("enqueued", None)
    assert after.events[-1].kind == "handed_off"
    assert q.storage.servers()[0].state == "stopped"

