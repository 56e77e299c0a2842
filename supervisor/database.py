"""Engines, URL masking and schema migrations.

Each dialect is set up so that no database call can block the supervisor for
long: connect, read and lock waits are bounded, because a supervisor stuck in
a call cannot heartbeat or hand off.
"""

import math
import os
import re
from dataclasses import dataclass, replace
from importlib import resources

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, event, inspect
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError
from sqlalchemy.pool import NullPool

from supervisor.errors import ConfigError, SchemaOutOfDate, StorageRefused, StorageUnavailable
from supervisor.tables import VERSION_TABLE, jobs

SQLITE_BUSY_TIMEOUT_S = 5.0
EXTRAS = {"postgresql": "postgres", "mysql": "mysql", "mariadb": "mysql"}


# --- how long a database call may take ------------------------------------------


@dataclass(frozen=True)
class Bounds:
    """How long one database call may wait, in seconds (docs/design.md,
    "Every database call is bounded"). A black-holed network neither answers
    nor fails, so every wait needs its own limit."""

    connect: int  # to open a connection (whole seconds; libpq's least is 2)
    statement: float  # one round trip, timed by the client; also the server's
    # statement, lock-wait and idle-in-transaction timeouts
    keepalive_idle: int  # an idle connection is probed after this long


def bounds_for(heartbeat_interval: float, dead_after: float) -> Bounds:
    """The bounds for processes of a server with these settings: a call
    stuck on a dead network gives up after a quarter of dead_after (at
    least 1 s, so a busy but healthy database is not mistaken for a dead
    one; at most 5 s, so that a stop signal is acted on within a platform's
    grace), leaving room for several heartbeat attempts before the fence."""
    statement = min(max(dead_after / 4, 1.0), 5.0)
    return Bounds(
        connect=max(2, math.ceil(statement)),
        statement=statement,
        keepalive_idle=max(1, math.ceil(heartbeat_interval)),
    )


COMMAND_STATEMENT_S = 5.0  # a command's reads may scan a large queue


def command_bounds(heartbeat_interval: float, dead_after: float) -> Bounds:
    """For commands and producers: connect as fast as a server gives up,
    but let one statement take longer (`status` counts every job)."""
    bounds = bounds_for(heartbeat_interval, dead_after)
    return replace(bounds, statement=max(bounds.statement, COMMAND_STATEMENT_S))


DEFAULT_BOUNDS = bounds_for(1.0, 10.0)  # the defaults of server.*


# --- engines -------------------------------------------------------------------------


def mask_url(url) -> str:
    """The URL with any password replaced by ***, safe for logs and output."""
    try:
        return make_url(str(url)).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", str(url))


def _driver_url(url: str):
    """Pick the drivers we ship extras for when the URL names none, and take
    `postgres://` (as Heroku, Render and Fly hand it out) for PostgreSQL."""
    parsed = make_url(url)
    backend, _, driver = parsed.drivername.partition("+")
    if backend == "postgres":
        backend = "postgresql"
    if backend == "postgresql":
        parsed = parsed.set(drivername=f"postgresql+{driver or 'psycopg'}")
    elif backend in ("mysql", "mariadb") and not driver:
        parsed = parsed.set(drivername=backend + "+pymysql")
    return parsed


def _connect_args(dialect: str, bounds: Bounds, url) -> dict:
    """Timeouts for the driver. The TCP ones end a call on a path that drops
    packets; the client-side round-trip bound (psycopg below, PyMySQL's
    read/write timeouts) also ends one that a relay or proxy black-holes
    while still acknowledging every packet."""
    statement_ms = int(bounds.statement * 1000)
    if dialect == "postgresql":
        server_side = (
            f"-c statement_timeout={statement_ms} -c lock_timeout={statement_ms} "
            # A transaction left open by a client that vanished mid-way would
            # hold its row locks (its server's row, its jobs) until the server
            # noticed: end it long before another server may reap that one.
            f"-c idle_in_transaction_session_timeout={statement_ms}"
        )
        own = url.query.get("options")
        return {
            "connect_timeout": bounds.connect,
            "keepalives": 1,
            "keepalives_idle": bounds.keepalive_idle,
            "keepalives_interval": 1,
            "keepalives_count": max(1, math.ceil(bounds.statement)),
            "tcp_user_timeout": statement_ms,
            "options": f"{own} {server_side}" if own else server_side,
        }
    if dialect in ("mysql", "mariadb"):
        return {"connect_timeout": bounds.connect, "read_timeout": bounds.statement,
                "write_timeout": bounds.statement}
    if dialect == "sqlite":
        return {"timeout": SQLITE_BUSY_TIMEOUT_S}
    return {}


def make_engine(url: str, pre_ping: bool = False, bounds: Bounds = DEFAULT_BOUNDS) -> Engine:
    """An engine for `url` whose every call is bounded by `bounds`.
    ConfigError when the URL is not one; StorageRefused when no driver for
    it is installed. `pre_ping` checks a pooled connection before use, so a
    long-lived producer survives a database restart without a failed call."""
    try:
        parsed = _driver_url(url)
        dialect = parsed.get_dialect().name
        # SQLite keeps per-process state about open database files (locks, the
        # mapped WAL index) that a fork() copies but cannot make true: a job
        # process forked while the supervisor holds a connection fails with
        # "locking protocol". No pool means no connection is open between
        # transactions, so none is ever open at a fork.
        pooling = {"poolclass": NullPool} if dialect == "sqlite" else {"pool_pre_ping": pre_ping}
        engine = create_engine(parsed, connect_args=_connect_args(dialect, bounds, parsed), **pooling)
    except (NoSuchModuleError, ImportError) as exc:  # NoSuchModuleError is an ArgumentError
        extra = EXTRAS.get(_backend(url), "")
        hint = f" (pip install 'shiftchange[{extra}]')" if extra else ""
        raise StorageRefused(f"no driver for {mask_url(url)}{hint}: {exc}") from None
    except (ArgumentError, ValueError) as exc:
        raise ConfigError(f"database.url {mask_url(url)!r} is not a database URL: {exc}") from None
    if dialect == "postgresql":
        _bound_psycopg(engine, bounds.statement)
    elif dialect in ("mysql", "mariadb"):
        _bound_mysql_server(engine, bounds.statement)
    elif dialect == "sqlite":
        _check_sqlite_path(url, parsed.database)
        _create_private_file(parsed.database)
        _set_up_sqlite(engine)
    return engine


def _backend(url: str) -> str:
    try:
        return _driver_url(url).get_backend_name()
    except Exception:
        return ""


def _bound_psycopg(engine: Engine, seconds: float) -> None:
    """libpq has no read timeout: a query sent into a black hole waits
    forever. Connections of this engine give every round trip `seconds`,
    then close themselves, which the pool sees as a disconnect."""
    import psycopg

    class BoundedConnection(psycopg.Connection):
        def wait(self, gen, interval=0.1, timeout=None):
            try:
                return super().wait(gen, interval=interval, timeout=seconds if timeout is None else timeout)
            except psycopg.OperationalError as exc:
                if self.closed or "wait timeout expired" not in str(exc):
                    raise
                self.close()  # mid-protocol: it can never be used again
                raise psycopg.OperationalError(f"no answer from the database within {seconds:g}s") from None

    @event.listens_for(engine, "do_connect")
    def connect(_dialect, _record, cargs, cparams):
        return BoundedConnection.connect(*cargs, **cparams)


def _bound_mysql_server(engine: Engine, seconds: float) -> None:
    """The server-side half of the bounds on MySQL and MariaDB: lock waits,
    and (MariaDB) a transaction whose client vanished mid-way."""

    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection, _record):
        settings = [f"innodb_lock_wait_timeout = {max(1, math.ceil(seconds))}"]
        if "mariadb" in dbapi_connection.get_server_info().lower():
            settings += [f"idle_transaction_timeout = {max(1, math.ceil(seconds))}",
                         f"max_statement_time = {seconds:g}"]
        cursor = dbapi_connection.cursor()
        cursor.execute("SET SESSION " + ", ".join(settings))
        cursor.close()


def _check_sqlite_path(url: str, path: str | None) -> None:
    if path and os.path.isdir(path):
        raise StorageRefused(f"cannot use the database {mask_url(url)}: {path} is a directory, not a SQLite file")


def _create_private_file(path: str | None) -> None:
    """Create a new SQLite database file readable by its owner only: it
    holds job arguments. SQLite gives its -wal and -shm files the same
    permissions."""
    if not path or path == ":memory:" or path.startswith("file:"):
        return
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        pass
    except OSError as exc:
        raise ConfigError(f"cannot create the SQLite database {path}: {exc.strerror}") from None


def _set_up_sqlite(engine: Engine) -> None:
    """WAL so readers never block the writer; transactions we begin ourselves
    so that writers take the lock up front (BEGIN IMMEDIATE) instead of
    failing half-way when two processes upgrade a read lock at once."""

    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA synchronous=FULL")  # a commit survives power loss too
        cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def on_begin(conn):
        mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")

    # WAL is a property of the file, kept once set: no need to pay for the
    # pragma on every connection.
    try:
        raw = engine.raw_connection()  # outside any transaction, as it must be
        try:
            raw.cursor().execute("PRAGMA journal_mode=WAL")
        finally:
            raw.close()
    except (DBAPIError, engine.dialect.dbapi.Error) as exc:  # a raw connection's are not wrapped
        raise unavailable(engine, exc) from None


# --- what an error means ---------------------------------------------------------------

# Errors that retrying does not fix: the database answered, and said no.
_PERMANENT_MYSQL_CODES = {
    1044,  # access denied to the database
    1045,  # access denied (authentication failed)
    1049,  # unknown database
    1698,  # access denied (auth plugin)
}
_PERMANENT_MESSAGES = re.compile(
    r"database \S+ does not exist|role \S+ does not exist|authentication failed|"
    r"no pg_hba\.conf entry|file is not a database|unable to open database file|"
    r"unknown database|access denied",
    re.IGNORECASE,
)


def is_permanent(exc: BaseException) -> bool:
    """True for an error that retrying will not fix (no such database,
    authentication failed, not a database file); refused connections,
    resets and timeouts are transient."""
    orig = getattr(exc, "orig", None) or exc
    args = getattr(orig, "args", ())
    if args and isinstance(args[0], int):  # PyMySQL: (code, message)
        return args[0] in _PERMANENT_MYSQL_CODES
    return bool(_PERMANENT_MESSAGES.search(str(orig)))


def unavailable(engine_or_url, exc: BaseException) -> StorageUnavailable:
    """A StorageUnavailable that names the database without its password;
    a StorageRefused when retrying would not help."""
    url = engine_or_url.url if isinstance(engine_or_url, Engine) else engine_or_url
    if is_permanent(exc):
        return StorageRefused(f"cannot use the database {mask_url(url)}: {_reason(exc)}")
    return StorageUnavailable(f"cannot reach the database {mask_url(url)}: {_reason(exc)}")


def _reason(exc: BaseException) -> str:
    """The driver's own words, on one line: PyMySQL's message without its
    code; what libpq says after `FATAL:`."""
    orig = getattr(exc, "orig", None) or exc
    args = getattr(orig, "args", ())
    if len(args) == 2 and isinstance(args[0], int):
        return f"{args[1]} (error {args[0]})"
    lines = str(orig).strip().splitlines() or [type(orig).__name__]
    fatal = next((line for line in lines if "FATAL:" in line), None)
    return fatal.split("FATAL:", 1)[1].strip() if fatal else lines[0].strip()


# --- migrations --------------------------------------------------------------


def _alembic_config(connection) -> AlembicConfig:
    config = AlembicConfig()
    config.set_main_option(
        "script_location", str(resources.files("supervisor") / "migrations")
    )
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The schema revision this release of shiftchange expects."""
    return ScriptDirectory.from_config(_alembic_config(None)).get_current_head()


def current_revision(engine: Engine) -> str | None:
    """The schema revision of the database, None when it has none."""
    with engine.connect() as conn:
        return MigrationContext.configure(
            conn, opts={"version_table": VERSION_TABLE}
        ).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Create or upgrade the schema to `revision`, in one go, no hand edits."""
    try:
        with engine.begin() as conn:
            command.upgrade(_alembic_config(conn), revision)
    except DBAPIError as exc:
        raise unavailable(engine, exc) from None


def ensure_schema(engine: Engine) -> None:
    """Create the schema on an empty database; refuse an out-of-date one.

    Creating tables is safe to do implicitly; changing an existing schema is
    an operator's decision (`shiftchange db upgrade`), so it is never implicit.
    """
    try:
        revision = current_revision(engine)
        if revision is None and not inspect(engine).has_table(jobs.name):
            upgrade(engine)
            return
    except DBAPIError as exc:
        raise unavailable(engine, exc) from None
    head = head_revision()
    if revision != head:
        raise SchemaOutOfDate(
            f"the database schema is at revision {revision or 'none'}, this release "
            f"needs {head}: run `shiftchange db upgrade`"
        )
