"""Upgrading shiftchange itself during a rolling deploy (issue 22), for
real: the previous release, installed in a venv of its own by
.ci/install-previous-release, runs side by side with this checkout on
SQLite, PostgreSQL and MariaDB.

Old servers run jobs; a new server starts and migrates the schema; an old
server restarts on the migrated schema; an old pod's pre-stop hook (the old
CLI) hands off; jobs enqueued by both releases finish exactly as they would
have without the upgrade, judged from what the jobs themselves wrote.

Skipped when the previous release is not installed locally; CI
(SHIFTCHANGE_REQUIRE_ALL_DATABASES=1) fails instead.
"""

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from harness import Supervisor, read_lines, wait_for
from sqlalchemy import text

from supervisor import Queue, __version__
from supervisor.database import head_revision, make_engine
from supervisor.tables import COMPAT_TABLE, VERSION_TABLE

pytestmark = pytest.mark.slow

TESTS = Path(__file__).parent
REPO = TESTS.parent
OLD_VENV = Path(os.environ.get("SHIFTCHANGE_PREVIOUS_RELEASE_VENV", REPO / ".previous-release" / "venv"))
STEPS = 10
LONG_STEPS = 60  # 18 s: still running when its old server restarts or hands off
STEP_SECONDS = 0.3
SETTINGS = dict(jobs={"allow": ["upgradejobs:*"]}, server={"concurrency": 2})


@pytest.fixture
def old_release():
    """The previous release's python (its own code, not this checkout's)."""
    python = OLD_VENV / "bin" / "python"
    if not (OLD_VENV / "bin" / "shiftchange").exists():
        message = f"the previous release is not installed in {OLD_VENV}: run .ci/install-previous-release"
        if os.environ.get("SHIFTCHANGE_REQUIRE_ALL_DATABASES"):
            pytest.fail(message)
        pytest.skip(message)
    return python


def only_tests_on_path() -> dict:
    """An environment in which the old release imports its own package:
    tests/ for the job module, never this checkout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHIFTCHANGE_")}
    env.pop("NOTIFY_SOCKET", None)
    env["PYTHONPATH"] = str(TESTS)
    return env


def old_cli(old_python, config: Path, *args) -> subprocess.CompletedProcess:
    """The old release's `shiftchange`, as an old pod's hook runs it."""
    return subprocess.run(
        [str(old_python.parent / "shiftchange"), *args, "--config", str(config)],
        capture_output=True, text=True, timeout=60, env=only_tests_on_path(), cwd=config.parent,
    )


def old_api_enqueue(old_python, url, records, specs) -> list[int]:
    """Jobs enqueued through the old release's Python API, in one go:
    `specs` is a list of (queue, steps, priority)."""
    code = (
        "import json, sys\n"
        "from supervisor import Queue\n"
        "records, step_seconds, specs = json.loads(sys.argv[2])\n"
        "with Queue(sys.argv[1]) as q:\n"
        "    print(json.dumps([q.enqueue('upgradejobs:count', [records, steps, step_seconds],"
        " queue=queue, priority=priority).id for queue, steps, priority in specs]))\n"
    )
    ran = subprocess.run(
        [str(old_python), "-c", code, url, json.dumps([str(records), STEP_SECONDS, specs])],
        capture_output=True, text=True, timeout=60, env=only_tests_on_path(), cwd=records,
    )
    assert ran.returncode == 0, ran.stderr
    return json.loads(ran.stdout)


def sql(url, statement):
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(text(statement)).all()
    finally:
        engine.dispose()


def sql_write(url, statement) -> None:
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text(statement))
    finally:
        engine.dispose()


def processing_on(url, name) -> int:
    return len(processing_ids(url, name))


def processing_ids(url, name) -> set[int]:
    return {row[0] for row in sql(
        url, "SELECT j.id FROM shiftchange_jobs j JOIN shiftchange_servers s ON s.id = j.server_id"
             f" WHERE j.state = 'processing' AND s.name = '{name}' AND s.state = 'running'")}


def running(url, name) -> bool:
    return bool(sql(url, f"SELECT id FROM shiftchange_servers WHERE name = '{name}' AND state = 'running'"))


def test_a_rolling_upgrade_from_the_previous_release(db_url, tmp_path, old_release, records):
    started = []
    steps_of: dict[int, int] = {}

    def server(name, queues, python=None):
        sup = Supervisor(db_url, tmp_path, name, python=python, env=only_tests_on_path() if python else None,
                         jobs=SETTINGS["jobs"], server={"concurrency": 2, "queues": queues})
        started.append(sup)
        return sup.start()

    try:
        # The old release creates the schema, as its deploy step did (0.1.0
        # could not start several servers at once on an empty database).
        config = Supervisor(db_url, tmp_path, "old1", **SETTINGS).config_path
        created = old_cli(old_release, config, "db", "upgrade")
        assert created.returncode == 0, created.stderr
        # Each old server also serves a queue of its own, so that it surely
        # runs jobs when it is restarted or handed off.
        old1 = server("old1", ["held1", "default"], old_release)
        old2 = server("old2", ["held2", "default"], old_release)
        wait_for(lambda: running(db_url, "old1") and running(db_url, "old2"), timeout=30,
                 what="the old servers to register\n" + old1.log() + old2.log())
        assert sql(db_url, f"SELECT version_num FROM {COMPAT_TABLE}") == [("0002",)]

        specs = [["held1", LONG_STEPS, 10]] * 2 + [["held2", LONG_STEPS, 10]] * 2 + [["default", STEPS, 0]] * 4
        job_ids = old_api_enqueue(old_release, db_url, records, specs)
        steps_of.update((job_id, spec[1]) for job_id, spec in zip(job_ids, specs))
        wait_for(lambda: processing_on(db_url, "old1") == 2 and processing_on(db_url, "old2") == 2,
                 timeout=30, what="both old servers to run their long jobs\n" + old1.log() + old2.log())

        # The new release starts beside them and migrates.
        new1 = server("new1", ["held1", "held2", "default"])
        wait_for(lambda: running(db_url, "new1"), timeout=30, what="new1 to register\n" + new1.log())
        assert sql(db_url, f"SELECT version_num FROM {VERSION_TABLE}") == [(head_revision(),)]
        assert sql(db_url, f"SELECT version_num FROM {COMPAT_TABLE}") == [("0002",)]

        # An old server restarts (a crash loop, a node drain) on the new
        # schema, handing off what it runs.
        moved = processing_ids(db_url, "old2")  # what the restart must hand off
        assert moved
        old2.send(signal.SIGTERM)
        assert old2.wait() == 0, old2.log()
        old2 = server("old2", ["held2", "default"], old_release)
        wait_for(lambda: running(db_url, "old2"), timeout=30, what="old2 to come back\n" + old2.log())

        # The old release still enqueues; so does the new one.
        for _ in range(2):
            ran = old_cli(old_release, config, "enqueue", "upgradejobs:count", "--args",
                          json.dumps([str(records), STEPS, STEP_SECONDS]))
            assert ran.returncode == 0, ran.stderr
            steps_of[int(ran.stdout)] = STEPS
        with Queue(db_url) as queue:
            for _ in range(2):
                steps_of[queue.enqueue("upgradejobs:count", [str(records), STEPS, STEP_SECONDS]).id] = STEPS

        # An old pod's pre-stop hook: the old CLI hands off its server.
        assert processing_on(db_url, "old1")
        handed = old_cli(old_release, config, "handoff", "--server", "old1", "--json")
        assert handed.returncode == 0, handed.stderr
        moved |= {job_id for report in json.loads(handed.stdout) for job_id in report["jobs"]}
        assert old1.wait() == 0, old1.log()

        # The old CLI reads the new schema.
        old_status = old_cli(old_release, config, "status", "--json")
        assert old_status.returncode == 0, old_status.stderr
        assert {"new1", "old2"} <= {s["name"] for s in json.loads(old_status.stdout)["servers"]
                                    if s["state"] == "running"}

        with Queue(db_url, create=False) as queue:
            wait_for(lambda: all(queue.get(j).state == "succeeded" for j in steps_of), timeout=120,
                     what="every job to succeed\n" + "\n".join(s.log()[-2000:] for s in started))
            jobs = [queue.get(j) for j in steps_of]
            versions = {s.name: s.version for s in queue.storage.servers(states=("running",))}
        assert versions == {"new1": __version__, "old2": None}  # 0.1.0 records no version

        # Judged from the jobs' own records: each added 1..steps exactly once
        # over however many runs, never two runs at once. (A run may write
        # its result and be handed off before its outcome commits, the one
        # window docs/design.md admits; the rerun resumes at its last
        # checkpoint and writes the same result.)
        for job in jobs:
            total = steps_of[job.id] * (steps_of[job.id] + 1) // 2
            done = read_lines(records / f"job-{job.id}.done")
            assert 1 <= len(done) <= job.interruptions + 1 and {d.split()[0] for d in done} == {str(total)}, job
            assert job.attempts == 1 and job.error is None, job
            assert len(read_lines(records / f"job-{job.id}.runs")) == job.interruptions + 1, job
            if job.id in moved:  # running on an old server when it restarted or was handed off
                assert job.interruptions >= 1, job
        assert read_lines(records / "overlaps") == []
        for sup in started:
            assert "Traceback" not in sup.log(), sup.log()
    finally:
        for sup in started:
            if sup.proc.poll() is None:
                sup.send(signal.SIGTERM)
        for sup in started:
            try:
                sup.wait(20)
            finally:
                sup.destroy()


def test_an_old_server_beside_the_new_features(db_url, tmp_path, old_release, records):
    """What docs/design.md says 0.1.0 does with each column of 0003: it
    treats a quiet server as alive, ignores a paused queue, and its own
    row gets the defaults."""
    with Queue(db_url) as queue:
        quiet_id = queue.storage.register_server(
            name="quiet-new", host="elsewhere", pid=1, pid_started_at=None,
            queues=["default"], concurrency=1, dead_after=60.0)
        sql_write(db_url, f"UPDATE shiftchange_servers SET quiet = TRUE WHERE id = '{quiet_id}'")
        sql_write(db_url, "INSERT INTO shiftchange_queues (name, paused) VALUES ('default', TRUE)")
        old = Supervisor(db_url, tmp_path, "old", python=old_release, env=only_tests_on_path(), **SETTINGS)
        try:
            old.start()
            wait_for(lambda: running(db_url, "old"), timeout=30, what="old to register\n" + old.log())
            job = queue.enqueue("upgradejobs:count", [str(records), 2, 0.05])  # default queue
            wait_for(lambda: queue.get(job.id).state == "succeeded", timeout=30,
                     what="the old server to run a job of the paused queue\n" + old.log())
            reaped = old_cli(old_release, old.config_path, "reap", "--json")
            assert reaped.returncode == 0, reaped.stderr
            assert json.loads(reaped.stdout) == {"requeued": [], "failed": []}
            servers = {s.name: s for s in queue.storage.servers()}
            assert servers["quiet-new"].state == "running" and servers["quiet-new"].quiet
            assert (servers["old"].version, servers["old"].release, servers["old"].quiet) == (None, None, False)
            old.send(signal.SIGTERM)
            assert old.wait() == 0
        finally:
            old.destroy()
