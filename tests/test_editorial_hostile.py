"""Hostile and careless content in the editor's week: feed image credits with markup or
no end, overlong words in titles, deks, bylines and notes, a note's bytes, and the
preview server (read-only, loopback only, no leaked file handles).

Real feed files, real SQLite files (PostgreSQL for what it refuses), a real SMTP server
on loopback, headless Chromium for the layout.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import lxml.html
import pytest
import uvicorn
from aiosmtpd.controller import Controller

from digest import pipeline
from digest.config import load_config
from digest.web.preview import create_preview_app
from tests.conftest import Recorder, free_port, rss
from tests.test_editorial import EU0, GC0, D, feed_items, make_desk, parts, run, shown
from tests.webutil import chromium, needs_chromium, wait_for

LONG_URL = "https://news.example.org/" + "a" * 300
HOSTILE_CREDIT = (
    '<img src=x onerror="alert(1)"><b>Zoë</b> &lt;script&gt;alert(2)&lt;/script&gt; '
    + "C" * 400
    + " & Co"
)


def hostile_items() -> list[dict[str, Any]]:
    items = feed_items()
    items[EU0 - 1]["credit"] = HOSTILE_CREDIT  # the lead's picture
    items[0]["credit"] = "P" * 250  # a thumbnail's, one unbroken word
    items[GC0 - 1]["title"] = "T" * 200  # a headline without a space
    items[GC0 - 1]["dek"] = "D" * 280
    items[GC0 - 1]["authors"] = ["A" * 120]
    items[1]["image"] = None  # no picture: no credit either, even if the feed has one
    items[1]["credit"] = "Nobody's picture"
    return items


@pytest.fixture
def hostile_desk(tmp_path: Path, smtp_server: tuple[Controller, Recorder]) -> Path:
    path = make_desk(tmp_path, smtp_server[0].port)
    shutil.copytree(Path(__file__).parent.parent / "templates", tmp_path / "templates")
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace("[newsletter]\n", '[newsletter]\ntemplates_dir = "templates"\n'))
    (tmp_path / "feed.xml").write_text(rss(hostile_items()), encoding="utf-8")
    assert run(path, "fetch").exit_code == 0
    run(path, "draft", "--date", D)
    run(path, "issue", "lead", str(EU0), "--date", D)
    note = f"A {'w' * 400} word, [{LONG_URL}]({LONG_URL}) and <{LONG_URL}> 𝔘🦊."
    assert run(path, "issue", "note", "--text", note, "--date", D).exit_code == 0
    return path


def test_credits_are_escaped_bounded_and_only_under_a_picture(
    hostile_desk: Path, smtp_server: tuple[Controller, Recorder]
) -> None:
    _, server = smtp_server
    assert run(hostile_desk, "send", "--date", D).exit_code == 0
    raw = next(m.data for m in server.messages if m.rcpt_tos == ["ada@example.org"])
    _, html, text = parts(raw)
    tree = lxml.html.document_fromstring(html)
    assert not tree.xpath("//script | //b | //img[@onerror] | //*[@onerror]")
    credits = [p.text_content().replace("\u200b", "") for p in tree.xpath("//p[@class='muted']")]
    lead_credit = next(c for c in credits if "Zoë" in c)
    # Markup is gone (tags stripped at fetch, escaped at render), the length bounded.
    assert "<" not in lead_credit and "alert(1)" not in lead_credit
    assert len(lead_credit) <= 200 + len("…") and lead_credit.endswith("…")
    assert "P" * 150 in "".join(credits)
    assert "Nobody's picture" not in html  # no picture, no credit
    assert "Zoë" not in text  # the text part has no pictures, so no credits
    # Every line fits RFC 5322's 998 octets; the body's, quoted-printable, 76.
    head, body = raw.split(b"\r\n\r\n", 1)
    assert max(len(line) for line in head.split(b"\r\n")) <= 998
    assert max(len(line) for line in body.split(b"\r\n")) <= 76
    # Both parts carry the note, whole, with its 4-byte characters.
    assert "w" * 400 in html.replace("\u200b", "") and "w" * 400 in text
    assert f"{LONG_URL} ({LONG_URL})" not in text and LONG_URL in text
    assert "𝔘🦊" in html and "𝔘🦊" in text


@needs_chromium
def test_overlong_words_never_widen_the_round_up(hostile_desk: Path, tmp_path: Path) -> None:
    """A 200-character headline, a 280-character dek, a 250-character credit and a note
    with a 400-letter word and a 324-character URL: at phone and desktop widths the
    page is exactly as wide as the window (nothing to scroll sideways), and the card
    stays within its 640px."""
    pages = {}
    for who in (None, "kofi@example.org"):
        out = tmp_path / f"{who or 'all'}.html"
        args = ("--subscriber", who) if who else ()
        result = run(hostile_desk, "preview", "--date", D, *args, "--out", str(out))
        assert result.exit_code == 0, result.output
        pages[who or "all"] = out.read_text(encoding="utf-8")
    with chromium() as browser:
        for name, html in pages.items():
            for width in (375, 1024):
                page = browser.new_page(viewport={"width": width, "height": 900})
                page.set_content(html)
                scroll = page.evaluate("document.documentElement.scrollWidth")
                card = page.evaluate(
                    "document.querySelector('table.card-bg').getBoundingClientRect().width"
                )
                assert scroll == width, (name, width, scroll)
                assert card <= min(640, width), (name, width, card)
                page.close()


# --- the note's bytes ----------------------------------------------------------------------


def test_a_note_file_with_a_nul_byte_is_refused_on_postgresql(
    tmp_path: Path, smtp_server: tuple[Controller, Recorder]
) -> None:
    """PostgreSQL cannot store a NUL in text: the note is refused with the place of the
    character, not a database traceback."""
    from tests.test_postgres import pg_schema

    with pg_schema() as url:
        path = make_desk(tmp_path, smtp_server[0].port, db_url=url)
        run(path, "draft", "--date", D)
        run(path, "issue", "note", "--text", "Before.", "--date", D)
        note = tmp_path / "note.md"
        note.write_bytes(b"Line one\nab\x00cd\n")
        result = run(path, "issue", "note", "--file", str(note), "--date", D)
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
        assert result.stderr == (
            "digest: error: the note has a control character (U+0000) at line 2, "
            "column 3: remove it\n"
        )
        assert shown(path)["note"] == "Before."
        utf16 = tmp_path / "utf16.md"
        utf16.write_text("Héllo", encoding="utf-16")
        result = run(path, "issue", "note", "--file", str(utf16), "--date", D)
        assert result.exit_code == 2 and "not UTF-8 (byte 0); save it as UTF-8" in result.stderr


def test_break_opportunities_never_split_a_character() -> None:
    from digest.wrap import ZWSP, breakable

    assert breakable("short words stay as they are") == "short words stay as they are"
    family = "👨\u200d👩\u200d👧\u200d👦"  # one emoji: four people joined by ZWJ
    accented = "e\u0301" * 15  # e + combining acute, 30 code points
    flags = "🇫🇷" * 12
    for run_ in (family * 6, accented, flags, "x" + flags, "𝔘" * 40, "x" * 21):
        out = breakable(run_)
        assert out.replace(ZWSP, "") == run_ and ZWSP in out, run_
        for piece in out.split(ZWSP)[1:]:
            assert piece[0] not in ("\u200d", "\u0301"), out  # never before a joined mark
        for piece in out.split(ZWSP)[:-1]:
            assert piece[-1] != "\u200d", out  # never after a joiner
        for piece in out.split(ZWSP):  # flags stay whole: an even count in each piece
            assert sum("\U0001f1e6" <= c <= "\U0001f1ff" for c in piece) % 2 == 0, out
    assert breakable("x" * 20) == "x" * 20


# --- preview --serve ---------------------------------------------------------------------


@pytest.fixture
def preview_server(hostile_desk: Path) -> Iterator[tuple[pipeline.App, str]]:
    app = pipeline.open_app(load_config(hostile_desk))
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_preview_app(app, date.fromisoformat(D)),
            host="127.0.0.1",
            port=port,
            log_level="warning",
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, "the preview server to start")
    try:
        yield app, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        app.engine.dispose()


def _dump(path: Path) -> list[str]:
    import sqlite3

    conn = sqlite3.connect(path)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


def test_the_preview_server_is_read_only(
    preview_server: tuple[pipeline.App, str], hostile_desk: Path
) -> None:
    _, base = preview_server
    db = hostile_desk.parent / "digest.db"
    before = _dump(db)
    paths = ["/", f"/message?date={D}", f"/version?date={D}", "/preview.js", "/favicon.ico"]
    with httpx.Client(base_url=base, timeout=30) as client:
        for path in paths:
            assert client.get(path).status_code in (200, 204), path
            for method in ("POST", "PUT", "PATCH", "DELETE"):
                response = client.request(method, path, data={"note": "Pwned", "approve": "1"})
                assert response.status_code == 405, (method, path)
        for path in ("/approve", "/issue/note", "/send", f"/message?date={D}&approve=1"):
            response = client.post(path, data={"date": D})
            assert response.status_code in (404, 405), path
        # What a GET may carry changes nothing either (every page is a pure read).
        client.get("/message", params={"date": D, "subscriber": "kofi@example.org"})
        client.get("/message", params={"date": "2026-12-04", "edition": "Europe"})
    assert _dump(db) == before
    assert shown(hostile_desk)["status"] == "draft"


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc (Linux)")
def test_reloading_the_preview_leaks_no_file_handles(
    preview_server: tuple[pipeline.App, str], hostile_desk: Path
) -> None:
    """The page polls /version every second and reloads the frame on a change; an editor
    leaves it open all week. Hundreds of polls, renders and template edits later the
    server holds no more files or sockets than after the first few."""
    _, base = preview_server
    template = hostile_desk.parent / "templates" / "roundup.html.j2"
    source = template.read_text(encoding="utf-8")
    requests = [
        ("/version", {"date": D}),
        ("/message", {"date": D, "part": "html"}),
        ("/message", {"date": D, "part": "text", "subscriber": "kofi@example.org"}),
        ("/", {"date": D}),
    ]

    def burst(n: int) -> None:
        for i in range(n):
            path, params = requests[i % len(requests)]
            # A new connection each time, closed by the server, as a reloading page does.
            response = httpx.get(
                base + path, params=params, headers={"Connection": "close"}, timeout=30
            )
            assert response.status_code == 200, (path, response.text[:200])

    burst(24)  # warm up: the database pool and the template cache fill once
    settled = _open_fds()
    for n in range(3):
        # An edited template: the fingerprint changes and every render loads it again.
        template.write_text(source.replace("Keep reading", f"Read on {n}"), encoding="utf-8")
        version = httpx.get(base + "/version", params={"date": D}, timeout=30).json()["version"]
        burst(80)
        assert (
            httpx.get(base + "/version", params={"date": D}, timeout=30).json()["version"]
            == version
        )
    assert f"Read on {n}" in httpx.get(base + "/message", params={"date": D}, timeout=30).text
    wait_for(lambda: _open_fds() <= settled + 2, "the server's handles to settle", timeout=20)


def _other_addresses() -> set[str]:
    """This host's IPv4 and global IPv6 addresses other than loopback (Linux)."""
    import fcntl
    import struct

    found = set()
    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address on that interface
                continue
            found.add(socket.inet_ntoa(packed[20:24]))
    inet6 = Path("/proc/net/if_inet6")
    for line in inet6.read_text().splitlines() if inet6.exists() else []:
        hexaddr, _, _, scope, *_ = line.split()
        if scope == "00":  # global scope only (link-local needs an interface)
            found.add(str(ipaddress.IPv6Address(bytes.fromhex(hexaddr))))
    return {a for a in found if not ipaddress.ip_address(a).is_loopback}


def test_preview_serve_listens_on_loopback_only(hostile_desk: Path) -> None:
    """`digest preview --serve` shows subscribers' addresses: it must not be reachable
    from the network, whatever address of this host is used."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "digest", "--config", str(hostile_desk), "preview"),
            *("--serve", "--port", str(port), "--date", D),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        page = None
        while page is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                page = httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
            except httpx.TransportError:
                time.sleep(0.1)
        assert page is not None and page.status_code == 200 and "kofi@example.org" in page.text
        others = _other_addresses()
        if not others:
            pytest.skip("this host has no address but loopback to try")
        for address in others:
            host = f"[{address}]" if ":" in address else address
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"http://{host}:{port}/", timeout=5)
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def test_a_bidi_override_in_the_note_stays_in_the_note(
    tmp_path: Path, smtp_server: tuple[Controller, Recorder]
) -> None:
    """Right-to-left marks and overrides are kept (Arabic and Hebrew notes need them),
    but an unterminated override cannot turn what follows around: in HTML it ends with
    the note's paragraph element, in text with the note's paragraph (a blank line), per
    the Unicode bidi algorithm; the lead and the sections start their own paragraphs."""
    _, server = smtp_server
    path = make_desk(tmp_path, smtp_server[0].port)
    run(path, "draft", "--date", D)
    note = "שלום \u202bעולם\u200f and an override \u202eright to left"
    assert run(path, "issue", "note", "--text", note, "--date", D).exit_code == 0
    assert run(path, "send", "--test", "ed@example.org", "--date", D).exit_code == 0
    _, html, text = parts(server.messages[0].data)
    tree = lxml.html.document_fromstring(html)
    holders = [e for e in tree.iter() if e.text and "\u202e" in e.text]
    assert [e.tag for e in holders] == ["p"]
    assert holders[0].text_content().endswith("\u202eright to left")
    assert text.count("\u202e") == 1
    line = next(line for line in text.split("\n") if "\u202e" in line)
    assert line == note  # the override ends with its line
    after = text.split(note, 1)[1]
    assert after.startswith("\n\n") and "\u202e" not in after
