"""Unsubscribe pages: RFC 8058 one-click POST and a confirm page.

* ``POST /unsubscribe/{token}``: what Gmail and Yahoo send when the reader clicks their
  "Unsubscribe" button (body ``List-Unsubscribe=One-Click``), and what our confirm page's
  button sends. Unsubscribes at once, idempotent, 200. No cookies, no CSRF token: the
  signed token is the whole authorisation, as RFC 8058 intends.
* ``GET /unsubscribe/{token}``: only a page with a confirm button. Link scanners and
  mail-security proxies follow every GET in a message, so a GET must never unsubscribe.
* A bad token gets the same 400 page whatever is wrong with it (forged, foreign, of
  another purpose, or naming an id that no longer has the address it was made for),
  revealing nothing about who is or is not subscribed.
"""

from __future__ import annotations

from datetime import UTC, datetime

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from digest import store
from digest.errors import TokenError
from digest.subscribers import unsubscribe
from digest.web.context import Web

NOINDEX = {"X-Robots-Tag": "noindex"}


def bad_link(web: Web, request: Request, what: str = "unsubscribe link") -> Response:
    """The one page every unusable token gets (400), whatever is wrong with it."""
    return web.pages.error(
        request,
        400,
        f"The {what} is incomplete or damaged. Copy the whole link from the email, or use "
        "the link at the bottom of the latest issue.",
        headers=NOINDEX,
        title="This link does not work",
    )


def routes(web: Web) -> list[Route]:
    """The unsubscribe routes."""
    title = web.config.newsletter.title

    def subscriber_id(request: Request) -> int | None:
        """The id the token names, if it verifies and still names that address.

        A token made for an address the id no longer has (the address changed) acts on
        nobody.
        """
        try:
            claim = web.unsubscribe.verify(request.path_params["token"])
        except TokenError:
            return None
        with web.sessions() as session:
            sub = store.subscriber_by_id(session, claim.subscriber_id)
            return sub.id if sub is not None and claim.matches(sub.email) else None

    def confirm(request: Request) -> Response:
        if subscriber_id(request) is None:
            return bad_link(web, request)
        return web.pages.page(
            request,
            "web/unsubscribe.html.j2",
            headers=NOINDEX,
            title=f"Unsubscribe from {title}?",
            action=request.url.path,
            noindex=True,
        )

    def do_unsubscribe(request: Request) -> Response:
        who = subscriber_id(request)
        if who is None:
            return bad_link(web, request)
        with web.sessions() as session:
            unsubscribe(session, who, datetime.now(UTC))
            session.commit()
        return web.pages.page(
            request,
            "web/unsubscribed.html.j2",
            headers=NOINDEX,
            title="You are unsubscribed",
            noindex=True,
        )

    return [
        Route("/unsubscribe/{token}", confirm, methods=["GET"]),
        Route("/unsubscribe/{token}", do_unsubscribe, methods=["POST"]),
    ]
