"""Nothing lost, nothing doubled: faults injected against a real SMTP server and database.

Processes are real (``python -m digest … send`` in a subprocess) where the fault is a
process-level one: SIGKILL, SIGTERM, two senders at once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

from digest import pipeline
from digest.config import load_config
from digest.errors import SMTPUnavailableError
from tests.conftest import Recorder, free_port, write_config
from tests.test_send import D, add_subscribers, ledger

ROOT = Path(__file__).parent.parent


class SlowRecorder(Recorder):
    """Accepts every message after ``delay`` seconds; optionally drops a connection."""

    def __init__(
        self, delay: float = 0.0, drop_every: int = 0, stall_rcpt_once: float = 0.0
    ) -> None:
        super().__init__()
        self.delay = delay
        self.drop_every = drop_every
        self.stall_rcpt_once = stall_rcpt_once
        self.per_session: Counter[Any] = Counter()

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        key = id(session)
        if self.drop_every and self.per_session[key] >= self.drop_every:
            # The server goes away mid-session, before the next transaction.
            server.transport.close()
            return "421 4.4.2 closing"
        envelope.mail_from = address
        return "250 OK"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        if self.stall_rcpt_once:
            stall, self.stall_rcpt_once = self.stall_rcpt_once, 0.0
            await asyncio.sleep(stall)
        return await super().handle_RCPT(server, session, envelope, address, options)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.delay:
            await asyncio.sleep(self.delay)
        self.per_session[id(session)] += 1
        return await super().handle_DATA(server, session, envelope)


def start(handler: Recorder, **kw: Any) -> Controller:
    controller = Controller(handler, hostname="127.0.0.1", port=free_port(), **kw)
    controller.start()
    return controller


def prepared_app(
    tmp_path: Path, port: int, n: int, smtp_extra: str = ""
) -> tuple[Path, pipeline.App, list[str]]:
    path = write_config(tmp_path, port=port, smtp_extra=smtp_extra)
    config = load_config(path)
    pipeline.init_db(config)
    app = pipeline.open_app(config)
    assert pipeline.fetch(app).new == 10
    return path, app, add_subscribers(app, n)


def send_process(config_path: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "digest", "--config", str(config_path), "send", "--date", str(D)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(cond: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail("timed out waiting")
        time.sleep(0.01)


def copies(handler: Recorder) -> Counter[str]:
    return Counter(r for m in handler.messages for r in m.rcpt_tos)


def test_sigkill_mid_send_loses_nobody_and_duplicates_at_most_the_window(
    tmp_path: Path, feed_file: Path
) -> None:
    handler = SlowRecorder(delay=0.002)
    controller = start(handler)
    try:
        path, app, emails = prepared_app(tmp_path, controller.port, 600)
        proc = send_process(path)
        wait_for(lambda: len(handler.messages) >= 200)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        received_before = len(handler.messages)
        assert received_before < 600, "the send finished before the kill; nothing was tested"
        # Rerun: everyone remaining is delivered.
        report = pipeline.send(app, D)
        counts = copies(handler)
        assert set(counts) == set(emails)
        duplicates = {e: n for e, n in counts.items() if n > 1}
        print(f"\nSIGKILL after {received_before} messages: {len(duplicates)} duplicate(s)")
        assert len(duplicates) <= app.config.smtp.concurrency
        assert all(n == 2 for n in duplicates.values())
        for e in duplicates:
            ids = {m.message["Message-ID"] for m in handler.messages if e in m.rcpt_tos}
            assert len(ids) == 1  # the copy carries the first one's Message-ID
        assert report.counts["sent"] == 600 and report.counts["pending"] == 0
    finally:
        controller.stop()


def test_dropped_connections_are_retried_on_a_fresh_one(tmp_path: Path, feed_file: Path) -> None:
    handler = SlowRecorder(drop_every=7)
    controller = start(handler)
    try:
        _, app, emails = prepared_app(tmp_path, controller.port, 50)
        report = pipeline.send(app, D)
        counts = copies(handler)
        assert set(counts) == set(emails) and set(counts.values()) == {1}
        assert report.stats.retries > 0 and report.counts["sent"] == 50
    finally:
        controller.stop()


def test_slow_reply_to_data_is_waited_for_not_resent(tmp_path: Path, feed_file: Path) -> None:
    # Each DATA reply takes 1.5 s; commands time out after 0.5 s but DATA may take 30 s.
    handler = SlowRecorder(delay=1.5)
    controller = start(handler)
    try:
        _, app, emails = prepared_app(
            tmp_path, controller.port, 3, smtp_extra="data_timeout_seconds = 30"
        )
        app.config = app.config.model_copy(
            update={"smtp": app.config.smtp.model_copy(update={"timeout_seconds": 0.5})}
        )
        report = pipeline.send(app, D)
        assert report.stats.sent == 3 and report.stats.retries == 0
        assert sorted(copies(handler).elements()) == sorted(emails)
    finally:
        controller.stop()


def test_stall_before_data_is_retried(tmp_path: Path, feed_file: Path) -> None:
    handler = SlowRecorder(stall_rcpt_once=2.0)
    controller = start(handler)
    try:
        _, app, emails = prepared_app(tmp_path, controller.port, 4)
        app.config = app.config.model_copy(
            update={"smtp": app.config.smtp.model_copy(update={"timeout_seconds": 0.5})}
        )
        report = pipeline.send(app, D)
        assert report.stats.retries == 1
        assert sorted(copies(handler).elements()) == sorted(emails)
    finally:
        controller.stop()


def test_wrong_credentials_stop_the_run_and_lose_nothing(
    tmp_path: Path, feed_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def authenticator(
        server: Any, session: Any, envelope: Any, mechanism: str, data: Any
    ) -> AuthResult:
        ok = data.login == b"digest" and data.password == b"right"
        return AuthResult(success=ok, handled=False)  # let the server reply 535

    handler = Recorder()
    controller = start(
        handler, authenticator=authenticator, auth_required=True, auth_require_tls=False
    )
    try:
        monkeypatch.setenv("TEST_SMTP_PASSWORD", "wrong")
        extra = 'username = "digest"\npassword_env = "TEST_SMTP_PASSWORD"'
        path, app, emails = prepared_app(tmp_path, controller.port, 5, smtp_extra=extra)
        app = pipeline.open_app(load_config(path))
        with pytest.raises(SMTPUnavailableError, match="refused the login for 'digest'"):
            pipeline.send(app, D)
        assert handler.messages == [] and ledger(app)["pending"] == 5
        monkeypatch.setenv("TEST_SMTP_PASSWORD", "right")
        app = pipeline.open_app(load_config(path))
        assert pipeline.send(app, D).stats.sent == 5
        assert sorted(copies(handler)) == sorted(emails)
    finally:
        controller.stop()


def test_two_sends_at_once_on_sqlite_take_turns_and_never_double(
    tmp_path: Path, feed_file: Path
) -> None:
    handler = SlowRecorder(delay=0.03)  # ~3 s of sending: the second starts well inside it
    controller = start(handler)
    try:
        path, _, emails = prepared_app(tmp_path, controller.port, 300)
        first = send_process(path)
        wait_for(lambda: len(handler.messages) >= 10)
        second = send_process(path)
        # The second waits for the first to finish (SQLite: one sender at a time)...
        assert second.stderr is not None
        assert "waiting for another digest process holding 'send:2026-11-27'" in (
            second.stderr.readline()
        )
        assert first.poll() is None, "the first send ended before the second started"
        first_out, _ = first.communicate(timeout=120)
        out, err = second.communicate(timeout=60)
        # ...and then finds nothing left to send.
        assert first.returncode == 0 and "this run: 300 sent" in first_out
        assert second.returncode == 0 and "this run: 0 sent" in out, err
        counts = copies(handler)
        assert set(counts) == set(emails) and set(counts.values()) == {1}
    finally:
        controller.stop()


def test_sigterm_finishes_in_flight_and_records_them(tmp_path: Path, feed_file: Path) -> None:
    handler = SlowRecorder(delay=0.01)
    controller = start(handler)
    try:
        path, app, emails = prepared_app(tmp_path, controller.port, 400)
        proc = send_process(path)
        wait_for(lambda: len(handler.messages) >= 50)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert time.monotonic() - t0 < 10  # "within a few seconds"; generous for slow CI
        assert proc.returncode == 1 and "send stopped early" in err and "Traceback" not in err
        received = len(handler.messages)
        assert received < 400
        # Every message the server accepted is recorded as sent; nothing else is.
        assert ledger(app)["sent"] == received
        assert ledger(app)["pending"] == 400 - received and ledger(app)["sending"] == 0
        pipeline.send(app, D)
        counts = copies(handler)
        assert set(counts) == set(emails) and set(counts.values()) == {1}
    finally:
        controller.stop()
