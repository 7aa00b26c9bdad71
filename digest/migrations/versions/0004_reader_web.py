"""reader web: consent record, queued signup mails, throttles

Revision ID: 0004_reader_web
Revises: 0003_review_fixes
Create Date: 2026-11-29 20:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import digest.models

revision = "0004_reader_web"
down_revision = "0003_review_fixes"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("subscribers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("subscribed_at", digest.models.UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column("confirmed_at", digest.models.UTCDateTime(), nullable=True))
    # Everyone on the list before this revision was imported: they subscribed when the
    # row was created, and nobody confirmed by double opt-in.
    op.execute("UPDATE subscribers SET subscribed_at = created_at WHERE subscribed_at IS NULL")

    op.create_table(
        "signup_mails",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("email", sa.String(length=320), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("regions", sa.JSON(), nullable=True),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("created_at", digest.models.UTCDateTime(), nullable=False),
        sa.Column("next_attempt_at", digest.models.UTCDateTime(), nullable=False),
        sa.Column("lease_until", digest.models.UTCDateTime(), nullable=True),
        sa.Column("sent_at", digest.models.UTCDateTime(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_signup_mails")),
    )
    with op.batch_alter_table("signup_mails", schema=None) as batch_op:
        batch_op.create_index(
            "ix_signup_mails_status_next", ["status", "next_attempt_at"], unique=False
        )

    op.create_table(
        "throttles",
        sa.Column("key", sa.String(length=400), nullable=False),
        sa.Column("until", digest.models.UTCDateTime(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_throttles")),
    )


def downgrade() -> None:
    op.drop_table("throttles")
    with op.batch_alter_table("signup_mails", schema=None) as batch_op:
        batch_op.drop_index("ix_signup_mails_status_next")
    op.drop_table("signup_mails")
    with op.batch_alter_table("subscribers", schema=None) as batch_op:
        batch_op.drop_column("confirmed_at")
        batch_op.drop_column("subscribed_at")
