"""Alembic environment: the engine comes from digest (``store.migrate``), not alembic.ini."""

from __future__ import annotations

from alembic import context

from digest.models import Base

config = context.config
engine = config.attributes["engine"]

with engine.begin() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        # SQLite cannot ALTER most things in place; batch mode rebuilds tables instead.
        render_as_batch=engine.dialect.name == "sqlite",
        # APScheduler owns its job table in the same database; it is not ours to migrate.
        include_object=lambda obj, name, type_, reflected, compare_to: name != "apscheduler_jobs",
    )
    context.run_migrations()
