"""Alembic's environment for the audit schema: always run on a connection the server (or CLI) hands over."""

from __future__ import annotations

from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=None, version_table="audit_alembic_version")
with context.begin_transaction():
    context.run_migrations()
