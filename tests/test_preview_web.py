"""`digest preview --serve` in real headless Chromium: the draft as sent, per edition and
per subscriber, desktop and mobile widths, the plain text, and reload on change.

The preview app runs in uvicorn on loopback; the round-up's pictures come from a small
HTTP server on loopback too (no network). The browser tests skip, with the reason, when
/usr/bin/chromium is missing (the Host checks need no browser and always run). The
README's screenshot comes from here: ``DIGEST_UPDATE_SCREENSHOTS=1 pytest
tests/test_preview_web.py`` writes docs/screenshots/editors-week.png.
"""

from __future__ import annotations

import http.client
import os
import shutil
import struct
import threading
import zlib
from collections.abc import Iterator
from datetime import date
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import uvicorn
from aiosmtpd.controller import Controller

from digest import editorial, pipeline
from digest.config import load_config
from digest.web.preview import create_preview_app
from tests.conftest import Recorder, free_port
from tests.test_editorial import EU0, D, feed_items, make_desk, run
from tests.webutil import chromium, needs_chromium, wait_for

ROOT = Path(__file__).parent.parent
SHOT = ROOT / "docs" / "screenshots" / "editors-week.png"
PICTURE_CREDIT = "Zoë Lens/Agence & Co"
NOTE = (
    "This week we follow **Europe's** budget fights, and the [long read]"
    "(https://news.example.org/long) on the Gulf's chip race.\n\n— The editors"
)


def png(width: int, height: int, seed: int) -> bytes:
    """A PNG picture (a muted sky over land, its colours from the seed), made here."""
    sky = (120 + seed * 37 % 80, 150 + seed * 23 % 60, 190 + seed * 11 % 50)
    land = (70 + seed * 29 % 60, 90 + seed * 17 % 50, 60 + seed * 13 % 40)
    horizon = height * 3 // 5
    rows = []
    for y in range(height):
        if y < horizon:
            t = y / horizon
            colour = bytes(int(c * (0.75 + 0.25 * t)) for c in sky)
        else:
            t = (y - horizon) / (height - horizon)
            colour = bytes(int(c * (1 - 0.35 * t)) for c in land)
        rows.append(b"\0" + colour * width)

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"".join(rows)))
        + chunk(b"IEND", b"")
    )


@pytest.fixture
def pictures() -> Iterator[str]:
    """An HTTP server on loopback answering /img/N.png with a picture."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seed = int("".join(c for c in self.path if c.isdigit()) or "0")
            body = png(320, 180, seed)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def desk(
    tmp_path: Path, smtp_server: tuple[Controller, Recorder], pictures: str
) -> Iterator[pipeline.App]:
    """A draft with a lead, a note and pictures; templates in a folder of its own."""
    shutil.copytree(ROOT / "templates", tmp_path / "templates")
    items = feed_items()
    items[EU0 - 1]["credit"] = PICTURE_CREDIT  # (this machine has no emoji font)
    for n, item in enumerate(items):
        if item.get("image"):
            item["image"] = f"{pictures}/img/{n}.png"
    from tests.conftest import rss

    path = make_desk(tmp_path, smtp_server[0].port)
    (tmp_path / "feed.xml").write_text(rss(items), encoding="utf-8")
    text = path.read_text()
    path.write_text(text.replace("[newsletter]\n", '[newsletter]\ntemplates_dir = "templates"\n'))
    assert run(path, "fetch").exit_code == 0
    assert run(path, "draft", "--date", D).exit_code == 0
    assert run(path, "issue", "lead", str(EU0), "--date", D).exit_code == 0
    assert run(path, "issue", "note", "--text", NOTE, "--date", D).exit_code == 0
    app = pipeline.open_app(load_config(path))
    yield app
    app.engine.dispose()


@pytest.fixture
def preview_url(desk: pipeline.App) -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_preview_app(desk, None), host="127.0.0.1", port=port, log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, "the preview server to start")
    try:
        yield f"http://127.0.0.1:{port}/?date={D}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def page(preview_url: str) -> Iterator[Any]:
    with chromium() as browser:
        pg = browser.new_page(viewport={"width": 1280, "height": 1000})
        errors: list[str] = []
        pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        pg.goto(preview_url)
        yield pg
        assert errors == []  # no CSP violation, no script error


def frame_text(page: Any) -> str:
    frame = page.frame_locator("#message")
    return str(frame.locator("body").inner_text())


def loads(page: Any) -> int:
    return int(page.get_attribute("#message", "data-loads") or "0")


@needs_chromium
def test_the_preview_page_switches_and_reloads(
    page: Any, desk: pipeline.App, tmp_path: Path
) -> None:
    wait_for(lambda: "Europe story 0" in frame_text(page), "the round-up in the frame")
    text = frame_text(page)
    assert "Hello there," in text and "budget fights" in text and PICTURE_CREDIT in text
    body = text.split("Hello there,", 1)[1]  # (the preheader before it repeats the lead)
    assert body.index("budget fights") < body.index("Europe story 0") < body.index("ASIA-PACIFIC")
    assert "draft" in page.inner_text("#issue-status")
    # A picture loaded (from the loopback server), at full width for the lead.
    frame = page.frame_locator("#message")
    lead_img = frame.locator("img.image")
    wait_for(lambda: lead_img.evaluate("i => i.naturalWidth") == 320, "the lead picture")
    assert lead_img.bounding_box()["width"] == pytest.approx(592, abs=1)

    # Per edition: Asia-Pacific readers do not get the Europe lead.
    options = page.locator("#edition option").all_inner_texts()
    assert options == ["All sections", "Asia-Pacific", "Europe"]  # the readers' region sets
    page.select_option("#edition", label="Asia-Pacific")
    wait_for(lambda: "Europe story 0" not in frame_text(page), "the Asia-Pacific edition")
    assert "Asia-Pacific story 0" in frame_text(page)
    # Per subscriber: their name and their edition.
    page.select_option("#subscriber", "kofi@example.org")
    wait_for(lambda: "Hello Kofi," in frame_text(page), "Kofi's edition")
    assert "Europe story 0" in frame_text(page) and "ASIA-PACIFIC" not in frame_text(page)
    assert page.is_disabled("#edition")

    # Widths.
    page.click("#mobile")
    wait_for(lambda: page.locator("#message").bounding_box()["width"] == 375, "mobile width")
    page.click("#desktop")
    wait_for(lambda: page.locator("#message").bounding_box()["width"] == 1024, "desktop width")

    # The plain-text part.
    page.click("#tab-text")
    wait_for(lambda: "Keep reading:\nhttps://" in frame_text(page), "the text part")
    text = frame_text(page)
    assert "Hello Kofi," in text and "budget fights" in text and "<" not in text
    page.click("#tab-html")
    wait_for(lambda: "Keep reading\xa0→" in frame_text(page), "the HTML part again")

    # The issue changes (an editor's edit in another terminal): the frame reloads.
    before = loads(page)
    editorial.set_note(desk, date.fromisoformat(D), "A *fresh* note & 𝔘.")
    wait_for(lambda: "A fresh note & 𝔘." in frame_text(page), "the new note")
    assert loads(page) == before + 1
    # A template changes: the frame reloads too.
    template = tmp_path / "templates" / "roundup.html.j2"
    template.write_text(
        template.read_text(encoding="utf-8").replace("Keep reading&nbsp;&rarr;", "Read on ⟶"),
        encoding="utf-8",
    )
    wait_for(lambda: "Read on ⟶" in frame_text(page), "the edited template")
    assert loads(page) == before + 2


@needs_chromium
def test_readme_screenshot_of_a_round_up_with_a_lead_and_a_note(page: Any, tmp_path: Path) -> None:
    page.set_viewport_size({"width": 1280, "height": 1500})
    frame = page.frame_locator("#message")
    wait_for(
        lambda: frame.locator("img.image").evaluate("i => i.complete && i.naturalWidth") == 320,
        "the lead picture",
    )
    wait_for(
        lambda: all(
            frame.locator("img.thumb").evaluate_all("l => l.map(i => i.complete && i.naturalWidth)")
        ),
        "the thumbnails",
    )
    shot = page.screenshot(caret="hide", animations="disabled")
    assert shot[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", shot[16:24])
    assert (width, height) == (1280, 1500)
    (tmp_path / "editors-week.png").write_bytes(shot)
    if os.environ.get("DIGEST_UPDATE_SCREENSHOTS") == "1":
        SHOT.parent.mkdir(parents=True, exist_ok=True)
        SHOT.write_bytes(shot)


def _get(port: int, path: str, host: str | None) -> tuple[int, str]:
    """GET ``path`` from 127.0.0.1:``port`` with exactly this Host header (None: none)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest("GET", path, skip_host=True, skip_accept_encoding=True)
        if host is not None:
            conn.putheader("Host", host)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    finally:
        conn.close()


def test_the_preview_answers_only_to_its_own_address(preview_url: str) -> None:
    """DNS rebinding: a page the editor visits on evil.example re-points that name at
    127.0.0.1, and its script then reaches the preview with ``Host: evil.example:PORT``
    (same origin for the browser, so it may read the answer). Only the names of this
    address are served; anything else gets one clear page and none of the preview."""
    port = urlsplit(preview_url).port
    assert port is not None
    paths = [
        f"/?date={D}",
        f"/message?date={D}&subscriber=kofi%40example.org",
        f"/message?date={D}&subscriber=kofi%40example.org&part=text",
        f"/version?date={D}",
        "/preview.js",
    ]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LocalHost:{port}", f"[::1]:{port}"):
        status, body = _get(port, paths[0], host)
        assert status == 200 and "kofi@example.org" in body, host  # what a forger would read
        status, body = _get(port, paths[1], host)
        assert status == 200 and "Hello Kofi," in body, host
    forged = [
        f"evil.example:{port}",
        "evil.example",
        f"127.0.0.1.evil.example:{port}",
        f"localhost.evil.example:{port}",
        f"127.0.0.1:{port + 1}",
        "127.0.0.1",  # the port is not 80
        f"127.0.0.1:{port}.evil.example",
        f"[::1]:{port}@evil.example",
        f"evil.example:{port}, 127.0.0.1:{port}",
    ]
    for host in forged:
        for path in paths:
            status, body = _get(port, path, host)
            assert status == 421, (host, path, status)
            assert "kofi@example.org" not in body and "Hello Kofi" not in body, host
            assert "Kofi" not in body and "Europe story" not in body and "fetch(" not in body
            assert f"http://127.0.0.1:{port}/" in body and "Host" in body, body
    status, body = _get(port, paths[0], None)  # no Host at all (HTTP/1.1 requires one)
    assert status in (400, 421) and "kofi@example.org" not in body
