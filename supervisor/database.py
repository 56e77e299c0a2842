"""Engines, URL masking and schema migrations.

Each dialect is set up so that no database call can block the supervisor for
long: connect, read and lock waits are bounded, because a supervisor stuck in
a call cannot heartbeat or hand off.
"""

import functools
import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

from sqlalchemy import (
    Column,
    MetaData,
    String,
    Table,
    column,
    create_engine,
    event,
    insert,
    inspect,
    null,
    select,
    table,
    text,
    update,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError
from sqlalchemy.pool import NullPool, StaticPool

from supervisor.errors import (
    ConfigError,
    SchemaMissing,
    SchemaOutOfDate,
    SchemaTooNew,
    SchemaUpgradeFailed,
    ShiftchangeError,
    StorageRefused,
    StorageUnavailable,
)
from supervisor.tables import COMPAT_TABLE, VERSION_TABLE, jobs, servers

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
            "keepalives_count": min(127, max(1, math.ceil(bounds.statement))),  # Linux takes at most 127
            "tcp_user_timeout": statement_ms,
            "options": f"{own} {server_side}" if own else server_side,
        }
    if dialect in ("mysql", "mariadb"):
        return {"connect_timeout": bounds.connect, "read_timeout": bounds.statement,
                "write_timeout": bounds.statement}
    if dialect == "sqlite":
        return {"timeout": SQLITE_BUSY_TIMEOUT_S}
    return {}


SQLITE_SYNCHRONOUS = {"full": "FULL", "normal": "NORMAL"}  # database.sqlite_synchronous


def make_engine(url: str, pre_ping: bool = False, bounds: Bounds = DEFAULT_BOUNDS,
                sqlite_synchronous: str = "full", keep_connection: bool = False) -> Engine:
    """An engine for `url` whose every call is bounded by `bounds`.
    `sqlite_synchronous` (database.sqlite_synchronous) is set on each of its
    SQLite connections.
    ConfigError when the URL is not one; StorageRefused when no driver for
    it is installed. `pre_ping` checks a pooled connection before use, so a
    long-lived producer survives a database restart without a failed call.
    `keep_connection`: on SQLite too, one connection stays open for every
    call (only for a process that forks no more, see below): no open and
    close per transaction, and no WAL checkpoint each time the last
    connection to the file closes."""
    try:
        parsed = _driver_url(url)
        dialect = parsed.get_dialect().name
        # SQLite keeps per-process state about open database files (locks, the
        # mapped WAL index) that a fork() copies but cannot make true: a job
        # process forked while the supervisor holds a connection fails with
        # "locking protocol". No pool means no connection is open between
        # transactions, so none is ever open at a fork.
        connect_args = _connect_args(dialect, bounds, parsed)
        pooling = {"pool_pre_ping": pre_ping}
        if dialect == "sqlite" and keep_connection:
            pooling = {"poolclass": StaticPool}
            connect_args["check_same_thread"] = False  # used by one thread at a time
        elif dialect == "sqlite":
            pooling = {"poolclass": NullPool}
        engine = create_engine(parsed, connect_args=connect_args, **pooling)
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
        _set_up_sqlite(engine, SQLITE_SYNCHRONOUS[sqlite_synchronous])
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


def _set_up_sqlite(engine: Engine, synchronous: str) -> None:
    """WAL so readers never block the writer; transactions we begin ourselves
    so that writers take the lock up front (BEGIN IMMEDIATE) instead of
    failing half-way when two processes upgrade a read lock at once.

    `synchronous` is per connection, so it is set on every one. In WAL mode
    FULL fsyncs the log at every commit: a commit survives power loss too.
    NORMAL fsyncs only at checkpoints: about twice the commits per second,
    and a power loss (not a crash of the process) may lose the last commits,
    never corrupt the file (docs/deploying.md, "SQLite durability")."""

    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA synchronous={synchronous}")
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
#
# Expand, then contract (docs/design.md, "Schema upgrades"). Two tables say
# where a schema is:
#   shiftchange_schema_version  Alembic's version table: the revision the
#                               schema is really at.
#   shiftchange_alembic_version the table release 0.1.0 reads as its version
#                               table (and refuses anything but its head),
#                               now the *compatibility marker*: the oldest
#                               release head that can run on this schema.
# An additive revision leaves the marker alone; a contract step (one that
# drops or renames) moves it to the head of the oldest release that does
# not need what it removes. A release runs on the schema when the real
# revision is its head, or is newer and the marker is a revision it knows.

FIRST_RELEASE_HEAD = "0002"  # release 0.1.0: where the marker starts
SCHEMA_LOCK_NAME = "shiftchange_schema"  # MariaDB GET_LOCK name
SCHEMA_LOCK_KEY = 0x73686966746368  # PostgreSQL advisory lock key ("shiftch")
SCHEMA_LOCK_WAIT_S = 60
# Creating or upgrading the schema: wait for the lock as long as another
# replica may hold it, and give one migration step minutes. Still bounded:
# a black-holed database ends the wait, and nothing is owned before start.
MIGRATION_BOUNDS = Bounds(connect=5, statement=SCHEMA_LOCK_WAIT_S + 240, keepalive_idle=5)
# Where the migration scripts live; a test points it at a copy with an extra
# contract step.
script_location = str(resources.files("supervisor") / "migrations")


@dataclass(frozen=True)
class SchemaState:
    """What a database says about its schema."""

    revision: str | None  # the real revision; None: no schema
    marker: str | None  # the compatibility marker
    has_tables: bool  # shiftchange_jobs exists (a schema with no revision is broken)
    recorded: bool  # the real revision is in shiftchange_schema_version (0.2 and later)


def _alembic_config(connection, version_table: str = VERSION_TABLE):
    # Alembic is imported only to migrate (and to walk the scripts' modules):
    # it costs a read command such as `status` over 100 ms of start-up.
    from alembic.config import Config as AlembicConfig

    config = AlembicConfig()
    config.set_main_option("script_location", script_location)
    config.attributes["connection"] = connection
    config.attributes["version_table"] = version_table
    return config


def _scripts():
    return _scripts_at(script_location)


@functools.lru_cache(maxsize=4)
def _scripts_at(location: str):
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config(None))


_REVISION_LINE = re.compile(r"""^(down_revision|revision)\s*=\s*(?:["']([^"']+)["']|None)\s*$""", re.M)


@functools.lru_cache(maxsize=4)
def _revisions_at(location: str) -> tuple[str, ...]:
    """Every revision of the scripts at `location`, oldest first, read from
    their `revision = "NNNN"` and `down_revision = ...` lines without
    importing Alembic or the scripts (a read command checks the schema on
    every start). tests/test_migrations.py checks it against Alembic's walk."""
    parent = {}
    for path in sorted((Path(location) / "versions").glob("*.py")):
        lines = dict((name, value or None) for name, value in _REVISION_LINE.findall(path.read_text()))
        if "revision" in lines:
            parent[lines.get("down_revision")] = lines["revision"]
    chain, revision = [], parent.get(None)
    while revision is not None:
        chain.append(revision)
        revision = parent.get(revision)
    return tuple(chain)


def head_revision() -> str:
    """The schema revision this release of shiftchange expects."""
    return known_revisions()[-1]


def known_revisions() -> list[str]:
    """Every revision this release knows, oldest first."""
    return list(_revisions_at(script_location))


def _version_in(conn, table_name: str) -> str | None:
    if not inspect(conn).has_table(table_name):
        return None
    return conn.execute(select(column("version_num")).select_from(table(table_name))).scalar()


def schema_state(conn) -> SchemaState:
    """Read where the schema is, writing nothing."""
    revision = _version_in(conn, VERSION_TABLE)
    marker = _version_in(conn, COMPAT_TABLE)
    return SchemaState(
        # Before 0.2 the marker's table was the real version table.
        revision=revision or marker,
        marker=marker,
        has_tables=inspect(conn).has_table(jobs.name),
        recorded=revision is not None,
    )


def current_revision(engine: Engine) -> str | None:
    """The schema revision of the database, None when it has none."""
    try:
        with engine.connect() as conn:
            return schema_state(conn).revision
    except DBAPIError as exc:
        raise unavailable(engine, exc) from None


def marker_for(revision: str) -> str:
    """The compatibility marker of a schema at `revision`: the head of the
    oldest release that runs on it, moved only by contract steps."""
    marker = FIRST_RELEASE_HEAD
    for script in reversed(list(_scripts().iterate_revisions(revision, None))):
        if not is_additive(script.module):
            marker = script.module.oldest_release_head
    return marker


def is_additive(module) -> bool:
    """A migration only adds unless it says so: one that forgets to declare
    itself is treated as a contract step, the safe side."""
    return getattr(module, "additive", False)


def usable(state: SchemaState, known: list[str], head: str) -> bool:
    """Can this release (knowing `known`, up to `head`) run on the schema?"""
    if state.revision == head:
        return True
    return state.revision not in known and state.revision is not None and state.marker in known


def _too_new(engine, state: SchemaState) -> SchemaTooNew:
    from supervisor import __version__

    return SchemaTooNew(
        f"the database {mask_url(engine.url)} has schema revision {state.revision}, which "
        f"shiftchange {__version__} (schema {head_revision()}) cannot use: upgrade this "
        f"server to a newer shiftchange"
    )


def _explain(engine, state: SchemaState) -> ShiftchangeError:
    """Why a read-only command cannot use the schema, in one line."""
    url = mask_url(engine.url)
    if state.revision is None and not state.has_tables:
        return SchemaMissing(
            f"no shiftchange schema in {url}: create it with `shiftchange db upgrade` "
            f"(or start `shiftchange run`)"
        )
    if state.revision is None:
        return SchemaUpgradeFailed(
            f"{url} has shiftchange tables but no schema revision: "
            f"was it created by hand? run `shiftchange db upgrade` to check it"
        )
    if state.revision not in known_revisions():
        return _too_new(engine, state)
    return SchemaOutOfDate(
        f"the database schema is at revision {state.revision}, this release needs "
        f"{head_revision()}: start a server of this release or run `shiftchange db upgrade`"
    )


@contextmanager
def schema_lock(engine: Engine):
    """A connection in a transaction that holds the schema lock, so one
    process at a time creates or upgrades the schema and everyone else waits
    for it, then sees its result: a PostgreSQL advisory lock, MariaDB's
    GET_LOCK, SQLite's write lock (BEGIN IMMEDIATE)."""
    dialect = engine.dialect.name
    try:
        conn = engine.connect()
    except DBAPIError as exc:
        raise unavailable(engine, exc) from None
    with conn:
        if dialect in ("mysql", "mariadb"):
            got = conn.execute(
                text("SELECT GET_LOCK(:name, :wait)"),
                {"name": SCHEMA_LOCK_NAME, "wait": SCHEMA_LOCK_WAIT_S},
            ).scalar()
            conn.commit()  # the lock belongs to the session, not the transaction
            if got != 1:
                raise _lock_timeout(engine)
        if dialect == "sqlite":
            conn.execution_options(sqlite_begin="IMMEDIATE")
        try:
            with conn.begin():
                if dialect == "postgresql":
                    conn.execute(text(f"SET LOCAL lock_timeout = '{SCHEMA_LOCK_WAIT_S}s'"))
                    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
                yield conn
        finally:
            if dialect in ("mysql", "mariadb"):
                _release_named_lock(conn)


def _release_named_lock(conn) -> None:
    try:
        conn.rollback()
        conn.execute(text("SELECT RELEASE_LOCK(:name)"), {"name": SCHEMA_LOCK_NAME})
        conn.commit()
    except DBAPIError:
        pass  # a lost session has lost its lock too


def _lock_timeout(engine) -> StorageUnavailable:
    # An outage-like error: a server at start retries it.
    return StorageUnavailable(
        f"timed out waiting for the schema lock of {mask_url(engine.url)}: "
        f"another process is creating or upgrading the schema"
    )


def upgrade(engine: Engine, revision: str = "head", contract: bool = True) -> tuple[str | None, str | None]:
    """Create or upgrade the schema to `revision`, under the schema lock;
    returns (revision before, revision after). Never migrates down, and
    leaves a newer schema that this release may use alone. With
    `contract=False` (a server or producer at start) only additive steps
    run; a contract step also needs that no live server still runs a
    release it would break.

    It runs on an engine of its own with MIGRATION_BOUNDS: a server's
    statement bound (seconds) would cut off the wait for the schema lock
    while another replica migrates, and any step that takes longer, such as
    building an index on a large table."""
    migrating = make_engine(engine.url.render_as_string(hide_password=False), bounds=MIGRATION_BOUNDS)
    try:
        with schema_lock(migrating) as conn:
            return _upgrade_locked(migrating, conn, revision, contract)
    except DBAPIError as exc:
        target = head_revision() if revision == "head" else revision
        raise _schema_error(engine, f"creating or upgrading the schema to revision {target}", exc) from None
    finally:
        migrating.dispose()


def _is_lock_timeout(exc) -> bool:
    text_ = str(getattr(exc, "orig", exc)).lower()
    return "lock timeout" in text_ or "database is locked" in text_


def _connection_error(exc) -> bool:
    if getattr(exc, "connection_invalidated", False):
        return True
    text_ = str(getattr(exc, "orig", exc)).lower()
    return any(
        words in text_
        for words in ("connection refused", "server closed", "lost connection", "can't connect",
                      "could not connect", "connection timed out", "terminating connection")
    )


def _upgrade_locked(engine, conn, revision, contract):
    state = schema_state(conn)
    known = known_revisions()
    if state.revision is not None and state.revision not in known:
        if state.marker in known:
            return state.revision, state.revision  # newer, and declared compatible
        raise _too_new(engine, state)
    if state.revision is None and state.has_tables:
        raise _explain(engine, state)
    target = head_revision() if revision == "head" else revision
    pending = _pending(state.revision, target)
    contracts = [script for script in pending if not is_additive(script.module)]
    if contracts and not contract:
        raise SchemaOutOfDate(
            f"the database schema is at revision {state.revision}; revision "
            f"{contracts[0].revision} removes what older releases use, so only "
            f"`shiftchange db upgrade` applies it"
        )
    if contracts:
        _refuse_if_blocked(engine, conn, contracts)
    from alembic import command

    if state.revision is not None and not state.recorded:
        # A schema written by 0.1.0: its revision moves to the new table.
        command.stamp(_alembic_config(conn), state.revision)
    if pending:
        command.upgrade(_alembic_config(conn), target)
    after = target if pending else state.revision
    if after is not None:
        _set_marker(conn, state.marker, marker_for(after))
    return state.revision, after


def _pending(current: str | None, target: str) -> list:
    """The scripts between `current` (excluded) and `target`, oldest first;
    none when `target` is not ahead of `current`: we never migrate down."""
    known = known_revisions()
    if current is not None and known.index(target) <= known.index(current):
        return []
    return list(reversed(list(_scripts().iterate_revisions(target, current))))


def _set_marker(conn, old: str | None, new: str) -> None:
    if old == new:
        return
    marker = table(COMPAT_TABLE, column("version_num"))
    if old is None:
        Table(COMPAT_TABLE, MetaData(), Column("version_num", String(32), primary_key=True)).create(
            conn, checkfirst=True
        )
        conn.execute(insert(marker).values(version_num=new))
    else:
        conn.execute(update(marker).values(version_num=new))


def _refuse_if_blocked(engine, conn, contracts) -> None:
    """A contract step waits until no live server runs a release that needs
    what it removes; say which ones do."""
    needed = max((script.module.oldest_release for script in contracts), key=release_tuple)
    blockers = [
        f"{name} on {host} (shiftchange {version or '0.1.0'})"
        for name, host, version in _live_servers(conn)
        if release_tuple(version or "0.1.0") < release_tuple(needed)
    ]
    if blockers:
        raise SchemaUpgradeFailed(
            f"not upgrading {mask_url(engine.url)}: revision {contracts[-1].revision} needs every "
            f"live server on shiftchange {needed} or newer; still older: {', '.join(blockers)}"
        )


def _live_servers(conn) -> list[tuple[str, str, str | None]]:
    """(name, host, version) of every server whose heartbeat is fresh."""
    from supervisor.dbtime import db_now

    has_version = "version" in {c["name"] for c in inspect(conn).get_columns(servers.name)}
    version = servers.c.version if has_version else null()
    query = select(servers.c.name, servers.c.host, version).where(
        servers.c.state.in_(("running", "stopping")),
        servers.c.heartbeat_at + servers.c.dead_after >= db_now(),
    )
    return [tuple(row) for row in conn.execute(query)]


def release_tuple(version: str) -> tuple[int, ...]:
    """"0.2.0.dev0" -> (0, 2, 0): a development version counts as its release."""
    parts = []
    for part in version.split("."):
        if not part.isdigit():
            break
        parts.append(int(part))
    return tuple(parts)


def missing_sqlite_file(url: str) -> None:
    """SchemaMissing when `url` is a SQLite file that does not exist: a
    read-only command must not create it (make_engine would)."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return  # make_engine says what is wrong with it
    path = parsed.database
    if parsed.get_backend_name() != "sqlite" or not path or path == ":memory:" or path.startswith("file:"):
        return
    if not os.path.exists(path):
        raise SchemaMissing(
            f"no database at {mask_url(url)} (no file {path}): create it with "
            f"`shiftchange db upgrade` (or start `shiftchange run`)"
        )


def ensure_schema(engine: Engine, create: bool = True) -> None:
    """Make sure this release can run on the database's schema.

    With `create` (run, enqueue, the Python API): create the schema on an
    empty database and apply additive migrations, under the schema lock;
    whoever loses the race waits and goes on. Without (reads): never write;
    say in one line what is wrong. A newer schema is fine when declared
    compatible with this release; otherwise: upgrade this server.
    """
    known, head = known_revisions(), head_revision()
    state = _peek(engine)
    if state is not None and usable(state, known, head):
        return
    if state is not None and state.revision is not None and state.revision not in known:
        raise _too_new(engine, state)
    if create:
        upgrade(engine, contract=False)
        return
    # A reader may have come while another process creates the schema:
    # wait for it (taking the lock writes nothing), then look again.
    try:
        with schema_lock(engine) as conn:
            state = schema_state(conn)
    except DBAPIError as exc:
        raise _schema_error(engine, "reading the schema revision", exc) from None
    if not usable(state, known, head):
        raise _explain(engine, state)


def _peek(engine: Engine) -> SchemaState | None:
    """The schema state read without the lock, or None when it cannot be
    read that way: MariaDB refuses to read a table's definition while
    another session changes it (error 1684)."""
    try:
        conn = engine.connect()
    except DBAPIError as exc:
        raise unavailable(engine, exc) from None
    with conn:
        try:
            return schema_state(conn)
        except DBAPIError as exc:
            if _connection_error(exc):
                raise unavailable(engine, exc) from None
            return None


def _schema_error(engine, what: str, exc: DBAPIError) -> ShiftchangeError:
    """A lost connection is an outage (retried by a server at start);
    anything else names what failed."""
    if _is_lock_timeout(exc):
        return _lock_timeout(engine)
    if _connection_error(exc):
        return unavailable(engine, exc)
    reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
    return SchemaUpgradeFailed(f"{what} failed on {mask_url(engine.url)}: {reason}")
