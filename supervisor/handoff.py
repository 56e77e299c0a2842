"""`shiftchange handoff`: stop servers from outside, for pre-stop hooks and
deploy scripts, even when a supervisor is frozen or unresponsive.

1. One transaction: the servers become `stopping`, their in-flight jobs are
   requeued and held for the server's dead_after (by then a supervisor that
   never heard of this has fenced its children: see jobprocess.py).
2. Each supervisor on this host, if its pid and start time still match the
   registered server (a recycled pid is never signalled), gets SIGTERM; if
   it has not exited within `timeout`, SIGKILL (its children die with it).
3. Once its whole process tree is gone, the hold on its jobs is released so
   another server starts them at once, and it is marked `stopped`.
"""

import os
import signal
import socket
import time

import psutil

from supervisor.errors import UnknownServer
from supervisor.processes import clock, is_same_process
from supervisor.storage import LIVE_SERVER_STATES, Storage

KILL_WAIT_S = 5.0  # for SIGKILLed processes to be gone


def choose_servers(storage: Storage, wanted: list[str] | None, release: str | None = None):
    """Servers named (by name or id) in `wanted`, else every live server of
    `release` (on any host), else every live server registered from this
    host. A name, id or release that no server, live or stopped, has ever
    had is a typo that must not pass silently: a hook would carry on
    believing the jobs were handed off (UnknownServer)."""
    every = storage.servers()
    if release is not None:
        return _of_release(every, release)
    if wanted:
        unknown = [w for w in wanted if not any(w in (s.id, s.name) for s in every)]
        if unknown:
            live_names = sorted({s.name for s in every if s.state in LIVE_SERVER_STATES})
            known = ", ".join(live_names) if live_names else "none"
            raise UnknownServer(f"no server is named {', '.join(unknown)} (running servers: {known})")
    live = [s for s in every if s.state in LIVE_SERVER_STATES]
    if wanted:
        return [s for s in live if s.id in wanted or s.name in wanted]
    host = socket.gethostname()
    return [s for s in live if s.host == host]


def _of_release(every, release: str):
    if not any(s.release == release for s in every):
        live = sorted({s.release for s in every if s.state in LIVE_SERVER_STATES and s.release})
        known = ", ".join(live) if live else "none"
        raise UnknownServer(f"no server has release {release} (releases of running servers: {known})")
    return [s for s in every if s.state in LIVE_SERVER_STATES and s.release == release]


def hand_off(storage: Storage, wanted: list[str] | None, timeout: float, release: str | None = None) -> list[dict]:
    """Hand off the chosen servers (see choose_servers) in one transaction,
    then stop those of this host; one report per server."""
    reports = []
    chosen = choose_servers(storage, wanted, release)
    if not chosen:
        return reports
    reason = f"`shiftchange handoff` from {socket.gethostname()} (pid {os.getpid()})"
    # One transaction for all of them; held for the longest dead_after.
    taken = storage.handoff([s.id for s in chosen], max(s.dead_after for s in chosen), reason)
    for server in chosen:
        held = [job for job in taken if job.server == server.id]
        report = {"id": server.id, "name": server.name, "host": server.host,
                  "jobs": [job.id for job in held if not job.failed],
                  "failed": [job.id for job in held if job.failed]}
        local = server.host == socket.gethostname()
        identity = is_same_process(server.pid, server.pid_started_at) if local else None
        if identity:
            report["supervisor"] = stop_local_supervisor(server.pid, timeout)
            storage.release_handoff(server.id, held)
        elif identity is False:
            report["supervisor"] = f"pid {server.pid} is not running"
            storage.release_handoff(server.id, held)
        elif local:  # a live pid we cannot prove is that server: never signal it
            report["supervisor"] = (
                f"pid {server.pid} cannot be proven to be this server (no start time): not "
                f"signalled; the jobs are held for {server.dead_after:g}s"
            )
        else:
            report["supervisor"] = (
                f"on host {server.host}: it stops at its next heartbeat; "
                f"the jobs are held until then (at most {server.dead_after:g}s)"
            )
        reports.append(report)
    return reports


def stop_local_supervisor(pid: int, timeout: float) -> str:
    """SIGTERM, wait up to `timeout`, then SIGKILL; wait until the whole tree
    it had is gone. Returns what happened, in words."""
    try:
        supervisor = psutil.Process(pid)
        tree = [supervisor, *supervisor.children(recursive=True)]
    except psutil.NoSuchProcess:
        return f"pid {pid} had already exited"
    began = clock()
    _signal(supervisor, signal.SIGTERM)
    _signal(supervisor, signal.SIGCONT)  # a frozen one must wake to exit
    how = "exited"
    if not _wait_gone([supervisor], timeout):
        _signal(supervisor, signal.SIGKILL)
        how = f"did not exit within {timeout:g}s: killed"
    if not _wait_gone(tree, KILL_WAIT_S):
        for proc in tree:  # children die with their supervisor; make sure
            _signal(proc, signal.SIGKILL)
        _wait_gone(tree, KILL_WAIT_S)
    return f"supervisor pid {pid} {how} after {clock() - began:.2f}s"


def _signal(proc: psutil.Process, sig) -> None:
    try:
        proc.send_signal(sig)  # psutil checks the pid still is this process
    except psutil.NoSuchProcess:
        pass


def _wait_gone(procs: list[psutil.Process], timeout: float) -> bool:
    """Wait until every process has exited; a zombie has exited (its parent,
    not us, will reap it). True if they all did within `timeout`."""
    deadline = clock() + timeout
    while True:
        if not any(_running(proc) for proc in procs):
            return True
        if clock() >= deadline:
            return False
        time.sleep(0.01)


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
