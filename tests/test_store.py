"""The schema: migrations match the models, init is idempotent, the ledger is unique."""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import insert
from sqlalchemy.exc import IntegrityError

from digest import store
from digest.errors import DatabaseError
from digest.models import Base, Delivery, Subscriber


def test_migrations_build_exactly_the_models(tmp_path: Path) -> None:
    engine = store.open_engine(f"sqlite:///{tmp_path / 'm.db'}")
    assert store.current_revision(engine) is None
    assert store.migrate(engine) == store.head_revision()
    assert store.migrate(engine) == store.head_revision()  # idempotent
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_an_uninitialised_or_missing_database_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DatabaseError, match="run `digest init` first"):
        store.check_schema(store.open_engine(f"sqlite:///{tmp_path / 'empty.db'}"))
    with pytest.raises(DatabaseError, match=r"folder .* does not exist"):
        store.open_engine(f"sqlite:///{tmp_path / 'nope' / 'x.db'}")
    with pytest.raises(DatabaseError, match="is not a database URL"):
        store.open_engine("not a url")


def test_one_delivery_per_issue_and_subscriber(tmp_path: Path) -> None:
    engine = store.open_engine(f"sqlite:///{tmp_path / 'u.db'}")
    store.migrate(engine)
    sessions = store.session_factory(engine)
    now = datetime.now(UTC)
    with sessions() as session:
        issue = store.create_issue(session, date(2026, 11, 27), "s", [], now)
        session.execute(
            insert(Subscriber),
            [
                {
                    "email": "a@example.org",
                    "name": "",
                    "regions": None,
                    "status": "active",
                    "source": "t",
                    "created_at": now,
                    "updated_at": now,
                    "hard_bounces": 0,
                }
            ],
        )
        assert store.create_deliveries(session, issue.id) == 1
        assert store.create_deliveries(session, issue.id) == 0
        session.commit()
        with pytest.raises(IntegrityError):
            session.execute(
                insert(Delivery),
                [{"issue_id": issue.id, "subscriber_id": 1, "status": "pending", "attempts": 0}],
            )
        session.rollback()
        # The same date gives back the same issue, never a second one.
        assert store.create_issue(session, date(2026, 11, 27), "other", [], now).id == issue.id
