"""shiftchange: a SQL-backed job queue whose supervisor hands in-flight jobs
over cleanly on every deploy.

    from supervisor import Queue, current_job, HandOff
"""

from supervisor.errors import HandOff, JobFailed, LeaseLost, NotInJob, ShiftchangeError
from supervisor.jobcontext import JobContext, current_job
from supervisor.queue import Queue
from supervisor.records import Event, Job, Server

__all__ = [
    "Queue", "Job", "Server", "Event", "current_job", "JobContext",
    "HandOff", "JobFailed", "LeaseLost", "NotInJob", "ShiftchangeError",
]
__version__ = "0.2.0.dev0"
