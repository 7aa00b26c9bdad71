"""Bounce import: real DSNs about messages really sent to aiosmtpd, in a real mbox/Maildir."""

from __future__ import annotations

import mailbox
from datetime import UTC, date, datetime, timedelta
from email import message_from_bytes, policy
from email.message import Message
from email.mime.base import MIMEBase
from email.mime.message import MIMEMessage
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from digest import pipeline, store
from digest.bounces import DSN, BounceReport, import_bounces, parse_dsn
from digest.cli import main
from digest.errors import UsageError
from digest.models import Delivery, DeliveryStatus, SubscriberStatus
from digest.tokens import MessageTags
from tests.conftest import Received, Recorder, rss, week_items
from tests.test_send import add_subscribers

D25, D26, D27 = date(2026, 11, 25), date(2026, 11, 26), date(2026, 11, 27)
USER_UNKNOWN = "550 5.1.1 Recipient address rejected: User unknown in virtual mailbox table"


def sent_to(server: Recorder, addr: str, edition: date) -> Received:
    """The message ``addr`` received for ``edition`` (our Message-IDs start with the date)."""
    (received,) = [
        m for m in server.to(addr) if m.message["Message-ID"].startswith(f"<{edition:%Y%m%d}.")
    ]
    return received


def dsn(
    recipient: str,
    original: Received | None,
    *,
    action: str = "failed",
    status: str = "5.1.1",
    diagnostic: str = USER_UNKNOWN,
    full_original: bool = False,
    when: datetime | None = None,
) -> Message:
    """A Postfix-style RFC 3464 report: text, delivery-status, and the original's headers."""
    when = when or datetime.now(UTC)
    report = MIMEMultipart("report", report_type="delivery-status")
    report["From"] = "Mail Delivery System <MAILER-DAEMON@mx.example.net>"
    report["To"] = "roundup@news.example.org"
    report["Subject"] = "Undelivered Mail Returned to Sender"
    report["Date"] = format_datetime(when)
    report["Message-ID"] = make_msgid(domain="mx.example.net")
    report.attach(
        MIMEText(
            "This is the mail system at host mx.example.net.\n\n"
            "I'm sorry to have to inform you that your message could not\n"
            "be delivered to one or more recipients.\n"
        )
    )
    per_message = Message()
    per_message["Reporting-MTA"] = "dns; mx.example.net"
    per_message["Arrival-Date"] = format_datetime(when - timedelta(seconds=2))
    per_recipient = Message()
    per_recipient["Final-Recipient"] = f"rfc822; {recipient}"
    per_recipient["Original-Recipient"] = f"rfc822;{recipient}"
    per_recipient["Action"] = action
    per_recipient["Status"] = status
    per_recipient["Remote-MTA"] = "dns; mail.example.org"
    per_recipient["Diagnostic-Code"] = f"smtp; {diagnostic}"
    status_part = MIMEBase("message", "delivery-status")
    del status_part["MIME-Version"]
    status_part.set_payload([per_message, per_recipient])
    report.attach(status_part)
    if original is not None:
        if full_original:
            report.attach(MIMEMessage(message_from_bytes(original.data, policy=policy.compat32)))
        else:
            head = original.data.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0]
            report.attach(MIMEText(head.decode("ascii") + "\n", "rfc822-headers"))
    return report


def tags_of(app: pipeline.App) -> MessageTags:
    return pipeline.message_tags(app.config)


def plain_mail() -> Message:
    msg = MIMEText("Please add me to the list, thanks!\n")
    msg["From"] = "someone@example.com"
    msg["To"] = "roundup@news.example.org"
    msg["Subject"] = "Re: The Weekly Round-up"
    msg["Date"] = format_datetime(datetime.now(UTC))
    return msg


BROKEN_REPORT = (
    b"From: MAILER-DAEMON@mx.example.net\n"
    b'Content-Type: multipart/report; report-type=delivery-status; boundary="XX"\n\n'
    b"--XX\nContent-Type: message/delivery-status\nContent-Transfer-Encoding: base64\n\n"
    b"\xff\xfe not base64 at all \x00\n"
)


def write_mbox(path: Path, messages: list[Message | bytes]) -> Path:
    box = mailbox.mbox(path)
    for m in messages:
        box.add(m)
    box.close()
    return path


def write_maildir(path: Path, messages: list[Message | bytes]) -> Path:
    box = mailbox.Maildir(path, create=True)
    for m in messages:
        box.add(m)
    box.close()
    return path


def state(app: pipeline.App) -> list[tuple[Any, ...]]:
    """Every delivery and subscriber field an import may touch, for before/after checks."""
    with app.sessions() as session:
        deliveries = session.query(Delivery).order_by(Delivery.id).all()
        rows: list[tuple[Any, ...]] = [
            (d.id, d.status, d.last_error, d.sent_at) for d in deliveries
        ]
        for s in store.iter_subscribers(session):
            rows.append((s.email, s.status, s.hard_bounces))
        return rows


def delivery_of(app: pipeline.App, email: str, edition: date) -> Delivery:
    with app.sessions() as session:
        issue = store.issue_for_date(session, edition)
        sub = store.subscriber_by_email(session, email)
        assert issue is not None and sub is not None
        delivery = store.delivery_for(session, issue.id, sub.id)
        assert delivery is not None
        return delivery


def subscriber(app: pipeline.App, email: str) -> tuple[str, int]:
    with app.sessions() as session:
        sub = store.subscriber_by_email(session, email)
        assert sub is not None
        return str(sub.status), sub.hard_bounces


def test_hard_bounce_fails_its_delivery_and_the_rest_changes_nothing(
    tmp_path: Path, app: pipeline.App, smtp_server: tuple[object, Recorder]
) -> None:
    _, server = smtp_server
    emails = add_subscribers(app, 3)
    assert pipeline.send(app, D27).stats.sent == 3
    success = dsn(emails[2], sent_to(server, emails[2], D27), action="delivered", status="2.0.0")
    path = write_mbox(
        tmp_path / "bounces.mbox",
        [
            dsn(emails[0], sent_to(server, emails[0], D27)),
            dsn(emails[1], sent_to(server, emails[1], D27), action="delayed", status="4.4.1"),
            dsn(emails[2], sent_to(server, emails[2], D27), action="failed", status="4.2.2"),
            plain_mail(),
            BROKEN_REPORT,
            success,
        ],
    )
    report = import_bounces(app.sessions, path, tags=tags_of(app))
    assert report == BounceReport(
        hard=1, soft_ignored=2, unrelated=3, unmatched=0, already_recorded=0
    )
    bounced = delivery_of(app, emails[0], D27)
    assert bounced.status == DeliveryStatus.FAILED
    assert bounced.last_error == f"bounce: 5.1.1 {USER_UNKNOWN}"
    assert bounced.sent_at is not None  # it was sent; the bounce came later
    assert subscriber(app, emails[0]) == ("active", 1)
    for other in emails[1:]:
        assert delivery_of(app, other, D27).status == DeliveryStatus.SENT
        assert subscriber(app, other) == ("active", 0)

    before = state(app)
    again = import_bounces(app.sessions, path, tags=tags_of(app))
    assert again == BounceReport(
        hard=0, soft_ignored=2, unrelated=3, unmatched=0, already_recorded=1
    )
    assert state(app) == before


def test_cli_imports_a_maildir_and_a_second_run_is_a_no_op(
    tmp_path: Path, config_path: Path, app: pipeline.App, smtp_server: tuple[object, Recorder]
) -> None:
    _, server = smtp_server
    emails = add_subscribers(app, 2)
    pipeline.send(app, D27)
    maildir = write_maildir(
        tmp_path / "Maildir",
        [dsn(emails[1], sent_to(server, emails[1], D27), full_original=True), plain_mail()],
    )
    args = ["--config", str(config_path), "bounces", "import", str(maildir)]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.stderr
    assert first.stdout == (
        "1 hard bounces recorded, 0 already recorded, 0 soft ignored, 0 unmatched, 1 unrelated, "
        "0 ignored (not about a message carrying our tag)\n"
    )
    assert delivery_of(app, emails[1], D27).status == DeliveryStatus.FAILED
    before = state(app)
    second = CliRunner().invoke(main, args)
    assert second.exit_code == 0
    assert second.stdout.startswith("0 hard bounces recorded, 1 already recorded,")
    assert state(app) == before
    # Reading must not move anything from new/ to cur/: the mailbox belongs to the MTA.
    assert len(list((maildir / "new").iterdir())) == 2


def test_a_report_without_the_original_message_is_ignored(
    tmp_path: Path, app: pipeline.App
) -> None:
    """Without the original's headers nothing proves the report is about our message."""
    emails = add_subscribers(app, 2)
    pipeline.send(app, D27)
    path = write_mbox(tmp_path / "bounces.mbox", [dsn(emails[0], None)])
    before = state(app)
    assert import_bounces(app.sessions, path, tags=tags_of(app)) == BounceReport(ignored=1)
    assert state(app) == before


def test_reports_that_do_not_fit_our_delivery_are_unmatched(
    tmp_path: Path, app: pipeline.App, smtp_server: tuple[object, Recorder]
) -> None:
    _, server = smtp_server
    emails = add_subscribers(app, 2)
    pipeline.send(app, D27)
    mine = sent_to(server, emails[0], D27)
    mid = mine.message["Message-ID"]
    foreign = Received(
        mine.mail_from,
        mine.rcpt_tos,
        mine.data.replace(
            mid.encode(), mid.replace("@news.example.org", "@other.example").encode()
        ),
    )
    path = write_mbox(
        tmp_path / "bounces.mbox",
        [
            dsn(emails[1], mine),  # the id is emails[0]'s, the report names emails[1]
            dsn(emails[0], foreign),  # our id format, but not the id we sent
            dsn("stranger@example.com", None),  # not a subscriber
        ],
    )
    before = state(app)
    report = import_bounces(app.sessions, path, tags=tags_of(app))
    assert report == BounceReport(unmatched=2, ignored=1)
    assert state(app) == before


def add_later_article(app: pipeline.App, feed_file: Path) -> date:
    """Publish one more article on 2026-11-28, so a later issue has something to carry."""
    late = {
        "title": "A later story",
        "link": "/europe/late",
        "published": datetime(2026, 11, 28, 15, tzinfo=UTC),
        "categories": ["Europe"],
    }
    feed_file.write_text(rss([*week_items(), late]), encoding="utf-8")
    assert pipeline.fetch(app).new == 1
    return date(2026, 11, 28)


@pytest.mark.parametrize("import_each_week", [False, True])
def test_three_hard_bounces_in_a_row_bounce_the_subscriber(
    tmp_path: Path,
    app: pipeline.App,
    feed_file: Path,
    smtp_server: tuple[object, Recorder],
    import_each_week: bool,
) -> None:
    """Bounces add up whether imported in one go or after each send.

    The second case is the usual one with a relay: every send gets a 250 (which resets
    the send's own counter) and the bounce arrives after it.
    """
    _, server = smtp_server
    emails = add_subscribers(app, 2)
    path = tmp_path / "bounces.mbox"
    reports: list[Message | bytes] = []
    for edition in (D25, D26, D27):
        assert pipeline.send(app, edition).stats.sent == 2
        reports.append(dsn(emails[0], sent_to(server, emails[0], edition)))
        if import_each_week:
            path.unlink(missing_ok=True)
            write_mbox(path, reports)  # a bounce mailbox only grows
            import_bounces(app.sessions, path, tags=tags_of(app))
    if not import_each_week:
        write_mbox(path, reports)
        assert import_bounces(app.sessions, path, tags=tags_of(app)).hard == 3
    assert subscriber(app, emails[0]) == ("bounced", 3)
    assert subscriber(app, emails[1]) == ("active", 0)

    later = add_later_article(app, feed_file)
    assert pipeline.send(app, later).stats.sent == 1
    assert [m.rcpt_tos for m in server.messages[-1:]] == [[emails[1]]]
    assert not [m for m in server.to(emails[0]) if f"<{later:%Y%m%d}." in m.message["Message-ID"]]
    # A re-import after the later send changes nothing.
    before = state(app)
    assert import_bounces(app.sessions, path, tags=tags_of(app)).already_recorded == 3
    assert state(app) == before


def test_a_delivered_issue_between_bounces_breaks_the_run(
    tmp_path: Path, app: pipeline.App, smtp_server: tuple[object, Recorder]
) -> None:
    _, server = smtp_server
    emails = add_subscribers(app, 1)
    for edition in (D25, D26, D27):
        pipeline.send(app, edition)
    path = write_mbox(
        tmp_path / "bounces.mbox",
        [dsn(emails[0], sent_to(server, emails[0], e)) for e in (D25, D27)],
    )
    assert import_bounces(app.sessions, path, tags=tags_of(app), threshold=2).hard == 2
    assert subscriber(app, emails[0])[0] == SubscriberStatus.ACTIVE


def test_parse_dsn_reads_the_fields_and_rejects_other_mail() -> None:
    parsed = parse_dsn(
        dsn("Reader@Example.org", None, status="5.7.1 (delivery not authorized)").as_bytes()
    )
    assert parsed is not None and parsed.original_message_id is None
    (rcpt,) = parsed.recipients
    assert rcpt.is_hard and rcpt.status == "5.7.1"
    assert rcpt.final_recipient == "reader@example.org"
    assert rcpt.diagnostic == USER_UNKNOWN
    assert parse_dsn(plain_mail().as_bytes()) is None
    assert parse_dsn(BROKEN_REPORT) is None
    assert parse_dsn(b"\x00\xff" * 100) is None


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("garbage.bin", lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00garbage")),
        ("missing.mbox", lambda p: None),
        ("folder", lambda p: p.mkdir()),
    ],
)
def test_a_bad_path_is_exit_2_with_one_line_naming_it(
    tmp_path: Path, config_path: Path, app: pipeline.App, name: str, make: Any
) -> None:
    path = tmp_path / name
    make(path)
    result = CliRunner().invoke(
        main, ["--config", str(config_path), "bounces", "import", str(path)]
    )
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and str(path) in result.stderr
    assert result.stderr.startswith("digest: error: ")
    with pytest.raises(UsageError):
        import_bounces(app.sessions, path, tags=tags_of(app))


def test_forged_reports_naming_a_subscriber_bounce_nobody(
    tmp_path: Path, config_path: Path, app: pipeline.App, smtp_server: tuple[object, Recorder]
) -> None:
    """Three issues, three forged reports each: the old code marked the reader bounced."""
    _, server = smtp_server
    emails = add_subscribers(app, 2)
    victim = emails[0]
    forged: list[Message | bytes] = []
    with app.sessions() as session:
        victim_id = store.subscriber_by_email(session, victim).id  # type: ignore[union-attr]
    for edition in (D25, D26, D27):
        assert pipeline.send(app, edition).stats.sent == 2
        with app.sessions() as session:
            issue_id = store.issue_for_date(session, edition).id  # type: ignore[union-attr]
        real = sent_to(server, victim, edition)
        local = f"{edition:%Y%m%d}.{issue_id}.{victim_id}"
        for guessed in (
            f"<{local}.digest@news.example.org>",  # the id as digest made them before tags
            f"<{local}.{'a' * 16}.digest@news.example.org>",  # a guessed tag
            f"<{local}.{MessageTags('not-our-secret-0123456789').tag(local)}.digest@news.example.org>",
        ):
            fake = Received(
                real.mail_from,
                real.rcpt_tos,
                real.data.replace(real.message["Message-ID"].encode(), guessed.encode()),
            )
            forged.append(dsn(victim, fake))
        forged.append(dsn(victim, None))  # no original at all
    path = write_mbox(tmp_path / "forged.mbox", forged)
    before = state(app)
    report = import_bounces(app.sessions, path, tags=tags_of(app))
    assert report == BounceReport(ignored=12)
    assert state(app) == before
    assert subscriber(app, victim) == ("active", 0)
    result = CliRunner().invoke(
        main, ["--config", str(config_path), "bounces", "import", str(path)]
    )
    assert result.exit_code == 0 and "12 ignored" in result.stdout
    assert subscriber(app, victim) == ("active", 0)
    # The genuine report about the same delivery still counts.
    genuine = write_mbox(tmp_path / "real.mbox", [dsn(victim, sent_to(server, victim, D27))])
    assert import_bounces(app.sessions, genuine, tags=tags_of(app)).hard == 1
    assert subscriber(app, victim) == ("active", 1)


def test_a_bug_is_not_taken_for_a_message_that_is_not_a_report() -> None:
    # parse_dsn used to swallow every exception: a caller passing text instead of bytes
    # (or any bug inside the parser) silently read as "not a DSN", and bounces were lost.
    with pytest.raises((TypeError, AttributeError)):
        parse_dsn("From: x\n\nnot bytes")  # type: ignore[arg-type]


_JUNK = [b"=?", b"?=", b"\xff", b"\x00", b"\r\n", b";", b'"', b"--", b"(", b"<", b"\t"]


@settings(max_examples=300, deadline=None)
@given(
    edits=st.lists(
        st.tuples(st.floats(0, 1), st.integers(0, 10**6), st.sampled_from(_JUNK)), max_size=12
    ),
    extra=st.sampled_from(
        [
            b"",
            b"Content-Transfer-Encoding: base64\r\n",
            b"Content-Type: multipart/report; report-type*=x-bogus''delivery-status\r\n",
            b"Status: =?x-unknown-charset?q?5.1.1?=\r\n",
            b"Final-Recipient: rfc822; \xff\xfe@example.org\r\n",
        ]
    ),
)
def test_hostile_reports_never_stop_an_import(
    edits: list[tuple[float, int, bytes]], extra: bytes
) -> None:
    raw = bytearray(extra + dsn("a@example.org", None).as_bytes())
    for op, at, junk in edits:
        pos = at % len(raw)
        if op < 0.3:
            del raw[pos : pos + 20]
        elif op < 0.7:
            raw[pos:pos] = junk
        else:
            raw[pos] = at % 256
        if not raw:
            raw = bytearray(b"x")
    parsed = parse_dsn(bytes(raw))
    assert parsed is None or isinstance(parsed, DSN)
