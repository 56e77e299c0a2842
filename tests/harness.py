"""Real supervisor processes for end-to-end tests, and waiting with a
deadline instead of sleeping."""

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from supervisor.database import make_engine
from supervisor.launcher import SupervisorProcess, merge, wait_for, write_config  # noqa: F401 (re-exported)

TESTS = Path(__file__).parent
FAST = {
    "server": {"heartbeat_interval": "200ms", "dead_after": "2s", "poll_interval": "50ms", "concurrency": 2},
    "shutdown": {"kill_after": "1s"},
    "jobs": {"allow": ["scjobs:*"], "retry_backoff": "100ms", "max_attempts": 2},
}


class Supervisor(SupervisorProcess):
    """A supervisor of an end-to-end test: FAST settings, tests/ importable
    by its jobs, and a memory of every process of its tree so that a test
    can check none survives."""

    def __init__(self, url: str, workdir: Path, name: str, prefix=(), env=None, python=None, **settings):
        config_path = write_config(workdir / f"{name}.yaml", url, merge(FAST, settings))
        command = [*prefix, python or sys.executable, "-m", "supervisor"]  # python: another release's venv
        super().__init__(name, config_path, workdir, env=_test_env(env), command=command)
        self.seen: dict[int, float] = {}  # every pid of its tree we saw, with start time

    def remember_tree(self) -> list[int]:
        """Note every process of its tree now, to check later that none survives."""
        for proc in self.tree():
            try:
                self.seen[proc.pid] = proc.create_time()
            except psutil.NoSuchProcess:
                pass
        return list(self.seen)

    def survivors(self) -> list[int]:
        alive = []
        for pid, started in self.seen.items():
            try:
                proc = psutil.Process(pid)
                if abs(proc.create_time() - started) < 0.01 and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        return alive

    def send(self, sig) -> None:
        self.remember_tree()
        os.kill(self.pid, sig)

    def wait(self, timeout=20.0) -> int:
        code = super().wait(timeout)
        if code is None:
            raise AssertionError(f"{self.name} did not exit within {timeout}s\n{self.log()}")
        return code

    def destroy(self) -> None:
        """Test teardown: nothing of it may be left running."""
        self.remember_tree()
        for pid in self.survivors():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        super().destroy()


def _test_env(extra: dict | None) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    env.pop("NOTIFY_SOCKET", None)
    env.update(extra or {})
    return env


def read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _holds_locks(url: str, server_id: str, job_id: int) -> bool:
    """Whether a transaction of someone else's holds the SQLite write lock,
    or the rows of this server or this job."""
    if url.startswith("sqlite"):
        conn = sqlite3.connect(url.removeprefix("sqlite:///"), timeout=0.5, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
            return False
        except sqlite3.OperationalError:
            return True
        finally:
            conn.close()
    engine = make_engine(url)
    try:
        with engine.connect() as conn, conn.begin():
            conn.execute(text("SELECT id FROM shiftchange_servers WHERE id = :id FOR UPDATE NOWAIT"),
                         {"id": server_id})
            conn.execute(text("SELECT id FROM shiftchange_jobs WHERE id = :id FOR UPDATE NOWAIT"),
                         {"id": job_id})
            return False
    except DBAPIError:
        return True
    finally:
        engine.dispose()


def freeze(sup, url: str, server_id: str, job_id: int) -> None:
    """SIGSTOP `sup` at a moment it is in no transaction. Frozen inside one
    (a heartbeat, a claim), it would hold its locks for as long as it is
    frozen: on SQLite every other writer waits (the job's outcome
    included), elsewhere the reaper skips its locked server row. A limit of
    freezing a process inside a transaction (no database aborts one for
    being idle unless told to), not what these tests are about."""
    for _ in range(100):
        sup.send(signal.SIGSTOP)
        if not _holds_locks(url, server_id, job_id):
            return
        sup.proc.send_signal(signal.SIGCONT)
        time.sleep(0.005)  # let it finish its transaction, then try again
    raise AssertionError(f"{sup.name} was inside a transaction at every try")


def runs(records: Path, job_id: int) -> list[str]:
    """The pid of each run of a job, as scjobs records them."""
    return read_lines(records / f"job-{job_id}.runs")


def events_of(queue, job_id: int) -> list[str]:
    return [e.kind for e in queue.get(job_id).events]


def alive(pid: int) -> bool:
    """Running and not a zombie."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def clean_env(**extra) -> dict:
    """The environment of a real command: no inherited shiftchange settings,
    tests/ importable (job modules)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHIFTCHANGE_")}
    env.pop("NOTIFY_SOCKET", None)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def shiftchange(*args, cwd, env=None, timeout=60, umask=-1) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "supervisor", *args], cwd=cwd, capture_output=True,
        text=True, timeout=timeout, env=env or clean_env(), umask=umask,
    )
