# ruff: noqa: F811  (fixtures imported from tests/webutil.py are test parameters here)
"""The archive: the list, an issue's page, the Atom feed; and the links round-ups carry."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import UTC, date, datetime
from pathlib import Path

from aiosmtpd.controller import Controller

from digest import store
from digest.models import IssueStatus
from tests.conftest import Recorder
from tests.test_postgres import pg_url  # noqa: F401  (fixture used by web_env)
from tests.webutil import (
    BASE,
    WebEnv,
    make_env,
    send_issue,
    sqlite_env,  # noqa: F401
    web_env,  # noqa: F401
)

ATOM = "{http://www.w3.org/2005/Atom}"
D = date(2026, 11, 27)


def _build_unsent(env: WebEnv, day: date) -> None:
    """An issue that is built (frozen) but whose sending never started."""
    with env.app.sessions.begin() as session:
        article = store.find_article(session, "https://news.example.org/europe/1", None)
        assert article is not None
        issue = store.create_issue(
            session, day, f"Unsent {day}", [("Europe", [article.id])], datetime.now(UTC)
        )
        assert issue.status == IssueStatus.READY


def test_sent_issues_are_listed_shown_and_in_the_feed(web_env: WebEnv) -> None:
    env = web_env
    send_issue(env, ["Private.Reader@example.org"])
    _build_unsent(env, date(2026, 11, 20))  # built a week earlier, never sent
    with env.app.sessions() as session:
        issue = store.published_issue(session, D)
        assert issue is not None
        subject = issue.subject
    with env.client() as client:
        index = client.get("/archive")
        assert index.status_code == 200
        assert 'href="./archive/2026-11-27"' in index.text and subject in index.text
        assert "2026-11-20" not in index.text

        page = client.get("/archive/2026-11-27")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        for region in env.config.newsletter.regions:  # every section, whoever reads
            assert region in page.text
        assert "Also this week" in page.text and "Sport story 0" in page.text
        lowered = page.text.lower()
        assert "private.reader" not in lowered and "archive reader" not in lowered
        assert "/unsubscribe/" not in page.text and "/preferences/" not in page.text
        assert "dgst" not in lowered  # no placeholder left over
        assert f'href="{BASE}/subscribe"' in page.text
        csp = page.headers["content-security-policy"]
        assert "script" not in csp and "frame-ancestors 'none'" in csp

        for missing in (
            "/archive/2026-11-20",
            "/archive/2026-11-13",
            "/archive/2026-13-01",
            "/archive/yesterday",
            "/archive/2026-11-27x",
        ):
            assert client.get(missing).status_code == 404, missing

        feed = client.get("/archive/feed.xml")
        assert feed.status_code == 200 and feed.headers["content-type"].startswith(
            "application/atom+xml"
        )
    root = ET.fromstring(feed.content)
    assert root.tag == f"{ATOM}feed"
    entries = root.findall(f"{ATOM}entry")
    assert len(entries) == 1
    entry = entries[0]
    assert entry.findtext(f"{ATOM}title") == subject
    assert entry.find(f"{ATOM}link").get("href") == f"{BASE}/archive/2026-11-27"  # type: ignore[union-attr]
    assert entry.findtext(f"{ATOM}id") == "tag:news.example.org,2026:digest:issue:2026-11-27"
    assert "Europe story 0" in (entry.findtext(f"{ATOM}summary") or "")


def test_the_archive_lists_newest_first_and_a_sending_issue_counts(sqlite_env: WebEnv) -> None:
    env = sqlite_env
    send_issue(env, ["a@example.org"])
    _build_unsent(env, date(2026, 12, 4))
    with env.app.sessions.begin() as session:
        later = store.issue_for_date(session, date(2026, 12, 4))
        assert later is not None
        store.set_issue_status(session, later, IssueStatus.SENDING, datetime.now(UTC))
    with env.client() as client:
        text = client.get("/archive").text
        assert text.index("2026-12-04") < text.index("2026-11-27")
        feed = ET.fromstring(client.get("/archive/feed.xml").content)
        ids = [e.findtext(f"{ATOM}id") for e in feed.findall(f"{ATOM}entry")]
        assert [i.rsplit(":", 1)[1] for i in ids if i] == ["2026-12-04", "2026-11-27"]


def test_round_ups_link_to_their_archive_page_and_the_preference_centre(
    sqlite_env: WebEnv,
) -> None:
    env = sqlite_env
    send_issue(env, ["reader@example.org"])
    msg = env.smtp.to("reader@example.org")[0].message
    html = msg.get_body(("html",)).get_content()
    text = msg.get_body(("plain",)).get_content()
    for part in (html, text):
        assert f"{BASE}/archive/2026-11-27" in part
        assert "View in browser" in part
        assert "Choose your regions" in part and f"{BASE}/preferences/" in part
    with env.client() as client:
        path = "/preferences/" + text.split(f"{BASE}/preferences/", 1)[1].split()[0]
        r = client.get(path)
        assert r.status_code == 200 and "Archive Reader" in r.text


def test_archive_disabled_means_no_pages_and_no_links(
    tmp_path: Path, feed_file: Path, smtp_server: tuple[Controller, Recorder]
) -> None:
    env = make_env(tmp_path, smtp_server, None, "\n[archive]\nenabled = false\n")
    try:
        send_issue(env, ["reader@example.org"])
        msg = env.smtp.to("reader@example.org")[0].message
        assert "/archive/" not in msg.get_body(("html",)).get_content()
        assert "View in browser" not in msg.get_body(("plain",)).get_content()
        with env.client() as client:
            for path in ("/archive", "/archive/2026-11-27", "/archive/feed.xml"):
                assert client.get(path).status_code == 404
            assert "Past issues" not in client.get("/subscribe").text
    finally:
        env.app.engine.dispose()
