"""Engines and schema migrations.

Each dialect is set up so that no database call can block the supervisor for
long: connect, read and lock waits are bounded (supervisor/dbapi.py), because
a supervisor stuck in a call cannot heartbeat or hand off.
"""

import functools
import os
from contextlib import contextmanager

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

# Bounds, URLs, errors and schema revisions live in modules that need no
# SQLAlchemy (a read such as `status` does without it); their names are
# kept here for the code that imports them from here.
from supervisor import revisions
from supervisor.dbapi import (  # noqa: F401
    COMMAND_STATEMENT_S,
    DEFAULT_BOUNDS,
    SQLITE_BUSY_TIMEOUT_S,
    SQLITE_SYNCHRONOUS,
    Bounds,
    bound_mysql_session,
    bounded_psycopg,
    bounds_for,
    check_sqlite_path,
    command_bounds,
    connect_args,
    is_permanent,
    lost_connection,
    missing_sqlite_file,
    prepare_sqlite,
    unavailable,
)
from supervisor.dburl import default_driver, mask_url
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
from supervisor.revisions import (  # noqa: F401
    COMPAT_TABLE,
    VERSION_TABLE,
    SchemaState,
    head_revision,
    known_revisions,
    read_schema_state,
    usable,
)
from supervisor.tables import servers

EXTRAS = {"postgresql": "postgres", "mysql": "mysql", "mariadb": "mysql"}


# --- engines -------------------------------------------------------------------------


def _driver_url(url: str):
    """The URL as SQLAlchemy's, with its default driver (dburl.default_driver)."""
    parsed = make_url(url)
    return parsed.set(drivername=default_driver(parsed.drivername))


MYSQL_MULTI_STATEMENTS = 1 << 16  # the protocol's CLIENT_MULTI_STATEMENTS (PyMySQL's CLIENT.MULTI_STATEMENTS)


def make_engine(url: str, pre_ping: bool = False, bounds: Bounds = DEFAULT_BOUNDS,
                sqlite_synchronous: str = "full", keep_connection: bool = False,
                batches: bool = False) -> Engine:
    """An engine for `url` whose every call is bounded by `bounds`.
    `sqlite_synchronous` (database.sqlite_synchronous) is set on each of its
    SQLite connections.
    ConfigError when the URL is not one; StorageRefused when no driver for
    it is installed. `pre_ping` checks a pooled connection before use, so a
    long-lived producer survives a database restart without a failed call.
    `keep_connection`: on SQLite too, one connection stays open for every
    call (only for a process that forks no more, see below): no open and
    close per transaction, and no WAL checkpoint each time the last
    connection to the file closes.
    `batches`: on MySQL and MariaDB, connections that may send several
    statements in one round trip (only the supervisor's, for its handoff:
    see Storage.handoff); elsewhere it changes nothing."""
    try:
        parsed = _driver_url(url)
        dialect = parsed.get_dialect().name
        # SQLite keeps per-process state about open database files (locks, the
        # mapped WAL index) that a fork() copies but cannot make true: a job
        # process forked while the supervisor holds a connection fails with
        # "locking protocol". No pool means no connection is open between
        # transactions, so none is ever open at a fork.
        driver_args = connect_args(dialect, bounds, parsed)
        pooling = {"pool_pre_ping": pre_ping}
        if dialect in ("mysql", "mariadb"):
            pooling["pool_reset_on_return"] = None  # _reset_open_transactions does it
        if dialect == "sqlite" and keep_connection:
            pooling = {"poolclass": StaticPool}
            driver_args["check_same_thread"] = False  # used by one thread at a time
        elif dialect == "sqlite":
            pooling = {"poolclass": NullPool}
        engine = create_engine(parsed, connect_args=driver_args, **pooling)
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
        _reset_open_transactions(engine)
        if batches:
            _allow_multi_statements(engine)
    elif dialect == "sqlite":
        check_sqlite_path(url, parsed.database)
        _create_private_file(parsed.database)
        _set_up_sqlite(engine, SQLITE_SYNCHRONOUS[sqlite_synchronous])
    return engine


def _backend(url: str) -> str:
    try:
        return _driver_url(url).get_backend_name()
    except Exception:
        return ""


def _bound_psycopg(engine: Engine, seconds: float) -> None:
    """Each connection gives every round trip `seconds` (dbapi.bounded_psycopg)."""
    connection_class = bounded_psycopg(seconds)

    @event.listens_for(engine, "do_connect")
    def connect(_dialect, _record, cargs, cparams):
        return connection_class.connect(*cargs, **cparams)


def _bound_mysql_server(engine: Engine, seconds: float) -> None:
    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection, _record):
        bound_mysql_session(dbapi_connection, seconds)


def _reset_open_transactions(engine: Engine) -> None:
    """The pool rolls back every connection it is given back, to end any
    transaction left open. PyMySQL sends that ROLLBACK even when none is
    (psycopg and sqlite3 know better), so a transaction that committed cost
    one more round trip: every heartbeat, claim and outcome, and the sixth
    of a handoff's. Here a connection is rolled back unless the last thing
    SQLAlchemy did on it since it was checked out was to end its
    transaction; one used any other way (raw_connection) always is. The
    engine is made with pool_reset_on_return=None: this is its only reset."""
    open_ = "shiftchange_in_transaction"

    @event.listens_for(engine, "checkout")
    def checked_out(_dbapi_connection, record, _proxy):
        record.info[open_] = True  # unknown until SQLAlchemy ends a transaction on it

    @event.listens_for(engine, "begin")
    def begun(conn):
        if not conn.invalidated:  # (a lost connection is never reused)
            conn.connection.info[open_] = True

    @event.listens_for(engine, "commit")
    @event.listens_for(engine, "rollback")
    def ended(conn):
        if not conn.invalidated:
            conn.connection.info[open_] = False

    @event.listens_for(engine, "reset")
    def reset(dbapi_connection, record, state):
        if record is not None and record.info.get(open_, True) and not state.terminate_only:
            dbapi_connection.rollback()


def _allow_multi_statements(engine: Engine) -> None:
    """Connect with CLIENT.MULTI_STATEMENTS added to the flags SQLAlchemy
    chose (it sets FOUND_ROWS, which rowcounts rely on): a batch of
    statements separated by `;` is then one round trip. Only for an engine
    that runs nothing but our own statements, every value escaped by the
    driver: a batch is what an injection would need."""

    @event.listens_for(engine, "do_connect")
    def with_multi_statements(_dialect, _record, _cargs, cparams):
        cparams["client_flag"] = cparams.get("client_flag", 0) | MYSQL_MULTI_STATEMENTS


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
        prepare_sqlite(dbapi_connection, synchronous)

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


def _alembic_config(connection, version_table: str = VERSION_TABLE):
    # Alembic is imported only to migrate (and to walk the scripts' modules):
    # it costs a read command such as `status` over 100 ms of start-up.
    from alembic.config import Config as AlembicConfig

    config = AlembicConfig()
    config.set_main_option("script_location", revisions.script_location)
    config.attributes["connection"] = connection
    config.attributes["version_table"] = version_table
    return config


def _scripts():
    return _scripts_at(revisions.script_location)


@functools.lru_cache(maxsize=4)
def _scripts_at(location: str):
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config(None))


def schema_state(conn) -> SchemaState:
    """Read where the schema is, writing nothing (the same statements as
    a read without SQLAlchemy: revisions.read_schema_state)."""
    return read_schema_state(lambda sql: conn.exec_driver_sql(sql).all(), conn.dialect.name)


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
            if lost_connection(exc):
                raise unavailable(engine, exc) from None
            return None


def _schema_error(engine, what: str, exc: DBAPIError) -> ShiftchangeError:
    """A lost connection is an outage (retried by a server at start);
    anything else names what failed."""
    if _is_lock_timeout(exc):
        return _lock_timeout(engine)
    if lost_connection(exc):
        return unavailable(engine, exc)
    reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
    return SchemaUpgradeFailed(f"{what} failed on {mask_url(engine.url)}: {reason}")
