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
from supervisor.snapshot import NOW_SQL


class db_now(FunctionElement):
    """The database's current time in epoch seconds (snapshot.NOW_SQL,
    which `status` runs without SQLAlchemy)."""

    type = Float()
    inherit_cache = True


@compiles(db_now, "postgresql")
@compiles(db_now, "mysql")
@compiles(db_now, "mariadb")
@compiles(db_now, "sqlite")
def _now_sql(element, compiler, **kw):
    return NOW_SQL[compiler.dialect.name]
