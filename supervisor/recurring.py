"""Recurring jobs: the entries (from `recurring:` in the config, or added
through `Queue.add_recurring`), when each one ticks, and which ticks a
server should enqueue now.

Nothing here touches the database or the clock: a Schedule is given the
database time by its caller, so the decisions are tested with an injected
clock. Every server keeps its own Schedule; which server enqueues a tick is
decided by the database (Storage.enqueue_ticks: one row per name and tick,
the insert that wins enqueues the job in the same transaction).
"""

import json
import math
from dataclasses import asdict, dataclass, field
from datetime import datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from supervisor.errors import InvalidJob
from supervisor.jobspec import NewJob, check_queue_name, new_job, to_json
from supervisor.targets import check_callable_syntax

MISSED_POLICIES = ("latest", "skip", "all")
# Ticks one check enqueues at most for one entry (the newest ones): with
# `missed: all` after a week without servers, or a long database outage,
# a flood of identical jobs helps nobody.
CATCH_UP_LIMIT = 100
MIN_EVERY_S = 1.0
ENTRY_KEYS = ("name", "cron", "every", "target", "command", "args", "kwargs", "queue", "priority", "tz", "missed")
MAX_NAME = 200


class EntryError(ValueError):
    """A recurring entry that is not valid; `key` names the key at fault."""

    def __init__(self, key: str | None, message: str):
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class RecurringEntry:
    """One recurring job: a schedule (`cron` or `every`) and the job to
    enqueue at each tick. Build it with make_entry()."""

    name: str
    cron: str | None = None  # 5 fields, read in `tz`
    every: float | None = None  # seconds; ticks at whole multiples since the Unix epoch
    target: str | None = None
    command: tuple[str, ...] | None = None
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    queue: str = "default"
    priority: int = 0
    tz: str = "UTC"
    missed: str = "latest"
    added_at: float | None = None  # API entries: when added (database clock); config entries: None
    source: str = "config"  # "config" or "api"

    @property
    def schedule(self) -> str:
        from supervisor.config import format_duration

        return self.cron if self.cron is not None else f"every {format_duration(self.every)}"

    @property
    def what(self) -> str:
        """The target, or the command line."""
        return " ".join(self.command) if self.command else self.target

    def ticks(self, after: float, upto: float, limit: int = CATCH_UP_LIMIT) -> list[float]:
        """The newest `limit` tick times t with after < t <= upto, oldest first."""
        if upto <= after:
            return []
        if self.every is not None:
            step = round(self.every * 1000)  # whole milliseconds: every server computes the same floats
            first = math.floor(after * 1000 / step) + 1
            last = math.floor(upto * 1000 / step)
            return [k * step / 1000 for k in range(max(first, last - limit + 1), last + 1)]
        found = []
        walk = _croniter(self.cron, datetime.fromtimestamp(upto + 0.001, ZoneInfo(self.tz)))
        while len(found) < limit:
            tick = walk.get_prev(float)
            if tick <= after:
                break
            found.append(tick)
        return found[::-1]

    def next_tick(self, after: float) -> float:
        """The first tick time later than `after`."""
        if self.every is not None:
            step = round(self.every * 1000)
            return (math.floor(after * 1000 / step) + 1) * step / 1000
        return _croniter(self.cron, datetime.fromtimestamp(after, ZoneInfo(self.tz))).get_next(float)

    def job(self, jobs_config) -> NewJob:
        """The job one tick enqueues, with the enqueuing server's job defaults."""
        return new_job(
            self.target, list(self.args), dict(self.kwargs),
            command=list(self.command) if self.command else None,
            queue=self.queue, priority=self.priority,
            max_attempts=jobs_config.max_attempts, max_interruptions=jobs_config.max_interruptions,
            timeout=jobs_config.timeout,
        )

    def definition(self) -> dict:
        """The entry's keys as given (what the recurring table stores)."""
        data = {k: v for k, v in asdict(self).items() if k in ENTRY_KEYS and k != "name"}
        data["args"], data["command"] = list(self.args), list(self.command) if self.command else None
        return {k: v for k, v in data.items() if v is not None}

    def to_dict(self) -> dict:
        return {"name": self.name, "source": self.source, "schedule": self.schedule, "cron": self.cron,
                "every": self.every, "target": self.target, "command": list(self.command) if self.command else None,
                "args": list(self.args), "kwargs": self.kwargs, "queue": self.queue, "priority": self.priority,
                "tz": self.tz, "missed": self.missed}


def make_entry(values: dict, source: str = "config", added_at: float | None = None) -> RecurringEntry:
    """A validated entry from a mapping of ENTRY_KEYS, or EntryError naming
    the key at fault."""
    from supervisor.config import parse_duration

    if not isinstance(values, dict):
        raise EntryError(None, "each recurring entry must be a mapping of keys (name, cron or every, target or command, ...)")
    for key in values:
        if key not in ENTRY_KEYS:
            raise EntryError(key, f"unknown key {key!r} in a recurring entry (known: {', '.join(ENTRY_KEYS)})")
    name = values.get("name")
    if not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME or name != name.strip():
        raise EntryError("name", f"name must be a string of 1 to {MAX_NAME} characters, not {name!r}")
    cron, every = values.get("cron"), values.get("every")
    if (cron is None) == (every is None):
        raise EntryError(_second(values, "cron", "every"),
                         f"recurring {name!r}: give either cron or every, not {'both' if cron is not None else 'neither'}")
    if cron is not None:
        _check_cron(cron, values.get("tz") or "UTC")
    else:
        try:
            every = parse_duration(every)
        except ValueError as exc:
            raise EntryError("every", f"recurring {name!r}: every: {exc}") from None
        if every < MIN_EVERY_S:
            raise EntryError("every", f"recurring {name!r}: every must be at least 1s, not {every:g}s")
    tz = values.get("tz") or "UTC"
    _check_tz(tz)
    missed = values.get("missed") or "latest"
    if missed not in MISSED_POLICIES:
        raise EntryError("missed", f"recurring {name!r}: missed must be one of {', '.join(MISSED_POLICIES)}, not {missed!r}")
    target, command = values.get("target"), values.get("command")
    if (target is None) == (command is None):
        raise EntryError(_second(values, "target", "command"),
                         f"recurring {name!r}: give either target or command, not {'both' if target is not None else 'neither'}")
    entry = RecurringEntry(
        name=name, cron=cron, every=every, target=target,
        command=None if command is None else tuple(_argv(name, command)),
        args=tuple(_typed(values, "args", list, [], name)), kwargs=_typed(values, "kwargs", dict, {}, name),
        queue=values.get("queue") or "default", priority=_priority(values.get("priority", 0), name),
        tz=tz, missed=missed, added_at=added_at, source=source,
    )
    _check_job(entry)
    return entry


def _second(values: dict, one: str, other: str) -> str:
    """Of two keys that exclude each other, the one given last (the error's
    line); "name" when neither is given."""
    given = [key for key in values if key in (one, other)]
    return given[-1] if given else "name"


def _croniter(cron: str, start: datetime | None = None):
    # Imported where a cron expression is read: croniter (with dateutil)
    # would cost every command 30 ms of start-up, `status` included (issue 11).
    from croniter import croniter

    return croniter(cron, start)


def _check_cron(cron, tz: str) -> None:
    if not isinstance(cron, str) or len(cron.split()) != 5:
        raise EntryError("cron", f"cron {cron!r} is not a 5-field cron expression (minute hour day month weekday, "
                                 f"e.g. '*/15 * * * *')")
    try:
        _croniter(cron)
    except (ValueError, KeyError) as exc:  # croniter's errors are ValueErrors
        raise EntryError("cron", f"cron {cron!r} is not valid: {exc}") from None


def _check_tz(tz) -> None:
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        raise EntryError("tz", f"tz {tz!r} is not a time zone name (e.g. UTC, Europe/Paris)") from None


def _argv(name, command) -> list[str]:
    if isinstance(command, str):
        command = command.split()
    if not isinstance(command, (list, tuple)) or not command or not all(isinstance(p, str) and p for p in command):
        raise EntryError("command", f"recurring {name!r}: command must be a non-empty list of strings (an argv)")
    return list(command)


def _typed(values, key, kind, default, name):
    value = values.get(key)
    if value is None:
        return default
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, kind):
        raise EntryError(key, f"recurring {name!r}: {key} must be a {'list' if kind is list else 'mapping'}")
    try:
        to_json(value, key)
    except InvalidJob as exc:
        raise EntryError(key, f"recurring {name!r}: {exc}") from None
    return value


def _priority(value, name) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise EntryError("priority", f"recurring {name!r}: priority must be a whole number, not {value!r}")
    return value


def _check_job(entry: RecurringEntry) -> None:
    """The job must be one enqueue would take (target syntax, queue name)."""
    try:
        check_queue_name(entry.queue)
    except ValueError as exc:
        raise EntryError("queue", f"recurring {entry.name!r}: {exc}") from None
    if entry.target is not None:
        try:
            check_callable_syntax(entry.target)
        except ValueError as exc:
            raise EntryError("target", f"recurring {entry.name!r}: {exc}") from None
    if entry.command and entry.args:
        raise EntryError("args", f"recurring {entry.name!r}: args do not apply to a command; put them in command")


def entry_from_row(name: str, definition: str, added_at: float) -> RecurringEntry:
    """An entry stored by Queue.add_recurring."""
    return make_entry({"name": name, **json.loads(definition)}, source="api", added_at=added_at)


# --- which ticks to enqueue --------------------------------------------------------


@dataclass
class _Watch:
    entry: RecurringEntry
    since: float  # database time this server began watching the entry
    cursor: float  # ticks up to here are dealt with (enqueued by someone, or skipped)


class Schedule:
    """One server's view of the recurring entries: for each, the ticks
    dealt with so far. A tick is dealt with once it is enqueued (by this
    server or, as the database tells it, by another) or skipped.

    Which ticks are due at database time `now`, for one entry:
    - those that came due while this server watched the entry: each one
      (the newest CATCH_UP_LIMIT, if it fell behind);
    - those that came due before it watched, after the last tick any server
      enqueued (or, for an API entry, after it was added): *missed* ticks,
      per the entry's `missed`: `latest` the newest of them, `skip` none,
      `all` each (the newest CATCH_UP_LIMIT).
    A config entry that never ticked on this database starts from now."""

    def __init__(self):
        self.watches: dict[str, _Watch] = {}

    def unseen(self, entries) -> list[str]:
        """Names of `entries` this schedule does not watch yet: look up
        their last tick (Storage.last_ticks) and pass it to watch()."""
        return [e.name for e in entries if e.name not in self.watches]

    def watch(self, entries, last_ticks: dict[str, float], now: float) -> None:
        """Watch exactly `entries` (the config's, then the API's; a name
        given twice keeps the first). A new one starts after its last tick
        in the database, else after its addition, else at `now`."""
        chosen = {}
        for entry in entries:
            chosen.setdefault(entry.name, entry)
        for name in list(self.watches):
            if name not in chosen:
                del self.watches[name]
        for name, entry in chosen.items():
            if name in self.watches:
                self.watches[name].entry = entry
                continue
            known = [t for t in (last_ticks.get(name), entry.added_at) if t is not None]
            start = max(known) if known else now
            self.watches[name] = _Watch(entry, since=now, cursor=min(start, now))

    def due(self, now: float) -> list[tuple[RecurringEntry, float]]:
        """(entry, tick) to enqueue at database time `now`, oldest first per entry."""
        found = []
        for watch in self.watches.values():
            ticks = watch.entry.ticks(watch.cursor, now)
            found += [(watch.entry, tick) for tick in _chosen(ticks, watch.since, watch.entry.missed)]
        return found

    def done_until(self, now: float) -> None:
        """Every tick up to `now` is dealt with (after enqueue_ticks for due(now))."""
        for watch in self.watches.values():
            watch.cursor = max(watch.cursor, now)

    def next_due(self) -> float | None:
        """The database time of the next tick of any entry, or None."""
        nexts = [w.entry.next_tick(w.cursor) for w in self.watches.values()]
        return min(nexts) if nexts else None

    @property
    def entries(self) -> list[RecurringEntry]:
        return [w.entry for w in self.watches.values()]


def _chosen(ticks: list[float], since: float, missed: str) -> list[float]:
    """Of the due `ticks`, those to enqueue: every one that came due while
    watched; of those before, per the `missed` policy."""
    on_time = [t for t in ticks if t > since]
    before = [t for t in ticks if t <= since]
    if missed == "all":
        kept = before
    elif missed == "latest":
        kept = before[-1:]
    else:
        kept = []
    return (kept + on_time)[-CATCH_UP_LIMIT:]


def not_allowed(entry: RecurringEntry, allow) -> str | None:
    """Why a server with the AllowList `allow` would refuse this entry's
    jobs, or None."""
    from supervisor.targets import TargetRefused

    if entry.command:
        if entry.command[0] in allow.commands:
            return None
        return f"recurring {entry.name!r}: command {entry.command[0]!r} is not in jobs.allow_commands"
    try:
        allow.check_callable(entry.target)
    except TargetRefused as exc:
        return f"recurring {entry.name!r}: {exc}"
    return None
