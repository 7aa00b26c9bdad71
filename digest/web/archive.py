"""The public archive: ``/archive``, ``/archive/{YYYY-MM-DD}``, ``/archive/feed.xml``.

An issue appears once its sending has started (readers have it, and its "View in
browser" link must work); a built but unsent issue, or a date without an issue, is 404.
The page of an issue is the round-up itself with every section, rendered from the frozen
selection with no subscriber's name, address or link in it.

Rendered pages are kept in a small per-app cache: a sent issue never changes, and
premailer costs milliseconds per render.
"""

from __future__ import annotations

import re
import threading
import xml.etree.ElementTree as ET
from collections import OrderedDict
from datetime import UTC, date, datetime
from typing import Final
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from digest import store
from digest.models import Issue
from digest.render import IssueContext, Renderer
from digest.select import Section
from digest.web.context import Web

# The round-up's HTML is an email: inline styles and <style> blocks, images from the
# feeds' hosts, and never a script.
ARCHIVE_CSP: Final = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src https: http: data:; "
    "form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)
CACHE: Final = {"Cache-Control": "public, max-age=300"}
_CACHED_PAGES: Final = 32
_ATOM: Final = "http://www.w3.org/2005/Atom"
_DAY: Final = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_NOT_XML: Final = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


class _PageCache:
    """A small LRU of rendered issue pages, keyed by (issue id, edition date)."""

    def __init__(self) -> None:
        self._pages: OrderedDict[tuple[int, date], str] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[int, date]) -> str | None:
        with self._lock:
            page = self._pages.get(key)
            if page is not None:
                self._pages.move_to_end(key)
            return page

    def put(self, key: tuple[int, date], page: str) -> None:
        with self._lock:
            self._pages[key] = page
            while len(self._pages) > _CACHED_PAGES:
                self._pages.popitem(last=False)


def _day(value: str) -> date | None:
    # Only YYYY-MM-DD: date.fromisoformat also takes week dates ("2026-W48-5"), which
    # would give an issue a second address.
    if not _DAY.fullmatch(value):
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        return None


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def routes(web: Web) -> list[Route]:
    """The archive routes (none when ``[archive] enabled = false``)."""
    config = web.config
    if not config.archive.enabled:
        return []
    renderer = Renderer(config)
    cache = _PageCache()
    base = config.unsubscribe.base_url
    host = urlsplit(config.publication.url).hostname or urlsplit(base).hostname or "localhost"

    def index(request: Request) -> Response:
        with web.sessions() as session:
            issues = store.published_issues(session)
        return web.pages.page(
            request,
            "web/archive.html.j2",
            headers=CACHE,
            title="Past issues",
            issues=issues,
        )

    def render_issue(issue: Issue) -> str:
        key = (issue.id, issue.edition_date)
        page = cache.get(key)
        if page is None:
            regions = {r.casefold() for r in config.newsletter.regions}
            with web.sessions() as session:
                sections = [
                    Section(name, articles, is_region=name.casefold() in regions)
                    for name, articles in store.issue_sections(session, issue.id)
                ]
                ctx = IssueContext(issue.edition_date, issue.id, issue.lead_article_id, issue.note)
                page = renderer.web_page(ctx, sections)
            cache.put(key, page)
        return page

    def show(request: Request) -> Response:
        day = _day(request.path_params["day"])
        issue = None
        if day is not None:
            with web.sessions() as session:
                issue = store.published_issue(session, day)
        if issue is None:
            return web.pages.error(request, 404, "There is no issue of that date in the archive.")
        return HTMLResponse(
            render_issue(issue), headers={**CACHE, "Content-Security-Policy": ARCHIVE_CSP}
        )

    def feed(request: Request) -> Response:
        with web.sessions() as session:
            issues = store.published_issues(session)
            entries = [
                (
                    issue,
                    [
                        a.title
                        for _, articles in store.issue_sections(session, issue.id)
                        for a in articles
                    ],
                )
                for issue in issues
            ]
        return Response(
            _atom(config.newsletter.title, config.publication.name, base, host, entries),
            media_type="application/atom+xml; charset=utf-8",
            headers=CACHE,
        )

    return [
        Route("/archive", index, methods=["GET"]),
        Route("/archive/feed.xml", feed, methods=["GET"]),
        Route("/archive/{day}", show, methods=["GET"]),
    ]


def _atom(
    title: str,
    author: str,
    base: str,
    host: str,
    entries: list[tuple[Issue, list[str]]],
) -> bytes:
    """The Atom document: one entry per published issue, newest first.

    Entry ids are tag URIs of the publication's host and the edition date: they never
    change, even if ``base_url`` does (RFC 4287 wants permanent ids).
    """
    ET.register_namespace("", _ATOM)

    def el(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
        node = ET.SubElement(parent, f"{{{_ATOM}}}{tag}", attrs)
        if text is not None:
            node.text = _NOT_XML.sub("", text)  # characters XML 1.0 cannot carry
        return node

    root = ET.Element(f"{{{_ATOM}}}feed")
    el(root, "title", title)
    el(root, "id", f"tag:{host},2026:digest:archive")
    el(root, "link", rel="self", href=f"{base}/archive/feed.xml")
    el(root, "link", rel="alternate", type="text/html", href=f"{base}/archive")
    stamps = [i.sent_at or i.built_at for i, _ in entries]
    el(root, "updated", _iso(max(stamps) if stamps else datetime(2026, 1, 1, tzinfo=UTC)))
    el(el(root, "author"), "name", author)
    for issue, titles in entries:
        day = issue.edition_date.isoformat()
        entry = el(root, "entry")
        el(entry, "title", issue.subject)
        el(entry, "id", f"tag:{host},{issue.edition_date.year}:digest:issue:{day}")
        el(entry, "link", rel="alternate", type="text/html", href=f"{base}/archive/{day}")
        el(entry, "published", _iso(issue.sent_at or issue.built_at))
        el(entry, "updated", _iso(issue.sent_at or issue.built_at))
        el(entry, "summary", "\n".join(titles))
    return bytes(ET.tostring(root, encoding="utf-8", xml_declaration=True))
