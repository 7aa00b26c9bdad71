"""The editor's note: Markdown in, sanitized HTML and plain text out, whatever is typed."""

from __future__ import annotations

import lxml.html
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from digest.errors import UsageError
from digest.note import MAX_NOTE_CHARS, check_note, render_note

ALLOWED = {"p", "em", "strong", "code", "br", "a"}


def elements(html: str) -> list[lxml.html.HtmlElement]:
    return list(lxml.html.fragment_fromstring(html, create_parent="div").iter())[1:]


def test_markdown_subset_to_html_and_text() -> None:
    note = render_note(
        check_note(
            "Hello *world* & **friends** `x<y>`  \nsecond line\n\n"
            "[Read](https://n.example/a?b=1&c=2) or [write](mailto:ed@n.example); "
            "<https://n.example/auto> # not a heading\n- not a list"
        )
    )
    html = note.html(p_style="margin:0", link_style="color:#00f", p_class="fg", a_class="link")
    assert html == (
        '<p class="fg" style="margin:0">Hello <em>world</em> &amp; <strong>friends</strong> '
        "<code>x&lt;y&gt;</code><br>\nsecond line</p>\n"
        '<p class="fg" style="margin:0"><a class="link" style="color:#00f" '
        'href="https://n.example/a?b=1&amp;c=2">Read</a> or <a class="link" style="color:#00f" '
        'href="mailto:ed@n.example">write</a>; &lt;https://n.example/auto&gt; # not a heading\n'
        "- not a list</p>\n"
    )
    assert note.text == (
        "Hello world & friends x<y>\nsecond line\n\n"
        "Read (https://n.example/a?b=1&c=2) or write (ed@n.example); "
        "<https://n.example/auto> # not a heading\n- not a list"
    )


def test_a_link_whose_text_is_its_address_is_not_repeated_in_text() -> None:
    assert render_note("[https://n.example/](https://n.example/)").text == "https://n.example/"


def test_length_limit_and_normalization() -> None:
    assert check_note("  \r\nA\r\nB\r  ") == "A\nB"
    assert check_note("x" * MAX_NOTE_CHARS) == "x" * MAX_NOTE_CHARS
    with pytest.raises(UsageError, match="the note is 5,001 characters; at most 5,000"):
        check_note("x" * (MAX_NOTE_CHARS + 1))


PIECES = [*"ab <>&\"'=/:()[]*_`!#\\\n", "javascript:", "data:", "https://x.y/", "<a href="]
markdownish = st.lists(st.sampled_from(PIECES), max_size=60).map("".join)


@settings(max_examples=300, deadline=None)
@given(source=markdownish)
def test_whatever_is_typed_only_allowed_tags_and_links_come_out(source: str) -> None:
    html = render_note(check_note(source)).html(p_style="s", link_style="l")
    for e in elements(html) if html.strip() else []:
        assert e.tag in ALLOWED, html
        allowed_attrs = (
            {"style", "href"} if e.tag == "a" else ({"style"} if e.tag == "p" else set())
        )
        assert set(e.attrib) <= allowed_attrs, html
        if e.tag == "a":
            assert e.get("href", "").startswith(("https://", "http://", "mailto:")), html
