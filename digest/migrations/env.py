"""Alembic environment: the engine comes from digest (``store.migrate``), not alembic.ini."""

from __future__ import annotations

from alembic import context

from digest.models import Base

config = context.config
engine = config.attributes["engine"]
sqlite = engine.dialect.name == "sqlite"

with engine.connect() as connection:
    if sqlite:
        # Batch mode rebuilds a table (copy, drop, rename); with foreign keys enforced,
        # dropping a table that other rows point to fails. SQLite honours this pragma
        # only outside a transaction: off before the migrations, checked and on after.
        connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
        connection.commit()
    with connection.begin():
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            # SQLite cannot ALTER most things in place; batch mode rebuilds tables instead.
            render_as_batch=sqlite,
            # APScheduler owns its job table in the same database; it is not ours to migrate.
            include_object=lambda obj, name, type_, reflected, compare_to: (
                name != "apscheduler_jobs"
            ),
        )
        context.run_migrations()
    if sqlite:
        broken = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
        connection.exec_driver_sql("PRAGMA foreign_keys=ON")
        connection.commit()
        if broken:
            raise RuntimeError(f"migration left rows whose foreign key is broken: {broken[:5]}")
