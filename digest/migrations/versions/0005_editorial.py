"""editorial: lead story, note and approval of an issue; image credits of articles

Revision ID: 0005_editorial
Revises: 0004_reader_web
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import digest.models

revision = "0005_editorial"
down_revision = "0004_reader_web"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # batch_alter_table: SQLite cannot add a foreign key to an existing table in place.
    with op.batch_alter_table("issues") as batch:
        batch.add_column(sa.Column("lead_article_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("note", sa.Text(), nullable=True))
        batch.add_column(sa.Column("approved_at", digest.models.UTCDateTime(), nullable=True))
        batch.add_column(sa.Column("approved_by", sa.String(length=320), nullable=True))
        batch.create_foreign_key(
            op.f("fk_issues_lead_article_id_articles"), "articles", ["lead_article_id"], ["id"]
        )
    with op.batch_alter_table("articles") as batch:
        batch.add_column(sa.Column("image_credit", sa.String(length=300), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("articles") as batch:
        batch.drop_column("image_credit")
    with op.batch_alter_table("issues") as batch:
        batch.drop_constraint(op.f("fk_issues_lead_article_id_articles"), type_="foreignkey")
        batch.drop_column("approved_by")
        batch.drop_column("approved_at")
        batch.drop_column("note")
        batch.drop_column("lead_article_id")
