# ruff: noqa: F811  (fixtures imported from tests/webutil.py are test parameters here)
"""The reader-facing app as an attacker, a bot, a mail scanner or a careless reverse proxy
would use it: each test names what it tries and what must hold."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from digest.models import SubscriberStatus
from digest.tokens import ConfirmSigner, TokenSigner
from tests.webutil import (
    EDITION_DATE,
    WebEnv,
    send_issue,
    sqlite_env,  # noqa: F401
)

SECRET = "test-secret-0123456789abcdef"  # write_config's [unsubscribe] secret
PREFS = TokenSigner(SECRET, purpose="preferences")
FORM = {"content-type": "application/x-www-form-urlencoded"}


# --- a careless reverse proxy ---------------------------------------------------------------


def test_a_trailing_slash_is_never_redirected_to_the_host_the_request_named(
    sqlite_env: WebEnv,
) -> None:
    """Starlette answers "/archive/" with a redirect to an absolute URL built from the
    Host header and the scheme it saw: behind a TLS proxy that is http://, behind a proxy
    that strips a path prefix the prefix is lost, and with a Host the client chose it
    sends the reader (and a preferences token in the path) to another site."""
    env = sqlite_env
    send_issue(env, ["reader@example.org"])
    token = PREFS.token(1, "reader@example.org")
    with env.client() as client:
        for method, path in [
            ("GET", "/archive/"),
            ("GET", f"/archive/{EDITION_DATE}/"),
            ("GET", "/subscribe/"),
            ("POST", "/subscribe/"),
            ("GET", f"/preferences/{token}/"),
        ]:
            r = client.request(
                method,
                path,
                headers={"Host": "evil.example", "X-Forwarded-Proto": "https"},
                follow_redirects=False,
            )
            assert r.status_code == 404, (method, path, r.headers.get("location"))
            assert "location" not in r.headers
            assert "evil.example" not in r.text and token not in r.text


# --- cross-site requests --------------------------------------------------------------------

# What browsers send on a form POST. Our own pages send "Referrer-Policy: no-referrer", so
# Chromium's same-origin posts carry "Origin: null" (seen in tests/test_web_browser.py).
REFUSED = {
    "cross-site": {"Sec-Fetch-Site": "cross-site"},
    "same-site": {"Sec-Fetch-Site": "same-site", "Origin": "https://www.example.org"},
    "origin-only": {"Origin": "https://evil.example"},  # a browser without Fetch Metadata
}
ALLOWED = {
    "same-origin": {"Sec-Fetch-Site": "same-origin", "Origin": "null"},
    "typed": {"Sec-Fetch-Site": "none"},
    "our-origin": {"Origin": "https://news.example.org"},  # base_url's origin
    "our-host": {"Origin": "http://testserver"},  # the Host the request was sent to
    "null-origin": {"Origin": "null"},
    "no-headers": {},
}


@pytest.mark.parametrize("headers", REFUSED.values(), ids=REFUSED.keys())
def test_preference_and_confirm_posts_from_another_site_change_nothing(
    sqlite_env: WebEnv, headers: dict[str, str]
) -> None:
    env = sqlite_env
    sub_id = env.add("own@example.org", SubscriberStatus.ACTIVE, name="Own")
    prefs = PREFS.token(sub_id, "own@example.org")
    confirm = ConfirmSigner(SECRET, timedelta(hours=72)).token(
        "new@example.org", "", None, datetime.now(UTC)
    )
    before = env.snapshot()
    with env.client() as client:
        r = client.post(f"/preferences/{prefs}", data={"regions": ["Europe"]}, headers=headers)
        assert r.status_code == 403 and r.headers["x-robots-tag"] == "noindex"
        r = client.post(f"/confirm/{confirm}", headers=headers)
        assert r.status_code == 403
    assert env.snapshot() == before


@pytest.mark.parametrize("headers", ALLOWED.values(), ids=ALLOWED.keys())
def test_preference_and_confirm_posts_from_our_pages_work(
    sqlite_env: WebEnv, headers: dict[str, str]
) -> None:
    env = sqlite_env
    sub_id = env.add("own@example.org", SubscriberStatus.ACTIVE, name="Own")
    prefs = PREFS.token(sub_id, "own@example.org")
    confirm = ConfirmSigner(SECRET, timedelta(hours=72)).token(
        "new@example.org", "", None, datetime.now(UTC)
    )
    with env.client() as client:
        r = client.post(
            f"/preferences/{prefs}", data={"name": "Own", "regions": ["Europe"]}, headers=headers
        )
        assert r.status_code == 200 and "preferences are saved" in r.text
        assert client.post(f"/confirm/{confirm}", headers=headers).status_code == 200
    own, new = env.subscriber("own@example.org"), env.subscriber("new@example.org")
    assert own is not None and own.regions == ["Europe"]
    assert new is not None and new.status == SubscriberStatus.ACTIVE


# --- bodies ---------------------------------------------------------------------------------


def _part(disposition: str, value: str) -> bytes:
    return f"Content-Disposition: form-data; {disposition}\r\n\r\n{value}\r\n".encode()


@pytest.mark.parametrize(
    ("body", "boundary"),
    [
        # python-multipart refuses boundaries over 256 bytes when the parser is made.
        (b"--" + b"B" * 300 + b"\r\n" + _part('name="email"', "long@example.org"), "B" * 300),
        # A file sent with the RFC 2231 form of its name is still a file.
        (
            b"--b\r\n" + _part("name=\"email\"; filename*=utf-8''cv.txt", "cv@example.org"),
            "b",
        ),
    ],
    ids=["boundary-over-256", "rfc2231-filename"],
)
def test_multipart_bodies_we_do_not_take_get_400(
    sqlite_env: WebEnv, body: bytes, boundary: str
) -> None:
    env = sqlite_env
    body += b"--" + boundary.encode() + b"--\r\n"
    with env.client() as client:
        r = client.post(
            "/subscribe",
            content=body,
            headers={"content-type": f"multipart/form-data; boundary={boundary}"},
        )
    assert r.status_code == 400 and "The form could not be read" in r.text
    assert env.mails() == []


# --- the archive ----------------------------------------------------------------------------


def test_an_issue_has_one_address_in_the_archive(sqlite_env: WebEnv, tmp_path: Path) -> None:
    """Other spellings of the date (ISO week dates, which date.fromisoformat accepts) are
    404, not the same page under another URL."""
    env = sqlite_env
    send_issue(env, ["reader@example.org"])
    with env.client() as client:
        assert client.get(f"/archive/{EDITION_DATE}").status_code == 200
        for other in ("2026-W48-5", "2026W485", "20261127", "2026-11-2７"):
            assert client.get(f"/archive/{other}").status_code == 404, other
