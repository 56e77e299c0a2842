"""The Python API for producers and operators: `from supervisor import Queue`."""

from datetime import datetime

from supervisor.config import Config, load_config
from supervisor.database import command_bounds, ensure_schema, make_engine
from supervisor.records import JOB_STATES, Job, Server
from supervisor.storage import Storage, new_job


class Queue:
    """A handle on one shiftchange database.

    `Queue(url)` connects to the database at `url`, creating the schema if the
    database is empty. `Queue.from_config(path)` reads the YAML config
    (see supervisor.config for where it is looked for).
    """

    def __init__(self, url: str, *, defaults: Config | None = None):
        self.config = defaults or Config()
        server = self.config.server
        self.engine = make_engine(url, pre_ping=True, bounds=command_bounds(server.heartbeat_interval, server.dead_after))
        ensure_schema(self.engine)
        self.storage = Storage(self.engine)

    @classmethod
    def from_config(cls, path: str | None = None) -> "Queue":
        config = load_config(path)
        return cls(config.database.url, defaults=config)

    def enqueue(
        self,
        target: str,
        args=(),
        kwargs=None,
        *,
        queue: str = "default",
        priority: int = 0,
        max_attempts: int | None = None,
        max_interruptions: int | None = None,
        run_at: datetime | None = None,
        delay: float = 0.0,
    ) -> Job:
        """Enqueue a call of `target` ("package.module:function")."""
        return self._enqueue(
            target=target, args=args, kwargs=kwargs, queue=queue, priority=priority,
            max_attempts=max_attempts, max_interruptions=max_interruptions,
            run_at=run_at, delay=delay,
        )

    def enqueue_command(self, argv: list[str], **options) -> Job:
        """Enqueue a command job (runs only where jobs.allow_commands lists
        argv[0]). Takes the same keyword options as enqueue()."""
        return self._enqueue(command=list(argv), **options)

    def _enqueue(self, *, run_at=None, max_attempts=None, max_interruptions=None, **spec) -> Job:
        jobs_config = self.config.jobs
        job = new_job(
            max_attempts=max_attempts or jobs_config.max_attempts,
            max_interruptions=(
                jobs_config.max_interruptions if max_interruptions is None else max_interruptions
            ),
            run_at=None if run_at is None else _epoch(run_at),
            **spec,
        )
        (job_id,) = self.storage.enqueue(job)
        return self.storage.get(job_id)

    def get(self, job_id: int) -> Job:
        """A job with its event history (JobNotFound if there is none)."""
        return self.storage.get(job_id)

    def jobs(self, state: str | None = None, queue: str | None = None, limit: int = 100) -> list[Job]:
        return self.storage.jobs(state=state, queue=queue, limit=limit)

    def servers(self) -> list[Server]:
        return self.storage.servers()

    def counts(self) -> dict[str, int]:
        """Job counts by state over all queues, every state listed."""
        totals = dict.fromkeys(JOB_STATES, 0)
        for by_state in self.storage.counts().values():
            for state, count in by_state.items():
                totals[state] += count
        return totals

    def queue_counts(self) -> dict[str, dict[str, int]]:
        return self.storage.counts()

    def requeue(self, job_id: int) -> Job:
        return self.storage.requeue(job_id)

    def delete(self, job_id: int) -> None:
        self.storage.delete(job_id)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _epoch(moment: datetime) -> float:
    if moment.tzinfo is None:
        raise ValueError("run_at must be timezone-aware (e.g. datetime.now(timezone.utc))")
    return moment.timestamp()
