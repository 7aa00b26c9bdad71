"""What every page group of the web app shares, built once by :func:`digest.web.create_app`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from urllib.parse import urlsplit

from sqlalchemy.orm import Session, sessionmaker
from starlette.requests import Request

from digest.config import Config
from digest.tokens import ConfirmSigner, TokenSigner
from digest.web.clientip import Network, client_address
from digest.web.pages import Pages


@dataclass(frozen=True)
class Web:
    """The composed pieces: config, database, templates, signers, the mail queue's bell."""

    config: Config
    sessions: sessionmaker[Session]
    pages: Pages
    unsubscribe: TokenSigner
    preferences: TokenSigner
    confirm: ConfirmSigner
    trusted_proxies: tuple[Network, ...]
    wake_mailer: Callable[[], None]

    @property
    def origin(self) -> str:
        """The public origin of the pages (of ``[unsubscribe] base_url``)."""
        return origin_of(self.config.unsubscribe.base_url)

    @property
    def confirm_ttl(self) -> timedelta:
        """How long a confirmation link works."""
        return self.confirm.ttl

    def client(self, request: Request) -> str:
        """The client address that per-client limits count (see :mod:`.clientip`)."""
        peer = request.client.host if request.client else None
        return client_address(
            peer, request.headers.getlist("x-forwarded-for"), self.trusted_proxies
        )


def cross_site(request: Request, own_origin: str) -> bool:
    """True when a browser says this request was started by a page that is not ours.

    The forms of the preference centre and the confirm page are only ever posted from our
    own pages, so anything but ``Sec-Fetch-Site: same-origin`` (or ``none``: the reader
    typed or bookmarked it) is refused; ``same-site`` too, since a sibling host (the
    magazine's own site, a user-content host) is not us. Browsers without Fetch Metadata
    are judged by ``Origin``: it must be ``own_origin`` (the public origin of
    ``base_url``) or the host the request was sent to. ``Origin: null`` is what our own
    pages send (``Referrer-Policy: no-referrer``), so it cannot be told apart and passes:
    the token in the path is the authorisation, as for one-click unsubscribe. (The signup
    form is meant to be posted from the publication's site, and one-click unsubscribe
    from mail clients, so neither checks this.)
    """
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site.strip().lower() not in ("same-origin", "none")
    origin = request.headers.get("origin", "").strip().lower()
    if not origin or origin == "null":
        return False
    if origin.rstrip("/") == own_origin:
        return False
    host = request.headers.get("host", "").strip().lower()
    return not host or urlsplit(origin).netloc != host


def origin_of(url: str) -> str:
    """``scheme://host[:port]`` of a URL, lowercased (as browsers send ``Origin``)."""
    parts = urlsplit(url.strip())
    return f"{parts.scheme}://{parts.netloc}".lower()
