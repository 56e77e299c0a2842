"""The supervisor's handoff on MySQL/MariaDB as one batch of statements
(storage.Storage._batched_handoff): one round trip and the COMMIT instead of
five. Real MariaDB; the same handoff through the plain path is the yardstick.
The batch beside a slot's outcome write and claim: test_chained_claims.py
(`handing_off_queue`)."""

import pytest
from sqlalchemy import select

from conftest import database_url
from supervisor import Queue
from supervisor import storage as storage_module
from supervisor.database import make_engine
from supervisor.errors import StorageUnavailable
from supervisor.storage import Storage, _sends_batches
from supervisor.tables import jobs

COMPARED = ("state", "lease", "attempts", "interruptions", "server_id", "avoid_release", "error")


@pytest.fixture
def mariadb_url(tmp_path):
    return database_url("mariadb", tmp_path)


def batching(url, **options) -> Storage:
    return Storage(make_engine(url, batches=True), **options)


def busy_server(q: Queue, storage: Storage, name: str, release: str | None = None):
    """A running server with three jobs in flight, the last one at its
    last allowed interruption (a handoff fails it as poison)."""
    server = storage.register_server(name=name, host="h", pid=1, pid_started_at=None, queues=["work"],
                                     concurrency=3, dead_after=10.0, release=release)
    for max_interruptions in (3, 3, 0):
        q.enqueue("app:work", queue="work", max_interruptions=max_interruptions)
    return server, storage.claim(server, ["work"], 3)


def job_view(q: Queue, job_id: int, server: str) -> dict:
    """What a handoff wrote on the job's row and in its events (the server's
    id, which differs between the two runs compared, as "{server}")."""
    with q.storage.engine.connect() as conn:
        row = conn.execute(select(*(jobs.c[column] for column in COMPARED), jobs.c.run_at > jobs.c.created_at,
                                  jobs.c.avoid_until.is_not(None), jobs.c.finished_at.is_not(None))
                           .where(jobs.c.id == job_id)).one()
    shown = dict(zip((*COMPARED, "held", "avoids", "finished"), row))
    shown["server_id"] = shown["server_id"] and shown["server_id"].replace(server, "{server}")
    shown["events"] = [(e.kind, e.detail.replace(server, "{server}")) for e in q.get(job_id).events]
    return shown


def test_only_the_supervisor_s_engine_sends_batches(mariadb_url):
    plain, batches = Storage(make_engine(mariadb_url)), batching(mariadb_url)
    with plain._write() as conn:
        assert not _sends_batches(conn)
        with pytest.raises(Exception):  # a batch is what an injection needs: refused
            conn.exec_driver_sql("SELECT 1; SELECT 2")
    with batches._write() as conn:
        assert _sends_batches(conn)


def test_a_batched_handoff_does_what_the_plain_one_does(mariadb_url):
    with Queue(mariadb_url) as q:
        plain = Storage(make_engine(mariadb_url), release_window=30.0)
        batches = batching(mariadb_url, release_window=30.0)
        idle = plain.register_server(name="idle", host="h", pid=1, pid_started_at=None, queues=["idle"],
                                     concurrency=1, dead_after=10.0)
        results = {}
        for name, storage in (("plain", plain), ("batched", batches)):
            server, claimed = busy_server(q, storage, name, release="r1")
            handed = storage.handoff([server], 30.0, "a deploy of {server}")
            results[name] = (
                sorted((r.id - claimed[0].id, r.lease, r.failed, r.server == server) for r in handed),
                [job_view(q, job.id, server) for job in claimed],
                {s.id: s.state for s in q.servers()}[server],
            )
        assert results["batched"] == results["plain"]
        ids, views, state = results["batched"]
        assert ids == [(0, 2, False, True), (1, 2, False, True), (2, 2, True, True)] and state == "stopping"
        assert [view["state"] for view in views] == ["enqueued", "enqueued", "failed"]
        assert views[0]["avoid_release"] == "r1"  # left to another release for a while, as before
        assert batches.handoff([idle], 0.0, "x") == []  # a server with no jobs: none
        assert {s.id: s.state for s in q.servers()}[idle] == "stopping"


def test_a_statement_that_fails_in_the_batch_commits_nothing(mariadb_url, monkeypatch):
    with Queue(mariadb_url) as q:
        storage = batching(mariadb_url)
        server, claimed = busy_server(q, storage, "s1")
        real = storage_module._mysql_handoff_batch(storage.engine.dialect, 1)
        broken = (*real[:2], ("INSERT INTO no_such_table VALUES (1)", {}), *real[3:])
        monkeypatch.setattr(storage_module, "_mysql_handoff_batch", lambda dialect, n: broken)
        with pytest.raises(StorageUnavailable):
            storage.handoff([server], 5.0, "a deploy")
        # The server was marked stopping by the batch's second statement,
        # and that connection's transaction is gone with it.
        assert {s.id: s.state for s in q.servers()}[server] == "running"
        assert [q.get(job.id).state for job in claimed] == ["processing"] * 3
        monkeypatch.undo()
        assert len(storage.handoff([server], 5.0, "a deploy")) == 3  # a new connection: it works
