"""Plain records read from storage, and their JSON shape (a contract)."""

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone

JOB_STATES = ("enqueued", "scheduled", "processing", "succeeded", "failed")
FINISHED_STATES = ("succeeded", "failed")


def to_datetime(epoch: float | None) -> datetime | None:
    """An epoch float from storage as an aware UTC datetime."""
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, tz=timezone.utc)


def to_iso(epoch: float | None) -> str | None:
    """An epoch float as ISO 8601 UTC with a Z, for JSON output."""
    moment = to_datetime(epoch)
    if moment is None:
        return None
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Event:
    at: float
    kind: str
    server: str | None
    detail: str | None
    server_name: str | None = None

    def to_dict(self) -> dict:
        return {"at": to_iso(self.at), "kind": self.kind, "server": self.server,
                "server_name": self.server_name, "detail": self.detail}


@dataclass(frozen=True)
class Job:
    id: int
    state: str
    queue: str
    kind: str  # "callable" or "command"
    target: str
    args: list
    kwargs: dict
    priority: int
    attempts: int
    max_attempts: int
    interruptions: int
    max_interruptions: int
    server: str | None
    lease: int
    run_at: float
    created_at: float
    started_at: float | None
    finished_at: float | None
    error: str | None
    checkpoint: object = None
    events: list[Event] | None = None
    server_name: str | None = None  # the name of `server`, where it was read
    result: object = None  # JSON: a callable's return value; a command's exit_code and output
    unique_key: str | None = None
    timeout: float | None = None  # seconds a run may take from its claim
    recurring: str | None = None  # the recurring entry whose tick enqueued it
    recurring_tick: float | None = None  # and that tick's scheduled time
    # Set by an enqueue that found this job holding its unique key already
    # (never stored, never in to_dict).
    existed: bool = False

    @property
    def argv(self) -> list[str]:
        """A command job's full argv."""
        return [self.target, *self.args]

    @classmethod
    def from_row(cls, row, events=None) -> "Job":
        return cls(
            id=row.id,
            state=row.state,
            queue=row.queue,
            kind=row.kind,
            target=row.target,
            args=json.loads(row.args),
            kwargs=json.loads(row.kwargs),
            priority=row.priority,
            attempts=row.attempts,
            max_attempts=row.max_attempts,
            interruptions=row.interruptions,
            max_interruptions=row.max_interruptions,
            server=row.server_id,
            lease=row.lease,
            run_at=row.run_at,
            created_at=row.created_at,
            started_at=row.started_at,
            finished_at=row.finished_at,
            error=row.error,
            checkpoint=None if row.checkpoint is None else json.loads(row.checkpoint),
            events=events,
            server_name=row._mapping.get("server_name"),
            result=None if row._mapping.get("result") is None else json.loads(row.result),
            unique_key=row._mapping.get("unique_key"),
            timeout=row._mapping.get("timeout"),
            recurring=row._mapping.get("recurring"),
            recurring_tick=row._mapping.get("recurring_tick"),
        )

    def to_dict(self) -> dict:
        data = {
            "id": self.id,
            "state": self.state,
            "queue": self.queue,
            "kind": self.kind,
            "target": self.target,
            "args": self.args,
            "kwargs": self.kwargs,
            "priority": self.priority,
            "attempts": self.attempts,
            "max_attempts": self.max_attempts,
            "interruptions": self.interruptions,
            "server": self.server,
            "server_name": self.server_name,
            "run_at": to_iso(self.run_at),
            "created_at": to_iso(self.created_at),
            "started_at": to_iso(self.started_at),
            "finished_at": to_iso(self.finished_at),
            "error": self.error,
            "checkpoint": self.checkpoint,
            "result": self.result,
            "unique_key": self.unique_key,
            "timeout": self.timeout,
            "recurring": None if self.recurring is None else {
                "name": self.recurring, "tick": to_iso(self.recurring_tick)},
        }
        if self.events is not None:
            data["events"] = [event.to_dict() for event in self.events]
        return data


@dataclass(frozen=True)
class Server:
    id: str
    name: str
    host: str
    pid: int
    pid_started_at: float | None
    state: str
    queues: list[str]
    concurrency: int
    dead_after: float
    started_at: float
    heartbeat_at: float
    stopped_at: float | None
    heartbeat_age: float  # seconds, by the database clock
    jobs: list[int] = field(default_factory=list)
    version: str | None = None  # shiftchange version; None: 0.1.0, which did not record it
    release: str | None = None  # the deploy release it runs
    quiet: bool = False  # alive, but not claiming

    @classmethod
    def from_row(cls, row, now: float, job_ids: list[int]) -> "Server":
        return cls(
            id=row.id,
            name=row.name,
            host=row.host,
            pid=row.pid,
            pid_started_at=row.pid_started_at,
            state=row.state,
            queues=json.loads(row.queues),
            concurrency=row.concurrency,
            dead_after=row.dead_after,
            started_at=row.started_at,
            heartbeat_at=row.heartbeat_at,
            stopped_at=row.stopped_at,
            heartbeat_age=max(0.0, now - row.heartbeat_at),
            jobs=job_ids,
            version=row.version,
            release=row.release,
            quiet=bool(row.quiet),
        )

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "name": self.name,
            "host": self.host,
            "pid": self.pid,
            "state": self.shown_state,
            "queues": self.queues,
            "concurrency": self.concurrency,
            "started_at": to_iso(self.started_at),
            "heartbeat_at": to_iso(self.heartbeat_at),
            "heartbeat_age": round(self.heartbeat_age, 3),
            "stopped_at": to_iso(self.stopped_at),
            "jobs": self.jobs,
            "version": self.version,
            "release": self.release,
            "quiet": self.quiet,
        }

    @property
    def shown_state(self) -> str:
        """The state as people read it: a running server asked not to claim
        is `quiet` (stored as `running` plus a flag, see tables.py)."""
        return "quiet" if self.quiet and self.state == "running" else self.state


@dataclass(frozen=True)
class QueueSummary:
    """One queue as the dashboard shows it."""

    name: str
    counts: dict[str, int]  # by state, for storage.COUNTED_STATES
    oldest_due_age: float | None  # seconds the oldest due job has waited; None: none due
    paused: bool = False
