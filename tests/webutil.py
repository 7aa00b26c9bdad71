"""Shared pieces of the web tests: an app on SQLite or PostgreSQL, a client, mail links."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import select
from starlette.testclient import TestClient

from digest import pipeline, store
from digest.config import load_config
from digest.models import SignupMail, Subscriber, SubscriberStatus, Throttle
from digest.web import create_app
from tests.conftest import Recorder, write_config

BASE = "https://news.example.org/u"  # [unsubscribe] base_url of write_config
FAST_MAILER = {"poll_seconds": 0.05, "retry_base_seconds": 0.05, "retry_cap_seconds": 0.2}
PEER = ("203.0.113.9", 40000)  # a client address (TEST-NET-3)
EDITION_DATE = "2026-11-27"

# Browser tests drive Debian's Chromium through Playwright (never `playwright install`).
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="/usr/bin/chromium is not installed (apt-get install chromium)"
)


@contextmanager
def chromium() -> Iterator[Any]:
    """A headless :data:`CHROMIUM` driven by Playwright, closed afterwards."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def wait_for(cond: Callable[[], object], what: str, timeout: float = 30) -> None:
    """Poll ``cond`` until true; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


class PortOnly:
    """Stands in for an SMTP Controller not started yet: a relay that is down (the port)."""

    def __init__(self, port: int) -> None:
        self.port = port


@dataclass
class WebEnv:
    """A database with the week's articles, its config path, and the SMTP recorder."""

    app: pipeline.App
    config_path: Path
    smtp: Recorder
    backend: str

    @property
    def config(self) -> Any:
        return self.app.config

    def client(self, peer: tuple[str, int] = PEER, **mailer: float) -> TestClient:
        """A TestClient of a fresh app on this database; use it in ``with`` to run the
        mailer (ASGI lifespan)."""
        web = create_app(
            self.app.config, self.app.sessions, mailer_options={**FAST_MAILER, **mailer}
        )
        return TestClient(web, client=peer)

    def subscriber(self, email: str) -> Subscriber | None:
        with self.app.sessions() as session:
            return store.subscriber_by_email(session, email)

    def mails(self) -> list[SignupMail]:
        with self.app.sessions() as session:
            return store.signup_mails(session)

    def add(self, email: str, status: SubscriberStatus, name: str = "", source: str = "csv") -> int:
        now = datetime.now(UTC)
        with self.app.sessions.begin() as session:
            store.add_subscribers(
                session,
                [
                    {
                        "email": email,
                        "name": name,
                        "regions": None,
                        "status": status,
                        "source": source,
                        "hard_bounces": 3 if status == SubscriberStatus.BOUNCED else 0,
                        "created_at": now,
                        "updated_at": now,
                        "subscribed_at": now,
                    }
                ],
            )
            sub = store.subscriber_by_email(session, email)
            assert sub is not None
            return sub.id

    def snapshot(self) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], int]:
        """Everything a request could change: subscribers, queued mails, throttles."""
        with self.app.sessions() as session:
            subs = [
                (s.id, s.email, s.name, s.regions, str(s.status), s.source, s.confirmed_at)
                for s in session.scalars(select(Subscriber).order_by(Subscriber.id))
            ]
            mails = [(m.id, m.email, str(m.status)) for m in store.signup_mails(session)]
            throttles = len(list(session.scalars(select(Throttle))))
        return subs, mails, throttles


def make_env(
    tmp_path: Path,
    smtp: tuple[Controller, Recorder],
    db_url: str | None,
    extra: str = "",
    serve_port: int | None = None,
) -> WebEnv:
    """Config, initialised database and the week's articles; ``serve_port`` points
    base_url at a local `digest serve`."""
    controller, recorder = smtp
    path = write_config(tmp_path, port=controller.port, extra=extra)
    if serve_port is not None:
        use_base_url(path, serve_port)
    if db_url is not None:
        text = path.read_text(encoding="utf-8").replace(
            'url = "sqlite:///digest.db"', f'url = "{db_url}"'
        )
        path.write_text(text, encoding="utf-8")
    config = load_config(path)
    pipeline.init_db(config)
    app = pipeline.open_app(config)
    assert pipeline.fetch(app).new == 10
    return WebEnv(app, path, recorder, "postgres" if db_url else "sqlite")


@pytest.fixture(params=["sqlite", "postgres"])
def web_env(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    feed_file: Path,
    smtp_server: tuple[Controller, Recorder],
) -> Iterator[WebEnv]:
    """The web app's database on SQLite and on PostgreSQL (schema per test)."""
    url = request.getfixturevalue("pg_url") if request.param == "postgres" else None
    env = make_env(tmp_path, smtp_server, url)
    yield env
    env.app.engine.dispose()


@pytest.fixture
def sqlite_env(
    tmp_path: Path, feed_file: Path, smtp_server: tuple[Controller, Recorder]
) -> Iterator[WebEnv]:
    """The web app's database on SQLite only (hostile-input tests)."""
    env = make_env(tmp_path, smtp_server, None)
    yield env
    env.app.engine.dispose()


def body_text(received: Any) -> str:
    """The text/plain part of a received message."""
    part = received.message.get_body(("plain",))
    assert part is not None
    return str(part.get_content())


def link(text: str, kind: str) -> str:
    """The path (below base_url) of the first ``/{kind}/…`` link in ``text``."""
    m = re.search(re.escape(BASE) + rf"(/{kind}/[A-Za-z0-9_.\-]+)", text)
    assert m, f"no /{kind}/ link in:\n{text}"
    return m.group(1)


def main_of(html: str) -> str:
    """The <main> element of a page (what differs between pages)."""
    return html[html.index("<main>") : html.index("</main>")]


def subscribe(client: TestClient, email: str, **fields: Any) -> Any:
    """POST the signup form as a browser would."""
    return client.post("/subscribe", data={"email": email, "website": "", **fields})


def send_issue(env: WebEnv, emails: list[str] | None = None) -> None:
    """Send the week's round-up (so the archive has an issue)."""
    for email in emails or []:
        env.add(email, SubscriberStatus.ACTIVE, name="Archive Reader")
    pipeline.send(env.app, datetime.fromisoformat(EDITION_DATE).date())


# --- a real `digest serve` process --------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Server:
    """A `digest serve` process on a loopback port, its log in a file."""

    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def use_base_url(config_path: Path, port: int) -> None:
    """Point [unsubscribe] base_url at a local `digest serve` on ``port``."""
    text = config_path.read_text(encoding="utf-8").replace(
        f'base_url = "{BASE}"', f'base_url = "http://127.0.0.1:{port}"'
    )
    config_path.write_text(text, encoding="utf-8")


def start_server(config_path: Path, port: int, log: Path) -> Server:
    """Start `python -m digest serve` and wait until /healthz answers."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with log.open("ab") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "digest",
                "--config",
                str(config_path),
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = Server(process, f"http://127.0.0.1:{port}", log)

    def up() -> bool:
        if process.poll() is not None:
            pytest.fail(f"digest serve exited with {process.returncode}:\n{server.log_text()}")
        try:
            return httpx.get(f"{server.url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, "digest serve to answer /healthz", timeout=60)
    except BaseException:
        server.stop()
        raise
    return server
