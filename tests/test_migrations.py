"""Schema migrations: an empty database is created in one call, an older
one is upgraded without hand edits and keeps its jobs, the migrations build
exactly the schema the code declares, and the compatibility marker that
older releases read stays where they can run."""

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from supervisor import Queue
from supervisor.database import (
    _alembic_config,
    current_revision,
    ensure_schema,
    head_revision,
    make_engine,
    upgrade,
)
from supervisor.errors import SchemaOutOfDate
from supervisor.tables import COMPAT_TABLE, VERSION_TABLE, metadata


@pytest.fixture
def engine(db_url):
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


def build_like_0_1(engine, revision: str) -> None:
    """The schema as release 0.1.0 left it: Alembic's revision in
    shiftchange_alembic_version, no shiftchange_schema_version."""
    with engine.begin() as conn:
        command.upgrade(_alembic_config(conn, version_table=COMPAT_TABLE), revision)


def versions(engine) -> tuple[str | None, str | None]:
    """(real revision, compatibility marker) as stored."""
    with engine.connect() as conn:
        found = set(inspect(conn).get_table_names())
        return tuple(
            conn.execute(text(f"SELECT version_num FROM {name}")).scalar() if name in found else None
            for name in (VERSION_TABLE, COMPAT_TABLE)
        )


def test_an_empty_database_gets_the_whole_schema_in_one_call(engine):
    ensure_schema(engine)
    assert current_revision(engine) == head_revision()
    tables = set(inspect(engine).get_table_names())
    assert {"shiftchange_jobs", "shiftchange_servers", "shiftchange_events", "shiftchange_queues",
            VERSION_TABLE, COMPAT_TABLE} <= tables
    assert "alembic_version" not in tables  # an application's own stays untouched
    # Release 0.1.0 reads the marker and needs it to be its own head.
    assert versions(engine) == (head_revision(), "0002")


def test_the_migrations_build_exactly_the_declared_schema(engine):
    upgrade(engine)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
        differences = [d for d in compare_metadata(context, metadata) if "alembic_version" not in str(d)]
    assert differences == []


def test_a_schema_left_by_0_1_is_upgraded_at_start_and_keeps_its_jobs(engine, db_url):
    build_like_0_1(engine, "0002")
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO shiftchange_jobs (queue, kind, target, args, kwargs, priority, state, run_at,"
            " attempts, max_attempts, interruptions, max_interruptions, lease, created_at)"
            " VALUES ('default', 'callable', 'app.tasks:old', '[1]', '{}', 0, 'enqueued', 0, 0, 3, 0, 10, 0, 0)"
        ))
    assert versions(engine) == (None, "0002")
    with pytest.raises(SchemaOutOfDate, match="revision 0002.*`shiftchange db upgrade`"):
        ensure_schema(engine, create=False)  # a read never upgrades
    ensure_schema(engine)  # additive steps: a server or producer applies them at start
    assert versions(engine) == (head_revision(), "0002")
    with Queue(db_url) as queue:
        (job,) = queue.jobs()
        assert (job.target, job.args, job.checkpoint) == ("app.tasks:old", [1], None)


def test_upgrading_twice_changes_nothing(engine):
    assert upgrade(engine) == (None, head_revision())
    assert upgrade(engine) == (head_revision(), head_revision())
    assert versions(engine) == (head_revision(), "0002")


def test_an_application_alembic_version_table_is_left_alone(engine):
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)"))
        conn.execute(text("INSERT INTO alembic_version VALUES ('app_rev_42')"))
    try:
        upgrade(engine)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "app_rev_42"
    finally:
        with engine.begin() as conn:
            conn.execute(text("DROP TABLE alembic_version"))
