"""Rendering: escaping, one render per edition, safe personalization, clean MIME."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from email import message_from_bytes, policy
from email.header import decode_header, make_header
from email.message import EmailMessage
from typing import Any

import lxml.html
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from digest.config import Config
from digest.render import IssueContext, Recipient, Renderer, one_line
from digest.select import Section


@dataclass
class Art:
    id: int
    title: str
    link: str
    dek: str = ""
    authors: list[str] = field(default_factory=list)
    image_url: str | None = None
    image_credit: str | None = None
    categories: list[str] = field(default_factory=list)
    published_at: datetime = field(default_factory=lambda: datetime(2026, 11, 25, tzinfo=UTC))


EVIL = '<script>alert(1)</script><iframe src="x"></iframe> & "quotes"'


def sections() -> list[Section[Any]]:
    return [
        Section(
            "Europe",
            [
                Art(
                    1,
                    EVIL,
                    "https://news.example.org/a?x=1&y=2",
                    dek="Dek " * 200,
                    authors=["A <b>", "B"],
                    image_url="https://news.example.org/i.jpg",
                )
            ],
        ),
        Section(
            "Also this week",
            [Art(2, ".Leading dot title", "https://news.example.org/b")],
            is_region=False,
        ),
    ]


def parse(raw: bytes) -> EmailMessage:
    msg = message_from_bytes(raw, policy=policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


@pytest.fixture
def renderer(config: Config) -> Renderer:
    return Renderer(config)


def rcpt(**kw: str) -> Recipient:
    base = {
        "email": "r@example.org",
        "name": "Reader",
        "unsubscribe_url": "https://u.example/unsubscribe/T0K",
        "message_id": "<1.2@news.example.org>",
    }
    base.update(kw)
    return Recipient(**base)


def test_feed_text_is_escaped_in_html_and_plain_in_text(renderer: Renderer) -> None:
    msg = parse(
        renderer.edition(IssueContext(date(2026, 11, 27), 1), sections()).personalize(rcpt())
    )
    html = msg.get_body(("html",)).get_content()
    text = msg.get_body(("plain",)).get_content()
    assert "<script>" not in html and "<iframe" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert EVIL in text  # text/plain is not HTML: no entities there
    assert (
        "https://news.example.org/a?x=1&amp;y=2" in html
        and "https://news.example.org/a?x=1&y=2" in text
    )
    # premailer inlined the CSS.
    assert re.search(r"<td[^>]+style=", html)


def test_personal_values_cannot_inject_markup_or_headers(renderer: Renderer) -> None:
    template = renderer.edition(IssueContext(date(2026, 11, 27), 1), sections())
    evil_name = 'Eve\r\nBcc: victim@example.org\r\n\r\n<b onclick="x">hi</b>'
    raw = template.personalize(rcpt(name=evil_name))
    msg = parse(raw)
    assert msg["Bcc"] is None
    assert "victim@example.org" in str(msg["To"])  # still inside the display name, harmless
    assert len(msg.get_all("To")) == 1
    html = msg.get_body(("html",)).get_content()
    assert "<b onclick" not in html and "&lt;b onclick=&quot;x&quot;&gt;" in html
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert b"\r\nBcc:" not in head


def test_mime_structure_and_line_lengths(renderer: Renderer) -> None:
    raw = renderer.edition(IssueContext(date(2026, 11, 27), 1), sections()).personalize(
        rcpt(unsubscribe_url="https://u.example/unsubscribe/" + "x" * 300, name="Ünïcödé " * 20)
    )
    msg = parse(raw)
    assert msg.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in msg.iter_parts()] == ["text/plain", "text/html"]
    for part in msg.iter_parts():
        assert part["Content-Transfer-Encoding"] == "quoted-printable"
        assert part.get_content_charset() == "utf-8"
    lines = raw.split(b"\r\n")
    assert max(len(line) for line in lines) <= 998
    body = raw.split(b"\r\n\r\n", 1)[1]
    assert max(len(line) for line in body.split(b"\r\n")) <= 76  # quoted-printable's own limit
    assert b"\n" not in raw.replace(b"\r\n", b"")  # no bare LF anywhere
    assert "x" * 300 in msg.get_body(("html",)).get_content()
    assert msg["MIME-Version"] == "1.0"
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert msg["List-Id"] == "The Weekly Round-up <the-weekly-round-up.news.example.org>"
    assert msg["Date"] is not None


def test_non_ascii_subject_is_encoded_and_one_line(config: Config) -> None:
    renderer = Renderer(
        config.model_copy(
            update={
                "newsletter": config.newsletter.model_copy(
                    update={"subject": "Tour d’horizon — {{ lead.title }}"}
                )
            }
        )
    )
    secs = [Section("Europe", [Art(1, "Zürich\r\nBcc: x@y.z talks", "https://n.example/a")])]
    template = renderer.edition(IssueContext(date(2026, 11, 27), 1), secs)
    raw = template.personalize(rcpt())
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert head.isascii()
    assert b"=?utf-8?" in head
    msg = parse(raw)
    assert msg["Subject"] == "Tour d’horizon — Zürich Bcc: x@y.z talks"
    assert msg["Bcc"] is None


@dataclass
class CountingRenderer(Renderer):
    """A real Renderer that counts its (expensive) premailer runs."""

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.html_renders = 0

    def render_html(self, ctx: dict[str, Any]) -> str:
        self.html_renders += 1
        return super().render_html(ctx)


def test_one_premailer_run_per_edition_whatever_the_subscriber_count(config: Config) -> None:
    renderer = CountingRenderer(config)
    template = renderer.edition(IssueContext(date(2026, 11, 27), 1), sections())
    bodies = {
        template.personalize(
            rcpt(
                name=f"Reader {i}",
                email=f"r{i}@example.org",
                unsubscribe_url=f"https://u.example/unsubscribe/{i}",
            )
        )
        for i in range(50)
    }
    assert renderer.html_renders == 1
    assert len(bodies) == 50
    for i, raw in enumerate(
        sorted(bodies, key=lambda b: int(re.search(rb"unsubscribe/(\d+)", b).group(1)))
    ):
        html = parse(raw).get_body(("html",)).get_content()
        assert f"Reader {i}," in html and f'https://u.example/unsubscribe/{i}"' in html


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    name=st.text(max_size=80),
    title=st.text(
        alphabet=st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=120
    ).filter(lambda t: t.strip()),
)
def test_arbitrary_names_and_titles_never_break_the_message(
    config: Config, name: str, title: str
) -> None:
    renderer = Renderer(config)
    secs = [Section("Europe", [Art(1, title, "https://n.example/a", dek=title)])]
    raw = renderer.edition(IssueContext(date(2026, 11, 27), 1), secs).personalize(rcpt(name=name))
    head, _ = raw.split(b"\r\n\r\n", 1)
    names = [
        line.split(b":", 1)[0] for line in head.split(b"\r\n") if line and line[:1] not in b" \t"
    ]
    assert sorted(names) == sorted(
        [
            b"From",
            b"Subject",
            b"MIME-Version",
            b"List-Id",
            b"List-Unsubscribe-Post",
            b"Content-Type",
            b"Date",
            b"To",
            b"Message-ID",
            b"List-Unsubscribe",
        ]
    )
    html = parse(raw).get_body(("html",)).get_content()
    doc = lxml.html.fromstring(html)
    # The title came out as text, not as elements: the headline link reads exactly as the
    # title (but for the zero-width break opportunities of digest/wrap.py in long words).
    headlines = [" ".join(a.text_content().replace("\u200b", "").split()) for a in doc.iter("a")]
    assert " ".join(title.replace("\u200b", "").split()) in headlines
    assert not list(doc.iter("script", "iframe", "object", "embed"))


def test_mailto_unsubscribe_and_reply_to_when_configured(config: Config) -> None:
    cfg = config.model_copy(
        update={
            "unsubscribe": config.unsubscribe.model_copy(
                update={"mailto": "leave@news.example.org"}
            ),
            "newsletter": config.newsletter.model_copy(
                update={"reply_to": "Desk <desk@news.example.org>"}
            ),
        }
    )
    raw = Renderer(cfg).edition(IssueContext(date(2026, 11, 27), 1), sections()).personalize(rcpt())
    assert_line_limits(raw)  # List-Unsubscribe folds before its mailto: form
    msg = parse(raw)
    assert msg["List-Unsubscribe"] == (
        "<https://u.example/unsubscribe/T0K>, <mailto:leave@news.example.org?subject=unsubscribe>"
    )
    assert msg["Reply-To"] == "Desk <desk@news.example.org>"
    assert msg["From"] == "The Test Desk <roundup@news.example.org>"
    text = msg.get_body(("plain",)).get_content()
    html = msg.get_body(("html",)).get_content()
    # The footer: why, postal address, visible unsubscribe link, in both parts.
    for body in (text, html):
        assert "1 Test Street, Testville" in body
        assert "You are receiving this because you subscribed to The Weekly Round-up" in body
        assert "https://u.example/unsubscribe/T0K" in body


def header_lines(raw: bytes) -> list[bytes]:
    return raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")


def could_fold(line: bytes) -> bool:
    """Whether a header line holds white space it could have been folded at."""
    body = line.lstrip(b" \t") if line[:1] in b" \t" else line.split(b":", 1)[1].lstrip(b" ")
    return b" " in body or b"\t" in body


def assert_line_limits(raw: bytes) -> None:
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    for line in header_lines(raw):
        assert len(line) <= 78 or not could_fold(line), line


def decoded_display_name(raw: bytes) -> str:
    """The To: display name as an RFC 2047 decoder reads it (adjacent encoded-words joined,
    as mail clients do; Python's address parser keeps the space between them)."""
    head = raw.split(b"\r\n\r\n", 1)[0].decode("ascii")
    value = re.search(r"^To: (.*?)\r\n(?! )", head, re.M | re.S).group(1)
    phrase = re.sub(r"\r\n ", " ", value).rsplit(" <", 1)[0]
    return str(make_header(decode_header(phrase)))


@pytest.mark.parametrize(
    "name",
    [
        "𝔘" * 200,  # 800 octets of 4-byte characters: one unfolded line was 1,100
        "🦊 Renard " * 20,
        "Ünïcödé " * 25,
        "Ada Lovelace and Charles Babbage of the Analytical Engine Society " * 3,
        "A" * 200,
        "Tour d’horizon — 東京 の ニュース " * 8,
    ],
)
def test_long_names_are_folded_and_every_header_line_fits(renderer: Renderer, name: str) -> None:
    raw = renderer.edition(IssueContext(date(2026, 11, 27), 1), sections()).personalize(
        rcpt(name=name, email="long.name@example.org")
    )
    assert_line_limits(raw)
    name = " ".join(name.split())
    assert decoded_display_name(raw) == name
    msg = parse(raw)
    assert [a.addr_spec for a in msg["To"].addresses] == ["long.name@example.org"]
    # The body greets them by the full name too.
    assert f"Hello {name}," in msg.get_body(("plain",)).get_content()


@pytest.mark.parametrize(
    "name", ["=?utf-8?q?Admin?=", "Re =?UTF-8?B?SGk=?= there", "x=?y", "Émile Zola"]
)
def test_a_name_that_looks_encoded_is_encoded_and_round_trips(
    renderer: Renderer, name: str
) -> None:
    raw = renderer.edition(IssueContext(date(2026, 11, 27), 1), sections()).personalize(
        rcpt(name=name)
    )
    to = parse(raw)["To"]
    assert to.addresses[0].display_name == name  # Python's own address parser
    assert to.addresses[0].addr_spec == "r@example.org"
    assert decoded_display_name(raw) == name
    if "=?" in name:  # never in the header as written: a client would decode it
        assert name.encode() not in raw.split(b"\r\n\r\n", 1)[0]


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    name=st.text(
        alphabet=st.sampled_from(list("ab Z=?é𝔘🦊東 ")) | st.characters(codec="utf-8"),
        max_size=200,
    )
)
def test_any_name_keeps_headers_within_limits_and_decodes_back(
    renderer: Renderer, name: str
) -> None:
    template = renderer.edition(IssueContext(date(2026, 11, 27), 1), sections())
    raw = template.personalize(rcpt(name=name))
    assert_line_limits(raw)
    msg = parse(raw)
    assert len(msg.get_all("To")) == 1
    assert [a.addr_spec for a in msg["To"].addresses] == ["r@example.org"]
    cleaned = one_line(name)
    if cleaned and not re.search(r'[()<>\[\]:;@\\,."]', cleaned):
        assert decoded_display_name(raw) == cleaned


@pytest.mark.parametrize("custom", [True, False])
def test_the_subject_is_text_not_html(config: Config, custom: bool) -> None:
    title = 'Rock & Roll\'s <Big> "Night" 🦊'
    newsletter = config.newsletter.model_copy(
        update={"subject": "{{ newsletter.title }}: {{ lead.title }}" if custom else None}
    )
    renderer = Renderer(config.model_copy(update={"newsletter": newsletter}))
    secs = [Section("Europe", [Art(1, title, "https://n.example/a")])]
    template = renderer.edition(IssueContext(date(2026, 11, 27), 1), secs)
    assert title in template.subject and "&amp;" not in template.subject
    msg = parse(template.personalize(rcpt()))
    assert title in msg["Subject"]
    # The HTML body still escapes the same title.
    assert "Rock &amp; Roll" in msg.get_body(("html",)).get_content()
