"""Fleet scale (issue 19): chores done by one server per interval, and
PostgreSQL polling only as a safety net while LISTEN works.

Real supervisors; what happened is read from the database (chore counts,
event times) and from the jobs' own records."""

import signal
import threading

import pytest
from sqlalchemy import text

from harness import events_of, read_lines, runs, wait_for
from supervisor.config import Config, ServerConfig
from supervisor.database import make_engine
from supervisor.jobspec import new_job
from supervisor.loop import Supervisor as Loop
from supervisor.storage import Storage
from supervisor.wakeup import Wakeups

HEARTBEAT = 0.2  # tests/harness.py FAST
DEAD_AFTER = 2.0


@pytest.fixture
def records(tmp_path):
    path = tmp_path / "records"
    path.mkdir()
    return path


def chore_runs(queue, name):
    """(times the chore was taken, the database clock), read together."""
    from sqlalchemy import select

    from supervisor.dbtime import db_now
    from supervisor.tables import chores

    with queue.storage.engine.connect() as conn:
        return conn.execute(select(chores.c.runs, db_now()).where(chores.c.name == name)).first()


def db_now(queue):
    return queue.storage.now()


def test_each_chore_is_done_about_once_per_interval_across_the_fleet(db_url, supervisors):
    from supervisor import Queue

    with Queue(db_url) as queue:
        fleet = [supervisors(db_url, f"s{i}") for i in range(3)]
        for sup in fleet:
            sup.wait_registered(queue)
        wait_for(lambda: chore_runs(queue, "reap"), what="a server to take the reap chore")
        start_runs, start_at = chore_runs(queue, "reap")
        wait_for(lambda: db_now(queue) - start_at >= 3.0, what="a window of 3 s by the database clock")
        end_runs, end_at = chore_runs(queue, "reap")
        done, elapsed = end_runs - start_runs, end_at - start_at
        # The chore is due again 0.8 heartbeat after it was taken (database
        # clock): no more than that however the three servers' beats fall,
        # where each server reaping on every beat would make three times as many.
        assert 1 <= done <= elapsed / (0.8 * HEARTBEAT) + 2, (done, elapsed)
        assert done < 3 * elapsed / HEARTBEAT / 2


def test_a_killed_server_is_reaped_within_dead_after_and_a_heartbeat_with_chores(
        queue, e2e_db_url, supervisors, records):
    doomed = supervisors(e2e_db_url, "doomed")
    doomed_server = doomed.wait_registered(queue)
    job = queue.enqueue("scjobs:spin", [str(records)])
    wait_for(lambda: runs(records, job.id), what="the job to start")
    others = [supervisors(e2e_db_url, f"other{i}") for i in range(3)]
    for sup in others:
        sup.wait_registered(queue)

    doomed.send(signal.SIGKILL)
    wait_for(lambda: len(runs(records, job.id)) >= 2, timeout=30, what="another server to run the job again")
    assert "reaped" in events_of(queue, job.id)
    last_beat = next(s.heartbeat_at for s in queue.servers() if s.id == doomed_server.id)
    reaped_at = next(e.at for e in queue.get(job.id).events if e.kind == "reaped")
    # By the database clock: the chore keeps reaping once per heartbeat
    # across the fleet (a margin for beats delayed on a loaded machine).
    assert reaped_at - last_beat <= DEAD_AFTER + HEARTBEAT + 1.0, reaped_at - last_beat


# --- PostgreSQL: LISTEN, and polling as its safety net -------------------------------


@pytest.fixture
def pg_url(tmp_path):
    from conftest import database_url

    return database_url("postgresql", tmp_path)


def enqueue_without_notify(url, target, args):
    """A job whose NOTIFY is lost: enqueued by a producer that sends none."""
    engine = make_engine(url)
    storage = Storage(engine)
    storage.notifies = False
    try:
        (job_id,) = storage.enqueue(new_job(target, args))
    finally:
        engine.dispose()
    return job_id


def listen_backends(conn):
    return conn.execute(text(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND query ILIKE 'LISTEN%'"
    )).scalars().all()


def test_the_safety_poll_picks_up_a_job_whose_notify_was_lost(pg_url, supervisors, records):
    from supervisor import Queue

    with Queue(pg_url) as queue:
        sup = supervisors(pg_url, "s1", server={"safety_poll": "1s", "poll_interval": "50ms"})
        sup.wait_registered(queue)
        with queue.storage.engine.connect() as conn:
            wait_for(lambda: listen_backends(conn), what="the server to LISTEN")
        job_id = enqueue_without_notify(pg_url, "scjobs:quick", [str(records)])
        wait_for(lambda: queue.get(job_id).state == "succeeded", timeout=20, what="the safety poll to find the job")
        assert read_lines(records / "quick")
        assert "lost the connection" not in sup.log()


def test_a_broken_listen_connection_is_said_and_polling_takes_over(pg_url, supervisors, records):
    """LISTEN keeps breaking (its backend terminated again and again): the
    server says so at WARNING and finds jobs by polling every poll_interval,
    not by the safety poll (60 s here); once LISTEN holds, it says so."""
    from supervisor import Queue

    with Queue(pg_url) as queue:
        sup = supervisors(pg_url, "s1", server={"safety_poll": "60s", "poll_interval": "50ms"})
        sup.wait_registered(queue)
        stop = threading.Event()
        engine = make_engine(pg_url)

        def keep_breaking_listen():
            with engine.connect() as conn:
                conn.execution_options(isolation_level="AUTOCOMMIT")
                while not stop.is_set():
                    for pid in listen_backends(conn):
                        conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
                    stop.wait(0.02)

        with queue.storage.engine.connect() as conn:
            wait_for(lambda: listen_backends(conn), what="the server to LISTEN")
        breaker = threading.Thread(target=keep_breaking_listen, daemon=True)
        breaker.start()
        try:
            wait_for(lambda: "lost the connection that listens for new jobs" in sup.log(), timeout=20,
                     what="a WARNING that LISTEN broke")
            job_id = enqueue_without_notify(pg_url, "scjobs:quick", [str(records)])
            wait_for(lambda: queue.get(job_id).state == "succeeded", timeout=20,
                     what="polling to find the job while LISTEN is broken")
        finally:
            stop.set()
            breaker.join(10)
            engine.dispose()
        assert read_lines(records / "quick")
        wait_for(lambda: "listening for new jobs again" in sup.log(), timeout=20, what="LISTEN to work again")
        # Back on the safety net: a job announced by NOTIFY still starts at once.
        job = queue.enqueue("scjobs:quick", [str(records)])
        wait_for(lambda: queue.get(job.id).state == "succeeded", timeout=20, what="NOTIFY to wake the server")


def test_the_poll_interval_is_the_safety_poll_only_while_listening(pg_url):
    config = Config(server=ServerConfig(poll_interval=0.2, safety_poll=5.0))
    loop = Loop(config)
    assert loop.poll_every() == 0.2  # no LISTEN connection yet
    loop.wakeups = Wakeups(make_engine(pg_url))
    loop.wakeups.listen("0123abcd")
    try:
        assert loop.wakeups.listening and loop.poll_every() == 5.0
        loop.wakeups.broken(RuntimeError("test: the connection broke"))
        assert not loop.wakeups.listening and loop.poll_every() == 0.2
    finally:
        loop.wakeups.close()
        loop.wakeups.engine.dispose()


class HeldJobStorage:
    """An idle poll's answer: the first enqueued job is held `wait` more seconds."""

    def __init__(self, wait):
        self.wait, self.claims = wait, 0

    def due_in(self, queues):
        return self.wait

    def claim(self, *args, **kwargs):
        self.claims += 1
        return []


class Listening:
    listening = True


def test_a_held_job_brings_the_next_poll_forward_to_the_end_of_its_hold():
    """No NOTIFY announces the end of a handoff's hold: the idle poll that
    sees it schedules the next poll then, not a safety poll later."""
    from test_decisions import FakeClock

    clock = FakeClock(100.0)
    loop = Loop(Config(server=ServerConfig(poll_interval=0.2, safety_poll=5.0, dead_after=60.0)), clock=clock)
    loop.last_beat_sent, loop.server_id, loop.wakeups = 100.0, "s1", Listening()
    loop.storage = HeldJobStorage(wait=2.5)
    loop.claim()
    assert loop.next_claim == 102.5 and loop.storage.claims == 0
    loop.storage.wait = None  # nothing enqueued: the safety net only
    loop.claim()
    assert loop.next_claim == 105.0 and loop.storage.claims == 0
    loop.storage.wait = -0.1  # due now: claim
    loop.claim()
    assert loop.storage.claims == 1


def test_an_idle_poll_sees_due_and_held_jobs_and_not_paused_queues(db_url):
    from supervisor import Queue

    with Queue(db_url) as queue:
        assert queue.storage.due_in(["default"]) is None
        queue.enqueue("scjobs:quick", queue="mail")
        assert queue.storage.due_in(["default", "mail"]) <= 0
        queue.pause("mail")
        assert queue.storage.due_in(["default", "mail"]) is None
        job = queue.enqueue("scjobs:quick")
        with queue.storage.engine.begin() as conn:  # as a handoff's hold leaves it
            conn.execute(text("UPDATE shiftchange_jobs SET run_at = run_at + 30 WHERE id = :i"), {"i": job.id})
        assert 25 < queue.storage.due_in(["default", "mail"]) <= 30


# --- PostgreSQL: an enqueue wakes a few idle servers, not the fleet ---------------------


def candidate(name, queues=("default",), concurrency=1, busy=0, version="0.2.0"):
    import json

    from supervisor.wakeup import Candidate

    return Candidate(name, json.dumps(list(queues)), concurrency, busy, version)


class FirstOnes:
    """A deterministic stand-in for random: the first k, in order."""

    @staticmethod
    def sample(population, k):
        return list(population)[:k]


def test_an_enqueue_wakes_one_more_idle_server_than_it_made_jobs():
    from supervisor.wakeup import pick_targets

    fleet = [candidate("a", busy=1), candidate("b"), candidate("c", concurrency=4, busy=3),
             candidate("d"), candidate("e", queues=("mail",))]
    # "a" is busy; "e" serves another queue.
    assert pick_targets(fleet, {"default": 1}, FirstOnes) == ["b", "c"]
    assert pick_targets(fleet, {"default": 2}, FirstOnes) == ["b", "c", "d"]
    assert pick_targets(fleet, {"default": 1, "mail": 1}, FirstOnes) == ["b", "c", "e"]
    # No idle server: none needs waking, each claims when a slot frees.
    assert pick_targets([candidate("a", busy=1)], {"default": 1}, FirstOnes) == []
    assert pick_targets([], {"default": 1}, FirstOnes) == []
    assert pick_targets(fleet, {}, FirstOnes) == []  # only scheduled jobs: nothing claimable yet


def test_an_older_server_or_a_batch_wakes_everyone():
    from supervisor.wakeup import TARGETED_WAKE_MAX, pick_targets

    fleet = [candidate("new"), candidate("old", version="0.1.0")]
    assert pick_targets(fleet, {"default": 1}, FirstOnes) is None  # "old" listens only on the shared channel
    assert pick_targets(fleet, {"mail": 1}, FirstOnes) == []  # ... but does not serve "mail"
    assert pick_targets([candidate("odd", version=None)], {"default": 1}, FirstOnes) is None
    assert pick_targets([candidate("new")], {"default": TARGETED_WAKE_MAX + 1}, FirstOnes) is None


class Listener:
    """A psycopg connection LISTENing on channels, as supervisors do."""

    MARKER = "shiftchange_test_marker"

    def __init__(self, url, channels):
        self.engine = make_engine(url)
        raw = self.engine.raw_connection()
        self.conn = raw.driver_connection
        raw.detach()
        self.conn.autocommit = True
        self.seen: set[str] = set()
        self.conn.add_notify_handler(lambda note: self.seen.add(note.channel))
        for channel in (*channels, self.MARKER):
            self.conn.execute(f"LISTEN {channel}")

    def heard(self) -> set[str]:
        """Channels notified since the last call. PostgreSQL delivers the
        notifications of transactions in commit order: once a marker sent
        after them arrives, everything before it has too."""
        with self.engine.begin() as conn:
            conn.execute(text(f"NOTIFY {self.MARKER}"))
        wait_for(lambda: self.conn.execute("SELECT 1") and self.MARKER in self.seen, what="the marker")
        heard, self.seen = self.seen - {self.MARKER}, set()
        return heard

    def close(self):
        self.conn.close()
        self.engine.dispose()


def register(storage, name, queues=("default",), concurrency=1):
    return storage.register_server(name=name, host="test", pid=1, pid_started_at=None, queues=queues,
                                   concurrency=concurrency, dead_after=60.0)


def test_an_enqueue_notifies_idle_servers_on_their_own_channels(pg_url):
    """Real PostgreSQL: one busy, one quiet, one serving another queue and
    three idle servers; an enqueue of one job notifies two of the three idle
    ones and nobody else; a batch, or an older server in the fleet,
    notifies the shared channel."""
    from supervisor import Queue
    from supervisor.wakeup import TARGETED_WAKE_MAX, WAKE_CHANNEL, server_channel

    with Queue(pg_url) as queue:
        storage = queue.storage
        busy, quiet, mail = register(storage, "busy"), register(storage, "quiet"), register(storage, "mail", ["mail"])
        idle = {register(storage, f"idle{i}") for i in range(3)}
        storage.set_quiet([quiet])
        queue.enqueue("scjobs:quick")
        assert [job.id for job in storage.claim(busy, ["default"], 1)]
        everyone = [busy, quiet, mail, *idle]
        listener = Listener(pg_url, [WAKE_CHANNEL, *(server_channel(s) for s in everyone)])
        try:
            listener.heard()
            queue.enqueue("scjobs:quick")
            woken = listener.heard()
            assert len(woken) == 2 and woken <= {server_channel(s) for s in idle}, woken

            queue.enqueue("scjobs:quick", delay=60)  # scheduled: nothing to claim yet
            assert listener.heard() == set()

            queue.enqueue_many([{"target": "scjobs:quick"}] * (TARGETED_WAKE_MAX + 1))
            assert listener.heard() == {WAKE_CHANNEL}

            with storage.engine.begin() as conn:  # a server of 0.1 joins the fleet
                conn.execute(text("UPDATE shiftchange_servers SET version = '0.1.0' WHERE name = 'idle0'"))
            queue.enqueue("scjobs:quick")
            assert listener.heard() == {WAKE_CHANNEL}
        finally:
            listener.close()


def test_idle_servers_pick_up_jobs_one_after_another_by_targeted_wakes(pg_url, supervisors, records):
    """Three real servers whose safety poll is a minute: every job, enqueued
    one at a time, starts by a targeted NOTIFY alone."""
    from supervisor import Queue

    with Queue(pg_url) as queue:
        fleet = [supervisors(pg_url, f"s{i}", server={"safety_poll": "60s"}) for i in range(3)]
        for sup in fleet:
            sup.wait_registered(queue)
        with queue.storage.engine.connect() as conn:
            wait_for(lambda: len(listen_backends(conn)) == 3, what="three servers to LISTEN")
        for _ in range(6):
            job = queue.enqueue("scjobs:quick", [str(records)])
            wait_for(lambda: queue.get(job.id).state == "succeeded", timeout=20,
                     what="a targeted NOTIFY to wake an idle server")
        assert len(read_lines(records / "quick")) == 6
