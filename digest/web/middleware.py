"""One ASGI middleware for what every response and every request body must obey.

* Security headers on every response: a Content-Security-Policy without any script
  (routes that need another policy, the archive page, set their own), framing refused,
  no Referer leaked to the sites our pages link to, no MIME sniffing.
* Request bodies are read here, before any route sees them, and capped at
  :data:`MAX_BODY` (64 KB): a declared ``Content-Length`` over the cap is refused without
  reading a byte, and a chunked body is cut off as soon as it passes the cap (413).
  uvicorn has no such limit, and Starlette only limits form field counts and part sizes.
* A body that is not UTF-8 is refused (400): every form we accept is text, and the
  decoders behind Starlette's forms would otherwise turn bad bytes into latin-1.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_BODY: Final = 64 * 1024

PAGE_CSP: Final = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)

SECURITY_HEADERS: Final = (
    ("content-security-policy", PAGE_CSP),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "no-referrer"),
    ("x-content-type-options", "nosniff"),
    ("cross-origin-opener-policy", "same-origin"),
)

ErrorPage = Callable[[int, str], bytes]
"""Renders the HTML error page for a status code (400, 413) and request path."""


class _TooLarge(Exception):
    pass


class Guard:
    """The middleware; ``error_page`` renders the 400 and 413 pages it answers itself."""

    def __init__(self, app: ASGIApp, error_page: ErrorPage, max_body: int = MAX_BODY) -> None:
        self.app = app
        self.error_page = error_page
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        send = _with_headers(send)
        declared = _content_length(scope)
        if declared == -1:
            await self._refuse(send, 400, scope)
            return
        if declared is not None and declared > self.max_body:
            await self._refuse(send, 413, scope)
            return
        try:
            body, disconnected = await self._read_body(receive)
        except _TooLarge:
            await self._refuse(send, 413, scope)
            return
        if disconnected:
            return
        try:
            body.decode("utf-8")
        except UnicodeDecodeError:
            await self._refuse(send, 400, scope)
            return

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # only http.disconnect is left to come

        await self.app(scope, replay, send)

    async def _read_body(self, receive: Receive) -> tuple[bytes, bool]:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", True
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), False

    async def _refuse(self, send: Send, status: int, scope: Scope) -> None:
        body = self.error_page(status, str(scope.get("path", "/")))
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"text/html; charset=utf-8"),
                    (b"content-length", str(len(body)).encode()),
                    (b"cache-control", b"no-store"),
                    (b"x-robots-tag", b"noindex"),
                    # The rest of an oversized body is never read: the connection cannot
                    # carry another request.
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _content_length(scope: Scope) -> int | None:
    """The declared body length; None when absent, -1 when malformed."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                return -1
            return length if length >= 0 else -1
    return None


def _with_headers(send: Send) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", ()))
            present = {name.lower() for name, _ in headers}
            for name, value in SECURITY_HEADERS:
                if name.encode() not in present:
                    headers.append((name.encode(), value.encode()))
            message = {**message, "headers": headers}
        await send(message)

    return wrapped
