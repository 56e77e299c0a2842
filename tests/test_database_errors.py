"""Database errors: a permanent one (no such database, authentication
failed, no driver, a SQLite path that is a directory or not a database)
is one line and exit 1 at once, from `run` and from every command; a
refused connection or a timeout keeps the backoff (test_faults.py).
Also `postgres://` URLs, and the bounds every engine gets."""

import subprocess
import sys
import time

import pytest
from sqlalchemy.engine import make_url

from supervisor.database import (
    DEFAULT_BOUNDS,
    bounds_for,
    command_bounds,
    is_permanent,
    make_engine,
    unavailable,
)
from supervisor.errors import StorageRefused, StorageUnavailable

COMMANDS = [["run"], ["status"], ["jobs"], ["handoff"], ["enqueue", "scjobs:quick"]]


def shiftchange(*args, cwd, url, timeout=60):
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("SHIFTCHANGE_")}
    env["SHIFTCHANGE_DATABASE_URL"] = url
    began = time.monotonic()
    ran = subprocess.run([sys.executable, "-m", "supervisor", *args], cwd=cwd, capture_output=True,
                         text=True, timeout=timeout, env=env)
    return ran, time.monotonic() - began


def assert_fails_at_once(url, tmp_path, *words):
    """Every command, `run` included (whose retry_for is 60 s by default),
    exits 1 with one line naming the problem, without retrying."""
    for command in COMMANDS:
        ran, took = shiftchange(*command, cwd=tmp_path, url=url)
        assert ran.returncode == 1, (command, ran.stderr)
        lines = ran.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("shiftchange: error: "), (command, ran.stderr)
        assert all(word in lines[0] for word in words), (command, lines[0])
        assert "retrying" not in ran.stderr and "secret" not in ran.stderr
        assert took < 20, (command, took)  # not database.retry_for's 60 s


@pytest.fixture(params=["postgresql", "mariadb"])
def server_url(request, tmp_path):
    from conftest import database_url

    return make_url(database_url(request.param, tmp_path))


def test_a_database_that_does_not_exist_fails_at_once(server_url, tmp_path):
    url = server_url.set(database="shiftchange_no_such_db").render_as_string(hide_password=False)
    assert_fails_at_once(url, tmp_path, "cannot use the database", "shiftchange_no_such_db")


def test_failed_authentication_fails_at_once(server_url, tmp_path):
    url = server_url.set(username="shiftchange_nobody", password="secret").render_as_string(hide_password=False)
    assert_fails_at_once(url, tmp_path, "cannot use the database", "shiftchange_nobody")


def test_an_unknown_driver_fails_at_once(tmp_path):
    assert_fails_at_once("postgresql+nosuchdriver://u:secret@127.0.0.1/db", tmp_path, "no driver for")


def test_a_sqlite_path_that_is_a_directory_fails_at_once(tmp_path):
    (tmp_path / "queue.db").mkdir()
    assert_fails_at_once(f"sqlite:///{tmp_path / 'queue.db'}", tmp_path, "is a directory")


def test_a_sqlite_file_that_is_not_a_database_fails_at_once(tmp_path):
    (tmp_path / "queue.db").write_text("not a database, but someone's notes\n" * 100)
    assert_fails_at_once(f"sqlite:///{tmp_path / 'queue.db'}", tmp_path, "file is not a database")
    assert (tmp_path / "queue.db").read_text().startswith("not a database")  # untouched


def test_postgres_urls_as_platforms_give_them_are_postgresql(tmp_path):
    from conftest import database_url

    url = make_url(database_url("postgresql", tmp_path)).set(drivername="postgres")
    engine = make_engine(url.render_as_string(hide_password=False))
    assert engine.dialect.name == "postgresql"
    engine.dispose()
    for command in (["db", "upgrade"], ["status", "--json"]):
        ran, _ = shiftchange(*command, cwd=tmp_path, url=url.render_as_string(hide_password=False))
        assert ran.returncode == 0, (command, ran.stderr)


# --- classification and bounds, without a process -----------------------------------


def test_refused_connections_and_timeouts_are_transient_permanent_errors_are_not():
    import pymysql

    assert not is_permanent(pymysql.err.OperationalError(2003, "Can't connect (Connection refused)"))
    assert not is_permanent(pymysql.err.OperationalError(2013, "Lost connection (timed out)"))
    assert is_permanent(pymysql.err.OperationalError(1049, "Unknown database 'x'"))
    assert is_permanent(pymysql.err.OperationalError(1045, "Access denied for user 'x'"))
    assert not is_permanent(OSError("connection failed: Connection refused"))
    assert not is_permanent(OSError("no answer from the database within 1s"))
    assert is_permanent(OSError('connection failed: FATAL:  password authentication failed for user "x"'))
    refused = unavailable("postgresql://u:pw@h/db", OSError('FATAL:  database "db" does not exist'))
    assert isinstance(refused, StorageRefused) and "pw" not in str(refused)
    assert type(unavailable("postgresql://h/db", OSError("Connection refused"))) is StorageUnavailable


def test_bounds_follow_dead_after_within_limits():
    assert bounds_for(0.5, 3.0).statement == 1.0  # never below 1 s
    assert bounds_for(1.0, 10.0) == DEFAULT_BOUNDS and DEFAULT_BOUNDS.statement == 2.5
    assert bounds_for(5.0, 60.0).statement == 5.0  # never above 5 s
    # From dead_after 3 s up (below, libpq's 2 s least connect timeout is
    # most of the fence window: docs/design.md), a call stuck on a black hole
    # leaves room for another heartbeat before the fence.
    for heartbeat, dead_after in [(0.5, 3.0), (1.0, 10.0), (2.0, 30.0)]:
        bounds = bounds_for(heartbeat, dead_after)
        assert bounds.connect >= 2 and bounds.connect >= bounds.statement
        assert max(bounds.connect, bounds.statement) < dead_after - heartbeat / 2
    assert command_bounds(1.0, 10.0).connect == DEFAULT_BOUNDS.connect
    assert command_bounds(1.0, 10.0).statement >= DEFAULT_BOUNDS.statement
