"""The first deploy on an empty database (issue 10.1): four `shiftchange
run` replicas and a `status` health check started at the same moment all
come up, on SQLite, PostgreSQL and MariaDB, round after round. Creating the
schema is serialized by the schema lock; whoever loses the race waits and
goes on."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import drop_shiftchange_tables
from harness import FAST, merge, wait_for

from supervisor import Queue
from supervisor.errors import SchemaMissing

pytestmark = pytest.mark.slow

TESTS = Path(__file__).parent
REPLICAS = 4
ROUNDS = 3


def env() -> dict:
    out = {k: v for k, v in os.environ.items() if not k.startswith("SHIFTCHANGE_")}
    out.pop("NOTIFY_SOCKET", None)
    out["PYTHONPATH"] = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    return out


def running_servers(url) -> int:
    try:
        with Queue(url, create=False) as q:
            return len(q.storage.servers(states=("running",)))
    except SchemaMissing:
        return 0


def start_together(workdir: Path, config: Path) -> tuple[list, subprocess.Popen]:
    """The replicas and the status check, spawned back to back."""
    base = [sys.executable, "-m", "supervisor"]
    runs = [
        subprocess.Popen([*base, "run", "--config", str(config), "--name", f"r{i}"],
                         stdout=subprocess.DEVNULL, stderr=open(workdir / f"r{i}.log", "w"),
                         env=env(), cwd=workdir, start_new_session=True)
        for i in range(REPLICAS)
    ]
    status = subprocess.Popen([*base, "status", "--config", str(config), "--json"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env(), cwd=workdir)
    return runs, status


def test_replicas_and_a_health_check_start_together_on_an_empty_database(db_url, tmp_path):
    for round_ in range(ROUNDS):
        workdir = tmp_path / f"round{round_}"
        workdir.mkdir()
        url = db_url
        if db_url.startswith("sqlite"):
            url = f"sqlite:///{workdir / 'queue.db'}"  # a new, absent file each round
        else:
            drop_shiftchange_tables(url)
        config = workdir / "shiftchange.yaml"
        config.write_text(yaml.safe_dump(merge(FAST, {"database": {"url": url, "retry_for": "30s"}})))
        runs, status = start_together(workdir, config)
        try:
            out, err = status.communicate(timeout=60)
            # A health check that came before the schema says so; never an
            # outage, never a traceback; once the schema exists it reads.
            assert status.returncode == 0 or (
                status.returncode == 1 and ("no shiftchange schema" in err or "no database at" in err)
            ), err
            assert "Traceback" not in err and "cannot reach" not in err, err
            wait_for(lambda: running_servers(url) == REPLICAS, timeout=60,
                     what=f"{REPLICAS} replicas running (round {round_}): " +
                     " | ".join((workdir / f"r{i}.log").read_text()[-500:] for i in range(REPLICAS)))
            for i, proc in enumerate(runs):
                log = (workdir / f"r{i}.log").read_text()
                assert proc.poll() is None, log
                for bad in ("Traceback", "retrying", "cannot reach", "error"):
                    assert bad not in log, log
            after = subprocess.run([sys.executable, "-m", "supervisor", "status", "--config", str(config)],
                                   capture_output=True, text=True, timeout=60, env=env(), cwd=workdir)
            assert after.returncode == 0, after.stderr
        finally:
            for proc in runs:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)
            for i, proc in enumerate(runs):
                try:
                    assert proc.wait(30) == 0, (workdir / f"r{i}.log").read_text()
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    raise
