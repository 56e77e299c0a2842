"""Start and watch `shiftchange run` processes from outside.

The demo, the end-to-end tests, the benchmarks and the chaos run all drive
real supervisors the same way: write a config, start `python -m supervisor
run` in a session of its own, wait for it to register (polling the database
against a deadline, never sleeping a guess), signal it, read its log, and
make sure nothing of its process tree outlives it. This module is that one
way; each of them adds only what is its own.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml

from supervisor.logs import read_events


def wait_for(predicate, timeout: float = 20.0, what: str = "condition", interval: float = 0.02):
    """Call `predicate` until it returns something truthy (returned), or
    raise TimeoutError naming `what` once `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def merge(base: dict, extra: dict) -> dict:
    """Config sections of `base` with those of `extra` laid over them."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, values in extra.items():
        if isinstance(values, dict):
            out.setdefault(section, {}).update(values)
        else:  # a list such as `recurring:` replaces the base's
            out[section] = values
    return out


def write_config(path: Path, url: str, settings: dict) -> Path:
    """A config file for `url` with `settings` (sections of keys)."""
    config = merge(settings, {"database": {"url": url}})
    path.write_text(yaml.safe_dump(config))
    return path


class SupervisorProcess:
    """One `python -m supervisor run --config PATH --name NAME` at a time.
    start() again after it exited starts a new process (a new server) under
    the same name; its log goes on in the same file."""

    def __init__(self, name: str, config_path: Path, workdir: Path, *, env: dict | None = None,
                 command: list[str] | None = None, log_path: Path | None = None, preexec_fn=None):
        self.name = name
        self.config_path = config_path
        self.workdir = workdir
        self.env = env  # None: this process's environment
        # What stands for `python -m supervisor`: another release's venv, a
        # wrapper such as `unshare --pid --fork python -m supervisor`.
        self.command = command or [sys.executable, "-m", "supervisor"]
        self.log_path = log_path or workdir / f"{name}.log"
        self.preexec_fn = preexec_fn
        self.proc: subprocess.Popen | None = None

    def start(self):
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.command, "run", "--config", str(self.config_path), "--name", self.name],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=self.env, cwd=self.workdir,
                start_new_session=True,  # a Ctrl-C or a test's signal reaches only who it is meant for
                preexec_fn=self.preexec_fn,
            )
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self) -> list[dict]:
        """Its log's records, when it logs JSON (log.format: json)."""
        return read_events(self.log())

    def wait_registered(self, queue, timeout: float = 20.0):
        """Its server row, once it is registered and running."""
        return wait_for(
            lambda: next((s for s in queue.servers() if s.pid == self.pid and s.state == "running"), None),
            timeout, f"{self.name} to register\n{self.log()[-3000:]}",
        )

    def send(self, sig: int) -> None:
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def wait(self, timeout: float) -> int | None:
        """Its exit code, or None if it is still running after `timeout`."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def tree(self) -> list[psutil.Process]:
        """It and every process below it, now."""
        try:
            root = psutil.Process(self.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def destroy(self) -> None:
        """SIGKILL it and everything below it, whatever state it is in, and
        collect it."""
        for proc in self.tree():
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        if self.proc is not None:
            self.wait(10)
