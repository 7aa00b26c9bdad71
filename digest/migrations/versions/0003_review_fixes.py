"""review fixes: subscriber ids are never reused

Revision ID: 0003_review_fixes
Revises: 0002
Create Date: 2026-12-01 10:00:00

Unsubscribe links name a subscriber by id. SQLite without AUTOINCREMENT hands the
highest id out again after that row is deleted, so an old link could name somebody
else; with AUTOINCREMENT (a rebuild of the table on SQLite) it never does. PostgreSQL's
SERIAL sequences never reuse a value: nothing to do there.
"""

from __future__ import annotations

from alembic import op

revision = "0003_review_fixes"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_context().dialect.name != "sqlite":
        return
    # AUTOINCREMENT is part of CREATE TABLE on SQLite: rebuild the table (rows, ids,
    # indexes and constraints are copied) with it. env.py turns foreign keys off for
    # the rebuild and checks them afterwards.
    with op.batch_alter_table(
        "subscribers", recreate="always", table_kwargs={"sqlite_autoincrement": True}
    ):
        pass


def downgrade() -> None:
    if op.get_context().dialect.name != "sqlite":
        return
    with op.batch_alter_table(
        "subscribers", recreate="always", table_kwargs={"sqlite_autoincrement": False}
    ):
        pass
