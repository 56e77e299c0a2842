"""Fixtures: real databases (a SQLite file, PostgreSQL, MariaDB), and real
supervisor processes.

PostgreSQL and MariaDB are taken from SHIFTCHANGE_TEST_POSTGRES_URL and
SHIFTCHANGE_TEST_MYSQL_URL (defaults: the local servers). One that cannot be
reached is skipped locally, and fails the run when
SHIFTCHANGE_REQUIRE_ALL_DATABASES=1 (as in CI): a database test that
silently skips is a test that does not exist.
"""

import fcntl
import os
import sys
import tempfile
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text

from supervisor.database import make_engine

TESTS = Path(__file__).parent
REPO_ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))

BASE_URLS = {
    "postgresql": os.environ.get("SHIFTCHANGE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"),
    "mariadb": os.environ.get("SHIFTCHANGE_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306/test"),
}
# Each test session works in a database of its own, so two runs on one
# machine (or a benchmark beside a test run) never drop each other's tables.
SESSION_DB = f"shiftchange_t{os.getpid()}"
SERVER_URLS: dict[str, str] = {}
_unreachable: dict[str, str] = {}


def _admin(url: str, statement: str) -> None:
    engine = create_engine(make_url_with_driver(url), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(statement))
    finally:
        engine.dispose()


def make_url_with_driver(url: str):
    from supervisor.database import _driver_url

    return _driver_url(url)


def _create_session_database(kind: str) -> str:
    base = make_url_with_driver(BASE_URLS[kind])
    _admin(BASE_URLS[kind], f"DROP DATABASE IF EXISTS {SESSION_DB}")
    _admin(BASE_URLS[kind], f"CREATE DATABASE {SESSION_DB}")
    return base.set(database=SESSION_DB).render_as_string(hide_password=False)


# Tests run in parallel (pytest-xdist), each worker in databases of its own,
# but on one PostgreSQL and one MariaDB server. A test that stops or restarts
# a server (marked `exclusive`) runs alone: it takes this lock exclusively,
# every other test shares it. Readers pass a turnstile first, so a waiting
# exclusive test is not starved by a stream of shared ones. The path is fixed
# so that two test runs on one machine respect each other too.
_SERVER_LOCK = Path(tempfile.gettempdir()) / "shiftchange-tests-database-servers.lock"


@pytest.fixture(autouse=True)
def _database_servers(request):
    exclusive = request.node.get_closest_marker("exclusive") is not None
    with open(_SERVER_LOCK, "a") as lock, open(f"{_SERVER_LOCK}.turnstile", "a") as turnstile:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        finally:
            if not exclusive:
                fcntl.flock(turnstile, fcntl.LOCK_UN)
        yield  # both locks are released when their files close


def pytest_sessionfinish(session):
    for kind in SERVER_URLS:
        force = " WITH (FORCE)" if kind == "postgresql" else ""
        try:
            _admin(BASE_URLS[kind], f"DROP DATABASE IF EXISTS {SESSION_DB}{force}")
        except Exception:
            pass  # best effort; the next session with this pid drops it first


def drop_shiftchange_tables(url: str) -> None:
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            for table in inspect(conn).get_table_names():
                if table.startswith("shiftchange_"):
                    conn.execute(text(f"DROP TABLE {table}"))
    finally:
        engine.dispose()


def _server_url(kind: str) -> str:
    if kind not in _unreachable:
        try:
            SERVER_URLS[kind] = _create_session_database(kind)
            _unreachable[kind] = ""
        except Exception as exc:  # reported below, once per database
            _unreachable[kind] = str(exc).splitlines()[0]
    if _unreachable[kind]:
        message = f"{kind} at {BASE_URLS[kind]} is unreachable: {_unreachable[kind]}"
        if os.environ.get("SHIFTCHANGE_REQUIRE_ALL_DATABASES"):
            pytest.fail(message)
        pytest.skip(message)
    url = SERVER_URLS[kind]
    drop_shiftchange_tables(url)
    return url


def database_url(kind: str, tmp_path: Path) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'queue.db'}"
    return _server_url(kind)


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def db_url(request, tmp_path):
    """A URL to an empty database, for each of the three kinds."""
    return database_url(request.param, tmp_path)


@pytest.fixture(params=["postgresql", "mariadb"])
def server_db_url(request, tmp_path):
    """For what only a database server can show (a row lock that leaves the
    heartbeat free, a network between): PostgreSQL and MariaDB."""
    return database_url(request.param, tmp_path)


@pytest.fixture
def server_queue(server_db_url):
    from supervisor import Queue

    with Queue(server_db_url) as q:
        yield q


@pytest.fixture(params=["sqlite", "postgresql"])
def e2e_db_url(request, tmp_path):
    """End-to-end scenarios run on SQLite and PostgreSQL."""
    return database_url(request.param, tmp_path)


@pytest.fixture
def queue(e2e_db_url):
    """A Queue on e2e_db_url (storage tests override this with all three
    databases)."""
    from supervisor import Queue

    with Queue(e2e_db_url) as q:
        yield q


@pytest.fixture
def any_queue(db_url):
    """A Queue on each of SQLite, PostgreSQL and MariaDB (db_url's)."""
    from supervisor import Queue

    with Queue(db_url) as q:
        yield q


@pytest.fixture
def sqlite_url(tmp_path):
    return database_url("sqlite", tmp_path)


@pytest.fixture
def postgres_url(tmp_path):
    return database_url("postgresql", tmp_path)


@pytest.fixture
def supervisors(tmp_path):
    """Start real supervisors with `supervisors(url, name, **settings)`;
    whatever they leave behind is killed after the test."""
    from harness import Supervisor

    started = []

    def start(url, name="s1", prefix=(), env=None, **settings):
        sup = Supervisor(url, tmp_path, name, prefix=prefix, env=env, **settings).start()
        started.append(sup)
        return sup

    yield start
    for sup in started:
        sup.destroy()


@pytest.fixture
def records(tmp_path):
    """A directory where test jobs write what they did."""
    path = tmp_path / "records"
    path.mkdir()
    return path


@pytest.fixture
def cli_in_empty_dir(monkeypatch, tmp_path):
    """For in-process CLI tests: config only from ./shiftchange.yaml in an
    empty directory, nothing inherited from the environment; wide tables."""
    monkeypatch.delenv("SHIFTCHANGE_CONFIG", raising=False)
    monkeypatch.delenv("SHIFTCHANGE_DATABASE_URL", raising=False)
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.chdir(tmp_path)
