"""The database clock, as one SQL expression per dialect.

Every time that is compared across hosts (heartbeats, dead-server detection,
holds, retry times) is taken from the database, never from this host, so a
host whose clock is wrong cannot reap a live server early or keep a dead one
alive. Times are stored as float seconds since the Unix epoch (UTC): the same
arithmetic and comparisons on SQLite, PostgreSQL and MySQL/MariaDB.
"""

from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import FunctionElement
from sqlalchemy.types import Float

from supervisor.records import to_datetime, to_iso  # noqa: F401 (their home before issue 11)


class db_now(FunctionElement):
    """The database's current time in epoch seconds."""

    type = Float()
    inherit_cache = True


@compiles(db_now, "postgresql")
def _pg_now(element, compiler, **kw):
    # clock_timestamp(), not now(): now() is frozen at transaction start.
    return "extract(epoch from clock_timestamp())::float8"


@compiles(db_now, "mysql")
@compiles(db_now, "mariadb")
def _mysql_now(element, compiler, **kw):
    return "(UNIX_TIMESTAMP(SYSDATE(6)) + 0e0)"


@compiles(db_now, "sqlite")
def _sqlite_now(element, compiler, **kw):
    return "((julianday('now') - 2440587.5) * 86400.0)"
