"""Storage verbs: every change of a job or a server, each one transaction.

Process code never builds SQL; it calls these verbs. Every write about a
running job is conditional on its lease token, so a run that lost its job
(handed off, reaped, requeued by an operator) can never record anything: the
write matches no row, is refused, and leaves a `stale_write` event behind.
"""

import functools
import json
import re
import uuid
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import (
    ARRAY,
    BigInteger,
    Float,
    Integer,
    Text,
    and_,
    any_,
    bindparam,
    case,
    cast,
    delete,
    exists,
    false,
    func,
    insert,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError

from supervisor.database import MYSQL_MULTI_STATEMENTS, unavailable
from supervisor.dbtime import db_now
from supervisor.errors import ActionRefused, InvalidFilter, JobNotFound
from supervisor.jobspec import QUEUE_NAME, RELEASE_WINDOW_S, NewJob
from supervisor.records import FINISHED_STATES, JOB_STATES, Event, Job, Server
from supervisor.snapshot import Snapshot, read_counts, read_paused, read_servers, read_snapshot
from supervisor.tables import (
    chores as chore_table,
    events,
    jobs,
    queues as queue_settings,
    recurring as recurring_table,
    recurring_ticks,
    servers,
)
from supervisor.wakeup import WAKE_CHANNEL, Candidate, pick_targets, server_channel, wakes_everyone

MAX_ERROR_CHARS = 64_000
LIVE_SERVER_STATES = ("running", "stopping")


@dataclass(frozen=True)
class Beat:
    """What a heartbeat learned: the server's state (see Storage.heartbeat)
    and the fleet chores this server took and must do now."""

    state: str | None
    chores: tuple[str, ...] = ()
    now: float | None = None  # the database clock during the beat
    # Rows (name, definition, added_at) of shiftchange_recurring, when asked for.
    recurring: tuple = ()


@dataclass(frozen=True)
class Enqueued:
    """What an enqueue did with one spec: the job's id, and whether the job
    was already there (a unique_key held by an active job)."""

    id: int
    existed: bool = False


UNIQUE_RETRIES = 5  # a concurrent producer inserted the same key first: look again
ACTIVE_STATES = ("enqueued", "scheduled", "processing")


# What a new job's row holds besides its spec's values (database clock).
_NEW_JOB_VALUES = dict(
    run_at=func.coalesce(bindparam("given_run_at", type_=Float), db_now() + bindparam("delay", type_=Float)),
    created_at=db_now(), attempts=0, interruptions=0, lease=0,
)
# Types of the fields of a PostgreSQL bulk insert's JSON rows (the rest: text).
_FIELD_TYPES = {"job_id": BigInteger, "priority": Integer, "max_attempts": Integer, "max_interruptions": Integer,
                "given_run_at": Float, "delay": Float, "timeout": Float, "recurring_tick": Float}


def _later(spec: NewJob) -> bool:
    """Is the job scheduled (for a given moment or after a delay)?"""
    return spec.run_at is not None or spec.delay > 0


@dataclass(frozen=True)
class Requeued:
    """A job that a handoff or reap took back: its id and new lease token."""

    id: int
    lease: int
    failed: bool  # True when it was past max_interruptions and failed instead
    server: str | None = None  # the server it was taken from


SCAN_WINDOW = 100_000  # job ids a target or text filter looks at per page
COUNTED_STATES = ("enqueued", "scheduled", "processing", "failed")


@dataclass(frozen=True)
class JobFilter:
    """Which jobs a list or a bulk action means; every field optional.
    Build it with JobFilter.parse() from untrusted input."""

    state: str | None = None
    queue: str | None = None
    target: str | None = None
    text: str | None = None  # a substring of the JSON arguments
    server: str | None = None  # a server id: the jobs it runs

    @classmethod
    def parse(cls, state=None, queue=None, target=None, text=None, server=None) -> "JobFilter":
        """A filter from user input (empty means unset), or InvalidFilter."""
        state, queue, target, text, server = (
            (value.strip() or None) if isinstance(value, str) else value
            for value in (state, queue, target, text, server)
        )
        if state is not None and state not in JOB_STATES:
            raise InvalidFilter(f"state {state!r} is not one of {', '.join(JOB_STATES)}")
        if queue is not None and not QUEUE_NAME.match(queue):
            raise InvalidFilter(f"queue {queue!r} is not a valid queue name")
        for name, value, longest in (("target", target, 1000), ("text", text, 200), ("server", server, 32)):
            if value is not None and len(value) > longest:
                raise InvalidFilter(f"{name} is longer than {longest} characters")
        return cls(state, queue, target, text, server)

    @property
    def needs_window(self) -> bool:
        """True when no index serves the filter (see Storage.job_page)."""
        return self.target is not None or self.text is not None

    def conditions(self) -> list:
        where = []
        if self.state is not None:
            where.append(jobs.c.state == self.state)
        if self.queue is not None:
            where.append(jobs.c.queue == self.queue)
        if self.server is not None:
            where.append(jobs.c.server_id == self.server)
        if self.target is not None:
            where.append(jobs.c.target == self.target)
        if self.text is not None:
            # A literal substring: % and _ typed by a person match themselves.
            escaped = self.text.replace("!", "!!").replace("%", "!%").replace("_", "!_")
            where.append(jobs.c.args.like(f"%{escaped}%", escape="!") |
                         jobs.c.kwargs.like(f"%{escaped}%", escape="!"))
        return where

    def to_dict(self) -> dict:
        return {k: v for k, v in (("state", self.state), ("queue", self.queue), ("target", self.target),
                                  ("text", self.text), ("server", self.server)) if v is not None}


@dataclass(frozen=True)
class JobPage:
    jobs: list[Job]
    next_before: int | None  # pass as `before` for the next page; None: no more
    searched_to: int | None  # set when a windowed search stopped at this id


@dataclass(frozen=True)
class EventHistogram:
    start: float  # epoch seconds of the first bucket's start
    width: float  # seconds per bucket
    counts: dict[str, list[int]]  # kind -> count per bucket, oldest first


@dataclass(frozen=True)
class EventDelta:
    last_id: int
    counts: dict[str, int]
    run_times: list[float]


# --- the verbs -----------------------------------------------------------------


@dataclass
class ClaimNext:
    """A claim made in the same transaction as a reused job process's
    outcome (complete or fail with `then_claim`): its next job, for its
    server, with exactly the checks of Storage.claim; one commit per job
    instead of two. Only callable jobs: a command needs a fresh child."""

    server_id: str
    queues: tuple[str, ...]
    release: str | None = None
    limit: int = 1
    callables_only: bool = False
    after: tuple[int, int] | None = None  # (job id, lease) of the run whose outcome this claim goes with
    claimed: list = None  # the jobs taken: read it only once the write returned (committed)

    def marker(self) -> str:
        """Ends the `claimed` event's detail: which run's write claimed it
        (settled_claim finds the claim of a write whose commit is in doubt)."""
        return "" if self.after is None else f", with the outcome of job {self.after[0]} (lease {self.after[1]})"


class Storage:
    """The queue's database, as a small set of transactional verbs."""

    def __init__(self, engine: Engine, release_window: float = RELEASE_WINDOW_S):
        self.engine = engine
        # A job this storage takes back from a server of release R is left
        # to servers of another release for this long (see claim).
        self.release_window = release_window
        # SQLite has one writer at a time; the others lock the rows they take.
        self.locks_rows = engine.dialect.name != "sqlite"
        self.notifies = engine.dialect.name == "postgresql"
        # PostgreSQL takes jobs back in one statement (data-modifying CTEs).
        self.takes_back_in_one = engine.dialect.name == "postgresql"

    @contextmanager
    def _transaction(self, write: bool):
        try:
            with self.engine.connect() as conn:
                if write:
                    conn.execution_options(sqlite_begin="IMMEDIATE")
                with conn.begin():
                    yield conn
        except (OperationalError, InterfaceError) as exc:
            raise unavailable(self.engine, exc) from None

    @contextmanager
    def _single_statement(self):
        """A connection whose every statement commits by itself: a write
        that is one statement takes one round trip (no BEGIN, no COMMIT)."""
        try:
            with self.engine.connect() as conn:
                yield conn.execution_options(isolation_level="AUTOCOMMIT")
        except (OperationalError, InterfaceError) as exc:
            raise unavailable(self.engine, exc) from None

    def _write(self):
        return self._transaction(write=True)

    def _read(self):
        return self._transaction(write=False)

    def _for_update(self, query, skip_locked=False, read=False):
        if not self.locks_rows:
            return query
        return query.with_for_update(skip_locked=skip_locked, read=read)

    def _wake(self, conn, wanted: dict[str, int] | None = None) -> None:
        """Tell idle supervisors that jobs became claimable (PostgreSQL
        NOTIFY, delivered at commit); elsewhere they find out by polling.
        With `wanted` ({queue: jobs}), only a few idle servers serving
        those queues are woken (see wakeup.pick_targets); else all."""
        if not self.notifies or wanted == {}:
            return  # nothing claimable yet (only scheduled jobs): nobody to wake
        targeted = wanted is not None and not wakes_everyone(wanted)
        # The servers are read only when a few of them are to be picked.
        targets = pick_targets(self._wake_candidates(conn), wanted) if targeted else None
        if targets is None:
            conn.execute(text(f"NOTIFY {WAKE_CHANNEL}"))
        for server_id in targets or ():
            conn.execute(select(func.pg_notify(server_channel(server_id), "")))

    def _wake_candidates(self, conn) -> list[Candidate]:
        """Live, running, not quiet servers and how many jobs each runs:
        one read over the servers' liveness index and the jobs' server index."""
        busy = (select(func.count()).select_from(jobs)
                .where(jobs.c.server_id == servers.c.id, jobs.c.state == "processing")
                .scalar_subquery())
        rows = conn.execute(
            select(servers.c.id, servers.c.queues, servers.c.concurrency, busy.label("busy"), servers.c.version)
            .where(servers.c.state == "running", servers.c.quiet == false(),
                   servers.c.heartbeat_at + servers.c.dead_after >= db_now())
        ).all()
        return [Candidate(*row) for row in rows]

    def _record(self, conn, rows: list[dict]) -> None:
        """Append events: dicts of job_id, kind, server_id, detail."""
        if rows:
            conn.execute(_INSERT_EVENTS, rows)

    def now(self) -> float:
        """The database clock, in epoch seconds."""
        with self._read() as conn:
            return conn.execute(select(db_now())).scalar_one()

    # producers ---------------------------------------------------------------

    def enqueue(self, *specs: NewJob) -> list[int]:
        """Insert jobs, each with an `enqueued` event. All or nothing.
        Returns their ids (for a unique_key already held: the holder's)."""
        return [done.id for done in self.enqueue_jobs(specs)]

    def enqueue_jobs(self, specs) -> list[Enqueued]:
        """Insert jobs in one transaction, all or nothing. A spec whose
        unique_key an enqueued, scheduled or processing job holds is not
        inserted: its Enqueued names that job, existed=True (a key given
        twice in `specs`: the first one's job). The unique index decides
        between concurrent producers: the loser's insert fails, and it looks
        again in a new transaction."""
        specs = list(specs)
        for attempt in range(UNIQUE_RETRIES):
            try:
                with self._write() as conn:
                    done = self._insert_unless_held(conn, specs)
                    self._wake(conn, _claimable_now(specs, done))
                    return done
            except IntegrityError:
                if attempt == UNIQUE_RETRIES - 1:
                    raise

    def _insert_unless_held(self, conn, specs: list[NewJob]) -> list[Enqueued]:
        holders = self._key_holders(conn, {spec.unique_key for spec in specs if spec.unique_key is not None})
        new, first_of_key = [], {}  # indexes of the specs to insert; key -> its spec's index
        for index, spec in enumerate(specs):
            key = spec.unique_key
            if key is None or (key not in holders and key not in first_of_key):
                new.append(index)
                if key is not None:
                    first_of_key[key] = index
        ids = dict(zip(new, self._insert_jobs(conn, [specs[index] for index in new])))
        return [
            Enqueued(ids[index]) if index in ids
            else Enqueued(holders[spec.unique_key] if spec.unique_key in holders else ids[first_of_key[spec.unique_key]],
                          existed=True)
            for index, spec in enumerate(specs)
        ]

    def _insert_job(self, conn, spec: NewJob, recurring: tuple[str, float] | None = None) -> int:
        """Insert one job (a recurring entry's tick: (name, tick))."""
        return self._insert_jobs(conn, [spec], recurring)[0]

    def _key_holders(self, conn, keys: set[str]) -> dict[str, int]:
        """{key: id} of the active jobs holding these unique keys, in one
        read. A key still held by a finished job (left by a server of 0.1,
        which does not clear it) is freed, fenced by the state read."""
        if not keys:
            return {}
        holders = {}
        if conn.dialect.name == "postgresql":
            # One array parameter, not an IN list of 100: psycopg prepares a
            # statement run 5 times, and the generic plan PostgreSQL keeps for
            # an IN list of parameters was a sequential scan planned while the
            # table was small, re-run for every batch as it grew (100,000 jobs
            # with 10 % keys: 7,700 jobs/s, 18,000 without keys).
            held = jobs.c.unique_active == any_(cast(bindparam("keys", sorted(keys)), ARRAY(jobs.c.unique_active.type)))
        else:
            held = jobs.c.unique_active.in_(sorted(keys))
        for row in conn.execute(select(jobs.c.id, jobs.c.state, jobs.c.unique_active).where(held)):
            if row.state in ACTIVE_STATES:
                holders[row.unique_active] = row.id
            else:
                conn.execute(update(jobs).where(jobs.c.id == row.id, jobs.c.state == row.state)
                             .values(unique_active=None))
        return holders

    def _insert_jobs(self, conn, specs: list[NewJob], recurring: tuple[str, float] | None = None) -> list[int]:
        """Insert jobs and their `enqueued` events; their ids, in order. A
        batch is one INSERT for its jobs and one for its events, not two
        round trips per job (docs/benchmarks.md, "Bulk enqueue")."""
        if not specs:
            return []
        rows = [
            dict(queue=spec.queue, kind=spec.kind, target=spec.target, args=spec.args_json,
                 kwargs=spec.kwargs_json, priority=spec.priority, state="scheduled" if _later(spec) else "enqueued",
                 given_run_at=spec.run_at, delay=spec.delay, max_attempts=spec.max_attempts,
                 max_interruptions=spec.max_interruptions, unique_key=spec.unique_key,
                 unique_active=spec.unique_key, timeout=spec.timeout,
                 recurring=recurring and recurring[0], recurring_tick=recurring and recurring[1])
            for spec in specs
        ]
        if conn.dialect.name == "postgresql":
            ids = self._insert_jobs_from_json(conn, rows)
        elif conn.dialect.insert_executemany_returning_sort_by_parameter_order:
            # SQLite, MariaDB: SQLAlchemy's "insertmanyvalues", one
            # multi-row INSERT ... RETURNING per 1,000 rows.
            statement = insert(jobs).values(**_NEW_JOB_VALUES).returning(jobs.c.id, sort_by_parameter_order=True)
            ids = list(conn.execute(statement, rows).scalars())
        else:  # MySQL has no RETURNING: one INSERT a job
            statement = insert(jobs).values(**_NEW_JOB_VALUES)
            ids = [conn.execute(statement, row).inserted_primary_key[0] for row in rows]
        events_rows = [
            dict(job_id=job_id, kind="enqueued", server_id=None,
                 detail=f"queue {spec.queue}" + (" (scheduled)" if _later(spec) else "")
                 + (f" (recurring {recurring[0]})" if recurring else ""))
            for job_id, spec in zip(ids, specs)
        ]
        if conn.dialect.name == "postgresql":
            conn.execute(_insert_from_json(events, events_rows, {"at": db_now()}))
        else:
            self._record(conn, events_rows)  # executemany: the driver sends it as one
        return ids

    def _insert_jobs_from_json(self, conn, rows: list[dict]) -> list[int]:
        """PostgreSQL: the sequence gives ids in the ORDER BY's order, so the
        sorted ids returned are the rows' (as SQLAlchemy's own sorted
        RETURNING assumes)."""
        def computed(field):
            return {**_NEW_JOB_VALUES, "run_at": func.coalesce(field("given_run_at"), db_now() + field("delay"))}

        return sorted(conn.execute(_insert_from_json(jobs, rows, computed).returning(jobs.c.id)).scalars())

    # servers -----------------------------------------------------------------

    def register_server(
        self, *, name, host, pid, pid_started_at, queues, concurrency, dead_after, release=None
    ) -> str:
        """Register a new running server; returns its new id. It records the
        shiftchange version it runs, so `db upgrade` can tell which live
        servers a contract step would break, and the deploy release it
        belongs to (None: none), which claims and take-backs read."""
        from supervisor import __version__

        server_id = uuid.uuid4().hex
        with self._write() as conn:
            conn.execute(
                insert(servers).values(
                    id=server_id,
                    name=name,
                    host=host,
                    pid=pid,
                    pid_started_at=pid_started_at,
                    state="running",
                    queues=json.dumps(list(queues)),
                    concurrency=concurrency,
                    dead_after=dead_after,
                    started_at=db_now(),
                    heartbeat_at=db_now(),
                    version=__version__,
                    release=release,
                )
            )
        return server_id

    def heartbeat(self, server_id: str) -> str | None:
        """The server's heartbeat alone; see beat()."""
        return self.beat(server_id).state

    def beat(self, server_id: str, chores: dict[str, float] | None = None, recurring: bool = False) -> Beat:
        """A heartbeat, and in the same transaction the fleet chores
        ({name: interval in seconds}) that are due and that this server
        takes: one row each in shiftchange_chores, taken by moving its
        `due_at` (database clock) forward. Among servers beating at once,
        the row lock lets one UPDATE match; the others match no row. So a
        chore is done about once per interval across the fleet, by
        whichever server comes first, with no leader to lose. The chore
        rows are read without a lock first, so a beat with nothing due
        writes nothing but the server's own row.

        The server's refreshed heartbeat is also the lease of every job
        it runs (a job's lease lasts as long as its server's heartbeat is
        fresh, so one row write extends them all). `state`: `running` when
        the heartbeat was recorded, `quiet` when it was and the server is
        asked not to claim; `dead`, `stopping` or `stopped` when someone
        else decided this server is finished; None when its row is gone.
        Chores are only taken by a server whose heartbeat was recorded.

        With `recurring`, it also reads the recurring entries added through
        the API (a read of a small table, no write), so a server learns of
        them without a transaction of its own."""
        with self._write() as conn:
            beat = conn.execute(
                update(servers)
                .where(servers.c.id == server_id, servers.c.state == "running")
                .values(heartbeat_at=db_now())
            )
            row = conn.execute(
                select(servers.c.state, servers.c.quiet, db_now().label("now")).where(servers.c.id == server_id)
            ).first()
            if beat.rowcount != 1:
                return Beat(None if row is None else row.state)
            state = "quiet" if row.quiet else "running"
            entries = tuple(conn.execute(select(recurring_table)).all()) if recurring else ()
            return Beat(state, self._take_chores(conn, chores or {}), row.now, entries)

    def _take_chores(self, conn, wanted: dict[str, float]) -> tuple[str, ...]:
        if not wanted:
            return ()
        rows = dict(conn.execute(
            select(chore_table.c.name, chore_table.c.due_at <= db_now())
            .where(chore_table.c.name.in_(list(wanted)))
        ).all())
        missing = [name for name in wanted if name not in rows]
        if missing:  # first use on this database: due at once
            conn.execute(self._insert_ignoring_duplicates(chore_table), [dict(name=n, due_at=0.0) for n in missing])
        taken = []
        for name in wanted:
            if rows.get(name, True):
                moved = conn.execute(
                    update(chore_table)
                    .where(chore_table.c.name == name, chore_table.c.due_at <= db_now())
                    .values(due_at=db_now() + wanted[name], runs=chore_table.c.runs + 1)
                ).rowcount
                if moved == 1:
                    taken.append(name)
        return tuple(taken)

    def _insert_ignoring_duplicates(self, table):
        """INSERT that skips rows whose key exists (another server made them)."""
        dialect = self.engine.dialect.name
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            return pg_insert(table).on_conflict_do_nothing()
        if dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert

            return sqlite_insert(table).on_conflict_do_nothing()
        return insert(table).prefix_with("IGNORE")

    # recurring jobs ----------------------------------------------------------

    def enqueue_ticks(self, ticks, server_id: str | None) -> list[tuple[str, float, int | None]]:
        """Enqueue recurring ticks, given as (entry name, tick time, NewJob),
        in one transaction: for each, insert its row in
        shiftchange_recurring_ticks, and only if this insert created the
        row, the job (its id goes into the row). The primary key (name,
        tick_at) lets one insert per tick create the row, on every
        database: another server's insert waits for this transaction and
        then does nothing (ON CONFLICT DO NOTHING, INSERT IGNORE; SQLite
        has one writer). So each tick is enqueued exactly once, however
        many servers try, and by no leader. Returns (name, tick, job id)
        for each tick, the id None where another server enqueued it."""
        done = []
        with self._write() as conn:
            made = []
            # One order on every server, so two servers' row locks never deadlock.
            for name, tick, spec in sorted(ticks, key=lambda item: (item[0], item[1])):
                if not self._insert_tick(conn, name, tick, server_id):
                    done.append((name, tick, None))
                    continue
                job_id = self._insert_job(conn, spec, recurring=(name, tick))
                conn.execute(update(recurring_ticks).where(recurring_ticks.c.name == name,
                                                           recurring_ticks.c.tick_at == tick).values(job_id=job_id))
                done.append((name, tick, job_id))
                made.append(spec)
            if made:
                self._wake(conn, _claimable_now(made))
        return done

    def _insert_tick(self, conn, name: str, tick: float, server_id: str | None) -> bool:
        """Insert a tick's row unless it exists; True if this insert made it.
        RETURNING says so on PostgreSQL and SQLite (psycopg reports no
        rowcount for this INSERT); MySQL's INSERT IGNORE counts the row."""
        insert_tick = self._insert_ignoring_duplicates(recurring_ticks).values(
            name=name, tick_at=tick, server_id=server_id, enqueued_at=db_now())
        if self.engine.dialect.name in ("postgresql", "sqlite"):
            return conn.execute(insert_tick.returning(recurring_ticks.c.name)).first() is not None
        return conn.execute(insert_tick).rowcount == 1

    def last_ticks(self, names=None) -> dict[str, tuple[float, int | None]]:
        """The newest enqueued tick of each entry (of `names`; None: all),
        with its job's id: {name: (tick time, job id)}."""
        newest = select(recurring_ticks.c.name, func.max(recurring_ticks.c.tick_at).label("tick_at")) \
            .group_by(recurring_ticks.c.name)
        if names is not None:
            newest = newest.where(recurring_ticks.c.name.in_(list(names)))
        newest = newest.subquery()
        query = select(recurring_ticks.c.name, recurring_ticks.c.tick_at, recurring_ticks.c.job_id).join(
            newest, and_(recurring_ticks.c.name == newest.c.name, recurring_ticks.c.tick_at == newest.c.tick_at))
        with self._read() as conn:
            return {row.name: (row.tick_at, row.job_id) for row in conn.execute(query)}

    def recurring_rows(self) -> list:
        """The recurring entries added through the API: (name, definition, added_at) rows."""
        with self._read() as conn:
            return conn.execute(select(recurring_table).order_by(recurring_table.c.name)).all()

    def put_recurring(self, name: str, definition: str) -> bool:
        """Add the API entry `name`, or replace its definition (keeping
        when it was first added). True when it was new."""
        for attempt in range(2):
            try:
                with self._write() as conn:
                    changed = conn.execute(update(recurring_table).where(recurring_table.c.name == name)
                                           .values(definition=definition, changed_at=db_now())).rowcount
                    if changed:
                        return False
                    conn.execute(insert(recurring_table).values(name=name, definition=definition,
                                                                added_at=db_now(), changed_at=db_now()))
                    return True
            except IntegrityError:  # a concurrent add of the same name: replace it
                if attempt:
                    raise

    def delete_recurring(self, name: str) -> bool:
        """Remove the API entry `name`; False if there was none. Its ticks
        stay (retention sweeps them), so a server that still runs it for
        up to one heartbeat cannot enqueue a tick twice."""
        with self._write() as conn:
            return conn.execute(delete(recurring_table).where(recurring_table.c.name == name)).rowcount == 1

    def sweep_ticks(self, keep: float) -> int:
        """Delete tick rows older than `keep` seconds, but the newest of
        each entry: a server starting later counts missed ticks from it."""
        removed = 0
        for name, (newest, _) in self.last_ticks().items():
            with self._write() as conn:
                removed += conn.execute(delete(recurring_ticks).where(
                    recurring_ticks.c.name == name, recurring_ticks.c.tick_at < newest,
                    recurring_ticks.c.enqueued_at < db_now() - keep)).rowcount
        return removed

    def set_quiet(self, server_ids, quiet: bool = True) -> list[str]:
        """Ask live servers to stop claiming (quiet) or to claim again. A
        quiet server keeps running its jobs and heartbeating; its state stays
        `running`, so every reaper, old releases' included, still sees it
        alive. Claims read the flag in their own transaction, so it holds
        from the commit on. Returns the ids changed."""
        ids = [server_ids] if isinstance(server_ids, str) else list(server_ids)
        with self._write() as conn:
            live = conn.execute(
                select(servers.c.id).where(servers.c.id.in_(ids), servers.c.state.in_(LIVE_SERVER_STATES))
            ).scalars().all()
            if live:
                conn.execute(update(servers).where(servers.c.id.in_(live)).values(quiet=quiet))
            return list(live)

    # claiming and results ----------------------------------------------------

    def claim(
        self, server_id: str, queues, limit: int = 1, probe: bool = False, release: str | None = None
    ) -> list[Job]:
        """Take up to `limit` due jobs from `queues`, highest priority then
        oldest first, for a server that is still `running`. Each gets a new
        lease token and one more attempt. No job goes to two claimers: other
        databases skip rows locked by a concurrent claim, SQLite has one
        writer at a time. With `probe` (an idle server polling), SQLite first
        looks for due jobs in a read transaction, so that idle servers do not
        contend for the write lock to find nothing.

        A claimer of `release` R leaves alone the jobs taken back from a
        server of R until their avoid_until, while a live server of another
        release serves their queue (see _left_to_others). Without a release
        the claim is exactly what it was before releases existed."""
        if probe and not self.locks_rows and not self._anything_due(queues, release):
            return []
        wanted = ClaimNext(server_id, tuple(queues), release, limit)
        with self._write() as conn:
            claimed = self._claim_in(conn, wanted)
            self._record(conn, _claimed_events(claimed, wanted))
            return claimed

    def _claim_in(self, conn, wanted: "ClaimNext") -> list[Job]:
        """claim() inside the transaction `conn` (a supervisor's own, or a
        reused job process's outcome write: see ClaimNext), without its
        events (_claimed_events), so that a caller writes all of its
        transaction's events in one statement."""
        if self.locks_rows:
            # Read under a share lock of the server row, which the handoff
            # and the reaper update: a claim and a handoff of one server
            # are serialized, so no claim lands after its jobs were taken back.
            # A row locked by another transaction (a handoff, a heartbeat) is
            # skipped, and nothing claimed: a slot's claim comes after its
            # outcome write locked its job's row, which the handoff may be
            # waiting for; waiting in turn would deadlock the two.
            server = conn.execute(_CLAIMING_SERVER, {"server_id": wanted.server_id}).first()
            if server is None or server.state != "running" or server.quiet:
                return []
        # A paused queue's jobs stay enqueued (_due reads the pause in
        # this claiming transaction, so every server honours a pause
        # from its commit on, with nothing to restart or notify).
        others = self._left_to_others(conn, wanted.release, wanted.queues)
        if others:
            due = self._for_update(
                select(jobs.c.id).where(_due(wanted.queues), *others, *_claim_conditions(self.locks_rows, wanted.callables_only))
                .order_by(jobs.c.priority.desc(), jobs.c.id).limit(wanted.limit),
                skip_locked=True,
            )
        else:  # the usual claims: the same statements every time
            due = _due_ids(wanted.queues, wanted.limit, self.locks_rows, wanted.callables_only)
        ids = conn.execute(due, {"claimer": wanted.server_id}).scalars().all()
        if not ids:
            return []
        return self._take(conn, ids, wanted.server_id)

    def _take(self, conn, ids: list[int], server_id: str) -> list[Job]:
        """Mark the (locked) jobs `ids` processing for `server_id`, with a
        new lease and one more attempt; their rows, highest priority then
        oldest first. One statement where the database has UPDATE ...
        RETURNING (PostgreSQL, SQLite), two on MariaDB."""
        values = {"ids": ids, "claimer": server_id}
        if self.engine.dialect.update_returning:
            rows = conn.execute(_CLAIM_UPDATE_RETURNING, values).all()
            rows.sort(key=lambda row: (-row.priority, row.id))
        else:
            conn.execute(_CLAIM_UPDATE, values)
            rows = conn.execute(_CLAIMED_ROWS, values).all()
        return [Job.from_row(row) for row in rows]

    def due_in(self, queues) -> float | None:
        """An idle server's poll: one read of the claim index's `enqueued`
        slice. Seconds until the first enqueued job of `queues` (not
        paused) may be claimed, by the database clock: 0 or less when one
        is due now (claim), more when the first is held (a handoff's or an
        operator's requeue hold, which no NOTIFY announces when it ends),
        None when there is none."""
        with self._read() as conn:
            first, now = conn.execute(  # one statement: a poll is one round trip
                select(func.min(jobs.c.run_at), db_now())
                .where(jobs.c.state == "enqueued", jobs.c.queue.in_(list(queues)), ~_PAUSED)
            ).one()
            return None if first is None else first - now

    def _anything_due(self, queues, release: str | None = None) -> bool:
        with self._read() as conn:
            return conn.execute(
                select(jobs.c.id).where(_due(queues), *self._left_to_others(conn, release, queues)).limit(1)
            ).first() is not None

    def _left_to_others(self, conn, release: str | None, queues) -> list:
        """The extra claim conditions of a server of `release` R: a job taken
        back from a server of R (avoid_release = R) is left alone until its
        avoid_until, so that a server of another release takes it and a
        rolling deploy moves it once -- but only in the queues that a live
        server of another release serves: running, not quiet, heartbeat
        fresh by its own dead_after. Read in the claim's own transaction, so
        when no such server is up nothing waits for one that does not exist.
        No condition at all when the claimer has no release."""
        if release is None:
            return []
        others = conn.execute(
            select(servers.c.queues).where(
                servers.c.state == "running",
                servers.c.quiet == false(),
                servers.c.heartbeat_at + servers.c.dead_after >= db_now(),
                servers.c.release.is_not(None),
                servers.c.release != release,
            )
        ).scalars().all()
        served = {name for text_ in others for name in json.loads(text_)}
        covered = sorted(served.intersection(queues))
        if not covered:
            return []
        return [
            or_(
                jobs.c.avoid_release.is_(None),
                jobs.c.avoid_release != release,
                jobs.c.avoid_until <= db_now(),
                jobs.c.queue.not_in(covered),
            )
        ]

    # pausing queues ------------------------------------------------------------

    def pause_queue(self, name: str) -> bool:
        """Pause a queue: no server claims its jobs, which stay `enqueued`
        (jobs already running go on). One transaction; claims read it in
        theirs, so it holds for every server from the commit on. Returns
        False when it was paused already."""
        return self._set_paused(name, True)

    def resume_queue(self, name: str) -> bool:
        """Let servers claim a paused queue's jobs again, from the commit on.
        Returns False when it was not paused."""
        return self._set_paused(name, False)

    def paused_queues(self) -> set[str]:
        """The names of the paused queues."""
        with self._read() as conn:
            return read_paused(_fetch(conn))

    def _set_paused(self, name: str, paused: bool) -> bool:
        if not isinstance(name, str) or not QUEUE_NAME.match(name):
            raise InvalidFilter(f"queue name {name!r} is not valid: 1-200 of letters, digits and _ . : @ / -")
        try:
            return self._write_paused(name, paused)
        except IntegrityError:
            # Two first-ever pauses of one queue inserted its row at once:
            # the row exists now, so the second try is a plain update.
            return self._write_paused(name, paused)

    def _write_paused(self, name: str, paused: bool) -> bool:
        with self._write() as conn:
            was = conn.execute(
                self._for_update(select(queue_settings.c.paused).where(queue_settings.c.name == name))
            ).scalar_one_or_none()
            if bool(was) == paused:
                return False
            if was is None:
                conn.execute(insert(queue_settings).values(name=name, paused=paused, changed_at=db_now()))
            else:
                conn.execute(update(queue_settings).where(queue_settings.c.name == name)
                             .values(paused=paused, changed_at=db_now()))
            if not paused:
                self._wake(conn)  # idle servers may claim its jobs now
            return True

    def _fenced(self, job_id: int, lease: int):
        """The row of a job still processing under this lease."""
        return and_(jobs.c.id == job_id, jobs.c.lease == lease, jobs.c.state == "processing")

    def _refuse_stale(self, conn, job_id, lease, server_id, action) -> None:
        current = conn.execute(
            select(jobs.c.state, jobs.c.lease).where(jobs.c.id == job_id)
        ).first()
        now_holds = "the job is gone" if current is None else (
            f"the job is {current.state} under lease {current.lease}"
        )
        detail = f"{action} with lease {lease} ignored: {now_holds}"
        if current is not None:
            self._record(conn, [dict(job_id=job_id, kind="stale_write", server_id=server_id, detail=detail)])

    def complete(self, job_id: int, lease: int, server_id: str, result: str | None = None,
                 then_claim: ClaimNext | None = None) -> bool:
        """Mark the job succeeded, store its `result` (JSON text, or None)
        and clear its checkpoint; then, in the same transaction, make the
        claim `then_claim` asks for. False (and a `stale_write` event, and
        no claim) when the lease no longer matches."""
        with self._write() as conn:
            done = conn.execute(_COMPLETE, {"fenced_id": job_id, "fenced_lease": lease, "outcome": result})
            if done.rowcount != 1:
                self._refuse_stale(conn, job_id, lease, server_id, "success")
                return False
            self._record(conn, [dict(job_id=job_id, kind="succeeded", server_id=server_id, detail=None),
                                *self._claim_next(conn, then_claim)])
            return True

    def _claim_next(self, conn, wanted: ClaimNext | None) -> list[dict]:
        """The claim of an outcome's write (if asked); its events."""
        if wanted is None:
            return []
        wanted.claimed = self._claim_in(conn, wanted)
        return _claimed_events(wanted.claimed, wanted)

    def give_back_claims_of(self, job_id: int, lease: int, server_id: str) -> list[tuple[Job, str]]:
        """Give back, requeued at once as an interruption, what a write of
        the outcome of run (`job_id`, `lease`) claimed for `server_id`, if
        that write committed. For a write its slot gave up on: the slot
        runs only a claim it saw commit, so such a job runs nowhere. Each
        job given back, with its new state."""
        wanted = ClaimNext(server_id, (), after=(job_id, lease))
        if self.settled_claim(wanted) is None:
            return []
        reason = f"claimed with the outcome of job {job_id} by a reused process that had given up on that write"
        return [(job, self.give_back(job.id, job.lease, server_id, reason)) for job in wanted.claimed]

    def settled_claim(self, wanted: ClaimNext) -> str | None:
        """After the write of the outcome of run `wanted.after` (job id,
        lease) with the claim `wanted` failed with its commit in doubt: None
        when it did not commit (the job is still processing under that
        lease: write again). Otherwise the job's state ("stale" when its
        lease moved on: someone else took it), and wanted.claimed the jobs
        that write claimed and this server still holds under that claim's
        lease, found by their `claimed` event."""
        (job_id, lease), server_id = wanted.after, wanted.server_id
        with self._read() as conn:
            row = conn.execute(select(jobs.c.state, jobs.c.lease).where(jobs.c.id == job_id)).first()
            if row is not None and row.state == "processing" and row.lease == lease:
                return None
            claims = conn.execute(
                select(events.c.job_id, events.c.detail).where(
                    events.c.kind == "claimed", events.c.server_id == server_id,
                    events.c.detail.like("%" + wanted.marker()))
            ).all()
            leases = {claimed_id: int(re.search(r"lease (\d+)", detail).group(1)) for claimed_id, detail in claims}
            rows = conn.execute(select(jobs).where(
                jobs.c.id.in_(list(leases)), jobs.c.state == "processing", jobs.c.server_id == server_id)).all()
        wanted.claimed = [Job.from_row(r) for r in rows if r.lease == leases[r.id]]
        return "stale" if row is None or row.lease != lease else row.state

    def fail(
        self, job_id: int, lease: int, server_id: str, error: str, *,
        retry_backoff: float, retry: bool = True, result: str | None = None, then_claim: ClaimNext | None = None,
    ) -> str:
        """Record a failed run. Under max_attempts (and when `retry`), the job
        is `scheduled` again after retry_backoff * 2^(attempts-1) seconds;
        otherwise it is `failed` with the error (and `result`: a command's
        exit code and output) kept; then `then_claim`, as for complete().
        Returns the new state, or "stale" when the lease no longer matches."""
        error = error[-MAX_ERROR_CHARS:]
        with self._write() as conn:
            row = conn.execute(
                self._for_update(select(jobs.c.attempts, jobs.c.max_attempts).where(self._fenced(job_id, lease)))
            ).first()
            if row is None:
                self._refuse_stale(conn, job_id, lease, server_id, "failure")
                return "stale"
            if retry and row.attempts < row.max_attempts:
                delay = retry_backoff * 2 ** (row.attempts - 1)
                values = dict(state="scheduled", run_at=db_now() + delay, server_id=None)
                kind, detail = "retry_scheduled", f"attempt {row.attempts} of {row.max_attempts} failed; retry in {delay:g}s: {_summary(error)}"
            else:
                values = dict(state="failed", finished_at=db_now(), unique_active=None)
                kind, detail = "failed", _summary(error)
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(error=error, result=result, **values))
            self._record(conn, [dict(job_id=job_id, kind=kind, server_id=server_id, detail=detail),
                                *self._claim_next(conn, then_claim)])
            return values["state"]

    def checkpoint(self, job_id: int, lease: int, server_id: str | None, data_json: str) -> bool:
        """Store a job's progress, only while this run still holds the lease."""
        with self._write() as conn:
            saved = conn.execute(
                update(jobs).where(self._fenced(job_id, lease)).values(checkpoint=data_json)
            )
            if saved.rowcount != 1:
                self._refuse_stale(conn, job_id, lease, server_id, "checkpoint")
                return False
            return True

    def give_back(self, job_id: int, lease: int, server_id: str, reason: str) -> str:
        """The run ended by asking to be handed off (HandOff): requeue it at
        once as an interruption, not a failure. Returns the new state or
        "stale"."""
        with self._write() as conn:
            taken = self._take_back(conn, self._fenced(job_id, lease), "handed_off", reason, 0.0)
            if not taken:
                self._refuse_stale(conn, job_id, lease, server_id, "hand-off")
                return "stale"
            self._wake(conn)
            return "failed" if taken[0].failed else "enqueued"

    # handoff and reaping -----------------------------------------------------

    def _take_back(self, conn, which, kind: str, why: str, hold: float, stopping=None) -> list[Requeued]:
        """Requeue the processing jobs matched by `which`: new lease, one more
        interruption, the attempt given back, claimable from now + `hold`,
        and left by servers of the release it ran on to those of another
        release until hold + release_window from now (see claim). A job
        past max_interruptions is failed as poison instead. Each gets an
        event of `kind` saying `why` ("{server}" in it: the id of the
        server it was taken from). The servers in `stopping` become
        `stopping` in the same write (a handoff).

        A few statements whatever the number of jobs: a handoff under full
        CPU load waits for a CPU at every round trip (docs/benchmarks.md,
        section 10). PostgreSQL does it all in one (_pg_take_back); the
        others lock the rows, record the events from them, then update them."""
        values = dict(event_kind=kind, why=why, hold=hold, window=self.release_window)
        if self.takes_back_in_one:
            statement = _PG_HANDOFF if stopping is not None else _pg_take_back(which, stopping=False)
            rows = conn.execute(statement, dict(values, ids=list(stopping or ()))).all()
            return [Requeued(row.id, row.lease, row.failed, row.server_id) for row in rows]
        if stopping is not None:
            conn.execute(_mark_stopping(list(stopping)))
        rows = conn.execute(
            self._for_update(select(*_TAKEN_COLUMNS).where(which, jobs.c.state == "processing"))
        ).all()
        if not rows:
            return []
        ids = [row.id for row in rows]
        conn.execute(_RECORD_TAKEN, dict(values, ids=ids))  # before the update: it reads server_id
        conn.execute(_TAKE_BACK, dict(values, ids=ids))
        return [_requeued(*row) for row in rows]

    def handoff(self, server_ids, hold: float, reason: str) -> list[Requeued]:
        """Step one of a graceful stop, in ONE transaction: the server(s)
        become `stopping` and each of their processing jobs is requeued (see
        _take_back) but held until `hold` seconds from now by the database
        clock, so the old run can be killed before another server starts it.
        From the commit on, nothing those servers ran can be lost. On
        PostgreSQL the transaction is one statement that commits by itself:
        one round trip."""
        ids = [server_ids] if isinstance(server_ids, str) else list(server_ids)
        write = self._single_statement if self.takes_back_in_one else self._write
        with write() as conn:
            if ids and _sends_batches(conn):
                return self._batched_handoff(conn, ids, hold, reason)
            return self._take_back(conn, jobs.c.server_id.in_(ids), "handed_off", reason, hold, stopping=ids)

    def _batched_handoff(self, conn, ids: list[str], hold: float, reason: str) -> list[Requeued]:
        """handoff() on MySQL/MariaDB in one round trip and the COMMIT,
        not five: the statements of _take_back sent as one batch (see
        _mysql_handoff_batch), on a connection of the supervisor's engine
        (make_engine's `batches`). The server sends their results back
        together. A statement that fails ends the batch there, with the
        ones before it done: the connection is dropped, so none of it
        commits."""
        values = dict(event_kind="handed_off", why=reason, hold=hold, window=self.release_window,
                      **{f"server_{i}": server_id for i, server_id in enumerate(ids)})
        cursor = conn.connection.dbapi_connection.cursor()
        try:
            cursor.execute(";\n".join(cursor.mogrify(sql, {**fixed, **values})
                                       for sql, fixed in _mysql_handoff_batch(conn.dialect, len(ids))))
            rows = cursor.fetchall()  # the first statement's: the locked jobs, before the update
            while cursor.nextset():
                pass
        except self.engine.dialect.loaded_dbapi.Error as exc:
            conn.invalidate()
            raise unavailable(self.engine, exc) from None
        finally:
            cursor.close()
        return [_requeued(*row) for row in rows if row[0] is not None]  # None: a server with no job

    def prepare_handoff(self) -> None:
        """Compile the handoff's statements now, so that the real one at
        SIGTERM spends no milliseconds compiling them (SQLAlchemy caches
        what it compiled): a handoff of no server, and, where a take-back
        is several statements, those that only run when there are jobs,
        run on none. Nothing changes."""
        self.handoff([], 0.0, "")
        if self.engine.dialect.name in ("mysql", "mariadb"):
            _mysql_handoff_batch(self.engine.dialect, 1)  # a server's own handoff, batched
        if not self.takes_back_in_one:
            with self._write() as conn:
                nothing = dict(event_kind="", why="", hold=0.0, window=self.release_window, ids=[])
                conn.execute(_RECORD_TAKEN, nothing)
                conn.execute(_TAKE_BACK, nothing)

    def release_handoff(self, server_id: str, held: list[Requeued]) -> None:
        """Step two: the old runs are dead, so the held jobs may start now
        (only those not claimed or changed since), and the server is
        `stopped`. If this never runs, the hold simply expires.

        It also takes back, at once, any job still `processing` under the
        server: one that a slot claimed with its outcome while the handoff
        waited for that transaction's lock on the server row. On PostgreSQL
        the handoff is one statement, whose snapshot predates that claim's
        commit, so it could not see the job; its run is dead now too."""
        with self._write() as conn:
            pairs = [(job.id, job.lease) for job in held if not job.failed]
            if pairs:
                conn.execute(
                    update(jobs)
                    .where(tuple_(jobs.c.id, jobs.c.lease).in_(pairs), jobs.c.state == "enqueued")
                    .values(run_at=db_now())
                )
            late = self._take_back(conn, jobs.c.server_id == server_id, "handed_off",
                                   "claimed while its server handed off; its run was killed with the others", 0.0)
            if pairs or late:
                self._wake(conn)
            conn.execute(
                update(servers)
                .where(servers.c.id == server_id, servers.c.state.in_(LIVE_SERVER_STATES))
                .values(state="stopped", stopped_at=db_now())
            )

    def reap(self) -> list[Requeued]:
        """Mark every live server whose heartbeat is older than its own
        dead_after as `dead`, and requeue (event `reaped`) every processing
        job whose server is not alive any more. Idempotent and safe when many
        servers run it at once; uses only the database clock."""
        stale = servers.c.heartbeat_at + servers.c.dead_after < db_now()
        with self._write() as conn:
            dead = conn.execute(
                self._for_update(
                    select(servers.c.id).where(servers.c.state.in_(LIVE_SERVER_STATES), stale),
                    skip_locked=True,
                )
            ).scalars().all()
            if dead:
                conn.execute(
                    update(servers).where(servers.c.id.in_(dead))
                    .values(state="dead", stopped_at=db_now())
                )
            alive = exists().where(
                servers.c.id == jobs.c.server_id,
                servers.c.state.in_(LIVE_SERVER_STATES),
                ~stale,
            )
            taken = self._take_back(
                conn, ~alive, "reaped",
                "server {server} stopped heartbeating", 0.0,
            )
            if taken:
                self._wake(conn)
            return taken

    def reap_server(self, server_id: str, reason: str) -> list[Requeued]:
        """Declare one server dead now (it was proven dead, e.g. its pid is
        gone) and requeue its jobs at once."""
        with self._write() as conn:
            conn.execute(
                update(servers)
                .where(servers.c.id == server_id, servers.c.state.in_(LIVE_SERVER_STATES))
                .values(state="dead", stopped_at=db_now())
            )
            self._wake(conn)
            return self._take_back(conn, jobs.c.server_id == server_id, "reaped", reason, 0.0)

    def lost_leases(self, server_id: str, leases: dict[int, int]) -> list[int]:
        """Of the jobs this server runs ({id: lease}), those it does not
        hold any more (an operator requeued or deleted them): their runs
        must be killed. Every way of taking a job from a run bumps its
        lease or deletes it; a job that left `processing` under the same
        lease was finished by its own run (which records its outcome
        itself, see outcomes.py), and is not lost."""
        if not leases:
            return []
        with self._read() as conn:
            current = dict(
                conn.execute(select(jobs.c.id, jobs.c.lease).where(jobs.c.id.in_(list(leases)))).all()
            )
        return [job_id for job_id, lease in leases.items() if current.get(job_id) != lease]

    def promote_due(self) -> int:
        """Scheduled jobs whose time has come become `enqueued`."""
        with self._write() as conn:
            promoted = conn.execute(
                update(jobs)
                .where(jobs.c.state == "scheduled", jobs.c.run_at <= db_now())
                .values(state="enqueued")
            ).rowcount
            if promoted:
                self._wake(conn)
            return promoted

    # operators ---------------------------------------------------------------

    def get(self, job_id: int) -> Job:
        """One job with its event history, or JobNotFound."""
        with self._read() as conn:
            row = conn.execute(_with_server_name(jobs).where(jobs.c.id == job_id)).first()
            if row is None:
                raise JobNotFound(f"no job with id {job_id}")
            history = conn.execute(
                _with_server_name(events).where(events.c.job_id == job_id).order_by(events.c.id)
            ).all()
        return Job.from_row(row, [Event(e.at, e.kind, e.server_id, e.detail, e.server_name) for e in history])

    def jobs(self, state: str | None = None, queue: str | None = None, limit: int = 100) -> list[Job]:
        """Jobs, newest first, optionally of one state and queue."""
        query = _with_server_name(jobs).order_by(jobs.c.id.desc()).limit(limit)
        if state is not None:
            query = query.where(jobs.c.state == state)
        if queue is not None:
            query = query.where(jobs.c.queue == queue)
        with self._read() as conn:
            return [Job.from_row(row) for row in conn.execute(query)]

    def servers(self, states=None, host: str | None = None) -> list[Server]:
        """Servers, newest first, each with the ids of its jobs in flight.
        Read with `status`'s statements (supervisor/snapshot.py) and
        filtered here: one text for both, and the table stays small (sweep
        deletes servers stopped longer than jobs.keep_finished)."""
        with self._read() as conn:
            found = read_servers(_fetch(conn), self.engine.dialect.name)
        return [s for s in found if (states is None or s.state in states) and (host is None or s.host == host)]

    def counts(self) -> dict[str, dict[str, int]]:
        """Job counts by queue and state, every state listed."""
        with self._read() as conn:
            return read_counts(_fetch(conn))

    def snapshot(self) -> Snapshot:
        """What `status` shows, read in one transaction."""
        with self._read() as conn:
            return read_snapshot(_fetch(conn), self.engine.dialect.name)

    # dashboard and metrics reads: each bounded, whatever the table holds --

    def job_page(self, which: "JobFilter", before: int | None = None, limit: int = 50) -> "JobPage":
        """One page of jobs matching `which`, newest first, with ids below
        `before` (keyset pagination: no OFFSET, so page 1000 costs what page
        1 does). State, queue and server are served by indexes. A target or
        text filter has no index (text is a substring of the JSON
        arguments), so it looks at no more than SCAN_WINDOW ids below
        `before`; the page then says where it stopped and `next_before`
        continues from there. Either way a page reads a bounded number of
        rows, with a million finished jobs in the table too."""
        query = select(jobs).order_by(jobs.c.id.desc()).limit(limit + 1)
        query = query.where(*which.conditions())
        top = before
        if which.needs_window:
            if top is None:
                top = (self._max_job_id() or 0) + 1
            query = query.where(jobs.c.id >= top - SCAN_WINDOW)
        if top is not None:
            query = query.where(jobs.c.id < top)
        with self._read() as conn:
            rows = conn.execute(query).all()
        found = [Job.from_row(row) for row in rows[:limit]]
        if len(rows) > limit:
            return JobPage(found, next_before=found[-1].id, searched_to=None)
        if which.needs_window and top - SCAN_WINDOW > 1:
            return JobPage(found, next_before=top - SCAN_WINDOW, searched_to=top - SCAN_WINDOW)
        return JobPage(found, next_before=None, searched_to=None)

    def _max_job_id(self) -> int | None:
        with self._read() as conn:
            return conn.execute(select(func.max(jobs.c.id))).scalar_one_or_none()

    def active_counts(self) -> dict[str, dict[str, int]]:
        """Job counts by queue for the states that need attention
        (COUNTED_STATES: enqueued, scheduled, processing, failed), every one
        of them listed. Succeeded jobs are left out on purpose: counting
        them reads every finished row (a full scan: 0.3 s with a million
        on PostgreSQL), while these states are an index range; completions
        are counted as events instead (events_since)."""
        with self._read() as conn:
            rows = conn.execute(
                select(jobs.c.queue, jobs.c.state, func.count())
                .where(jobs.c.state.in_(COUNTED_STATES))
                .group_by(jobs.c.queue, jobs.c.state)
            ).all()
        by_queue: dict[str, dict[str, int]] = {}
        for queue, state, count in rows:
            by_queue.setdefault(queue, dict.fromkeys(COUNTED_STATES, 0))[state] = count
        return by_queue

    def oldest_due(self) -> dict[str, float]:
        """Per queue, how long its oldest due job (`enqueued`, run_at
        passed) has waited, in seconds by the database clock. Reads only the
        enqueued rows (an index range): the backlog, not the history."""
        with self._read() as conn:
            now = conn.execute(select(db_now())).scalar_one()
            rows = conn.execute(
                select(jobs.c.queue, func.min(jobs.c.run_at))
                .where(jobs.c.state == "enqueued", jobs.c.run_at <= now)
                .group_by(jobs.c.queue)
            ).all()
        return {queue: max(0.0, now - oldest) for queue, oldest in rows}

    def event_histogram(self, span: float, buckets: int, kinds) -> "EventHistogram":
        """Events of `kinds` over the last `span` seconds, counted in
        `buckets` equal slices (oldest first), by the database. Reads the
        index on `at` over that span only."""
        width = span / buckets
        with self._read() as conn:
            start = conn.execute(select(db_now())).scalar_one() - span
            slices = (events.c.at - start) / width
            # SQLite may lack floor(); there at >= start, so a cast truncates
            # alike. (MySQL's cast rounds, so it gets floor().)
            bucket = cast(slices, Integer) if self.engine.dialect.name == "sqlite" else func.floor(slices)
            rows = conn.execute(
                select(events.c.kind, bucket, func.count())
                .where(events.c.at >= start, events.c.kind.in_(list(kinds)))
                .group_by(events.c.kind, bucket)
            ).all()
        counts = {kind: [0] * buckets for kind in kinds}
        for kind, index, count in rows:
            counts[kind][min(buckets - 1, max(0, int(index)))] += count
        return EventHistogram(start=start, width=width, counts=counts)

    def last_event_id(self) -> int:
        """The id of the newest event (0 when there is none): where an
        events_since() reader starts counting."""
        with self._read() as conn:
            return conn.execute(select(func.max(events.c.id))).scalar_one_or_none() or 0

    def events_since(self, after_id: int, limit: int = 20_000) -> "EventDelta":
        """Events with ids in (after_id, after_id + limit]: their count by
        kind, and the run time (finished_at - started_at of the final run)
        of each job they finished. A reader that passes the returned
        last_id back reads each event once: a primary-key range as long as
        the activity since its last call, and one job lookup by id per
        finished job."""
        with self._read() as conn:
            newest = conn.execute(select(func.max(events.c.id))).scalar_one_or_none() or 0
            upto = min(newest, after_id + limit)
            if upto <= after_id:
                return EventDelta(last_id=after_id, counts={}, run_times=[])
            in_range = and_(events.c.id > after_id, events.c.id <= upto)
            counts = dict(conn.execute(
                select(events.c.kind, func.count()).where(in_range).group_by(events.c.kind)
            ).all())
            finished = conn.execute(
                select(events.c.job_id).where(in_range, events.c.kind.in_(FINISHED_STATES))
            ).scalars().all()
            # Looked up by id, in slices: joined instead, a planner may
            # choose to scan every job to hash-join a few thousand.
            run_times = []
            for start in range(0, len(finished), 1000):
                run_times += conn.execute(
                    select(jobs.c.finished_at - jobs.c.started_at)
                    .where(jobs.c.id.in_(finished[start:start + 1000]),
                           jobs.c.started_at.is_not(None), jobs.c.finished_at.is_not(None))
                ).scalars().all()
        return EventDelta(last_id=upto, counts=counts, run_times=[max(0.0, t) for t in run_times])

    def job_ids(self, which: "JobFilter", limit: int) -> list[int]:
        """Ids of up to `limit` jobs matching `which`, newest first (for
        actions on every job of a filter). Unlike job_page(), a target or
        text filter is not windowed: the action is meant for all of them."""
        query = select(jobs.c.id).where(*which.conditions()).order_by(jobs.c.id.desc()).limit(limit)
        with self._read() as conn:
            return list(conn.execute(query).scalars())

    def requeue(self, job_id: int, force: bool = False) -> Job:
        """Put a job back in the queue, with a new lease (so a run still
        holding the old one can record nothing) and its attempts reset. A
        job still processing is held for its server's dead_after: by then
        that server has killed the old run (it checks its leases every
        heartbeat, and a frozen one's children fence themselves). A job
        that succeeded would run its code again: refused (ActionRefused)
        unless `force`. A finished job with a unique_key takes its key
        back if no other active job holds it (else it runs as a duplicate)."""
        with self._write() as conn:
            row = conn.execute(
                self._for_update(select(jobs.c.state, jobs.c.server_id, jobs.c.unique_key, jobs.c.unique_active)
                                 .where(jobs.c.id == job_id))
            ).first()
            if row is None:
                raise JobNotFound(f"no job with id {job_id}")
            if row.state == "succeeded" and not force:
                raise ActionRefused(
                    f"job {job_id} succeeded already; requeueing it runs its code again (use --force to do so)"
                )
            hold = 0.0
            if row.state == "processing":
                hold = conn.execute(
                    select(servers.c.dead_after).where(servers.c.id == row.server_id)
                ).scalar_one_or_none() or 0.0
            conn.execute(
                update(jobs).where(jobs.c.id == job_id).values(
                    state="enqueued", run_at=db_now() + hold, server_id=None, lease=jobs.c.lease + 1,
                    attempts=0, finished_at=None, unique_active=self._key_back(conn, row),
                )
            )
            self._record(conn, [dict(job_id=job_id, kind="requeued", server_id=None,
                                     detail=f"by an operator (was {row.state})")])
            self._wake(conn)
        return self.get(job_id)

    def _key_back(self, conn, row) -> str | None:
        """The unique key a requeued job may hold again: its own, unless
        another active job holds it now."""
        if row.unique_key is None or row.unique_active is not None:
            return row.unique_active
        holder = conn.execute(
            select(jobs.c.id, jobs.c.state).where(jobs.c.unique_active == row.unique_key)
        ).first()
        if holder is not None and holder.state in ACTIVE_STATES:
            return None
        if holder is not None:  # finished by a 0.1 server, which left the key set
            conn.execute(update(jobs).where(jobs.c.id == holder.id).values(unique_active=None))
        return row.unique_key

    def delete(self, job_id: int) -> None:
        """Delete a job and its history, or JobNotFound."""
        with self._write() as conn:
            gone = conn.execute(delete(jobs).where(jobs.c.id == job_id)).rowcount
            if not gone:
                raise JobNotFound(f"no job with id {job_id}")
            conn.execute(delete(events).where(events.c.job_id == job_id))

    def sweep(self, keep: float, batch: int = 1000) -> int:
        """Delete finished jobs (and their events) that finished more than
        `keep` seconds ago, `batch` at a time so no transaction grows large.
        Also forgets servers stopped or dead for that long."""
        removed = 0
        while True:
            with self._write() as conn:
                ids = conn.execute(
                    select(jobs.c.id)
                    .where(jobs.c.state.in_(FINISHED_STATES), jobs.c.finished_at < db_now() - keep)
                    .limit(batch)
                ).scalars().all()
                if ids:
                    conn.execute(delete(events).where(events.c.job_id.in_(ids)))
                    conn.execute(delete(jobs).where(jobs.c.id.in_(ids)))
                else:
                    conn.execute(
                        delete(servers).where(
                            servers.c.state.in_(("stopped", "dead")),
                            servers.c.stopped_at < db_now() - keep,
                        )
                    )
            removed += len(ids)
            if len(ids) < batch:
                return removed


def _fetch(conn):
    """The rows of one plain SQL statement on `conn` (see snapshot.py)."""
    return lambda sql: conn.exec_driver_sql(sql).all()


def _claimable_now(specs, done: list[Enqueued] | None = None) -> dict[str, int]:
    """{queue: jobs} that an enqueue made claimable at once (not scheduled
    for later, not already there under their unique key: `done` says)."""
    wanted: dict[str, int] = {}
    for spec, enqueued in zip(specs, done or [Enqueued(0)] * len(specs)):
        if not enqueued.existed and not _later(spec):
            wanted[spec.queue] = wanted.get(spec.queue, 0) + 1
    return wanted


def _with_server_name(table):
    """SELECT a table's rows with the name of the server their server_id
    names (people read names; ids stay for scripts)."""
    return select(table, servers.c.name.label("server_name")).select_from(
        table.outerjoin(servers, servers.c.id == table.c.server_id)
    )


_INSERT_EVENTS = insert(events).values(at=db_now())
POISON_ERROR = ("interrupted more often than max_interruptions allows "
                "(its server stopped or died while it ran, every time)")
POISON_NOTE = " (past max_interruptions: failed)"


def _taken_back_values() -> list[tuple]:
    """What a take-back sets on each job row (see Storage._take_back), from
    the row's values before it; parameters `hold` and `window`. In this
    order: MySQL/MariaDB evaluate an UPDATE's assignments left to right,
    each seeing the ones before it, so the columns that the others read
    (server_id, interruptions) are set last."""
    requeued = jobs.c.interruptions + 1 <= jobs.c.max_interruptions
    hold, window = bindparam("hold", type_=Float), bindparam("window", type_=Float)
    # A zero window records no preference at all (the job moves at once when
    # its hold is released early, as before releases existed).
    release = case((window > 0,
                    select(servers.c.release).where(servers.c.id == jobs.c.server_id).scalar_subquery()))
    return [
        (jobs.c.state, case((requeued, "enqueued"), else_="failed")),
        (jobs.c.run_at, case((requeued, db_now() + hold), else_=jobs.c.run_at)),
        (jobs.c.avoid_release, case((requeued, release), else_=jobs.c.avoid_release)),
        (jobs.c.avoid_until, case((requeued, case((release.is_not(None), db_now() + hold + window))),
                                  else_=jobs.c.avoid_until)),
        (jobs.c.finished_at, case((requeued, jobs.c.finished_at), else_=db_now())),
        (jobs.c.unique_active, case((requeued, jobs.c.unique_active), else_=None)),
        (jobs.c.error, case((requeued, jobs.c.error), else_=POISON_ERROR)),
        (jobs.c.server_id, case((requeued, None), else_=jobs.c.server_id)),
        (jobs.c.lease, jobs.c.lease + 1),
        (jobs.c.attempts, jobs.c.attempts - 1),
        (jobs.c.interruptions, jobs.c.interruptions + 1),
    ]


def _taken_back_event(job_id, server_id, failed):
    """The columns of a taken-back job's event; parameters `event_kind`
    and `why` (whose "{server}" becomes the server's id)."""
    detail = func.replace(bindparam("why", type_=Text), "{server}", server_id)
    return (job_id, db_now(), case((failed, "failed"), else_=bindparam("event_kind", type_=Text)),
            server_id, case((failed, detail + POISON_NOTE), else_=detail))


_EVENT_COLUMNS = ["job_id", "at", "kind", "server_id", "detail"]
_TAKEN_IDS = jobs.c.id.in_(bindparam("ids", expanding=True))
# Parameters are not named like columns: SQLAlchemy takes such a parameter
# of an UPDATE for a value to SET.
# What a take-back reads of each job it takes, before it takes it (_requeued).
_TAKEN_COLUMNS = (jobs.c.id, jobs.c.lease, jobs.c.server_id, jobs.c.interruptions, jobs.c.max_interruptions)


def _requeued(job_id, lease, server_id, interruptions, max_interruptions) -> Requeued:
    """A job taken back, from its _TAKEN_COLUMNS as they were before."""
    return Requeued(job_id, lease + 1, interruptions + 1 > max_interruptions, server_id)


def _mark_stopping(server_ids):
    """The servers (ids, or bound parameters) become `stopping`: a handoff."""
    return update(servers).where(servers.c.id.in_(server_ids), servers.c.state == "running").values(state="stopping")


def _record_taken(which):
    """The events of the processing jobs `which` matches, before the update."""
    return insert(events).from_select(_EVENT_COLUMNS, select(*_taken_back_event(
        jobs.c.id, jobs.c.server_id, jobs.c.interruptions + 1 > jobs.c.max_interruptions)).where(which))


def _take_back_update(which):
    """The update of the jobs `which` matches (see Storage._take_back)."""
    return update(jobs).where(which).ordered_values(*_taken_back_values())


_RECORD_TAKEN = _record_taken(_TAKEN_IDS)
_TAKE_BACK = _take_back_update(_TAKEN_IDS)


def _pg_take_back(which, stopping: bool):
    """Storage._take_back as one PostgreSQL statement: lock the matched
    rows (a run's own outcome write that got there first wins: the row is
    then no longer `processing`), update them, record their events, and
    with `stopping` mark the servers :ids stopping, all through CTEs."""
    old = (
        select(jobs.c.id, jobs.c.server_id).where(which, jobs.c.state == "processing")
        .with_for_update(of=jobs).cte("old")
    )
    taken = (
        update(jobs).where(jobs.c.id == old.c.id).ordered_values(*_taken_back_values())
        .returning(jobs.c.id, jobs.c.lease, old.c.server_id, (jobs.c.state == "failed").label("failed"))
        .cte("taken")
    )
    recorded = insert(events).from_select(
        _EVENT_COLUMNS, select(*_taken_back_event(taken.c.id, taken.c.server_id, taken.c.failed))
    ).cte("recorded")
    ctes = [recorded]
    if stopping:
        ctes.append(
            update(servers).where(servers.c.id == any_(bindparam("ids", type_=ARRAY(Text))),
                                  servers.c.state == "running")
            .values(state="stopping").returning(servers.c.id).cte("stopping")
        )
    return select(taken.c.id, taken.c.lease, taken.c.server_id, taken.c.failed).add_cte(*ctes)


def _sends_batches(conn) -> bool:
    """Does this MySQL/MariaDB connection take several statements in one
    round trip (PyMySQL, connected with make_engine's `batches`)?"""
    raw = conn.connection.dbapi_connection
    return type(raw).__module__.startswith("pymysql") and bool(raw.client_flag & MYSQL_MULTI_STATEMENTS)


@functools.lru_cache(maxsize=8)
def _mysql_handoff_batch(dialect, servers_count: int) -> tuple[tuple[str, dict], ...]:
    """The handoff of `servers_count` servers as statements that need no
    result of one another, each (SQL with %(name)s placeholders, the
    values it fixes): lock the servers' rows and then their processing
    jobs' (a LEFT JOIN reads the servers first: the order a claim locks
    them in) and return those jobs; mark the servers stopping; record the
    events; requeue the jobs. The jobs are the same rows in all three: they
    are locked, and no claim can add one while the server rows are.
    Parameters server_0..server_N-1, and those of _take_back."""
    ids = [bindparam(f"server_{i}", type_=Text) for i in range(servers_count)]
    processing = (jobs.c.server_id.in_(ids)) & (jobs.c.state == "processing")
    statements = (
        select(*_TAKEN_COLUMNS)
        .select_from(servers.outerjoin(jobs, (jobs.c.server_id == servers.c.id) & (jobs.c.state == "processing")))
        .where(servers.c.id.in_(ids)).with_for_update(),
        _mark_stopping(ids),
        _record_taken(processing),
        _take_back_update(processing),
    )
    compiled = [statement.compile(dialect=dialect) for statement in statements]
    return tuple((str(c), {k: v for k, v in c.params.items() if v is not None}) for c in compiled)


_PG_HANDOFF = _pg_take_back(jobs.c.server_id == any_(bindparam("ids", type_=ARRAY(Text))), stopping=True)
_COMPLETE = (
    update(jobs)
    .where(jobs.c.id == bindparam("fenced_id"), jobs.c.lease == bindparam("fenced_lease"), jobs.c.state == "processing")
    .values(state="succeeded", finished_at=db_now(), error=None, checkpoint=None, result=bindparam("outcome"),
            unique_active=None)
)
# The hot verbs' statements (claim, complete), built once: building a statement costs more CPU
# than SQLAlchemy's cached compilation of it, and the claim runs once per job.
_CLAIM_UPDATE = (
    update(jobs)
    .where(jobs.c.id.in_(bindparam("ids", expanding=True)))
    .values(
        state="processing",
        server_id=bindparam("claimer"),
        lease=jobs.c.lease + 1,
        attempts=jobs.c.attempts + 1,
        started_at=db_now(),
        finished_at=None,
    )
)
_CLAIM_UPDATE_RETURNING = _CLAIM_UPDATE.returning(*jobs.c)
_CLAIMED_ROWS = (
    select(jobs).where(jobs.c.id.in_(bindparam("ids", expanding=True))).order_by(jobs.c.priority.desc(), jobs.c.id)
)


def _claimed_events(claimed: list[Job], wanted: ClaimNext) -> list[dict]:
    return [dict(job_id=job.id, kind="claimed", server_id=wanted.server_id,
                 detail=f"attempt {job.attempts}, lease {job.lease}{wanted.marker()}") for job in claimed]


# The claiming server is running and not quiet (SQLite's claim: see _claim_in).
_CLAIMER_RUNNING = exists().where(servers.c.id == bindparam("claimer"), servers.c.state == "running",
                                  servers.c.quiet == false())


# Other databases' claim: the server's row, under a share lock (see _claim_in),
# or nothing when another transaction holds it locked.
_CLAIMING_SERVER = (select(servers.c.state, servers.c.quiet).where(servers.c.id == bindparam("server_id"))
                    .with_for_update(read=True, skip_locked=True))


@functools.lru_cache(maxsize=64)
def _due_ids(queues: tuple[str, ...], limit: int, locks_rows: bool, callables_only: bool = False):
    """The ids a claim takes (without a release's extra conditions)."""
    query = (select(jobs.c.id).where(_due(queues), *_claim_conditions(locks_rows, callables_only))
             .order_by(jobs.c.priority.desc(), jobs.c.id).limit(limit))
    return query.with_for_update(skip_locked=True) if locks_rows else query


def _claim_conditions(locks_rows: bool, callables_only: bool) -> list:
    """A claim's conditions besides _due: on SQLite (one writer at a time)
    the claiming server's check is part of the query (see _claim_in); a
    reused process's claim takes callable jobs only."""
    return [*([] if locks_rows else [_CLAIMER_RUNNING]), *([jobs.c.kind == "callable"] if callables_only else [])]


def _due(queues):
    """The jobs a claim may take from `queues` now (not those of a paused
    queue): one condition for the claim and for the idle probe, so the two
    never disagree. The claim index serves it."""
    return and_(jobs.c.state == "enqueued", jobs.c.queue.in_(list(queues)), jobs.c.run_at <= db_now(), ~_PAUSED)


# The job's queue is paused (a correlated NOT EXISTS: one statement, and the
# pause is read in the claim's own transaction).
_PAUSED = exists().where(queue_settings.c.name == jobs.c.queue, queue_settings.c.paused)


def _summary(text: str) -> str:
    """The line of an error worth showing: a traceback's last one says what broke."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:500] if lines else ""


def _insert_from_json(table, rows: list[dict], computed):
    """PostgreSQL: `INSERT INTO table SELECT ... FROM json_array_elements(
    :rows) WITH ORDINALITY ORDER BY ordinality`: the whole batch is one JSON
    parameter (dumped in C), not 13,000 that psycopg and the server would
    each parse, and SQLAlchemy would compile anew for every batch size.
    `computed`: more column values, or a function of the row's fields
    (name -> SQL) that returns them."""
    from sqlalchemy.dialects.postgresql import JSONB  # PostgreSQL only: not imported elsewhere

    source = func.jsonb_array_elements(cast(bindparam("rows", json.dumps(rows)), JSONB)).table_valued(
        "value", with_ordinality="n").render_derived()

    def field(name):
        return cast(source.c.value.op("->>")(name), _FIELD_TYPES.get(name, Text))

    values = {name: field(name) for name in rows[0] if name in table.c}
    values.update(computed(field) if callable(computed) else computed)
    chosen = select(*values.values()).select_from(source).order_by(source.c.n)
    return insert(table).from_select(list(values), chosen)
