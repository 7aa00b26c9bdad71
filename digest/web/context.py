"""What every page group of the web app shares, built once by :func:`digest.web.create_app`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

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
    def confirm_ttl(self) -> timedelta:
        """How long a confirmation link works."""
        return self.confirm.ttl

    def client(self, request: Request) -> str:
        """The client address that per-client limits count (see :mod:`.clientip`)."""
        peer = request.client.host if request.client else None
        return client_address(
            peer, request.headers.getlist("x-forwarded-for"), self.trusted_proxies
        )


def cross_site(request: Request) -> bool:
    """True when a browser says this request was started by another site.

    Browsers send ``Sec-Fetch-Site`` on every request; forms of the preference centre and
    the confirm page are only ever posted from our own pages. (The signup form is meant to
    be posted from the publication's site, and one-click unsubscribe from mail clients,
    so neither checks this.)
    """
    return request.headers.get("sec-fetch-site", "").lower() == "cross-site"
