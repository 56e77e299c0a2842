"""Schema migrations: an empty database is created in one call, an older
one is upgraded without hand edits and keeps its jobs, the migrations build
exactly the schema the code declares, and the compatibility marker that
older releases read stays where they can run."""

import shutil
from pathlib import Path

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
    known_revisions,
    make_engine,
    release_tuple,
    upgrade,
)
from supervisor.errors import SchemaOutOfDate, SchemaTooNew, SchemaUpgradeFailed
from supervisor.storage import Storage
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


# --- expand and contract ----------------------------------------------------------

# After this release's head (RELEASE_HEAD), whatever number that has.
CONTRACT_STEP = '''"""A test-only contract step: drops a column that 0.1.0 never knew.

Revision ID: 9999
Revises: {head}
"""

from alembic import op

revision = "9999"
down_revision = "{head}"
branch_labels = None
depends_on = None

additive = False
oldest_release = "0.2.0"
oldest_release_head = "{head}"


def upgrade():
    with op.batch_alter_table("shiftchange_queues") as batch:
        batch.drop_column("changed_at")
'''


def set_versions(engine, revision: str, marker: str) -> None:
    """Make the database look as a newer release left it."""
    with engine.begin() as conn:
        conn.execute(text(f"UPDATE {VERSION_TABLE} SET version_num = :r"), {"r": revision})
        conn.execute(text(f"UPDATE {COMPAT_TABLE} SET version_num = :m"), {"m": marker})


def test_every_migration_declares_whether_it_only_adds():
    """A guard for whoever writes the next migration (docs/design.md)."""
    from supervisor.database import _scripts

    for script in _scripts().walk_revisions():
        module = script.module
        assert isinstance(getattr(module, "additive", None), bool), f"{script.revision}: set additive"
        if not module.additive:
            assert release_tuple(module.oldest_release) and module.oldest_release_head in known_revisions()


def test_the_revisions_read_without_alembic_are_alembics():
    """Read commands list the revisions from the scripts' text (no Alembic
    import); they must be exactly what Alembic walks."""
    from supervisor.database import _scripts

    walked = [script.revision for script in reversed(list(_scripts().walk_revisions()))]
    assert known_revisions() == walked
    assert head_revision() == _scripts().get_current_head() == walked[-1]


def test_a_newer_schema_declared_compatible_is_used_as_it_is(engine, db_url):
    upgrade(engine)
    set_versions(engine, "0099", "0002")  # a later release added things
    ensure_schema(engine)
    ensure_schema(engine, create=False)
    assert upgrade(engine) == ("0099", "0099")  # never down, never touched
    with Queue(db_url) as queue:
        queue.enqueue("app.tasks:work")
        assert queue.counts()["enqueued"] == 1
    assert versions(engine) == ("0099", "0002")


def test_a_newer_schema_that_removed_what_this_release_needs_says_upgrade_this_server(engine):
    upgrade(engine)
    set_versions(engine, "0099", "0098")  # a contract step left only releases from 0098 on
    for attempt in (ensure_schema, lambda e: ensure_schema(e, create=False), upgrade):
        with pytest.raises(SchemaTooNew) as refused:
            attempt(engine)
        message = str(refused.value)
        assert "revision 0099" in message and "upgrade this server" in message, message
        assert "db upgrade" not in message
    assert versions(engine) == ("0099", "0098")


@pytest.fixture
def with_contract_step(tmp_path, monkeypatch):
    """This release's migrations plus a contract step 9999."""
    from supervisor import revisions

    release_head = head_revision()

    scripts = tmp_path / "migrations"
    shutil.copytree(Path(revisions.script_location), scripts,
                    ignore=shutil.ignore_patterns("__pycache__"))
    (scripts / "versions" / "9999_contract.py").write_text(CONTRACT_STEP.replace("{head}", release_head))
    monkeypatch.setattr(revisions, "script_location", str(scripts))
    return release_head


def register(engine, name: str, version: str | None) -> str:
    storage = Storage(engine)
    server_id = storage.register_server(name=name, host="h1", pid=1, pid_started_at=None,
                                        queues=["default"], concurrency=1, dead_after=60.0)
    with engine.begin() as conn:
        conn.execute(text("UPDATE shiftchange_servers SET version = :v WHERE id = :i"),
                     {"v": version, "i": server_id})
    return server_id


def test_a_contract_step_runs_only_by_db_upgrade_once_no_live_server_needs_what_it_removes(
        engine, with_contract_step):
    release_head = with_contract_step
    upgrade(engine, release_head)
    old = register(engine, "old-pod", None)  # 0.1.0 records no version
    register(engine, "new-pod", "0.2.0")
    register(engine, "dev-pod", "0.2.0.dev0")  # a development build counts as its release
    # A server or producer at start never applies it...
    with pytest.raises(SchemaOutOfDate, match="revision 9999.*only `shiftchange db upgrade`"):
        ensure_schema(engine)
    # ...and db upgrade names what blocks it.
    with pytest.raises(SchemaUpgradeFailed) as blocked:
        upgrade(engine)
    assert "old-pod on h1 (shiftchange 0.1.0)" in str(blocked.value)
    assert "new-pod" not in str(blocked.value) and "dev-pod" not in str(blocked.value)
    assert versions(engine) == (release_head, "0002")

    storage = Storage(engine)  # the old pod stops
    storage.release_handoff(old, storage.handoff([old], hold=0, reason="test"))
    assert upgrade(engine) == (release_head, "9999")
    # Release 0.1.0 reads the marker and refuses; 0.2 (this release's head) still runs.
    assert versions(engine) == ("9999", release_head)


def test_release_versions_compare_by_their_numbers():
    assert release_tuple("0.2.0.dev0") == (0, 2, 0) < release_tuple("0.10.0")
    assert release_tuple("1.0") > release_tuple("0.9.9")


def test_a_row_inserted_as_0_1_did_gets_the_defaults_of_the_new_columns(engine, db_url):
    upgrade(engine)
    with engine.begin() as conn:  # the insert of 0.1.0's register_server: no new columns
        conn.execute(text(
            "INSERT INTO shiftchange_servers (id, name, host, pid, state, queues, concurrency,"
            " dead_after, started_at, heartbeat_at) VALUES ('s1', 'old', 'h', 1, 'running', '[]', 1, 10, 0, 0)"))
    with Queue(db_url, create=False) as queue:
        (server,) = queue.servers()
    assert (server.version, server.release, server.quiet) == (None, None, False)
    assert server.to_dict()["version"] is None and "release" in server.to_dict()


def test_an_older_target_never_migrates_down(engine):
    upgrade(engine)
    assert upgrade(engine, "0001") == (head_revision(), head_revision())
    assert versions(engine) == (head_revision(), "0002")


def test_a_failed_migration_names_what_failed_not_an_outage(engine):
    with engine.begin() as conn:  # in the way of revision 0003
        conn.execute(text("CREATE TABLE shiftchange_queues (name VARCHAR(10))"))
    with pytest.raises(SchemaUpgradeFailed) as failed:
        ensure_schema(engine)
    message = str(failed.value)
    assert f"upgrading the schema to revision {head_revision()} failed on" in message, message
    assert "shiftchange_queues" in message and "cannot reach" not in message, message
