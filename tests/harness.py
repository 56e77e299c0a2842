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
import yaml
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from supervisor import Queue
from supervisor.database import make_engine

TESTS = Path(__file__).parent
FAST = {
    "server": {"heartbeat_interval": "200ms", "dead_after": "2s", "poll_interval": "50ms", "concurrency": 2},
    "shutdown": {"kill_after": "1s"},
    "jobs": {"allow": ["scjobs:*"], "retry_backoff": "100ms", "max_attempts": 2},
}


def wait_for(predicate, timeout=20.0, what="condition", interval=0.02):
    """Poll `predicate` until it returns something truthy, or fail."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def merge(base: dict, extra: dict) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, values in extra.items():
        out.setdefault(section, {}).update(values)
    return out


class Supervisor:
    """One `python -m supervisor run` process in its own session."""

    def __init__(self, url: str, workdir: Path, name: str, prefix=(), env=None, python=None, **settings):
        self.name = name
        self.python = python or sys.executable  # another release's venv runs its own code
        self.prefix = list(prefix)  # e.g. ["unshare", "--pid", "--fork"]
        self.extra_env = env or {}
        self.workdir = workdir
        self.config_path = workdir / f"{name}.yaml"
        config = merge(FAST, settings)
        config.setdefault("database", {})["url"] = url
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / f"{name}.log"
        self.proc = None
        self.seen: dict[int, float] = {}  # every pid of its tree we saw, with start time

    def start(self) -> "Supervisor":
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
        env.pop("NOTIFY_SOCKET", None)
        env.update(self.extra_env)
        self.proc = subprocess.Popen(
            [*self.prefix, self.python, "-m", "supervisor", "run", "--config", str(self.config_path),
             "--name", self.name],
            stdout=open(self.log_path.with_suffix(".out"), "w"),
            stderr=open(self.log_path, "w"),
            env=env,
            cwd=self.workdir,
            start_new_session=True,
        )
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def wait_registered(self, queue: Queue, timeout=20.0):
        return wait_for(
            lambda: next((s for s in queue.servers() if s.pid == self.pid and s.state == "running"), None),
            timeout, f"{self.name} to register\n{self.log()}",
        )

    def remember_tree(self) -> list[int]:
        """Note every process of its tree now, to check later that none survives."""
        try:
            root = psutil.Process(self.pid)
            for proc in [root, *root.children(recursive=True)]:
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
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} did not exit within {timeout}s\n{self.log()}") from None

    def destroy(self) -> None:
        """Test teardown: nothing of it may be left running."""
        self.remember_tree()
        for pid in self.survivors():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


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
