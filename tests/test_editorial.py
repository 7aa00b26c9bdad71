"""The editor's week through the CLI: draft, show, curate, note, approve, test copies.

Real SQLite files, a real SMTP server (aiosmtpd) on loopback and real feed files; the
approval gate of `digest run` is driven by calling the scheduler's job functions with an
injected clock.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import UTC, date, datetime, timedelta
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import lxml.html
import pytest
from click.testing import CliRunner, Result

from digest import editorial, pipeline, store
from digest.cli import main
from digest.config import load_config
from tests.conftest import EDITION, Recorder, free_port, rss, week_items, write_config

D = "2026-11-27"
NY = ZoneInfo("America/New_York")
SEND_TIME = datetime(2026, 11, 27, 9, 0, tzinfo=NY)  # the default send_cron: Fridays 09:00
CREDIT = "Zoë Lens/Agence & Co 🦊"
# Article ids, in feed order (see tests.conftest.week_items): two per region, then "Sport".
AP0, AP1, EU0, EU1, ME0, ME1, GC0, GC1, SP0, SP1, OLD = range(1, 12)


STRICT = (
    '\n[editorial]\napproval = "required"\n'
    'editors = ["Editor@News.example.org", "desk@example.org"]\n'
)


def run(config_path: Path, *args: str, input: str | None = None) -> Result:
    result = CliRunner().invoke(main, ["--config", str(config_path), *args], input=input)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def feed_items() -> list[dict[str, Any]]:
    items = week_items()
    items[2]["credit"] = CREDIT  # Europe story 0 has an image; credit it
    items.append(
        {
            "title": "An older Europe analysis & 𝔘nicode",
            "link": "/europe/old",
            "published": EDITION - timedelta(days=40),
            "categories": ["Europe"],
            "dek": "From the archive.",
        }
    )
    return items


def make_desk(tmp_path: Path, port: int, editorial_toml: str = "", db_url: str = "") -> Path:
    (tmp_path / "feed.xml").write_text(rss(feed_items()), encoding="utf-8")
    path = write_config(tmp_path, port=port, extra=editorial_toml)
    if db_url:
        text = path.read_text(encoding="utf-8")
        path.write_text(text.replace('url = "sqlite:///digest.db"', f'url = "{db_url}"'))
    (tmp_path / "subs.csv").write_text(
        "email,name,regions\n"
        "ada@example.org,Ada 🦊 & Co,\n"
        "kofi@example.org,Kofi,Europe\n"
        "lin@example.org,Lin,Asia-Pacific\n",
        encoding="utf-8",
    )
    assert run(path, "init").exit_code == 0
    assert "11 new" in run(path, "fetch").stdout
    assert run(path, "subscribers", "import", str(tmp_path / "subs.csv")).exit_code == 0
    return path


@pytest.fixture
def desk(tmp_path: Path, smtp_server: tuple[object, Recorder]) -> Path:
    """An initialised desk with the week's articles, one old article and three readers."""
    return make_desk(tmp_path, smtp_server[0].port)  # type: ignore[attr-defined]


@pytest.fixture
def strict_desk(tmp_path: Path, smtp_server: tuple[object, Recorder]) -> Path:
    """The same desk with approval required and two editors."""
    return make_desk(tmp_path, smtp_server[0].port, STRICT)  # type: ignore[attr-defined]


def shown(path: Path) -> dict[str, Any]:
    result = run(path, "issue", "show", "--date", D, "--json")
    assert result.exit_code == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def layout(path: Path) -> dict[str, list[int]]:
    return {s["name"]: [a["id"] for a in s["articles"]] for s in shown(path)["sections"]}


def parts(raw: bytes) -> tuple[EmailMessage, str, str]:
    msg = message_from_bytes(raw, policy=policy.default)
    assert isinstance(msg, EmailMessage)
    html = msg.get_body(("html",)).get_content()  # type: ignore[union-attr]
    text = msg.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    return msg, html, text.replace("\r\n", "\n")


RULES = {
    "Asia-Pacific": [AP0, AP1],
    "Europe": [EU0, EU1],
    "Middle East": [ME0, ME1],
    "Global Crises": [GC0, GC1],
    "Also this week": [SP0, SP1],
}


# --- draft and show -----------------------------------------------------------------------


def test_draft_freezes_once_and_show_prints_the_issue(desk: Path) -> None:
    first = run(desk, "draft", "--date", D)
    assert first.exit_code == 0 and "built" in first.stderr
    assert "Europe story 0" in first.stdout and f"  {EU0}  " in first.stdout
    again = run(desk, "draft", "--date", D)
    assert again.exit_code == 0 and "already built" in again.stderr
    data = shown(desk)
    assert set(data) == {"date", "status", "subject", "lead", "note", "sections"}
    assert data["date"] == D and data["status"] == "draft"
    assert data["lead"] is None and data["note"] is None
    assert data["subject"] == "The Weekly Round-up: Asia-Pacific story 0"
    assert layout(desk) == RULES
    europe = next(s for s in data["sections"] if s["name"] == "Europe")
    assert europe["articles"][0] == {
        "id": EU0,
        "title": "Europe story 0",
        "url": "https://news.example.org/europe/0",
    }
    text = run(desk, "issue", "show", "--date", D).stdout
    assert text.startswith(f"issue    {D}  draft\n")
    assert f"lead     none chosen; the rules open with {AP0}" in text


def test_unknown_dates_ids_and_regions_exit_2_naming_them(desk: Path) -> None:
    missing = run(desk, "issue", "show", "--date", "2020-01-03")
    assert missing.exit_code == 2
    assert missing.stderr == (
        "digest: error: no issue for 2020-01-03: build its draft with "
        "`digest draft --date 2020-01-03`\n"
    )
    assert run(desk, "issue", "lead", "5", "--date", "27/11/2026").exit_code == 2
    run(desk, "draft", "--date", D)
    cases = {
        ("issue", "lead", "999"): "article 999 is not in the issue of 2026-11-27",
        ("issue", "exclude", "999"): "article 999 is not in the issue of 2026-11-27",
        ("issue", "include", "999"): "no stored article has id 999",
        ("issue", "include", str(OLD), "--region", "Atlantis"): "--region 'Atlantis' is not",
        ("issue", "move", str(EU0), "--region", "Atlantis"): "--region 'Atlantis' is not",
        ("issue", "move", str(EU0), "--region", "Europe", "--position", "3"): "use 1 to 2",
        ("issue", "move", str(EU0), "--region", "Europe", "--position", "0"): "use 1 to 2",
        ("issue", "include", str(EU1)): "already in the issue, under Europe",
        ("issue", "lead"): "give an article ID or --clear",
        ("issue", "note"): "give exactly one of --text, --file or --clear",
    }
    for args, message in cases.items():
        result = run(desk, *args, "--date", D)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert layout(desk) == RULES  # nothing changed


def test_default_date_is_the_next_unsent_issue(desk: Path) -> None:
    app = pipeline.open_app(load_config(desk))
    today = pipeline.today(app.config)
    nothing = run(desk, "issue", "show")
    assert nothing.exit_code == 2 and f"no unsent issue from {today} on" in nothing.stderr
    with app.sessions() as session:  # two future issues; the earlier one is the default
        now = datetime.now(UTC)
        store.create_issue(session, today + timedelta(days=14), "later", [("Europe", [EU1])], now)
        store.create_issue(session, today + timedelta(days=7), "next", [("Europe", [EU0])], now)
        session.commit()
    assert editorial.default_date(app) == today + timedelta(days=7)
    result = run(desk, "issue", "exclude", str(EU0))
    assert result.exit_code == 2 and "the last one of the issue" in result.stderr
    assert run(desk, "issue", "include", str(OLD)).exit_code == 0
    assert json.loads(run(desk, "issue", "show", "--json").stdout)["date"] == str(
        today + timedelta(days=7)
    )


# --- curation ---------------------------------------------------------------------------


def test_lead_exclude_include_move_and_reset(desk: Path) -> None:
    run(desk, "draft", "--date", D)
    result = run(desk, "issue", "lead", str(EU1), "--date", D)
    assert result.stdout == f"{D}: article {EU1} leads the round-up\n"
    data = shown(desk)
    assert data["lead"] == EU1 and data["subject"] == "The Weekly Round-up: Europe story 1"

    assert run(desk, "issue", "exclude", str(AP1), "--date", D).exit_code == 0
    included = run(desk, "issue", "include", str(OLD), "--date", D)  # an older article
    assert included.stdout == f"{D}: article {OLD} included under Europe\n"
    run(desk, "issue", "move", str(SP0), "--region", "middle east", "--date", D)
    moved = run(desk, "issue", "move", str(GC1), "--region", "Europe", "--position", "1")
    assert moved.exit_code == 2  # no --date and no unsent issue from today on
    moved = run(
        desk, "issue", "move", str(GC1), "--region", "Europe", "--position", "1", "--date", D
    )
    assert moved.stdout == f"{D}: article {GC1} moved to Europe, position 1\n"
    run(desk, "issue", "move", str(GC0), "--region", "Also this week", "--date", D)
    assert layout(desk) == {
        "Asia-Pacific": [AP0],
        "Europe": [GC1, EU0, EU1, OLD],
        "Middle East": [ME0, ME1, SP0],
        "Also this week": [SP1, GC0],
    }
    # Moving the lead keeps it the lead; excluding it drops the choice.
    run(desk, "issue", "move", str(EU1), "--region", "Asia-Pacific", "--date", D)
    assert shown(desk)["lead"] == EU1
    run(desk, "issue", "exclude", str(EU1), "--date", D)
    assert shown(desk)["lead"] is None
    run(desk, "issue", "note", "--text", "Kept *across* a reset.", "--date", D)
    run(desk, "issue", "lead", str(ME1), "--date", D)

    reset = run(desk, "issue", "reset", "--date", D)
    assert reset.exit_code == 0 and "the note is kept" in reset.stdout
    data = shown(desk)
    assert layout(desk) == RULES and data["lead"] is None
    assert data["note"] == "Kept *across* a reset."
    assert run(desk, "issue", "lead", "--clear", "--date", D).exit_code == 0


def test_including_an_article_of_a_sent_issue_warns(desk: Path) -> None:
    assert run(desk, "send", "--date", "2026-11-26").exit_code == 0  # carries EU1 and more
    run(desk, "draft", "--date", "2026-11-28")
    assert EU1 not in [i for ids in layout_of(desk, "2026-11-28").values() for i in ids]
    result = run(desk, "issue", "include", str(EU1), "--date", "2026-11-28")
    assert result.exit_code == 0
    assert f"article {EU1} was already in the round-up of 2026-11-26" in result.stderr


def layout_of(path: Path, day: str) -> dict[str, list[int]]:
    data = json.loads(run(path, "issue", "show", "--date", day, "--json").stdout)
    return {s["name"]: [a["id"] for a in s["articles"]] for s in data["sections"]}


# --- what the reader sees ---------------------------------------------------------------


def test_lead_and_note_in_every_edition_that_has_the_lead(
    desk: Path, smtp_server: tuple[object, Recorder]
) -> None:
    _, server = smtp_server
    run(desk, "draft", "--date", D)
    run(desk, "issue", "lead", str(EU0), "--date", D)
    note = "A *short* week & a [long read](https://news.example.org/long?a=1&b=2) 🦊.\n\nBye."
    run(desk, "issue", "note", "--text", note, "--date", D)
    assert run(desk, "send", "--date", D).exit_code == 0
    received = {m.rcpt_tos[0]: parts(m.data) for m in server.messages}
    assert set(received) == {"ada@example.org", "kofi@example.org", "lin@example.org"}

    msg, html, text = received["ada@example.org"]
    assert msg["Subject"] == "The Weekly Round-up: Europe story 0"
    # The note follows the greeting (instead of the stock introduction), then the lead.
    hello = html.index("Hello Ada 🦊 &amp; Co,")
    headline = "Europe story 0</a></h3>"
    assert hello < html.index("A <em>short</em> week &amp; a <a") < html.index(headline)
    assert 'href="https://news.example.org/long?a=1&amp;b=2"' in html
    assert "essential reads" not in html and "essential reads" not in text
    # The lead opens the round-up with a large image and its credit, above every section,
    # and is taken out of its own section.
    lead_at = html.index(headline)
    sections_at = [html.index(f">{name}</h2>") for name in RULES]
    assert lead_at < min(sections_at)
    assert html.count(headline) == 1
    assert re.search(
        r'<img class="image" src="https://news.example.org/img/2.jpg"[^>]*width="592"', html
    )
    assert html.index(CREDIT.replace("&", "&amp;")) > html.index("img/2.jpg")
    # Other articles get a small image.
    assert re.search(
        r'<img class="thumb" src="https://news.example.org/img/0.jpg"[^>]*width="160"', html
    )
    assert html.count('width="592"') == 1 and html.count('<img class="thumb"') == 4
    # The text part carries note and lead too, in the same order.
    assert (
        text.index("Hello Ada 🦊 & Co,")
        < text.index("A short week & a long read")
        < text.index("Europe story 0")
        < text.index("ASIA-PACIFIC\n====")
    )
    assert "long read (https://news.example.org/long?a=1&b=2)" in text

    _, html, text = received["kofi@example.org"]  # Europe only: has the lead's section
    assert html.index(headline) < html.index(">Europe</h2>")
    assert "A <em>short</em> week" in html and "Bye." in text
    _, html, text = received["lin@example.org"]  # Asia-Pacific only: not this lead
    assert "Europe story 0" not in html and "Europe story 0" not in text
    assert "A <em>short</em> week" in html and "A short week" in text
    assert html.index("Asia-Pacific story 0</a></h3>") < html.index(">Asia-Pacific</h2>")


# --- hostile notes ----------------------------------------------------------------------

HOSTILE = (
    "<script>alert('x')</script> <img src=x onerror=alert(1)> <b onclick=alert(1)>b</b>\n\n"
    "[click me](javascript:alert(document.cookie)) [two]( JaVaScRiPt:alert(2))"
    " [three](&#106;avascript:alert(3)) [four](data:text/html,<script>x</script>)"
    " [five](vbscript:x) [six](/relative) <javascript:alert(6)>\n\n"
    "[fine](https://news.example.org/ok) [mail](mailto:desk@news.example.org)"
)


def test_hostile_notes_render_harmless(desk: Path, smtp_server: tuple[object, Recorder]) -> None:
    _, server = smtp_server
    run(desk, "draft", "--date", D)
    assert run(desk, "issue", "note", "--text", HOSTILE, "--date", D).exit_code == 0
    assert shown(desk)["note"] == HOSTILE  # stored as written
    assert run(desk, "send", "--test", "editor@example.org", "--date", D).exit_code == 0
    _, html, text = parts(server.messages[0].data)
    note_html = html.split("Hello there,</p>", 1)[1].split('<td class="px rule"', 1)[0]
    note_html = note_html.rsplit("</td>", 1)[0].replace("\u200b", "")  # (break opportunities)
    elements = list(lxml.html.fragment_fromstring(note_html, create_parent="div").iter())[1:]
    assert {e.tag for e in elements} == {"p", "a"}  # no script, img, b: all came out as text
    for e in elements:
        assert set(e.attrib) <= {"style", "class", "href"}, e.attrib
    hrefs = [e.get("href") for e in elements if e.tag == "a"]
    assert hrefs == ["https://news.example.org/ok", "mailto:desk@news.example.org"]
    assert "&lt;script&gt;alert('x')&lt;/script&gt;" in note_html
    # An autolink to javascript: is text, not a link, in both parts.
    assert "click me two three four five six javascript:alert(6)</p>" in note_html
    assert "click me two three four five six javascript:alert(6)\n" in text
    assert "fine (https://news.example.org/ok) mail (desk@news.example.org)" in text


def test_a_note_too_long_is_a_clear_error_and_changes_nothing(desk: Path, tmp_path: Path) -> None:
    run(desk, "draft", "--date", D)
    run(desk, "issue", "note", "--text", "The note before.", "--date", D)
    huge = "𝔘" + "x" * (1024 * 1024)
    result = run(desk, "issue", "note", "--text", huge, "--date", D)
    assert result.exit_code == 2
    assert result.stderr == (
        "digest: error: the note is 1,048,577 characters; at most 5,000 are allowed "
        "(about 800 words): shorten it\n"
    )
    big = tmp_path / "note.md"
    big.write_text(huge, encoding="utf-8")
    from_file = run(desk, "issue", "note", "--file", str(big), "--date", D)
    assert from_file.exit_code == 2 and "over 5,000 characters" in from_file.stderr
    (tmp_path / "latin1.md").write_bytes("caf\xe9".encode("latin-1"))
    bad = run(desk, "issue", "note", "--file", str(tmp_path / "latin1.md"), "--date", D)
    assert bad.exit_code == 2 and "not UTF-8 (byte 3)" in bad.stderr
    gone = run(desk, "issue", "note", "--file", str(tmp_path / "nope.md"), "--date", D)
    assert gone.exit_code == 2 and "no such file" in gone.stderr
    assert shown(desk)["note"] == "The note before."
    small = tmp_path / "ok.md"
    small.write_text("\ufeffFrom a *file*.\r\n", encoding="utf-8")
    assert run(desk, "issue", "note", "--file", str(small), "--date", D).exit_code == 0
    assert shown(desk)["note"] == "From a *file*."
    assert run(desk, "issue", "note", "--file", "-", "--date", D, input="From stdin").exit_code == 0
    assert shown(desk)["note"] == "From stdin"
    assert run(desk, "issue", "note", "--clear", "--date", D).stdout == f"{D}: note cleared\n"
    assert shown(desk)["note"] is None


# --- approval ---------------------------------------------------------------------------

AWAITS = f"issue {D} awaits approval: digest issue approve --date {D}\n"


def deliveries(path: Path, day: str = D) -> dict[str, int] | None:
    app = pipeline.open_app(load_config(path))
    with app.sessions() as session:
        issue = store.issue_for_date(session, date.fromisoformat(day))
        return None if issue is None else store.delivery_counts(session, issue.id)


def test_send_refuses_an_unapproved_issue_until_it_is_approved(
    strict_desk: Path, smtp_server: tuple[object, Recorder]
) -> None:
    _, server = smtp_server
    refused = run(strict_desk, "send", "--date", D)
    assert refused.exit_code == 1 and refused.stderr == AWAITS and refused.stdout == ""
    assert server.messages == []
    assert sum((deliveries(strict_desk) or {}).values()) == 0  # the ledger is untouched
    assert shown(strict_desk)["status"] == "draft"  # but the draft now exists to review
    status = run(strict_desk, "status").stdout
    assert re.search(rf"^{D}  awaiting approval ", status, re.M), status

    approved = run(strict_desk, "issue", "approve", "--by", "Ed Itor", "--date", D)
    assert approved.stdout == f"{D}: approved by Ed Itor\n"
    assert shown(strict_desk)["status"] == "approved"
    assert "approved by Ed Itor at" in run(strict_desk, "issue", "show", "--date", D).stdout
    again = run(strict_desk, "issue", "approve", "--date", D)
    assert again.stdout.startswith(f"{D}: already approved by Ed Itor at ")
    # An edit withdraws the approval: what was approved is what is sent.
    edited = run(strict_desk, "issue", "exclude", str(SP1), "--date", D)
    assert edited.exit_code == 0 and "approval withdrawn by this change" in edited.stderr
    assert shown(strict_desk)["status"] == "draft"
    assert run(strict_desk, "send", "--date", D).stderr == AWAITS
    run(strict_desk, "issue", "approve", "--date", D)
    assert run(strict_desk, "issue", "unapprove", "--date", D).stdout == (
        f"{D}: approval withdrawn\n"
    )
    assert run(strict_desk, "send", "--date", D).exit_code == 1
    run(strict_desk, "issue", "approve", "--date", D)
    sent = run(strict_desk, "send", "--date", D)
    assert sent.exit_code == 0, sent.stderr
    assert sorted(m.rcpt_tos[0] for m in server.messages) == [
        "ada@example.org",
        "kofi@example.org",
        "lin@example.org",
    ]
    assert all("Also this week story 1" not in m.data.decode() for m in server.messages)
    assert re.search(rf"^{D}  sent ", run(strict_desk, "status").stdout, re.M)


def test_auto_approval_sends_as_before_and_shows_draft(
    desk: Path, smtp_server: tuple[object, Recorder]
) -> None:
    run(desk, "draft", "--date", D)
    assert re.search(rf"^{D}  draft ", run(desk, "status").stdout, re.M)
    assert run(desk, "send", "--date", D).exit_code == 0
    assert len(smtp_server[1].messages) == 3


def test_every_edit_is_refused_once_a_message_has_left(
    desk: Path, smtp_server: tuple[object, Recorder]
) -> None:
    _, server = smtp_server
    run(desk, "draft", "--date", D)
    # Kofi's server keeps saying "try later": two messages leave, the issue stays open.
    server.rcpt_replies = {"kofi@example.org": "450 4.2.1 mailbox busy"}
    run(desk, "send", "--date", D)
    assert deliveries(desk) == {
        "pending": 0,
        "sending": 0,
        "sent": 2,
        "deferred": 1,
        "failed": 0,
        "skipped": 0,
    }
    assert shown(desk)["status"] == "sending"
    edits = [
        ("lead", str(EU0)),
        ("exclude", str(EU0)),
        ("include", str(OLD)),
        ("move", str(EU0), "--region", "Asia-Pacific"),
        ("note", "--text", "Too late"),
        ("note", "--clear"),
        ("reset",),
        ("approve",),
        ("unapprove",),
    ]
    before = shown(desk)
    for args in edits:
        result = run(desk, "issue", *args, "--date", D)
        assert result.exit_code == 2, (args, result.output)
        assert result.stderr == (
            f"digest: error: issue {D} can no longer be changed: its sending has started "
            "(3 messages out), so readers already have it\n"
        ), args
    assert shown(desk) == before


def test_an_edit_while_a_send_runs_is_refused(desk: Path) -> None:
    run(desk, "draft", "--date", D)
    app = pipeline.open_app(load_config(desk))
    with store.exclusive_lock(app.engine, f"send:{D}"):  # what a running send holds
        result = run(desk, "issue", "note", "--text", "Now?", "--date", D)
    assert result.exit_code == 2
    assert result.stderr == (
        f"digest: error: issue {D} is being sent right now: it can no longer be changed\n"
    )
    assert run(desk, "issue", "note", "--text", "Now.", "--date", D).exit_code == 0


# --- test copies ------------------------------------------------------------------------


def test_test_copies_leave_the_ledger_untouched(
    desk: Path, smtp_server: tuple[object, Recorder]
) -> None:
    _, server = smtp_server
    result = run(desk, "send", "--test", "Editor@Example.org", "kofi@example.org", "--date", D)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.count(": sent (250 2.0.0 Message accepted)") == 2
    assert [m.rcpt_tos for m in server.messages] == [["editor@example.org"], ["kofi@example.org"]]
    for m in server.messages:
        msg, html, _ = parts(m.data)
        assert msg["Subject"] == "[TEST] The Weekly Round-up: Asia-Pacific story 0"
        # As a subscriber of every region gets it, whatever the address's own regions.
        assert all(f">{name}</h2>" in html for name in RULES if name != "Asia-Pacific")
    _, kofi_html, _ = parts(server.messages[1].data)
    assert "Hello Kofi," in kofi_html
    # Before any draft: the rules' selection, nothing frozen, nothing in the ledger.
    assert "no issues yet" in run(desk, "status").stdout
    run(desk, "draft", "--date", D)
    run(desk, "issue", "lead", str(ME1), "--date", D)
    run(desk, "send", "--test", "editor@example.org", "--date", D)
    assert parts(server.messages[-1].data)[0]["Subject"] == (
        "[TEST] The Weekly Round-up: Middle East story 1"
    )
    assert deliveries(desk) == {
        s: 0 for s in ("pending", "sending", "sent", "deferred", "failed", "skipped")
    }
    assert shown(desk)["status"] == "draft"
    # The real send afterwards is unaffected: everyone, once.
    assert run(desk, "send", "--date", D).exit_code == 0
    assert len(server.messages) == 3 + 3


def test_test_copy_arguments(desk: Path, smtp_server: tuple[object, Recorder]) -> None:
    eleven = [f"e{i}@example.org" for i in range(11)]
    too_many = run(desk, "send", "--test", *eleven, "--date", D)
    assert too_many.exit_code == 2
    assert too_many.stderr == (
        "digest: error: --test takes at most 10 addresses at a time (got 11)\n"
    )
    bad = run(desk, "send", "--test", "ok@example.org", "not an address", "--date", D)
    assert bad.exit_code == 2 and "--test 'not an address' is not an email address" in bad.stderr
    none = run(desk, "send", "--test", "--date", D)
    assert none.exit_code == 2 and "--test needs at least one address" in none.stderr
    stray = run(desk, "send", "x@example.org", "--date", D)
    assert stray.exit_code == 2 and "addresses are for `digest send --test`" in stray.stderr
    assert smtp_server[1].messages == []
    # Duplicates count once; an unapproved issue may be test-sent.
    ten = run(desk, "send", "--test", *eleven[:10], "E0@example.org", "--date", D)
    assert ten.exit_code == 0 and len(smtp_server[1].messages) == 10


def test_a_refused_test_address_is_reported_and_exit_1(
    desk: Path, smtp_server: tuple[object, Recorder]
) -> None:
    smtp_server[1].rcpt_replies = {"gone@example.org": "550 5.1.1 no such user"}
    result = run(desk, "send", "--test", "gone@example.org", "ok@example.org", "--date", D)
    assert result.exit_code == 1
    assert f"test copy of {D} to gone@example.org: FAILED (RCPT: 550 5.1.1 no such user)" in (
        result.stdout
    )
    assert [m.rcpt_tos for m in smtp_server[1].messages] == [["ok@example.org"]]


def _normalized(raw: bytes, email: str, name: str, url: str, prefs: str, mid: str) -> bytes:
    """The message with exactly the fields a test copy may change replaced by markers:
    recipient (To, name, email), its tokens (unsubscribe, preferences), Message-ID and
    the subject prefix;
    plus what follows from them or from the clock (Date, the DKIM signature)."""
    from digest.render import _qp

    head, body = raw.split(b"\r\n\r\n", 1)
    lines = re.split(rb"\r\n(?![ \t])", head)
    keep = []
    for line in lines:
        field_name = line.split(b":", 1)[0].lower()
        if field_name in (b"to", b"message-id", b"date", b"dkim-signature"):
            keep.append(field_name + b": <normalized>")
        elif field_name == b"list-unsubscribe":
            keep.append(line.replace(url.encode(), b"<URL>"))
        elif field_name == b"subject":
            keep.append(line.replace(b"Subject: [TEST] ", b"Subject: "))
        else:
            keep.append(line)
    personal = ((url, b"URL"), (prefs, b"PREFS"), (name or "there", b"NAME"), (email, b"EMAIL"))
    for value, marker in personal:
        for encoded in {_qp(value), _qp(value.replace("&", "&amp;"))}:
            body = body.replace(b"=\r\n" + encoded + b"=\r\n", b"=\r\n<" + marker + b">=\r\n")
    assert mid.encode() in head
    return b"\r\n".join(keep) + b"\r\n\r\n" + body


def test_a_test_copy_is_the_real_message_but_for_its_own_fields(
    desk: Path, smtp_server: tuple[object, Recorder]
) -> None:
    from digest.tokens import TokenSigner

    _, server = smtp_server
    run(desk, "draft", "--date", D)
    run(desk, "issue", "lead", str(GC0), "--date", D)
    run(
        desk,
        "issue",
        "note",
        "--text",
        "Same *bytes* & the [same](https://n.example/) 🦊.",
        "--date",
        D,
    )
    assert run(desk, "send", "--test", "editor@example.org", "--date", D).exit_code == 0
    assert run(desk, "send", "--date", D).exit_code == 0
    test_copy = server.messages[0]
    real = next(m for m in server.messages[1:] if m.rcpt_tos == ["ada@example.org"])
    assert test_copy.data != real.data
    signer = TokenSigner("test-secret-0123456789abcdef")
    test_msg, real_msg = parts(test_copy.data)[0], parts(real.data)[0]
    test_url = test_msg["List-Unsubscribe"].strip("<>")
    real_url = real_msg["List-Unsubscribe"].strip("<>")
    base = "https://news.example.org/u/unsubscribe/"
    assert test_url.startswith(base) and real_url.startswith(base)
    real_claim = signer.verify(real_url.removeprefix(base))
    assert real_claim.subscriber_id == 1 and real_claim.matches("ada@example.org")
    test_claim = signer.verify(test_url.removeprefix(base))  # verifies, but names nobody
    assert test_claim.subscriber_id == 0 and test_claim.matches("editor@example.org")
    assert test_msg["Message-ID"] != real_msg["Message-ID"]
    prefs = re.compile(r"https://news\.example\.org/u/preferences/[\w-]+")
    test_prefs = prefs.findall(parts(test_copy.data)[2])
    real_prefs = prefs.findall(parts(real.data)[2])
    assert len(set(test_prefs)) == len(set(real_prefs)) == 1 and test_prefs != real_prefs
    a = _normalized(
        test_copy.data, "editor@example.org", "", test_url, test_prefs[0], test_msg["Message-ID"]
    )
    b = _normalized(
        real.data, "ada@example.org", "Ada 🦊 & Co", real_url, real_prefs[0], real_msg["Message-ID"]
    )
    # Two renders of one edition are the same bytes; only those fields tell them apart.
    assert a == b


# --- configuration ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('approval = "sometimes"', "key 'editorial.approval': Input should be 'auto' or"),
        ('editors = ["not an address"]', "key 'editorial.editors': 'not an address' is not an"),
        (f"editors = {[f'e{i}@example.org' for i in range(11)]!r}", "at most 10 items"),
        ("draft_ahead_hours = -1", "key 'editorial.draft_ahead_hours'"),
        ('aproval = "auto"', "unknown key 'editorial.aproval'"),
    ],
)
def test_editorial_config_errors_name_the_key(tmp_path: Path, toml: str, message: str) -> None:
    from digest.errors import ConfigError

    path = write_config(tmp_path, extra=f"\n[editorial]\n{toml.replace(chr(39), chr(34))}\n")
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(path)


def test_editors_are_normalized_and_deduplicated(tmp_path: Path) -> None:
    path = write_config(
        tmp_path, extra='\n[editorial]\neditors = ["Ed@Example.ORG", " ed@example.org "]\n'
    )
    assert load_config(path).editorial.editors == ["ed@example.org"]


def test_the_editors_week_on_postgresql(
    tmp_path: Path, smtp_server: tuple[object, Recorder]
) -> None:
    from tests.test_postgres import pg_schema

    _, server = smtp_server
    with pg_schema() as url:
        path = make_desk(tmp_path, smtp_server[0].port, STRICT, db_url=url)  # type: ignore[attr-defined]
        run(path, "draft", "--date", D)
        run(path, "issue", "lead", str(EU1), "--date", D)
        run(path, "issue", "include", str(OLD), "--date", D)
        run(path, "issue", "move", str(OLD), "--region", "Europe", "--position", "1", "--date", D)
        run(path, "issue", "exclude", str(SP1), "--date", D)
        run(path, "issue", "note", "--text", "On *PostgreSQL* & 𝔘.", "--date", D)
        data = shown(path)
        assert data["lead"] == EU1 and data["note"] == "On *PostgreSQL* & 𝔘."
        assert layout(path)["Europe"] == [OLD, EU0, EU1]
        assert layout(path)["Also this week"] == [SP0]
        assert run(path, "send", "--date", D).stderr == AWAITS
        assert run(path, "issue", "approve", "--date", D).exit_code == 0
        assert run(path, "send", "--date", D).exit_code == 0
        assert len(server.messages) == 3
        refused = run(path, "issue", "reset", "--date", D)
        assert refused.exit_code == 2 and "can no longer be changed" in refused.stderr


def test_preview_serve_runs_as_a_command(desk: Path) -> None:
    run(desk, "draft", "--date", D)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    cmd = [sys.executable, "-m", "digest", "--config", str(desk), "preview", "--serve"]
    proc = subprocess.Popen(
        [*cmd, "--port", str(port), "--date", D],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        page = None
        deadline = time.monotonic() + 60
        while page is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                page = httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
            except httpx.TransportError:
                time.sleep(0.1)
        assert page is not None and page.status_code == 200, proc.poll()
        assert f'The Weekly Round-up · {D} · <span id="issue-status">draft</span>' in page.text
        assert "script-src 'self'" in page.headers["content-security-policy"]
        message = httpx.get(f"http://127.0.0.1:{port}/message?date={D}&part=text", timeout=5)
        assert "Hello there," in message.text and "Asia-Pacific story 0" in message.text
        version = httpx.get(f"http://127.0.0.1:{port}/version?date={D}", timeout=5).json()
        assert version["status"] == "draft" and len(version["version"]) == 16
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert f"digest preview: http://127.0.0.1:{port}/" in err
    assert "Traceback" not in err


def test_the_archive_page_shows_the_lead_and_the_note_as_sent(
    desk: Path, smtp_server: tuple[object, Recorder]
) -> None:
    from starlette.testclient import TestClient

    from digest.web import create_app

    run(desk, "draft", "--date", D)
    run(desk, "issue", "lead", str(ME0), "--date", D)
    run(desk, "issue", "note", "--text", "In the *archive* too & 𝔘.", "--date", D)
    assert run(desk, "send", "--date", D).exit_code == 0
    app = pipeline.open_app(load_config(desk))
    try:
        page = TestClient(create_app(app.config, app.sessions)).get(f"/archive/{D}")
    finally:
        app.engine.dispose()
    assert page.status_code == 200
    html = page.text
    assert "In the <em>archive</em> too &amp; 𝔘." in html
    assert html.index("Middle East story 0</a></h3>") < html.index(">Asia-Pacific</h2>")
