"""Alembic environment: runs on a connection that shiftchange hands over.

shiftchange never reads alembic.ini; see supervisor/database.py.
"""

from alembic import context

from supervisor.tables import VERSION_TABLE, metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    # Never the application's alembic_version. A test builds a schema the
    # way 0.1.0 did by naming 0.1.0's version table here.
    version_table=context.config.attributes.get("version_table", VERSION_TABLE),
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
