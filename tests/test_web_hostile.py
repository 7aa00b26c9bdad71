# ruff: noqa: F811  (fixtures imported from tests/webutil.py are test parameters here)
"""Every request is hostile: spoofed addresses, huge or broken bodies, markup, forged and
expired tokens, link scanners. Each case gets a clear page and changes nothing."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import itsdangerous
import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import update
from starlette.testclient import TestClient

from digest import pipeline, store
from digest.models import Subscriber, SubscriberStatus
from digest.tokens import ConfirmSigner, TokenSigner
from digest.web import create_app, loggable_path
from digest.web.clientip import client_address, trusted_networks
from tests.conftest import Recorder
from tests.test_postgres import pg_url  # noqa: F401  (fixture used by web_env)
from tests.webutil import (
    BASE,
    PEER,
    WebEnv,
    body_text,
    link,
    make_env,
    send_issue,
    sqlite_env,  # noqa: F401
    subscribe,
    wait_for,
    web_env,  # noqa: F401
)

SECRET = "test-secret-0123456789abcdef"  # write_config's [unsubscribe] secret
FORM = {"content-type": "application/x-www-form-urlencoded"}
PREFS = TokenSigner(SECRET, purpose="preferences")


# --- the client address ---------------------------------------------------------------------


def test_forwarded_for_is_ignored_unless_the_peer_is_a_trusted_proxy() -> None:
    none = trusted_networks([])
    assert client_address("203.0.113.5", ["1.2.3.4"], none) == "203.0.113.5"
    proxies = trusted_networks(["10.0.0.1", "192.168.0.0/16"])
    assert client_address("203.0.113.5", ["1.2.3.4"], proxies) == "203.0.113.5"


def test_the_right_most_untrusted_hop_is_the_client() -> None:
    proxies = trusted_networks(["10.0.0.1", "192.168.0.0/16"])
    # The client wrote "6.6.6.6" itself; our proxies appended the rest.
    assert client_address("10.0.0.1", ["6.6.6.6, 198.51.100.7"], proxies) == "198.51.100.7"
    assert (
        client_address("10.0.0.1", ["6.6.6.6, 198.51.100.7, 192.168.3.4"], proxies)
        == "198.51.100.7"
    )
    assert client_address("10.0.0.1", ["6.6.6.6", "198.51.100.7"], proxies) == "198.51.100.7"
    # Garbage where a proxy's entry should be: keep the last hop we trust.
    assert client_address("10.0.0.1", ["198.51.100.7, not-an-ip"], proxies) == "10.0.0.1"
    # No header from a trusted peer: the peer itself.
    assert client_address("10.0.0.1", [], proxies) == "10.0.0.1"
    # Ports and IPv4-mapped IPv6 are the plain address.
    assert client_address("10.0.0.1", ["198.51.100.7:5555"], proxies) == "198.51.100.7"
    assert client_address("::ffff:198.51.100.7", [], proxies) == "198.51.100.7"


def test_ipv6_clients_are_counted_per_64() -> None:
    none = trusted_networks([])
    a = client_address("2001:db8:1:2::1", [], none)
    b = client_address("2001:db8:1:2:ffff::9", [], none)
    c = client_address("2001:db8:1:3::1", [], none)
    assert a == b == "2001:db8:1:2::/64" and c != a


def test_a_spoofed_forwarded_for_does_not_lift_the_limit(sqlite_env: WebEnv) -> None:
    env = sqlite_env
    limit = env.config.signup.max_per_ip_per_hour
    with env.client(peer=("127.0.0.1", 5000)) as client:
        codes = [
            client.post(
                "/subscribe",
                data={"email": f"v{i}@example.org"},
                headers={"X-Forwarded-For": f"198.51.100.{i}"},
            ).status_code
            for i in range(limit + 3)
        ]
    assert codes == [200] * limit + [429] * 3


def test_behind_a_trusted_proxy_each_client_has_its_own_limit(
    tmp_path: Path, feed_file: Path, smtp_server: tuple[Controller, Recorder]
) -> None:
    extra = '\n[signup]\ntrusted_proxies = ["10.0.0.1"]\nmax_per_ip_per_hour = 3\n'
    env = make_env(tmp_path, smtp_server, None, extra)
    try:
        with env.client(peer=("10.0.0.1", 443)) as proxy:

            def post(client_ip: str, spoof: str) -> int:
                headers = {"X-Forwarded-For": f"{spoof}, {client_ip}"}
                return proxy.post(
                    "/subscribe", data={"email": "p@example.org"}, headers=headers
                ).status_code

            # One client varying the part it controls is still one client.
            assert [post("198.51.100.7", f"6.6.6.{i}") for i in range(5)] == [200] * 3 + [429] * 2
            assert post("198.51.100.8", "6.6.6.6") == 200  # another reader behind the proxy
    finally:
        env.app.engine.dispose()


# --- bodies ---------------------------------------------------------------------------------


def test_a_body_over_64_kb_is_refused_unread(sqlite_env: WebEnv) -> None:
    env = sqlite_env
    before = env.snapshot()
    body = b"email=a%40example.org&name=" + b"x" * (65 * 1024)
    with env.client() as client:
        declared = client.post("/subscribe", content=body, headers=FORM)
        assert declared.status_code == 413 and "64 KB" in declared.text

        def chunks() -> Iterator[bytes]:  # no Content-Length: cut off while reading
            for i in range(0, len(body), 4096):
                yield body[i : i + 4096]

        streamed = client.post("/subscribe", content=chunks(), headers=FORM)
        assert streamed.status_code == 413
        assert streamed.headers["x-frame-options"] == "DENY"
        bad_length = client.post(
            "/subscribe", content=b"email=x", headers={**FORM, "Content-Length": "lots"}
        )
        assert bad_length.status_code == 400
        # Just under the cap is read (and refused for its oversized name field, 400).
        fits = client.post("/subscribe", content=body[: 64 * 1024], headers=FORM)
        assert fits.status_code == 400 and "name is too long" in fits.text
    assert env.snapshot()[:2] == before[:2]  # no subscriber, no mail


@pytest.mark.parametrize(
    ("content", "ctype"),
    [
        (b"email=caf\xe9%40example.org", "application/x-www-form-urlencoded"),
        (b"email=a%40example.org&name=caf%E9", "application/x-www-form-urlencoded"),
        (
            b'--b\r\nContent-Disposition: form-data; name="email"\r\n\r\na@example.org\r\n'
            b'--b\r\nContent-Disposition: form-data; name="name"\r\n\r\ncaf\xe9\r\n--b--\r\n',
            "multipart/form-data; boundary=b",
        ),
    ],
    ids=["raw-latin1", "percent-latin1", "multipart-latin1"],
)
def test_a_body_that_is_not_utf8_is_refused(sqlite_env: WebEnv, content: bytes, ctype: str) -> None:
    env = sqlite_env
    with env.client() as client:
        r = client.post("/subscribe", content=content, headers={"content-type": ctype})
    assert r.status_code == 400 and "<h1>Bad request</h1>" in r.text
    assert env.mails() == [] and env.smtp.messages == []


def test_a_multipart_form_from_another_site_works(sqlite_env: WebEnv) -> None:
    env = sqlite_env
    with env.client() as client:
        r = client.post(
            "/subscribe",
            files={"email": (None, "multi@example.org"), "regions": (None, "Europe")},
            headers={"Origin": "https://magazine.example.com", "Sec-Fetch-Site": "cross-site"},
        )
        assert r.status_code == 200 and "Check your inbox" in r.text
        wait_for(lambda: env.smtp.to("multi@example.org"), "the confirmation mail")


@pytest.mark.parametrize(
    "files",
    [
        {"email": ("cv.txt", b"a@example.org", "text/plain")},
        {f"f{i}": (None, "x") for i in range(101)},
    ],
    ids=["a-file", "too-many-fields"],
)
def test_files_and_floods_of_fields_are_refused(
    sqlite_env: WebEnv, files: dict[str, object]
) -> None:
    with sqlite_env.client() as client:
        r = client.post("/subscribe", files=files)
    assert r.status_code == 400 and sqlite_env.mails() == []


def test_other_content_types_are_refused(sqlite_env: WebEnv) -> None:
    with sqlite_env.client() as client:
        r = client.post("/subscribe", json={"email": "j@example.org"})
    assert r.status_code == 400 and sqlite_env.mails() == []


# --- fields ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"email": "not an address"}, "email", "email address"),
        ({"email": ""}, "email", "empty"),
        ({"email": "a@example.org\r\nBcc: x@example.org"}, "email", "control character"),
        ({"email": "a" * 400 + "@example.org"}, "email", "too long"),
        ({"email": "a@example.org", "name": "𝔘" * 201}, "name", "too long"),
        (
            {"email": "a@example.org", "regions": ["Europe", "Antarctica<b>"]},
            "regions",
            "unknown region",
        ),
    ],
    ids=["invalid", "empty", "header-injection", "long-email", "long-name", "unknown-region"],
)
def test_bad_fields_reshow_the_form_with_the_problem_named(
    sqlite_env: WebEnv, fields: dict[str, object], field: str, message: str
) -> None:
    env = sqlite_env
    before = env.snapshot()
    with env.client() as client:
        r = client.post("/subscribe", data={"website": "", **fields})
    assert r.status_code == 400
    error = r.text.split(f'<p class="error" id="{field}-error">', 1)[1].split("</p>", 1)[0]
    assert message in error
    assert 'aria-invalid="true"' in r.text or field == "regions"
    assert "<b>" not in r.text.split("<main>", 1)[1]  # re-shown escaped
    assert '<form method="post"' in r.text  # the form again
    assert env.snapshot()[:2] == before[:2] and env.smtp.messages == []


# --- tokens -------------------------------------------------------------------------------------


def _expired_confirm_token(email: str) -> str:
    class FourDaysAgo(itsdangerous.TimestampSigner):
        def get_timestamp(self) -> int:
            return int(time.time()) - 4 * 86400

    s = itsdangerous.URLSafeTimedSerializer(
        SECRET,
        salt="digest.confirm.v1",
        signer=FourDaysAgo,
        signer_kwargs={"digest_method": hashlib.sha256},
    )
    return str(s.dumps({"e": email, "n": "", "r": None, "t": int(time.time()) - 4 * 86400}))


def test_confirmation_tokens_that_are_not_genuine_change_nothing(sqlite_env: WebEnv) -> None:
    env = sqlite_env
    good = ConfirmSigner(SECRET, timedelta(hours=72)).token(
        "victim@example.org", "", None, datetime.now(UTC)
    )
    forged = {
        "tampered": good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB"),
        "foreign-secret": ConfirmSigner("another-secret-0123456789", timedelta(hours=72)).token(
            "victim@example.org", "", None, datetime.now(UTC)
        ),
        "preferences-token": PREFS.token(1, "victim@example.org"),
        "unsubscribe-token": TokenSigner(SECRET).token(1, "victim@example.org"),
        "garbage": "x" * 5000,
    }
    with env.client() as client:
        for kind, token in forged.items():
            for r in (client.get(f"/confirm/{token}"), client.post(f"/confirm/{token}")):
                assert r.status_code == 400, kind
                assert "does not work" in r.text and "victim@example.org" not in r.text
    assert env.subscriber("victim@example.org") is None


def test_an_expired_confirmation_link_offers_to_sign_up_again(sqlite_env: WebEnv) -> None:
    env = sqlite_env
    token = _expired_confirm_token("late@example.org")
    with env.client() as client:
        for r in (client.get(f"/confirm/{token}"), client.post(f"/confirm/{token}")):
            assert r.status_code == 410
            assert "has expired" in r.text and 'href="../subscribe"' in r.text
    assert env.subscriber("late@example.org") is None


def test_preference_tokens_that_are_not_genuine_change_nothing(sqlite_env: WebEnv) -> None:
    env = sqlite_env
    sub_id = env.add("own@example.org", SubscriberStatus.ACTIVE, name="Own")
    other = env.add("other@example.org", SubscriberStatus.ACTIVE)
    good = PREFS.token(sub_id, "own@example.org")
    forged = {
        "tampered": PREFS.token(other, "own@example.org")[:-3] + good[-3:],
        "foreign-secret": TokenSigner("another-secret-0123456789", purpose="preferences").token(
            sub_id, "own@example.org"
        ),
        "confirm-token": ConfirmSigner(SECRET, timedelta(hours=1)).token(
            "own@example.org", "", None, datetime.now(UTC)
        ),
        "unsubscribe-token": TokenSigner(SECRET).token(sub_id, "own@example.org"),
        "someone-else's-address": PREFS.token(other, "own@example.org"),
        "no-such-subscriber": PREFS.token(999, "own@example.org"),
    }
    before = env.snapshot()
    with env.client() as client:
        for kind, token in forged.items():
            get = client.get(f"/preferences/{token}")
            post = client.post(f"/preferences/{token}", data={"regions": ["Europe"], "name": "X"})
            for r in (get, post):
                assert r.status_code == 400, kind
                assert "does not work" in r.text and "own@example.org" not in r.text
        # The genuine token, posted from another site: refused, nothing saved.
        cross = client.post(
            f"/preferences/{good}",
            data={"regions": ["Europe"]},
            headers={"Sec-Fetch-Site": "cross-site"},
        )
        assert cross.status_code == 403
        assert client.get(f"/preferences/{good}").status_code == 200
    assert env.snapshot() == before
    # A token made for an address stops working when the row holds another address.
    with env.app.sessions.begin() as session:
        session.execute(
            update(Subscriber).where(Subscriber.id == sub_id).values(email="new@example.org")
        )
    with env.client() as client:
        assert client.get(f"/preferences/{good}").status_code == 400


def test_bad_preference_fields_are_named_and_nothing_is_saved(sqlite_env: WebEnv) -> None:
    env = sqlite_env
    sub_id = env.add("own@example.org", SubscriberStatus.ACTIVE, name="Own")
    token = PREFS.token(sub_id, "own@example.org")
    before = env.snapshot()
    with env.client() as client:
        r = client.post(f"/preferences/{token}", data={"name": "<i>x</i>", "regions": ["Mars"]})
        assert r.status_code == 400 and "unknown region" in r.text and "<i>" not in r.text
        r = client.post(f"/preferences/{token}", data={"name": "n" * 201})
        assert r.status_code == 400 and "too long" in r.text
    assert env.snapshot() == before


# --- scanners -------------------------------------------------------------------------------


def test_link_scanners_that_only_get_change_nothing(web_env: WebEnv) -> None:
    env = web_env
    send_issue(env, ["reader@example.org"])
    with env.client() as client:
        subscribe(client, "scanned@example.org", regions=["Europe"])
        wait_for(lambda: env.smtp.to("scanned@example.org"), "the confirmation mail")
        wait_for(lambda: all(m.status != "pending" for m in env.mails()), "the queue to drain")
        round_up = env.smtp.to("reader@example.org")[0].message
        texts = [
            body_text(env.smtp.to("scanned@example.org")[0]),
            round_up.get_body(("plain",)).get_content(),
            round_up.get_body(("html",)).get_content(),
            str(round_up["List-Unsubscribe"]),
        ]
        paths = {
            link(t, kind)
            for t in texts
            for kind in ("confirm", "preferences", "unsubscribe", "archive")
            if f"{BASE}/{kind}/" in t
        }
        assert {p.split("/")[1] for p in paths} == {
            "confirm",
            "preferences",
            "unsubscribe",
            "archive",
        }
        before = env.snapshot()
        for path in sorted(paths):
            for method in ("GET", "HEAD"):
                r = client.request(method, path)
                assert r.status_code == 200, (method, path)
    assert env.snapshot() == before
    assert env.subscriber("scanned@example.org") is None
    reader = env.subscriber("reader@example.org")
    assert reader is not None and reader.status == SubscriberStatus.ACTIVE


# --- every response ---------------------------------------------------------------------------


def test_security_headers_on_every_response(sqlite_env: WebEnv) -> None:
    env = sqlite_env
    send_issue(env, ["reader@example.org"])
    token = TokenSigner(SECRET).token(1, "reader@example.org")
    with env.client() as client:
        responses = {
            "form": client.get("/subscribe"),
            "form-400": client.post("/subscribe", data={"email": "nope"}),
            "404": client.get("/no/such/page"),
            "405": client.put("/subscribe", content=b"x"),
            "413": client.post("/subscribe", content=b"x" * 70_000, headers=FORM),
            "bad-link": client.get("/confirm/forged"),
            "unsubscribe": client.get(f"/unsubscribe/{token}"),
            "archive": client.get("/archive"),
            "issue": client.get("/archive/2026-11-27"),
            "feed": client.get("/archive/feed.xml"),
            "css": client.get("/assets/digest.css"),
            "healthz": client.get("/healthz"),
        }
    for what, r in responses.items():
        csp = r.headers.get("content-security-policy", "")
        assert "frame-ancestors 'none'" in csp, what
        assert "script-src" not in csp and "default-src 'none'" in csp, what
        assert r.headers.get("referrer-policy") == "no-referrer", what
        assert r.headers.get("x-frame-options") == "DENY", what
        assert r.headers.get("x-content-type-options") == "nosniff", what
        if r.headers.get("content-type", "").startswith("text/html"):
            assert "<script" not in r.text.lower(), what
            assert "charset=utf-8" in r.headers["content-type"], what
    assert responses["405"].status_code == 405 and responses["404"].status_code == 404


def test_a_path_cannot_write_lines_of_its_own_into_the_log(
    tmp_path: Path,
    feed_file: Path,
    smtp_server: tuple[Controller, Recorder],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The 503 handler logs the request path, which the app sees decoded: control
    characters in it (line breaks, a terminal's escape sequences) would let the requester
    start or overwrite log lines. Paths are logged percent-encoded, as sent."""
    env = make_env(tmp_path, smtp_server, None)
    try:
        empty = store.open_engine(f"sqlite:///{tmp_path / 'empty.db'}")
        broken = create_app(env.config, store.session_factory(empty))
        # A genuine token with control characters and punctuation behind it still
        # verifies (base64 skips them), and a path ending in a newline still matches
        # its route, so all of these reach the database, which fails.
        token = TokenSigner(SECRET).token(1, "a@example.org")
        junk = "%0d%0a%0b%0c%1b%5b!!"  # CR LF VT FF ESC [ ! !: a multiple of 4 characters
        requests = {
            f"GET /unsubscribe/{token}{junk.upper()}": (
                "GET",
                f"/unsubscribe/{token}{junk}",
            ),
            "POST /subscribe%0A": ("POST", "/subscribe%0a"),
            "GET /archive/feed.xml%0A": ("GET", "/archive/feed.xml%0A"),
        }
        # (Not entered as a context: no lifespan, so no signup mailer logging its own
        # failures to reach the database.)
        client = TestClient(broken, raise_server_exceptions=False, client=PEER)
        with caplog.at_level(logging.ERROR, logger="digest.serve"):
            for method, path in requests.values():
                assert client.request(method, path).status_code == 503, path
        messages = [r.getMessage() for r in caplog.records if r.name == "digest.serve"]
        assert len(messages) == len(requests)
        for expected, message in zip(requests, messages, strict=True):
            said, _, exc = message.partition(": (sqlite3.OperationalError)")
            assert exc, message  # the database's error is still there
            assert said.isprintable(), repr(said)  # no line break, no escape sequence
            assert said == expected  # and what was asked for, whole
        # Line breaks outside ASCII, 4-byte characters and undecodable bytes too.
        assert (
            loggable_path("/a\x85\u2028🦊\udcff b") == "/a%C2%85%E2%80%A8%F0%9F%A6%8A%5Cudcff%20b"
        )
        empty.dispose()
    finally:
        env.app.engine.dispose()


def test_no_stack_trace_ever_reaches_a_response(
    tmp_path: Path, feed_file: Path, smtp_server: tuple[Controller, Recorder]
) -> None:
    env = make_env(tmp_path, smtp_server, None)
    try:
        # A database without the schema: every query fails inside SQLAlchemy.
        empty = store.open_engine(f"sqlite:///{tmp_path / 'empty.db'}")
        broken = create_app(env.config, store.session_factory(empty))
        with TestClient(broken, raise_server_exceptions=False, client=PEER) as client:
            r = subscribe(client, "a@example.org")
            assert r.status_code == 503 and "Temporarily unavailable" in r.text
            assert "Traceback" not in r.text and "no such table" not in r.text
            assert r.headers["x-frame-options"] == "DENY"

        def exploding() -> None:
            raise RuntimeError("internal detail 8d1f")

        failing = create_app(env.config, exploding)  # type: ignore[arg-type]
        with TestClient(failing, raise_server_exceptions=False, client=PEER) as client:
            r = client.get("/archive")
            assert r.status_code == 500 and "Something went wrong" in r.text
            assert "8d1f" not in r.text and "Traceback" not in r.text
            assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
        empty.dispose()
    finally:
        env.app.engine.dispose()


def test_the_unsubscribe_page_still_works_with_a_round_up_link(sqlite_env: WebEnv) -> None:
    env = sqlite_env
    send_issue(env, ["reader@example.org"])
    url = str(env.smtp.to("reader@example.org")[0].message["List-Unsubscribe"]).strip("<>")
    path = url.removeprefix(BASE)
    with env.client() as client:
        r = client.post(path, content=b"List-Unsubscribe=One-Click", headers=FORM)
    assert r.status_code == 200 and "unsubscribed" in r.text
    sub = env.subscriber("reader@example.org")
    assert sub is not None and sub.status == SubscriberStatus.UNSUBSCRIBED
    assert pipeline.status(env.app).subscribers["unsubscribed"] == 1


def test_a_trusted_proxy_that_is_not_an_address_is_a_config_error(
    tmp_path: Path, feed_file: Path
) -> None:
    from digest.config import load_config
    from digest.errors import ConfigError
    from tests.conftest import write_config

    path = write_config(tmp_path, extra='\n[signup]\ntrusted_proxies = ["proxy.local"]\n')
    with pytest.raises(
        ConfigError, match=r"signup\.trusted_proxies.*'proxy\.local'.*10\.0\.0\.0/8"
    ):
        load_config(path)
