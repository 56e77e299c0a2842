"""Alembic environment: runs on a connection that shiftchange hands over.

shiftchange never reads alembic.ini; see supervisor/migrate.py.
"""

from alembic import context

from supervisor.tables import VERSION_TABLE, metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    version_table=VERSION_TABLE,  # never the application's alembic_version
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
