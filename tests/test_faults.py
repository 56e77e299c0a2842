"""Bad input and faults: an unreachable, lost or out-of-date database, jobs
that misbehave, odd arguments, and every stop signal, with real supervisors
(`python -m supervisor run`) and real signals.

The database outages mid-run use SQLite: the test holds the write lock
(`BEGIN EXCLUSIVE`) so the supervisor cannot write its heartbeat, without
touching the PostgreSQL server that other tests share.
"""

import json
import os
import re
import signal
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from harness import alive, events_of, read_lines, runs, shiftchange, wait_for
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from supervisor import Queue
from supervisor.cli import app
from supervisor.database import head_revision, make_engine, upgrade
from supervisor.jobspec import MAX_PAYLOAD_BYTES

pytestmark = pytest.mark.slow

TESTS = Path(__file__).parent
UNREACHABLE = "postgresql://scuser:TopSecret123@127.0.0.1:1/db"
SQL = "'; DROP TABLE shiftchange_jobs; --"


# --- helpers -------------------------------------------------------------------------






def one_line_error(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert lines and lines[-1].startswith("shiftchange: error: "), stderr
    assert "Traceback" not in stderr, stderr
    return lines[-1]








@contextmanager
def sqlite_write_locked(url: str):
    """Hold the SQLite write lock, so no other connection can write (readers
    still can: WAL). Yields the monotonic time the lock was taken."""
    conn = sqlite3.connect(make_url(url).database, isolation_level=None, timeout=10)
    try:
        conn.execute("BEGIN EXCLUSIVE")
        yield time.monotonic()
    finally:
        conn.execute("ROLLBACK")
        conn.close()


@pytest.fixture
def sqlite_queue(sqlite_url):
    with Queue(sqlite_url) as q:
        yield q


# --- the database at start ------------------------------------------------------------


def test_an_unreachable_database_at_start_is_retried_with_backoff_then_exit_1(supervisors):
    began = time.monotonic()
    sup = supervisors(UNREACHABLE, "s1", database={"retry_for": "2s"})
    assert sup.wait(timeout=20) == 1
    took = time.monotonic() - began
    log = sup.log()
    retries = [float(d) for d in re.findall(r"cannot reach the database .*; retrying in ([\d.]+)s", log)]
    assert len(retries) >= 2 and retries == sorted(retries) and retries[-1] > retries[0], log
    final = one_line_error(log)
    assert "cannot reach the database" in final and "database.retry_for = 2s" in final, final
    assert "registered" not in log
    assert 1.0 < took < 15, took
    assert "TopSecret123" not in log


def test_sigterm_while_retrying_at_start_exits_0_before_registering(supervisors):
    sup = supervisors(UNREACHABLE, "s1", database={"retry_for": "60s"})
    wait_for(lambda: "retrying in" in sup.log(), timeout=20, what="a retry warning")
    began = time.monotonic()
    sup.send(signal.SIGTERM)
    assert sup.wait(timeout=10) == 0
    assert time.monotonic() - began < 5  # not the 60 s of retry_for
    assert "stopped before registering" in sup.log()
    assert sup.survivors() == []


def test_an_older_schema_is_refused_by_reads_and_upgraded_by_a_producer(e2e_db_url, tmp_path):
    engine = make_engine(e2e_db_url)
    try:
        upgrade(engine, "0001")
    finally:
        engine.dispose()
    (tmp_path / "shiftchange.yaml").write_text(yaml.safe_dump(
        {"database": {"url": e2e_db_url, "retry_for": "30s"}, "jobs": {"allow": ["scjobs:*"]}}))
    for command in (["status"], ["jobs"], ["reap"]):
        ran = shiftchange(*command, cwd=tmp_path, timeout=20)  # no retrying: it is not an outage
        assert ran.returncode == 1, (command, ran.stderr)
        line = one_line_error(ran.stderr)
        assert "revision 0001" in line and head_revision() in line and "`shiftchange db upgrade`" in line, line
    # Every step since 0001 only adds: a producer (like a server) applies them.
    assert shiftchange("enqueue", "scjobs:quick", cwd=tmp_path).returncode == 0
    assert shiftchange("status", "--json", cwd=tmp_path).returncode == 0


# --- the database lost mid-run (SQLite write lock) ---------------------------------------


def test_a_short_database_outage_leaves_running_jobs_alone(sqlite_queue, sqlite_url, supervisors, records):
    # concurrency 1: with the one slot busy, only the heartbeat needs the database.
    sup = supervisors(sqlite_url, "s1", server={"concurrency": 1}, jobs={"allow": ["faultjobs:*"]})
    sup.wait_registered(sqlite_queue)
    job = sqlite_queue.enqueue("faultjobs:spin_for", [str(records), 4.0])
    (pid,) = wait_for(lambda: runs(records, job.id), what="the job to start")
    with sqlite_write_locked(sqlite_url) as locked:
        # Shorter than the fence window (dead_after 2s - heartbeat 200ms / 2).
        wait_for(lambda: time.monotonic() - locked > 1.2, timeout=5, what="the outage to last")
        assert alive(int(pid)), "the job's process died during a short outage\n" + sup.log()
    wait_for(lambda: sqlite_queue.get(job.id).state == "succeeded", timeout=20,
             what="the job to finish its first run")
    done = sqlite_queue.get(job.id)
    assert (done.attempts, done.interruptions) == (1, 0)
    assert runs(records, job.id) == [pid]
    assert "no heartbeat for too long" not in sup.log()
    assert sup.proc.poll() is None


def test_a_long_database_outage_fences_the_children_then_the_server_registers_anew(
    sqlite_queue, sqlite_url, supervisors, records
):
    sup = supervisors(sqlite_url, "s1", server={"concurrency": 1})
    first = sup.wait_registered(sqlite_queue)
    job = sqlite_queue.enqueue("scjobs:spin", [str(records)])
    (pid,) = wait_for(lambda: runs(records, job.id), what="the job to start")
    with sqlite_write_locked(sqlite_url) as locked:
        wait_for(lambda: time.monotonic() - locked > 1.0, timeout=5, what="the outage to last")
        assert alive(int(pid)), "the job's process was killed before the fence window passed"
        # dead_after 2s: the child kills the job before any other server could
        # declare this one dead, without waiting for its (blocked) supervisor.
        wait_for(lambda: not alive(int(pid)), timeout=5, what="the child to fence the job")
        assert time.monotonic() - locked < 2.5
        wait_for(lambda: "no heartbeat for too long" in sup.log(), timeout=15,
                 what="the supervisor to fence itself")
        assert sup.proc.poll() is None, "the supervisor must keep serving through an outage"
        assert sqlite_queue.get(job.id).state == "processing"  # nobody else could take it yet
    assert "cannot heartbeat" in sup.log()
    second = wait_for(
        lambda: next((s for s in sqlite_queue.servers()
                      if s.pid == sup.pid and s.state == "running" and s.id != first.id), None),
        timeout=20, what="the supervisor to register as a new server",
    )
    wait_for(lambda: sqlite_queue.get(job.id).state == "succeeded", timeout=20, what="the job to finish")
    done = sqlite_queue.get(job.id)
    assert done.server == second.id and done.interruptions == 1
    assert "reaped" in events_of(sqlite_queue, job.id)
    assert {s.id: s.state for s in sqlite_queue.servers()}[first.id] == "dead"
    assert read_lines(records / "overlaps") == []
    assert len(runs(records, job.id)) == 2


def test_sigterm_while_the_database_is_down_kills_the_children_and_exits_1(
    sqlite_queue, sqlite_url, supervisors, records
):
    # Beats 30 s apart: once its job runs, the supervisor writes nothing
    # until SIGTERM, so the signal never lands while a heartbeat waits out
    # SQLite's busy timeout on the lock below (Python answers a signal only
    # between calls: that heartbeat's 5 s would come before the handoff's,
    # as a CI run saw once). What is timed is the shutdown itself.
    sup = supervisors(sqlite_url, "s1", server={"concurrency": 1, "heartbeat_interval": "30s", "dead_after": "90s"})
    old = sup.wait_registered(sqlite_queue)
    job = sqlite_queue.enqueue("scjobs:spin", [str(records)])
    (pid,) = wait_for(lambda: runs(records, job.id), what="the job to start")
    with sqlite_write_locked(sqlite_url):
        began = time.monotonic()
        sup.send(signal.SIGTERM)
        code = sup.wait(timeout=15)
        took = time.monotonic() - began
        assert code == 1, sup.log()
        assert not alive(int(pid)) and sup.survivors() == []
        assert "could not commit the handoff" in sup.log()
    assert took < 8, f"took {took:.1f}s to stop\n{sup.log()}"
    assert sqlite_queue.get(job.id).state == "processing"  # nothing was written
    # The crash path recovers the job: a new incarnation of s1 on this host
    # proves the old pid is gone and reaps it at once.
    new = supervisors(sqlite_url, "s1")
    new.wait_registered(sqlite_queue)
    wait_for(lambda: sqlite_queue.get(job.id).state == "succeeded", timeout=20, what="the job to finish")
    assert {s.id: s.state for s in sqlite_queue.servers()}[old.id] == "dead"
    assert read_lines(records / "overlaps") == []


# --- signals -----------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_sigint_and_sighup_hand_off_and_exit_0_like_sigterm(queue, e2e_db_url, supervisors, records, sig):
    sup = supervisors(e2e_db_url, "s1", shutdown={"kill_after": "300ms"})
    server = sup.wait_registered(queue)
    job = queue.enqueue("scjobs:spin", [str(records)])
    (pid,) = wait_for(lambda: runs(records, job.id), what="the job to start")
    sup.send(sig)
    assert sup.wait(timeout=10) == 0, sup.log()
    handed = [e for e in queue.get(job.id).events if e.kind == "handed_off"]
    assert len(handed) == 1 and f"received {sig.name}" in handed[0].detail, handed
    got = queue.get(job.id)
    assert (got.state, got.interruptions, got.attempts) == ("enqueued", 1, 0)
    assert not alive(int(pid)) and sup.survivors() == []
    assert {s.id: s.state for s in queue.servers()}[server.id] == "stopped"


def test_many_sigterms_hand_off_once_and_exit_0(queue, e2e_db_url, supervisors, records):
    sup = supervisors(e2e_db_url, "s1", shutdown={"kill_after": "60s"})
    sup.wait_registered(queue)
    job = queue.enqueue("scjobs:spin", [str(records)])
    wait_for(lambda: runs(records, job.id), what="the job to start")
    sup.remember_tree()
    for _ in range(50):
        try:
            os.kill(sup.pid, signal.SIGTERM)
        except ProcessLookupError:
            break
    assert sup.wait(timeout=10) == 0, sup.log()  # the repeats skip kill_after's 60 s
    assert events_of(queue, job.id).count("handed_off") == 1
    got = queue.get(job.id)
    assert (got.state, got.interruptions) == ("enqueued", 1)
    assert sup.log().count("shutting down") == 1
    assert sup.survivors() == []


# --- odd input -----------------------------------------------------------------------------


@pytest.fixture
def cli_in(tmp_path, monkeypatch):
    """The real CLI in-process (argv this large cannot cross exec(): Linux
    caps one argument at 128 KiB), in a directory whose config names `url`."""
    monkeypatch.delenv("SHIFTCHANGE_CONFIG", raising=False)
    monkeypatch.delenv("SHIFTCHANGE_DATABASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)

    def run(url, *args):
        (tmp_path / "shiftchange.yaml").write_text(yaml.safe_dump({"database": {"url": url}}))
        return CliRunner().invoke(app, list(args), catch_exceptions=False)

    return run


def test_huge_args_are_refused_by_the_cli_with_the_limit_and_nothing_is_written(cli_in, sqlite_url):
    # A 1-element list of n characters is n + 4 bytes of JSON; kwargs `{}` adds 2.
    at_limit = MAX_PAYLOAD_BYTES - 6
    cases = [
        (["--args", json.dumps(["x" * (at_limit + 1)])], "limit"),
        (["--args", json.dumps(["é" * (MAX_PAYLOAD_BYTES // 2)])], "limit"),  # bytes, not characters
        (["--kwargs", json.dumps({"blob": "y" * (MAX_PAYLOAD_BYTES + 1)})], "limit"),
        (["--args", json.dumps(["a" * 600_000]), "--kwargs", json.dumps({"b": "b" * 600_000})], "limit"),
    ]
    for extra, word in cases:
        result = cli_in(sqlite_url, "enqueue", "faultjobs:record_args", *extra)
        assert result.exit_code == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and word in lines[0] and str(MAX_PAYLOAD_BYTES) in lines[0], lines
        assert len(lines[0]) < 300  # says the size, does not echo the payload
    with Queue(sqlite_url) as q:
        assert q.jobs() == []
    result = cli_in(sqlite_url, "enqueue", "faultjobs:record_args", "--args", json.dumps(["x" * at_limit]))
    assert result.exit_code == 0, result.stderr
    with Queue(sqlite_url) as q:
        assert q.get(int(result.stdout)).args == ["x" * at_limit]


@pytest.mark.parametrize("target", [
    "app.tasks:run'; DROP TABLE shiftchange_jobs; --",
    "tâches:exécuter",
    "app:run()",
    "__import__('os'):system",
    "app.tasks:__init__",
])
def test_unicode_and_sql_looking_targets_are_refused_at_enqueue(target, tmp_path):
    (tmp_path / "shiftchange.yaml").write_text(yaml.safe_dump({"database": {"url": f"sqlite:///{tmp_path}/q.db"}}))
    ran = shiftchange("enqueue", target, cwd=tmp_path)
    assert ran.returncode == 2
    assert "package.module:function" in one_line_error(ran.stderr)
    with Queue(f"sqlite:///{tmp_path}/q.db") as q:
        assert q.jobs() == []


def test_unicode_and_sql_looking_args_arrive_intact_in_the_job(queue, e2e_db_url, supervisors, records, tmp_path):
    sup = supervisors(e2e_db_url, "s1", jobs={"allow": ["faultjobs:*"]})
    sup.wait_registered(queue)
    args = [SQL, "zürich ☃ 東京 🚀 שלום", "quote\" back\\slash\ttab\nnewline", "\x00\x1f", "%s %(x)s ? :name",
            {"nested": [None, True, 1.5, -0, 2**53], "ключ": "значение"}, "ß" * 200_000]
    kwargs = {"Robert'); DROP TABLE students;--": "x", "emoji 🙂": ["\u2028", "\ufeff"]}
    through_api = queue.enqueue("faultjobs:record_args", [str(records / "api.json"), *args], kwargs)
    (tmp_path / "shiftchange.yaml").write_text(yaml.safe_dump({"database": {"url": e2e_db_url}}))
    small = args[:-1]  # one argv string cannot exceed 128 KiB
    ran = shiftchange("enqueue", "faultjobs:record_args", "--args",
                      json.dumps([str(records / "cli.json"), *small], ensure_ascii=False),
                      "--kwargs", json.dumps(kwargs, ensure_ascii=False), cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    through_cli = int(ran.stdout)
    for job_id, name, sent in ((through_api.id, "api.json", args), (through_cli, "cli.json", small)):
        wait_for(lambda job_id=job_id: queue.get(job_id).state in ("succeeded", "failed"), what=f"job {job_id}")
        assert queue.get(job_id).state == "succeeded", queue.get(job_id).error
        got = json.loads((records / name).read_text(encoding="utf-8"))
        assert got == {"job": job_id, "args": sent, "kwargs": kwargs}
    assert len(queue.jobs()) == 2  # and the table is still there


def test_misbehaving_jobs_end_with_readable_outcomes_while_the_supervisor_keeps_serving(
    queue, e2e_db_url, supervisors, records
):
    sup = supervisors(e2e_db_url, "s1", jobs={"allow": ["faultjobs:*", "scjobs:*"], "max_attempts": 1})
    sup.wait_registered(queue)
    orphaning = queue.enqueue("faultjobs:leave_grandchild", [str(records)])
    silent = queue.enqueue("faultjobs:silent_failure")
    wait_for(lambda: queue.get(orphaning.id).state == "succeeded", what="the orphaning job to succeed")
    (orphan,) = read_lines(records / "orphan")
    # Nothing a job starts outlives it, even a setsid grandchild it left behind.
    wait_for(lambda: not alive(int(orphan)), timeout=5, what="the orphaned grandchild to be killed")
    wait_for(lambda: queue.get(silent.id).state == "failed", what="the silent job to fail")
    assert "ValueError: raised after closing stdout and stderr" in queue.get(silent.id).error
    last = queue.enqueue("scjobs:quick", [str(records)])
    wait_for(lambda: queue.get(last.id).state == "succeeded", what="the supervisor to keep serving")
    assert sup.proc.poll() is None
