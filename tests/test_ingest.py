"""Tests of the fetch stage: parsing real feed files, storing, and fetching over real HTTP."""

from __future__ import annotations

import re
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from xml.sax.saxutils import escape

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from digest.config import Feed
from digest.errors import FeedError
from digest.ingest import (
    FeedReport,
    FetchReport,
    ParsedArticle,
    Rejection,
    fetch_all,
    parse_feed,
)
from digest.models import Article, FeedState
from digest.store import migrate, open_engine, session_factory

FEEDS = Path(__file__).parent / "data" / "feeds"
NOW = datetime(2024, 5, 8, 12, 0, tzinfo=UTC)
LATER = datetime(2024, 5, 9, 12, 0, tzinfo=UTC)
KENYA = "https://news.example.org/world/2024/05/kenya-votes?id=7"
MONSOON = "https://news.example.org/world/monsoon"
PARIS = "https://news.example.org/europe/paris-summit"


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def sessions(tmp_path: Path) -> sessionmaker[Session]:
    """A migrated SQLite file database."""
    engine = open_engine(f"sqlite:///{tmp_path / 't.db'}")
    migrate(engine)
    return session_factory(engine)


@pytest.fixture
def feed_file(tmp_path: Path) -> Callable[[str], Path]:
    """Copy a feed from tests/data/feeds into tmp_path, so a test may edit it."""

    def copy(name: str) -> Path:
        target = tmp_path / name
        shutil.copy(FEEDS / name, target)
        return target

    return copy


@dataclass
class FeedServer:
    """A real HTTP server on loopback, serving feeds and misbehaving on purpose."""

    base: str = ""
    body: bytes = b""
    etag: str = '"v1"'
    last_modified: str = "Mon, 06 May 2024 10:00:00 GMT"
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)

    def url(self, path: str) -> str:
        return self.base + path

    def headers_of(self, path: str) -> list[dict[str, str]]:
        return [headers for p, headers in self.requests if p == path]


def _handler(server: FeedServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass  # keep test output clean

        def _send(self, status: int, body: bytes = b"", **headers: str) -> None:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name.replace("_", "-"), value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            server.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
            path = self.path
            try:
                if path in ("/world.rss", "/malformed.xml"):
                    body = server.body if path == "/world.rss" else (FEEDS / path[1:]).read_bytes()
                    if self.headers.get("If-None-Match") == server.etag:
                        self._send(304, ETag=server.etag)
                    else:
                        self._send(
                            200,
                            body,
                            ETag=server.etag,
                            Last_Modified=server.last_modified,
                            Content_Type="application/rss+xml",
                        )
                elif path == "/page.html":
                    self._send(200, (FEEDS / "page.html").read_bytes(), Content_Type="text/html")
                elif path == "/moved":
                    self._send(301, Location="/world.rss")
                elif path == "/loop":
                    self._send(302, Location="/loop")
                elif path == "/error":
                    self._send(500, b"boom")
                elif path == "/slow":
                    time.sleep(1.0)
                    self._send(200, server.body)
                elif path == "/huge":
                    # No Content-Length: the client can only find out by counting.
                    self.send_response(200)
                    self.send_header("Content-Type", "application/rss+xml")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    chunk = b"<!-- padding -->" * 4096
                    for _ in range(11 * 1024 * 1024 // len(chunk) + 2):
                        self.wfile.write(chunk)
                elif path == "/huge-declared":
                    self.send_response(200)
                    self.send_header("Content-Length", str(20 * 1024 * 1024))
                    self.end_headers()
                    self.wfile.write(b"<rss>")
                else:
                    self._send(404)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client hung up on purpose (too big)

    return Handler


@pytest.fixture
def feed_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[FeedServer]:
    """A FeedServer on 127.0.0.1 with a free port, serving world.rss at /world.rss."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    state = FeedServer(body=(FEEDS / "world.rss").read_bytes())
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def _articles(sessions: sessionmaker[Session]) -> dict[str, Article]:
    with sessions() as session:
        return {a.link: a for a in session.scalars(select(Article))}


def _state(sessions: sessionmaker[Session], url: str) -> FeedState | None:
    with sessions() as session:
        return session.scalar(select(FeedState).where(FeedState.url == url))


def _rss(items: str, channel_link: str = "https://news.example.org/") -> bytes:
    link = f"<link>{channel_link}</link>" if channel_link else ""
    return (
        '<?xml version="1.0" encoding="utf-8"?><rss version="2.0"><channel><title>T</title>'
        f"{link}{items}</channel></rss>"
    ).encode()


def _item(title: str = "A title", link: str = "https://news.example.org/a", extra: str = "") -> str:
    return (
        f"<item><title>{title}</title><link>{link}</link>"
        f"<pubDate>Mon, 06 May 2024 10:00:00 GMT</pubDate>{extra}</item>"
    )


def _parse_one(items: str, **kwargs: str) -> ParsedArticle:
    articles, rejected = parse_feed(_rss(items, **kwargs), "https://news.example.org/feed.xml")
    assert rejected == []
    assert len(articles) == 1
    return articles[0]


# --- parsing: RSS and Atom ------------------------------------------------------------------


def test_rss_item_is_normalized() -> None:
    articles, _ = parse_feed((FEEDS / "world.rss").read_bytes(), "https://news.example.org/w.rss")
    kenya = articles[0]
    # Relative link resolved against the channel link; scheme/host lowercased; utm_* (any
    # case) and the fragment dropped; other parameters kept.
    assert kenya.link == KENYA
    assert kenya.guid == "world-1001"
    assert kenya.title == "Kenya votes in record numbers & calm"
    assert kenya.dek == "Polls opened at dawn. Turnout was high."
    assert kenya.authors == ["Wanjiru Kamau"]
    assert kenya.categories == ["Africa", "Elections"]
    assert kenya.image_url == "https://News.Example.org/img/kenya.jpg"
    assert kenya.published_at == datetime(2024, 5, 6, 8, 0, tzinfo=UTC)
    assert kenya.published_at.tzinfo is UTC


def test_rss_image_falls_back_to_an_http_enclosure_and_skips_bare_addresses() -> None:
    articles, _ = parse_feed((FEEDS / "world.rss").read_bytes(), "https://news.example.org/w.rss")
    monsoon = articles[1]
    # media:content is a video and media:thumbnail a javascript: URL; the enclosure wins.
    assert monsoon.image_url == "https://cdn.example.org/img/monsoon.jpg"
    assert monsoon.authors == []  # "desk@example.org" is an address, not a byline
    assert monsoon.guid == MONSOON


def test_image_credit_from_media_credit_or_the_credit_field(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    item = (
        "<item><title>{title}</title><link>https://n.example/{n}</link>"
        "<pubDate>Wed, 08 May 2024 10:00:00 +0000</pubDate>{extra}</item>"
    )
    items = [
        # A photographer's credit wins over an agency's, whatever the order.
        '<media:content url="https://n.example/1.jpg" medium="image">'
        '<media:credit role="distributor">Agence &amp; Co</media:credit>'
        '<media:credit role="photographer">Zoë &lt;b&gt;Lens&lt;/b&gt; 🦊</media:credit>'
        "</media:content>",
        '<media:thumbnail url="https://n.example/2.jpg"/><credit>Site Photo Desk</credit>',
        '<enclosure url="https://n.example/3.jpg" type="image/jpeg" length="1"/>',
        "<media:credit>Reuters</media:credit>",  # a credit without a picture is not kept
    ]
    doc = (
        '<?xml version="1.0"?><rss version="2.0" xmlns:media="http://search.yahoo.com/mrss/">'
        "<channel><title>t</title><link>https://n.example/</link>"
        + "".join(item.format(title=f"T{n}", n=n, extra=x) for n, x in enumerate(items))
        + "</channel></rss>"
    )
    articles, rejected = parse_feed(doc.encode(), "https://n.example/f.rss")
    assert rejected == []
    assert [a.image_credit for a in articles] == ["Zoë Lens 🦊", "Site Photo Desk", None, None]
    path = tmp_path / "credits.rss"
    path.write_text(doc, encoding="utf-8")
    fetch_all(sessions, [Feed(url=str(path))], NOW)
    with sessions() as session:
        stored = {a.title: a.image_credit for a in session.scalars(select(Article))}
    assert stored == {"T0": "Zoë Lens 🦊", "T1": "Site Photo Desk", "T2": None, "T3": None}


def test_unusable_rss_items_are_rejected_with_a_reason() -> None:
    articles, rejected = parse_feed((FEEDS / "world.rss").read_bytes(), "https://x.example/")
    assert [a.link for a in articles] == [KENYA, MONSOON]
    assert rejected == [
        Rejection("Undated dispatch", "no parseable date"),
        Rejection("Click me", "link is not http(s): javascript:alert(document.cookie)"),
        Rejection("https://news.example.org/world/empty-title", "no title"),
    ]


def test_atom_entries_are_normalized() -> None:
    articles, rejected = parse_feed((FEEDS / "europe.atom").read_bytes(), "https://x.example/e")
    assert rejected == []
    kenya, paris = articles
    assert kenya.link == KENYA
    assert paris.link == PARIS  # "../europe/paris-summit" against the feed's alternate link
    assert paris.guid == "urn:uuid:5d4c3b2a-0000-4000-8000-000000000002"
    assert paris.title == "Paris summit ends"
    assert paris.dek == "Leaders agreed on a text."  # <br> separates words
    assert paris.authors == ["Anne Martin", "Jonas Berg"]
    assert paris.categories == ["Europe"]
    assert paris.image_url == "https://news.example.org/img/paris.png"
    # Only <updated>, with an offset: converted to UTC.
    assert paris.published_at == datetime(2024, 5, 7, 5, 15, tzinfo=UTC)


def test_relative_link_uses_the_feed_url_when_the_channel_has_no_link() -> None:
    article = _parse_one(_item(link="stories/1"), channel_link="")
    assert article.link == "https://news.example.org/stories/1"


@pytest.mark.parametrize(
    ("link", "canonical"),
    [
        (
            "HTTP://News.Example.ORG:80/Path/?b=2&amp;utm_source=x&amp;a=1#top",
            "http://news.example.org/Path/?b=2&a=1",
        ),
        ("https://news.example.org:443", "https://news.example.org/"),
        (
            "https://news.example.org/a?utm_campaign=x&amp;utm_medium=y",
            "https://news.example.org/a",
        ),
        (
            "https://news.example.org/a?q=a%20b&amp;x=%2F",
            "https://news.example.org/a?q=a%20b&x=%2F",
        ),
    ],
)
def test_links_are_canonical(link: str, canonical: str) -> None:
    assert _parse_one(_item(link=link)).link == canonical


@pytest.mark.parametrize(
    ("link", "reason"),
    [
        ("data:text/html,hi", "link is not http(s): data:text/html,hi"),
        ("mailto:desk@example.org", "link is not http(s): mailto:desk@example.org"),
        ("ftp://example.org/x", "link is not http(s): ftp://example.org/x"),
        ("https://:80/x", "link has no host: https://:80/x"),
        ("", "no link"),
    ],
)
def test_non_http_links_are_rejected(link: str, reason: str) -> None:
    articles, rejected = parse_feed(_rss(_item(title="T", link=link)), "https://x.example/f")
    assert articles == []
    assert rejected == [Rejection("T", reason)]


def test_rejected_item_without_title_or_link_is_named_by_position() -> None:
    items = _item() + "<item><description>nothing</description></item>"
    _, rejected = parse_feed(_rss(items), "https://x.example/f")
    assert rejected == [Rejection("item 2", "no link")]


def test_overlong_guid_is_dropped_but_the_article_kept() -> None:
    article = _parse_one(_item(extra=f"<guid isPermaLink='false'>{'g' * 3000}</guid>"))
    assert article.guid is None
    assert _parse_one(_item(extra="<guid isPermaLink='false'> g-1 </guid>")).guid == "g-1"


def test_image_must_be_http_and_relative_images_resolve() -> None:
    media = 'xmlns:media="http://search.yahoo.com/mrss/"'
    extra = (
        '<media:content url="javascript:alert(1)" medium="image"/>'
        '<media:content url="img/a.jpg" type="image/jpeg"/>'
    )
    feed = _rss(_item(extra=extra)).replace(b'version="2.0"', b'version="2.0" ' + media.encode())
    (article,), _ = parse_feed(feed, "https://x.example/f")
    assert article.image_url == "https://news.example.org/img/a.jpg"


def test_authors_from_dc_creator_and_categories_deduplicated() -> None:
    dc = b'version="2.0" xmlns:dc="http://purl.org/dc/elements/1.1/"'
    extra = (
        "<dc:creator>Ann Lee</dc:creator><dc:creator> Bo  Chen </dc:creator>"
        "<category> Asia </category><category>asia</category><category>Trade</category>"
        "<category>  </category>"
    )
    feed = _rss(_item(extra=extra)).replace(b'version="2.0"', dc)
    (article,), _ = parse_feed(feed, "https://x.example/f")
    assert article.authors == ["Ann Lee", "Bo Chen"]
    assert article.categories == ["Asia", "Trade"]


# --- parsing: plain text only ---------------------------------------------------------------


def test_no_markup_scripts_or_line_breaks_survive() -> None:
    nasty = (
        "Double &amp;lt;script&amp;gt;alert(1)&amp;lt;/script&amp;gt; escaped&#13;&#10;"
        "<![CDATA[ <img src=x onerror=alert(2)> <style>p{}</style>]]>&#x8d;line&#x2028;sep"
    )
    description = (
        "<description><![CDATA[<p>One</p>\r\n<script>alert(3)</script><p>Two</p>]]></description>"
    )
    article = _parse_one(_item(title=nasty, extra=description))
    assert article.title == "Double escaped line sep"
    assert article.dek == "One Two"
    for path in (FEEDS / "world.rss", FEEDS / "europe.atom"):
        articles, _ = parse_feed(path.read_bytes(), "https://x.example/f")
        for a in articles:
            for text in (a.title, a.dek, *a.authors, *a.categories):
                assert "<" not in text and ">" not in text
                assert "alert" not in text and "script" not in text
                assert "\r" not in text and "\n" not in text


def test_dek_is_cut_on_a_word_boundary() -> None:
    articles, _ = parse_feed((FEEDS / "world.rss").read_bytes(), "https://x.example/f")
    dek = articles[1].dek
    assert dek.endswith("…")
    assert 250 < len(dek) <= 301
    source = " ".join((FEEDS / "world.rss").read_text().split())
    assert dek[:-1] + " " in source  # ends at a whole word
    assert not articles[0].dek.endswith("…")  # short deks are not cut


def test_dek_without_spaces_is_cut_hard() -> None:
    article = _parse_one(_item(extra=f"<description>{'x' * 1000}</description>"))
    assert article.dek == "x" * 300 + "…"


SAFE_TEXT = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\ufffe\uffff"),
    max_size=200,
).map(lambda s: "".join(c for c in s if c in "\t\n\r" or ord(c) >= 0x20))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(title=SAFE_TEXT, description=SAFE_TEXT)
def test_any_text_comes_out_as_one_line_of_plain_text(title: str, description: str) -> None:
    extra = f"<description>{escape(description)}</description>"
    articles, rejected = parse_feed(_rss(_item(title=escape(title), extra=extra)), "https://x.e/")
    assert len(articles) + len(rejected) == 1
    for article in articles:
        for text in (article.title, article.dek):
            assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in text)
            assert text == text.strip()
            assert "  " not in text
            # What a browser would start a tag or comment with (tag names are ASCII).
            assert not re.search(r"<[A-Za-z!/?]", text)


# --- parsing: not feeds ---------------------------------------------------------------------


def test_malformed_xml_names_the_reason_and_line() -> None:
    with pytest.raises(FeedError) as caught:
        parse_feed((FEEDS / "malformed.xml").read_bytes(), "https://x.example/f")
    assert str(caught.value) == "malformed XML: mismatched tag at line 8"


@pytest.mark.parametrize(
    "head",
    [b"", b'<?xml version="1.0"?>\n', b'\xef\xbb\xbf<?xml version="1.0"?>\n', b"\xef\xbb\xbf"],
)
def test_malformed_line_is_right_with_or_without_a_declaration(head: bytes) -> None:
    body = b'<rss version="2.0">\n<channel>\n<item></chanel>\n</rss>\n'
    line = 3 + head.count(b"\n")
    with pytest.raises(FeedError, match=rf"^malformed XML: mismatched tag at line {line}$"):
        parse_feed(head + body, "https://x.example/f")


def test_html_page_is_not_a_feed() -> None:
    with pytest.raises(FeedError, match=r"^not an RSS or Atom feed$"):
        parse_feed((FEEDS / "page.html").read_bytes(), "https://x.example/")


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"   \n",
        b'{"items": []}',
        b"plain words",
        b"\x00\xff\xfe",
        b"<?xml version='1.0'?><a/>",
    ],
)
def test_other_non_feeds_raise_feed_error(content: bytes) -> None:
    with pytest.raises(FeedError):
        parse_feed(content, "https://x.example/")


def test_many_comments_do_not_stall_the_parser() -> None:
    # A regular expression with nested repetition once took exponential time on this.
    # A watchdog thread rather than a timing assert: a regression hangs for ever.
    outcome: list[str] = []

    def run() -> None:
        try:
            parse_feed(b"<!-- padding -->" * 5000, "https://x.example/")
        except FeedError as exc:
            outcome.append(str(exc))

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert outcome == ["malformed XML: no element found at line 1"]


def test_feed_bytes_are_never_opened_as_a_file_name(tmp_path: Path) -> None:
    # feedparser open()s a bytes argument that names an existing file; we must not.
    secret = tmp_path / "secret.xml"
    secret.write_bytes(_rss(_item()))
    with pytest.raises(FeedError):
        parse_feed(str(secret).encode(), "https://x.example/")


@settings(max_examples=150, deadline=None)
@given(content=st.binary(max_size=300))
def test_arbitrary_bytes_parse_or_raise_feed_error(content: bytes) -> None:
    try:
        parse_feed(content, "https://x.example/")
    except FeedError as exc:
        assert "\n" not in str(exc)


# --- storing ----------------------------------------------------------------------------------


def test_fetch_stores_articles_once_across_feeds(sessions: sessionmaker[Session]) -> None:
    world = Feed(url=str(FEEDS / "world.rss"), name="World")
    europe = Feed(url=str(FEEDS / "europe.atom"))
    report = fetch_all(sessions, [world, europe], NOW)

    assert isinstance(report, FetchReport)
    w, e = report.feeds
    assert (w.feed, w.new, w.updated, w.unchanged, w.error) == ("World", 2, 0, 0, None)
    assert len(w.rejected) == 3
    # The Kenya story comes again under another link spelling and guid: same canonical link.
    assert (e.feed, e.new, e.updated, e.unchanged, e.error) == (europe.url, 1, 0, 1, None)
    assert (report.new, report.updated, report.rejected, report.ok) == (3, 0, 3, True)

    stored = _articles(sessions)
    assert sorted(stored) == sorted([KENYA, MONSOON, PARIS])
    kenya = stored[KENYA]
    assert (kenya.feed, kenya.first_seen_at, kenya.guid) == ("World", NOW, "world-1001")
    assert kenya.published_at == datetime(2024, 5, 6, 8, 0, tzinfo=UTC)
    assert stored[PARIS].feed == europe.url
    assert stored[PARIS].authors == ["Anne Martin", "Jonas Berg"]


def test_same_guid_under_another_link_is_the_same_article(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    first = tmp_path / "first.rss"
    second = tmp_path / "second.rss"
    first.write_bytes(_rss(_item(link="https://news.example.org/a", extra="<guid>g-1</guid>")))
    second.write_bytes(_rss(_item(link="https://news.example.org/b", extra="<guid>g-1</guid>")))
    report = fetch_all(sessions, [Feed(url=str(first)), Feed(url=str(second))], NOW)
    assert [(f.new, f.unchanged) for f in report.feeds] == [(1, 0), (0, 1)]
    assert list(_articles(sessions)) == ["https://news.example.org/a"]


def test_a_second_feed_adds_categories_but_does_not_edit(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    europe = tmp_path / "europe.rss"
    crises = tmp_path / "crises.rss"
    europe.write_bytes(_rss(_item(title="Original", extra="<category>Europe</category>")))
    crises.write_bytes(
        _rss(
            _item(
                title="Other headline",
                extra="<category>Global Crises</category><category>europe</category>",
            )
        )
    )
    feeds = [Feed(url=str(europe), name="europe"), Feed(url=str(crises), name="crises")]
    first = fetch_all(sessions, feeds, NOW)
    assert [(f.new, f.updated) for f in first.feeds] == [(1, 0), (0, 1)]
    (article,) = _articles(sessions).values()
    assert article.title == "Original" and article.feed == "europe"
    assert article.categories == ["Europe", "Global Crises"]
    # Fetching both again changes nothing: no flip-flopping between the feeds' versions.
    again = fetch_all(sessions, feeds, NOW)
    assert [(f.updated, f.unchanged) for f in again.feeds] == [(0, 1), (0, 1)]


def test_an_item_repeated_within_one_feed_is_stored_once(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    path = tmp_path / "twice.rss"
    path.write_bytes(_rss(_item() + _item(link="https://NEWS.example.org/a#again")))
    report = fetch_all(sessions, [Feed(url=str(path))], NOW)
    assert (report.new, report.feeds[0].unchanged) == (1, 1)
    assert list(_articles(sessions)) == ["https://news.example.org/a"]


def test_refetch_counts_unchanged_then_updated(
    sessions: sessionmaker[Session], feed_file: Callable[[str], Path]
) -> None:
    path = feed_file("world.rss")
    feed = Feed(url=str(path), name="World")
    fetch_all(sessions, [feed], NOW)

    again = fetch_all(sessions, [feed], LATER)
    assert (again.new, again.updated, again.feeds[0].unchanged) == (0, 0, 2)

    path.write_text(path.read_text().replace("Monsoon arrives early", "Monsoon arrives very early"))
    changed = fetch_all(sessions, [feed], LATER)
    assert (changed.new, changed.updated, changed.feeds[0].unchanged) == (0, 1, 1)
    monsoon = _articles(sessions)[MONSOON]
    assert monsoon.title == "Monsoon arrives very early in Kerala"
    assert monsoon.first_seen_at == NOW  # an update keeps the first sighting


@pytest.mark.parametrize(
    ("old", "new", "column"),
    [
        ("Kerala three days", "Kerala four days", "dek"),
        ("07 May 2024 06:30:00", "07 May 2024 06:45:00", "published_at"),
        ("<category>Asia</category>", "<category>India</category>", "categories"),
        ("img/monsoon.jpg", "img/monsoon2.jpg", "image_url"),
        ("<author>desk@example.org</author>", "<author>d@x.org (R. Nair)</author>", "authors"),
    ],
)
def test_each_stored_field_counts_as_an_update(
    sessions: sessionmaker[Session],
    feed_file: Callable[[str], Path],
    old: str,
    new: str,
    column: str,
) -> None:
    path = feed_file("world.rss")
    feed = Feed(url=str(path))
    fetch_all(sessions, [feed], NOW)
    before = getattr(_articles(sessions)[MONSOON], column)
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))
    assert fetch_all(sessions, [feed], LATER).updated == 1
    assert getattr(_articles(sessions)[MONSOON], column) != before


def test_one_failing_feed_does_not_stop_the_others(
    sessions: sessionmaker[Session], tmp_path: Path, feed_server: FeedServer
) -> None:
    feeds = [
        Feed(url=str(tmp_path / "missing.rss"), name="missing"),
        Feed(url=str(FEEDS / "malformed.xml"), name="malformed"),
        Feed(url=str(FEEDS / "world.rss"), name="world"),
        Feed(url=str(FEEDS / "page.html"), name="page"),
        Feed(url=feed_server.url("/error"), name="http"),
        Feed(url=str(FEEDS / "europe.atom"), name="europe"),
    ]
    seen: list[FeedReport] = []
    report = fetch_all(sessions, feeds, NOW, progress=seen.append)

    assert seen == report.feeds
    assert [r.feed for r in report.feeds] == [f.label for f in feeds]
    errors = {r.feed: r.error for r in report.feeds}
    assert errors == {
        "missing": f"no such file: {tmp_path / 'missing.rss'}",
        "malformed": "malformed XML: mismatched tag at line 8",
        "world": None,
        "page": "not an RSS or Atom feed",
        "http": "HTTP 500 Internal Server Error",
        "europe": None,
    }
    assert not report.ok
    assert report.new == 3
    assert sorted(_articles(sessions)) == sorted([KENYA, MONSOON, PARIS])
    state = _state(sessions, str(FEEDS / "malformed.xml"))
    assert state is not None
    assert state.last_error == "malformed XML: mismatched tag at line 8"
    assert state.last_fetched_at == NOW


def test_feed_that_recovers_clears_its_error(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    path = tmp_path / "later.rss"
    feed = Feed(url=str(path))
    assert fetch_all(sessions, [feed], NOW).feeds[0].error == f"no such file: {path}"
    path.write_bytes(_rss(_item()))
    assert fetch_all(sessions, [feed], LATER).ok
    state = _state(sessions, str(path))
    assert state is not None and state.last_error is None and state.last_fetched_at == LATER


def test_naive_now_is_refused(sessions: sessionmaker[Session]) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        fetch_all(sessions, [], datetime(2024, 5, 8, 12, 0))


# --- fetching over HTTP ---------------------------------------------------------------------


def test_conditional_get_sends_validators_and_304_changes_nothing(
    sessions: sessionmaker[Session], feed_server: FeedServer
) -> None:
    feed = Feed(url=feed_server.url("/world.rss"), name="World")
    first = fetch_all(sessions, [feed], NOW)
    assert (first.new, first.ok) == (2, True)
    state = _state(sessions, feed.url)
    assert state is not None
    assert (state.etag, state.last_modified) == ('"v1"', "Mon, 06 May 2024 10:00:00 GMT")
    assert "if-none-match" not in feed_server.headers_of("/world.rss")[0]

    second = fetch_all(sessions, [feed], LATER)
    sent = feed_server.headers_of("/world.rss")[1]
    assert sent["if-none-match"] == '"v1"'
    assert sent["if-modified-since"] == "Mon, 06 May 2024 10:00:00 GMT"
    report = second.feeds[0]
    assert report.not_modified
    assert (report.new, report.updated, report.unchanged, report.rejected, report.error) == (
        0,
        0,
        0,
        [],
        None,
    )
    assert sorted(_articles(sessions)) == sorted([KENYA, MONSOON])

    # A changed feed comes back with a new validator, which replaces the stored one.
    feed_server.etag = '"v2"'
    feed_server.body = feed_server.body.replace(b"Monsoon arrives", b"Monsoon comes")
    third = fetch_all(sessions, [feed], LATER)
    assert (third.feeds[0].not_modified, third.updated) == (False, 1)
    state = _state(sessions, feed.url)
    assert state is not None and state.etag == '"v2"'


def test_redirects_are_followed_even_with_a_callers_client(
    sessions: sessionmaker[Session], feed_server: FeedServer
) -> None:
    with httpx.Client() as client:  # httpx does not follow redirects by default
        report = fetch_all(sessions, [Feed(url=feed_server.url("/moved"))], NOW, client=client)
    assert (report.ok, report.new) == (True, 2)


def test_redirect_loop_stops_after_five(
    sessions: sessionmaker[Session], feed_server: FeedServer
) -> None:
    report = fetch_all(sessions, [Feed(url=feed_server.url("/loop"))], NOW)
    assert report.feeds[0].error == "too many redirects (more than 5)"
    assert len(feed_server.headers_of("/loop")) == 6  # the request and five redirects


@pytest.mark.parametrize("path", ["/huge", "/huge-declared"])
def test_bodies_over_10_mb_are_refused(
    sessions: sessionmaker[Session], feed_server: FeedServer, path: str
) -> None:
    report = fetch_all(sessions, [Feed(url=feed_server.url(path))], NOW)
    assert report.feeds[0].error == "feed is larger than 10 MB"


def test_http_html_page_is_a_feed_error(
    sessions: sessionmaker[Session], feed_server: FeedServer
) -> None:
    report = fetch_all(sessions, [Feed(url=feed_server.url("/page.html"))], NOW)
    assert report.feeds[0].error == "not an RSS or Atom feed"


def test_validators_of_an_unusable_body_are_not_kept(
    sessions: sessionmaker[Session], feed_server: FeedServer
) -> None:
    feed = Feed(url=feed_server.url("/malformed.xml"))
    fetch_all(sessions, [feed], NOW)
    again = fetch_all(sessions, [feed], LATER)
    # Keeping the ETag would have turned this into a 304 that hides the broken feed.
    assert again.feeds[0].error == "malformed XML: mismatched tag at line 8"
    assert "if-none-match" not in feed_server.headers_of("/malformed.xml")[1]
    state = _state(sessions, feed.url)
    assert state is not None and state.etag is None


def test_unreachable_server_is_a_feed_error(sessions: sessionmaker[Session]) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    report = fetch_all(sessions, [Feed(url=f"http://127.0.0.1:{port}/feed.xml")], NOW)
    error = report.feeds[0].error
    assert error is not None and error.startswith("cannot connect: ")
    assert "\n" not in error


def test_timeout_is_a_feed_error(sessions: sessionmaker[Session], feed_server: FeedServer) -> None:
    with httpx.Client(timeout=0.2) as client:
        report = fetch_all(sessions, [Feed(url=feed_server.url("/slow"))], NOW, client=client)
    assert report.feeds[0].error == "timed out waiting for the server"


def test_invalid_url_is_a_feed_error(sessions: sessionmaker[Session]) -> None:
    report = fetch_all(sessions, [Feed(url="http://[::1/feed")], NOW)
    error = report.feeds[0].error
    assert error is not None and error.startswith("request failed: ")
