"""``digest preview --serve``: the draft as it will be sent, in a local browser page.

One page with a switch per edition (each region set subscribers have) and per subscriber,
desktop (1024 px) and mobile (375 px) widths, and the HTML or the plain-text part. The
message itself is rendered by :func:`digest.preview.preview`, the same code as
``digest preview`` and ``send``, and shown in a sandboxed frame that may run no script.

Live reload without websockets: the page asks ``/version`` every second for a fingerprint
of the templates folder and of the issue (selection, lead, note, subject, approval, the
articles' text) and reloads the frame when it changes. Nothing here writes anything.
It listens on 127.0.0.1 only: it shows subscribers' addresses. Loopback alone is not
enough: a page the editor visits can re-point its own name at 127.0.0.1 (DNS rebinding)
and then read this server as its own origin, so any request whose ``Host`` is not this
server's own address is refused (:class:`OwnHostOnly`).
"""

from __future__ import annotations

import hashlib
import html
import json
from datetime import date

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from digest import editorial, pipeline, store
from digest.errors import DigestError
from digest.render import templates_dir
from digest.select import edition_key

MAX_SUBSCRIBERS = 200  # in the switch; any address can be typed in the URL
ALL = "*"

# The page's own resources only; the message frame gets a stricter policy of its own.
_PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; "
    "connect-src 'self'; frame-src 'self'; img-src 'self'"
)
# The message: its inline styles and remote images, never a script, a form or a frame.
_MESSAGE_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src * data:; font-src *"

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Preview · {title} · {date}</title>
<style>
body {{ margin: 0; font: 14px/1.4 -apple-system, "Segoe UI", Roboto, Helvetica, Arial,
  sans-serif; background: #e8e6e1; color: #1a1a1a; }}
header {{ display: flex; flex-wrap: wrap; gap: 10px; align-items: center; padding: 10px 16px;
  background: #1a1a1a; color: #fff; font-size: 13px; }}
header h1 {{ font-size: 14px; margin: 0 8px 0 0; }}
#subscriber {{ max-width: 200px; }}
header label {{ display: flex; gap: 6px; align-items: center; }}
header select, header input {{ font: inherit; padding: 3px 6px; }}
.group button {{ font: inherit; padding: 4px 10px; border: 1px solid #888; background: #333;
  color: #fff; cursor: pointer; }}
.group button[aria-pressed="true"] {{ background: #fff; color: #1a1a1a; }}
#status {{ margin-left: auto; font-size: 12px; color: #bbb; }}
main {{ display: flex; justify-content: center; padding: 16px; }}
iframe {{ border: 0; background: #fff; height: calc(100vh - 90px); width: 1024px;
  max-width: 100%; box-shadow: 0 1px 6px rgba(0,0,0,.2); }}
iframe.mobile {{ width: 375px; }}
</style></head>
<body>
<header>
<h1>{title} · {date} · <span id="issue-status">{status}</span></h1>
<label>Date <input id="date" type="date" value="{date}"></label>
<label>Edition <select id="edition">{editions}</select></label>
<label>Subscriber <select id="subscriber">{subscribers}</select></label>
<span class="group" role="group" aria-label="Width">
<button type="button" id="desktop" aria-pressed="true">Desktop</button><button
 type="button" id="mobile" aria-pressed="false">Mobile</button></span>
<span class="group" role="group" aria-label="Part">
<button type="button" id="tab-html" aria-pressed="true">HTML</button><button
 type="button" id="tab-text" aria-pressed="false">Plain text</button></span>
<span id="status"></span>
</header>
<main><iframe id="message" title="The message" sandbox="allow-popups
 allow-popups-to-escape-sandbox" src="about:blank"></iframe></main>
<script src="/preview.js"></script>
</body></html>
"""

_SCRIPT = """"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const frame = $("message");
  let part = "html";
  let version = null;
  let loads = 0;
  function src() {
    const q = new URLSearchParams({ date: $("date").value, part: part });
    const sub = $("subscriber").value;
    if (sub) q.set("subscriber", sub); else q.set("edition", $("edition").value);
    return "/message?" + q.toString();
  }
  function load() {
    loads += 1;
    frame.dataset.loads = String(loads);
    frame.src = src();
  }
  function press(on, off) {
    $(on).setAttribute("aria-pressed", "true");
    $(off).setAttribute("aria-pressed", "false");
  }
  $("edition").addEventListener("change", load);
  $("subscriber").addEventListener("change", function () {
    $("edition").disabled = Boolean($("subscriber").value);
    load();
  });
  $("date").addEventListener("change", function () {
    location.search = "?date=" + encodeURIComponent($("date").value);
  });
  $("desktop").addEventListener("click", function () {
    frame.classList.remove("mobile"); press("desktop", "mobile");
  });
  $("mobile").addEventListener("click", function () {
    frame.classList.add("mobile"); press("mobile", "desktop");
  });
  $("tab-html").addEventListener("click", function () {
    part = "html"; press("tab-html", "tab-text"); load();
  });
  $("tab-text").addEventListener("click", function () {
    part = "text"; press("tab-text", "tab-html"); load();
  });
  async function poll() {
    try {
      const r = await fetch("/version?date=" + encodeURIComponent($("date").value),
                            { cache: "no-store" });
      const v = await r.json();
      if (version !== null && v.version !== version) {
        $("issue-status").textContent = v.status;
        $("status").textContent = "reloaded " + new Date().toLocaleTimeString();
        load();
      }
      version = v.version;
    } catch (e) {
      $("status").textContent = "preview server unreachable";
    }
    setTimeout(poll, 1000);
  }
  load();
  poll();
})();
"""


_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


class OwnHostOnly:
    """ASGI middleware: serve only requests addressed to this server by one of its own
    names (the address it listens on, ``localhost``, ``127.0.0.1``, ``[::1]``) with its
    port; anything else gets a 421 page that names the address to use.

    The listening address comes from the connection (the ASGI ``server``), so the check
    holds whatever port was chosen, including an ephemeral one.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host, port = scope.get("server") or ("127.0.0.1", 80)
        names = {*_LOOPBACK_NAMES, f"[{host}]" if ":" in host else host}
        allowed = {f"{name}:{port}" for name in names}
        if port == 80:  # browsers leave the default port out
            allowed |= names
        asked = Headers(scope=scope).get("host", "")
        if asked.strip().lower() in allowed:
            await self.app(scope, receive, send)
            return
        where = f"http://127.0.0.1:{port}/"
        page = (
            "<!DOCTYPE html><meta charset='utf-8'><title>Wrong address</title>"
            "<p style='font-family:sans-serif;padding:24px'>This digest preview answers "
            f"only at <a href='{where}'>{where}</a>. The request named another host "
            f"(Host: {html.escape(asked[:200]) or 'none'}), so it was refused: a web page "
            "could otherwise read subscribers' addresses and drafts from here.</p>"
        )
        response = HTMLResponse(page, status_code=421, headers=_headers(_MESSAGE_CSP))
        await response(scope, receive, send)


def _editions(app: pipeline.App) -> list[tuple[str, ...] | None]:
    """Every edition subscribers get (each distinct region set), in config order."""
    configured = app.config.newsletter.regions
    keys: set[tuple[str, ...]] = set()
    with app.sessions() as session:
        for regions in store.iter_active_regions(session):
            key = edition_key(regions, configured)
            if key:
                keys.add(key)
    order = {r: i for i, r in enumerate(configured)}
    return [None, *sorted(keys, key=lambda k: [order[r] for r in k])]


def fingerprint(app: pipeline.App, edition_date: date) -> tuple[str, str]:
    """A value that changes when the templates or the issue change, and the issue's status."""
    h = hashlib.sha256()
    folder = templates_dir(app.config)
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if path.is_file():
            stat = path.stat()
            h.update(f"{path.name}\0{stat.st_mtime_ns}\0{stat.st_size}\n".encode())
    with app.sessions() as session:
        issue, sections = pipeline.issue_sections(session, app.config, edition_date)
        status = "not built yet (the rules' selection)"
        if issue is not None:
            status = editorial.display_status(app.config, issue)
            h.update(
                json.dumps(
                    [issue.subject, issue.note, issue.lead_article_id, str(issue.approved_at)]
                ).encode()
            )
        for section in sections:
            for a in section.articles:
                h.update(
                    json.dumps(
                        [section.name, a.id, a.title, a.dek, a.image_url, a.image_credit]
                    ).encode()
                )
    return h.hexdigest()[:16], status


def create_preview_app(app: pipeline.App, default_date: date | None = None) -> Starlette:
    """The preview's ASGI app for one database and config."""
    config = app.config

    def edition_date(request: Request) -> date:
        value = request.query_params.get("date")
        if value:
            try:
                return date.fromisoformat(value)
            except ValueError:
                pass
        if default_date is not None:
            return default_date
        return editorial.working_date(app)

    def page(request: Request) -> Response:
        d = edition_date(request)
        _, status = fingerprint(app, d)
        editions = "".join(
            f'<option value="{html.escape(ALL if k is None else "|".join(k))}">'
            f"{html.escape('All sections' if k is None else ', '.join(k))}</option>"
            for k in _editions(app)
        )
        with app.sessions() as session:
            subs = store.active_subscribers(session, MAX_SUBSCRIBERS)
        subscribers = '<option value="">— a sample reader —</option>' + "".join(
            f'<option value="{html.escape(s.email)}">'
            f"{html.escape(s.email + (f' ({s.name})' if s.name else ''))}</option>"
            for s in subs
        )
        body = _PAGE.format(
            title=html.escape(config.newsletter.title),
            date=d.isoformat(),
            status=html.escape(status),
            editions=editions,
            subscribers=subscribers,
        )
        return HTMLResponse(body, headers=_headers(_PAGE_CSP))

    def message(request: Request) -> Response:
        d = edition_date(request)
        part = "text" if request.query_params.get("part") == "text" else "html"
        subscriber = request.query_params.get("subscriber") or None
        raw = request.query_params.get("edition", ALL)
        regions = None if raw == ALL else [r for r in raw.split("|") if r]
        fmt: pipeline.PreviewFormat = "text" if part == "text" else "html"
        try:
            data = pipeline.preview(app, d, subscriber, fmt, regions)
        except DigestError as exc:
            return HTMLResponse(
                f"<!DOCTYPE html><p style='font-family:sans-serif;padding:24px'>"
                f"{html.escape(str(exc))}</p>",
                status_code=404,
                headers=_headers(_MESSAGE_CSP),
            )
        if part == "text":
            return PlainTextResponse(data.decode("utf-8"), headers=_headers(_MESSAGE_CSP))
        return HTMLResponse(data.decode("utf-8"), headers=_headers(_MESSAGE_CSP))

    def version(request: Request) -> Response:
        value, status = fingerprint(app, edition_date(request))
        return JSONResponse({"version": value, "status": status}, headers=_headers(_PAGE_CSP))

    def script(request: Request) -> Response:
        return Response(_SCRIPT, media_type="text/javascript", headers=_headers(_PAGE_CSP))

    return Starlette(
        routes=[
            Route("/", page, methods=["GET"]),
            Route("/message", message, methods=["GET"]),
            Route("/version", version, methods=["GET"]),
            Route("/preview.js", script, methods=["GET"]),
            Route("/favicon.ico", lambda request: Response(status_code=204), methods=["GET"]),
        ],
        middleware=[Middleware(OwnHostOnly)],
    )


def _headers(csp: str) -> dict[str, str]:
    return {
        "Content-Security-Policy": csp,
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }


def serve_preview(app: pipeline.App, default_date: date | None, port: int) -> None:
    """Serve the preview on 127.0.0.1:``port`` until Ctrl-C."""
    import uvicorn

    uvicorn.run(
        create_preview_app(app, default_date), host="127.0.0.1", port=port, log_level="warning"
    )
