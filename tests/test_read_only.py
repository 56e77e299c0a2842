"""Read commands never write (issue 10.2): `status`, `jobs`, `job`,
`handoff`, `reap`, `requeue`, `delete`, `recurring` and `config check` never create the
schema or a SQLite file. On a database without the schema they say so in one
line, with the masked URL and how to create it, and exit 1. `status` names
the database it read. On SQLite, PostgreSQL and MariaDB."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import inspect
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from supervisor import Queue
from supervisor.cli import app
from supervisor.database import make_engine, mask_url

TESTS = Path(__file__).parent
READS = [["status"], ["status", "--json"], ["jobs"], ["job", "1"], ["handoff"], ["handoff", "--server", "s1"],
         ["recurring"], ["recurring", "--json"],
         ["reap"], ["requeue", "1"], ["delete", "1"]]


pytestmark = pytest.mark.usefixtures("cli_in_empty_dir")


def cli(*args):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def configure(tmp_path, url):
    (tmp_path / "shiftchange.yaml").write_text(f"database:\n  url: {url}\n")


def shiftchange_tables(url) -> set[str]:
    engine = make_engine(url)
    try:
        return {t for t in inspect(engine).get_table_names() if t.startswith("shiftchange_")}
    finally:
        engine.dispose()


def assert_says_no_schema(result, url):
    assert result.exit_code == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("shiftchange: error: ") and mask_url(url) in line, line
    assert "`shiftchange db upgrade`" in line and "cannot reach" not in line, line
    assert result.stdout == ""


@pytest.mark.parametrize("command", READS, ids=" ".join)
def test_a_read_on_a_database_without_the_schema_creates_nothing(db_url, tmp_path, command):
    configure(tmp_path, db_url)
    sqlite_file = make_url(db_url).database if db_url.startswith("sqlite") else None
    assert_says_no_schema(cli(*command), db_url)
    if sqlite_file:
        assert not os.path.exists(sqlite_file)
        assert not list(tmp_path.glob("*.db*"))
    else:
        assert shiftchange_tables(db_url) == set()


def test_config_check_never_opens_the_database(sqlite_url, tmp_path):
    configure(tmp_path, sqlite_url)
    assert cli("config", "check").exit_code == 0
    assert cli("config", "check", "--json").exit_code == 0
    assert not list(tmp_path.glob("*.db*"))


def test_status_in_a_directory_without_config_creates_no_shiftchange_db(tmp_path):
    """The default URL is ./shiftchange.db: reading must not create it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHIFTCHANGE_")}
    done = subprocess.run([sys.executable, "-m", "supervisor", "status"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and "shiftchange.db" in done.stderr, done.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_mistyped_postgres_database_gets_no_tables_and_no_password_shown(postgres_url, tmp_path):
    # Trust authentication ignores the password: the URL still must not show it.
    url = make_url(postgres_url).set(password="TopSecret123").render_as_string(hide_password=False)
    configure(tmp_path, url)
    result = cli("status", "--json")
    assert_says_no_schema(result, url)
    assert "TopSecret123" not in result.stderr
    assert shiftchange_tables(postgres_url) == set()


def test_status_names_the_database_it_read(db_url, tmp_path):
    Queue(db_url).close()
    configure(tmp_path, db_url)
    text = cli("status")
    assert text.exit_code == 0, text.stderr
    assert text.stdout.splitlines()[0] == f"database: {mask_url(db_url)}"
    data = json.loads(cli("status", "--json").stdout)
    assert data["database"] == mask_url(db_url)


def test_the_python_api_can_open_read_only(db_url):
    from supervisor.errors import SchemaMissing

    with pytest.raises(SchemaMissing):
        Queue(db_url, create=False)
    with Queue(db_url) as producer:  # a producer creates the schema
        producer.enqueue("app.tasks:work")
    with Queue(db_url, create=False) as reader:
        assert reader.counts()["enqueued"] == 1
