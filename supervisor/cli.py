"""The `shiftchange` command. Names, flags, JSON fields and exit codes here
are a contract that deploy scripts and other tools rely on.

Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error.
"""

import functools
import json
import os
import sys
from datetime import datetime, timezone
from typing import Annotated, Optional

import typer

from supervisor.config import load_config, parse_duration
from supervisor.errors import EXIT_USAGE, ConfigError, InvalidJob, ShiftchangeError
from supervisor.logs import error_line
from supervisor.status import NONE, print_json, show_status
from supervisor.targets import AllowList, TargetRefused

HELP = {"help_option_names": ["-h", "--help"]}
app = typer.Typer(
    name="shiftchange",
    context_settings=HELP,
    help="A SQL-backed job queue whose supervisor hands in-flight jobs over cleanly on every deploy.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
db_app = typer.Typer(help="Database schema commands.", no_args_is_help=True, context_settings=HELP)
config_app = typer.Typer(help="Configuration commands.", no_args_is_help=True, context_settings=HELP)
app.add_typer(db_app, name="db")
app.add_typer(config_app, name="config")

ConfigOption = Annotated[
    Optional[str],
    typer.Option("--config", "-c", metavar="PATH", help="Config file (default: $SHIFTCHANGE_CONFIG, then ./shiftchange.yaml)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of a table.")]


def fail(message: str, code: int) -> None:
    typer.echo(error_line(message), err=True)
    raise typer.Exit(code)


def reports_errors(command):
    """Expected errors become one line on stderr and their exit code."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except ShiftchangeError as exc:
            fail(str(exc), exc.exit_code)

    return wrapper


def open_queue(config_path, create: bool = False):
    """The queue of the configured database. Only producers (`enqueue`)
    create the schema; every other command reads, and says so in one line
    when there is no schema."""
    from supervisor.queue import Queue

    return Queue.from_config(config_path, create=create)


# --- run ---------------------------------------------------------------------------


@app.command()
@reports_errors
def run(
    config: ConfigOption = None,
    name: Annotated[Optional[str], typer.Option(metavar="NAME", help="Server name (default: server.name, else the host name).")] = None,
    concurrency: Annotated[Optional[int], typer.Option(min=1, metavar="N", help="Jobs run at once (default: server.concurrency).")] = None,
    queue: Annotated[Optional[list[str]], typer.Option("--queue", "-q", metavar="QUEUE", help="A queue to serve; repeat for more.")] = None,
):
    """Run a supervisor in the foreground until SIGTERM/SIGINT, then hand its jobs off."""
    from supervisor.logs import setup_logging
    from supervisor.loop import run_supervisor

    settings = load_config(config).with_overrides(name=name, concurrency=concurrency, queues=tuple(queue or ()))
    setup_logging(settings.log.format, settings.log.level)
    code = run_supervisor(settings)
    # Everything is committed and every child reaped: skip the interpreter's
    # teardown (100+ ms of module and GC clean-up) so a deploy tool sees the
    # process exit the moment the handoff is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# --- producing ------------------------------------------------------------------------


def parse_when(text: str) -> tuple[datetime | None, float]:
    """--at: an ISO 8601 time (UTC unless it says otherwise) or a delay such
    as +10m. Returns (a time or None, delay seconds)."""
    if text.startswith("+"):
        try:
            return None, parse_duration(text[1:])
        except ValueError as exc:
            raise ConfigError(f"--at {text!r}: {exc}") from None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"--at {text!r} is neither an ISO 8601 time nor a delay like +10m") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment, 0.0


def parse_json_option(text: str | None, option: str, kind: type):
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{option} is not valid JSON: {exc}") from None
    if not isinstance(value, kind):
        raise ConfigError(f"{option} must be a JSON {'array' if kind is list else 'object'}")
    return value


@app.command()
@reports_errors
def enqueue(
    target: Annotated[Optional[list[str]], typer.Argument(metavar="TARGET", help="package.module:function, or with --command the argv after --.")] = None,
    args: Annotated[Optional[str], typer.Option("--args", metavar="JSON", help="Positional arguments as a JSON array.")] = None,
    kwargs: Annotated[Optional[str], typer.Option("--kwargs", metavar="JSON", help="Keyword arguments as a JSON object.")] = None,
    queue: Annotated[str, typer.Option("--queue", "-q", metavar="QUEUE", help="Queue name.")] = "default",
    priority: Annotated[int, typer.Option(metavar="N", help="Higher runs first.")] = 0,
    max_attempts: Annotated[Optional[int], typer.Option(min=1, metavar="N", help="Failed runs allowed (default: jobs.max_attempts).")] = None,
    at: Annotated[Optional[str], typer.Option("--at", metavar="WHEN", help="Not before this ISO 8601 time, or after a delay like +10m.")] = None,
    command: Annotated[bool, typer.Option("--command", help="TARGET is a command line: enqueue --command -- ARGV...")] = False,
    timeout: Annotated[Optional[str], typer.Option("--timeout", metavar="DURATION", help="How long each run may take from its claim, e.g. 30m (default: jobs.timeout).")] = None,
    unique_key: Annotated[Optional[str], typer.Option("--unique-key", metavar="KEY", help="While a job with KEY is enqueued, scheduled or processing, print its id instead of enqueueing.")] = None,
    from_: Annotated[Optional[str], typer.Option("--from", metavar="FILE", help="Enqueue the jobs of a JSON-lines file (- for stdin), one object a line with enqueue()'s keys; all or nothing.")] = None,
    config: ConfigOption = None,
):
    """Enqueue a job; prints its id alone on stdout (with --from: one id a line)."""
    if from_ is not None:
        if target or command or args or kwargs or at or unique_key or timeout:
            raise ConfigError("--from takes the jobs from FILE: give no TARGET and no other job options")
        for job_id in enqueue_from(open_queue(config, create=True), from_):
            typer.echo(job_id)
        return
    target = target or []
    if not command and len(target) != 1:
        raise ConfigError("give exactly one TARGET (or use --command -- ARGV...)")
    if command and (args or kwargs):
        raise ConfigError("--args and --kwargs do not apply to --command jobs; put arguments in ARGV")
    run_at, delay = parse_when(at) if at else (None, 0.0)
    q = open_queue(config, create=True)
    options = dict(queue=queue, priority=priority, max_attempts=max_attempts, run_at=run_at, delay=delay,
                   unique_key=unique_key, timeout=_timeout_option(timeout))
    if command:
        job = q.enqueue_command(list(target), **options)
    else:
        job = q.enqueue(target[0], parse_json_option(args, "--args", list) or [],
                        parse_json_option(kwargs, "--kwargs", dict), **options)
    if job.existed:
        typer.echo(f"shiftchange: note: job {job.id} ({job.state}) holds unique key {unique_key!r} already; "
                   "nothing enqueued", err=True)
        typer.echo(job.id)
        return
    warn_if_not_allowed(q.config, job)
    if not q.served(queue):
        typer.echo(f"shiftchange: note: no running server serves queue {queue!r} yet; the job waits for one", err=True)
    typer.echo(job.id)


def enqueue_from(q, path: str) -> list[int]:
    """Enqueue the JSON lines of `path` (- for stdin), checked first: a line
    that is not a valid job fails them all, naming its line, before
    anything is inserted. Blank lines are skipped."""
    try:
        text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
    except OSError as exc:
        raise ConfigError(f"--from {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--from {path}: not UTF-8 text") from None
    specs = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            specs.append(q.job_spec(json.loads(line)))
        except ValueError as exc:  # json's errors and InvalidJob alike
            raise ConfigError(f"{path}, line {number}: {exc}; nothing was enqueued") from None
        except InvalidJob as exc:
            raise ConfigError(f"{path}, line {number}: {exc}; nothing was enqueued") from None
    return q.enqueue_specs(specs)


def _timeout_option(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise ConfigError(f"--timeout {text!r}: {exc}") from None
    if seconds <= 0:
        raise ConfigError(f"--timeout {text!r}: must be greater than 0")
    return seconds


def warn_if_not_allowed(config, job) -> None:
    """A target the local config's allow-list refuses fails when claimed by
    a server with that config: say so now, on stderr (the job is enqueued
    all the same: the servers may be configured otherwise)."""
    if config.source is None:
        return  # no local config: nothing to compare with
    allow = AllowList(config.jobs.allow, config.jobs.allow_commands)
    if job.kind == "command":
        refused = None if job.target in allow.commands else (
            f"command {job.target!r} is not in jobs.allow_commands of {config.source}")
    else:
        try:
            allow.check_callable(job.target)
            refused = None
        except TargetRefused as exc:
            refused = f"{exc} in {config.source}"
    if refused:
        typer.echo(f"shiftchange: warning: job {job.id}: {refused}; a server with this config fails it "
                   "when it claims it", err=True)


# --- reading ------------------------------------------------------------------------------


@app.command()
@reports_errors
def status(
    config: ConfigOption = None,
    json_: JsonOption = False,
    all_: Annotated[bool, typer.Option("--all", help="Also list stopped and dead servers, not just a count.")] = False,
):
    """Servers (live ones first, with heartbeat age and jobs in flight) and job counts."""
    # supervisor/entry.py runs most status command lines without Typer; this
    # is the same command for the rest (--help, and what Typer must report).
    show_status(config, json_, all_)


def _name_labels(pairs) -> dict[str, str]:
    """Labels for (server id, name) pairs read with jobs or events; a name
    shared by two ids gets the start of its id."""
    ids_of = {}
    for server_id, name in pairs:
        if server_id:
            ids_of.setdefault(name or server_id, set()).add(server_id)
    labels = {}
    for label, ids in ids_of.items():
        for server_id in ids:
            labels[server_id] = label if len(ids) == 1 else f"{label}#{server_id[:6]}"
    return labels


@app.command()
@reports_errors
def jobs(
    state: Annotated[Optional[str], typer.Option(metavar="STATE", help="enqueued, scheduled, processing, succeeded or failed.")] = None,
    queue: Annotated[Optional[str], typer.Option("--queue", "-q", metavar="QUEUE", help="Only this queue.")] = None,
    limit: Annotated[int, typer.Option(min=1, metavar="N", help="At most N jobs.")] = 50,
    wide: Annotated[bool, typer.Option("--wide", "-w", help="Show every cell whole, wrapping instead of cutting.")] = False,
    config: ConfigOption = None,
    json_: JsonOption = False,
):
    """List jobs, newest first."""
    from rich.console import Console

    from supervisor.records import JOB_STATES

    if state is not None and state not in JOB_STATES:
        raise ConfigError(f"--state {state!r} is not one of {', '.join(JOB_STATES)}")
    found = open_queue(config).jobs(state=state, queue=queue, limit=limit)
    if json_:
        print_json([job.to_dict() for job in found])
        return
    Console().print(_jobs_table(found, wide))


def _jobs_table(found, wide: bool = False):
    """One line per job whatever the terminal width: the target and the
    error take the width and are cut with an ellipsis rather than wrapped
    (`--wide` wraps them instead; `job ID` shows them whole)."""
    from rich.table import Table
    from rich.text import Text

    def cut(text: str) -> Text:
        return Text(text) if wide else Text(text, no_wrap=True, overflow="ellipsis")

    table = Table("id", "state", "queue", "target", "tries", "intr", "server", "error",
                  caption="tries: attempts used; intr: interruptions (handoffs and crashes)")
    for column in table.columns:
        # rich shrinks only wrappable columns; the short ones must never wrap.
        column.no_wrap = column.header not in ("target", "error")
        if column.header in ("target", "error"):
            column.ratio = 1  # the two that matter share what the others leave
    labels = _name_labels((job.server, job.server_name) for job in found)
    for job in found:
        target = " ".join(job.argv) if job.kind == "command" else job.target
        error = (job.error or "").strip().splitlines()[-1:] or [""]  # a traceback's last line says what broke
        table.add_row(str(job.id), job.state, job.queue, cut(target), str(job.attempts),
                      str(job.interruptions), labels.get(job.server, NONE), cut(error[0]))
    return table


@app.command()
@reports_errors
def job(job_id: Annotated[int, typer.Argument(metavar="ID")], config: ConfigOption = None, json_: JsonOption = False):
    """One job with its checkpoint, result, last error and event history."""
    found = open_queue(config).get(job_id)
    if json_:
        print_json(found.to_dict())
        return
    for key, value in _job_fields(found):
        typer.echo(f"{key:>14}: {value}")
    if found.error:
        # A retried job keeps the error of its previous attempt: say so.
        label = "error" if found.state == "failed" else "last attempt's error"
        typer.echo(f"{label}:\n{found.error.rstrip()}")
    typer.echo("events:")
    labels = _name_labels((e.server, e.server_name) for e in found.events)
    for e in found.events:
        typer.echo(f"  {e.to_dict()['at']}  {e.kind:<15} {labels.get(e.server, NONE):<20} {e.detail or ''}")



def _job_fields(job) -> list[tuple[str, str]]:
    data = job.to_dict()

    def shown(key):
        value = data[key]
        if value is None:
            return NONE
        return json.dumps(value, ensure_ascii=False) if key in ("args", "kwargs", "checkpoint", "result") else str(value)

    server = NONE if job.server is None else f"{job.server_name or '?'} ({job.server})"
    return [
        *((key, shown(key)) for key in ("id", "state", "queue", "kind", "target", "args", "kwargs", "priority")),
        ("attempts", f"{job.attempts} of {job.max_attempts}"),
        ("interruptions", f"{job.interruptions} of {job.max_interruptions}"),
        ("server", server),
        *((key, shown(key)) for key in ("run_at", "created_at", "started_at", "finished_at", "checkpoint", "result")),
    ]


@app.command()
@reports_errors
def recurring(config: ConfigOption = None, json_: JsonOption = False):
    """List the recurring jobs (config and API) with their next run and last enqueued tick."""
    from rich.console import Console
    from rich.table import Table

    q = open_queue(config)
    listed = q.recurring()
    _warn_recurring_not_allowed(q.config)
    if json_:
        print_json(listed)
        return
    table = Table("name", "from", "schedule", "tz", "job", "queue", "next run", "last tick", "last job")
    for entry in listed:
        what = " ".join(entry["command"]) if entry["command"] else entry["target"]
        source = "api (shadowed)" if entry["shadowed"] else entry["source"]
        table.add_row(entry["name"], source, entry["schedule"], entry["tz"], what, entry["queue"],
                      entry["next_run"], entry["last_tick"] or NONE,
                      NONE if entry["last_job"] is None else str(entry["last_job"]))
    Console().print(table)


def _warn_recurring_not_allowed(config) -> None:
    """Config entries whose jobs this config's allow-lists refuse: said on
    stderr, as `enqueue` does (other servers may be configured otherwise)."""
    from supervisor.recurring import not_allowed

    if config.source is None:
        return
    allow = AllowList(config.jobs.allow, config.jobs.allow_commands)
    for entry in config.recurring:
        refused = not_allowed(entry, allow)
        if refused:
            typer.echo(f"shiftchange: warning: {refused} in {config.source}; a server with this config fails "
                       "its jobs", err=True)


# --- operator actions ----------------------------------------------------------------------


@app.command()
@reports_errors
def requeue(
    job_ids: Annotated[list[int], typer.Argument(metavar="ID...")],
    force: Annotated[bool, typer.Option("--force", help="Also requeue jobs that succeeded (their code runs again).")] = False,
    config: ConfigOption = None,
):
    """Put jobs back in the queue now (new lease: an old run can record nothing)."""
    q = open_queue(config)
    for job_id in job_ids:
        q.requeue(job_id, force=force)
        typer.echo(f"requeued job {job_id}")


@app.command()
@reports_errors
def delete(job_ids: Annotated[list[int], typer.Argument(metavar="ID...")], config: ConfigOption = None):
    """Delete jobs and their history."""
    q = open_queue(config)
    for job_id in job_ids:
        q.delete(job_id)
        typer.echo(f"deleted job {job_id}")


@app.command()
@reports_errors
def handoff(
    server: Annotated[Optional[list[str]], typer.Option("--server", "-s", metavar="NAME|ID", help="Server name or id; repeat for more (default: every running server on this host).")] = None,
    timeout: Annotated[float, typer.Option(min=0, metavar="SECONDS", help="Seconds to wait for each local supervisor to exit before SIGKILL.")] = 10.0,
    release: Annotated[Optional[str], typer.Option("--release", metavar="RELEASE", help="Every running server of this release, on any host (instead of --server).")] = None,
    config: ConfigOption = None,
    json_: JsonOption = False,
):
    """Hand servers' jobs back and stop them: for pre-stop hooks and deploy scripts.

    Requeues the servers' in-flight jobs in one transaction, then stops their
    supervisors that run on this host."""
    if server and release is not None:
        raise ConfigError("give --server or --release, not both")
    reports = open_queue(config).hand_off(server, timeout, release=release)
    if json_:
        print_json(reports)
        return
    if not reports:
        where = (f"of release {release}" if release is not None
                 else f"named {', '.join(server)}" if server else "registered from this host")
        typer.echo(f"no running server {where}: nothing to hand off")
    for r in reports:
        typer.echo(f"server {r['name']} ({r['id']}): requeued jobs {r['jobs']}; {r['supervisor']}")


@app.command()
@reports_errors
def quiet(
    server: Annotated[Optional[list[str]], typer.Option("--server", "-s", metavar="NAME|ID", help="Server name or id; repeat for more (default: every running server on this host).")] = None,
    undo: Annotated[bool, typer.Option("--undo", help="Let the servers claim again.")] = False,
    config: ConfigOption = None,
    json_: JsonOption = False,
):
    """Stop servers claiming new jobs; they keep running theirs and heartbeating.

    For the start of a deploy: quiet the old servers, then hand them off at
    the end. SIGTSTP to a supervisor does the same; --undo reverses it."""
    changed = open_queue(config).quiet(server, quiet=not undo)
    if json_:
        print_json([{"id": s.id, "name": s.name, "quiet": not undo} for s in changed])
        return
    if not changed:
        where = f"named {', '.join(server)}" if server else "registered from this host"
        typer.echo(f"no running server {where}: nothing to change")
    for s in changed:
        typer.echo(f"server {s.name} ({s.id}): " + ("claiming again" if undo else "quiet: claims nothing new, keeps running its jobs"))


@app.command()
@reports_errors
def pause(
    queue: Annotated[str, typer.Argument(metavar="QUEUE", help="The queue to pause.")],
    config: ConfigOption = None,
):
    """Pause a queue: no server claims its jobs until `shiftchange resume QUEUE`.

    Its jobs stay enqueued and can still be enqueued; jobs already running
    go on. Every server honours it from the moment this returns."""
    changed = open_queue(config).pause(queue)
    typer.echo(f"paused queue {queue}" if changed else f"queue {queue} was paused already")


@app.command()
@reports_errors
def resume(
    queue: Annotated[str, typer.Argument(metavar="QUEUE", help="The paused queue to resume.")],
    config: ConfigOption = None,
):
    """Resume a paused queue: servers claim its jobs again."""
    changed = open_queue(config).resume(queue)
    typer.echo(f"resumed queue {queue}" if changed else f"queue {queue} was not paused")


@app.command()
@reports_errors
def reap(config: ConfigOption = None, json_: JsonOption = False):
    """One pass of dead-server detection: requeue the jobs of servers whose heartbeat stopped."""
    taken = open_queue(config).reap()
    if json_:
        print_json({"requeued": [t.id for t in taken if not t.failed], "failed": [t.id for t in taken if t.failed]})
        return
    typer.echo(f"requeued {len([t for t in taken if not t.failed])} jobs" +
               (f", failed {len([t for t in taken if t.failed])} past max_interruptions" if any(t.failed for t in taken) else ""))


@db_app.command("upgrade")
@reports_errors
def db_upgrade(config: ConfigOption = None):
    """Create or upgrade the schema to this release's version."""
    from supervisor.database import head_revision, make_engine, mask_url, upgrade

    settings = load_config(config)
    engine = make_engine(settings.database.url)
    _reachable(engine)
    before, after = upgrade(engine)
    newer = "" if after == head_revision() else f" (newer than this release's {head_revision()}, and compatible with it)"
    typer.echo(f"{mask_url(settings.database.url)}: schema {before or 'none'} -> {after}{newer}")


def _reachable(engine) -> bool:
    from sqlalchemy.exc import DBAPIError

    from supervisor.database import unavailable

    try:
        with engine.connect():
            return True
    except DBAPIError as exc:
        raise unavailable(engine, exc) from None


@config_app.command("check")
@reports_errors
def config_check(config: ConfigOption = None, json_: JsonOption = False):
    """Validate the config and print the effective values (password masked)."""
    import yaml

    settings = load_config(config)
    data = settings.to_dict()
    if json_:
        print_json({"source": settings.source, "config": data})
        return
    typer.echo(f"# effective config from {settings.source or 'built-in defaults'}")
    typer.echo(yaml.safe_dump(data, sort_keys=False).rstrip())


@app.command()
@reports_errors
def dashboard(
    config: ConfigOption = None,
    host: Annotated[str, typer.Option(help="Address to listen on; another than 127.0.0.1 exposes it to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8642,
    read_only: Annotated[bool, typer.Option("--read-only", help="No actions, even with dashboard.token set.")] = False,
):
    """Serve the web dashboard and Prometheus /metrics (see docs/dashboard.md).

    Actions need dashboard.token (or $SHIFTCHANGE_DASHBOARD_TOKEN); without
    one the dashboard is read-only."""
    try:
        import uvicorn

        from supervisor.web import DashboardSettings, create_app
        from supervisor.web.security import loopback_hosts
    except ImportError as exc:
        raise ConfigError(f"the dashboard needs its extra: pip install 'shiftchange[dashboard]' ({exc})") from None

    q = open_queue(config)
    web = DashboardSettings(
        token=q.config.dashboard.token, show_args=q.config.dashboard.show_args, read_only=read_only,
        allowed_hosts=loopback_hosts(host),
    )
    app_ = create_app(q, web)
    mode = f"read-only ({web.read_only_reason})" if web.read_only_reason else "actions need the token"
    typer.echo(f"shiftchange dashboard on http://{host}:{port}/ for {q.database}; {mode}", err=True)
    uvicorn.run(app_, host=host, port=port, log_level="warning", access_log=False, server_header=False)


@app.command()
@reports_errors
def demo(
    jobs_count: Annotated[int, typer.Option("--jobs", min=1, max=8, metavar="N", help="Long jobs to run across the deploy.")] = 3,
):
    """See a deploy hand jobs over: runs offline on a temporary SQLite database."""
    from supervisor.demo import run_demo

    raise typer.Exit(run_demo(jobs_count))


def main() -> None:
    try:
        app()
    except ConfigError as exc:  # raised before a command's own handler
        fail(str(exc), EXIT_USAGE)
    except KeyboardInterrupt:
        sys.exit(130)
