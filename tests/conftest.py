"""Shared fixtures: real SQLite files, a real SMTP server (aiosmtpd) on loopback, feed files."""

from __future__ import annotations

import socket
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import pytest
from aiosmtpd.controller import Controller

from digest import pipeline
from digest.config import Config, load_config

REGIONS = ["Asia-Pacific", "Europe", "Middle East", "Global Crises"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    peer: tuple[str, int] = ("", 0)

    @property
    def message(self) -> EmailMessage:
        msg = message_from_bytes(self.data, policy=policy.default)
        assert isinstance(msg, EmailMessage)
        return msg


@dataclass
class Recorder:
    """An aiosmtpd handler that records messages and injects faults on request.

    ``rcpt_replies`` maps an address to a reply for RCPT (e.g. "550 5.1.1 no such user");
    ``data_replies`` is a list of replies used (and consumed) for successive DATA commands
    before accepting normally; ``mail_reply``, when set, answers every MAIL FROM.
    """

    messages: list[Received] = field(default_factory=list)
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    rcpt_once: dict[str, str] = field(default_factory=dict)  # replied once, then accepted
    data_replies: list[str] = field(default_factory=list)
    mail_reply: str = ""

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        if self.mail_reply:
            return self.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        reply = self.rcpt_replies.get(address) or self.rcpt_once.pop(address, None)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.data_replies:
            return self.data_replies.pop(0)
        self.messages.append(
            Received(
                envelope.mail_from,
                list(envelope.rcpt_tos),
                envelope.original_content,
                tuple(session.peer),
            )
        )
        return "250 2.0.0 Message accepted"

    def to(self, addr: str) -> list[Received]:
        return [m for m in self.messages if addr in m.rcpt_tos]


@pytest.fixture
def smtp_server() -> Iterator[tuple[Controller, Recorder]]:
    """A real SMTP server on 127.0.0.1 recording what it receives."""
    handler = Recorder()
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        yield controller, handler
    finally:
        controller.stop()


def rss(items: list[dict[str, Any]], site: str = "https://news.example.org/") -> str:
    """A small RSS 2.0 document from item dicts (title, link, published, categories, …)."""
    out = []
    for it in items:
        cats = "".join(f"<category>{escape(c)}</category>" for c in it.get("categories", []))
        pub = it["published"].strftime("%a, %d %b %Y %H:%M:%S +0000") if it.get("published") else ""
        credit = (
            f'<media:credit role="photographer">{escape(it["credit"])}</media:credit>'
            if it.get("credit")
            else ""
        )
        image = (
            f'<media:content url="{escape(it["image"])}" medium="image" type="image/jpeg">'
            f"{credit}</media:content>"
            if it.get("image")
            else ""
        )
        out.append(
            f"<item><title>{escape(it['title'])}</title><link>{escape(it['link'])}</link>"
            f'<guid isPermaLink="false">{escape(it.get("guid", it["link"]))}</guid>'
            + (f"<pubDate>{pub}</pubDate>" if pub else "")
            + cats
            + f"<description>{escape(it.get('dek', ''))}</description>"
            + "".join(f"<dc:creator>{escape(a)}</dc:creator>" for a in it.get("authors", []))
            + image
            + "</item>"
        )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<rss version="2.0" xmlns:media="http://search.yahoo.com/mrss/" '
        'xmlns:dc="http://purl.org/dc/elements/1.1/"><channel>'
        f"<title>Test</title><link>{site}</link><description>t</description>"
        + "".join(out)
        + "</channel></rss>"
    )


EDITION = datetime(2026, 11, 27, 12, tzinfo=UTC)


def week_items() -> list[dict[str, Any]]:
    """Articles of the week ending 2026-11-27 (New York), two per region plus extras."""
    base = EDITION
    items = []
    for i, region in enumerate([*REGIONS, "Sport"]):
        for j in range(2):
            n = i * 2 + j
            items.append(
                {
                    "title": f"{region} story {j}",
                    "link": f"/{region.lower().replace(' ', '-')}/{j}",
                    "published": base - timedelta(hours=5 * n + 1),
                    "categories": [region],
                    "dek": f"<p>What happened in {region}, part {j}.</p>",
                    "authors": [f"Author {n}"],
                    "image": f"https://news.example.org/img/{n}.jpg" if j == 0 else None,
                }
            )
    return items


def write_config(
    tmp_path: Path,
    port: int = 2525,
    extra: str = "",
    feeds: list[str] | None = None,
    smtp_extra: str = "",
) -> Path:
    feeds = feeds if feeds is not None else ["feed.xml"]
    feed_lines = "".join(f'\n[[feeds]]\nurl = "{f}"\n' for f in feeds)
    text = (
        textwrap.dedent(
            f"""
        [publication]
        name = "The Test Desk"
        url = "https://news.example.org"
        postal_address = "1 Test Street, Testville"

        [newsletter]
        title = "The Weekly Round-up"
        sender = "The Test Desk <roundup@news.example.org>"
        regions = {REGIONS!r}

        [database]
        url = "sqlite:///digest.db"

        [smtp]
        host = "127.0.0.1"
        port = {port}
        concurrency = 3
        timeout_seconds = 5
        retry_base_seconds = 0.01
        {smtp_extra}

        [schedule]
        timezone = "America/New_York"

        [unsubscribe]
        base_url = "https://news.example.org/u"
        secret = "test-secret-0123456789abcdef"
        """
        )
        .replace("regions = [", "regions = [")
        .replace("'", '"')
    )
    path = tmp_path / "config.toml"
    path.write_text(text + feed_lines + extra, encoding="utf-8")
    return path


@pytest.fixture
def feed_file(tmp_path: Path) -> Path:
    """The week's feed as a file beside the config."""
    path = tmp_path / "feed.xml"
    path.write_text(rss(week_items()), encoding="utf-8")
    return path


@pytest.fixture
def config_path(tmp_path: Path, feed_file: Path, smtp_server: tuple[Controller, Recorder]) -> Path:
    """A config pointing at the feed file, a SQLite file and the test SMTP server."""
    return write_config(tmp_path, port=smtp_server[0].port)


@pytest.fixture
def config(config_path: Path) -> Config:
    return load_config(config_path)


@pytest.fixture
def app(config: Config) -> Iterator[pipeline.App]:
    """An initialised database with the week's articles fetched."""
    pipeline.init_db(config)
    the_app = pipeline.open_app(config)
    report = pipeline.fetch(the_app)
    assert report.ok and report.new == 10
    yield the_app
    the_app.engine.dispose()
