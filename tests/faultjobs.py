"""Job functions for the fault and security tests (tests/ is on the
children's PYTHONPATH). Like scjobs, they record facts in files.

This module imports `os` and `subprocess` on purpose: the security tests
check that an allowed pattern such as `faultjobs:*` still cannot reach
`faultjobs:os.system` by walking through an imported module.
"""

import json
import os
import subprocess  # noqa: F401  (reached for by a refused target in the tests)
import time
from pathlib import Path

from supervisor import current_job


def record_args(out_path, *args, **kwargs):
    """Write exactly what arrived, as JSON (UTF-8), with the job's id."""
    data = {"job": current_job().id, "args": list(args), "kwargs": kwargs}
    Path(out_path).write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def leave_grandchild(record_dir):
    """Double-fork a grandchild that leaves the process group (setsid) and
    would run forever, then return at once: the job succeeds, the grandchild
    must not outlive it."""
    pid = os.fork()
    if pid == 0:
        os.setsid()
        if os.fork() == 0:
            with open(Path(record_dir) / "orphan", "a") as f:
                f.write(f"{os.getpid()}\n")
            while True:
                time.sleep(0.1)
        os._exit(0)
    os.waitpid(pid, 0)
    orphan = Path(record_dir) / "orphan"
    deadline = time.monotonic() + 10
    while not orphan.exists() and time.monotonic() < deadline:
        time.sleep(0.01)


def silent_failure():
    """Close stdout and stderr, then raise: the error must still arrive."""
    os.close(1)
    os.close(2)
    raise ValueError("raised after closing stdout and stderr")


def spin_for(record_dir, seconds):
    """Burn CPU for `seconds`, recording start and end."""
    job = current_job()
    with open(Path(record_dir) / f"job-{job.id}.runs", "a") as f:
        f.write(f"{os.getpid()}\n")
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sum(range(1000))
    with open(Path(record_dir) / f"job-{job.id}.done", "a") as f:
        f.write(f"{os.getpid()}\n")
