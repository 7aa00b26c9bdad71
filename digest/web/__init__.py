"""The reader-facing web app of ``digest serve``: one module per page group.

===================  ===========================================================
``unsubscribe``      ``/unsubscribe/{token}``: RFC 8058 one-click POST, confirm page
``signup``           ``/subscribe`` and ``/confirm/{token}``: double opt-in
``preferences``      ``/preferences/{token}``: name and regions, unsubscribe button
``archive``          ``/archive``, ``/archive/{YYYY-MM-DD}``, ``/archive/feed.xml``
``mailer``           the background task that sends queued signup mails
``middleware``       security headers, the 64 KB body cap, UTF-8 bodies only
``preview``          ``digest preview --serve``: the editor's local preview (its own app)
===================  ===========================================================

:func:`create_app` composes them. Every request is treated as hostile: no response ever
carries a stack trace, tokens are checked before anything is read from the database,
and GET never changes anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Final
from urllib.parse import quote

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from digest.config import Config
from digest.errors import DigestError
from digest.render import packaged_templates_dir
from digest.send import TransportFactory, transport_factory
from digest.tokens import ConfirmSigner, TokenSigner
from digest.web import archive, preferences, signup, unsubscribe
from digest.web.clientip import trusted_networks
from digest.web.context import Web
from digest.web.mailer import SignupMailer
from digest.web.middleware import SECURITY_HEADERS, Guard
from digest.web.pages import Pages

log = logging.getLogger("digest.serve")

ROBOTS: Final = (
    "User-agent: *\nDisallow: /unsubscribe/\nDisallow: /confirm/\nDisallow: /preferences/\n"
)
_STOP_GRACE_SECONDS: Final = 5.0

__all__ = ["create_app", "loggable_path"]


def loggable_path(path: str) -> str:
    """A request path as it may go into a log line: percent-encoded again, as it came
    over the wire. The path the app sees is decoded, and control characters in it
    (``%0b``, ``%0c``, ``%1b``, ``%c2%85``, ``%e2%80%a8``, and ``%0d%0a`` in the ASGI
    ``path``) would otherwise start or overwrite log lines of the requester's making."""
    return quote(path, safe="/!$&'()*+,;=:@~", errors="backslashreplace")


def create_app(
    config: Config,
    sessions: sessionmaker[Session],
    *,
    transports: TransportFactory | None = None,
    mailer_options: dict[str, float] | None = None,
) -> Starlette:
    """The ASGI app; ``uvicorn`` serves it, tests drive it with Starlette's TestClient.

    ``transports`` makes the connections signup mails go through (default: the configured
    ``[outbox]`` or ``[smtp]``, as for the round-ups). The signup mailer runs as a
    background task for the app's lifetime (ASGI lifespan), so it runs under uvicorn and
    in a TestClient used as a context manager. ``mailer_options`` passes poll and retry
    timings to it (tests).
    """
    pages = Pages(config)
    secret = config.unsubscribe_secret
    old_secrets = config.unsubscribe_old_secrets
    prefs = TokenSigner(secret, old_secrets, purpose="preferences")
    confirm = ConfirmSigner(secret, timedelta(hours=config.signup.confirm_ttl_hours), old_secrets)
    mailer = SignupMailer(
        config,
        sessions,
        pages,
        confirm,
        prefs,
        transports or transport_factory(config),
        **(mailer_options or {}),
    )
    web = Web(
        config=config,
        sessions=sessions,
        pages=pages,
        unsubscribe=TokenSigner(secret, old_secrets),
        preferences=prefs,
        confirm=confirm,
        trusted_proxies=trusted_networks(config.signup.trusted_proxies),
        wake_mailer=mailer.wake,
    )
    stylesheet = (packaged_templates_dir() / "web" / "digest.css").read_bytes()
    if config.newsletter.templates_dir is not None:
        own = config.newsletter.templates_dir / "web" / "digest.css"
        if own.is_file():
            stylesheet = own.read_bytes()

    def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    def css(request: Request) -> Response:
        return Response(
            stylesheet,
            media_type="text/css; charset=utf-8",
            headers={"Cache-Control": "public, max-age=3600"},
        )

    def robots(request: Request) -> Response:
        return PlainTextResponse(ROBOTS)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return pages.error(request, exc.status_code, headers=exc.headers)

    async def unavailable(request: Request, exc: Exception) -> Response:
        # The database is down or locked, or digest refused something: say so in the
        # log with the whole story, and show the reader a page without any of it.
        log.error(
            "%s %s: %s", request.method, loggable_path(request.scope["path"]), exc, exc_info=exc
        )
        return pages.error(request, 503, headers={"Retry-After": "60"})

    async def server_error(request: Request, exc: Exception) -> Response:
        # Runs outside the middleware (Starlette's outermost layer), so the security
        # headers are added here.
        response = pages.error(request, 500)
        for name, value in SECURITY_HEADERS:
            response.headers.setdefault(name, value)
        return response

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        stop = asyncio.Event()
        task = asyncio.create_task(mailer.run(stop)) if config.signup.enabled else None
        try:
            yield
        finally:
            stop.set()
            if task is not None:
                # A send in flight gets a moment; if cut off, its lease runs out and the
                # mail is sent by the next process to look (nothing is lost).
                with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                    await asyncio.wait_for(task, _STOP_GRACE_SECONDS)

    route_list: list[Route] = [
        *unsubscribe.routes(web),
        *(signup.routes(web) if config.signup.enabled else []),
        *preferences.routes(web),
        *archive.routes(web),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/assets/digest.css", css, methods=["GET"]),
        Route("/robots.txt", robots, methods=["GET"]),
    ]
    app = Starlette(
        routes=route_list,
        middleware=[
            Middleware(
                Guard, error_page=lambda status, path: pages.error_html(status, path).encode()
            )
        ],
        exception_handlers={
            HTTPException: http_error,
            SQLAlchemyError: unavailable,
            DigestError: unavailable,
            Exception: server_error,
        },
        lifespan=lifespan,
    )
    # Starlette answers "/archive/" with a redirect to an absolute URL made from the Host
    # header and the scheme it saw: behind a TLS proxy that is http://, a stripped path
    # prefix is lost, and a Host the client chose sends the reader (with the token in the
    # path) elsewhere. Every page has one address; anything else is 404.
    app.router.redirect_slashes = False
    return app
