"""The scheduler: cron in the configured zone, persistent jobs, late firings, one runner."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from click.testing import CliRunner

from digest import pipeline, store
from digest.cli import main
from digest.config import load_config
from digest.jobs import edition_date_for
from digest.models import IssueStatus, SubscriberStatus
from digest.schedule import SEND_JOB, build_scheduler, run_scheduler, sync_jobs
from tests.conftest import Recorder, rss, week_items, write_config

NY = ZoneInfo("America/New_York")


def test_edition_date_is_the_latest_firing() -> None:
    trigger = load_config(
        Path(__file__).parent.parent / "config.example.toml"
    ).schedule.cron_trigger()
    # Friday 09:00 New York.
    assert edition_date_for(trigger, datetime(2026, 11, 28, 2, tzinfo=NY)) == date(2026, 11, 27)
    assert edition_date_for(trigger, datetime(2026, 11, 27, 9, 0, tzinfo=NY)) == date(2026, 11, 27)
    assert edition_date_for(trigger, datetime(2026, 11, 27, 8, 59, tzinfo=NY)) == date(2026, 11, 20)


def _prepare(config_path: Path, feed_file: Path, readers: int = 3) -> pipeline.App:
    """A database with this week's articles (relative to the real clock) and 3 readers."""
    config = load_config(config_path)
    edition = edition_date_for(config.schedule.cron_trigger(), datetime.now(UTC))
    shift = datetime(edition.year, edition.month, edition.day, 12, tzinfo=UTC) - datetime(
        2026, 11, 27, 12, tzinfo=UTC
    )
    items = week_items()
    for it in items:
        it["published"] += shift
    feed_file.write_text(rss(items), encoding="utf-8")
    pipeline.init_db(config)
    app = pipeline.open_app(config)
    assert pipeline.fetch(app).new == 10
    now = datetime.now(UTC)
    with app.sessions() as session:
        store.add_subscribers(
            session,
            [
                {
                    "email": f"r{i}@example.org",
                    "name": "",
                    "regions": None,
                    "status": SubscriberStatus.ACTIVE,
                    "source": "t",
                    "created_at": now,
                    "updated_at": now,
                    "hard_bounces": 0,
                }
                for i in range(readers)
            ],
        )
        session.commit()
    return app


def _stored_send_due_at(config_path: Path, when: datetime) -> None:
    """Simulate a service that was down: the stored send job was due at ``when``."""
    config = load_config(config_path)
    scheduler = build_scheduler(config)
    scheduler.start(paused=True)
    sync_jobs(scheduler, config)
    scheduler.modify_job(SEND_JOB, next_run_time=when)
    # APScheduler 3 processes due jobs once more while shutting down (even when paused),
    # which would "run" the job we just made due; detach the store first.
    scheduler.remove_jobstore("default")
    scheduler.shutdown(wait=False)


def _run_until(
    config_path: Path, done: Callable[[list[str]], bool], timeout: float = 60
) -> list[str]:
    """Run the scheduler until ``done(logs)``, then stop it; its log lines."""
    logs: list[str] = []
    stop = threading.Event()
    t = threading.Thread(target=run_scheduler, args=(load_config(config_path), logs.append, stop))
    t.start()
    try:
        deadline = time.monotonic() + timeout
        while not done(logs):
            assert t.is_alive(), logs
            assert time.monotonic() < deadline, f"timed out; logs: {logs}"
            time.sleep(0.02)
    finally:
        stop.set()
        t.join(30)
    assert not t.is_alive()
    return logs


def checked_at_start(logs: list[str]) -> bool:
    """The start-up resume job has run: whatever this start would send, it has sent."""
    return any("start-up check done" in line for line in logs)


def issue_sent(config_path: Path) -> bool:
    app = pipeline.open_app(load_config(config_path))
    try:
        with app.sessions() as session:
            issues = store.recent_issues(session, 1)
            return bool(issues) and issues[0].status == IssueStatus.SENT
    finally:
        app.engine.dispose()


def test_late_start_within_grace_sends_once(
    config_path: Path, feed_file: Path, smtp_server: tuple[object, Recorder]
) -> None:
    _, server = smtp_server
    _prepare(config_path, feed_file)
    _stored_send_due_at(config_path, datetime.now(UTC) - timedelta(hours=2))  # grace is 12 h
    # Until the ledger says the issue is sent (no send of it is left to run) and the
    # start-up check is done.
    _run_until(config_path, lambda logs: checked_at_start(logs) and issue_sent(config_path))
    assert sorted(r for m in server.messages for r in m.rcpt_tos) == [
        f"r{i}@example.org" for i in range(3)
    ]
    # Restarting does not fire it again: the stored job now points at next week, and the
    # start-up check (the one job that could send now) finds nothing open.
    logs = _run_until(config_path, checked_at_start)
    assert len(server.messages) == 3
    assert not any("missed" in line or "failed" in line for line in logs), logs


def test_late_start_after_grace_does_not_send(
    config_path: Path, feed_file: Path, smtp_server: tuple[object, Recorder]
) -> None:
    _, server = smtp_server
    _prepare(config_path, feed_file)
    _stored_send_due_at(config_path, datetime.now(UTC) - timedelta(hours=13))
    logs = _run_until(
        config_path,
        lambda logs: checked_at_start(logs) and any("missed its run time" in x for x in logs),
    )
    assert server.messages == []
    assert any("missed its run time" in line for line in logs)
    result = CliRunner().invoke(main, ["--config", str(config_path), "status"])
    assert re.search(r"^\d{4}-\d\d-\d\d  MISSED ", result.stdout, re.M), result.stdout


def test_unchanged_jobs_keep_their_stored_run_time(config_path: Path, feed_file: Path) -> None:
    _prepare(config_path, feed_file)
    past = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    _stored_send_due_at(config_path, past)
    config = load_config(config_path)
    # (the stored job is reloaded from the database, not from the helper's scheduler)
    scheduler = build_scheduler(config)
    scheduler.start(paused=True)
    try:
        sync_jobs(scheduler, config)
        job = scheduler.get_job(SEND_JOB)
        assert job is not None and job.next_run_time == past
        assert str(job.trigger) == "crontab[0 9 * * fri, America/New_York]"
    finally:
        scheduler.shutdown(wait=False)


def test_second_runner_on_the_same_database_refuses(config_path: Path, feed_file: Path) -> None:
    _prepare(config_path, feed_file)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    cmd = [sys.executable, "-m", "digest.cli", "--config", str(config_path), "run"]
    first = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        # Wait until the first one holds the lock (it logs its next send time).
        assert first.stderr is not None
        line = ""
        deadline = time.monotonic() + 30
        while "next send at" not in line and time.monotonic() < deadline:
            line = first.stderr.readline()
        assert "next send at" in line
        second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
        assert second.returncode == 1
        assert "another digest process holds 'scheduler'" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        try:
            first.wait(timeout=20)
        except subprocess.TimeoutExpired:
            first.kill()
            pytest.fail("digest run did not stop on SIGTERM")
    assert first.returncode == 0


def _run_process(config_path: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    return subprocess.Popen(
        [sys.executable, "-m", "digest", "--config", str(config_path), "run"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_run_killed_mid_send_resumes_on_restart(config_path: Path, feed_file: Path) -> None:
    from tests.test_faults import SlowRecorder, start, wait_for

    handler = SlowRecorder(delay=0.01)
    controller = start(handler)
    try:
        path = write_config(config_path.parent, port=controller.port)
        _prepare(path, feed_file, readers=300)
        _stored_send_due_at(path, datetime.now(UTC) - timedelta(minutes=5))
        first = _run_process(path)
        wait_for(lambda: len(handler.messages) >= 60)
        first.send_signal(signal.SIGKILL)
        first.wait(30)
        assert len(handler.messages) < 300
        second = _run_process(path)  # its start-up resume job finishes the edition
        try:
            wait_for(lambda: len({r for m in handler.messages for r in m.rcpt_tos}) >= 300)
            wait_for(lambda: issue_sent(path))  # every message recorded: none still in flight
        finally:
            second.send_signal(signal.SIGTERM)
            second.wait(30)
        copies = Counter(r for m in handler.messages for r in m.rcpt_tos)
        assert len(copies) == 300
        assert sum(n - 1 for n in copies.values()) <= 3  # at most the in-flight window
    finally:
        controller.stop()


def test_sigterm_stops_run_mid_send_within_seconds(config_path: Path, feed_file: Path) -> None:
    from tests.test_faults import SlowRecorder, start, wait_for

    handler = SlowRecorder(delay=0.02)
    controller = start(handler)
    try:
        path = write_config(config_path.parent, port=controller.port)
        app = _prepare(path, feed_file, readers=400)
        _stored_send_due_at(path, datetime.now(UTC) - timedelta(minutes=5))
        proc = _run_process(path)
        wait_for(lambda: len(handler.messages) >= 30)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        assert time.monotonic() - t0 < 10
        assert proc.returncode == 0
        received = len(handler.messages)
        assert received < 400
        with app.sessions() as session:
            edition = store.recent_issues(session, 1)[0]
            counts = store.delivery_counts(session, edition.id)
        assert counts["sent"] == received and counts["sending"] == 0
    finally:
        controller.stop()
