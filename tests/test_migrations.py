"""Schema migrations: an empty database is created in one call, an older
one is upgraded without hand edits and keeps its jobs, and the migrations
build exactly the schema the code declares."""

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from supervisor import Queue
from supervisor.database import current_revision, ensure_schema, head_revision, make_engine, upgrade
from supervisor.errors import SchemaOutOfDate
from supervisor.tables import VERSION_TABLE, metadata


@pytest.fixture
def engine(db_url):
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


def test_an_empty_database_gets_the_whole_schema_in_one_call(engine):
    ensure_schema(engine)
    assert current_revision(engine) == head_revision()
    tables = set(inspect(engine).get_table_names())
    assert {"shiftchange_jobs", "shiftchange_servers", "shiftchange_events", VERSION_TABLE} <= tables
    assert "alembic_version" not in tables  # an application's own stays untouched


def test_the_migrations_build_exactly_the_declared_schema(engine):
    upgrade(engine)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
        differences = [d for d in compare_metadata(context, metadata) if "alembic_version" not in str(d)]
    assert differences == []


def test_upgrading_from_the_previous_version_keeps_the_jobs(engine, db_url):
    upgrade(engine, "0001")
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO shiftchange_jobs (queue, kind, target, args, kwargs, priority, state, run_at,"
            " attempts, max_attempts, interruptions, max_interruptions, lease, created_at)"
            " VALUES ('default', 'callable', 'app.tasks:old', '[1]', '{}', 0, 'enqueued', 0, 0, 3, 0, 10, 0, 0)"
        ))
    with pytest.raises(SchemaOutOfDate, match="shiftchange db upgrade"):
        ensure_schema(engine)
    upgrade(engine)
    with Queue(db_url) as queue:
        (job,) = queue.jobs()
        assert (job.target, job.args, job.checkpoint) == ("app.tasks:old", [1], None)


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
