"""Render a round-up: Jinja2 + premailer once per edition, byte substitution per subscriber.

premailer costs milliseconds and building an ``EmailMessage`` costs more than the SMTP
exchange, so neither may run per subscriber. An *edition* (the sections one group of
subscribers shares) is rendered with opaque placeholder tokens where the per-subscriber
values go, CSS-inlined once, and serialized once as quoted-printable MIME parts split at
those tokens. :meth:`MessageTemplate.personalize` then only escapes a few short values for
their context (HTML, text, header), encodes them and joins bytes.

Quoted-printable keeps every line ≤ 76 octets (far inside RFC 5322's 998) and a value is
joined between two soft line breaks (``=\\r\\n``), which decode to nothing, so the
pre-encoded segments never need re-encoding around a value of any length.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import html as html_lib
import itertools
import logging
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from email import policy
from email.charset import Charset
from email.utils import format_datetime, formataddr, parseaddr
from pathlib import Path
from typing import Any, Protocol

import jinja2

from digest.config import Config
from digest.dkimsign import canonical_piece
from digest.errors import RenderError
from digest.note import render_note
from digest.select import Section
from digest.wrap import breakable

HTML_TEMPLATE = "roundup.html.j2"
TEXT_TEMPLATE = "roundup.txt.j2"
SUBJECT_TEMPLATE = "subject.txt.j2"

# Per-subscriber fields a template may print. Their values are substituted after rendering.
PERSONAL_FIELDS = ("name", "email", "unsubscribe_url", "preferences_url")
NAME_FALLBACK = "there"

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def templates_dir(config: Config) -> Path:
    """Where the templates are: the configured folder, the installed package, or the checkout."""
    if config.newsletter.templates_dir is not None:
        return config.newsletter.templates_dir
    return packaged_templates_dir()


def packaged_templates_dir() -> Path:
    """The templates shipped with digest: in the installed package, or the checkout."""
    installed = Path(__file__).parent / "templates"
    if installed.is_dir():
        return installed
    return Path(__file__).parent.parent / "templates"


def _autoescape(name: str | None) -> bool:
    # Escape by default; only the plain-text templates are exempt. select_autoescape()
    # would not recognise "roundup.html.j2" as HTML, and a miss there is an XSS hole.
    return not (name or "").endswith((".txt.j2", ".txt"))


def one_line(value: str) -> str:
    """Collapse control characters and line breaks: nothing may split a header or a line."""
    return " ".join(_CONTROL.sub(" ", value).split())


# RFC 5322 2.1.1: lines SHOULD stay within 78 characters (folded where they can be) and
# MUST stay within 998.
MAX_LINE = 78
_ENCODED_WORD_MAX = 75  # RFC 2047 2
_SPECIALS = re.compile(r'[()<>\[\]:;@\\,."]')
_UTF8 = Charset("utf-8")


def _phrase_tokens(name: str, longest: int) -> list[str]:
    """A display name as RFC 5322 phrase tokens, each at most ``longest`` characters (or
    one plain word, which is shorter still), to be joined by folding white space.

    Plain ASCII words stay readable (quoted when they hold specials). A run of words that
    must be encoded (non-ASCII, or containing ``=?``, which a client would otherwise
    decode as an encoded-word) becomes RFC 2047 encoded-words with the spaces inside them:
    white space *between* two encoded-words is dropped by a decoder, so a split falls
    within a run only when one encoded-word cannot hold it.
    """
    tokens: list[str] = []
    run: list[str] = []

    def flush() -> None:
        if run:
            text = " ".join(run)
            words = _UTF8.header_encode_lines(text, itertools.repeat(longest))
            tokens.extend(w for w in words if w)  # None only for charsets without encoding
            run.clear()

    for word in name.split(" "):
        if not word.isascii() or "=?" in word or len(word) > longest // 2:
            run.append(word)
            continue
        flush()
        if _SPECIALS.search(word):
            word = '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'
        tokens.append(word)
    flush()
    return tokens


def address_field(header: str, name: str, email: str) -> str:
    """The value of an address header for ``name <email>``, folded (CRLF + space) so each
    line stays within 78 octets wherever there is white space to fold at.

    The common case (a short ASCII name) costs a few string checks; only long or encoded
    names are built token by token.
    """
    if not name:
        return email
    if len(header) + len(name) + len(email) + 5 <= MAX_LINE and name.isascii() and "=?" not in name:
        return formataddr((name, email))
    # Any token fits on the first line after "To: ", so no line needs to stay long.
    longest = min(_ENCODED_WORD_MAX, MAX_LINE - len(header) - 2)
    lines = [f"{header}:"]
    for token in [*_phrase_tokens(name, longest), f"<{email}>"]:
        if len(lines[-1]) + 1 + len(token) <= MAX_LINE or lines[-1] == f"{header}:":
            lines[-1] += " " + token
        else:
            lines.append(" " + token)
    return "\r\n".join(lines)[len(header) + 2 :]


@dataclass(frozen=True)
class Recipient:
    """The per-subscriber values of one message."""

    email: str
    name: str
    unsubscribe_url: str
    message_id: str
    preferences_url: str = ""  # the "Choose your regions" link


@dataclass(frozen=True)
class _Field:
    key: str


Segment = bytes | _Field


def _qp(data: str) -> bytes:
    # LF in, CRLF out: binascii picks its line ending from the data, so feed it LF only
    # and convert once; the result has no bare CR or LF.
    encoded = binascii.b2a_qp(data.replace("\r\n", "\n").encode("utf-8"), istext=True)
    return encoded.replace(b"\n", b"\r\n")


class BodySigner(Protocol):
    """What personalization needs of a DKIM signer (see ``dkimsign.DKIMSigner``)."""

    def signature_header(self, head: bytes, body_hash: bytes) -> bytes: ...


class MessageTemplate:
    """One edition serialized once, ready to be personalized per subscriber.

    ``personalize`` is the hot path of ``send``: it must stay O(number of fields), not
    O(message size), apart from the final join (and, with DKIM, one hash pass).
    """

    def __init__(
        self,
        *,
        key: tuple[str, ...] | None,
        subject: str,
        common_headers: bytes,
        list_unsubscribe_extra: str,
        parts: list[tuple[str, list[Segment]]],
        boundary: str,
    ) -> None:
        self.key = key
        self.subject = subject
        self._headers = common_headers
        self._lu_extra = list_unsubscribe_extra
        # Flatten the body into static bytes and (part kind, field) slots, merging
        # neighbouring static bytes so a message is one join of a few dozen pieces.
        bound = boundary.encode()
        pieces: list[bytes | tuple[str, str]] = []
        for kind, segments in parts:
            pieces.append(
                b"--"
                + bound
                + b"\r\n"
                + f'Content-Type: text/{kind}; charset="utf-8"\r\n'.encode()
                + b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
            )
            for seg in segments:
                pieces.append(seg if isinstance(seg, bytes) else (kind, seg.key))
            pieces.append(b"\r\n")
        pieces.append(b"--" + bound + b"--\r\n")
        merged: list[bytes | tuple[str, str]] = []
        for piece in pieces:
            if isinstance(piece, bytes) and merged and isinstance(merged[-1], bytes):
                merged[-1] += piece
            else:
                merged.append(piece)
        self._pieces = merged
        # DKIM's relaxed body form of each static piece, computed once per edition. Pieces
        # can be canonicalized apart because no whitespace run crosses a piece boundary:
        # quoted-printable writes trailing blanks as =20 and fields sit between "=\r\n".
        self._canonical = [canonical_piece(p) if isinstance(p, bytes) else None for p in merged]
        self.slots = sorted({p for p in merged if isinstance(p, tuple)})

    def _values(self, raw: dict[str, str]) -> dict[tuple[str, str], bytes]:
        """Each slot's value, escaped for its part and quoted-printable encoded."""
        out = {}
        for kind, key in self.slots:
            value = html_lib.escape(raw[key], quote=True) if kind == "html" else raw[key]
            # Soft line breaks around the value: the pre-encoded neighbours stay valid
            # quoted-printable whatever the value's length.
            out[kind, key] = b"=\r\n" + _qp(value) + b"=\r\n"
        return out

    def personalize(
        self, rcpt: Recipient, date_header: str | None = None, dkim: BodySigner | None = None
    ) -> bytes:
        """The complete RFC 5322 message (CRLF line ends) for one subscriber, DKIM-signed
        when ``dkim`` is given."""
        # Cleaned once: the same values go into headers and both body parts.
        name = one_line(rcpt.name)
        url = one_line(rcpt.unsubscribe_url)
        to = address_field("To", name, rcpt.email)
        lu = f"<{url}>"
        if self._lu_extra:
            # Fold before the mailto: form when the field would pass 78 octets.
            fits = len("List-Unsubscribe: ") + len(lu) + 2 + len(self._lu_extra) <= MAX_LINE
            lu += (", " if fits else ",\r\n ") + self._lu_extra
        head = b"".join(
            [
                self._headers,
                b"Date: ",
                (date_header or format_datetime(datetime.now(UTC), usegmt=True)).encode(),
                b"\r\nTo: ",
                to.encode(),
                b"\r\nMessage-ID: ",
                rcpt.message_id.encode(),
                b"\r\nList-Unsubscribe: ",
                lu.encode(),
                b"\r\n",
            ]
        )
        values = self._values(
            {
                "name": name or NAME_FALLBACK,
                "email": one_line(rcpt.email),
                "unsubscribe_url": url,
                "preferences_url": one_line(rcpt.preferences_url),
            }
        )
        body = [p if isinstance(p, bytes) else values[p] for p in self._pieces]
        if dkim is None:
            return head + b"\r\n" + b"".join(body)
        hasher = hashlib.sha256()
        for piece, canonical in zip(self._pieces, self._canonical, strict=True):
            if canonical is None:
                assert isinstance(piece, tuple)
                canonical = canonical_piece(values[piece])
            hasher.update(canonical)
        signature = dkim.signature_header(head, base64.b64encode(hasher.digest()))
        return signature + head + b"\r\n" + b"".join(body)


@dataclass(frozen=True)
class IssueContext:
    """Edition-independent facts of one issue, editorial choices included."""

    edition_date: date
    issue_id: int | None
    lead_id: int | None = None  # the editor's lead story, when they chose one
    note: str | None = None  # the editor's note (Markdown)


def split_lead(
    sections: Sequence[Section[Any]], lead_id: int | None
) -> tuple[Any, str, list[Section[Any]]]:
    """The story that opens an edition, its section's name, and the sections without it.

    The editor's lead when its section is in this edition, else the rules' first article.
    Sections left empty are dropped. ``(None, "", [])`` for an edition with no articles.
    """
    found = next(
        ((a, s) for s in sections for a in s.articles if lead_id is not None and a.id == lead_id),
        None,
    )
    if found is None:
        found = next(((s.articles[0], s) for s in sections if s.articles), None)
    if found is None:
        return None, "", []
    lead, home = found
    rest = [
        Section(s.name, [a for a in s.articles if a is not lead], s.is_region) if s is home else s
        for s in sections
    ]
    return lead, home.name, [s for s in rest if s.articles]


class Renderer:
    """Jinja2 environment plus premailer, built once per run."""

    def __init__(self, config: Config) -> None:
        self.config = config
        folder = templates_dir(config)
        if not folder.is_dir():
            raise RenderError(
                f"templates folder {folder} does not exist (newsletter.templates_dir)"
            )
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(folder)),
            autoescape=_autoescape,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters["breakable"] = breakable
        try:
            self._html = self.env.get_template(HTML_TEMPLATE)
            self._text = self.env.get_template(TEXT_TEMPLATE)
            self._subject = (
                # A subject is text, not HTML: "Rock & Roll's" must not become
                # "Rock &amp; Roll&#39;s" (a string template would be autoescaped).
                self.env.overlay(autoescape=False).from_string(config.newsletter.subject)
                if config.newsletter.subject
                else self.env.get_template(SUBJECT_TEMPLATE)
            )
        except jinja2.TemplateSyntaxError as exc:
            where = exc.filename or "newsletter.subject"
            raise RenderError(f"{where}:{exc.lineno}: template error: {exc.message}") from None
        except jinja2.TemplateNotFound as exc:
            raise RenderError(f"template {exc.name} not found in {folder}") from None
        self._from = config.newsletter.sender
        _, from_addr = parseaddr(self._from)
        self.envelope_from = from_addr
        self.domain = from_addr.rpartition("@")[2] or "localhost"

    # -- pieces -----------------------------------------------------------------------

    def context(self, issue: IssueContext, sections: Sequence[Section[Any]]) -> dict[str, Any]:
        """The template context of one edition (see templates/ for how it is used).

        ``sections`` is every section of the edition; ``lead`` the story that opens it
        (the editor's, or the rules' first), ``lead_section`` its section's name and
        ``body_sections`` the sections without it; ``note`` the editor's note or None.
        """
        lead, lead_section, body = split_lead(sections, issue.lead_id)
        preheader = ""
        if lead is not None:
            preheader = (lead.title + " — " + (lead.dek or "")).strip(" —")
            if len(preheader) > 140:
                preheader = preheader[:140].rsplit(" ", 1)[0] + "…"
        pub = self.config.publication
        return {
            "publication": pub,
            "newsletter": self.config.newsletter,
            "edition_date": issue.edition_date,
            "date_label": f"{issue.edition_date.day} {issue.edition_date:%B %Y}",
            "sections": sections,
            "lead": lead,
            "lead_section": lead_section,
            "body_sections": body,
            "note": render_note(issue.note) if issue.note else None,
            "preheader": preheader,
            "view_in_browser_url": self.archive_url(issue.edition_date),
            # The archive's web page of an issue: no personal links, a way to subscribe.
            "archive": False,
            "archive_index_url": f"{self.config.unsubscribe.base_url}/archive",
            "subscribe_url": f"{self.config.unsubscribe.base_url}/subscribe",
            "why": (
                f"You are receiving this because you subscribed to {self.config.newsletter.title} "
                f"from {pub.name}."
            ),
        }

    def archive_url(self, edition_date: date) -> str | None:
        """The public web page of an issue (``digest serve``), None when the archive is off."""
        if not self.config.archive.enabled:
            return None
        return f"{self.config.unsubscribe.base_url}/archive/{edition_date.isoformat()}"

    def subject(self, ctx: dict[str, Any]) -> str:
        """The subject line, on one line whatever the template or the feed titles do."""
        try:
            return one_line(self._subject.render(ctx))
        except jinja2.TemplateError as exc:
            raise RenderError(f"subject template: {exc}") from None

    def _render(self, template: jinja2.Template, ctx: dict[str, Any]) -> str:
        try:
            return template.render(ctx)
        except jinja2.TemplateError as exc:
            raise RenderError(f"{template.name}: {exc}") from None

    def render_html(self, ctx: dict[str, Any]) -> str:
        """The HTML part with CSS inlined by premailer."""
        import premailer

        raw = self._render(self._html, ctx)
        return str(
            premailer.Premailer(
                raw,
                keep_style_tags=True,  # @media and dark-mode rules only work from <style>
                strip_important=False,
                allow_network=False,
                disable_validation=True,
                cssutils_logging_level=logging.CRITICAL,
            ).transform()
        )

    def render_text(self, ctx: dict[str, Any]) -> str:
        """The text/plain part from its own template."""
        return self._render(self._text, ctx)

    def web_page(self, issue: IssueContext, sections: Sequence[Section[Any]]) -> str:
        """An issue as the archive's web page: every section, nobody's name, address or
        links (the footer offers to subscribe instead)."""
        ctx = self.context(issue, sections)
        ctx["archive"] = True
        ctx["view_in_browser_url"] = None
        ctx["subscriber"] = _Placeholders(
            name=NAME_FALLBACK, email="", unsubscribe_url="", preferences_url=""
        )
        return self.render_html(ctx)

    # -- the edition ------------------------------------------------------------------

    def edition(
        self,
        issue: IssueContext,
        sections: Sequence[Section[Any]],
        key: tuple[str, ...] | None = None,
        subject_prefix: str = "",
    ) -> MessageTemplate:
        """Render, inline and serialize one edition with per-subscriber placeholders.

        ``subject_prefix`` ("[TEST] " for test copies) changes the Subject header only:
        the body, and so every byte but the personal fields, stays that of the real send.
        """
        nonce = secrets.token_hex(6)
        token = {f: f"DGST{nonce}{f.replace('_', '').upper()}X" for f in PERSONAL_FIELDS}
        ctx = self.context(issue, sections)
        subject = subject_prefix + self.subject(ctx)
        ctx["subscriber"] = _Placeholders(**{f: token[f] for f in PERSONAL_FIELDS})
        html_body = self.render_html(ctx)
        text_body = self.render_text(ctx)
        by_token = {v: k for k, v in token.items()}
        splitter = re.compile("|".join(re.escape(t) for t in token.values()))

        def segments(body: str) -> list[Segment]:
            out: list[Segment] = []
            pos = 0
            for m in splitter.finditer(body):
                out.append(_qp(body[pos : m.start()]))
                out.append(_Field(by_token[m.group(0)]))
                pos = m.end()
            out.append(_qp(body[pos:]))
            return out

        parts: list[tuple[str, list[Segment]]] = [
            ("plain", segments(text_body)),
            ("html", segments(html_body)),
        ]
        # "=_" never occurs in quoted-printable output (a literal "=" is "=3D"), so this
        # boundary cannot collide with any body, whatever the feed says. It is derived
        # from the content, not drawn at random, so the same edition rendered twice (a
        # test copy, then the real send) is the same bytes.
        content = hashlib.sha256()
        for _, segs in parts:
            for seg in segs:
                content.update(seg if isinstance(seg, bytes) else b"\0" + seg.key.encode())
        boundary = f"=_digest_{content.hexdigest()[:24]}"
        return MessageTemplate(
            key=key,
            subject=subject,
            common_headers=self._common_headers(subject, boundary),
            list_unsubscribe_extra=self._mailto(),
            parts=parts,
            boundary=boundary,
        )

    def _mailto(self) -> str:
        mailto = self.config.unsubscribe.mailto
        return f"<mailto:{one_line(mailto)}?subject=unsubscribe>" if mailto else ""

    def _common_headers(self, subject: str, boundary: str) -> bytes:
        smtp = policy.SMTP
        title = one_line(self.config.newsletter.title)
        list_id_local = re.sub(r"[^a-z0-9-]+", "-", title.lower()).strip("-") or "digest"
        headers: list[tuple[str, str]] = [
            ("From", self._from),
        ]
        if self.config.newsletter.reply_to:
            headers.append(("Reply-To", self.config.newsletter.reply_to))
        headers += [
            ("Subject", subject),
            ("MIME-Version", "1.0"),
            ("List-Id", f"{title} <{list_id_local}.{self.domain}>"),
            ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
            ("Content-Type", f'multipart/alternative; boundary="{boundary}"'),
        ]
        # The email package folds and RFC 2047-encodes these correctly; it runs once per
        # edition, so its cost does not matter.
        return "".join(
            smtp.header_factory(name, value).fold(policy=smtp) for name, value in headers
        ).encode("ascii")


@dataclass(frozen=True)
class _Placeholders:
    name: str
    email: str
    unsubscribe_url: str
    preferences_url: str
