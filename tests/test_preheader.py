"""The example round-up's preheader: the inbox preview line, hidden in the body without
text painted in the background colour (SpamAssassin's HTML_FONT_LOW_CONTRAST)."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import lxml.html
import pytest

from digest import pipeline
from digest.config import load_config
from tests.webutil import CHROMIUM, chromium

ROOT = Path(__file__).parent.parent


@pytest.fixture
def example_html(tmp_path: Path) -> str:
    """The HTML part of the example config's round-up for 2026-11-27."""
    shutil.copy(ROOT / "config.example.toml", tmp_path)
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    config = load_config(tmp_path / "config.example.toml")
    pipeline.init_db(config)
    app = pipeline.open_app(config)
    try:
        assert pipeline.fetch(app).ok
        return pipeline.preview(app, date(2026, 11, 27), None, "html").decode("utf-8")
    finally:
        app.engine.dispose()


def _rgb(value: str) -> tuple[int, int, int] | None:
    m = re.fullmatch(r"#([0-9a-f]{3}|[0-9a-f]{6})", value.strip().lower())
    if not m:
        return None
    h = m.group(1)
    h = "".join(c * 2 for c in h) if len(h) == 3 else h
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)


def _styles(el: lxml.html.HtmlElement) -> dict[str, str]:
    out = {}
    for decl in (el.get("style") or "").split(";"):
        if ":" in decl:
            k, v = decl.split(":", 1)
            out[k.strip().lower()] = v.strip().lower().removesuffix("!important").strip()
    return out


def low_contrast_texts(html: str) -> Iterator[str]:
    """Text SpamAssassin would call near-invisible: its HTML.pm rule, applied to inline
    colours (text colour against the nearest background, brightness-weighted distance < 12)."""
    root = lxml.html.document_fromstring(html)

    def walk(
        el: lxml.html.HtmlElement, fg: tuple[int, int, int], bg: tuple[int, int, int]
    ) -> Iterator[str]:
        if not isinstance(el.tag, str) or el.tag in ("head", "style", "script", "title"):
            return
        st = _styles(el)
        bg = _rgb(el.get("bgcolor") or "") or _rgb(st.get("background-color", "")) or bg
        fg = _rgb(st.get("color", "")) or fg
        dr, dg, db = (a - b for a, b in zip(fg, bg, strict=True))
        faint = ((0.2126 * dr) ** 2 + (0.7152 * dg) ** 2 + (0.0722 * db) ** 2) ** 0.5 < 12
        if faint and (el.text or "").strip():
            yield el.text.strip()
        for child in el:
            yield from walk(child, fg, bg)
            if faint and (child.tail or "").strip():
                yield child.tail.strip()

    yield from walk(root, (0, 0, 0), (255, 255, 255))


def test_no_text_is_painted_in_its_background_colour(example_html: str) -> None:
    assert list(low_contrast_texts(example_html)) == []
    # The check itself sees the old trick: the preheader in the page's background colour.
    preheader = re.search(r'<div style="(font-size:0;[^"]*)"', example_html)
    assert preheader is not None
    painted = re.sub(r"color:[^;]*;", "", preheader.group(1)) + "color:#f3f2ee;"
    old = example_html.replace(preheader.group(1), painted, 1)
    (hidden,) = low_contrast_texts(old)
    assert hidden.startswith("Japan and South Korea open talks")


def test_the_preheader_leads_the_text_and_takes_no_room(example_html: str) -> None:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed: cannot check the rendered layout")
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 800, "height": 1200})
        page.set_content(example_html)
        # Mail clients build the preview from the first text: that is the preheader.
        first = page.evaluate("document.body.innerText.trimStart().slice(0, 40)")
        assert first.startswith("Japan and South Korea open talks")
        box = page.locator("body > div").first.bounding_box()
        assert box is not None and box["height"] == 0
        # Its text is drawn nowhere: the glyphs themselves take no area.
        ink = page.evaluate(
            """() => { const r = document.createRange();
               r.selectNodeContents(document.querySelector('body > div'));
               const b = r.getBoundingClientRect(); return [b.width, b.height]; }"""
        )
        assert ink == [0, 0]
        # The page's layout starts where the preheader is: it pushes nothing down.
        after = page.locator("body > div + table").first.bounding_box()
        assert after is not None and after["y"] == box["y"]
