"""The pieces a run is built from: a fresh database, real supervisor
processes, and a watcher that remembers every process of their trees."""

import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil
from sqlalchemy import create_engine, text

from supervisor import launcher
from supervisor.launcher import SupervisorProcess

REPO = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get("SHIFTCHANGE_CHAOS_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")

# Chaos timings (the brief's): fast heartbeats so that a run sees many
# deaths and recoveries; max_interruptions high because chaos interrupts a lot.
SETTINGS = {
    "server": {"heartbeat_interval": "200ms", "dead_after": "2s", "poll_interval": "50ms", "concurrency": 3},
    "shutdown": {"kill_after": "500ms"},
    "jobs": {"allow": ["chaos.jobs:*"], "max_attempts": 3, "max_interruptions": 50, "retry_backoff": "100ms"},
}
DEAD_AFTER = 2.0


# --- databases -------------------------------------------------------------------


def postgres_url(database: str) -> str:
    return PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + database


def fresh_postgres(database: str) -> str:
    """Drop and create `database` (its own, so tests on `test` are not
    disturbed); returns its URL."""
    engine = create_engine(PG_ADMIN_URL.replace("postgresql://", "postgresql+psycopg://", 1),
                           isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
            conn.execute(text(f'CREATE DATABASE "{database}"'))
    finally:
        engine.dispose()
    return postgres_url(database)


def drop_postgres(database: str) -> None:
    """Drop a run's own database; best effort (PostgreSQL may be down)."""
    try:
        engine = create_engine(PG_ADMIN_URL.replace("postgresql://", "postgresql+psycopg://", 1),
                               isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
        engine.dispose()
    except Exception:
        pass


def database_url(kind: str, run_dir: Path, pg_database: str) -> str:
    if kind == "sqlite":
        return f"sqlite:///{run_dir / 'queue.db'}"
    return fresh_postgres(pg_database)


# --- PostgreSQL server control ------------------------------------------------------


def pg_cluster() -> list[str] | None:
    """`pg_ctlcluster --skip-systemctl-redirect VERSION main`, or None when
    this host has no local cluster we can control."""
    if not shutil.which("pg_ctlcluster") or not Path("/etc/postgresql").is_dir():
        return None
    versions = sorted(os.listdir("/etc/postgresql"))
    if not versions:
        return None
    return ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main"]


def pg_ctl(action: str) -> str:
    cluster = pg_cluster()
    done = subprocess.run([*cluster, action], capture_output=True, text=True, timeout=60)
    return (done.stdout + done.stderr).strip()


def pg_ready() -> bool:
    return subprocess.run(["pg_isready", "-q", "-h", "127.0.0.1"], timeout=10).returncode == 0


def ensure_pg_running(timeout: float = 60.0) -> bool:
    """Other tests on this machine need PostgreSQL: start it if it is down
    and wait until it accepts connections."""
    if pg_cluster() is None:
        return True
    if not pg_ready():
        pg_ctl("start")
    deadline = time.monotonic() + timeout
    while not pg_ready():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


# --- process trees ---------------------------------------------------------------


class TreeWatcher:
    """Samples the trees of all supervisors every few milliseconds and
    remembers each process seen (pid and start time, so a recycled pid is
    never confused with it)."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.roots: dict[str, int] = {}  # name -> current supervisor pid
        self.seen: dict[tuple[int, float], str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "TreeWatcher":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def watch(self, name: str, pid: int) -> None:
        with self._lock:
            self.roots[name] = pid
        self.sample()

    def sample(self) -> None:
        with self._lock:
            roots = dict(self.roots)
        for name, pid in roots.items():
            try:
                root = psutil.Process(pid)
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
            for proc in procs:
                try:
                    key = (proc.pid, proc.create_time())
                except psutil.NoSuchProcess:
                    continue
                with self._lock:
                    self.seen.setdefault(key, name)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()


def alive(pid: int, created: float) -> bool:
    """True when that very process (pid and start time) is alive and not a zombie."""
    try:
        proc = psutil.Process(pid)
        return proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# --- supervisors ---------------------------------------------------------------------


def write_config(path: Path, url: str, overrides: dict | None = None) -> Path:
    # A supervisor restarted during a database outage keeps retrying.
    settings = launcher.merge(SETTINGS, {"database": {"retry_for": "5m"}, **(overrides or {})})
    return launcher.write_config(path, url, settings)


def child_env() -> dict:
    """The repository root on PYTHONPATH, so job processes import chaos.jobs."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.pop("NOTIFY_SOCKET", None)
    env.pop("SHIFTCHANGE_DATABASE_URL", None)
    return env


class Supervisor(SupervisorProcess):
    """One `python -m supervisor run --name NAME` at a time; restarting it
    starts a new process (a new server) under the same name, and the tree
    watcher follows each one."""

    def __init__(self, name: str, config: Path, run_dir: Path, watcher: TreeWatcher):
        super().__init__(name, config, run_dir, env=child_env())
        self.watcher = watcher
        self.starts = 0

    def start(self) -> "Supervisor":
        with open(self.log_path, "a") as log:
            log.write(f"--- start #{self.starts + 1} at clock {time.monotonic():.3f}\n")
        super().start()
        self.starts += 1
        self.watcher.watch(self.name, self.pid)
        return self

    def signal(self, sig: int) -> None:
        self.watcher.sample()  # note the tree as it is just before
        self.send(sig)

    def kill_tree(self) -> None:
        """SIGKILL the supervisor's process group and every process below
        it at once, as a container runtime or the OOM killer of a cgroup
        would (its children lead their own groups, so killpg alone would
        reach only the supervisor)."""
        self.watcher.sample()
        # A cgroup kill is atomic; a walk is not: a process forked while we
        # walk (a job starting its grandchild) would be missed and outlive
        # the "kill". So stop every process first, walking again until no
        # new one appears, then kill them all.
        stopped: dict[int, psutil.Process] = {}
        while True:
            try:
                root = psutil.Process(self.pid)
                new = [p for p in [root, *root.children(recursive=True)] if p.pid not in stopped]
            except psutil.NoSuchProcess:
                new = []
            if not new:
                break
            for proc in new:
                try:
                    proc.send_signal(signal.SIGSTOP)
                except psutil.NoSuchProcess:
                    pass
                stopped[proc.pid] = proc
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for proc in stopped.values():
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
