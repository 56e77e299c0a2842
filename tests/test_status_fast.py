"""`shiftchange status` reads through the DB-API driver alone, without
importing SQLAlchemy (issue 11: it must start fast), and shows exactly what
it showed through the Queue: the same JSON and tables, on SQLite,
PostgreSQL and MariaDB, with live, quiet, stopped and dead servers and jobs
in every state in several queues."""

import json
import os
import re
import subprocess
import sys

import pytest
from sqlalchemy import text, update
from typer.testing import CliRunner

from supervisor import Queue, dbapi
from supervisor.cli import app
from supervisor.records import JOB_STATES
from supervisor.tables import servers

pytestmark = pytest.mark.usefixtures("cli_in_empty_dir")
# Older than 2 minutes, so the table shows whole minutes ("11m ago"; the
# dead server's "13m ago") that stay the same for the 30 s between two
# runs of `status`.
HEARTBEAT_AGE_S = 660
DEAD_FOR_S = 120


def register(storage, name: str, **options) -> str:
    return storage.register_server(name=name, host="h1", pid=4242, pid_started_at=None, queues=["default", "mail"],
                                   concurrency=2, dead_after=10.0, **options)


def a_busy_queue(url: str) -> dict:
    """Servers in every state, jobs in every state in three queues, a
    paused queue; returns the names' ids and the jobs in flight."""
    with Queue(url) as q:
        s = q.storage
        ids = {name: register(s, name) for name in ("quiet", "stopped", "dead")}
        ids["live"] = register(s, "live", release="v2")
        for queue, n in (("default", 3), ("mail", 2), ("reports", 1)):
            for _ in range(n):
                q.enqueue("app.tasks:work", queue=queue, max_attempts=1)
        q.enqueue("app.tasks:later", queue="mail", delay=3600)
        running = [job.id for job in s.claim(ids["live"], ["default"], 3)]
        done, failed = s.claim(ids["quiet"], ["mail"], 2)
        s.complete(done.id, done.lease, ids["quiet"])
        s.fail(failed.id, failed.lease, ids["quiet"], "Traceback...\nValueError: boom", retry_backoff=0)
        s.set_quiet([ids["quiet"]], True)
        s.handoff([ids["stopped"]], 0, "test")
        s.release_handoff(ids["stopped"], [])
        (lost,) = s.claim(ids["dead"], ["reports"], 1)
        with q.engine.begin() as conn:
            conn.execute(update(servers).where(servers.c.id == ids["dead"])
                         .values(heartbeat_at=servers.c.heartbeat_at - DEAD_FOR_S))
        assert [t.id for t in s.reap()] == [lost.id]
        with q.engine.begin() as conn:
            conn.execute(update(servers).values(heartbeat_at=servers.c.heartbeat_at - HEARTBEAT_AGE_S))
        q.pause("mail")
    return {"ids": ids, "running": running}


def configure(tmp_path, url: str) -> None:
    (tmp_path / "shiftchange.yaml").write_text(f"database:\n  url: {url}\n")


def status(*args: str) -> str:
    ran = CliRunner().invoke(app, ["status", *args], catch_exceptions=False)
    assert ran.exit_code == 0, ran.stderr
    return ran.stdout


def without_ages(shown: str) -> str:
    """The JSON with heartbeat ages rounded to minutes: two reads are a
    moment apart."""
    return re.sub(r'"heartbeat_age": (\d+)\.\d+', lambda m: f'"heartbeat_age": {int(m.group(1)) // 60}m', shown)


def through_the_queue(monkeypatch, *args: str) -> str:
    """`status` as it read before: through a Queue (SQLAlchemy)."""
    with monkeypatch.context() as patched:
        patched.setattr(dbapi, "open_reader", lambda *_: None)
        return status(*args)


def test_status_reads_what_the_queue_api_reports(db_url, tmp_path):
    made = a_busy_queue(db_url)
    configure(tmp_path, db_url)
    reader = dbapi.open_reader(db_url, dbapi.command_bounds(1.0, 10.0))
    assert reader is not None, "status would read through the Queue"
    reader.close()

    shown = json.loads(status("--json"))
    with Queue(db_url, create=False) as q:
        api = {"servers": [s.to_dict() for s in q.servers()], "counts": q.counts(), "queues": q.queue_counts(),
               "database": q.database, "paused": sorted(q.paused_queues())}
    for server in shown["servers"] + api["servers"]:
        age = server.pop("heartbeat_age")  # the two reads were a moment apart
        assert HEARTBEAT_AGE_S <= age < HEARTBEAT_AGE_S + DEAD_FOR_S + 30, server
    assert shown == api

    ids = made["ids"]
    by_id = {server["id"]: server for server in shown["servers"]}
    assert {name: by_id[ids[name]]["state"] for name in ids} == {
        "live": "running", "quiet": "quiet", "stopped": "stopped", "dead": "dead"}
    assert by_id[ids["live"]]["jobs"] == made["running"] and by_id[ids["live"]]["release"] == "v2"
    started = [server["started_at"] for server in shown["servers"]]
    assert started == sorted(started, reverse=True)  # newest first
    assert shown["counts"] == {"enqueued": 1, "scheduled": 1, "processing": 3, "succeeded": 1, "failed": 1}
    assert shown["queues"] == {
        "default": dict.fromkeys(JOB_STATES, 0) | {"processing": 3},
        "mail": dict.fromkeys(JOB_STATES, 0) | {"scheduled": 1, "succeeded": 1, "failed": 1},
        "reports": dict.fromkeys(JOB_STATES, 0) | {"enqueued": 1},
    }
    assert shown["paused"] == ["mail"]


@pytest.mark.parametrize("args", [["--json"], [], ["--all"]], ids=["json", "table", "table --all"])
def test_status_shows_what_it_showed_through_the_queue(db_url, tmp_path, monkeypatch, args):
    a_busy_queue(db_url)
    configure(tmp_path, db_url)
    assert without_ages(status(*args)) == without_ages(through_the_queue(monkeypatch, *args))


def imported(stderr: str) -> set[str]:
    """The top-level packages a `python -X importtime` run imported."""
    return {match.group(1) for match in re.finditer(r"^import time:.*\|\s+([\w]+)", stderr, re.M)}


@pytest.mark.parametrize("args", [[], ["--json"], ["--all"]], ids=["table", "json", "all"])
def test_status_never_imports_sqlalchemy(db_url, tmp_path, args):
    a_busy_queue(db_url)
    configure(tmp_path, db_url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHIFTCHANGE_")}
    ran = subprocess.run([sys.executable, "-X", "importtime", "-m", "supervisor", "status", *args], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60, env=env)
    assert ran.returncode == 0, ran.stderr[-2000:]
    modules = imported(ran.stderr)
    assert "supervisor" in modules and "psutil" not in modules  # it did read the import lines
    assert not modules & {"sqlalchemy", "alembic", "croniter", "typer", "rich"}, sorted(modules)


def test_status_into_a_reader_that_leaves_early_ends_quietly(sqlite_url, tmp_path):
    """`shiftchange status | head -1`: the pipe closes under us."""
    a_busy_queue(sqlite_url)
    configure(tmp_path, sqlite_url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHIFTCHANGE_")}
    reader, writer = os.pipe()
    os.close(reader)  # gone before we write: every write fails
    with os.fdopen(writer, "wb") as closed_pipe:
        ran = subprocess.run([sys.executable, "-m", "supervisor", "status", "--all"], cwd=tmp_path, env=env,
                             stdout=closed_pipe, stderr=subprocess.PIPE, text=True, timeout=60)
    assert (ran.returncode, ran.stderr) == (1, "")


def test_status_tables_line_up_numbers_right_and_words_left():
    from supervisor.status import text_table

    assert text_table("jobs", ["queue", "enqueued"], [["default", 7], ["mail (paused)", 12]]).splitlines() == [
        "jobs",
        "queue          enqueued",
        "default               7",
        "mail (paused)        12",
    ]
    named = text_table("servers", ["name"], [["evil\x1b]0;owned\x07\x1b[2J"]]).splitlines()
    assert named[-1] == "evil?]0;owned??[2J"  # a terminal escape in a name is shown, not obeyed


def shiftchange(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHIFTCHANGE_")} | {"COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "supervisor", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, env=env)


@pytest.mark.parametrize("args", [
    [], ["--json"], ["--all"], ["--all", "--json", "--all"], ["--config", "shiftchange.yaml"],
    ["-c", "shiftchange.yaml", "--json"], ["--config=shiftchange.yaml"], ["--config", "absent.yaml"],
], ids=["table", "json", "all", "flags twice", "--config", "-c", "--config=", "absent config"])
def test_the_executable_runs_status_as_the_typer_command_does(db_url, tmp_path, args):
    """supervisor/entry.py runs these without Typer: the same output,
    errors and exit code as the Typer command."""
    from supervisor.entry import status_options

    assert status_options(["status", *args]) is not None
    a_busy_queue(db_url)
    configure(tmp_path, db_url)
    direct = shiftchange("status", *args, cwd=tmp_path)
    through_typer = CliRunner().invoke(app, ["status", *args], catch_exceptions=False)
    assert (direct.returncode, without_ages(direct.stdout), direct.stderr) == (
        through_typer.exit_code, without_ages(through_typer.stdout), through_typer.stderr)
    assert direct.returncode == (2 if "absent.yaml" in args else 0), direct.stderr


@pytest.mark.parametrize("argv", [
    ["status", "--help"], ["status", "-h"], ["status", "--jsn"], ["status", "--config"], ["status", "-c", "--json"],
    ["status", "extra"], ["jobs"], [], ["--help"], ["status", "--config="],
])
def test_every_other_command_line_is_left_to_typer(argv):
    from supervisor.entry import status_options

    assert status_options(argv) is None


def test_status_help_and_typos_are_still_typers(tmp_path):
    helped = shiftchange("status", "--help", cwd=tmp_path)
    assert helped.returncode == 0 and "--all" in helped.stdout and "--json" in helped.stdout
    typo = shiftchange("status", "--jsn", cwd=tmp_path)
    assert typo.returncode == 2 and "No such option" in typo.stderr and "--jsn" in typo.stderr


def set_versions(url: str, revision: str, marker: str) -> None:
    with Queue(url) as q, q.engine.begin() as conn:
        conn.execute(text("UPDATE shiftchange_schema_version SET version_num = :r"), {"r": revision})
        conn.execute(text("UPDATE shiftchange_alembic_version SET version_num = :m"), {"m": marker})


def test_a_newer_schema_declared_compatible_is_read_without_sqlalchemy(db_url, tmp_path):
    set_versions(db_url, "0099", "0002")
    assert dbapi.open_reader(db_url, dbapi.command_bounds(1.0, 10.0)) is not None
    configure(tmp_path, db_url)
    assert json.loads(status("--json"))["counts"] == dict.fromkeys(JOB_STATES, 0)


def test_a_newer_schema_this_release_cannot_use_says_upgrade_this_server(db_url, tmp_path):
    set_versions(db_url, "0099", "0098")
    configure(tmp_path, db_url)
    ran = CliRunner().invoke(app, ["status", "--json"], catch_exceptions=False)
    assert ran.exit_code == 1 and ran.stdout == ""
    (line,) = ran.stderr.strip().splitlines()
    assert line.startswith("shiftchange: error: ") and "revision 0099" in line and "upgrade this server" in line


def a_sqlite_directory(tmp_path) -> str:
    (tmp_path / "queue.db").mkdir()
    return f"sqlite:///{tmp_path / 'queue.db'}"


def a_sqlite_file_that_is_not_a_database(tmp_path) -> str:
    (tmp_path / "queue.db").write_text("not a database, but someone's notes\n" * 100)
    return f"sqlite:///{tmp_path / 'queue.db'}"


@pytest.mark.parametrize("url_for", [
    lambda _: "postgresql://u:secret@127.0.0.1:1/db",  # nothing listens on port 1
    lambda _: "mysql://u:secret@127.0.0.1:1/db",
    lambda tmp_path: f"sqlite:///{tmp_path / 'absent.db'}",
    a_sqlite_directory,
    a_sqlite_file_that_is_not_a_database,
    lambda _: "postgresql://u:secret@127.0.0.1:notaport/db",  # left to the engine
], ids=["postgresql refused", "mariadb refused", "sqlite absent", "sqlite directory", "sqlite not a database",
        "not a port"])
def test_status_fails_as_it_did_through_the_queue(tmp_path, monkeypatch, url_for):
    configure(tmp_path, url_for(tmp_path))
    fast = CliRunner().invoke(app, ["status"], catch_exceptions=False)
    with monkeypatch.context() as patched:
        patched.setattr(dbapi, "open_reader", lambda *_: None)
        slow = CliRunner().invoke(app, ["status"], catch_exceptions=False)
    assert (fast.exit_code, fast.stdout, fast.stderr) == (slow.exit_code, slow.stdout, slow.stderr)
    assert fast.exit_code in (1, 2) and len(fast.stderr.strip().splitlines()) == 1, fast.stderr
    assert "secret" not in fast.stderr
