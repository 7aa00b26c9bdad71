"""The fetch stage: RSS 2.0 and Atom feeds → normalized articles in the store.

:func:`fetch_all` reads every configured feed (an http(s) URL, fetched with a conditional
GET, or a local file), parses it with :func:`parse_feed` and upserts the articles. Each
feed is fetched, parsed and committed on its own: one broken feed becomes an ``error`` in
its :class:`FeedReport` and never costs the others their articles.

Everything stored is plain text. Feeds are untrusted input, so titles and deks are
stripped of markup, scripts and line breaks here, and escaped again at render time;
links and images must be http(s) so a ``javascript:`` URL can never reach an ``href``.
Errors from httpx and feedparser are translated to :class:`~digest.errors.FeedError`
here, so nothing above this module imports them.
"""

from __future__ import annotations

import html
import io
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit, urlunsplit
from xml.sax import SAXParseException

import feedparser
import httpx
import lxml.etree  # type: ignore[import-untyped, unused-ignore]
import lxml.html  # type: ignore[import-untyped, unused-ignore]
from sqlalchemy.orm import Session, sessionmaker

from digest import store
from digest.config import Feed
from digest.errors import FeedError
from digest.models import Article

# lxml ships no type stubs and lxml-stubs is not a dependency, so lxml is typed as Any
# above; "unused-ignore" keeps mypy --strict quiet should the stubs be installed later.

MAX_FEED_BYTES = 10 * 1024 * 1024
MAX_REDIRECTS = 5
TIMEOUT_SECONDS = 30.0
DEK_LENGTH = 300
CREDIT_LENGTH = 200  # models.Article.image_credit holds 300
# Column widths in models.py: PostgreSQL enforces them, so longer values must not reach it.
MAX_URL_LENGTH = 2048
MAX_ETAG_LENGTH = 512
MAX_LAST_MODIFIED_LENGTH = 128

USER_AGENT = "digest/0.1 (newsletter feed fetcher)"
ACCEPT = (
    "application/rss+xml, application/atom+xml, application/xml;q=0.9, text/xml;q=0.9, */*;q=0.5"
)

# C0 and C1 controls (CR and LF among them) and the two XML non-characters lxml refuses.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\ufffe\uffff]")
# Something a browser would read as a tag or an entity: worth another stripping pass.
_MARKUP = re.compile(r"<[A-Za-z!/?]|&(?:#[0-9]+|#[xX][0-9A-Fa-f]+|[A-Za-z][A-Za-z0-9]*);")
_TAG = re.compile(r"<[A-Za-z!/?][^>]*>?")
_EMAIL = re.compile(r"^[^\s@]+@[^\s@]+$")
_HTTP_URL = re.compile(r"^https?://", re.IGNORECASE)
_HTML_START = re.compile(rb"<!doctype\s+html|<html[\s>]", re.IGNORECASE)
# How a document that starts with an XML declaration starts (BOM or not, UTF-8 or UTF-16).
_BOMS = {"utf-8": b"\xef\xbb\xbf", "utf-16-le": b"\xff\xfe", "utf-16-be": b"\xfe\xff"}
_DECLARATIONS = tuple(
    prefix + "<?xml".encode(codec) for codec, bom in _BOMS.items() for prefix in (bom, b"")
)
# Elements whose text is code or boilerplate, not prose.
_DROP_ELEMENTS = frozenset({"script", "style", "template", "noscript", "head"})
# Elements that separate words when rendered; text_content() would glue their text together.
_BLOCK_ELEMENTS = frozenset(
    {
        *("address", "article", "aside", "blockquote", "br", "dd", "div", "dl", "dt"),
        *("figcaption", "figure", "footer", "h1", "h2", "h3", "h4", "h5", "h6", "header"),
        *("hr", "li", "main", "nav", "ol", "p", "pre", "section", "table", "td", "th", "tr"),
        "ul",
    }
)


# --- results ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Rejection:
    """A feed item that was not stored, and why."""

    item: str
    reason: str


@dataclass
class FeedReport:
    """What fetching one feed did."""

    feed: str
    new: int = 0
    updated: int = 0
    unchanged: int = 0
    rejected: list[Rejection] = field(default_factory=list)
    not_modified: bool = False
    error: str | None = None


@dataclass
class FetchReport:
    """What one :func:`fetch_all` run did, feed by feed."""

    feeds: list[FeedReport]

    @property
    def new(self) -> int:
        """Articles stored for the first time."""
        return sum(f.new for f in self.feeds)

    @property
    def updated(self) -> int:
        """Stored articles whose content changed."""
        return sum(f.updated for f in self.feeds)

    @property
    def unchanged(self) -> int:
        """Stored articles seen again unchanged."""
        return sum(f.unchanged for f in self.feeds)

    @property
    def rejected(self) -> int:
        """Items skipped because they were unusable."""
        return sum(len(f.rejected) for f in self.feeds)

    @property
    def ok(self) -> bool:
        """True when every feed was fetched and parsed."""
        return all(f.error is None for f in self.feeds)


@dataclass(frozen=True)
class ParsedArticle:
    """One feed item, normalized: plain text, canonical http(s) link, UTC date."""

    link: str
    guid: str | None
    title: str
    dek: str
    authors: list[str]
    image_url: str | None
    categories: list[str]
    published_at: datetime
    image_credit: str | None = None


class _Rejected(Exception):
    """An item cannot be stored; the message is the reason."""


# --- parsing ----------------------------------------------------------------------------


def parse_feed(content: bytes, source_url: str) -> tuple[list[ParsedArticle], list[Rejection]]:
    """Parse an RSS 2.0 or Atom document into normalized articles.

    ``source_url`` is where the bytes came from (after redirects); relative links resolve
    against the feed's own site address, else against it. Items that cannot be stored
    (no title, no date, a non-http(s) link) come back as rejections rather than errors.

    Raises :class:`FeedError` when the document is not well-formed XML or not a feed.
    Example::

        articles, rejected = parse_feed(path.read_bytes(), "https://example.org/feed.xml")
    """
    if not content.strip():
        raise FeedError("empty document, not an RSS or Atom feed")
    try:
        # A BytesIO, never the bytes themselves: feedparser tries to open() a bytes argument
        # as a file name first, which would let a feed body name a local file.
        parsed = feedparser.parse(io.BytesIO(content))
    except Exception as exc:
        # feedparser catches its own parse errors; anything escaping it on untrusted
        # input is still that feed's problem, not a reason to abort the whole run.
        raise FeedError(f"cannot parse feed: {_oneline(str(exc)) or type(exc).__name__}") from None
    version = str(parsed.get("version") or "")
    problem = parsed.get("bozo_exception")
    if not version:
        # An HTML page is rarely well-formed XML, but "not a feed" is the useful message.
        # Only the head of the body is searched: a pattern run over 10 MB of crafted
        # input must not be able to stall the fetch.
        looks_like_html = _HTML_START.search(content[:4096]) is not None
        if isinstance(problem, SAXParseException) and not looks_like_html:
            raise FeedError(_malformed(problem, content))
        raise FeedError("not an RSS or Atom feed")
    if isinstance(problem, SAXParseException):
        # feedparser's loose parser would recover something, but a feed that is not
        # well-formed is an error for its publisher to fix, not a guess for us to make.
        raise FeedError(_malformed(problem, content))

    site = _str(parsed.feed.get("link"))
    try:
        base = urljoin(source_url, site) if site else source_url
    except ValueError:
        base = source_url

    articles: list[ParsedArticle] = []
    rejections: list[Rejection] = []
    for number, entry in enumerate(parsed.entries, start=1):
        try:
            articles.append(_article(entry, base))
        except _Rejected as why:
            rejections.append(Rejection(_item_name(entry, number), str(why)))
    return articles, rejections


def _malformed(problem: SAXParseException, content: bytes) -> str:
    reason = f"malformed XML: {_oneline(problem.getMessage())}"
    line = problem.getLineNumber()
    if line is None:
        return reason
    if not any(content.startswith(prefix) for prefix in _DECLARATIONS):
        # feedparser puts a declaration line in front of a document that has none before
        # handing it to expat, so expat's line numbers are one too high for it.
        line = max(1, line - 1)
    return f"{reason} at line {line}"


def _article(entry: Mapping[str, Any], base: str) -> ParsedArticle:
    raw_link = _str(entry.get("link")).strip()
    if not raw_link:
        raise _Rejected("no link")
    link = _canonical_link(_resolve(base, raw_link, what="link"))
    if len(link) > MAX_URL_LENGTH:
        raise _Rejected(f"link is longer than {MAX_URL_LENGTH} characters")

    title = _plain_text(_str(entry.get("title")))
    if not title:
        raise _Rejected("no title")

    published_at = _date(entry.get("published_parsed")) or _date(entry.get("updated_parsed"))
    if published_at is None:
        raise _Rejected("no parseable date")

    guid = _printable(_str(entry.get("id")), limit=0) or None
    if guid is not None and len(guid) > MAX_URL_LENGTH:
        guid = None  # too long to index; the link still identifies the article

    summary = _str(entry.get("summary"))
    if not summary:
        contents = entry.get("content") or []
        summary = _str(contents[0].get("value")) if contents else ""

    image_url = _image(entry, base)
    return ParsedArticle(
        link=link,
        guid=guid,
        title=title,
        dek=_cut(_plain_text(summary), DEK_LENGTH),
        authors=_authors(entry),
        image_url=image_url,
        categories=_unique(_plain_text(_str(tag.get("term"))) for tag in entry.get("tags") or []),
        published_at=published_at,
        image_credit=_credit(entry) if image_url else None,
    )


def _credit(entry: Mapping[str, Any]) -> str | None:
    """Who made the picture: Media RSS ``<media:credit>`` (a photographer's before an
    agency's), else the item's ``credit`` field, as plain text."""
    credits = [c for c in entry.get("media_credit") or [] if isinstance(c, Mapping)]
    # Media RSS allows several credits with roles; the photographer is what sites print.
    credits.sort(key=lambda c: _str(c.get("role")).lower() not in ("photographer", ""))
    for value in [*(_str(c.get("content")) for c in credits), _str(entry.get("credit"))]:
        text = _plain_text(value)
        if text:
            return _cut(text, CREDIT_LENGTH)
    return None


def _resolve(base: str, ref: str, what: str) -> str:
    """``ref`` made absolute against ``base``; must then be http(s)."""
    if _CONTROL.search(ref):
        # A CR/LF inside a URL is an injection attempt, not a typo worth repairing.
        raise _Rejected(f"{what} contains control characters")
    ref = ref.replace(" ", "%20")
    try:
        url = urljoin(base, ref)
        parts = urlsplit(url)
    except ValueError:
        raise _Rejected(f"{what} is not a valid URL: {_printable(ref)}") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise _Rejected(f"{what} is not http(s): {_printable(url)}")
    if not parts.hostname:
        raise _Rejected(f"{what} has no host: {_printable(url)}")
    return url


def _canonical_link(url: str) -> str:
    """One spelling per article, so the same story from two feeds is stored once.

    Scheme and host are case-insensitive and a default port is noise; the fragment never
    reaches the server; utm_* parameters are campaign tracking that feeds add per channel.
    Other query parameters keep their exact text, since re-encoding could change meaning.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    userinfo, at, hostport = parts.netloc.rpartition("@")
    hostport = hostport.lower()
    default_port = ":80" if scheme == "http" else ":443"
    hostport = hostport.removesuffix(default_port)
    query = "&".join(
        pair
        for pair in parts.query.split("&")
        if pair and not unquote(pair.split("=", 1)[0]).lower().startswith("utm_")
    )
    return urlunsplit((scheme, userinfo + at + hostport, parts.path or "/", query, ""))


def _date(value: object) -> datetime | None:
    # feedparser has already converted every date it understood to a UTC struct_time.
    if not isinstance(value, time.struct_time):
        return None
    try:
        # A leap second (":60") is valid in feeds but not in datetime.
        return datetime(*value[:5], min(value[5], 59), tzinfo=UTC)
    except (ValueError, OverflowError):
        return None


def _authors(entry: Mapping[str, Any]) -> list[str]:
    # feedparser maps dc:creator and RSS <author> into `authors`/`author` as well.
    names = [_str(a.get("name")) for a in entry.get("authors") or [] if isinstance(a, Mapping)]
    if not any(names):
        names = [_str(entry.get("author"))]
    # A bare address (RSS <author> often holds one) is not a byline to publish.
    return _unique(n for n in map(_plain_text, names) if not _EMAIL.match(n))


def _image(entry: Mapping[str, Any], base: str) -> str | None:
    candidates: list[str] = []
    for media in entry.get("media_content") or []:
        kind = _str(media.get("type")).lower()
        if _str(media.get("medium")).lower() == "image" or kind.startswith("image/"):
            candidates.append(_str(media.get("url")))
    candidates += [_str(thumb.get("url")) for thumb in entry.get("media_thumbnail") or []]
    candidates += [
        _str(enc.get("href"))
        for enc in entry.get("enclosures") or []
        if _str(enc.get("type")).lower().startswith("image/")
    ]
    for candidate in candidates:
        if not candidate.strip():
            continue
        try:
            url = _resolve(base, candidate.strip(), what="image")
        except _Rejected:
            continue  # a bad image costs the article its picture, not its place
        if len(url) <= MAX_URL_LENGTH:
            return url
    return None


def _item_name(entry: Mapping[str, Any], number: int) -> str:
    title = _plain_text(_str(entry.get("title")))
    return _printable(title or _str(entry.get("link"))) or f"item {number}"


# --- text -------------------------------------------------------------------------------


def _plain_text(value: str) -> str:
    """Feed text (HTML or not) as one line of plain text.

    Tags are removed (script and style with their content), entities decoded, control
    characters dropped and whitespace collapsed. Feeds often escape twice, so an
    entity-decoded result that still looks like markup is stripped again (a few rounds at
    most): nothing that reads as a tag survives.
    """
    text = _CONTROL.sub(" ", value)
    for _ in range(3):
        if not _MARKUP.search(text):
            break
        text = _CONTROL.sub(" ", _strip_tags(text))
    else:
        text = _TAG.sub(" ", html.unescape(text))
    return " ".join(text.split())


def _strip_tags(text: str) -> str:
    try:
        # Wrapped so leading text and fragments parse the same way as a whole document.
        root = lxml.html.document_fromstring(f"<div>{text}</div>")
    except (ValueError, lxml.etree.ParserError):
        return html.unescape(_TAG.sub(" ", text))
    for element in list(root.iter()):
        tag = element.tag if isinstance(element.tag, str) else ""
        if tag in _DROP_ELEMENTS:
            element.drop_tree()  # keeps the element's tail text
        elif tag in _BLOCK_ELEMENTS:
            element.text = " " + (element.text or "")
            element.tail = " " + (element.tail or "")
    return str(root.text_content())


def _cut(text: str, limit: int) -> str:
    """``text`` cut on a word boundary to at most ``limit`` characters plus "…"."""
    if len(text) <= limit:
        return text
    head = text[:limit]
    space = head.rfind(" ")
    # Without a space in the last half a single huge "word" is cut mid-word instead.
    if space > limit // 2:
        head = head[:space]
    return head.rstrip(" ,;:-–—") + "…"


def _printable(text: str, limit: int = 120) -> str:
    one_line = " ".join(_CONTROL.sub(" ", text).split())
    return _cut(one_line, limit) if limit else one_line


def _oneline(text: str) -> str:
    return _printable(text, limit=300)


def _unique(values: Iterable[str]) -> list[str]:
    """Non-empty values, first spelling kept, duplicates (ignoring case) dropped."""
    seen: set[str] = set()
    out: list[str] = []
    for value in values:
        key = value.casefold()
        if value and key not in seen:
            seen.add(key)
            out.append(value)
    return out


def _str(value: object) -> str:
    return value if isinstance(value, str) else ""


# --- fetching ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Fetched:
    content: bytes
    url: str  # the final address, after redirects: relative links resolve against it
    etag: str | None = None
    last_modified: str | None = None


def _read_file(path_text: str) -> _Fetched:
    path = Path(path_text)
    try:
        with path.open("rb") as handle:
            # One byte over the limit is enough to know it is too big.
            content = handle.read(MAX_FEED_BYTES + 1)
    except FileNotFoundError:
        raise FeedError(f"no such file: {path}") from None
    except IsADirectoryError:
        raise FeedError(f"{path} is a folder, not a feed file") from None
    except OSError as exc:
        raise FeedError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(content) > MAX_FEED_BYTES:
        raise FeedError(f"feed is larger than {MAX_FEED_BYTES // (1024 * 1024)} MB")
    return _Fetched(content, path.absolute().as_uri())


def _fetch_http(
    client: httpx.Client, url: str, etag: str | None, last_modified: str | None
) -> _Fetched | None:
    """GET ``url`` conditionally; None when the server answers 304 Not Modified."""
    headers = {"Accept": ACCEPT}
    if etag:
        headers["If-None-Match"] = etag
    if last_modified:
        headers["If-Modified-Since"] = last_modified
    too_big = f"feed is larger than {MAX_FEED_BYTES // (1024 * 1024)} MB"
    try:
        with client.stream("GET", url, headers=headers, follow_redirects=True) as response:
            if response.status_code == 304:
                return None
            if not response.is_success:
                raise FeedError(f"HTTP {response.status_code} {response.reason_phrase}".strip())
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > MAX_FEED_BYTES:
                raise FeedError(too_big)
            # Streamed and counted after decompression, so neither a lying Content-Length
            # nor a gzip bomb can make us hold more than the limit.
            body = bytearray()
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > MAX_FEED_BYTES:
                    raise FeedError(too_big)
            return _Fetched(
                bytes(body),
                str(response.url),
                _validator(response.headers.get("etag"), MAX_ETAG_LENGTH),
                _validator(response.headers.get("last-modified"), MAX_LAST_MODIFIED_LENGTH),
            )
    except httpx.TooManyRedirects:
        raise FeedError(f"too many redirects (more than {client.max_redirects})") from None
    except httpx.TimeoutException:
        raise FeedError("timed out waiting for the server") from None
    except httpx.ConnectError as exc:
        raise FeedError(f"cannot connect: {_oneline(str(exc)) or 'connection failed'}") from None
    except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError) as exc:
        raise FeedError(f"request failed: {_oneline(str(exc)) or type(exc).__name__}") from None


def _validator(value: str | None, limit: int) -> str | None:
    # We send it back verbatim in a header, so keep only what is safe to send.
    if value is None or len(value) > limit or not value.isascii() or _CONTROL.search(value):
        return None
    return value


def _new_client() -> httpx.Client:
    return httpx.Client(
        timeout=TIMEOUT_SECONDS,
        follow_redirects=True,
        max_redirects=MAX_REDIRECTS,
        headers={"User-Agent": USER_AGENT},
    )


# --- storing ----------------------------------------------------------------------------


def _store(session: Session, parsed: ParsedArticle, feed: str, now: datetime) -> str:
    """Insert or update one article; returns "new", "updated" or "unchanged"."""
    article = store.find_article(session, parsed.link, parsed.guid)
    if article is None:
        session.add(
            Article(
                link=parsed.link,
                guid=parsed.guid,
                title=parsed.title,
                dek=parsed.dek,
                authors=list(parsed.authors),
                image_url=parsed.image_url,
                image_credit=parsed.image_credit,
                categories=list(parsed.categories),
                published_at=parsed.published_at,
                feed=feed,
                first_seen_at=now,
            )
        )
        # Flushed now so a later item of this run with the same link or guid finds it,
        # even in a session made with autoflush=False.
        session.flush()
        return "new"
    if article.guid is None and parsed.guid is not None:
        # Not a content change, but lets a later feed that only shares the guid match.
        article.guid = parsed.guid
    # The link and feed are the article's identity and first source: kept as first seen.
    # Only that feed edits the article; every feed carrying it (a site's per-region
    # feeds) adds its categories, which accumulate. Otherwise the article would flip
    # between feeds' versions on every fetch, and its region would depend on which feed
    # happened to come last.
    changes: dict[str, object] = {"categories": _unique([*article.categories, *parsed.categories])}
    if article.feed == feed:
        changes |= {
            "title": parsed.title,
            "dek": parsed.dek,
            "authors": list(parsed.authors),
            "image_url": parsed.image_url,
            "image_credit": parsed.image_credit,
            "published_at": parsed.published_at,
        }
    changed = False
    for name, value in changes.items():
        if getattr(article, name) != value:
            setattr(article, name, value)
            changed = True
    return "updated" if changed else "unchanged"


def _fetch_one(
    sessions: sessionmaker[Session], feed: Feed, now: datetime, client: httpx.Client
) -> FeedReport:
    report = FeedReport(feed=feed.label)
    # Read the validators in a short transaction of its own: holding one open across a
    # 30-second download would pin an SQLite snapshot and make the later write fail.
    with sessions() as session:
        state = store.feed_state(session, feed.url)
        etag, last_modified = state.etag, state.last_modified

    fetched: _Fetched | None = None
    parsed: list[ParsedArticle] = []
    try:
        if _HTTP_URL.match(feed.url):
            fetched = _fetch_http(client, feed.url, etag, last_modified)
        else:
            fetched = _read_file(feed.url)
        if fetched is None:
            report.not_modified = True
        else:
            parsed, report.rejected = parse_feed(fetched.content, fetched.url)
    except FeedError as exc:
        report.error = _oneline(str(exc))

    with sessions() as session:
        state = store.feed_state(session, feed.url)
        state.last_fetched_at = now
        state.last_error = report.error
        if fetched is not None and report.error is None:
            for article in parsed:
                outcome = _store(session, article, feed.label, now)
                if outcome == "new":
                    report.new += 1
                elif outcome == "updated":
                    report.updated += 1
                else:
                    report.unchanged += 1
            # Validators are kept only once the body was stored: keeping them for a body we
            # could not use would turn the next fetch into a 304 that hides the problem.
            if _HTTP_URL.match(feed.url):
                state.etag, state.last_modified = fetched.etag, fetched.last_modified
        session.commit()
    return report


def fetch_all(
    sessions: sessionmaker[Session],
    feeds: Sequence[Feed],
    now: datetime,
    client: httpx.Client | None = None,
    progress: Callable[[FeedReport], None] | None = None,
) -> FetchReport:
    """Fetch every feed and store its articles, one feed (and one commit) at a time.

    ``now`` (timezone-aware) stamps ``first_seen_at`` of new articles. ``client`` lets a
    caller supply its own httpx client (proxies, tests); by default one is made with a
    30-second timeout and at most 5 redirects. ``progress`` is called with each feed's
    report as soon as that feed is done.

    A feed that cannot be fetched or parsed gets an ``error`` in its report and the run
    goes on; check :attr:`FetchReport.ok`. Example::

        report = fetch_all(sessions, config.feeds, now=datetime.now(UTC))
        print(report.new, report.updated, report.rejected, report.ok)
    """
    if now.tzinfo is None:
        raise ValueError("fetch_all needs a timezone-aware `now`")
    reports: list[FeedReport] = []
    own_client = client is None
    http = client if client is not None else _new_client()
    try:
        for feed in feeds:
            report = _fetch_one(sessions, feed, now, http)
            reports.append(report)
            if progress is not None:
                progress(report)
    finally:
        if own_client:
            http.close()
    return FetchReport(feeds=reports)
