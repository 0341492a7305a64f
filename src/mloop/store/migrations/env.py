"""Alembic environment: mloop runs migrations programmatically (``Store.upgrade``), handing the
connection over in ``config.attributes``; ``mloop db upgrade`` calls the same code."""

from alembic import context

from mloop.store.models import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
