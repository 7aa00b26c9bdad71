"""The unsubscribe web app (``digest serve``): RFC 8058 one-click POST and a confirm page.

* ``POST /unsubscribe/{token}``: what Gmail and Yahoo send when the reader clicks their
  "Unsubscribe" button (body ``List-Unsubscribe=One-Click``), and what our confirm page's
  button sends. Unsubscribes at once, idempotent, 200. No cookies, no CSRF token: the
  signed token is the whole authorisation, as RFC 8058 intends.
* ``GET /unsubscribe/{token}``: only a page with a confirm button. Link scanners and
  mail-security proxies follow every GET in a message, so a GET must never unsubscribe.
* A bad token gets the same 400 page whatever is wrong with it, revealing nothing about
  who is or is not subscribed.
"""

from __future__ import annotations

import html
from datetime import UTC, datetime

from sqlalchemy.orm import Session, sessionmaker
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.routing import Route

from digest import store
from digest.config import Config
from digest.errors import TokenError
from digest.subscribers import unsubscribe
from digest.tokens import TokenSigner

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex">
<title>{title}</title>
<style>
body {{ font-family: -apple-system, BlinkMacSystemFont, "Segoe UI", Roboto, Helvetica, Arial,
  sans-serif; background: #f4f2ee; color: #1a1a1a; margin: 0; padding: 48px 16px; }}
main {{ max-width: 480px; margin: 0 auto; background: #fff; padding: 32px;
  border-top: 4px solid #8c1c13; }}
h1 {{ font-family: Georgia, "Times New Roman", serif; font-size: 26px; margin: 0 0 16px; }}
p {{ font-size: 16px; line-height: 24px; }}
button {{ font-size: 16px; padding: 12px 24px; background: #8c1c13; color: #fff; border: 0;
  cursor: pointer; }}
</style></head>
<body><main><h1>{title}</h1>{body}</main></body></html>
"""


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(
        _PAGE.format(title=html.escape(title), body=body),
        status_code=status,
        headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"},
    )


def create_app(config: Config, sessions: sessionmaker[Session]) -> Starlette:
    """The ASGI app; ``uvicorn`` serves it, tests drive it with Starlette's TestClient."""
    signer = TokenSigner(config.unsubscribe_secret, config.unsubscribe_old_secrets)
    title = html.escape(config.newsletter.title)
    publication = html.escape(config.publication.name)

    def bad_token() -> HTMLResponse:
        return _page(
            "This link does not work",
            "<p>The unsubscribe link is incomplete or damaged. Copy the whole link from "
            "the email, or use the Unsubscribe link at the bottom of the latest issue.</p>",
            status=400,
        )

    def subscriber_id(request: Request) -> int | None:
        """The id the token names, if it verifies and still names that address.

        A token made for an address the id no longer has (the subscriber was deleted and
        the id reused, or the address changed) acts on nobody.
        """
        try:
            claim = signer.verify(request.path_params["token"])
        except TokenError:
            return None
        with sessions() as session:
            sub = store.subscriber_by_id(session, claim.subscriber_id)
            return sub.id if sub is not None and claim.matches(sub.email) else None

    def confirm(request: Request) -> Response:
        if subscriber_id(request) is None:
            return bad_token()
        action = html.escape(request.url.path, quote=True)
        return _page(
            f"Unsubscribe from {config.newsletter.title}?",
            f"<p>You will no longer receive {title} from {publication}.</p>"
            f'<form method="post" action="{action}">'
            '<input type="hidden" name="List-Unsubscribe" value="One-Click">'
            '<button type="submit">Unsubscribe</button></form>',
        )

    def do_unsubscribe(request: Request) -> Response:
        who = subscriber_id(request)
        if who is None:
            return bad_token()
        with sessions() as session:
            unsubscribe(session, who, datetime.now(UTC))
            session.commit()
        return _page(
            "You are unsubscribed",
            f"<p>You will not receive {title} from {publication} any more. "
            "If this was a mistake, subscribe again on our website.</p>",
        )

    def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    return Starlette(
        routes=[
            Route("/unsubscribe/{token}", confirm, methods=["GET"]),
            Route("/unsubscribe/{token}", do_unsubscribe, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
        ]
    )
