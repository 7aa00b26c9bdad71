"""A reviewer's checks of the editor's week (issue 10): the preview never lies, approval
follows every edit, curation at its edges, and edits racing a real send.

Real SQLite files (and PostgreSQL where locking matters), a real SMTP server (aiosmtpd)
on loopback, real feed files; every command through click's CliRunner.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from starlette.testclient import TestClient

from digest import pipeline, store
from digest.config import load_config
from digest.errors import AwaitingApproval
from digest.web.preview import create_preview_app
from tests.conftest import Recorder, free_port, rss
from tests.test_editorial import (
    AP0,
    AP1,
    EU0,
    EU1,
    GC0,
    ME0,
    OLD,
    SP0,
    SP1,
    STRICT,
    D,
    feed_items,
    layout,
    make_desk,
    parts,
    run,
    shown,
)
from tests.webutil import wait_for

NOTE = "A *short* week & a [long read](https://news.example.org/long?a=1&b=2) 🦊.\n\nBye."
READERS = ["ada@example.org", "kofi@example.org", "lin@example.org"]


def _comparable(raw: bytes) -> bytes:
    """The message without what each rendering draws anew: the Date header (the clock)
    and the signed tokens in the unsubscribe and preferences links (each carries its
    time and a random IV); quoted-printable soft line breaks joined."""
    raw = re.sub(rb"(?m)^Date: [^\r\n]*\r\n", b"", raw).replace(b"=\r\n", b"")
    return re.sub(rb"/(unsubscribe|preferences)/[A-Za-z0-9_-]+(?:=3D|=)*", rb"/\1/TOKEN", raw)


def _open(path: Path) -> pipeline.App:
    return pipeline.open_app(load_config(path))


# --- the preview never lies ---------------------------------------------------------------


def test_preview_and_preview_serve_show_exactly_what_send_sends(
    tmp_path: Path, smtp_server: tuple[Controller, Recorder]
) -> None:
    """Every subscriber's preview (CLI .eml and the --serve page, both parts) is byte for
    byte the message `send` then gives them, after a lead, a note, exclusions that empty
    one reader's edition and a move; the emptied edition is previewed as "no email" and
    is not sent."""
    controller, server = smtp_server
    desk = make_desk(tmp_path, controller.port)
    run(desk, "draft", "--date", D)
    for args in (
        ("lead", str(EU0)),
        ("note", "--text", NOTE),
        ("exclude", str(AP0)),
        ("exclude", str(AP1)),  # Lin (Asia-Pacific only) now has an empty edition
        ("move", str(SP0), "--region", "Europe", "--position", "1"),
    ):
        assert run(desk, "issue", *args, "--date", D).exit_code == 0, args
    previews: dict[str, bytes] = {}
    for reader in READERS[:2]:
        out = tmp_path / f"{reader}.eml"
        result = run(
            desk,
            "preview",
            "--date",
            D,
            "--subscriber",
            reader,
            "--format",
            "eml",
            "--out",
            str(out),
        )
        assert result.exit_code == 0, result.stderr
        previews[reader] = out.read_bytes()
    lin = run(desk, "preview", "--date", D, "--subscriber", "lin@example.org")
    assert lin.exit_code == 1 and isinstance(lin.exception, SystemExit)
    assert "lin@example.org gets no email for 2026-11-27" in lin.stderr
    app = _open(desk)
    try:
        client = TestClient(create_preview_app(app, None))
        web = {
            (reader, part): client.get(
                "/message", params={"date": D, "subscriber": reader, "part": part}
            ).text
            for reader in READERS[:2]
            for part in ("html", "text")
        }
        empty = client.get("/message", params={"date": D, "edition": "Asia-Pacific"})
        assert empty.status_code == 404 and "is empty" in empty.text
    finally:
        app.engine.dispose()

    sent = run(desk, "send", "--date", D)
    assert sent.exit_code == 0, sent.stderr
    received = {m.rcpt_tos[0]: m.data for m in server.messages}
    assert sorted(received) == READERS[:2]  # Lin's empty edition was not sent
    for reader in READERS[:2]:
        assert _comparable(received[reader]) == _comparable(previews[reader]), reader
        _, html, text = parts(received[reader])
        token = re.compile(r"/(unsubscribe|preferences)/[\w=-]+")
        assert token.sub("T", web[reader, "html"]) == token.sub("T", html)
        assert token.sub("T", web[reader, "text"].replace("\r\n", "\n")) == token.sub("T", text)
    _, html, text = parts(received["kofi@example.org"])
    # Kofi's edition has the lead's section: the lead opens it, out of its section.
    assert html.count("Europe story 0</a></h3>") == 1
    assert html.index("Europe story 0</a></h3>") < html.index(">Europe</h2>")
    assert "A <em>short</em> week" in html and "A short week" in text


def test_edits_between_a_test_copy_and_the_send_are_in_the_send(
    tmp_path: Path, smtp_server: tuple[Controller, Recorder]
) -> None:
    controller, server = smtp_server
    desk = make_desk(tmp_path, controller.port)
    run(desk, "draft", "--date", D)
    run(desk, "issue", "note", "--text", "First *draft* note.", "--date", D)
    assert run(desk, "send", "--test", "editor@example.org", "--date", D).exit_code == 0
    _, html, text = parts(server.messages[0].data)
    assert "First <em>draft</em> note." in html and "Asia-Pacific story 0</a></h3>" in html
    run(desk, "issue", "note", "--text", "Second note.", "--date", D)
    run(desk, "issue", "lead", str(ME0), "--date", D)
    run(desk, "issue", "exclude", str(EU1), "--date", D)
    assert run(desk, "send", "--date", D).exit_code == 0
    for m in server.messages[1:]:
        _msg, html, text = parts(m.data)
        assert "First" not in html and "First" not in text
        assert "Second note." in html and "Second note." in text
        assert "Europe story 1" not in html and "Europe story 1" not in text
    ada = next(m for m in server.messages if m.rcpt_tos == ["ada@example.org"])
    assert parts(ada.data)[0]["Subject"] == "The Weekly Round-up: Middle East story 0"


def test_send_test_and_preview_default_to_the_next_unsent_issue(
    tmp_path: Path, smtp_server: tuple[Controller, Recorder]
) -> None:
    """Without --date, a test copy and the preview are of the issue the editor is working
    on (the next one not yet sent, as for every `digest issue` command), not of a
    rules-only selection for today."""
    controller, server = smtp_server
    desk = make_desk(tmp_path, controller.port)
    app = _open(desk)
    friday = pipeline.today(app.config) + timedelta(days=5)
    try:
        with app.sessions() as session:
            store.create_issue(
                session, friday, "Next week", [("Europe", [EU0, OLD])], datetime.now(UTC)
            )
            session.commit()
    finally:
        app.engine.dispose()
    run(desk, "issue", "note", "--text", "For *next* week.")
    result = run(desk, "send", "--test", "editor@example.org")
    assert result.exit_code == 0, result.output
    assert f"test copy of {friday} to editor@example.org: sent" in result.stdout
    _, html, text = parts(server.messages[0].data)
    assert "For <em>next</em> week." in html and "An older Europe analysis" in text
    shown_html = run(desk, "preview")
    assert shown_html.exit_code == 0, shown_html.output
    assert "For <em>next</em> week." in shown_html.stdout


# --- approval -----------------------------------------------------------------------------


@pytest.fixture
def strict_desk(tmp_path: Path, smtp_server: tuple[Controller, Recorder]) -> Path:
    return make_desk(tmp_path, smtp_server[0].port, STRICT)


def test_every_edit_withdraws_the_approval_and_a_refused_one_does_not(strict_desk: Path) -> None:
    run(strict_desk, "draft", "--date", D)
    run(strict_desk, "issue", "note", "--text", "A note.", "--date", D)
    edits: list[tuple[str, ...]] = [
        ("lead", str(EU1)),
        ("lead", str(EU1)),  # the same lead again
        ("lead", "--clear"),
        ("exclude", str(SP1)),
        ("include", str(OLD)),
        ("move", str(OLD), "--region", "Europe", "--position", "1"),
        ("move", str(OLD), "--region", "Europe", "--position", "1"),  # where it already is
        ("note", "--text", "Another note."),
        ("note", "--clear"),
        ("note", "--clear"),  # no note to clear
        ("reset",),
    ]
    for args in edits:
        assert run(strict_desk, "issue", "approve", "--date", D).exit_code == 0
        assert shown(strict_desk)["status"] == "approved"
        result = run(strict_desk, "issue", *args, "--date", D)
        assert result.exit_code == 0, (args, result.output)
        assert "approval withdrawn by this change" in result.stderr, args
        assert shown(strict_desk)["status"] == "draft", args
        assert re.search(rf"^{D}  awaiting approval ", run(strict_desk, "status").stdout, re.M)
    # Refused commands change nothing, so the approval stands.
    run(strict_desk, "issue", "exclude", str(SP1), "--date", D)
    assert run(strict_desk, "issue", "approve", "--date", D).exit_code == 0
    before = shown(strict_desk)
    refused: list[tuple[str, ...]] = [
        ("include", str(EU0)),  # already in the issue
        ("lead", str(SP1)),  # excluded: not in the issue
        ("exclude", "999"),
        ("move", str(EU0), "--region", "Atlantis"),
        ("move", str(EU0), "--region", "Europe", "--position", "9"),
        ("note", "--text", "x" * 5001),
    ]
    for args in refused:
        result = run(strict_desk, "issue", *args, "--date", D)
        assert result.exit_code == 2 and result.exception is not None, (args, result.output)
        assert isinstance(result.exception, SystemExit)
        assert "approval withdrawn" not in result.stderr
    assert shown(strict_desk) == before and before["status"] == "approved"
    assert re.search(rf"^{D}  approved ", run(strict_desk, "status").stdout, re.M)


def test_approve_and_unapprove_of_a_missing_or_sent_issue(
    strict_desk: Path, smtp_server: tuple[Controller, Recorder]
) -> None:
    for command in ("approve", "unapprove"):
        missing = run(strict_desk, "issue", command, "--date", "2026-12-04")
        assert missing.exit_code == 2
        assert missing.stderr == (
            "digest: error: no issue for 2026-12-04: build its draft with "
            "`digest draft --date 2026-12-04`\n"
        )
        nothing = run(strict_desk, "issue", command)  # no --date, no unsent issue
        assert nothing.exit_code == 2 and "no unsent issue from 2026-11-29 on" in nothing.stderr
    run(strict_desk, "draft", "--date", D)
    assert run(strict_desk, "issue", "unapprove", "--date", D).stdout == f"{D}: not approved\n"
    run(strict_desk, "issue", "approve", "--by", "Ed", "--date", D)
    assert run(strict_desk, "send", "--date", D).exit_code == 0
    assert len(smtp_server[1].messages) == 3
    for command in ("approve", "unapprove"):
        result = run(strict_desk, "issue", command, "--date", D)
        assert result.exit_code == 2 and "can no longer be changed" in result.stderr
    assert shown(strict_desk)["status"] == "sent"
    assert re.search(rf"^{D}  sent ", run(strict_desk, "status").stdout, re.M)


def test_run_once_sends_nothing_until_approved(
    strict_desk: Path, smtp_server: tuple[Controller, Recorder]
) -> None:
    _, server = smtp_server
    refused = run(strict_desk, "run", "--once", "--date", D)
    assert refused.exit_code == 1 and isinstance(refused.exception, SystemExit)
    assert f"issue {D} awaits approval: digest issue approve --date {D}" in refused.stderr
    assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.output
    assert server.messages == []
    assert shown(strict_desk)["status"] == "draft"
    run(strict_desk, "issue", "approve", "--date", D)
    done = run(strict_desk, "run", "--once", "--date", D)
    assert done.exit_code == 0, done.output
    assert sorted(m.rcpt_tos[0] for m in server.messages) == READERS


# --- curation at its edges ----------------------------------------------------------------


def test_curation_edge_cases(tmp_path: Path, smtp_server: tuple[Controller, Recorder]) -> None:
    desk = make_desk(tmp_path, smtp_server[0].port)
    run(desk, "draft", "--date", D)
    run(desk, "issue", "exclude", str(EU1), "--date", D)
    on_excluded = run(desk, "issue", "lead", str(EU1), "--date", D)
    assert on_excluded.exit_code == 2 and f"article {EU1} is not in the issue" in on_excluded.stderr
    for bad in ("abc", "1.5", "", "0x10"):
        result = run(desk, "issue", "exclude", bad, "--date", D)
        assert result.exit_code == 2 and "is not a valid integer" in result.stderr, bad
    for command in ("lead", "exclude", "include", "move"):  # no id is that large
        args = ("--region", "Europe") if command == "move" else ()
        result = run(desk, "issue", command, "99999999999999999999", *args, "--date", D)
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit), command
        assert "99999999999999999999 is not in the range 1<=x<=2147483647" in result.stderr
    for bad_date in ("27/11/2026", "2026-13-01", "2026-11-31", "tomorrow", "2026-11-27T09:00"):
        result = run(desk, "issue", "show", "--date", bad_date)
        assert result.exit_code == 2, bad_date
        assert f"{bad_date!r} is not a date; use YYYY-MM-DD" in result.stderr, result.stderr
    # Into the catch-all, first and last; past the end is refused naming the range.
    assert run(
        desk, "issue", "move", str(GC0), "--region", "also THIS week", "--date", D
    ).stdout == (f"{D}: article {GC0} moved to Also this week, position 3\n")
    first = run(desk, "issue", "move", str(ME0), "--region", "Also this week", "--position", "1")
    assert first.exit_code == 2  # (no --date: D is in the past)
    first = run(
        desk,
        "issue",
        "move",
        str(ME0),
        "--region",
        "Also this week",
        "--position",
        "1",
        "--date",
        D,
    )
    assert first.exit_code == 0
    assert layout(desk)["Also this week"] == [ME0, SP0, SP1, GC0]
    past = run(
        desk, "issue", "move", str(SP0), "--region", "Europe", "--position", "3", "--date", D
    )
    assert past.exit_code == 2 and "use 1 to 2" in past.stderr
    # Moving every article out of a section drops the section; moving one back restores it.
    run(desk, "issue", "move", str(EU0), "--region", "Asia-Pacific", "--date", D)
    assert "Europe" not in layout(desk)
    run(desk, "issue", "move", str(EU0), "--region", "Europe", "--date", D)
    assert list(layout(desk)) == [
        "Asia-Pacific",
        "Europe",
        "Middle East",
        "Global Crises",
        "Also this week",
    ]


# --- helpers shared with the race tests below ----------------------------------------------


class GatedRecorder(Recorder):
    """A Recorder whose DATA waits on ``gate`` (a threading.Event) once ``arrived`` is set:
    a message is then in flight, and the send cannot finish until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.arrived = threading.Event()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.arrived.set()
        await asyncio.to_thread(self.gate.wait, 60)
        return await super().handle_DATA(server, session, envelope)


@pytest.fixture
def gated_server() -> Any:
    handler = GatedRecorder()
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        yield controller, handler
    finally:
        handler.gate.set()
        controller.stop()


def test_an_edit_during_a_real_send_on_sqlite_is_refused(tmp_path: Path, gated_server: Any) -> None:
    controller, server = gated_server
    desk = make_desk(tmp_path, controller.port)
    run(desk, "draft", "--date", D)
    run(desk, "issue", "note", "--text", "As *sent*.", "--date", D)
    app = _open(desk)
    outcome: dict[str, Any] = {}

    def send() -> None:
        try:
            outcome["report"] = pipeline.send(app, date.fromisoformat(D))
        except BaseException as exc:  # reported to the test thread
            outcome["error"] = exc

    sender = threading.Thread(target=send)
    sender.start()
    try:
        assert server.arrived.wait(60), "no message reached the server"
        for args in (("note", "--text", "Too late."), ("exclude", str(EU0)), ("reset",)):
            result = run(desk, "issue", *args, "--date", D)
            assert result.exit_code == 2, result.output
            assert result.stderr == (
                f"digest: error: issue {D} is being sent right now: it can no longer be changed\n"
            )
    finally:
        server.gate.set()
        sender.join(120)
        app.engine.dispose()
    assert "error" not in outcome, outcome
    assert sorted(m.rcpt_tos[0] for m in server.messages) == READERS
    for m in server.messages:
        _, html, text = parts(m.data)
        assert "As <em>sent</em>." in html and "Too late" not in html + text
    assert shown(desk)["note"] == "As *sent*." and shown(desk)["status"] == "sent"


def _send_in_thread(app: pipeline.App, outcome: dict[str, Any]) -> threading.Thread:
    def send() -> None:
        try:
            outcome["report"] = pipeline.send(app, date.fromisoformat(D))
        except BaseException as exc:  # handed to the test thread
            outcome["error"] = exc

    thread = threading.Thread(target=send)
    thread.start()
    return thread


def test_an_edit_during_a_real_send_on_postgresql_is_refused(
    tmp_path: Path, gated_server: Any
) -> None:
    from tests.test_postgres import pg_schema

    controller, server = gated_server
    with pg_schema() as url:
        desk = make_desk(tmp_path, controller.port, db_url=url)
        run(desk, "draft", "--date", D)
        run(desk, "issue", "note", "--text", "As *sent*.", "--date", D)
        app = _open(desk)
        outcome: dict[str, Any] = {}
        sender = _send_in_thread(app, outcome)
        try:
            assert server.arrived.wait(60), "no message reached the server"
            for args in (("note", "--text", "Too late."), ("exclude", str(EU0)), ("unapprove",)):
                result = run(desk, "issue", *args, "--date", D)
                assert result.exit_code == 2, result.output
                assert f"issue {D} can no longer be changed: its sending has started" in (
                    result.stderr
                )
        finally:
            server.gate.set()
            sender.join(120)
            app.engine.dispose()
        assert "error" not in outcome, outcome
        assert sorted(m.rcpt_tos[0] for m in server.messages) == READERS
        for m in server.messages:
            _, html, text = parts(m.data)
            assert "As <em>sent</em>." in html and "Too late" not in html + text
        assert shown(desk)["note"] == "As *sent*."


def test_an_edit_that_withdraws_the_approval_as_a_send_starts_stops_it_on_postgresql(
    tmp_path: Path, smtp_server: tuple[Controller, Recorder]
) -> None:
    """The send checked the approval; before its first message, an edit (which withdraws
    the approval) commits. PostgreSQL has no send lock, so the sender reads the issue
    again under its row lock once its first claim is in: it must then find the approval
    gone and send nothing, rather than the edited issue nobody approved.

    The edit is made by a second connection holding the issue's row lock, as
    ``editorial._editable`` does, while the sender waits for that lock."""
    from sqlalchemy import create_engine, text

    from tests.test_postgres import pg_schema

    controller, server = smtp_server
    with pg_schema() as url:
        desk = make_desk(tmp_path, controller.port, STRICT, db_url=url)
        run(desk, "draft", "--date", D)
        run(desk, "issue", "note", "--text", "The approved note.", "--date", D)
        run(desk, "issue", "approve", "--date", D)
        app = _open(desk)
        editor = create_engine(app.engine.url)
        outcome: dict[str, Any] = {}
        try:
            with editor.connect() as conn:
                me = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
                conn.execute(
                    text("SELECT id FROM issues WHERE edition_date = :d FOR UPDATE"),
                    {"d": date.fromisoformat(D)},
                )
                sender = _send_in_thread(app, outcome)

                def sender_waits_for_us() -> bool:
                    with editor.connect() as probe:
                        waiting = probe.execute(
                            text(
                                "SELECT count(*) FROM pg_stat_activity "
                                "WHERE :me = ANY(pg_blocking_pids(pid))"
                            ),
                            {"me": me},
                        ).scalar_one()
                    return bool(waiting)

                wait_for(sender_waits_for_us, "the sender to wait for the issue's row lock")
                # What `digest issue note` writes: a new note, the approval withdrawn.
                conn.execute(
                    text(
                        "UPDATE issues SET note = 'An unapproved note.', approved_at = NULL, "
                        "approved_by = NULL WHERE edition_date = :d"
                    ),
                    {"d": date.fromisoformat(D)},
                )
                conn.commit()
                sender.join(120)
        finally:
            editor.dispose()
            app.engine.dispose()
        assert server.messages == [], [m.data for m in server.messages][:1]
        assert isinstance(outcome.get("error"), AwaitingApproval), outcome
        assert (
            str(outcome["error"]) == f"issue {D} awaits approval: digest issue approve --date {D}"
        )
        # Nothing left the building: the issue is still a draft its editors may change.
        assert shown(desk)["status"] == "draft"
        assert run(desk, "issue", "note", "--text", "Final *note*.", "--date", D).exit_code == 0
        run(desk, "issue", "approve", "--date", D)
        assert run(desk, "send", "--date", D).exit_code == 0
        assert sorted(m.rcpt_tos[0] for m in server.messages) == READERS
        assert all("Final <em>note</em>." in parts(m.data)[1] for m in server.messages)


# --- one article, one issue -----------------------------------------------------------------

NEXT = "2026-12-04"  # the Friday after D


def test_an_article_reaches_a_reader_twice_only_when_an_editor_chose_it_knowingly(
    tmp_path: Path, smtp_server: tuple[Controller, Recorder]
) -> None:
    """An editor pulls next week's story into this week's issue (allowed: "any stored
    article"); next week's draft, built by the rules before this week's issue went out,
    must not carry it again. Including by hand an article another issue carries (sent or
    still a draft) is allowed, with a note naming that issue."""
    controller, server = smtp_server
    items = feed_items()
    for region in ("Europe", "Asia-Pacific"):
        items.append(
            {
                "title": f"Next week's {region} story",
                "link": f"/{region.lower()}/next",
                "published": datetime(2026, 12, 2, 12, tzinfo=UTC),
                "categories": [region],
            }
        )
    desk = make_desk(tmp_path, controller.port)
    (tmp_path / "feed.xml").write_text(rss(items), encoding="utf-8")
    assert "2 new" in run(desk, "fetch").stdout
    later = OLD + 1
    run(desk, "draft", "--date", D)
    pulled = run(desk, "issue", "include", str(later), "--date", D)
    assert pulled.exit_code == 0 and pulled.stderr == ""  # no other issue has it yet
    # Next week's draft is built before this week's issue is sent.
    assert run(desk, "draft", "--date", NEXT).exit_code == 0
    next_ids = [a["id"] for s in shown_on(desk, NEXT)["sections"] for a in s["articles"]]
    assert later not in next_ids
    # By hand, knowingly: the note names the other issue, sent or not.
    again = run(desk, "issue", "include", str(later), "--date", NEXT)
    assert again.exit_code == 0
    assert again.stderr == (
        f"digest: note: article {later} is also in the issue of {D} (draft): readers of "
        "both get it twice unless you exclude it from one\n"
    )
    assert run(desk, "send", "--date", D).exit_code == 0
    run(desk, "issue", "exclude", str(later), "--date", NEXT)
    third = run(desk, "issue", "include", str(later), "--date", NEXT)
    assert third.stderr == (
        f"digest: note: article {later} was already in the round-up of {D} (sent): readers "
        "of both get it twice unless you exclude it\n"
    )
    run(desk, "issue", "exclude", str(later), "--date", NEXT)
    assert run(desk, "send", "--date", NEXT).exit_code == 0
    for reader in ("ada@example.org", "kofi@example.org"):
        copies = sum("Next week's Europe story" in parts(m.data)[2] for m in server.to(reader))
        assert copies == 1, reader


def shown_on(path: Path, day: str) -> dict[str, Any]:
    result = run(path, "issue", "show", "--date", day, "--json")
    assert result.exit_code == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def test_the_preview_of_a_reader_who_left_says_they_get_nothing(
    tmp_path: Path, smtp_server: tuple[Controller, Recorder]
) -> None:
    controller, server = smtp_server
    desk = make_desk(tmp_path, controller.port)
    run(desk, "draft", "--date", D)
    assert run(desk, "unsubscribe", "kofi@example.org").exit_code == 0
    result = run(desk, "preview", "--date", D, "--subscriber", "kofi@example.org")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert result.stdout == ""
    assert result.stderr == (
        "digest: error: kofi@example.org gets no email for 2026-11-27: they are "
        "unsubscribed (only active subscribers get the round-up)\n"
    )
    app = _open(desk)
    try:
        page = TestClient(create_preview_app(app, None)).get(
            "/message", params={"date": D, "subscriber": "kofi@example.org"}
        )
    finally:
        app.engine.dispose()
    assert page.status_code == 404 and "Hello Kofi" not in page.text
    assert "they are unsubscribed" in page.text
    assert run(desk, "send", "--date", D).exit_code == 0
    assert server.to("kofi@example.org") == [] and len(server.messages) == 2
