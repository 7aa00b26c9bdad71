"""`digest serve` as a real process (uvicorn on a loopback port), on SQLite and PostgreSQL.

What only a real server shows: uvicorn must not believe X-Forwarded-For from 127.0.0.1
(its default), several serve processes share one database's limits and mail queue, and
a signup queued while the relay is down is sent by the next process that starts.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from aiosmtpd.controller import Controller

from digest.models import SignupMailStatus
from tests.conftest import Recorder, free_port
from tests.test_postgres import pg_url  # noqa: F401  (fixture used below)
from tests.webutil import (
    PortOnly,
    WebEnv,
    make_env,
    start_server,
    wait_for,
)


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest) -> str | None:
    return request.getfixturevalue("pg_url") if request.param == "postgres" else None


@pytest.fixture
def env(
    tmp_path: Path,
    feed_file: Path,
    smtp_server: tuple[Controller, Recorder],
    db_url: str | None,
) -> Iterator[WebEnv]:
    the_env = make_env(tmp_path, smtp_server, db_url, "\n[signup]\nmax_per_ip_per_hour = 5\n")
    yield the_env
    the_env.app.engine.dispose()


def post(url: str, email: str, forwarded_for: str | None = None) -> httpx.Response:
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
    return httpx.post(
        f"{url}/subscribe", data={"email": email, "website": ""}, headers=headers, timeout=30
    )


def test_two_serve_processes_share_limits_cooldowns_and_ignore_spoofed_headers(
    env: WebEnv, tmp_path: Path
) -> None:
    port_a, port_b = free_port(), free_port()
    a = start_server(env.config_path, port_a, tmp_path / "a.log")
    try:
        b = start_server(env.config_path, port_b, tmp_path / "b.log")
        try:
            # The same address through both processes: one mail.
            assert post(a.url, "both@example.org").status_code == 200
            assert post(b.url, "both@example.org").status_code == 200
            wait_for(lambda: env.smtp.to("both@example.org"), "the confirmation mail")
            wait_for(
                lambda: all(m.status == SignupMailStatus.SENT for m in env.mails()),
                "the queue to drain",
            )
            assert len(env.smtp.to("both@example.org")) == 1
            # Every request comes from 127.0.0.1, each claiming another client: the
            # header is not believed (no trusted proxies), so the limit (5) holds across
            # both processes.
            codes = [
                post((a, b)[i % 2].url, f"s{i}@example.org", f"198.51.100.{i}").status_code
                for i in range(5)
            ]
            assert codes == [200, 200, 200, 429, 429]  # 2 hits above + 3 = the limit of 5
        finally:
            b.stop()
    finally:
        a.stop()
    assert "Traceback" not in a.log_text() and "Traceback" not in b.log_text()


def test_a_signup_queued_while_the_relay_is_down_survives_a_restart(
    tmp_path: Path, feed_file: Path, db_url: str | None
) -> None:
    smtp_port = free_port()  # no relay listens here yet
    recorder = Recorder()
    port = free_port()
    env = make_env(tmp_path, (PortOnly(smtp_port), recorder), db_url, serve_port=port)  # type: ignore[arg-type]
    controller = None
    try:
        first = start_server(env.config_path, port, tmp_path / "first.log")
        try:
            assert post(first.url, "patient@example.org").status_code == 200
            wait_for(lambda: "retrying in" in first.log_text(), "the retry log line")
            assert "patient@example.org" in first.log_text()
        finally:
            first.stop()  # SIGTERM while the mail is still pending
        assert env.mails()[0].status == SignupMailStatus.PENDING
        controller = Controller(recorder, hostname="127.0.0.1", port=smtp_port)
        controller.start()
        second = start_server(env.config_path, port, tmp_path / "second.log")
        try:
            wait_for(lambda: recorder.to("patient@example.org"), "the mail after the restart")
            wait_for(lambda: env.mails()[0].status == SignupMailStatus.SENT, "the sent mark")
        finally:
            second.stop()
        assert len(recorder.to("patient@example.org")) == 1
    finally:
        if controller is not None:
            controller.stop()
        env.app.engine.dispose()
