# ruff: noqa: F811  (fixtures imported from tests/webutil.py are test parameters here)
"""The reader-facing app as an attacker, a bot, a mail scanner or a careless reverse proxy
would use it: each test names what it tries and what must hold."""

from __future__ import annotations

import hashlib
import re
import socket
import threading
import time
import xml.etree.ElementTree as ET
from datetime import UTC, date, datetime, timedelta
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx
import httpx2
import itsdangerous
import pytest
from aiosmtpd.controller import Controller
from starlette.testclient import TestClient

from digest import store
from digest.config import load_config
from digest.models import IssueStatus, SubscriberStatus
from digest.tokens import ConfirmSigner, TokenSigner
from digest.web import create_app
from tests.conftest import Recorder, free_port
from tests.webutil import (
    BASE,
    EDITION_DATE,
    PEER,
    ROOT,
    PortOnly,
    WebEnv,
    body_text,
    chromium,
    make_env,
    needs_chromium,
    send_issue,
    sqlite_env,  # noqa: F401
    start_server,
    subscribe,
    wait_for,
)

SECRET = "test-secret-0123456789abcdef"  # write_config's [unsubscribe] secret
PREFS = TokenSigner(SECRET, purpose="preferences")
FORM = {"content-type": "application/x-www-form-urlencoded"}
ATOM = "{http://www.w3.org/2005/Atom}"


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


# --- enumeration ----------------------------------------------------------------------------


def _answer(r: httpx2.Response, email: str) -> tuple[int, str, list[tuple[str, str]]]:
    """What a bot sees: status, body with the echoed address blanked, headers (less the
    ones that vary by themselves)."""
    headers = sorted((k, v) for k, v in r.headers.items() if k not in ("date", "content-length"))
    return r.status_code, r.text.replace(email, "ADDRESS"), headers


def test_every_kind_of_address_gets_the_same_answer_without_waiting_for_mail(
    tmp_path: Path, feed_file: Path
) -> None:
    """New, active, unsubscribed, bounced, honeypot and cooled-down signups: the same
    status, page and headers. The relay here takes connections and never answers, so a
    handler that sent mail before answering would hang: every answer arrives while the
    mails are still pending."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    env = make_env(tmp_path, (PortOnly(silent.getsockname()[1]), Recorder()), None)  # type: ignore[arg-type]
    try:
        env.add("active@example.org", SubscriberStatus.ACTIVE, name="Active")
        env.add("gone@example.org", SubscriberStatus.UNSUBSCRIBED)
        env.add("dead@example.org", SubscriberStatus.BOUNCED)
        answers = {}
        with env.client() as client:
            for label, email, website in [
                ("new", "new@example.org", ""),
                ("active", "active@example.org", ""),
                ("unsubscribed", "gone@example.org", ""),
                ("bounced", "dead@example.org", ""),
                ("honeypot", "bot@example.org", "http://spam.example"),
                ("cooldown", "new@example.org", ""),
                ("cooldown-active", "active@example.org", ""),
            ]:
                r = client.post("/subscribe", data={"email": email, "website": website})
                answers[label] = _answer(r, email)
            mails = env.mails()
            silent.close()  # the mailer's connection attempts now fail at once
        assert sorted(m.email for m in mails) == [
            "active@example.org",
            "dead@example.org",
            "gone@example.org",
            "new@example.org",
        ]
        assert all(m.status == "pending" and m.attempts == 0 for m in mails)
        assert env.smtp.messages == []
    finally:
        silent.close()
        env.app.engine.dispose()
    first = answers["new"]
    assert first[0] == 200 and "Check your inbox" in first[1]
    for label, answer in answers.items():
        assert answer == first, label


# --- subscription bombing -------------------------------------------------------------------


def test_spellings_of_one_address_share_its_cooldown(sqlite_env: WebEnv) -> None:
    env = sqlite_env
    with env.client() as client:
        for spelling in (
            "victim@example.org",
            "Victim@Example.org",
            " VICTIM@EXAMPLE.ORG ",
            "victim@ｅｘａｍｐｌｅ.ｏｒｇ",  # fullwidth: IDNA maps it to example.org
            "victim@example。org",  # ideographic full stop
            "victim@exämple.org",
            "victim@XN--EXMPLE-CUA.ORG",  # the same IDN domain, spelled in ASCII
            "victim+news@example.org",  # plus-addressing: another address
        ):
            assert subscribe(client, spelling).status_code == 200, spelling
        for refused in (
            "victim@example.org.",
            "victim@exam\u00adple.org",
            "victim@example.org\u200b",
        ):
            assert subscribe(client, refused).status_code == 400, refused
        wait_for(lambda: len(env.smtp.messages) == 3, "three mails")
        wait_for(lambda: all(m.status != "pending" for m in env.mails()), "the queue to drain")
    assert sorted(m.rcpt_tos[0] for m in env.smtp.messages) == [
        "victim+news@example.org",
        "victim@example.org",
        "victim@xn--exmple-cua.org",
    ]


def test_forwarding_headers_from_an_untrusted_peer_do_not_lift_the_limit(
    tmp_path: Path, feed_file: Path, smtp_server: tuple[Controller, Recorder]
) -> None:
    env = make_env(tmp_path, smtp_server, None, "\n[signup]\nmax_per_ip_per_hour = 3\n")
    try:
        with env.client(peer=("127.0.0.1", 5000)) as client:
            codes = []
            for i in range(3):
                headers = [
                    ("X-Forwarded-For", f"198.51.100.{i}"),
                    ("X-Forwarded-For", f"2001:db8::{i}"),
                    ("Forwarded", f"for=198.51.100.{i};proto=https"),
                    ("X-Real-IP", f"198.51.100.{i}"),
                ]
                r = client.post("/subscribe", data={"email": f"f{i}@example.org"}, headers=headers)
                codes.append(r.status_code)
            assert codes == [200] * 3
            blocked = client.post(
                "/subscribe",
                data={"email": "f9@example.org"},
                headers={"Forwarded": "for=203.0.113.1", "X-Forwarded-For": "203.0.113.1"},
            )
            assert blocked.status_code == 429
        # IPv6: every address of one /64 is one client; written as IPv4-mapped, an IPv4
        # client is that IPv4 client.
        codes = []
        for peer in (
            "2001:db8:7:7::1",
            "2001:DB8:7:7:ffff::2",
            "2001:db8:7:7:0:0:0:3",
            "2001:db8:7:7::4",
        ):
            with env.client(peer=(peer, 1)) as client:
                codes.append(subscribe(client, f"v6-{len(codes)}@example.org").status_code)
        assert codes == [200, 200, 200, 429]
        with env.client(peer=("::ffff:127.0.0.1", 1)) as client:
            assert subscribe(client, "mapped@example.org").status_code == 429
    finally:
        env.app.engine.dispose()


# --- tokens ---------------------------------------------------------------------------------


def test_links_made_with_an_old_secret_keep_working_after_a_rotation(
    sqlite_env: WebEnv,
) -> None:
    """Unsubscribe and preference links never expire; a confirmation link made with the
    old secret works within its TTL, and is "expired" (not "damaged") after it."""
    env = sqlite_env
    text = env.config_path.read_text(encoding="utf-8").replace(
        f'secret = "{SECRET}"',
        f'secret = "a-brand-new-secret-0123456789"\nold_secrets = ["{SECRET}"]',
    )
    env.config_path.write_text(text, encoding="utf-8")
    rotated = load_config(env.config_path)
    sub_id = env.add("old@example.org", SubscriberStatus.ACTIVE, name="Old Link")
    prefs = PREFS.token(sub_id, "old@example.org")
    unsub = TokenSigner(SECRET).token(sub_id, "old@example.org")
    now = datetime.now(UTC)
    confirm = ConfirmSigner(SECRET, timedelta(hours=72)).token("c@example.org", "", None, now)
    with TestClient(create_app(rotated, env.app.sessions), client=PEER) as client:
        assert "Old Link" in client.get(f"/preferences/{prefs}").text
        saved = client.post(
            f"/preferences/{prefs}", data={"name": "Old Link", "regions": ["Europe"]}
        )
        assert saved.status_code == 200
        assert client.post(f"/confirm/{confirm}").status_code == 200
        assert client.post(f"/unsubscribe/{unsub}").status_code == 200
        assert client.get(f"/confirm/{_expired(SECRET, 'late@example.org')}").status_code == 410
    old, new = env.subscriber("old@example.org"), env.subscriber("c@example.org")
    assert old is not None and old.status == SubscriberStatus.UNSUBSCRIBED
    assert old.regions == ["Europe"]
    assert new is not None and new.status == SubscriberStatus.ACTIVE


def _expired(secret: str, email: str) -> str:
    class FourDaysAgo(itsdangerous.TimestampSigner):
        def get_timestamp(self) -> int:
            return int(time.time()) - 4 * 86400

    s = itsdangerous.URLSafeTimedSerializer(
        secret,
        salt="digest.confirm.v1",
        signer=FourDaysAgo,
        signer_kwargs={"digest_method": hashlib.sha256},
    )
    return str(s.dumps({"e": email, "n": "", "r": None, "t": int(time.time()) - 4 * 86400}))


# --- what every response carries -------------------------------------------------------------


def _assert_hardened(r: httpx2.Response, what: str) -> None:
    csp = r.headers.get("content-security-policy", "")
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp, what
    assert "script-src" not in csp and "unsafe-eval" not in csp, what
    assert r.headers.get("referrer-policy") == "no-referrer", what
    assert r.headers.get("x-content-type-options") == "nosniff", what
    assert "server" not in r.headers, what
    if r.request.method != "HEAD" and r.headers.get("content-type", "").startswith("text/html"):
        assert "<script" not in r.text.lower() and "Traceback" not in r.text, what


def test_token_pages_are_never_cached_or_indexed_and_nothing_answers_without_headers(
    tmp_path: Path, feed_file: Path, smtp_server: tuple[Controller, Recorder]
) -> None:
    env = make_env(tmp_path, smtp_server, None, "\n[signup]\nmax_per_ip_per_hour = 1\n")
    try:
        sub_id = env.add("own@example.org", SubscriberStatus.ACTIVE, name="Own")
        prefs = PREFS.token(sub_id, "own@example.org")
        unsub = TokenSigner(SECRET).token(sub_id, "own@example.org")
        confirm = ConfirmSigner(SECRET, timedelta(hours=72)).token(
            "c@example.org", "", None, datetime.now(UTC)
        )
        before = env.snapshot()
        with env.client() as client:
            token_pages = {
                "prefs": client.get(f"/preferences/{prefs}"),
                "prefs-head": client.head(f"/preferences/{prefs}"),
                "prefs-400": client.post(f"/preferences/{prefs}", data={"regions": ["Mars"]}),
                "prefs-bad-form": client.post(f"/preferences/{prefs}", json={"x": 1}),
                "prefs-latin1": client.post(
                    f"/preferences/{prefs}", content=b"name=Zo\xeb", headers=FORM
                ),
                "prefs-403": client.post(
                    f"/preferences/{prefs}", headers={"Sec-Fetch-Site": "cross-site"}
                ),
                "prefs-forged": client.get("/preferences/forged"),
                "unsubscribe": client.get(f"/unsubscribe/{unsub}"),
                "confirm": client.get(f"/confirm/{confirm}"),
                "confirm-expired": client.get(f"/confirm/{_expired(SECRET, 'x@example.org')}"),
                "confirm-forged": client.post("/confirm/forged"),
            }
            for what, r in token_pages.items():
                _assert_hardened(r, what)
                assert r.headers["cache-control"] == "no-store", what
                assert r.headers.get("x-robots-tag") == "noindex", what
            # Nothing a scanner or a preflight sends changes anything.
            for path in (f"/preferences/{prefs}", f"/unsubscribe/{unsub}", f"/confirm/{confirm}"):
                for method in ("OPTIONS", "HEAD", "GET"):
                    r = client.request(method, path)
                    assert r.status_code in (200, 405), (method, path)
                    _assert_hardened(r, f"{method} {path}")
            assert env.snapshot() == before
            others = {
                "options": client.options("/subscribe"),
                "head": client.head("/subscribe"),
                "405": client.delete("/archive"),
                "404": client.get("/archive/2026-02-30"),
                "404-long": client.get("/archive/" + "9" * 4000),
                "404-dots": client.get("/archive/..%2F..%2Fetc%2Fpasswd"),
                "ok": subscribe(client, "one@example.org"),
                "429": subscribe(client, "two@example.org"),
            }
            assert others["429"].status_code == 429 and others["404-dots"].status_code == 404
            for what, r in others.items():
                _assert_hardened(r, what)
        # The database gone: 503, with the same headers and nothing about the database.
        empty = store.open_engine(f"sqlite:///{tmp_path / 'empty.db'}")
        broken = create_app(env.config, store.session_factory(empty))
        with TestClient(broken, raise_server_exceptions=False, client=PEER) as client:
            for r in (client.get(f"/preferences/{prefs}"), client.get("/archive/feed.xml")):
                assert r.status_code == 503
                _assert_hardened(r, "503")
                assert "sqlite" not in r.text.lower() and "table" not in r.text.lower()
        empty.dispose()
    finally:
        env.app.engine.dispose()


def test_the_feed_is_valid_xml_whatever_the_titles_hold(sqlite_env: WebEnv) -> None:
    env = sqlite_env
    subject = "Tom & Jerry <b>x</b> 🦊𝔘 ]]> \x0c"
    title = "Ünïcode & <script>alert(1)</script> 𝔘\x01"
    with env.app.sessions.begin() as session:
        article = store.find_article(session, "https://news.example.org/europe/1", None)
        assert article is not None
        article.title = title
        issue = store.create_issue(
            session, date(2026, 11, 20), subject, [("Europe", [article.id])], datetime.now(UTC)
        )
        store.set_issue_status(session, issue, IssueStatus.SENT, datetime.now(UTC))
    with env.client() as client:
        feed = client.get("/archive/feed.xml")
        page = client.get("/archive/2026-11-20")
        index = client.get("/archive")
    root = ET.fromstring(feed.content)  # raises on anything that is not well-formed
    entry = root.find(f"{ATOM}entry")
    assert entry is not None
    assert entry.findtext(f"{ATOM}title") == subject.replace("\x0c", "")
    assert "alert(1)</script> 𝔘" in (entry.findtext(f"{ATOM}summary") or "")
    for r in (page, index):
        assert r.status_code == 200 and "<script>alert" not in r.text and "<b>x</b>" not in r.text
    assert "Tom &amp; Jerry &lt;b&gt;x&lt;/b&gt; 🦊𝔘" in index.text


def test_behind_a_trusted_proxy_a_real_server_counts_the_address_the_proxy_saw(
    tmp_path: Path, feed_file: Path, smtp_server: tuple[Controller, Recorder]
) -> None:
    """uvicorn itself: what the client wrote (left of the proxy's entry, in an earlier
    X-Forwarded-For line, in Forwarded or X-Real-IP) never makes it another client; the
    address the proxy appended does, and IPv6 counts per /64."""
    extra = '\n[signup]\ntrusted_proxies = ["127.0.0.1"]\nmax_per_ip_per_hour = 2\n'
    env = make_env(tmp_path, smtp_server, None, extra)
    server = start_server(env.config_path, free_port(), tmp_path / "serve.log")
    try:

        def post(proxied: str, spoof: str) -> int:
            headers = [
                ("X-Forwarded-For", f"{spoof}, 10.9.9.9"),
                ("Forwarded", f"for={spoof}"),
                ("X-Real-IP", spoof),
                ("X-Forwarded-For", proxied),  # the line our proxy added
            ]
            r = httpx.post(
                f"{server.url}/subscribe",
                data={"email": "p@example.org"},
                headers=headers,
                timeout=30,
            )
            return r.status_code

        assert [post("198.51.100.7", f"6.6.6.{i}") for i in range(3)] == [200, 200, 429]
        assert post("198.51.100.8", "198.51.100.7") == 200
        assert [post(f"[2001:db8:1:2::{i}]:443", "6.6.6.6") for i in range(1, 4)] == [
            200,
            200,
            429,
        ]
        assert post("2001:db8:1:3::1", "6.6.6.6") == 200
        # Bodies on the wire: a declared 100 MB is refused before a byte of it is sent
        # (the client waits for "100 Continue" that never comes), and a chunked body is
        # cut off past 64 KB; both with our page and headers, and the connection closed.
        port = int(server.url.rsplit(":", 1)[1])
        head = (
            b"POST /subscribe HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n"
        )
        chunk = b"1000\r\n" + b"a" * 4096 + b"\r\n"
        for what, request in {
            "declared": head + b"Expect: 100-continue\r\nContent-Length: 100000000\r\n\r\n",
            "chunked": head + b"Transfer-Encoding: chunked\r\n\r\n" + chunk * 17,
        }.items():
            answer = _exchange(port, request)
            assert answer.startswith(b"HTTP/1.1 413 "), what
            assert b"frame-ancestors 'none'" in answer and b"64 KB" in answer, what
            assert answer.endswith(b"</html>"), what  # then the server closed it
    finally:
        server.stop()
        env.app.engine.dispose()
    assert "Traceback" not in server.log_text()


def _exchange(port: int, request: bytes) -> bytes:
    """Send raw bytes, read until the server closes the connection (or 30 s pass)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(request)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    return answer


# --- the README's form snippet, pasted into another site ------------------------------------


@needs_chromium
def test_the_readme_snippet_on_another_origin_signs_up_in_chromium(
    tmp_path: Path, feed_file: Path, smtp_server: tuple[Controller, Recorder]
) -> None:
    """The snippet exactly as the README shows it, on a static page served from another
    loopback origin (localhost vs 127.0.0.1: another site), submitted in Chromium."""
    from playwright.sync_api import expect

    port = free_port()
    env = make_env(tmp_path, smtp_server, None, serve_port=port)
    server = start_server(env.config_path, port, tmp_path / "serve.log")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    found = re.search(r"```html\n(<form .*?</form>)\n```", readme, re.S)
    assert found, "the README has no form snippet"
    snippet = found.group(1).replace("https://news.example.org", server.url)
    site = tmp_path / "magazine"
    site.mkdir()
    (site / "index.html").write_text(
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Magazine</title>"
        f"</head><body><h1>The Magazine</h1><p>Subscribe now</p>{snippet}</body></html>",
        encoding="utf-8",
    )

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    magazine = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(site)))
    threading.Thread(target=magazine.serve_forever, daemon=True).start()
    posted: list[dict[str, str]] = []
    try:
        with chromium() as browser:
            page = browser.new_page()
            page.on(
                "requestfinished",
                lambda r: posted.append(r.all_headers()) if r.method == "POST" else None,
            )
            page.goto(f"http://localhost:{magazine.server_address[1]}/index.html")
            box = page.locator("input[name=website]").bounding_box()
            assert box is not None and box["x"] + box["width"] <= 0, box  # off screen
            page.get_by_label("Email").fill("Reader.From.Magazine@Example.org")
            page.get_by_label("Name (optional)").fill("Zoë & 𝔘")
            page.get_by_label("Middle East").check()
            page.get_by_role("button", name="Subscribe now").click()
            expect(page.locator("h1")).to_have_text("Check your inbox")
            assert page.url == f"{server.url}/subscribe"
            wait_for(lambda: env.smtp.to("reader.from.magazine@example.org"), "the mail")
            text = body_text(env.smtp.to("reader.from.magazine@example.org")[0])
            confirm = re.search(rf"{re.escape(server.url)}/confirm/\S+", text)
            assert confirm, text
            page.goto(confirm.group(0))
            page.get_by_role("button", name="Confirm my subscription").click()
            expect(page.locator("h1")).to_have_text("You are subscribed")
    finally:
        magazine.shutdown()
        magazine.server_close()
        server.stop()
        env.app.engine.dispose()
    assert posted[0]["sec-fetch-site"] == "cross-site"
    assert posted[0]["origin"] == f"http://localhost:{magazine.server_address[1]}"
    assert posted[1]["sec-fetch-site"] == "same-origin"  # our confirm button
    sub = env.subscriber("reader.from.magazine@example.org")
    assert sub is not None and sub.status == SubscriberStatus.ACTIVE
    assert sub.name == "Zoë & 𝔘" and sub.regions == ["Middle East"]


# --- a proxy that serves the app under a path prefix ------------------------------------------


def _links_outside(html: str, public_url: str, publication: str) -> list[str]:
    """Links and form targets of a page (fetched at ``public_url``, below base_url) that
    resolve to our host but outside base_url: behind a proxy that strips the prefix they
    reach another application (with any token in them), not digest."""
    host = urlsplit(BASE).netloc
    out = []
    for target in re.findall(r'(?:href|action|src|formaction)="([^"]*)"', html):
        resolved = urljoin(public_url, target.replace("&amp;", "&"))
        parts = urlsplit(resolved)
        if parts.netloc == host and resolved != publication and not resolved.startswith(BASE + "/"):
            out.append(f"{target} -> {resolved}")
    return out


def test_every_page_links_within_base_url(sqlite_env: WebEnv) -> None:
    """base_url here is https://news.example.org/u: the proxy strips "/u" (the app sees
    "/subscribe"). Every link between pages must stay below /u."""
    env = sqlite_env
    send_issue(env, ["reader@example.org"])
    prefs = PREFS.token(1, "reader@example.org")
    confirm = ConfirmSigner(SECRET, timedelta(hours=72)).token(
        "c@example.org", "", None, datetime.now(UTC)
    )
    publication = env.config.publication.url
    with env.client() as client:
        pages = {
            "/subscribe": client.get("/subscribe"),
            "/subscribe (posted)": subscribe(client, "n@example.org"),
            f"/confirm/{confirm}": client.get(f"/confirm/{confirm}"),
            f"/confirm/{confirm} (posted)": client.post(f"/confirm/{confirm}"),
            f"/preferences/{prefs}": client.get(f"/preferences/{prefs}"),
            "/archive": client.get("/archive"),
            "/archive/1999-01-01": client.get("/archive/1999-01-01"),
            "/no/such/page/at/all": client.get("/no/such/page/at/all"),
        }
    for path, r in pages.items():
        url = BASE + path.split(" ")[0]
        assert _links_outside(r.text, url, publication) == [], path


@pytest.mark.xfail(
    strict=True,
    reason="the unsubscribe page's form posts to the absolute path /unsubscribe/TOKEN "
    "(tests/test_serve.py::test_get_only_asks pins it), which a proxy serving digest "
    "under a prefix sends elsewhere; left for the lead (see the review report)",
)
def test_the_unsubscribe_page_posts_within_base_url(sqlite_env: WebEnv) -> None:
    env = sqlite_env
    sub_id = env.add("own@example.org", SubscriberStatus.ACTIVE)
    token = TokenSigner(SECRET).token(sub_id, "own@example.org")
    with env.client() as client:
        r = client.get(f"/unsubscribe/{token}")
    assert r.status_code == 200
    url = f"{BASE}/unsubscribe/{token}"
    assert _links_outside(r.text, url, env.config.publication.url) == []
