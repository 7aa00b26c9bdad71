"""The schema: migrations match the models, init is idempotent, the ledger is unique."""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, delete, insert, text
from sqlalchemy.exc import IntegrityError

from digest import pipeline, store
from digest.config import load_config
from digest.errors import DatabaseError
from digest.models import Base, Delivery, Subscriber
from tests.conftest import EDITION, Recorder, rss, week_items, write_config
from tests.test_send import add_subscribers


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


class GatedRecorder(Recorder):
    """Accepts ``pass_first`` messages at once, then holds every DATA reply until ``gate``."""

    def __init__(self, pass_first: int) -> None:
        super().__init__()
        self.pass_first = pass_first
        self.gate = threading.Event()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if len(self.messages) >= self.pass_first:
            while not self.gate.is_set():
                await asyncio.sleep(0.01)
        return await super().handle_DATA(server, session, envelope)


def test_postgres_send_survives_idle_in_transaction_timeout(
    tmp_path: Path, feed_file: Path
) -> None:
    from tests.test_faults import start, wait_for
    from tests.test_postgres import pg_schema

    # A date of our own, as any database-wide name would need (there is none any more).
    edition = date(2100 + secrets.randbelow(800), 11, 27)
    shift = datetime(edition.year, 11, 27, 12, tzinfo=UTC) - EDITION
    items = week_items()
    for it in items:
        it["published"] += shift
    feed_file.write_text(rss(items), encoding="utf-8")
    tag = f"digest_test_{secrets.token_hex(4)}"
    handler = GatedRecorder(pass_first=5)
    controller = start(handler)
    outcome: dict[str, Any] = {}
    try:
        # Any connection left idle in a transaction for 300 ms is killed by the server.
        with pg_schema(idle_in_transaction_session_timeout="300", application_name=tag) as url:
            path = write_config(tmp_path, port=controller.port)
            path.write_text(
                path.read_text(encoding="utf-8").replace("sqlite:///digest.db", url),
                encoding="utf-8",
            )
            config = load_config(path)
            pipeline.init_db(config)
            app = pipeline.open_app(config)
            assert pipeline.fetch(app).new == 10
            emails = add_subscribers(app, 30)

            def send() -> None:
                try:
                    outcome["report"] = pipeline.send(app, edition)
                except BaseException as exc:
                    outcome["error"] = exc

            sender = threading.Thread(target=send)
            sender.start()
            monitor = create_engine(url)
            try:

                def sent_rows() -> int:
                    with monitor.connect() as conn:
                        return int(
                            conn.execute(
                                text("SELECT count(*) FROM deliveries WHERE status = 'sent'")
                            ).scalar_one()
                        )

                # Five sent and committed; every worker now waits on a held DATA reply,
                # so the sender does no database work until the gate opens.
                wait_for(lambda: sent_rows() == 5 or not sender.is_alive())
                assert sender.is_alive(), outcome
                # Watch for three times the server's timeout: nothing of ours may sit
                # idle in a transaction (the old lock connection did, and was killed).
                deadline = time.monotonic() + 0.9
                while time.monotonic() < deadline:
                    with monitor.connect() as conn:
                        idle = conn.execute(
                            text(
                                "SELECT pid, left(query, 60) FROM pg_stat_activity "
                                "WHERE application_name = :tag AND state = 'idle in transaction'"
                            ),
                            {"tag": tag},
                        ).all()
                    assert idle == [], idle
                    time.sleep(0.05)
                assert sender.is_alive() and "error" not in outcome, outcome
            finally:
                handler.gate.set()
                sender.join(60)
                monitor.dispose()
            assert not sender.is_alive()
            assert "error" not in outcome, outcome
            report = outcome["report"]
            assert report.stats.sent == 30 and report.counts["sent"] == 30
            assert sorted(r for m in handler.messages for r in m.rcpt_tos) == sorted(emails)
            app.engine.dispose()
    finally:
        controller.stop()


def subscriber_row(email: str, now: datetime) -> dict[str, Any]:
    return {
        "email": email,
        "name": "",
        "regions": None,
        "status": "active",
        "source": "t",
        "created_at": now,
        "updated_at": now,
        "hard_bounces": 0,
    }


def test_upgrading_keeps_every_row_and_ids_are_never_reused(tmp_path: Path) -> None:
    """An unsubscribe link names its subscriber by id: a deleted id must never come back."""
    from alembic import command

    engine = store.open_engine(f"sqlite:///{tmp_path / 'old.db'}")
    command.upgrade(store._alembic_config(engine), "0002")  # a database of before
    sessions = store.session_factory(engine)
    now = datetime.now(UTC)
    with sessions() as session:
        # The issues table of 0002, written as SQL: the model has columns added since.
        session.execute(
            text(
                "INSERT INTO issues (id, edition_date, status, subject, built_at)"
                " VALUES (1, '2026-11-27', 'ready', 's', '2026-11-27 12:00:00')"
            )
        )
        session.execute(
            insert(Subscriber), [subscriber_row(f"r{i}@example.org", now) for i in range(3)]
        )
        assert store.create_deliveries(session, 1) == 3
        session.commit()
    assert store.migrate(engine) == store.head_revision()
    with sessions() as session:
        assert [s.email for s in store.iter_subscribers(session)] == [
            f"r{i}@example.org" for i in range(3)
        ]
        assert store.delivery_counts(session, 1)["pending"] == 3
        last = store.subscriber_by_email(session, "r2@example.org")
        assert last is not None
        session.execute(delete(Delivery).where(Delivery.subscriber_id == last.id))
        session.execute(delete(Subscriber).where(Subscriber.id == last.id))
        session.commit()
        session.execute(insert(Subscriber), [subscriber_row("new@example.org", now)])
        session.commit()
        newcomer = store.subscriber_by_email(session, "new@example.org")
        assert newcomer is not None and newcomer.id > last.id
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert conn.execute(text("PRAGMA foreign_key_check")).all() == []
    engine.dispose()


def test_upgrading_keeps_issues_their_selection_and_the_ledger(tmp_path: Path) -> None:
    """Batch migrations rebuild `issues`; with SQLite's foreign keys on, dropping the old
    table cascaded into issue_articles and deliveries and emptied them."""
    from alembic import command

    engine = store.open_engine(f"sqlite:///{tmp_path / 'old.db'}")
    command.upgrade(store._alembic_config(engine), "0002")
    now = "2026-11-27 12:00:00"
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO articles (id, link, title, dek, authors, categories, published_at,"
                " feed, first_seen_at) VALUES (1, 'https://n.example/a', 'A & 🦊', '', '[]',"
                " '[]', :t, 'f', :t)"
            ),
            {"t": now},
        )
        conn.execute(
            text(
                "INSERT INTO subscribers (id, email, name, status, source, hard_bounces,"
                " created_at, updated_at) VALUES (1, 'a@example.org', '', 'active', 't', 0, :t, :t)"
            ),
            {"t": now},
        )
        conn.execute(
            text(
                "INSERT INTO issues (id, edition_date, status, subject, built_at)"
                " VALUES (1, '2026-11-27', 'sent', 's', :t)"
            ),
            {"t": now},
        )
        conn.execute(
            text(
                "INSERT INTO issue_articles (issue_id, article_id, section, section_position,"
                " position) VALUES (1, 1, 'Europe', 0, 0)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO deliveries (issue_id, subscriber_id, status, attempts)"
                " VALUES (1, 1, 'sent', 1)"
            )
        )
    store.migrate(engine)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM deliveries")).scalar() == 1
        assert conn.execute(text("SELECT count(*) FROM issue_articles")).scalar() == 1
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1  # back on afterwards
    sessions = store.session_factory(engine)
    with sessions() as session:
        assert [a.title for _, arts in store.issue_sections(session, 1) for a in arts] == ["A & 🦊"]
