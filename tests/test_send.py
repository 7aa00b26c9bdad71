"""Sending against a real SMTP server: ledger, retries, permanent failures, SMTP down."""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from digest import pipeline, store
from digest.cli import main
from digest.config import load_config
from digest.errors import SenderRejectedError, SMTPUnavailableError
from digest.models import DeliveryStatus, IssueStatus, SubscriberStatus
from digest.send import RetryPolicy
from tests.conftest import Recorder, free_port, write_config

D = date(2026, 11, 27)


def add_subscribers(app: pipeline.App, n: int, regions: list[str] | None = None) -> list[str]:
    now = datetime.now(UTC)
    emails = [f"reader{i}@example.org" for i in range(n)]
    with app.sessions() as session:
        store.add_subscribers(
            session,
            [
                {
                    "email": e,
                    "name": f"Reader {i}",
                    "regions": regions,
                    "status": SubscriberStatus.ACTIVE,
                    "source": "test",
                    "created_at": now,
                    "updated_at": now,
                    "hard_bounces": 0,
                }
                for i, e in enumerate(emails)
            ],
        )
        session.commit()
    return emails


def ledger(app: pipeline.App) -> dict[str, int]:
    with app.sessions() as session:
        issue = store.issue_for_date(session, D)
        assert issue is not None
        return store.delivery_counts(session, issue.id)


def test_everyone_once_over_reused_connections(
    app: pipeline.App, smtp_server: tuple[object, Recorder]
) -> None:
    _, server = smtp_server
    emails = add_subscribers(app, 40)
    report = pipeline.send(app, D)
    assert report.stats.sent == 40
    assert sorted(r for m in server.messages for r in m.rcpt_tos) == sorted(emails)
    # Connections are reused: at most `concurrency` (3) sessions for 40 messages.
    assert len({m.peer for m in server.messages}) <= 3
    # Every Message-ID is distinct and recorded in the ledger.
    mids = {m.message["Message-ID"] for m in server.messages}
    assert len(mids) == 40
    with app.sessions() as session:
        issue = store.issue_for_date(session, D)
        assert issue is not None and issue.status == "sent"
    assert ledger(app)["sent"] == 40
    again = pipeline.send(app, D)
    assert again.stats.sent == 0 and len(server.messages) == 40


def test_transient_failures_are_retried_and_not_doubled(
    app: pipeline.App, smtp_server: tuple[object, Recorder]
) -> None:
    _, server = smtp_server
    emails = add_subscribers(app, 10)
    server.data_replies = [
        "451 4.3.0 try again later",
        "421 4.7.0 too busy, closing",
        "452 4.3.1 full",
    ]
    server.rcpt_once = {emails[4]: "451 4.7.1 greylisted", emails[7]: "421 4.3.2 shutting down"}
    report = pipeline.send(app, D)
    assert report.stats.sent == 10 and report.stats.retries == 5
    assert server.rcpt_once == {}
    assert sorted(r for m in server.messages for r in m.rcpt_tos) == sorted(emails)
    counts = ledger(app)
    assert counts["sent"] == 10 and counts["deferred"] == 0


def test_permanent_failures_are_recorded_and_exit_1(
    config_path: Path, app: pipeline.App, smtp_server: tuple[object, Recorder]
) -> None:
    _, server = smtp_server
    emails = add_subscribers(app, 6)
    server.rcpt_replies = {emails[2]: "550 5.1.1 No such user here"}
    result = CliRunner().invoke(main, ["--config", str(config_path), "send", "--date", str(D)])
    assert result.exit_code == 1
    assert "1 deliveries failed permanently" in result.stderr
    assert len(server.messages) == 5 and emails[2] not in {
        r for m in server.messages for r in m.rcpt_tos
    }
    with app.sessions() as session:
        failed = store.failed_deliveries(session, None)
        assert [(s.email, d.last_error) for _, s, d in failed] == [
            (emails[2], "550 5.1.1 No such user here")
        ]
        sub = store.subscriber_by_email(session, emails[2])
        assert sub is not None and sub.hard_bounces == 1 and sub.status == "active"
    counts = ledger(app)
    assert counts["failed"] == 1 and counts["sent"] == 5
    listing = CliRunner().invoke(
        main, ["--config", str(config_path), "deliveries", "--failed", "--date", str(D)]
    )
    assert listing.exit_code == 0
    assert listing.stdout.splitlines() == [
        "EDITION     EMAIL                ATTEMPTS  ERROR",
        f"{D}  {emails[2]}         1  550 5.1.1 No such user here",
    ]


def test_smtp_down_is_one_line_and_the_next_run_delivers(
    tmp_path: Path, feed_file: Path, smtp_server: tuple[object, Recorder]
) -> None:
    controller, server = smtp_server
    down = write_config(tmp_path, port=free_port())
    config = load_config(down)
    pipeline.init_db(config)
    app = pipeline.open_app(config)
    pipeline.fetch(app)
    add_subscribers(app, 5)
    result = CliRunner().invoke(main, ["--config", str(down), "send", "--date", str(D)])
    assert result.exit_code == 1
    assert (
        result.stderr.count("\n") == 1
        and "cannot connect to SMTP server 127.0.0.1:" in result.stderr
    )
    assert ledger(app)["sent"] == 0 and ledger(app)["pending"] == 5
    with pytest.raises(SMTPUnavailableError):
        pipeline.send(app, D)
    # The server comes back (same database, config now pointing at the live server).
    up = write_config(tmp_path, port=controller.port)
    app2 = pipeline.open_app(load_config(up))
    assert pipeline.send(app2, D).stats.sent == 5
    assert len(server.messages) == 5


def test_unsubscribed_between_runs_is_skipped(
    app: pipeline.App, smtp_server: tuple[object, Recorder]
) -> None:
    _, server = smtp_server
    emails = add_subscribers(app, 4)
    server.rcpt_replies = {emails[1]: "450 4.2.1 mailbox busy"}
    app_cfg = app.config.model_copy(
        update={"smtp": app.config.smtp.model_copy(update={"max_attempts": 1})}
    )
    first = pipeline.send(pipeline.App(app_cfg, app.engine, app.sessions), D)
    assert first.stats.sent == 3 and first.stats.deferred == 1
    with app.sessions() as session:
        from digest.subscribers import unsubscribe

        assert unsubscribe(session, emails[1], datetime.now(UTC))
        session.commit()
    server.rcpt_replies = {}
    second = pipeline.send(app, D)
    assert second.stats.sent == 0
    counts = ledger(app)
    assert counts["skipped"] == 1 and counts["sent"] == 3
    # The skipped row is the reader who left, and says why; nothing is left open.
    with app.sessions() as session:
        issue = store.issue_for_date(session, D)
        gone = store.subscriber_by_email(session, emails[1])
        assert issue is not None and gone is not None
        row = store.delivery_for(session, issue.id, gone.id)
        assert row is not None and row.status == DeliveryStatus.SKIPPED
        assert row.last_error == "subscriber is no longer active"
        assert issue.status == IssueStatus.SENT
    assert server.to(emails[1]) == []


def test_three_consecutive_hard_bounces_mark_the_subscriber_bounced(
    app: pipeline.App, smtp_server: tuple[object, Recorder]
) -> None:
    _, server = smtp_server
    emails = add_subscribers(app, 2)
    server.rcpt_replies = {emails[0]: "550 5.1.1 mailbox unavailable"}
    for day in (25, 26, 27):
        report = pipeline.send(app, date(2026, 11, day))
        assert report.stats.failed == 1
    with app.sessions() as session:
        sub = store.subscriber_by_email(session, emails[0])
        assert sub is not None and sub.status == "bounced" and sub.hard_bounces == 3
        ok = store.subscriber_by_email(session, emails[1])
        assert ok is not None and ok.status == "active" and ok.hard_bounces == 0
    # A later issue does not even try the bounced address.
    server.rcpt_replies = {}
    # Every test article went out already; un-send the 27th and record its send missed
    # (which frees its articles for another issue) so the 28th has content.
    with app.sessions() as session:
        store.set_issue_status(
            session, store.recent_issues(session, 1)[0], IssueStatus.READY, datetime.now(UTC)
        )
        store.record_missed_send(
            session, date(2026, 11, 27), datetime(2026, 11, 27, 14, tzinfo=UTC), datetime.now(UTC)
        )
        session.commit()
    later = pipeline.send(app, date(2026, 11, 28))
    assert [m.rcpt_tos for m in server.messages[-later.stats.sent :]] == [[emails[1]]]


async def test_lines_starting_with_a_dot_survive_smtp(
    config_path: Path, smtp_server: tuple[object, Recorder]
) -> None:
    from digest.send import SMTPTransport

    _, server = smtp_server
    config = load_config(config_path)
    body = b"Subject: dots\r\n\r\n.leading dot\r\n..two dots\r\n.\r\nend\r\n"
    transport = SMTPTransport(config.smtp, None)
    try:
        reply = await transport.send("roundup@news.example.org", "r@example.org", body)
    finally:
        await transport.close()
    assert reply.startswith("250")
    assert server.messages[0].data == body


def test_send_refuses_to_start_without_an_unsubscribe_secret(
    tmp_path: Path, feed_file: Path
) -> None:
    path = write_config(tmp_path)
    path.write_text(path.read_text().replace('secret = "test-secret-0123456789abcdef"', ""))
    CliRunner().invoke(main, ["--config", str(path), "init"])
    result = CliRunner().invoke(main, ["--config", str(path), "send", "--date", str(D)])
    assert result.exit_code == 2
    assert (
        "unsubscribe secret missing" in result.stderr and "secrets.token_urlsafe" in result.stderr
    )


def subscribers_state(app: pipeline.App) -> list[tuple[str, str, int]]:
    with app.sessions() as session:
        return [(s.email, str(s.status), s.hard_bounces) for s in store.iter_subscribers(session)]


@pytest.mark.parametrize(
    ("stage", "reply", "party"),
    [
        ("MAIL", "553 5.7.1 Sender rejected: not owned by user", "our sender"),
        ("MAIL", "530 5.7.0 Authentication required", "our session"),
        ("MAIL", "550 Sender address rejected", "our sender"),
        ("RCPT", "554 5.7.1 Relay access denied", "our session"),
        ("DATA", "554 5.7.1 Message rejected due to content policy", "the message"),
        ("DATA", "552 5.3.4 Message size exceeds fixed limit", "the message"),
    ],
)
def test_a_refusal_of_our_sender_or_message_stops_the_run_and_bounces_nobody(
    config_path: Path,
    app: pipeline.App,
    smtp_server: tuple[object, Recorder],
    stage: str,
    reply: str,
    party: str,
) -> None:
    _, server = smtp_server
    emails = add_subscribers(app, 5)
    if stage == "MAIL":
        server.mail_reply = reply
    elif stage == "RCPT":
        server.rcpt_replies = {e: reply for e in emails}
    else:
        server.data_replies = [reply] * 100
    before = subscribers_state(app)
    for day in (25, 26, 27):  # three issues in a row: the old code bounced everyone
        edition = date(2026, 11, day)
        result = CliRunner().invoke(
            main, ["--config", str(config_path), "send", "--date", str(edition)]
        )
        assert result.exit_code == 1
        assert isinstance(result.exception, SystemExit)
        assert result.stderr.count("\n") == 1, result.stderr
        assert f"refused {party} at {stage} ({reply})" in result.stderr
        assert "nobody's bounce count changed" in result.stderr
        with app.sessions() as session:
            issue = store.issue_for_date(session, edition)
            assert issue is not None and issue.status == IssueStatus.READY
            counts = store.delivery_counts(session, issue.id)
        assert counts["pending"] == 5 and counts["failed"] == 0 and counts["sent"] == 0
    assert subscribers_state(app) == before
    assert all(status == "active" and bounces == 0 for _, status, bounces in before)
    with pytest.raises(SenderRejectedError) as info:
        pipeline.send(app, D)
    assert info.value.reply == reply
    # The relay is fixed: everyone gets the issue, nobody was lost.
    server.mail_reply, server.rcpt_replies, server.data_replies = "", {}, []
    assert pipeline.send(app, D).stats.sent == 5
    assert sorted(r for m in server.messages for r in m.rcpt_tos) == sorted(emails)


@pytest.mark.parametrize(
    ("stage", "reply"),
    [
        ("RCPT", "550 5.1.1 No such user here"),
        ("RCPT", "550 mailbox unavailable"),
        ("DATA", "552 5.2.2 Mailbox full"),
        ("DATA", "550 5.1.1 Recipient address rejected after DATA"),
    ],
)
def test_a_refusal_of_the_recipient_counts_as_their_bounce(
    app: pipeline.App, smtp_server: tuple[object, Recorder], stage: str, reply: str
) -> None:
    _, server = smtp_server
    emails = add_subscribers(app, 3)
    if stage == "RCPT":
        server.rcpt_replies = {emails[1]: reply}
    else:
        server.data_replies = [reply]  # the first message only
    report = pipeline.send(app, D)
    assert report.stats.failed == 1 and report.stats.sent == 2
    bounced = [(e, n) for e, _, n in subscribers_state(app) if n]
    assert len(bounced) == 1 and bounced[0][1] == 1
    with app.sessions() as session:
        (row,) = store.failed_deliveries(session, None)
    assert row[2].last_error == reply


def test_retry_delays_use_equal_jitter() -> None:
    """Half the exponential backoff is fixed, half random: never an immediate retry, and
    K workers throttled at once do not come back in lockstep."""
    policy = RetryPolicy(max_attempts=6, base_seconds=2.0, cap_seconds=20.0)
    for tries, backoff in [(1, 2.0), (2, 4.0), (3, 8.0), (4, 16.0), (5, 20.0), (9, 20.0)]:
        delays = [policy.delay(tries) for _ in range(200)]
        assert all(backoff / 2 <= d <= backoff for d in delays)
        assert max(delays) - min(delays) > backoff / 4  # spread, not one value


@given(
    st.lists(
        st.sampled_from(
            [b"", b".", b"..", b".x", b"a.b", b"x", b"=2E", "𝔘🦊&".encode(), b"a\nb", b"c\rd"]
        ),
        max_size=12,
    )
)
def test_the_fast_data_path_sends_what_aiosmtplib_would(lines: list[bytes]) -> None:
    from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings

    from digest.send import wire_payload

    message = b"".join(line + b"\r\n" for line in lines)
    ours = wire_payload(message)
    if b"\n" in b"".join(lines) or b"\r" in b"".join(lines) or not message:
        assert ours is None  # a bare CR or LF: aiosmtplib's own path
    else:
        assert ours == PERIOD_REGEX.sub(b"..", normalize_message_line_endings(message)) + b".\r\n"
