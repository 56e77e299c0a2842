"""The benchmarks' quick mode runs in CI so they cannot rot. Timings are
not asserted here: they belong in docs/benchmarks.md."""

import json
import os
import subprocess
import sys

import pytest

from conftest import BASE_URLS, REPO_ROOT, SESSION_DB, _admin

# A database of this test session's own, not the one a benchmark run beside
# the suite drops and creates (benchmarks/procs.py).
BENCH_DB = SESSION_DB + "_bench"
BENCH_ENV = dict(os.environ, SHIFTCHANGE_BENCH_DB=BENCH_DB)


def bench_env(tmp_path) -> dict:
    """Their work directories under tmp_path, not the shared temp directory,
    which test_security checks stays free of anything of ours."""
    return dict(BENCH_ENV, TMPDIR=str(tmp_path))


@pytest.fixture(scope="module", autouse=True)
def _drop_the_bench_database():
    yield
    try:
        _admin(BASE_URLS["postgresql"], f"DROP DATABASE IF EXISTS {BENCH_DB} WITH (FORCE)")
    except Exception:
        pass  # best effort: PostgreSQL may be down, the next run with this pid drops it first

pytestmark = pytest.mark.slow


@pytest.mark.timeout(290)  # ~40 s on a quiet machine; the subprocess has its own bound
def test_the_quick_benchmarks_run_and_print_one_json_line_per_measurement(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "run", "--quick", "--db", "sqlite,postgresql"],
        capture_output=True, text=True, timeout=300, cwd=REPO_ROOT, env=bench_env(tmp_path),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line) for line in done.stdout.splitlines()]
    measured = {(r["measurement"], r["db"]) for r in results}
    for db in ("sqlite", "postgresql"):
        for name in ("handoff_commit", "takeover", "crash_recovery", "throughput",
                     "claim_latency_vs_finished_jobs", "enqueue_rate", "idle_statements_per_second", "footprint",
                     "rolling_deploy"):
            assert (name, db) in measured
    assert all(r["overlapping_runs"] == 0 for r in results if "overlapping_runs" in r)


@pytest.mark.timeout(290)
def test_the_issue_11_benchmarks_run_small_and_print_json(tmp_path):
    """benchmarks.under_load, bulk_enqueue, cli_startup, sqlite_durability, wakeups."""
    commands = [
        ["benchmarks.under_load", "--db", "sqlite", "--jobs", "2", "--runs", "1", "--seconds", "1",
         "--scheduling", "normal,idle"],
        ["benchmarks.bulk_enqueue", "--db", "sqlite", "--jobs", "300", "--cli"],
        ["benchmarks.cli_startup", "--db", "sqlite", "--runs", "1"],
        ["benchmarks.sqlite_durability", "--commits", "5", "--rounds", "1"],
        ["benchmarks.wakeups", "--spinners", "2", "--samples", "3"],
    ]
    for command in commands:
        done = subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True, timeout=250,
                              cwd=REPO_ROOT, env=bench_env(tmp_path))
        assert done.returncode == 0, done.stderr[-3000:]
        results = [json.loads(line) for line in done.stdout.splitlines()]
        assert results and all("measurement" in r for r in results), done.stdout
