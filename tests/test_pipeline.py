"""The composed jobs (``pipeline.py``): what a send run settles, what a dry run reports."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import digest.ledger
from digest import pipeline, store
from digest.cli import main
from digest.errors import SenderRejectedError
from digest.models import IssueStatus
from digest.subscribers import unsubscribe
from tests.conftest import Recorder
from tests.test_send import D, add_subscribers, ledger


class UnsubscribingRecorder(Recorder):
    """Runs ``on_first_data`` (once) before answering the first DATA.

    aiosmtpd runs its handlers on one event loop, so no DATA reply goes out before the
    callback returns: the sender has claimed at most its queue's worth of rows by then.
    """

    def __init__(self, on_first_data: Callable[[], None]) -> None:
        super().__init__()
        self.on_first_data: Callable[[], None] | None = on_first_data

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.on_first_data is not None:
            callback, self.on_first_data = self.on_first_data, None
            callback()
        return await super().handle_DATA(server, session, envelope)


def test_readers_who_unsubscribe_mid_send_are_skipped_and_the_issue_is_sent(
    config_path: Path,
    app: pipeline.App,
    smtp_server: tuple[Any, Recorder],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    controller, _ = smtp_server
    # Small claim batches, so the last readers are still unclaimed when the first message
    # arrives (at most queue + workers + one chunk ahead, ~21 rows, are claimed by then).
    monkeypatch.setattr(digest.ledger, "CLAIM_BATCH", 2)
    emails = add_subscribers(app, 30)
    leaving = emails[-5:]

    def one_click_unsubscribes() -> None:
        with app.sessions() as session:
            for e in leaving:
                assert unsubscribe(session, e, datetime.now(UTC))
            session.commit()

    handler = UnsubscribingRecorder(one_click_unsubscribes)
    controller.handler = handler
    result = CliRunner().invoke(main, ["--config", str(config_path), "send", "--date", str(D)])
    assert handler.on_first_data is None  # the readers did leave mid-send
    assert result.exit_code == 0, result.stderr
    assert result.exception is None
    received = sorted(r for m in handler.messages for r in m.rcpt_tos)
    assert received == sorted(emails[:-5])
    assert "this run: 25 sent, 0 failed, 0 deferred, 5 skipped" in result.stdout
    assert "ledger: 25 sent, 0 failed, 0 deferred, 5 skipped, 0 pending" in result.stdout
    counts = ledger(app)
    assert counts["skipped"] == 5 and counts["pending"] == 0 and counts["sending"] == 0
    with app.sessions() as session:
        issue = store.issue_for_date(session, D)
        assert issue is not None and issue.status == IssueStatus.SENT
    status = CliRunner().invoke(main, ["--config", str(config_path), "status", "--json"])
    (row,) = json.loads(status.stdout)["issues"]
    assert (row["status"], row["sent"], row["skipped"], row["pending"]) == ("sent", 25, 5, 0)


class RefusingAfter(Recorder):
    """Accepts the first ``accept`` messages, then refuses every message as a whole."""

    def __init__(self, accept: int) -> None:
        super().__init__()
        self.accept = accept

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if len(self.messages) >= self.accept:
            return "554 5.7.1 Message refused by policy"
        return await super().handle_DATA(server, session, envelope)


def test_dry_run_reports_what_a_send_would_send_now(
    config_path: Path, app: pipeline.App, smtp_server: tuple[Any, Recorder]
) -> None:
    controller, _ = smtp_server
    emails = add_subscribers(app, 6)
    assert pipeline.send(app, D, dry_run=True).would_send == 6  # nothing built yet
    refusing = RefusingAfter(accept=3)
    controller.handler = refusing
    with pytest.raises(SenderRejectedError):
        pipeline.send(app, D)  # a partial send: three went out, the run stopped
    assert len(refusing.messages) == 3 and ledger(app)["pending"] == 3
    assert pipeline.send(app, D, dry_run=True).would_send == 3
    # One of the pending readers leaves, a new one joins: a send would do exactly that.
    pending = sorted(set(emails) - {r for m in refusing.messages for r in m.rcpt_tos})
    with app.sessions() as session:
        assert unsubscribe(session, pending[0], datetime.now(UTC))
        session.commit()
    add_subscribers_named(app, ["late@example.org"])
    dry = pipeline.send(app, D, dry_run=True)
    assert dry.would_send == 3 and dry.stats.skipped == 0
    assert ledger(app)["pending"] == 3  # the dry run wrote nothing

    controller.handler = Recorder()
    assert pipeline.send(app, D).stats.sent == 3
    result = CliRunner().invoke(
        main, ["--config", str(config_path), "send", "--date", str(D), "--dry-run"]
    )
    assert result.exit_code == 0 and result.exception is None
    assert "dry run: would send 0 messages" in result.stdout


def add_subscribers_named(app: pipeline.App, emails: list[str]) -> None:
    now = datetime.now(UTC)
    with app.sessions() as session:
        store.add_subscribers(
            session,
            [
                {
                    "email": e,
                    "name": "",
                    "regions": None,
                    "status": "active",
                    "source": "test",
                    "created_at": now,
                    "updated_at": now,
                    "hard_bounces": 0,
                }
                for e in emails
            ],
        )
        session.commit()
