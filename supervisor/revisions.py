"""Which schema revisions this release knows, and whether it can use the
schema of a database: read in plain SQL, without SQLAlchemy or Alembic
(every read command checks it on start; see supervisor/database.py for
how schemas are created and upgraded, and docs/design.md, "Schema upgrades").
"""

import functools
import re
from dataclasses import dataclass
from pathlib import Path

PREFIX = "shiftchange_"
# Alembic's version table: the revision the schema is really at.
VERSION_TABLE = PREFIX + "schema_version"
# The table release 0.1.0 reads as its version table. It now holds the
# *compatibility marker*: the oldest release head that can run on this
# schema (see database.py and docs/design.md, "Schema upgrades").
COMPAT_TABLE = PREFIX + "alembic_version"
JOBS_TABLE = PREFIX + "jobs"

# Where the migration scripts live; a test points it at a copy with an extra
# contract step.
script_location = str(Path(__file__).parent / "migrations")

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


@dataclass(frozen=True)
class SchemaState:
    """What a database says about its schema."""

    revision: str | None  # the real revision; None: no schema
    marker: str | None  # the compatibility marker
    has_tables: bool  # shiftchange_jobs exists (a schema with no revision is broken)
    recorded: bool  # the real revision is in shiftchange_schema_version (0.2 and later)


def usable(state: SchemaState, known: list[str], head: str) -> bool:
    """Can this release (knowing `known`, up to `head`) run on the schema?"""
    if state.revision == head:
        return True
    return state.revision not in known and state.revision is not None and state.marker in known


_WATCHED = ", ".join(f"'{name}'" for name in (VERSION_TABLE, COMPAT_TABLE, JOBS_TABLE))
# Which of the tables that say where the schema is exist (visible without
# a schema name, as SQLAlchemy's has_table sees them).
_TABLES_SQL = {
    "sqlite": f"SELECT name FROM sqlite_master WHERE type = 'table' AND name IN ({_WATCHED})",
    "postgresql": (
        f"SELECT c.relname FROM pg_catalog.pg_class c WHERE c.relname IN ({_WATCHED}) "
        "AND c.relkind IN ('r', 'p', 'f', 'v', 'm') AND pg_catalog.pg_table_is_visible(c.oid)"
    ),
    "mysql": (
        "SELECT table_name FROM information_schema.tables "
        f"WHERE table_schema = DATABASE() AND table_name IN ({_WATCHED})"
    ),
}
_TABLES_SQL["mariadb"] = _TABLES_SQL["mysql"]


def read_schema_state(fetch, dialect: str) -> SchemaState:
    """Read where the schema is, writing nothing. `fetch(sql)` returns the
    rows of one statement (a DB-API cursor's, or SQLAlchemy's
    exec_driver_sql); `dialect` is SQLAlchemy's name for the database."""
    present = {name for (name,) in fetch(_TABLES_SQL[dialect])}
    revision = _version_in(fetch, VERSION_TABLE) if VERSION_TABLE in present else None
    marker = _version_in(fetch, COMPAT_TABLE) if COMPAT_TABLE in present else None
    return SchemaState(
        # Before 0.2 the marker's table was the real version table.
        revision=revision or marker,
        marker=marker,
        has_tables=JOBS_TABLE in present,
        recorded=revision is not None,
    )


def _version_in(fetch, table_name: str) -> str | None:
    rows = fetch(f"SELECT version_num FROM {table_name}")
    return rows[0][0] if rows else None
