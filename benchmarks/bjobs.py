"""Job bodies for the shiftchange benchmarks (imported by the children)."""

import os
import signal
import time

import psutil

from supervisor.processes import clock


def _append(path, line):
    # O_APPEND writes this small are atomic: concurrent runs never interleave.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def spin(marker, seconds=600.0):
    """CPU-bound, ignores SIGTERM. Each run appends "<clock> <pid> <overlap>"
    to `marker`: overlap is 1 if an earlier run's process is still alive."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    started = clock()
    earlier = [int(line.split()[1]) for line in _read(marker)]
    overlap = any(_alive(pid) for pid in earlier)
    _append(marker, f"{started:.6f} {os.getpid()} {int(overlap)}")
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def noop():
    pass


def sleep_ms(ms):
    time.sleep(ms / 1000)


def _read(path):
    try:
        with open(path) as f:
            return [line for line in f.read().splitlines() if line]
    except FileNotFoundError:
        return []


def _alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
