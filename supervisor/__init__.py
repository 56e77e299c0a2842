"""shiftchange: a SQL-backed job queue whose supervisor hands in-flight jobs
over cleanly on every deploy.

    from supervisor import Queue, current_job, HandOff
"""

from supervisor.errors import HandOff, JobFailed, LeaseLost, NotInJob, ShiftchangeError

__all__ = [
    "Queue", "Job", "Server", "Event", "current_job", "JobContext",
    "HandOff", "JobFailed", "LeaseLost", "NotInJob", "ShiftchangeError",
]
__version__ = "0.2.0.dev0"

# Imported on first use (PEP 562): every `shiftchange` command imports this
# package first, and a read such as `status` needs neither the producer API
# nor what job code sees (asyncio and the storage verbs behind them).
_LAZY = {
    "Queue": "supervisor.queue",
    "current_job": "supervisor.jobcontext",
    "JobContext": "supervisor.jobcontext",
    "Job": "supervisor.records",
    "Server": "supervisor.records",
    "Event": "supervisor.records",
}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'supervisor' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_LAZY])
