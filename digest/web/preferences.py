"""The preference centre: ``/preferences/{token}``.

Every round-up links here with a signed per-subscriber token (like the unsubscribe
link; it binds the subscriber id and their address). ``GET`` shows the name and the
region boxes as stored and never changes anything; ``POST`` saves them. The page also has
an unsubscribe button. A token that does not verify, or whose subscriber is gone or
has another address now, gets the same 400 page.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from digest import signup, store
from digest.errors import TokenError
from digest.models import Subscriber, SubscriberStatus
from digest.web.context import Web, cross_site
from digest.web.forms import BadForm, read_form
from digest.web.unsubscribe import NOINDEX, bad_link


def routes(web: Web) -> list[Route]:
    """The preference-centre routes."""
    configured = web.config.newsletter.regions

    def subscriber_id(token: str) -> int | None:
        try:
            return web.preferences.verify(token).subscriber_id
        except TokenError:
            return None

    def load(token: str, sub_id: int) -> Subscriber | None:
        with web.sessions() as session:
            sub = store.subscriber_by_id(session, sub_id)
            if sub is None or not web.preferences.verify(token).matches(sub.email):
                return None
            return sub

    def page(
        request: Request,
        sub: Subscriber,
        values: dict[str, Any],
        errors: dict[str, str] | None = None,
        saved: bool = False,
        status: int = 200,
    ) -> Response:
        return web.pages.page(
            request,
            "web/preferences.html.j2",
            status=status,
            headers=NOINDEX,
            title="Your preferences",
            name=sub.name,
            email=sub.email,
            active=sub.status == SubscriberStatus.ACTIVE,
            values=values,
            errors=errors or {},
            saved=saved,
            token=request.path_params["token"],
            unsubscribe_token=web.unsubscribe.token(sub.id, sub.email),
            noindex=True,
        )

    def show(request: Request) -> Response:
        token = request.path_params["token"]
        sub_id = subscriber_id(token)
        sub = load(token, sub_id) if sub_id is not None else None
        if sub is None:
            return bad_link(web, request, "preferences link")
        return page(request, sub, {"name": sub.name, "regions": sub.regions})

    def save(token: str, sub_id: int, name: str, regions: list[str] | None) -> Subscriber | None:
        with web.sessions.begin() as session:
            sub = store.subscriber_by_id(session, sub_id)
            if sub is None or not web.preferences.verify(token).matches(sub.email):
                return None
            signup.save_preferences(sub, name, regions, datetime.now(UTC))
            return sub

    async def submit(request: Request) -> Response:
        if cross_site(request, web.origin):
            return web.pages.error(request, 403, headers=NOINDEX)
        token = request.path_params["token"]
        sub_id = subscriber_id(token)
        if sub_id is None:
            return bad_link(web, request, "preferences link")
        try:
            form = await read_form(request)
        except BadForm as exc:
            return web.pages.error(request, 400, f"The form could not be read: {exc}.")
        raw_name, raw_regions = form.get("name"), form.getlist("regions")
        name, name_error = signup.validate_name(raw_name)
        regions, regions_error = signup.parse_regions(raw_regions, configured)
        if name_error or regions_error:
            sub = await run_in_threadpool(load, token, sub_id)
            if sub is None:
                return bad_link(web, request, "preferences link")
            errors = {k: v for k, v in (("name", name_error), ("regions", regions_error)) if v}
            values = {"name": raw_name[:200], "regions": raw_regions}
            return page(request, sub, values, errors, status=400)
        saved = await run_in_threadpool(save, token, sub_id, name, regions)
        if saved is None:
            return bad_link(web, request, "preferences link")
        return page(request, saved, {"name": saved.name, "regions": saved.regions}, saved=True)

    return [
        Route("/preferences/{token}", show, methods=["GET"]),
        Route("/preferences/{token}", submit, methods=["POST"]),
    ]
