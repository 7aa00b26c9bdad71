"""Signup with double opt-in: ``/subscribe`` and ``/confirm/{token}``.

``POST /subscribe`` is meant to be posted cross-origin, from the publication's own
"Subscribe now" box. It is the one public form that makes us send mail, so:

* every POST counts against the client's hourly limit (``[signup] max_per_ip_per_hour``,
  kept in the database so every serve process shares it) before anything else is done;
* a valid address always gets the same "check your inbox" page, whatever it is (new,
  subscribed, unsubscribed, bounced) and whether or not the honeypot field was filled:
  the page never tells who is on the list;
* the mail itself is only queued (see :mod:`digest.signup` for the per-address
  cooldowns) and sent by the serve process's mailer within seconds.

``GET /confirm/{token}`` only shows a button (scanners fetch every link in a mail, and
some submit forms that submit themselves, so there is no script); ``POST`` subscribes.
A link from before the address last unsubscribed or bounced gets a "superseded, sign up
again" page instead, on both (:func:`digest.signup.link_standing`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from digest import signup, store
from digest.addresses import normalize_email
from digest.errors import ExpiredToken, TokenError
from digest.tokens import SignupClaim
from digest.web.context import Web, cross_site
from digest.web.forms import BadForm, read_form
from digest.web.unsubscribe import NOINDEX, bad_link

log = logging.getLogger("digest.serve")

HOUR = timedelta(hours=1)


def _blank() -> dict[str, object]:
    return {"email": "", "name": "", "regions": []}


def routes(web: Web) -> list[Route]:
    """The signup and confirmation routes."""
    config = web.config
    title = config.newsletter.title
    limit = config.signup.max_per_ip_per_hour

    def form_page(
        request: Request,
        values: Mapping[str, object] | None = None,
        errors: dict[str, str] | None = None,
        status: int = 200,
    ) -> Response:
        return web.pages.page(
            request,
            "web/subscribe.html.j2",
            status=status,
            title=f"Subscribe to {title}",
            values=values or _blank(),
            errors=errors or {},
        )

    def show_form(request: Request) -> Response:
        return form_page(request)

    def count_client(client: str) -> tuple[int, datetime | None]:
        now = datetime.now(UTC)
        with web.sessions.begin() as session:
            hits = store.hit_counter(session, f"ip:{client}", HOUR, now)
            until = store.throttle_until(session, f"ip:{client}") if hits > limit else None
        return hits, until

    def queue(req: signup.SignupRequest) -> signup.SignupOutcome:
        with web.sessions.begin() as session:
            return signup.request_signup(session, req, datetime.now(UTC))

    async def submit(request: Request) -> Response:
        client = web.client(request)
        hits, until = await run_in_threadpool(count_client, client)
        if hits > limit:
            wait = max(1, int(((until or datetime.now(UTC)) - datetime.now(UTC)).total_seconds()))
            if hits == limit + 1:
                log.warning("signup: client %s reached %d requests this hour", client, limit)
            return web.pages.error(request, 429, headers={"Retry-After": str(wait)})
        try:
            form = await read_form(request)
        except BadForm as exc:
            return web.pages.error(request, 400, f"The form could not be read: {exc}.")
        email, name, regions = form.get("email"), form.get("name"), form.getlist("regions")
        req, errors = signup.validate_signup(email, name, regions, config.newsletter.regions)
        if req is None:
            # Re-shown as typed (escaped by the template), cut so a 60 KB field is not
            # echoed back whole.
            values = {"email": email[:320], "name": name[:200], "regions": regions}
            return form_page(request, values, errors, status=400)
        if form.get("website").strip():
            log.info("signup: honeypot filled by client %s; nothing sent", client)
        else:
            outcome = await run_in_threadpool(queue, req)
            if outcome != signup.SignupOutcome.COOLDOWN:
                web.wake_mailer()
        return web.pages.page(
            request, "web/check_inbox.html.j2", title="Check your inbox", email=req.email
        )

    def verified(request: Request) -> SignupClaim | Response:
        try:
            return web.confirm.verify(request.path_params["token"])
        except ExpiredToken:
            return web.pages.page(
                request,
                "web/expired.html.j2",
                status=410,
                headers=NOINDEX,
                title="This link has expired",
                ttl_hours=int(web.confirm_ttl.total_seconds() // 3600),
                noindex=True,
            )
        except TokenError:
            return bad_link(web, request, "confirmation link")

    def superseded(request: Request) -> Response:
        return web.pages.page(
            request,
            "web/superseded.html.j2",
            status=410,
            headers=NOINDEX,
            title="This link was superseded",
            noindex=True,
        )

    def standing(claim: SignupClaim) -> signup.ConfirmOutcome:
        try:
            email = normalize_email(claim.email)
        except ValueError:
            return signup.ConfirmOutcome.CONFIRMED  # refused by the POST, as before
        with web.sessions() as session:
            return signup.link_standing(store.subscriber_by_email(session, email), claim)

    def show_confirm(request: Request) -> Response:
        claim = verified(request)
        if isinstance(claim, Response):
            return claim
        if standing(claim) == signup.ConfirmOutcome.SUPERSEDED:
            return superseded(request)
        chosen, _ = signup.parse_regions(claim.regions or [], config.newsletter.regions)
        return web.pages.page(
            request,
            "web/confirm.html.j2",
            headers=NOINDEX,
            title="Confirm your subscription",
            email=claim.email,
            name=claim.name,
            chosen=chosen,
            token=request.path_params["token"],
            noindex=True,
        )

    def do_confirm(request: Request) -> Response:
        if cross_site(request, web.origin):
            return web.pages.error(request, 403, headers=NOINDEX)
        claim = verified(request)
        if isinstance(claim, Response):
            return claim
        try:
            with web.sessions.begin() as session:
                sub, outcome = signup.confirm_signup(
                    session, claim, config.newsletter.regions, datetime.now(UTC)
                )
                sub_id, email = sub.id, sub.email
        except ValueError:  # a signed address we could no longer accept
            return bad_link(web, request, "confirmation link")
        if outcome == signup.ConfirmOutcome.SUPERSEDED:
            return superseded(request)
        return web.pages.page(
            request,
            "web/confirmed.html.j2",
            headers=NOINDEX,
            title="You are subscribed",
            email=email,
            preferences_token=web.preferences.token(sub_id, email),
            noindex=True,
        )

    return [
        Route("/subscribe", show_form, methods=["GET"]),
        Route("/subscribe", submit, methods=["POST"]),
        Route("/confirm/{token}", show_confirm, methods=["GET"]),
        Route("/confirm/{token}", do_confirm, methods=["POST"]),
    ]
