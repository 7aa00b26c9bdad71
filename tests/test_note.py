"""The editor's note: Markdown in, sanitized HTML and plain text out, whatever is typed."""

from __future__ import annotations

import re

import lxml.html
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from digest.errors import UsageError
from digest.note import MAX_NOTE_CHARS, check_note, render_note
from digest.wrap import ZWSP

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
    assert html.replace(ZWSP, "") == (
        '<p class="fg" style="margin:0">Hello <em>world</em> &amp; <strong>friends</strong> '
        "<code>x&lt;y&gt;</code><br>\nsecond line</p>\n"
        '<p class="fg" style="margin:0"><a class="link" style="color:#00f" '
        'href="https://n.example/a?b=1&amp;c=2">Read</a> or <a class="link" style="color:#00f" '
        'href="mailto:ed@n.example">write</a>; <a class="link" style="color:#00f" '
        'href="https://n.example/auto">https://n.example/auto</a> # not a heading\n'
        "- not a list</p>\n"
    )
    assert note.text == (
        "Hello world & friends x<y>\nsecond line\n\n"
        "Read (https://n.example/a?b=1&c=2) or write (ed@n.example); "
        "https://n.example/auto # not a heading\n- not a list"
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


# --- a reviewer's edge cases ------------------------------------------------------------

JS_DISGUISES = [
    "[a](javascript:alert(1))",
    "[a](JaVaScRiPt:alert(1))",
    "[a]( javascript:alert(1) )",
    "[a](<javascript:alert(1)>)",
    "[a](&#106;avascript:alert(1))",
    "[a](&#x6A;avascript:alert(1))",
    "[a](javascript&colon;alert(1))",
    "[a](jav&#x09;ascript:alert(1))",
    "[a](jav&#9;ascript:alert(1))",
    "[a](%6Aavascript:alert(1))",
    "[a](java%0Ascript:alert(1))",
    "[a](\u200bjavascript:alert(1))",
    "[a](java\u0000script:alert(1))",
    "[a](java\nscript:alert(1))",
    "[a](java script:alert(1))",
    "[a][r]\n\n[r]: javascript:alert(1)",
    "[a][r]\n\n[r]: <javascript:alert(1)>",
    "<javascript:alert(1)>",
    "<JAVASCRIPT:alert(1)>",
    "![a](javascript:alert(1))",
    "[![a](https://n.example/i.png)](javascript:alert(1))",
    "[a](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==)",
    "[a](DATA:text/html,<script>alert(1)</script>)",
    "<data:text/html,alert(1)>",
    "[a](vbscript:msgbox(1))",
    "[a](//evil.example/x)",
    "[a](https:javascript:alert(1))",
    '[a](https://n.example/"onclick="alert(1))',
    "[a](https://n.example/ 'x\" onmouseover=\"alert(1)')",
]


@pytest.mark.parametrize("source", JS_DISGUISES)
def test_no_javascript_or_data_link_in_any_disguise(source: str) -> None:
    note = render_note(check_note(source.replace("\u0000", "")))
    html = str(note.html(p_style="s", link_style="l"))
    for e in elements(html) if html.strip() else []:
        assert e.tag in ALLOWED, html
        assert not [k for k in e.attrib if k.startswith("on") or k == "title"], html
        if e.tag == "a":
            assert set(e.attrib) == {"href", "style"}, html
            assert e.get("href", "").startswith(("https://", "http://", "mailto:")), html
    low = html.lower()
    assert "<img" not in low and "<script" not in low
    # The text part never offers a dangerous target as "text (url)".
    assert not re.search(r"\(\s*(javascript|vbscript|data):", note.text, re.I), note.text


def test_images_become_links_to_the_picture() -> None:
    """A note carries no pictures (unsized, uncredited, maybe a third party's tracking
    pixel): ``![alt](url)`` is a link to the picture with the alt text, no stray "!"."""
    note = render_note(
        'See ![the map](https://n.example/map.png "Map") and ![](https://n.example/i.png).'
    )
    assert note.html().replace(ZWSP, "") == (
        '<p>See <a href="https://n.example/map.png">the map</a> and '
        '<a href="https://n.example/i.png">https://n.example/i.png</a>.</p>\n'
    )
    assert note.text == ("See the map (https://n.example/map.png) and https://n.example/i.png.")


def test_reference_links_and_autolinks_are_links() -> None:
    note = render_note(
        "Read [the report][r] or <https://n.example/auto>, mail <desk@n.example>.\n\n"
        '[r]: https://n.example/report "The report"'
    )
    assert note.html().replace(ZWSP, "") == (
        '<p>Read <a href="https://n.example/report">the report</a> or '
        '<a href="https://n.example/auto">https://n.example/auto</a>, mail '
        '<a href="mailto:desk@n.example">desk@n.example</a>.</p>\n'
    )
    assert note.text == (
        "Read the report (https://n.example/report) or https://n.example/auto, mail desk@n.example."
    )


def test_nested_emphasis_entities_and_4_byte_characters() -> None:
    note = render_note("***both*** *a **b** c* &amp; &lt;b&gt; &copy; &#128030; 𝔘🦊 `<i>`")
    assert note.html() == (
        "<p><em><strong>both</strong></em> <em>a <strong>b</strong> c</em> &amp; "
        "&lt;b&gt; © 🐞 𝔘🦊 <code>&lt;i&gt;</code></p>\n"
    )
    assert note.text == "both a b c & <b> © 🐞 𝔘🦊 <i>"


def test_a_link_the_sanitizer_would_drop_is_no_link_in_either_part() -> None:
    """nh3 drops an href it cannot parse (a space or a bidi control in the host); the
    text part must then not offer that URL either."""
    for source in ("[z](<https://ex ample.org/>)", "[z](https://exa\u202emple.org/)"):
        note = render_note(source)
        assert note.html() == "<p>z</p>\n", source
        assert note.text == "z", source


def test_control_characters_are_refused_naming_where() -> None:
    assert check_note("tab\there\nline") == "tab\there\nline"
    for char in ("\x00", "\x1b", "\x0b", "\x0c", "\x7f", "\x85"):
        with pytest.raises(UsageError) as err:
            check_note(f"first line\nab{char}c")
        assert str(err.value) == (
            f"the note has a control character (U+{ord(char):04X}) at line 2, column 3: remove it"
        )


def test_long_words_get_break_opportunities_in_html_only() -> None:
    url = "https://news.example.org/" + "a" * 120
    note = render_note(f"{'w' * 100} [{url}]({url})")
    html = str(note.html())
    assert f'href="{url}"' in html  # the link itself is whole
    visible = re.sub(r"<[^>]+>", " ", html)
    assert max(len(w) for w in visible.split()) > 20  # (the words are still there…)
    assert max(len(w) for part in visible.split() for w in part.split("\u200b")) <= 20
    assert note.text == f"{'w' * 100} {url}"  # the text part is untouched
