"""Bounded database connections, without SQLAlchemy.

How long any database call may wait (Bounds), how each driver is told so,
and what a driver's error means: make_engine (supervisor/database.py) sets
up its connections with these, and `open_reader` opens one the same way
through the DB-API driver alone, for `status`, which must start fast
(issue 11: importing SQLAlchemy alone takes 200 ms).
"""

import importlib
import math
import os
import re
from dataclasses import dataclass, replace

from supervisor.dburl import DatabaseUrl, mask_url, parse_url, with_default_driver
from supervisor.errors import SchemaMissing, StorageRefused, StorageUnavailable
from supervisor.revisions import head_revision, known_revisions, read_schema_state, usable

SQLITE_BUSY_TIMEOUT_S = 5.0
SQLITE_SYNCHRONOUS = {"full": "FULL", "normal": "NORMAL"}  # database.sqlite_synchronous


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


# --- each driver told its bounds ----------------------------------------------------


def connect_args(dialect: str, bounds: Bounds, url) -> dict:
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


def bounded_psycopg(seconds: float):
    """libpq has no read timeout: a query sent into a black hole waits
    forever. Connections of this class give every round trip `seconds`,
    then close themselves (an engine's pool sees that as a disconnect)."""
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

    return BoundedConnection


def bound_mysql_session(dbapi_connection, seconds: float) -> None:
    """The server-side half of the bounds on MySQL and MariaDB: lock waits,
    and (MariaDB) a transaction whose client vanished mid-way."""
    settings = [f"innodb_lock_wait_timeout = {max(1, math.ceil(seconds))}"]
    if "mariadb" in dbapi_connection.get_server_info().lower():
        settings += [f"idle_transaction_timeout = {max(1, math.ceil(seconds))}",
                     f"max_statement_time = {seconds:g}"]
    cursor = dbapi_connection.cursor()
    cursor.execute("SET SESSION " + ", ".join(settings))
    cursor.close()


def prepare_sqlite(dbapi_connection, synchronous: str) -> None:
    """Transactions begun by us, not by the driver (make_engine begins them
    itself, BEGIN IMMEDIATE for writers); `synchronous` and the busy
    timeout, which are per connection (see database._set_up_sqlite)."""
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA synchronous={synchronous}")
    cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
    cursor.close()


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
    url = getattr(engine_or_url, "url", engine_or_url)  # an engine's, or the URL itself
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


def lost_connection(exc) -> bool:
    """Did the error end the connection (rather than the statement)?"""
    if getattr(exc, "connection_invalidated", False):  # SQLAlchemy's word for it
        return True
    text_ = str(getattr(exc, "orig", exc)).lower()
    return any(
        words in text_
        for words in ("connection refused", "server closed", "lost connection", "can't connect",
                      "could not connect", "connection timed out", "terminating connection")
    )


# --- SQLite files --------------------------------------------------------------------------


def sqlite_file(url: DatabaseUrl) -> str | None:
    """The path of a SQLite URL's file; None for memory or a file: URI."""
    path = url.database
    if url.backend != "sqlite" or not path or path == ":memory:" or path.startswith("file:"):
        return None
    return path


def missing_sqlite_file(url: str) -> None:
    """SchemaMissing when `url` is a SQLite file that does not exist: a
    read-only command must not create it (make_engine would)."""
    try:
        path = sqlite_file(parse_url(url))
    except ValueError:
        return  # make_engine says what is wrong with it
    if path is not None and not os.path.exists(path):
        raise SchemaMissing(
            f"no database at {mask_url(url)} (no file {path}): create it with "
            f"`shiftchange db upgrade` (or start `shiftchange run`)"
        )


def check_sqlite_path(url: str, path: str | None) -> None:
    if path and os.path.isdir(path):
        raise StorageRefused(f"cannot use the database {mask_url(url)}: {path} is a directory, not a SQLite file")


# --- a read-only connection through the driver alone --------------------------------------

# What open_reader connects to: the drivers by the names make_engine gives
# them (dburl.default_driver), and each dialect's DB-API module.
_DIALECTS = {"sqlite": "sqlite", "sqlite+pysqlite": "sqlite", "postgresql+psycopg": "postgresql",
             "mysql+pymysql": "mysql", "mariadb+pymysql": "mysql"}
_DRIVERS = {"sqlite": "sqlite3", "postgresql": "psycopg", "mysql": "pymysql"}
# URL options that SQLAlchemy's PyMySQL dialect converts before the driver
# sees them; a URL with one is left to the engine.
_CONVERTED_MYSQL_OPTIONS = {"compress", "connect_timeout", "read_timeout", "write_timeout", "client_flag",
                            "local_infile", "use_unicode", "ssl_ca", "ssl_key", "ssl_cert", "ssl_capath",
                            "ssl_cipher", "ssl_check_hostname"}


def plain_url(text: str) -> DatabaseUrl | None:
    """The URL, with its default driver, where open_reader connects to it
    exactly as make_engine would; None for anything else: not a URL (the
    engine says why), another driver, options that SQLAlchemy translates
    (several PostgreSQL hosts or ports, SQLite URIs, PyMySQL's typed ones)."""
    try:
        url = with_default_driver(parse_url(text))
    except ValueError:
        return None
    dialect = _DIALECTS.get(url.drivername)
    if dialect is None or any(isinstance(value, tuple) for value in url.query.values()):
        return None
    if dialect == "sqlite":
        plain = (not url.query and sqlite_file(url) is not None
                 and not (url.username or url.password or url.host or url.port))
    elif dialect == "postgresql":
        host = url.query.get("host", "")
        plain = "port" not in url.query and "," not in host and ":" not in host
    else:
        plain = not _CONVERTED_MYSQL_OPTIONS & set(url.query)
    return url if plain else None


# The drivers' names for parts of the URL, where they are not the URL's.
_PARAM_NAMES = {"postgresql": {"username": "user", "database": "dbname"}, "mysql": {"username": "user"}}


def connect_params(url: DatabaseUrl) -> dict:
    """What SQLAlchemy's dialect hands the driver for a PostgreSQL or
    MySQL plain_url (URL.translate_connect_args): the URL's parts that are
    set, under the driver's names, then its options as they are."""
    names = _PARAM_NAMES[_DIALECTS[url.drivername]]
    parts = {names.get(part, part): getattr(url, part) for part in ("host", "database", "username", "password", "port")}
    return {name: value for name, value in parts.items() if value} | url.query


class Reader:
    """A read-only DB-API connection to a database whose schema this
    release can use: `fetch` runs one plain SQL statement and returns its
    rows. All its reads are one transaction, as one of Storage's."""

    def __init__(self, connection, url: DatabaseUrl, dialect: str, driver):
        self.connection = connection
        self.url = url
        self.dialect = dialect
        self.driver = driver

    @property
    def database(self) -> str:
        """The URL as `status` shows it: with its driver, password masked."""
        return mask_url(self.url)

    def execute(self, sql: str) -> list[tuple]:
        cursor = self.connection.cursor()
        try:
            cursor.execute(sql)
            return list(cursor.fetchall())
        finally:
            cursor.close()

    def fetch(self, sql: str) -> list[tuple]:
        """The rows of `sql`; the database lost is StorageUnavailable, as
        in Storage's transactions."""
        try:
            return self.execute(sql)
        except (self.driver.OperationalError, self.driver.InterfaceError) as exc:
            raise unavailable(self.url, exc) from None

    def close(self) -> None:
        try:
            self.connection.close()
        except self.driver.Error:
            pass  # closing a lost connection has nothing left to do

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_reader(url_text: str, bounds: Bounds, sqlite_synchronous: str = "full") -> Reader | None:
    """A Reader on `url_text` with the bounds an engine would have, or
    None where the engine must read instead (Queue(url, create=False)):
    not a plain_url, no driver installed (make_engine names the extra to
    install), or a schema this release cannot use as it is (the engine
    waits for one being created and explains the rest, in the same words
    as for every read command). A missing SQLite file, a path that is a
    directory and an unreachable database fail here as they would there."""
    url = plain_url(url_text)
    if url is None:
        return None
    dialect = _DIALECTS[url.drivername]
    if dialect == "sqlite":
        missing_sqlite_file(url_text)
        check_sqlite_path(url_text, url.database)
    try:
        driver = importlib.import_module(_DRIVERS[dialect])
    except ImportError:
        return None
    try:
        connection = _connect(driver, dialect, url, bounds, sqlite_synchronous)
    except driver.Error as exc:
        raise unavailable(url, exc) from None
    reader = Reader(connection, url, dialect, driver)
    if _schema_usable(reader):
        return reader
    reader.close()
    return None


def _connect(driver, dialect: str, url: DatabaseUrl, bounds: Bounds, sqlite_synchronous: str):
    args = connect_args(dialect, bounds, url)
    if dialect == "postgresql":
        return bounded_psycopg(bounds.statement).connect(**(connect_params(url) | args))
    if dialect == "mysql":
        connection = driver.connect(**(connect_params(url) | args))
        bound_mysql_session(connection, bounds.statement)
        return connection
    connection = driver.connect(os.path.abspath(url.database), **args)  # as SQLAlchemy opens the file
    prepare_sqlite(connection, SQLITE_SYNCHRONOUS[sqlite_synchronous])
    connection.execute("BEGIN")  # the other drivers begin one at the first statement
    return connection


def _schema_usable(reader: Reader) -> bool:
    """As database.ensure_schema's first look: a lost connection is an
    outage; any other error is for the engine to look into."""
    try:
        state = read_schema_state(reader.execute, reader.dialect)
    except reader.driver.Error as exc:
        if lost_connection(exc):
            raise unavailable(reader.url, exc) from None
        return False
    return usable(state, known_revisions(), head_revision())
