"""The job that `shiftchange demo` runs across a deploy.

`crunch` stands for a long, CPU-bound job pinned at 100 %: it ignores
SIGTERM (code in a tight loop cannot react to signals or cancellation
tokens in time anyway), and the only cooperation it offers is a checkpoint
after every step, so a run on another server resumes where this one left off.

It prints nothing. So that the demo can prove which steps ran where (and that
none was redone), it appends one JSON line per event to a trace file.
"""

import json
import os
import signal
import time

from supervisor import current_job


def crunch(steps: int = 20, step_seconds: float = 0.4, trace: str | None = None) -> None:
    """Do `steps` steps of ~`step_seconds` of pure-Python work each, saving
    {"step": n} (n = steps done) after each one."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # like a job that cannot be interrupted
    ctx = current_job()
    start = (ctx.checkpoint_data or {}).get("step", 0)
    _trace(trace, ctx, "start", start)
    for step in range(start, steps):
        _busy(step_seconds)
        # Raises LeaseLost once this run has been handed off: the job then
        # ends here and the new owner continues from the last saved step.
        ctx.checkpoint({"step": step + 1})
        _trace(trace, ctx, "done", step + 1)


def _busy(seconds: float) -> int:
    """Burn CPU for `seconds` of wall time. Bounded by time rather than by an
    amount of work, so the demo takes as long on a slow or busy machine."""
    until = time.monotonic() + seconds
    x = 0
    while time.monotonic() < until:
        for i in range(5_000):
            x = (x * 31 + i) % 1_000_003
    return x


def _trace(path: str | None, ctx, event: str, step: int) -> None:
    if path is None:
        return
    line = json.dumps({"job": ctx.id, "pid": os.getpid(), "interruptions": ctx.interruptions,
                       "event": event, "step": step, "at": time.time()})
    # One write() of a short line with O_APPEND: lines from concurrent jobs
    # never interleave.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)
