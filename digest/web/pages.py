"""The web pages' templates (``templates/web/``) and the responses made from them.

Autoescaped Jinja2: every value a reader or a feed supplied is escaped, and no template
marks user data ``|safe``. Links between pages are relative to the page (``root`` is
``./`` or ``../``), so the app works at the root of a host or under a path prefix that a
reverse proxy strips; links in mails use ``[unsubscribe] base_url``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import jinja2
from starlette.requests import Request
from starlette.responses import HTMLResponse

from digest.config import Config
from digest.errors import RenderError
from digest.render import packaged_templates_dir

PAGES: Final = (
    "web/subscribe.html.j2",
    "web/check_inbox.html.j2",
    "web/confirm.html.j2",
    "web/confirmed.html.j2",
    "web/expired.html.j2",
    "web/superseded.html.j2",
    "web/preferences.html.j2",
    "web/unsubscribe.html.j2",
    "web/unsubscribed.html.j2",
    "web/archive.html.j2",
    "web/error.html.j2",
    "web/mail/confirm.txt.j2",
    "web/mail/already.txt.j2",
)

ERRORS: Final[Mapping[int, tuple[str, str]]] = {
    400: ("Bad request", "We could not read what your browser sent. Go back and try again."),
    403: ("Not allowed", "This form can only be sent from our own pages."),
    404: ("Page not found", "There is no page at this address."),
    405: ("Not allowed", "This page cannot be used that way."),
    413: (
        "Too much data",
        "What your browser sent is larger than 64 KB. Go back and shorten it.",
    ),
    429: (
        "Too many requests",
        "There have been too many signups from your network in the last hour. "
        "Please try again later.",
    ),
    500: ("Something went wrong", "Please try again in a few minutes."),
    503: ("Temporarily unavailable", "Please try again in a few minutes."),
}


def root_of(path: str) -> str:
    """The relative link from a page at ``path`` to the app's root: ``./`` or ``../…``."""
    depth = path.count("/") - 1
    return "../" * depth if depth > 0 else "./"


def _autoescape(name: str | None) -> bool:
    # Mails are plain text; everything else is HTML and escaped.
    return not (name or "").endswith(".txt.j2")


class Pages:
    """The Jinja2 environment of the web pages, plus what every page shows."""

    def __init__(self, config: Config) -> None:
        folders = [str(packaged_templates_dir())]
        if config.newsletter.templates_dir is not None:
            folders.insert(0, str(config.newsletter.templates_dir))  # the operator's copy wins
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(folders),
            autoescape=_autoescape,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.common: dict[str, Any] = {
            "publication": config.publication,
            "newsletter": config.newsletter,
            "regions": config.newsletter.regions,
            "catch_all": config.newsletter.catch_all,
            "signup_enabled": config.signup.enabled,
            "archive_enabled": config.archive.enabled,
        }
        # Fail at start-up, not on a reader's first click, when a template is broken.
        for name in PAGES:
            self._template(name)

    def _template(self, name: str) -> jinja2.Template:
        try:
            return self.env.get_template(name)
        except jinja2.TemplateSyntaxError as exc:
            raise RenderError(
                f"{exc.filename}:{exc.lineno}: template error: {exc.message}"
            ) from None
        except jinja2.TemplateNotFound:
            raise RenderError(f"template {name} not found") from None

    def text(self, template: str, **ctx: Any) -> str:
        """Render a template (a page or a mail) to a string."""
        return self._template(template).render({**self.common, **ctx})

    def page(
        self,
        request: Request,
        template: str,
        status: int = 200,
        headers: Mapping[str, str] | None = None,
        **ctx: Any,
    ) -> HTMLResponse:
        """An HTML page; not cached unless ``headers`` say otherwise."""
        html = self.text(template, root=root_of(request.url.path), **ctx)
        return HTMLResponse(html, status, headers={"Cache-Control": "no-store", **(headers or {})})

    def error_html(
        self, status: int, path: str, message: str | None = None, title: str | None = None
    ) -> str:
        """The error page of ``status``."""
        default_title, default = ERRORS.get(status, ERRORS[500])
        return self.text(
            "web/error.html.j2",
            root=root_of(path),
            title=title or default_title,
            message=message or default,
            noindex=True,
        )

    def error(
        self,
        request: Request,
        status: int,
        message: str | None = None,
        headers: Mapping[str, str] | None = None,
        title: str | None = None,
    ) -> HTMLResponse:
        """An error page response; never cached or indexed (it may answer a token's URL)."""
        return HTMLResponse(
            self.error_html(status, request.url.path, message, title),
            status,
            headers={"Cache-Control": "no-store", "X-Robots-Tag": "noindex", **(headers or {})},
        )
