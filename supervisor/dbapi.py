"""Bounded database connections, without SQLAlchemy.

How long any database call may wait (Bounds), how each driver is told so,
and what a driver's error means: make_engine (supervisor/database.py) sets
up its connections with these. Nothing here imports SQLAlchemy, so that a
command that only reads can do without it (issue 11: importing SQLAlchemy
alone takes 200 ms).
"""

import math
import os
import re
from dataclasses import dataclass, replace

from supervisor.dburl import DatabaseUrl, mask_url, parse_url
from supervisor.errors import SchemaMissing, StorageRefused, StorageUnavailable

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
