"""The editor's note: a little Markdown, rendered to safe email HTML and to plain text.

An editor writes paragraphs, *emphasis*, **strong** and ``[links](https://…)``; nothing
else is Markdown here. Two independent guards keep the HTML harmless whatever is typed:

1. markdown-it-py with raw HTML off (``<script>`` comes out as text, escaped) and only the
   paragraph, emphasis, link, escape, entity, code-span and line-break rules enabled. A
   link whose target is not ``http(s)://`` or ``mailto:`` (``javascript:``, ``data:``,
   relative paths, which mean nothing in a mailbox) loses its link and keeps its text.
2. nh3 (ammonia) cleans the result with an allowlist of ``p em strong code br a[href]``
   and the same three URL schemes, so a bug in step 1 still cannot reach the reader.

The plain-text part is rendered from the same tokens: links as ``text (url)``.
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

# About 800 words: a note opens a round-up, it is not an article. It also keeps the
# message well under Gmail's 102 KB clipping point with the sections after it.
MAX_NOTE_CHARS = 5000

_SAFE_LINK = re.compile(r"^(?:https?://[^\s/?#]+|mailto:[^\s@]+@[^\s@]+)", re.IGNORECASE)
_TAGS = {"p", "em", "strong", "code", "br", "a"}
_SCHEMES = {"http", "https", "mailto"}


@cache
def _markdown() -> MarkdownIt:
    md = MarkdownIt("zero", {"html": False, "breaks": False}).enable(
        ["emphasis", "link", "escape", "entity", "newline", "backticks"]
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
    return text


def _unlink(tokens: list[Token]) -> list[Token]:
    """Drop the link tokens (keeping the text inside) of every link that is not safe."""
    out: list[Token] = []
    kept: list[bool] = []  # per open link: was it kept?
    for tok in tokens:
        if tok.children:
            tok.children = _unlink(tok.children)
        if tok.type == "link_open":
            kept.append(bool(_SAFE_LINK.match(str(tok.attrs.get("href", "")))))
            if not kept[-1]:
                continue
        elif tok.type == "link_close" and kept and not kept.pop():
            continue
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
    html = md.renderer.render(tokens, md.options, {})
    clean = nh3.clean(
        html, tags=_TAGS, attributes={"a": {"href"}}, url_schemes=_SCHEMES, link_rel=None
    )
    return RenderedNote(source, clean, _plain(tokens))


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
