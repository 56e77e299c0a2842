"""Short versions of the chaos and load runs (chaos/): real supervisors under
SIGTERM, SIGKILL, SIGSTOP, outside handoffs, a database restart and outage,
a network partition of one supervisor (PostgreSQL);
then every invariant is checked by the script itself, which exits non-zero
and lists violations on any breach. The full runs are
`python -m chaos run --seconds 90 --jobs 500` and `python -m chaos load`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chaos.cluster import PG_ADMIN_URL, ensure_pg_running, pg_cluster

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def postgres_or_skip() -> None:
    from sqlalchemy import create_engine, text

    try:
        engine = create_engine(PG_ADMIN_URL.replace("postgresql://", "postgresql+psycopg://", 1))
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
    except Exception as exc:
        message = f"PostgreSQL at {PG_ADMIN_URL} is unreachable: {str(exc).splitlines()[0]}"
        if os.environ.get("SHIFTCHANGE_REQUIRE_ALL_DATABASES"):
            pytest.fail(message)
        pytest.skip(message)


def chaos(*args: str, timeout: float, tmp_path) -> dict:
    """Run `python -m chaos ARGS`; its JSON report, asserting a clean exit.
    Its run directory goes under `tmp_path`, not the shared temp directory,
    which test_security checks stays free of anything of ours."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               TMPDIR=str(tmp_path))
    try:
        done = subprocess.run([sys.executable, "-m", "chaos", *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=timeout)
    finally:
        ensure_pg_running()  # whatever happened, the other tests need PostgreSQL
    report = json.loads(done.stdout)
    assert report["violations"] == [], json.dumps(report, indent=1) + done.stderr[-3000:]
    assert done.returncode == 0, done.stderr[-3000:]
    return report


@pytest.mark.exclusive  # it restarts PostgreSQL
@pytest.mark.timeout(240)
def test_chaos_on_postgresql_keeps_every_invariant(tmp_path):
    postgres_or_skip()
    report = chaos("run", "--db", "postgresql", "--seconds", "20", "--jobs", "60", timeout=220, tmp_path=tmp_path)
    assert sum(report["states"].values()) == 60
    assert report["states"].get("failed", 0) == report["designed_to_fail"]
    assert sum(report["actions"].values()) >= 5
    restart, black_hole, outage = report["db_faults"]
    assert black_hole["fault"] == "black_hole" and black_hole["held"] > 2.0, black_hole  # > dead_after
    assert report["completions"] >= 60  # every job's code completed at least once, by its own records
    if pg_cluster() is not None:  # the restart and the outage really happened
        assert [restart["fault"], outage["fault"]] == ["restart", "outage"]
        assert restart.get("ready") and outage.get("ready"), report["db_faults"]


@pytest.mark.timeout(240)
def test_chaos_on_sqlite_shared_by_three_supervisors_keeps_every_invariant(tmp_path):
    report = chaos("run", "--db", "sqlite", "--seconds", "20", "--jobs", "60", timeout=220, tmp_path=tmp_path)
    assert sum(report["states"].values()) == 60
    assert report["states"].get("failed", 0) == report["designed_to_fail"]
    assert [f["fault"] for f in report["db_faults"]] == ["stall", "outage"]


@pytest.mark.timeout(300)
def test_load_loses_no_job_and_runs_none_twice(tmp_path):
    postgres_or_skip()
    report = chaos("load", "--db", "postgresql", "--jobs", "2000", timeout=280, tmp_path=tmp_path)
    assert report["states"] == {"succeeded": 2000}
    assert report["claimed_twice"] == report["succeeded_twice"] == 0
