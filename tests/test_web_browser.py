"""The reader's journey in real headless Chromium against a real `digest serve`.

Signup form → confirmation mail (received by aiosmtpd) → confirm page → preference
centre → archive, clicking what a reader clicks. The browser enforces our
Content-Security-Policy, so a page that needed inline script or style would show up as
a console error here. Skips (with the reason) when /usr/bin/chromium is missing.

The README's screenshots come from this test: ``DIGEST_UPDATE_SCREENSHOTS=1 pytest
tests/test_web_browser.py`` writes them to docs/screenshots/. Each is taken twice and
must come out byte-identical (fixed viewport, data, fonts; no caret, no animation).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

from digest.models import SubscriberStatus
from tests.conftest import Recorder, free_port
from tests.webutil import (
    ROOT,
    Server,
    WebEnv,
    body_text,
    chromium,
    make_env,
    needs_chromium,
    send_issue,
    start_server,
    wait_for,
)

SHOTS = ROOT / "docs" / "screenshots"
NAME = "Zoë <b>&</b> 𝔘"  # 𝔘 is 4 bytes in UTF-8 (this machine has no emoji font)

pytestmark = needs_chromium


@pytest.fixture
def served(
    tmp_path: Path, feed_file: Path, smtp_server: tuple[Controller, Recorder]
) -> Iterator[tuple[WebEnv, Server]]:
    port = free_port()
    env = make_env(tmp_path, smtp_server, None, serve_port=port)
    send_issue(env, ["early@example.org"])  # the archive has an issue
    server = start_server(env.config_path, port, tmp_path / "serve.log")
    try:
        yield env, server
    finally:
        server.stop()
        env.app.engine.dispose()


def shoot(page: object, name: str, tmp_path: Path) -> None:
    """Screenshot the page twice (they must match), keep it, update the README's copy
    when asked."""
    first = page.screenshot(full_page=True, caret="hide", animations="disabled")  # type: ignore[attr-defined]
    second = page.screenshot(full_page=True, caret="hide", animations="disabled")  # type: ignore[attr-defined]
    assert first == second, f"screenshot {name} is not deterministic"
    assert first[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / f"{name}.png").write_bytes(first)
    if os.environ.get("DIGEST_UPDATE_SCREENSHOTS") == "1":
        SHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp_path / f"{name}.png", SHOTS / f"{name}.png")


def test_signup_confirm_preferences_archive_in_chromium(
    served: tuple[WebEnv, Server], tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    env, server = served
    problems: list[str] = []
    with chromium() as browser:
        context = browser.new_context(
            viewport={"width": 760, "height": 900},
            device_scale_factor=1,
            locale="en-US",
            timezone_id="UTC",
            color_scheme="light",
            reduced_motion="reduce",
        )
        # Loopback only: the archive's article images point at the feed's host.
        context.route(re.compile(r"^(?!http://127\.0\.0\.1:).*"), lambda route: route.abort())
        page = context.new_page()
        page.on(
            "console",
            lambda m: problems.append(m.text) if "Content Security Policy" in m.text else None,
        )

        # 1. The signup form.
        page.goto(f"{server.url}/subscribe")
        expect(page.locator("h1")).to_have_text("Subscribe to The Weekly Round-up")
        page.get_by_label("Email address").fill("fox@example.org")
        page.get_by_label("Name").fill(NAME)
        page.get_by_label("Europe").check()
        page.get_by_label("Asia-Pacific").check()
        # The honeypot is off screen (our stylesheet loaded, CSP allowing it).
        box = page.locator("#website").bounding_box()
        assert box is None or box["x"] + box["width"] <= 0, box
        shoot(page, "signup", tmp_path)
        page.get_by_role("button", name="Subscribe").click()
        expect(page.locator("h1")).to_have_text("Check your inbox")
        expect(page.locator("main")).to_contain_text("fox@example.org")

        # 2. The mail, then the confirm page: showing it changes nothing.
        wait_for(lambda: env.smtp.to("fox@example.org"), "the confirmation mail")
        text = body_text(env.smtp.to("fox@example.org")[0])
        confirm_url = re.search(rf"{re.escape(server.url)}/confirm/\S+", text)
        assert confirm_url, text
        page.goto(confirm_url.group(0))
        expect(page.locator("h1")).to_have_text("Confirm your subscription")
        expect(page.locator("dd").nth(1)).to_have_text(NAME)  # shown as text, not markup
        assert page.locator("main b").count() == 0
        expect(page.locator("dd").nth(2)).to_have_text("Asia-Pacific, Europe")
        shoot(page, "confirm", tmp_path)
        assert env.subscriber("fox@example.org") is None

        # 3. A person clicks.
        page.get_by_role("button", name="Confirm my subscription").click()
        expect(page.locator("h1")).to_have_text("You are subscribed")
        sub = env.subscriber("fox@example.org")
        assert sub is not None and sub.status == SubscriberStatus.ACTIVE
        assert sub.source == "signup" and sub.name == NAME

        # 4. The preference centre.
        page.get_by_role("link", name="Choose your regions").click()
        expect(page.locator("h1")).to_have_text("Your preferences")
        expect(page.get_by_label("Name")).to_have_value(NAME)
        expect(page.get_by_label("Europe")).to_be_checked()
        expect(page.get_by_label("Asia-Pacific")).to_be_checked()
        expect(page.get_by_label("Middle East")).not_to_be_checked()
        page.get_by_label("Europe").uncheck()
        page.get_by_label("Middle East").check()
        page.get_by_role("button", name="Save my preferences").click()
        expect(page.locator(".notice")).to_have_text(re.compile("preferences are saved"))
        expect(page.get_by_label("Middle East")).to_be_checked()
        shoot(page, "preferences", tmp_path)
        sub = env.subscriber("fox@example.org")
        assert sub is not None and sub.regions == ["Asia-Pacific", "Middle East"]

        # 5. The archive, from the footer.
        page.get_by_role("link", name="Past issues").click()
        expect(page.locator("h1")).to_have_text("Past issues")
        response = None
        with page.expect_response(re.compile(r"/archive/2026-11-27$")) as info:
            page.locator("ol.issues a").first.click()
        response = info.value
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
        expect(page.locator("h1")).to_have_text("The Weekly Round-up")
        for region in ("Asia-Pacific", "Europe", "Middle East", "Global Crises"):
            expect(page.get_by_role("heading", name=region, exact=True)).to_be_visible()
        assert "early@example.org" not in page.content()
        context.close()
    assert problems == [], problems
