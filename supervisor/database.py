"""Engines, URL masking and schema migrations.

Each dialect is set up so that no database call can block the supervisor for
long: connect, read and lock waits are bounded, because a supervisor stuck in
a call cannot heartbeat or hand off.
"""

import os
import re
from importlib import resources

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, event, inspect
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError
from sqlalchemy.pool import NullPool

from supervisor.errors import ConfigError, SchemaOutOfDate, StorageUnavailable
from supervisor.tables import VERSION_TABLE, jobs

SQLITE_BUSY_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 5
EXTRAS = {"postgresql": "postgres", "mysql": "mysql", "mariadb": "mysql"}


def mask_url(url) -> str:
    """The URL with any password replaced by ***, safe for logs and output."""
    try:
        return make_url(str(url)).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", str(url))


def _driver_url(url: str):
    """Pick the drivers we ship extras for when the URL names none."""
    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    elif parsed.drivername in ("mysql", "mariadb"):
        parsed = parsed.set(drivername=parsed.drivername + "+pymysql")
    return parsed


def _connect_args(dialect: str) -> dict:
    if dialect == "postgresql":
        # Keepalives and tcp_user_timeout bound a call on a dead network path.
        return {
            "connect_timeout": CONNECT_TIMEOUT_S,
            "keepalives": 1,
            "keepalives_idle": 5,
            "keepalives_interval": 2,
            "keepalives_count": 2,
            "tcp_user_timeout": 10_000,
        }
    if dialect in ("mysql", "mariadb"):
        return {"connect_timeout": CONNECT_TIMEOUT_S, "read_timeout": 30, "write_timeout": 30}
    if dialect == "sqlite":
        return {"timeout": SQLITE_BUSY_TIMEOUT_S}
    return {}


def make_engine(url: str, pre_ping: bool = False) -> Engine:
    """An engine for `url`, or ConfigError saying plainly what is wrong.
    `pre_ping` checks a pooled connection before use, so a long-lived
    producer survives a database restart without a failed call."""
    try:
        parsed = _driver_url(url)
        dialect = parsed.get_dialect().name
        # SQLite keeps per-process state about open database files (locks, the
        # mapped WAL index) that a fork() copies but cannot make true: a job
        # process forked while the supervisor holds a connection fails with
        # "locking protocol". No pool means no connection is open between
        # transactions, so none is ever open at a fork.
        pooling = {"poolclass": NullPool} if dialect == "sqlite" else {"pool_pre_ping": pre_ping}
        engine = create_engine(parsed, connect_args=_connect_args(dialect), **pooling)
    except (ArgumentError, ValueError) as exc:
        raise ConfigError(f"database.url {mask_url(url)!r} is not a database URL: {exc}") from None
    except (NoSuchModuleError, ImportError) as exc:
        extra = EXTRAS.get(make_url(url).get_backend_name(), "")
        hint = f" (pip install 'shiftchange[{extra}]')" if extra else ""
        raise ConfigError(f"no driver for {mask_url(url)}{hint}: {exc}") from None
    if dialect == "sqlite":
        _create_private_file(parsed.database)
        _set_up_sqlite(engine)
    return engine


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
    except DBAPIError as exc:
        raise unavailable(engine, exc) from None


def unavailable(engine_or_url, exc: BaseException) -> StorageUnavailable:
    """A StorageUnavailable that names the database without its password."""
    url = engine_or_url.url if isinstance(engine_or_url, Engine) else engine_or_url
    reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
    return StorageUnavailable(f"cannot reach the database {mask_url(url)}: {reason}")


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
