"""The Python API for producers and operators: `from supervisor import Queue`."""

import json
import time
from dataclasses import replace
from datetime import datetime, timezone

from supervisor.config import Config, load_config, parse_duration
from supervisor.database import command_bounds, ensure_schema, make_engine, mask_url, missing_sqlite_file
from supervisor.errors import ActionRefused, InvalidJob, JobFailed, JobNotFound, UnknownServer
from supervisor.jobspec import NewJob, new_job
from supervisor.records import Job, QueueSummary, Server
from supervisor.recurring import EntryError, RecurringEntry, entry_from_row, make_entry
from supervisor.snapshot import Snapshot, totals
from supervisor.storage import COUNTED_STATES, EventHistogram, JobFilter, JobPage, Storage

# The job events the dashboard charts and /metrics counts.
WATCHED_EVENTS = ("succeeded", "failed", "handed_off", "reaped", "stale_write")
BULK_LIMIT = 10_000  # jobs one "requeue every match" action may touch
ENQUEUE_BATCH = 1000  # jobs enqueue_many() inserts per transaction
# The keys of one job in enqueue_many() and `enqueue --from`: enqueue()'s
# options, `target` or `command`.
JOB_KEYS = ("target", "command", "args", "kwargs", "queue", "priority", "max_attempts", "max_interruptions",
            "run_at", "delay", "unique_key", "timeout")


class Queue:
    """A handle on one shiftchange database.

    `Queue(url)` connects to the database at `url`, creating the schema if the
    database is empty and applying additive migrations (under the schema
    lock). `Queue(url, create=False)` only reads and never writes the schema
    or creates a SQLite file: on a database without the schema it raises
    SchemaMissing. `Queue.from_config(path)` reads the YAML config (see
    supervisor.config for where it is looked for).
    """

    def __init__(self, url: str, *, defaults: Config | None = None, create: bool = True):
        self.config = defaults or Config()
        if not create:
            missing_sqlite_file(url)
        server = self.config.server
        self.engine = make_engine(url, pre_ping=True, bounds=command_bounds(server.heartbeat_interval, server.dead_after),
                                  sqlite_synchronous=self.config.database.sqlite_synchronous)
        try:
            ensure_schema(self.engine, create=create)
        except BaseException:
            self.engine.dispose()
            raise
        self.storage = Storage(self.engine, self.config.server.release_window)

    @property
    def database(self) -> str:
        """The database URL, password masked: safe to print."""
        return mask_url(self.engine.url)

    @classmethod
    def from_config(cls, path: str | None = None, *, create: bool = True) -> "Queue":
        config = load_config(path)
        return cls(config.database.url, defaults=config, create=create)

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
        unique_key: str | None = None,
        timeout: float | str | None = None,
    ) -> Job:
        """Enqueue a call of `target` ("package.module:function"). With a
        `unique_key` that an enqueued, scheduled or processing job holds,
        nothing is enqueued: that job is returned, with `existed` True.
        `timeout` (seconds or a duration such as "30m"; default
        jobs.timeout): how long each run may take from its claim."""
        return self._enqueue(
            target=target, args=args, kwargs=kwargs, queue=queue, priority=priority,
            max_attempts=max_attempts, max_interruptions=max_interruptions,
            run_at=run_at, delay=delay, unique_key=unique_key, timeout=timeout,
        )

    def enqueue_many(self, jobs, batch: int = ENQUEUE_BATCH) -> list[int]:
        """Enqueue many jobs: dicts with enqueue()'s options and `target`
        (or `command`, an argv list); `run_at` may be an ISO 8601 string.
        Every job is checked first: one that is not valid raises InvalidJob
        naming it ("job 3: ...") and nothing is inserted. Then they are
        inserted `batch` to a transaction. Returns their ids, in order (for
        a unique_key already held, the holder's id)."""
        specs = []
        for number, item in enumerate(jobs, 1):
            try:
                specs.append(self.job_spec(item))
            except InvalidJob as exc:
                raise InvalidJob(f"job {number}: {exc}") from None
        return self.enqueue_specs(specs, batch)

    def job_spec(self, item) -> NewJob:
        """A validated job from a dict of enqueue_many() (InvalidJob if not)."""
        if not isinstance(item, dict):
            raise InvalidJob(f"expected a JSON object, not {type(item).__name__}")
        unknown = sorted(set(item) - set(JOB_KEYS))
        if unknown:
            raise InvalidJob(f"unknown key {unknown[0]!r} (known: {', '.join(JOB_KEYS)})")
        options = dict(item)
        if isinstance(options.get("run_at"), str):
            options["run_at"] = _iso_time(options["run_at"])
        try:
            return self._spec(**options)
        except (TypeError, ValueError, AttributeError) as exc:
            raise InvalidJob(str(exc)) from None

    def enqueue_specs(self, specs: list[NewJob], batch: int = ENQUEUE_BATCH) -> list[int]:
        """Insert validated jobs, `batch` to a transaction; their ids."""
        ids = []
        for start in range(0, len(specs), batch):
            ids += [done.id for done in self.storage.enqueue_jobs(specs[start:start + batch])]
        return ids

    def enqueue_command(self, argv: list[str], **options) -> Job:
        """Enqueue a command job (runs only where jobs.allow_commands lists
        argv[0]). Takes the same keyword options as enqueue()."""
        return self._enqueue(command=list(argv), **options)

    def _enqueue(self, **options) -> Job:
        (done,) = self.storage.enqueue_jobs([self._spec(**options)])
        found = self.storage.get(done.id)
        return replace(found, existed=True) if done.existed else found

    def _spec(self, *, run_at=None, max_attempts=None, max_interruptions=None, timeout=None, **spec) -> NewJob:
        """A validated job with this queue's config defaults filled in."""
        jobs_config = self.config.jobs
        return new_job(
            timeout=jobs_config.timeout if timeout is None else _seconds(timeout, "timeout"),
            max_attempts=jobs_config.max_attempts if max_attempts is None else max_attempts,
            max_interruptions=(
                jobs_config.max_interruptions if max_interruptions is None else max_interruptions
            ),
            run_at=None if run_at is None else _epoch(run_at),
            **spec,
        )

    # recurring jobs -----------------------------------------------------------

    def add_recurring(
        self,
        name: str,
        *,
        cron: str | None = None,
        every: float | str | None = None,
        target: str | None = None,
        command: list[str] | None = None,
        args=(),
        kwargs=None,
        queue: str = "default",
        priority: int = 0,
        tz: str = "UTC",
        missed: str = "latest",
    ) -> RecurringEntry:
        """Add a recurring job that every running server takes part in: at
        each tick of `cron` (5 fields, read in `tz`) or `every` (seconds or
        a duration such as "15m"), one server enqueues a call of `target`
        (or the `command` argv). Replaces the entry `name` if the API added
        it before. Servers pick it up at their next heartbeat; ticks from
        now on run even if that comes later. A config entry of the same
        name wins on the servers that have it. InvalidJob if not valid."""
        values = dict(name=name, cron=cron, every=every, target=target, command=command, args=list(args),
                      kwargs=kwargs, queue=queue, priority=priority, tz=tz, missed=missed)
        try:
            entry = make_entry({k: v for k, v in values.items() if v is not None}, source="api")
        except EntryError as exc:
            raise InvalidJob(str(exc)) from None
        self.storage.put_recurring(name, json.dumps(entry.definition(), separators=(",", ":")))
        return entry

    def remove_recurring(self, name: str) -> bool:
        """Remove a recurring job added with add_recurring(); False if there
        was none. Servers stop enqueueing it at their next heartbeat.
        (Entries of a config file go away with the file's entry.)"""
        return self.storage.delete_recurring(name)

    def recurring(self) -> list[dict]:
        """Every recurring entry, those of this queue's config first, then
        those added through the API: its definition, `next_run` (by the
        database clock), the newest tick enqueued and its job (`last_tick`,
        `last_job`). An API entry named like a config entry is `shadowed`:
        servers with this config run the config's."""
        from supervisor.dbtime import to_iso

        entries = list(self.config.recurring)
        for row in self.storage.recurring_rows():
            try:
                entries.append(entry_from_row(row.name, row.definition, row.added_at))
            except (EntryError, ValueError):
                continue  # written by a newer release: not ours to show
        last = self.storage.last_ticks([e.name for e in entries]) if entries else {}
        now = self.storage.now()
        in_config = {e.name for e in self.config.recurring}
        listed = []
        for entry in entries:
            tick, job_id = last.get(entry.name, (None, None))
            listed.append(entry.to_dict() | {
                "next_run": to_iso(entry.next_tick(now)),
                "last_tick": to_iso(tick),
                "last_job": job_id,
                "shadowed": entry.source == "api" and entry.name in in_config,
            })
        return listed

    def get(self, job_id: int) -> Job:
        """A job with its event history (JobNotFound if there is none)."""
        return self.storage.get(job_id)

    def result(self, job_id: int, timeout: float | None = None, poll: float = 0.2):
        """Wait for a job to finish and return its result: what its callable
        returned (JSON data), or for a command job {"exit_code", "output"}.
        Raises JobFailed (with the job's error) if it failed, TimeoutError
        after `timeout` seconds (None: wait as long as it takes)."""
        give_up = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.storage.get(job_id)
            if job.state == "succeeded":
                return job.result
            if job.state == "failed":
                raise JobFailed(job)
            if give_up is not None and time.monotonic() >= give_up:
                raise TimeoutError(f"job {job_id} is still {job.state} after {timeout:g}s")
            time.sleep(poll if give_up is None else max(0.0, min(poll, give_up - time.monotonic())))

    def jobs(self, state: str | None = None, queue: str | None = None, limit: int = 100) -> list[Job]:
        return self.storage.jobs(state=state, queue=queue, limit=limit)

    def servers(self) -> list[Server]:
        return self.storage.servers()

    def counts(self) -> dict[str, int]:
        """Job counts by state over all queues, every state listed."""
        return totals(self.storage.counts())

    def queue_counts(self) -> dict[str, dict[str, int]]:
        return self.storage.counts()

    def snapshot(self) -> Snapshot:
        """What `shiftchange status` shows: servers, job counts by queue
        and state, paused queues, read in one transaction."""
        return self.storage.snapshot()

    def served(self, queue: str) -> bool:
        """Does a running server serve `queue`? (A job in a queue nobody
        serves waits, which a producer may want to hear about.)"""
        return any(queue in s.queues for s in self.storage.servers(states=("running",)))

    def hand_off(
        self, servers: list[str] | None = None, timeout: float = 10.0, release: str | None = None
    ) -> list[dict]:
        """`shiftchange handoff`: requeue the servers' jobs (or, with
        `release`, those of every running server of that release) in one
        transaction, then stop their supervisors that run on this host (see
        supervisor/handoff.py). One report per server."""
        from supervisor.handoff import hand_off

        return hand_off(self.storage, servers, timeout, release)

    def reap(self):
        """One pass of dead-server detection; returns what it requeued (or
        failed past max_interruptions)."""
        return self.storage.reap()

    def quiet(self, servers: list[str] | None = None, quiet: bool = True) -> list[Server]:
        """Ask servers (names or ids; default: every live server of this
        host) to stop claiming new jobs while they keep running theirs and
        heartbeating -- or, with quiet=False, to claim again. Returns the
        servers changed; UnknownServer for a name no server ever had."""
        from supervisor.handoff import choose_servers

        chosen = choose_servers(self.storage, servers)
        changed = set(self.storage.set_quiet([s.id for s in chosen], quiet))
        return [s for s in chosen if s.id in changed]

    def requeue(self, job_id: int, force: bool = False) -> Job:
        """Run a job again from the start. A succeeded job is refused
        (ActionRefused) unless `force`: its code would run a second time."""
        return self.storage.requeue(job_id, force=force)

    def delete(self, job_id: int) -> None:
        self.storage.delete(job_id)

    def requeue_matching(self, which: JobFilter, force: bool = False, limit: int = BULK_LIMIT) -> dict:
        """Requeue every job matching `which` (up to `limit`), one
        requeue() each: the same fenced verb as for one job. Succeeded
        jobs are refused unless `force`. Returns the ids requeued, refused
        and gone (deleted meanwhile)."""
        done: dict[str, list[int]] = {"requeued": [], "refused": [], "gone": []}
        for job_id in self.storage.job_ids(which, limit):
            try:
                self.storage.requeue(job_id, force=force)
                done["requeued"].append(job_id)
            except ActionRefused:
                done["refused"].append(job_id)
            except JobNotFound:
                done["gone"].append(job_id)
        return done

    # what the dashboard and /metrics read -----------------------------------

    def job_page(self, which: JobFilter | None = None, before: int | None = None, limit: int = 50) -> JobPage:
        """A page of jobs, newest first: see Storage.job_page."""
        return self.storage.job_page(which or JobFilter(), before=before, limit=limit)

    def server(self, server_id: str) -> Server:
        """One server by id or name (the newest of that name), or UnknownServer."""
        for found in self.storage.servers():
            if server_id in (found.id, found.name):
                return found
        raise UnknownServer(f"no server is named {server_id}")

    def queue_summaries(self) -> list[QueueSummary]:
        """Every queue that has jobs needing attention, is served by a live
        server, or is paused: its counts (Storage.active_counts), the age
        of its oldest due job and whether it is paused. Bounded: no query
        here reads finished jobs."""
        counts = self.storage.active_counts()
        oldest = self.storage.oldest_due()
        paused = self.paused_queues()
        served = {name for s in self.storage.servers(states=("running", "stopping")) for name in s.queues}
        names = sorted(set(counts) | served | paused)
        empty = dict.fromkeys(COUNTED_STATES, 0)
        return [
            QueueSummary(name=name, counts=counts.get(name, empty), oldest_due_age=oldest.get(name),
                         paused=name in paused)
            for name in names
        ]

    def pause(self, queue: str) -> bool:
        """Pause `queue`: every server stops claiming its jobs from the
        commit on; they stay enqueued (running ones go on). False if it was
        paused already."""
        return self.storage.pause_queue(queue)

    def resume(self, queue: str) -> bool:
        """Let servers claim `queue`'s jobs again. False if it was not paused."""
        return self.storage.resume_queue(queue)

    def paused_queues(self) -> set[str]:
        return self.storage.paused_queues()

    def event_histogram(self, span: float = 3600.0, buckets: int = 60) -> EventHistogram:
        """The last `span` seconds of WATCHED_EVENTS, counted in `buckets`."""
        return self.storage.event_histogram(span, buckets, WATCHED_EVENTS)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _seconds(value, what: str) -> float:
    """A number of seconds, or a duration such as "30m" (InvalidJob if not)."""
    if isinstance(value, str):
        try:
            return parse_duration(value)
        except ValueError as exc:
            raise InvalidJob(f"{what}: {exc}") from None
    return value


def _iso_time(text: str) -> datetime:
    """An ISO 8601 time, UTC unless it says otherwise."""
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidJob(f"run_at {text!r} is not an ISO 8601 time") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _epoch(moment: datetime) -> float:
    if moment.tzinfo is None:
        raise ValueError("run_at must be timezone-aware (e.g. datetime.now(timezone.utc))")
    return moment.timestamp()
