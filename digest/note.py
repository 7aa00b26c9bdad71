"""The editor's note: a little Markdown, rendered to safe email HTML and to plain text.

An editor writes paragraphs, *emphasis*, **strong** and links (``[text](https://…)``,
``[text][ref]`` with its ``[ref]: https://…`` line, ``<https://…>``); nothing else is
Markdown here (no headings, lists, quotes or tables: they come out as typed). A picture
(``![alt](url)``) becomes a link to it, its alt text the link's: a note carries no
pictures (unsized, uncredited, and a third party's tracking pixel as likely as not).
Two independent guards keep the HTML harmless whatever is typed:

1. markdown-it-py with raw HTML off (``<script>`` comes out as text, escaped) and only the
   paragraph, emphasis, link, image, autolink, reference, escape, entity, code-span and
   line-break rules enabled. A link whose target is not ``http(s)://`` or ``mailto:``
   (``javascript:``, ``data:``, relative paths, which mean nothing in a mailbox), or
   that nh3 would not keep, loses its link and keeps its text, in both parts.
2. nh3 (ammonia) cleans the result with an allowlist of ``p em strong code br a[href]``
   (no other attribute, not even a link's title) and the same three URL schemes, so a
   bug in step 1 still cannot reach the reader.

The plain-text part is rendered from the same tokens: links as ``text (url)``. In the
HTML part, overlong words get zero-width break opportunities (see :mod:`digest.wrap`).
"""

from __future__ import annotations

import html as html_lib
import re
from dataclasses import dataclass
from functools import cache

import nh3
from markdown_it import MarkdownIt
from markdown_it.token import Token
from markupsafe import Markup

from digest.errors import UsageError
from digest.wrap import breakable

# About 800 words: a note opens a round-up, it is not an article. It also keeps the
# message well under Gmail's 102 KB clipping point with the sections after it.
MAX_NOTE_CHARS = 5000

_SAFE_LINK = re.compile(r"^(?:https?://[^\s/?#]+|mailto:[^\s@]+@[^\s@]+)", re.IGNORECASE)
_TAGS = {"p", "em", "strong", "code", "br", "a"}
_SCHEMES = {"http", "https", "mailto"}
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # all but tab and line feed


@cache
def _markdown() -> MarkdownIt:
    md = MarkdownIt("zero", {"html": False, "breaks": False}).enable(
        [
            "emphasis",
            "link",
            "image",
            "autolink",
            "reference",
            "escape",
            "entity",
            "newline",
            "backticks",
        ]
    )
    # Parse every link, then decide in _unlink: markdown-it's own check leaves a refused
    # link as its Markdown source ("[x](javascript:…)"), while the reader should see "x".
    md.validateLink = lambda url: True  # type: ignore[method-assign]
    return md


def check_note(text: str) -> str:
    """The note as it will be stored; :class:`UsageError` when it is too long.

    Line ends are normalized and surrounding blank space dropped; an empty note is "".
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n").strip()
    if len(text) > MAX_NOTE_CHARS:
        raise UsageError(
            f"the note is {len(text):,} characters; at most {MAX_NOTE_CHARS:,} are allowed "
            "(about 800 words): shorten it"
        )
    # A NUL cannot even be stored in PostgreSQL; the others would reach readers' text part.
    control = _CONTROL.search(text)
    if control is not None:
        at = control.start()
        line = text.count("\n", 0, at) + 1
        column = at - (text.rfind("\n", 0, at) + 1) + 1
        raise UsageError(
            f"the note has a control character (U+{ord(control.group()):04X}) at line "
            f"{line}, column {column}: remove it"
        )
    return text


def _clean(html: str) -> str:
    return nh3.clean(
        html,
        tags=_TAGS,
        # "*": no attribute on every tag (ammonia's default allows lang and title).
        attributes={"a": {"href"}, "*": set()},
        url_schemes=_SCHEMES,
        link_rel=None,
    )


def _safe(href: str) -> bool:
    """An http(s) or mailto link that nh3 keeps too (it drops one it cannot parse, e.g.
    with a space or a bidi control in the host): then both parts agree on every link."""
    if not _SAFE_LINK.match(href):
        return False
    return "href=" in _clean(f'<a href="{html_lib.escape(href)}">x</a>')


def _picture_link(tok: Token, in_link: bool) -> list[Token]:
    """An image as a link to the picture, its alt text (or the address) the link's text;
    inside a link, only its alt text (a link cannot hold another)."""
    src = str(tok.attrs.get("src", ""))
    inner = tok.children or []
    if not "".join(c.content for c in inner).strip():
        inner = [Token("text", "", 0, content=src)]
    if in_link:
        return inner
    return [Token("link_open", "a", 1, attrs={"href": src}), *inner, Token("link_close", "a", -1)]


def _unlink(tokens: list[Token]) -> list[Token]:
    """Turn images into links, then drop the link tokens (keeping the text inside) of
    every link that is not safe."""
    out: list[Token] = []
    kept: list[bool] = []  # per open link: was it kept?
    for tok in tokens:
        if tok.children:
            tok.children = _unlink(tok.children)
        if tok.type == "image":
            out.extend(_unlink(_picture_link(tok, in_link=bool(kept))))
            continue
        if tok.type == "link_open":
            kept.append(_safe(str(tok.attrs.get("href", ""))))
            if not kept[-1]:
                continue
        elif tok.type == "link_close" and kept and not kept.pop():
            continue
        out.append(tok)
    return out


def _breakable(tokens: list[Token]) -> list[Token]:
    """Copies of the tokens with break opportunities in overlong words (HTML only)."""
    out = []
    for tok in tokens:
        if tok.children:
            tok = tok.copy(children=_breakable(tok.children))
        elif tok.type in ("text", "code_inline"):
            tok = tok.copy(content=breakable(tok.content))
        out.append(tok)
    return out


@dataclass(frozen=True)
class RenderedNote:
    """A note ready for both parts of the message."""

    source: str
    _html: str
    text: str

    def html(
        self, p_style: str = "", link_style: str = "", p_class: str = "", a_class: str = ""
    ) -> Markup:
        """The sanitized HTML, with the template's inline styles on ``<p>`` and ``<a>``.

        Styles go inline because many mail clients drop ``<style>`` blocks. They are added
        here, after cleaning, to tags the sanitizer left bare (``<p>``, ``<a href="…">``),
        so no style can come from the note; and in a fixed order, which nh3's
        ``set_tag_attribute_values`` does not keep: two renders must be the same bytes.
        """
        p_attrs = _attrs(p_class, p_style)
        a_attrs = _attrs(a_class, link_style)
        out = self._html.replace("<p>", f"<p{p_attrs}>").replace("<a href=", f"<a{a_attrs} href=")
        return Markup(out)


def _attrs(cls: str, style: str) -> str:
    out = f' class="{html_lib.escape(cls)}"' if cls else ""
    return out + (f' style="{html_lib.escape(style)}"' if style else "")


def render_note(source: str) -> RenderedNote:
    """Render a note's Markdown (already passed through :func:`check_note`)."""
    md = _markdown()
    tokens = _unlink(md.parse(source))
    html = md.renderer.render(_breakable(tokens), md.options, {})
    return RenderedNote(source, _clean(html), _plain(tokens))


def _plain(tokens: list[Token]) -> str:
    paragraphs: list[str] = []
    for tok in tokens:
        if tok.type == "inline":
            paragraphs.append(_inline_text(tok.children or []))
    return "\n\n".join(p for p in paragraphs if p.strip())


def _inline_text(children: list[Token]) -> str:
    out: list[str] = []
    link: tuple[str, int] | None = None  # (href, where its text starts in out)
    for tok in children:
        if tok.type in ("text", "code_inline"):
            out.append(tok.content)
        elif tok.type in ("softbreak", "hardbreak"):
            out.append("\n")
        elif tok.type == "link_open":
            link = (str(tok.attrs.get("href", "")), len(out))
        elif tok.type == "link_close" and link is not None:
            url, start = link
            shown = url.removeprefix("mailto:")
            if "".join(out[start:]).strip() != shown:
                out.append(f" ({shown})")
            link = None
    return "".join(out).strip()
