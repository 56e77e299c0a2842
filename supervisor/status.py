"""`shiftchange status`: what it reads and how it shows it.

Scripts, health checks and `watch` run `status` again and again, so it
must start fast (issue 11: at most 0.3 s). It reads through the DB-API
driver alone (supervisor/dbapi.py: importing SQLAlchemy takes longer than
that), and supervisor/entry.py runs it without importing Typer. Its
tables are plain columns drawn here: importing rich took about 30 ms.
"""

import json
import sys
from collections import Counter

from supervisor.config import load_config
from supervisor.errors import ShiftchangeError
from supervisor.logs import error_line

LIVE_STATES = ("running", "stopping")
NONE = "-"  # how every command shows "nothing here"


def print_json(data) -> None:
    """What every command's --json prints (here, not in cli.py, so that
    `status` shares it without importing Typer)."""
    print(json.dumps(data, indent=2, ensure_ascii=False))


def run_status(config_path: str | None, json_: bool, all_: bool) -> int:
    """`status` outside Typer: its output and exit code, an expected error
    as the one line on stderr that every command prints."""
    try:
        show_status(config_path, json_, all_)
    except ShiftchangeError as exc:
        print(error_line(str(exc)), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 1  # whoever read our output is gone (`status | head -1`): nothing to say
    return 0


def show_status(config_path: str | None, json_: bool, all_: bool) -> None:
    database, snapshot = read_status(config_path)
    if json_:
        print_json(snapshot.to_dict(database))
        return
    # Every state is always listed, with 0 when no job is in it.
    servers, counts, queues, paused = snapshot.servers, snapshot.counts, snapshot.queues, snapshot.paused
    live = [s for s in servers if s.state in LIVE_STATES]
    gone = [s for s in servers if s.state not in LIVE_STATES]
    print(f"database: {database}")
    print()
    print(_servers_table(live + gone if all_ else live, servers))
    if gone and not all_:
        by_state = ", ".join(f"{n} {state}" for state, n in sorted(Counter(s.state for s in gone).items()))
        print(f"not shown: {by_state} (--all lists them)")
    rows = [[name + (" (paused)" if name in paused else ""), *(by_state.get(state, 0) for state in counts)]
            for name, by_state in sorted(queues.items())]
    print()
    print(text_table("jobs", ["queue", *counts], [*rows, ["all", *counts.values()]]))


# Shown as "?": a server name or host with a terminal escape in it is
# printed, never obeyed (rich, which drew these tables before, removed only
# a few control characters and let ESC through).
_CONTROL_CHARACTERS = dict.fromkeys([*range(32), 127], "?")


def text_table(title: str, header: list[str], rows: list[list]) -> str:
    """`title`, then the columns under `header`, padded to line up:
    numbers to the right, the rest to the left."""
    cells = [header, *([str(cell).translate(_CONTROL_CHARACTERS) for cell in row] for row in rows)]
    numeric = [all(isinstance(row[i], int) for row in rows) for i in range(len(header))]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(width) if right else cell.ljust(width)
                       for cell, width, right in zip(line, widths, numeric)).rstrip() for line in cells]
    return "\n".join([title, *lines])


def read_status(config_path):
    """The database's URL (password masked) and what `status` shows, read
    through the DB-API driver alone; or through a Queue, as before, where
    dbapi.open_reader leaves it to the engine (see there why)."""
    from supervisor.dbapi import command_bounds, open_reader
    from supervisor.snapshot import read_snapshot

    settings = load_config(config_path)
    bounds = command_bounds(settings.server.heartbeat_interval, settings.server.dead_after)
    reader = open_reader(settings.database.url, bounds, settings.database.sqlite_synchronous)
    if reader is None:
        from supervisor.queue import Queue

        with Queue(settings.database.url, defaults=settings, create=False) as q:
            return q.database, q.snapshot()
    with reader:
        return reader.database, read_snapshot(reader.fetch, reader.dialect)


def _age(seconds: float) -> str:
    return f"{seconds:.1f}s" if seconds < 120 else f"{seconds / 60:.0f}m"


def _servers_table(shown, every) -> str:
    releases = any(s.release for s in every)
    labels = server_labels(every)
    rows = [[labels[s.id], s.host, s.pid, s.shown_state, _age(s.heartbeat_age) + " ago",
             ",".join(map(str, s.jobs)) or NONE, *([s.release or NONE] if releases else []), s.version or "0.1.0"]
            for s in shown]
    return text_table("servers", ["name", "host", "pid", "state", "heartbeat", "jobs",
                                  *(["release"] if releases else []), "version"], rows)


def server_labels(servers) -> dict[str, str]:
    """id -> what a person reads: the server's name, with the start of its id
    where several servers listed share that name (restarts keep names)."""
    ids_of = {}
    for s in servers:
        ids_of.setdefault(s.name, []).append(s.id)
    return {s.id: s.name if len(ids_of[s.name]) == 1 else f"{s.name}#{s.id[:6]}" for s in servers}
