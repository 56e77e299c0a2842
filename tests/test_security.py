"""Security: what may run, what never leaks, what is created on disk, and
what `shiftchange handoff` may signal. See docs/security.md for the model
these tests hold the code to.
"""

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import yaml
from harness import clean_env, shiftchange, wait_for
from sqlalchemy import insert, inspect
from sqlalchemy.engine import make_url

from supervisor import Queue
from supervisor.processes import start_time
from supervisor.tables import jobs

pytestmark = pytest.mark.slow

TESTS = Path(__file__).parent
SECRET = "Secret123"  # part of every password below; must never be printed






def insert_row(engine, target, args=(), kind="callable", **values):
    """A job row written straight into the table, past every check that
    enqueue makes: what someone with write access to the table can do."""
    row = dict(
        queue="default", kind=kind, target=target, args=json.dumps(list(args)), kwargs="{}",
        priority=0, state="enqueued", run_at=0, attempts=0, max_attempts=1, interruptions=0,
        max_interruptions=10, lease=0, created_at=time.time(),
    )
    row.update(values)
    with engine.begin() as conn:
        return conn.execute(insert(jobs).values(**row)).inserted_primary_key[0]


# --- only allowed targets are ever imported -----------------------------------------------


def test_rows_written_straight_into_the_table_run_only_allowed_targets(e2e_db_url, supervisors, tmp_path, monkeypatch):
    marks = tmp_path / "marks"
    marks.mkdir()
    modules = tmp_path / "modules"
    modules.mkdir()
    # Modules whose import alone leaves a mark: a refused job must never import them.
    for name in ("faultjobs_evil", "scevil_allowed"):
        (modules / f"{name}.py").write_text(
            "from pathlib import Path\n"
            f"Path({str(marks / (name + '.imported'))!r}).write_text('imported')\n"
            "def run(*args, **kwargs):\n    pass\n"
        )
    monkeypatch.setenv("PYTHONPATH", str(modules))  # the supervisor's children can import them
    sup = supervisors(e2e_db_url, "s1", jobs={
        "allow": ["faultjobs:*", "scevil_allowed:*"], "allow_commands": ["true"], "max_attempts": 1,
    })
    with Queue(e2e_db_url) as queue:
        sup.wait_registered(queue)
        touch = f"touch {marks / 'ran'}"
        refused = {
            insert_row(queue.engine, "os:system", [touch]): "not allowed by jobs.allow",
            insert_row(queue.engine, "faultjobs_evil:run"): "not allowed by jobs.allow",
            # An allowed module cannot be walked through to what it imported.
            insert_row(queue.engine, "faultjobs:os.system", [touch]): "names a module",
            insert_row(queue.engine, "faultjobs:subprocess.run", [["touch", str(marks / "ran")]]): "names a module",
            # Private and dunder segments are refused before anything is imported.
            insert_row(queue.engine, "scevil_allowed:__init__"): "package.module:function",
            insert_row(queue.engine, "faultjobs:__builtins__.exec", [f"open({str(marks / 'ran')!r}, 'w')"]):
                "package.module:function",
            insert_row(queue.engine, "os:system'); DROP TABLE shiftchange_jobs; --", [touch]):
                "package.module:function",
            insert_row(queue.engine, "/bin/sh", ["-c", touch], kind="command"): "not in jobs.allow_commands",
            insert_row(queue.engine, "sh", ["-c", touch], kind="command"): "not in jobs.allow_commands",
        }
        allowed_command = insert_row(queue.engine, "true", kind="command")
        allowed_call = insert_row(queue.engine, "faultjobs:record_args", [str(marks / "allowed.json"), 1])
        for job_id, words in refused.items():
            wait_for(lambda job_id=job_id: queue.get(job_id).state in ("failed", "succeeded"), what=f"job {job_id} to end")
            job = queue.get(job_id)
            assert job.state == "failed" and words in job.error, (job.target, job.error)
        for job_id in (allowed_command, allowed_call):  # the same path does run what is allowed
            wait_for(lambda job_id=job_id: queue.get(job_id).state == "succeeded", what=f"allowed job {job_id}")
        assert sorted(os.listdir(marks)) == ["allowed.json"]  # nothing else ran or was imported
        assert "shiftchange_jobs" in inspect(queue.engine).get_table_names()
        assert sup.proc.poll() is None


# --- passwords never leak -----------------------------------------------------------------

LEAKY_URLS = {
    "postgresql": "postgresql://scuser:TopSecret123@127.0.0.1:1/db",
    "mysql": "mysql://scuser:TopSecret123@127.0.0.1:1/db",
    "encoded": "postgresql://scuser:Top%40Secret123%3A@127.0.0.1:1/db",  # "Top@Secret123:"
    "bad-port": "postgresql://scuser:TopSecret123@127.0.0.1:notaport/db",
}
COMMANDS = [
    ["run"], ["status"], ["status", "--json"], ["config", "check"], ["config", "check", "--json"],
    ["enqueue", "app.tasks:run"], ["db", "upgrade"], ["handoff"], ["handoff", "--json"],
    ["reap"], ["jobs"], ["jobs", "--json"], ["job", "1"], ["requeue", "1"], ["delete", "1"],
]


def test_database_passwords_never_appear_in_output_errors_or_tracebacks(tmp_path):
    matrix = [("postgresql", "file", "text", COMMANDS), ("postgresql", "env", "text", [["run"], ["status"]])]
    for kind in LEAKY_URLS:
        matrix.append((kind, "file", "json", [["run"]]))  # only `run` logs
        if kind != "postgresql":  # the same paths, other error texts
            matrix.append((kind, "file", "text", [["run"], ["status"], ["config", "check"]]))
    cases = []
    for kind, source, log_format, commands in matrix:
        url = LEAKY_URLS[kind]
        work = tmp_path / f"{kind}-{log_format}-{source}"
        work.mkdir()
        config = {"database": {"retry_for": "3s"}, "log": {"format": log_format}}
        if source == "file":
            config["database"]["url"] = url
        (work / "shiftchange.yaml").write_text(yaml.safe_dump(config))
        env = clean_env(SHIFTCHANGE_DATABASE_URL=url) if source == "env" else clean_env()
        cases += [(kind, source, log_format, command, work, env) for command in commands]

    def run(case):
        _, _, _, command, work, env = case
        return case, shiftchange(*command, cwd=work, env=env, timeout=60)

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(run, cases))
    for (kind, source, log_format, command, _, _), ran in results:
        what = f"{kind} url from {source}, {log_format} logs: shiftchange {' '.join(command)}"
        output = ran.stdout + ran.stderr
        assert SECRET not in output, f"{what} printed the password:\n{output}"
        assert "Traceback" not in output, f"{what} printed a traceback:\n{output}"
        if command[0] == "config":
            assert ran.returncode == 0 and "***" in ran.stdout, (what, output)
        else:
            assert ran.returncode in (1, 2) and "shiftchange: error: " in ran.stderr, (what, output)
            if kind != "bad-port":
                assert "cannot reach the database" in ran.stderr and "***" in ran.stderr, (what, output)
        if command == ["run"] and kind != "bad-port":
            assert "retrying in" in ran.stderr, (what, output)  # the log lines were checked too


def test_a_password_in_a_live_database_url_is_never_printed(postgres_url, supervisors, tmp_path):
    url = make_url(postgres_url).set(password="TopSecret123").render_as_string(hide_password=False)
    assert SECRET in url
    try:
        Queue(url).close()
    except Exception as exc:  # the server checks passwords: nothing below can connect
        pytest.skip(f"PostgreSQL refuses the test password: {exc}")
    sup = supervisors(url, "s1", log={"format": "json"}, jobs={"allow": ["scjobs:*"], "max_attempts": 1})
    work = tmp_path / "work"
    work.mkdir()
    (work / "shiftchange.yaml").write_text(yaml.safe_dump({"database": {"url": url}}))
    outputs = []

    def sc(*args):
        ran = shiftchange(*args, cwd=work)
        outputs.append((args, ran.stdout + ran.stderr))
        return ran

    with Queue(url) as queue:
        sup.wait_registered(queue)
        failing = int(sc("enqueue", "scjobs:raise_error").stdout)
        running = int(sc("enqueue", "scjobs:spin", "--args", json.dumps([str(tmp_path)])).stdout)
        wait_for(lambda: queue.get(failing).state == "failed", what="the failing job")
        wait_for(lambda: queue.get(running).state == "processing", what="the spinning job")
        for args in (["status"], ["status", "--json"], ["jobs"], ["job", str(failing)], ["reap"],
                     ["db", "upgrade"], ["config", "check"], ["config", "check", "--json"]):
            assert sc(*args).returncode == 0, outputs[-1]
        # Reap it as soon as it exits, as its parent would in production:
        # `handoff` waits for the pid to be gone, and a zombie is not gone.
        threading.Thread(target=sup.proc.wait, daemon=True).start()
        assert sc("handoff", "--server", "s1").returncode == 0, outputs[-1]
        assert sup.wait(timeout=20) == 0
        assert queue.get(running).state == "enqueued"
        assert SECRET not in (queue.get(failing).error or "")
    outputs.append((["run"], sup.log()))  # its stdout and stderr
    assert any('"event": "handed_off"' in out for _, out in outputs[-1:])  # it did log in JSON
    for args, out in outputs:
        assert SECRET not in out, f"shiftchange {' '.join(args)} printed the password:\n{out}"
        if args[0] != "job":  # `job ID` shows the job's own traceback, as it should
            assert "Traceback" not in out, out


# --- files -------------------------------------------------------------------------------


def _modes(directory: Path) -> dict[str, int]:
    modes = {}
    for name in os.listdir(directory):
        try:
            modes[name] = stat.S_IMODE(os.stat(directory / name).st_mode)
        except FileNotFoundError:  # -wal/-shm come and go with connections
            pass
    return modes


# Names shiftchange could plausibly create. The demo (`shiftchange demo`, not
# run here) uses tempfile's shiftchange-demo-*; other tests may run it now.
OURS = re.compile(r"(shiftchange|\.db(-wal|-shm|-journal)?$|\.pid$|\.sock$|\.lock$)")


def _ours_in(directory: str) -> set[str]:
    return {n for n in os.listdir(directory) if OURS.search(n) and not n.startswith("shiftchange-demo-")}


def test_by_default_the_only_file_is_a_private_sqlite_database_and_nothing_lands_in_tmp(tmp_path):
    work, scratch, logs = tmp_path / "work", tmp_path / "tmpdir", tmp_path / "logs"
    for d in (work, scratch, logs):
        d.mkdir()
    tmp_before = _ours_in(tempfile.gettempdir())
    env = clean_env(TMPDIR=str(scratch))  # where tempfile would write: must stay empty
    # umask 0: the file's mode must come from shiftchange, not from the umask.
    ran = shiftchange("enqueue", "scjobs:quick", cwd=work, env=env, umask=0)
    assert ran.returncode == 0, ran.stderr
    assert _modes(work) == {"shiftchange.db": 0o600}
    with open(logs / "run.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "supervisor", "run"], cwd=work, env=env,
                                stdout=log, stderr=subprocess.STDOUT, umask=0, start_new_session=True)
    try:
        with Queue(f"sqlite:///{work / 'shiftchange.db'}") as queue:
            wait_for(lambda: any(s.pid == proc.pid and s.state == "running" for s in queue.servers()),
                     what="the default supervisor to register")
            # Nothing is allowed by default: the job is refused, not run.
            wait_for(lambda: queue.get(1).state == "failed", what="the job to be refused")
            assert "not allowed by jobs.allow" in queue.get(1).error
            assert set(_modes(work).values()) == {0o600}, _modes(work)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, (logs / "run.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    modes = _modes(work)
    assert set(modes) <= {"shiftchange.db", "shiftchange.db-wal", "shiftchange.db-shm"}, modes
    assert set(modes.values()) == {0o600}, modes
    assert os.listdir(scratch) == []
    assert _ours_in(tempfile.gettempdir()) - tmp_before == set()


# --- handoff never signals a recycled pid -------------------------------------------------


@pytest.fixture
def bystander():
    """An unrelated live process (reaped by a thread as soon as it exits,
    so that it never lingers as a zombie)."""
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    threading.Thread(target=proc.wait, daemon=True).start()
    yield proc
    if proc.poll() is None:
        proc.kill()


@pytest.mark.parametrize("start_matches", [False, True], ids=["recycled-pid", "same-process"])
def test_handoff_signals_only_the_process_that_registered(e2e_db_url, tmp_path, bystander, start_matches):
    started = start_time(bystander.pid)
    assert started is not None
    with Queue(e2e_db_url) as queue:
        server_id = queue.storage.register_server(
            name="recycled", host=socket.gethostname(), pid=bystander.pid,
            pid_started_at=started if start_matches else started - 1000.0,
            queues=["default"], concurrency=1, dead_after=30.0,
        )
        job = queue.enqueue("app.tasks:work")
        (claimed,) = queue.storage.claim(server_id, ["default"], 1)
        assert claimed.id == job.id
        (tmp_path / "shiftchange.yaml").write_text(yaml.safe_dump({"database": {"url": e2e_db_url}}))
        ran = shiftchange("handoff", "--server", "recycled", "--timeout", "5", "--json", cwd=tmp_path)
        assert ran.returncode == 0, ran.stderr
        (report,) = json.loads(ran.stdout)
        assert report["id"] == server_id and report["jobs"] == [job.id]
        got = queue.get(job.id)
        assert (got.state, got.interruptions) == ("enqueued", 1)
        assert "handed_off" in [e.kind for e in got.events]
        assert {s.id: s.state for s in queue.servers()}[server_id] == "stopped"
    if start_matches:  # the control: the same call does signal the real process
        wait_for(lambda: bystander.poll() is not None, timeout=5, what="the registered process to stop")
        assert bystander.returncode == -signal.SIGTERM
    else:
        assert report["supervisor"] == f"pid {bystander.pid} is not running"
        assert bystander.poll() is None
        assert psutil.Process(bystander.pid).status() != psutil.STATUS_ZOMBIE
