"""Many senders, one list, on PostgreSQL: real processes, real signals, injected faults.

Every test uses a schema of its own on the server at 127.0.0.1:5432, real ``digest``
processes (``python -m digest.cli``) and a real SMTP server (aiosmtpd) on loopback.
Leases are 5 s so that expiry-driven takeovers are quick; every wait polls a condition
against a deadline.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from click.testing import CliRunner
from sqlalchemy import Engine, text

from digest import pipeline, store
from digest.cli import main
from digest.config import load_config
from digest.ledger import Ledger
from digest.models import DeliveryStatus
from digest.send import Outcome
from tests.conftest import Recorder, free_port, write_config
from tests.test_faults import SlowRecorder, copies, start
from tests.test_postgres import pg_schema
from tests.test_send import D, add_subscribers

ROOT = Path(__file__).parent.parent
LEASE = 5


def pg_config(
    folder: Path, url: str, port: int, smtp_extra: str = "", extra: str = "", name: str = ""
) -> Path:
    """A config on the test schema with a short lease; ``name`` makes a second file."""
    path = write_config(folder, port=port, smtp_extra=smtp_extra, extra=extra)
    text_ = path.read_text(encoding="utf-8").replace(
        'url = "sqlite:///digest.db"', f'url = "{url}"'
    )
    text_ = text_.replace("[schedule]", f"[send]\nlease_seconds = {LEASE}\n\n[schedule]")
    if name:
        path = folder / name
    path.write_text(text_, encoding="utf-8")
    return path


def prepared(config_path: Path, readers: int) -> tuple[pipeline.App, list[str]]:
    config = load_config(config_path)
    pipeline.init_db(config)
    app = pipeline.open_app(config)
    assert pipeline.fetch(app).new == 10
    return app, add_subscribers(app, readers)


def digest_process(config_path: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "digest.cli", "--config", str(config_path), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def send_process(config_path: Path) -> subprocess.Popen[str]:
    return digest_process(config_path, "send", "--date", str(D))


def poll(cond: Callable[[], Any], timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def sql(engine: Engine, query: str, **params: Any) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(text(query), params).all())


def owners_by_pid(engine: Engine, status: str) -> Counter[int]:
    rows = sql(
        engine,
        "SELECT owner, count(*) FROM deliveries WHERE status = :s AND owner IS NOT NULL "
        "GROUP BY owner",
        s=status,
    )
    return Counter({int(owner.split(":")[1]): n for owner, n in rows})


def same_message_id(handler: Recorder, duplicated: list[str]) -> None:
    for addr in duplicated:
        ids = {m.message["Message-ID"] for m in handler.messages if addr in m.rcpt_tos}
        assert len(ids) == 1, (addr, ids)


@pytest.fixture
def pg() -> Iterator[str]:
    """A database URL on a schema of its own (see ``tests.test_postgres.pg_schema``)."""
    with pg_schema() as url:
        yield url


@pytest.fixture
def slow_server() -> Iterator[tuple[Controller, SlowRecorder]]:
    handler = SlowRecorder(delay=0.02)
    controller = start(handler)
    try:
        yield controller, handler
    finally:
        controller.stop()


# --- many workers ---------------------------------------------------------------------------


def test_three_workers_share_a_send_and_a_killed_one_is_taken_over(
    tmp_path: Path, feed_file: Path, pg: str, slow_server: tuple[Controller, SlowRecorder]
) -> None:
    controller, handler = slow_server
    path = pg_config(tmp_path, pg, controller.port)
    app, emails = prepared(path, 1200)
    workers = [send_process(path) for _ in range(3)]
    pids = {w.pid for w in workers}
    try:
        # Wait until every worker has claimed a share, then kill one that holds rows.
        poll(
            lambda: (
                set(owners_by_pid(app.engine, "sending")) | set(owners_by_pid(app.engine, "sent"))
                >= pids
            ),
            what="all three workers to claim rows",
        )
        holding = owners_by_pid(app.engine, "sending")
        victim = next(w for w in workers if holding[w.pid] > 0)
        victim.send_signal(signal.SIGKILL)
        victim.wait(30)
        orphaned = owners_by_pid(app.engine, "sending")[victim.pid]
        assert orphaned > 0, "the killed worker held nothing: the takeover is not tested"
        survivors = [w for w in workers if w is not victim]
        outputs = [w.communicate(timeout=120) for w in survivors]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    for w, (_, err) in zip(survivors, outputs, strict=True):
        assert w.returncode == 0, err
        assert "Traceback" not in err
    counts = copies(handler)
    assert set(counts) == set(emails)  # every subscriber got the round-up
    duplicated = [e for e, n in counts.items() if n > 1]
    # Only the killed worker's messages in flight (250 received, outcome not committed)
    # can be sent twice: at most its number of SMTP connections.
    assert len(duplicated) <= app.config.smtp.concurrency
    assert all(counts[e] == 2 for e in duplicated)
    same_message_id(handler, duplicated)
    ledger_counts = sql(app.engine, "SELECT status, count(*) FROM deliveries GROUP BY status")
    assert dict(ledger_counts) == {"sent": 1200}
    # The survivors took the killed worker's rows over: they recorded them as theirs.
    sent_by = owners_by_pid(app.engine, "sent")
    assert sum(sent_by[w.pid] for w in survivors) + sent_by[victim.pid] == 1200
    said = sum(int(re.search(r"this run: (\d+) sent", out)[1]) for out, _ in outputs)  # type: ignore[index]
    assert said == sum(sent_by[w.pid] for w in survivors)
    issue = sql(app.engine, "SELECT status FROM issues")
    assert issue == [("sent",)]
    app.engine.dispose()


def test_workers_started_together_on_a_small_list_each_get_a_share(
    tmp_path: Path, feed_file: Path, pg: str, slow_server: tuple[Controller, SlowRecorder]
) -> None:
    controller, handler = slow_server
    path = pg_config(tmp_path, pg, controller.port)
    app, emails = prepared(path, 1000)
    workers = [send_process(path) for _ in range(2)]
    outputs = [w.communicate(timeout=180) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    counts = copies(handler)
    assert set(counts) == set(emails) and set(counts.values()) == {1}
    sent_by = owners_by_pid(app.engine, "sent")
    assert all(sent_by[w.pid] >= 200 for w in workers), sent_by  # at least a batch each
    app.engine.dispose()


# --- the database goes away -------------------------------------------------------------------


def test_dropped_database_connections_fail_in_one_line_and_a_rerun_completes(
    tmp_path: Path, feed_file: Path, pg: str, slow_server: tuple[Controller, SlowRecorder]
) -> None:
    controller, handler = slow_server
    path = pg_config(tmp_path, pg, controller.port)
    app, emails = prepared(path, 600)
    worker = send_process(path)
    try:
        poll(lambda: len(handler.messages) >= 50, what="50 messages")
        # Every backend of that process, found by the application_name digest gives it.
        killed = sql(
            app.engine,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = :a",
            a=f"digest:{worker.pid}",
        )
        assert killed and all(ok for (ok,) in killed)
        _, err = worker.communicate(timeout=60)
    finally:
        if worker.poll() is None:
            worker.kill()
    assert worker.returncode == 1
    assert "Traceback" not in err
    assert err.count("\n") == 1 and "lost the database while sending" in err, err
    received_once = {r for m in handler.messages for r in m.rcpt_tos}
    assert len(received_once) < 600, "the send finished before the connections were dropped"
    # Nothing is marked sent that the server did not accept.
    marked = {
        e
        for (e,) in sql(
            app.engine,
            "SELECT s.email FROM deliveries d JOIN subscribers s ON s.id = d.subscriber_id "
            "WHERE d.status = 'sent'",
        )
    }
    assert marked <= received_once
    # A re-run completes (waiting out any lease the failed worker could not release).
    rerun = send_process(path)
    _, err = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, err
    counts = copies(handler)
    assert set(counts) == set(emails)
    duplicated = [e for e, n in counts.items() if n > 1]
    assert len(duplicated) <= app.config.smtp.concurrency
    same_message_id(handler, duplicated)
    assert dict(sql(app.engine, "SELECT status, count(*) FROM deliveries GROUP BY status")) == {
        "sent": 600
    }
    app.engine.dispose()


# --- a stalled worker ------------------------------------------------------------------------


async def test_a_stalled_worker_cannot_overwrite_the_new_owners_outcome(
    tmp_path: Path, feed_file: Path, pg: str, smtp_server: tuple[Controller, Recorder]
) -> None:
    path = pg_config(tmp_path, pg, smtp_server[0].port)
    app, _ = prepared(path, 3)
    issue, _ = pipeline.build_issue(app, pipeline.Renderer(app.config), D)
    with app.sessions() as session:
        store.create_deliveries(session, issue.id)
        session.commit()
    bounces: list[int] = []
    lease = 1.0  # seconds: the stall outlasts it
    stalled = Ledger(app.engine, app.sessions, issue.id, lease, lambda s, d: bounces.append(d))
    fresh = Ledger(app.engine, app.sessions, issue.id, lease, lambda s, d: bounces.append(d))
    writer = asyncio.create_task(stalled.run())
    writer2 = asyncio.create_task(fresh.run())
    try:
        mine = stalled.claim(0)
        assert len(mine) == 3 and await stalled.admit(mine[0].delivery_id)
        assert fresh.claim(0) == []  # held under a live lease
        # The stalled worker does nothing for longer than its lease (SMTP hangs, the
        # process is frozen); the fresh one takes the rows over once it has expired.
        deadline = time.monotonic() + 30
        taken: list[Any] = []
        while not taken:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
            taken = fresh.claim(0)
        assert [c.delivery_id for c in taken] == [c.delivery_id for c in mine]
        target = taken[0]
        assert await fresh.record(
            Outcome(target.delivery_id, target.subscriber_id, DeliveryStatus.SENT, 1, "<m@x>")
        )
        # The stalled worker wakes up with a permanent failure for the same row: its write
        # is fenced off, it counts no bounce, and it opens no new transaction.
        assert not await stalled.record(
            Outcome(
                target.delivery_id,
                target.subscriber_id,
                DeliveryStatus.FAILED,
                1,
                "<m@x>",
                "550 5.1.1 gone",
                permanent=True,
            )
        )
        assert bounces == []
        # A row the new owner is still sending: the stale outcome must not land either
        # (were it written, the new owner's own write would then be the one refused).
        second = taken[1]
        assert not await stalled.record(
            Outcome(second.delivery_id, second.subscriber_id, DeliveryStatus.SENT, 1, "<m@x>")
        )
        assert sql(
            app.engine, "SELECT status, owner FROM deliveries WHERE id = :i", i=second.delivery_id
        ) == [("sending", fresh.owner)]
        assert await fresh.record(
            Outcome(second.delivery_id, second.subscriber_id, DeliveryStatus.SENT, 1, "<m@x>")
        )
        assert not await stalled.admit(mine[2].delivery_id)  # renews, finds it is not ours
        assert stalled.lost >= 2
        row = sql(
            app.engine,
            "SELECT status, owner, last_error FROM deliveries WHERE id = :i",
            i=target.delivery_id,
        )
        assert row == [("sent", fresh.owner, None)]
        # Releasing at the end gives back nothing of the new owner's.
        assert stalled.release() == 0
        assert fresh.release() == 1
    finally:
        await stalled.close()
        await fresh.close()
        await writer
        await writer2
        stalled.dispose()
        fresh.dispose()
        app.engine.dispose()


class HoldingRecorder(SlowRecorder):
    """Accepts ``pass_first`` messages, then holds DATA replies until ``release`` is set,
    and then refuses with ``then``; counts MAIL commands."""

    def __init__(self, pass_first: int, then: str) -> None:
        super().__init__()
        self.pass_first = pass_first
        self.then = then
        self.release = threading.Event()
        self.mails = 0
        self.holding = 0

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        self.mails += 1
        return await super().handle_MAIL(server, session, envelope, address, options)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if len(self.messages) < self.pass_first:
            return await super().handle_DATA(server, session, envelope)
        self.holding += 1
        while not self.release.is_set():
            await asyncio.sleep(0.01)
        return self.then


def test_a_frozen_worker_whose_rows_were_taken_over_records_nothing_over_them(
    tmp_path: Path, feed_file: Path, pg: str
) -> None:
    # Worker A sends through relay A, which takes 5 messages and then holds every reply.
    # A is frozen (SIGSTOP) past its lease; worker B (relay B) takes its rows over and
    # sends everything. Then relay A answers A's held messages "550 5.1.1" and A thaws.
    relay_a = HoldingRecorder(pass_first=5, then="550 5.1.1 mailbox unavailable")
    relay_b = Recorder()
    ca, cb = start(relay_a), start(relay_b)
    try:
        path_a = pg_config(tmp_path, pg, ca.port, name="a.toml")
        path_b = pg_config(tmp_path, pg, cb.port, name="b.toml")
        app, _ = prepared(path_a, 40)
        a = send_process(path_a)
        try:
            poll(lambda: relay_a.holding >= 3, what="worker A to be stuck in DATA")
            poll(
                lambda: (
                    sql(app.engine, "SELECT count(*) FROM deliveries WHERE status = 'sent'")
                    == [(5,)]
                ),
                what="A to record the 5 accepted messages",
            )
            a.send_signal(signal.SIGSTOP)
            mails_before = relay_a.mails
            b = send_process(path_b)
            out_b, err_b = b.communicate(timeout=120)  # waits out A's lease, then sends all
            assert b.returncode == 0, err_b
            taken_over = {r for m in relay_b.messages for r in m.rcpt_tos}
            assert len(taken_over) == 35 and "this run: 35 sent" in out_b
            relay_a.release.set()
            a.send_signal(signal.SIGCONT)
            out_a, err_a = a.communicate(timeout=60)
        finally:
            if a.poll() is None:
                a.send_signal(signal.SIGCONT)
                a.kill()
        assert a.returncode == 0, err_a
        assert "Traceback" not in err_a
        # A recorded its 5, and nothing over B's outcomes: no failure, no bounce.
        assert re.search(r"this run: 5 sent, 0 failed.*taken over by another worker", out_a)
        rows = dict(sql(app.engine, "SELECT status, count(*) FROM deliveries GROUP BY status"))
        assert rows == {"sent": 40}
        assert sql(app.engine, "SELECT count(*) FROM subscribers WHERE hard_bounces > 0") == [(0,)]
        assert owners_by_pid(app.engine, "sent") == Counter({a.pid: 5, b.pid: 35})
        # Thawed, A opened no new SMTP transaction for rows it no longer holds.
        assert relay_a.mails == mails_before
        app.engine.dispose()
    finally:
        ca.stop()
        cb.stop()


# --- relay limits ------------------------------------------------------------------------------


def test_hourly_limit_pauses_the_send_and_a_rerun_sends_nothing(
    tmp_path: Path, feed_file: Path, pg: str, smtp_server: tuple[Controller, Recorder]
) -> None:
    controller, handler = smtp_server
    path = pg_config(tmp_path, pg, controller.port, smtp_extra="max_per_hour = 100")
    app, _ = prepared(path, 300)
    first = CliRunner().invoke(main, ["--config", str(path), "send", "--date", str(D)])
    assert first.exit_code == 0, first.stderr
    assert first.exception is None
    assert "this run: 100 sent" in first.stdout
    pause = re.compile(
        r"^paused: hourly limit of 100 reached; 200 pending; resumes after "
        r"\d{4}-\d\d-\d\d \d\d:\d\d E[SD]T$",
        re.M,
    )
    assert pause.search(first.stdout), first.stdout
    assert len(handler.messages) == 100
    again = CliRunner().invoke(main, ["--config", str(path), "send", "--date", str(D)])
    assert again.exit_code == 0 and "this run: 0 sent" in again.stdout
    assert pause.search(again.stdout)
    assert len(handler.messages) == 100
    status = CliRunner().invoke(main, ["--config", str(path), "status"])
    assert status.exit_code == 0 and pause.search(status.stdout), status.stdout
    as_json = CliRunner().invoke(main, ["--config", str(path), "status", "--json"])
    paused = json.loads(as_json.stdout)["paused"]
    assert {k: paused[k] for k in ("window", "limit", "pending")} == {
        "window": "hourly",
        "limit": 100,
        "pending": 200,
    }
    counts = dict(sql(app.engine, "SELECT status, count(*) FROM deliveries GROUP BY status"))
    assert counts == {"sent": 100, "pending": 200}
    app.engine.dispose()


class ThrottlingRecorder(Recorder):
    """Answers ``421 4.7.0`` to every fifth message for ``seconds`` after the first one."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.started: float | None = None
        self.seen = 0
        self.throttled = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        now = time.monotonic()
        self.started = self.started or now
        self.seen += 1
        if now - self.started < self.seconds and self.seen % 5 == 0:
            self.throttled += 1
            return "421 4.7.0 Try again later, closing connection"
        return await super().handle_DATA(server, session, envelope)


def test_a_throttling_relay_slows_the_send_but_everything_is_delivered(
    tmp_path: Path, feed_file: Path, pg: str
) -> None:
    handler = ThrottlingRecorder(seconds=10)
    controller = start(handler)
    try:
        # max_attempts = 2: without the throttle exemption, a message answered 421 twice
        # would be left deferred.
        path = pg_config(tmp_path, pg, controller.port, smtp_extra="max_attempts = 2")
        app, emails = prepared(path, 150)
        report = pipeline.send(app, D)
        assert handler.throttled >= 5
        assert report.stats.throttled == handler.throttled
        assert report.stats.sent == 150 and report.stats.failed == report.stats.deferred == 0
        assert report.counts["sent"] == 150
        counts = copies(handler)
        assert set(counts) == set(emails) and set(counts.values()) == {1}
        # The shared back-off was engaged (every worker reads this row).
        (rate, throttles) = sql(app.engine, "SELECT rate, throttles FROM relay_limits")[0]
        assert throttles == handler.throttled and rate is not None
        app.engine.dispose()
    finally:
        controller.stop()


def test_unreachable_relay_rows_stay_pending_for_the_next_worker(
    tmp_path: Path, feed_file: Path, pg: str
) -> None:
    # The relay is down: the worker stops with one line and gives its claims back at
    # once (no lease to wait out), so the next worker can start straight away.
    path = pg_config(tmp_path, pg, free_port())
    app, _ = prepared(path, 20)
    result = CliRunner().invoke(main, ["--config", str(path), "send", "--date", str(D)])
    assert result.exit_code == 1 and "cannot connect to SMTP server" in result.stderr
    counts = dict(sql(app.engine, "SELECT status, count(*) FROM deliveries GROUP BY status"))
    assert counts == {"pending": 20}
    assert sql(app.engine, "SELECT count(*) FROM deliveries WHERE owner IS NOT NULL") == [(0,)]
    app.engine.dispose()


# --- several `digest run` -------------------------------------------------------------------


def read_until(
    proc: subprocess.Popen[str], needle: str, lines: list[str], timeout: float = 60
) -> None:
    """Read ``proc``'s stderr into ``lines`` until a line contains ``needle``."""
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            break
        lines.append(line)
        if needle in line:
            return
    pytest.fail(f"no line with {needle!r} from digest run: {''.join(lines)[-2000:]}")


def drain(proc: subprocess.Popen[str], lines: list[str]) -> threading.Thread:
    """Keep reading ``proc``'s stderr (so it never blocks on a full pipe)."""
    assert proc.stderr is not None
    stream = proc.stderr

    def run() -> None:
        for line in stream:
            lines.append(line)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def stop_run(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("digest run did not stop on SIGTERM")


def test_sigkill_the_leader_before_a_scheduled_send_and_the_standby_sends_it_once(
    tmp_path: Path, feed_file: Path, pg: str, smtp_server: tuple[Controller, Recorder]
) -> None:
    from datetime import UTC, datetime, timedelta

    from tests.test_schedule import _prepare, _stored_send_due_at

    controller, handler = smtp_server
    path = pg_config(tmp_path, pg, controller.port)
    app = _prepare(path, feed_file, readers=5)
    a_log: list[str] = []
    b_log: list[str] = []
    a = digest_process(path, "run")
    b: subprocess.Popen[str] | None = None
    try:
        read_until(a, "is the leader", a_log)
        drain(a, a_log)
        b = digest_process(path, "run")
        read_until(b, "is a standby", b_log)
        drain(b, b_log)
        # The weekly send falls due in a few seconds; the leader dies just before it.
        # (A's scheduler does not re-read its store before then; B's reads it once elected.)
        _stored_send_due_at(path, datetime.now(UTC) + timedelta(seconds=3))
        a.send_signal(signal.SIGKILL)
        a.wait(30)
        assert handler.messages == [], "the leader sent before it was killed"
        poll(lambda: len(handler.messages) >= 5, timeout=90, what="the standby to send")
        poll(lambda: any("is the leader" in line for line in b_log), what="B's leader line")
        # Once: give a duplicate firing (the misfire path, the catch-up) time to show.
        poll(
            lambda: sql(app.engine, "SELECT status FROM issues") == [("sent",)],
            what="the issue to be sent",
        )
        stop_run(b)
    finally:
        for p in (a, b):
            if p is not None and p.poll() is None:
                p.kill()
    counts = copies(handler)
    assert sorted(counts) == [f"r{i}@example.org" for i in range(5)]
    assert set(counts.values()) == {1}
    fires = sql(app.engine, "SELECT job, fired_by FROM scheduled_fires")
    assert len(fires) == 1 and fires[0][0] == "digest-weekly-send"
    assert f":{b.pid}:" in fires[0][1]  # fired by the standby that took over
    app.engine.dispose()


def test_every_runner_joins_a_send_under_way(
    tmp_path: Path, feed_file: Path, pg: str, slow_server: tuple[Controller, SlowRecorder]
) -> None:
    controller, handler = slow_server
    path = pg_config(tmp_path, pg, controller.port)
    app, emails = prepared(path, 1200)
    logs: list[list[str]] = [[], []]
    runners = [digest_process(path, "run") for _ in range(2)]
    try:
        for r, log in zip(runners, logs, strict=True):
            drain(r, log)
        sender = send_process(path)  # an operator starts a send by hand
        _, err = sender.communicate(timeout=180)
        assert sender.returncode == 0, err
        poll(
            lambda: sql(app.engine, "SELECT status FROM issues") == [("sent",)],
            what="the issue to be sent",
        )
        # One leader, one standby (looked at before stopping them: a leader that stops
        # hands over, and the other would become leader).
        said = ["".join(log) for log in logs]
        assert sorted(("is the leader" in s, "is a standby" in s) for s in said) == [
            (False, True),
            (True, False),
        ], said
        for r in runners:
            stop_run(r)
    finally:
        for r in runners:
            if r.poll() is None:
                r.kill()
    counts = copies(handler)
    assert set(counts) == set(emails) and set(counts.values()) == {1}
    sent_by = owners_by_pid(app.engine, "sent")
    # The two daemons joined the hand-started send: three senders.
    assert {sender.pid, *(r.pid for r in runners)} <= set(sent_by), (sent_by, logs)
    # (The leader may get there first through its start-up resume job, when D is also
    # the latest scheduled edition by today's clock.)
    assert all(
        any(f"joining the send of {D}" in s or f"sending {D}" in s for s in log) for log in logs
    )
    app.engine.dispose()


def test_a_scheduled_slot_fires_once_however_many_runners_fire_it(
    tmp_path: Path, feed_file: Path, pg: str, smtp_server: tuple[Controller, Recorder]
) -> None:
    from datetime import UTC, datetime

    from digest import jobs
    from tests.test_schedule import _prepare

    controller, handler = smtp_server
    path = pg_config(tmp_path, pg, controller.port)
    app = _prepare(path, feed_file, readers=3)
    slot = jobs.latest_firing(app.config.schedule.cron_trigger(), datetime.now(UTC))
    results: list[Any] = []
    # Three runners fire the same slot at once (a leader and a stale one, a misfire and a
    # catch-up): the unique (job, slot) row written with the issue lets one through.
    firing = [
        threading.Thread(target=lambda: results.append(jobs.scheduled_send(str(path))))
        for _ in range(3)
    ]
    for t in firing:
        t.start()
    for t in firing:
        t.join(60)
    assert len(results) == 3
    assert sorted(copies(handler).elements()) == [f"r{i}@example.org" for i in range(3)]
    assert sql(app.engine, "SELECT job, slot FROM scheduled_fires") == [
        ("digest-weekly-send", slot.astimezone(UTC).replace(tzinfo=None))
    ]
    # Firing it again later (a restarted leader's catch-up) sends nothing, not even to a
    # reader who joined since: that firing happened.
    add_subscribers(app, 1)  # reader0@example.org, new to this list
    jobs.catch_up_send(str(path), slot.isoformat())
    jobs.scheduled_send(str(path), slot=slot.isoformat())
    assert len(handler.messages) == 3
    app.engine.dispose()


def test_digest_run_resumes_a_paused_send_once_the_window_reopens(
    tmp_path: Path, feed_file: Path, smtp_server: tuple[Controller, Recorder]
) -> None:
    # SQLite is enough: the resume is the scheduler's business, whatever the database.
    from datetime import UTC, datetime, timedelta

    from digest.schedule import run_scheduler
    from tests.test_schedule import _prepare, _stored_send_due_at

    controller, handler = smtp_server
    path = write_config(tmp_path, port=controller.port, smtp_extra="max_per_hour = 2")
    app = _prepare(path, feed_file, readers=5)
    _stored_send_due_at(path, datetime.now(UTC) - timedelta(minutes=1))
    logs: list[str] = []
    stop = threading.Event()
    runner = threading.Thread(target=run_scheduler, args=(load_config(path), logs.append, stop))
    runner.start()
    try:
        poll(lambda: any("send paused by the relay's quota" in line for line in logs))
    finally:
        stop.set()
        runner.join(30)
    assert not runner.is_alive()
    assert len(handler.messages) == 2
    # The resume is in the scheduler's store, for when the hour window reopens.
    (run_at,) = sql(
        app.engine,
        "SELECT next_run_time FROM apscheduler_jobs WHERE id = 'digest-resume-after-pause'",
    )[0]
    with app.engine.connect() as conn:
        from digest import ratelimit

        pause = ratelimit.window_pause(
            conn, ratelimit.relay_key(app.config.smtp), ratelimit.Limits(per_hour=2)
        )
    assert pause is not None
    assert run_at == pytest.approx(pause.resumes_at.timestamp() + 5, abs=1)
    app.engine.dispose()
