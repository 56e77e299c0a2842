"""The `shiftchange` command: every command, its exit codes, and the exact
JSON field names that scripts depend on, on SQLite and PostgreSQL.

Most calls run in-process (typer's CliRunner, exceptions not caught, so a
traceback fails the test); the ones about what a user sees on a terminal
(stdout holding only the id, no traceback, a masked password) run the real
`python -m supervisor` in a subprocess. Live supervisors (`run`, `handoff`
of a running one) are tested end to end elsewhere.
"""

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime

import pytest
from sqlalchemy import update
from typer.testing import CliRunner

from supervisor import Queue
from supervisor.cli import app
from supervisor.database import head_revision, mask_url
from supervisor.tables import servers

# --- running the command ----------------------------------------------------------


@dataclass
class Ran:
    code: int
    out: str
    err: str


pytestmark = pytest.mark.usefixtures("cli_in_empty_dir")


def cli(*args: str) -> Ran:
    """In-process: fast, and any unexpected exception propagates."""
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    return Ran(result.exit_code, result.stdout, result.stderr)


def shiftchange(*args: str, env: dict | None = None) -> Ran:
    """The real thing, as a user or a deploy script runs it."""
    done = subprocess.run(
        [sys.executable, "-m", "supervisor", *args],
        capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})},
    )
    return Ran(done.returncode, done.stdout, done.stderr)


def ok_json(*args: str):
    ran = cli(*args, "--json")
    assert ran.code == 0, ran.err
    return json.loads(ran.out)


def assert_one_line_error(ran: Ran, code: int, *words: str) -> None:
    """An expected error: its exit code, one clear line, no traceback."""
    assert ran.code == code, (ran.out, ran.err)
    lines = ran.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shiftchange: error: "), ran.err
    assert "Traceback" not in ran.out + ran.err
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture
def no_schema(e2e_db_url, tmp_path):
    """An empty database named by ./shiftchange.yaml; yields its URL."""
    (tmp_path / "shiftchange.yaml").write_text(f"database:\n  url: {e2e_db_url}\n")
    return e2e_db_url


@pytest.fixture
def db(no_schema):
    """An empty queue (the schema and no job) named by ./shiftchange.yaml."""
    Queue(no_schema).close()
    return no_schema


def enqueue(*args: str) -> int:
    ran = cli("enqueue", *args)
    assert ran.code == 0, ran.err
    return int(ran.out)


# --- the JSON contract ------------------------------------------------------------

ISO_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")


def iso(value) -> bool:
    return isinstance(value, str) and bool(ISO_UTC.match(value)) and bool(datetime.fromisoformat(value))


def maybe(check):
    return lambda value: value is None or check(value)


def of(*types):
    return lambda value: isinstance(value, types) and not isinstance(value, bool)


JOB_STATES = {"enqueued", "scheduled", "processing", "succeeded", "failed"}
JOB = {
    "id": of(int), "state": lambda v: v in JOB_STATES, "queue": of(str), "target": of(str),
    "args": of(list), "kwargs": of(dict), "priority": of(int), "attempts": of(int),
    "interruptions": of(int), "server": maybe(of(str)), "created_at": iso,
    "started_at": maybe(iso), "finished_at": maybe(iso), "error": maybe(of(str)),
}
EVENT = {"at": iso, "kind": of(str), "server": maybe(of(str)), "detail": maybe(of(str))}
SERVER = {
    "id": of(str), "name": of(str), "host": of(str), "pid": of(int), "state": of(str),
    "started_at": iso, "heartbeat_at": iso,
    "jobs": lambda v: isinstance(v, list) and all(of(int)(i) for i in v),
}


def check(record: dict, schema: dict) -> None:
    """Every contract field is there, with a value of the right kind."""
    missing = set(schema) - set(record)
    assert not missing, f"missing fields {missing} in {record}"
    for key, valid in schema.items():
        assert valid(record[key]), f"{key} = {record[key]!r} in {record}"


def check_status(data: dict) -> None:
    assert set(data) >= {"servers", "counts", "queues"}
    for server in data["servers"]:
        check(server, SERVER)
    assert set(data["counts"]) == JOB_STATES and all(of(int)(n) for n in data["counts"].values())
    for by_state in data["queues"].values():
        assert set(by_state) <= JOB_STATES and all(of(int)(n) for n in by_state.values())


# --- help -------------------------------------------------------------------------

COMMANDS = [["run"], ["enqueue"], ["status"], ["jobs"], ["job"], ["requeue"], ["delete"],
            ["handoff"], ["quiet"], ["reap"], ["db"], ["db", "upgrade"], ["config"], ["config", "check"]]


@pytest.mark.parametrize("command", [[], *COMMANDS], ids=lambda c: " ".join(c) or "shiftchange")
def test_help(command):
    ran = cli(*command, "--help")
    assert ran.code == 0 and "Usage:" in ran.out, ran.out + ran.err


@pytest.mark.parametrize("command", [[], *COMMANDS], ids=lambda c: " ".join(c) or "shiftchange")
def test_dash_h_is_help_and_flags_show_no_type(command):
    ran = cli(*command, "-h")
    assert ran.code == 0 and "Usage:" in ran.out, ran.out + ran.err
    assert "<bool>" not in ran.out  # a flag takes no value; do not print a type after it


def test_help_lists_every_command():
    out = cli("--help").out
    for command in {c[0] for c in COMMANDS}:
        assert re.search(rf"│ {command}\s", out), command


@pytest.mark.parametrize("command", ["status", "jobs", "job", "reap", "handoff", "config check"])
def test_read_commands_have_json(command):
    assert "--json" in cli(*command.split(), "--help").out


# --- schema ---------------------------------------------------------------------------


def test_db_upgrade_on_an_empty_database(no_schema):
    ran = cli("db", "upgrade")
    assert ran.code == 0, ran.err
    assert f"schema none -> {head_revision()}" in ran.out
    again = cli("db", "upgrade")  # nothing left to do, still fine
    assert again.code == 0 and f"schema {head_revision()} -> {head_revision()}" in again.out


# --- producing and reading jobs ----------------------------------------------------


def test_enqueue_prints_only_the_id_and_job_shows_it(db):
    ran = shiftchange("enqueue", "app.reports:build", "--args", "[2026]", "--kwargs", '{"region": "eu"}',
                      "--queue", "reports", "--priority", "5", "--max-attempts", "2")
    assert ran.code == 0, ran.err
    assert re.fullmatch(r"\d+\n", ran.out), repr(ran.out)
    job_id = int(ran.out)

    job = ok_json("job", str(job_id))
    check(job, JOB)
    assert (job["id"], job["state"], job["queue"], job["target"], job["args"], job["kwargs"]) == (
        job_id, "enqueued", "reports", "app.reports:build", [2026], {"region": "eu"})
    assert (job["priority"], job["max_attempts"], job["attempts"], job["server"]) == (5, 2, 0, None)
    assert job["started_at"] is None and job["finished_at"] is None and job["error"] is None
    assert [e["kind"] for e in job["events"]] == ["enqueued"]
    for event in job["events"]:
        check(event, EVENT)

    human = cli("job", str(job_id))
    assert human.code == 0
    head = human.out.split("events:")[0].splitlines()
    fields = {key.strip(): value for key, value in (line.split(": ", 1) for line in head)}
    assert {k: fields[k] for k in ("id", "state", "target", "priority", "attempts", "server", "run_at", "checkpoint")} == {
        "id": str(job_id), "state": "enqueued", "target": "app.reports:build", "priority": "5",
        "attempts": "0 of 2", "server": "-", "run_at": job["run_at"], "checkpoint": "-"}
    assert "None" not in human.out and "null" not in human.out  # one style for "nothing"


def test_enqueue_a_command(db):
    job = ok_json("job", str(enqueue("--command", "--", "echo", "hi")))
    check(job, JOB)
    assert (job["kind"], job["target"], job["args"]) == ("command", "echo", ["hi"])


def test_enqueue_later(db):
    later = ok_json("job", str(enqueue("app.tasks:work", "--at", "+1h")))
    at_time = ok_json("job", str(enqueue("app.tasks:work", "--at", "2099-01-01T00:00:00Z")))
    assert later["state"] == at_time["state"] == "scheduled"
    assert at_time["run_at"].startswith("2099-01-01T00:00:00")


def test_jobs_lists_and_filters(db):
    first = enqueue("app.tasks:a")
    second = enqueue("app.tasks:b", "--queue", "other")
    third = enqueue("app.tasks:c", "--at", "+1h")

    listed = ok_json("jobs")
    for job in listed:
        check(job, JOB)
        assert "events" not in job
    assert [job["id"] for job in listed] == [third, second, first]  # newest first
    assert [job["id"] for job in ok_json("jobs", "--queue", "other")] == [second]
    assert [job["id"] for job in ok_json("jobs", "--state", "scheduled")] == [third]
    assert [job["id"] for job in ok_json("jobs", "--limit", "1")] == [third]

    table = cli("jobs")
    assert table.code == 0 and "app.tasks:b" in table.out


def test_status(db):
    job_id = enqueue("app.tasks:work")
    enqueue("app.tasks:work", "--queue", "other")
    with Queue(db) as queue:
        server_id = queue.storage.register_server(
            name="worker-1", host="elsewhere", pid=4242, pid_started_at=None,
            queues=["default"], concurrency=2, dead_after=10.0,
        )
        queue.storage.claim(server_id, ["default"], 1)

    data = ok_json("status")
    check_status(data)
    (server,) = data["servers"]
    assert (server["id"], server["name"], server["host"], server["pid"], server["state"], server["jobs"]) == (
        server_id, "worker-1", "elsewhere", 4242, "running", [job_id])
    assert data["counts"] == {"enqueued": 1, "scheduled": 0, "processing": 1, "succeeded": 0, "failed": 0}
    assert data["queues"]["default"]["processing"] == 1 and data["queues"]["other"]["enqueued"] == 1
    assert ok_json("job", str(job_id))["server"] == server_id

    table = cli("status")
    assert table.code == 0 and "worker-1" in table.out
    assert server_id not in table.out  # ids are for --json; people read names
    jobs_table = cli("jobs")
    assert "worker-1" in jobs_table.out and server_id not in jobs_table.out
    assert ok_json("jobs")[-1]["server_name"] == "worker-1"


def test_status_lists_live_servers_and_counts_the_rest(db):
    with Queue(db) as queue:
        ids = {}
        for name in ("old-1", "old-2", "web-1"):
            ids[name] = queue.storage.register_server(
                name=name, host="h", pid=1, pid_started_at=None, queues=["default"], concurrency=1, dead_after=10.0)
        queue.storage.handoff([ids["old-1"], ids["old-2"]], 0, "test")
        queue.storage.release_handoff(ids["old-1"], [])
        queue.storage.release_handoff(ids["old-2"], [])
    table = cli("status")
    assert "web-1" in table.out and "old-1" not in table.out
    assert "not shown: 2 stopped (--all lists them)" in table.out
    every = cli("status", "--all")
    assert "old-1" in every.out and "old-2" in every.out
    assert len(ok_json("status")["servers"]) == 3  # --json stays whole


def test_the_jobs_table_header_and_the_error_of_a_retried_job(db):
    with Queue(db) as queue:
        sid = queue.storage.register_server(
            name="web-1", host="h", pid=1, pid_started_at=None, queues=["default"], concurrency=1, dead_after=10.0)
        job = queue.enqueue("app.tasks:work", max_attempts=3)
        (claimed,) = queue.storage.claim(sid, ["default"], 1)
        queue.storage.fail(claimed.id, claimed.lease, sid, "Traceback...\nValueError: boom", retry_backoff=0)
    header = cli("jobs").out.splitlines()
    assert any(line.split() == ["id", "state", "queue", "target", "tries", "intr", "server", "error"]
               for line in (h.replace("┃", " ").replace("│", " ") for h in header))
    shown = cli("job", str(job.id)).out
    assert "last attempt's error:\nTraceback...\nValueError: boom" in shown


def test_status_on_an_empty_queue_lists_every_state(db):
    data = ok_json("status")
    check_status(data)
    assert data == {"servers": [], "counts": dict.fromkeys(JOB_STATES, 0), "queues": {},
                    "database": mask_url(db), "paused": []}


def test_job_that_does_not_exist(db):
    ran = shiftchange("job", "999")
    assert_one_line_error(ran, 1, "no job with id 999")
    assert ran.out == ""


# --- operator actions -------------------------------------------------------------


def test_requeue_several(db):
    ids = [enqueue("app.tasks:work", "--at", "+1h") for _ in range(3)]
    ran = cli("requeue", str(ids[0]), str(ids[2]))
    assert ran.code == 0 and ran.out.splitlines() == [f"requeued job {ids[0]}", f"requeued job {ids[2]}"]
    states = {job["id"]: job["state"] for job in ok_json("jobs")}
    assert states == {ids[0]: "enqueued", ids[1]: "scheduled", ids[2]: "enqueued"}
    assert ok_json("job", str(ids[0]))["events"][-1]["kind"] == "requeued"
    assert_one_line_error(cli("requeue", "999"), 1, "no job with id 999")


def test_delete_several(db):
    ids = [enqueue("app.tasks:work") for _ in range(3)]
    ran = cli("delete", str(ids[0]), str(ids[1]))
    assert ran.code == 0 and ran.out.splitlines() == [f"deleted job {ids[0]}", f"deleted job {ids[1]}"]
    assert [job["id"] for job in ok_json("jobs")] == [ids[2]]
    assert_one_line_error(cli("delete", str(ids[0])), 1, f"no job with id {ids[0]}")


def test_reap(db):
    assert ok_json("reap") == {"requeued": [], "failed": []}
    job_id = enqueue("app.tasks:work")
    with Queue(db) as queue:
        server_id = queue.storage.register_server(
            name="gone", host="elsewhere", pid=4242, pid_started_at=None,
            queues=["default"], concurrency=1, dead_after=10.0,
        )
        queue.storage.claim(server_id, ["default"], 1)
        with queue.engine.begin() as conn:  # it stopped heartbeating a minute ago
            conn.execute(update(servers).where(servers.c.id == server_id)
                         .values(heartbeat_at=servers.c.heartbeat_at - 60))
    assert ok_json("reap") == {"requeued": [job_id], "failed": []}
    job = ok_json("job", str(job_id))
    assert (job["state"], job["server"], job["interruptions"]) == ("enqueued", None, 1)
    assert ok_json("status")["servers"][0]["state"] == "dead"
    assert cli("reap").out.strip() == "requeued 0 jobs"


def test_handoff_with_no_server_on_this_host(db):
    ran = cli("handoff")
    assert ran.code == 0 and "no running server" in ran.out and "nothing to hand off" in ran.out
    assert ok_json("handoff") == []


def test_handoff_of_a_server_on_another_host(db):
    """Named explicitly, a server elsewhere has its jobs requeued (held) at
    once; no process is signalled since it does not run here."""
    job_id = enqueue("app.tasks:work")
    with Queue(db) as queue:
        server_id = queue.storage.register_server(
            name="far", host="elsewhere", pid=4242, pid_started_at=None,
            queues=["default"], concurrency=1, dead_after=10.0,
        )
        queue.storage.claim(server_id, ["default"], 1)
    (report,) = ok_json("handoff", "--server", "far")
    assert (report["id"], report["name"], report["jobs"]) == (server_id, "far", [job_id])
    job = ok_json("job", str(job_id))
    assert (job["state"], job["server"], job["interruptions"]) == ("enqueued", None, 1)


# --- mistakes: exit 2, one line, no traceback ----------------------------------------


@pytest.mark.parametrize("args, words", [
    (["enqueue", "app.tasks:work", "--args", "[1"], ["--args is not valid JSON"]),
    (["enqueue", "app.tasks:work", "--args", '{"a": 1}'], ["--args must be a JSON array"]),
    (["enqueue", "app.tasks:work", "--kwargs", "[1]"], ["--kwargs must be a JSON object"]),
    (["enqueue", "not a target"], []),
    (["enqueue", "app.tasks:work", "--at", "someday"], ["--at"]),
    (["enqueue", "app.tasks:work", "--at", "+soon"], ["--at"]),
    (["enqueue", "app.tasks:work", "--queue", "bad queue"], ["queue name"]),
    (["enqueue", "--command", "--args", "[1]", "--", "echo"], ["--args"]),
    (["jobs", "--state", "lost"], ["--state 'lost'"]),
])
def test_usage_errors(args, words):
    assert_one_line_error(cli(*args), 2, *words)


@pytest.mark.parametrize("args", [["jobs", "--limit", "0"], ["job", "abc"], ["requeue"], ["nonsense"]])
def test_bad_arguments_exit_2(args):
    assert cli(*args).code == 2


def test_bad_json_in_args_through_the_real_command():
    assert_one_line_error(shiftchange("enqueue", "app.tasks:work", "--args", "not json"), 2, "--args")


def test_a_bad_config_file_names_the_key_and_the_line(tmp_path):
    (tmp_path / "shiftchange.yaml").write_text("server:\n  name: x\n  heartbeat_intervall: 1s\n")
    ran = shiftchange("status")
    assert_one_line_error(ran, 2, "shiftchange.yaml:3", "server.heartbeat_intervall",
                          "did you mean server.heartbeat_interval?")
    assert_one_line_error(cli("config", "check"), 2, "shiftchange.yaml:3")


def test_a_missing_config_file(tmp_path):
    assert_one_line_error(cli("status", "--config", str(tmp_path / "nope.yaml")), 2, "does not exist")


# --- config check ----------------------------------------------------------------------


def test_config_check_masks_the_password(tmp_path):
    (tmp_path / "shiftchange.yaml").write_text(
        "database:\n  url: postgresql://u:secret@h/db\nserver:\n  name: web-1\n  dead_after: 30s\n")
    text = shiftchange("config", "check")
    assert text.code == 0, text.err
    assert "secret" not in text.out + text.err and "postgresql://u:***@h/db" in text.out
    assert "web-1" in text.out and "shiftchange.yaml" in text.out

    as_json = shiftchange("config", "check", "--json", env={"SHIFTCHANGE_DATABASE_URL": "mysql://v:secret@m/q"})
    assert as_json.code == 0, as_json.err
    assert "secret" not in as_json.out + as_json.err
    data = json.loads(as_json.out)
    assert data["config"]["database"]["url"] == "mysql://v:***@m/q"
    assert data["config"]["server"]["dead_after"] == 30 and data["source"] == "shiftchange.yaml"


def test_config_check_without_a_file_shows_the_defaults():
    data = ok_json("config", "check")
    assert data["source"] is None and data["config"]["database"]["url"] == "sqlite:///shiftchange.db"
    assert set(data["config"]) == {"database", "server", "shutdown", "jobs", "log", "dashboard", "recurring"}


def test_an_unreachable_database_is_a_runtime_failure(tmp_path):
    (tmp_path / "shiftchange.yaml").write_text("database:\n  url: postgresql://u:secret@127.0.0.1:1/db\n")
    ran = shiftchange("status")
    assert_one_line_error(ran, 1, "cannot reach the database")
    assert "secret" not in ran.out + ran.err


def test_run_refuses_a_bad_queue_name_before_starting(tmp_path):
    # Should the check ever go, `run` fails fast on this database instead of serving.
    (tmp_path / "shiftchange.yaml").write_text("database:\n  url: postgresql://127.0.0.1:1/x\n  retry_for: 0s\n")
    assert_one_line_error(cli("run", "--queue", "bad queue"), 2, "server.queues")
