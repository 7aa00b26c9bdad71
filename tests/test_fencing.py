"""Fences under partitions, freezes and crashes (PostgreSQL, real processes).

The faults here are the ones a lease cannot see as errors: a database that stops
answering without closing anything (a network partition, made with a TCP proxy that
stops passing bytes), a worker frozen in the middle of an SMTP transaction, a worker
killed right after its outcome was committed asynchronously. Every test uses a schema of
its own on 127.0.0.1:5432 and polls against deadlines.
"""

from __future__ import annotations

import asyncio
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from aiosmtpd.controller import Controller
from sqlalchemy import text
from sqlalchemy.engine import make_url

from digest import pipeline, store
from tests.conftest import Recorder
from tests.test_faults import start
from tests.test_postgres import PG, pg_schema
from tests.test_scale_out import (
    LEASE,
    ROOT,
    digest_process,
    drain,
    owners_by_pid,
    pg_config,
    poll,
    prepared,
    read_until,
    send_process,
    sql,
    stop_run,
)
from tests.test_send import D


class FreezableProxy:
    """A TCP proxy to the PostgreSQL server that can stop passing bytes.

    Frozen, it keeps every connection open and forwards nothing, and connections made
    meanwhile are accepted and never answered: to the process behind it the database has
    gone silent (a partition), which no error reports and no ``statement_timeout`` ends.
    """

    def __init__(self) -> None:
        url = make_url(PG)
        self.upstream = (url.host or "127.0.0.1", url.port or 5432)
        self.frozen = threading.Event()
        self._closing = threading.Event()
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, url: str) -> str:
        """``url`` (on the test server) through this proxy."""
        host, port = self.upstream
        return url.replace(f"@{host}:{port}/", f"@127.0.0.1:{self.port}/")

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self._sockets.append(client)
            if self.frozen.is_set():
                continue  # accepted, never answered
            try:
                upstream = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            self._sockets.append(upstream)
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        while not self._closing.is_set():
            if self.frozen.is_set():
                time.sleep(0.02)
                continue
            try:
                ready, _, _ = select.select([src], [], [], 0.05)
                if not ready or self.frozen.is_set():
                    continue
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
            except (OSError, ValueError):  # ValueError: the other direction closed it
                break
        for s in (src, dst):
            s.close()

    def close(self) -> None:
        """Close the listener and every connection (the silence ends in errors)."""
        self._closing.set()
        self._listener.close()
        for s in self._sockets:
            s.close()


@pytest.fixture
def pg() -> Iterator[str]:
    """A database URL on a schema of its own."""
    with pg_schema() as url:
        yield url


@pytest.fixture
def proxy() -> Iterator[FreezableProxy]:
    p = FreezableProxy()
    try:
        yield p
    finally:
        p.close()


def test_a_leader_cut_off_from_the_database_steps_down_before_anyone_else_leads(
    tmp_path: Path,
    feed_file: Path,
    pg: str,
    proxy: FreezableProxy,
    smtp_server: tuple[Controller, Recorder],
) -> None:
    from tests.test_schedule import _prepare

    port = smtp_server[0].port
    path_a = pg_config(tmp_path, proxy.url(pg), port, name="a.toml")
    path_b = pg_config(tmp_path, pg, port, name="b.toml")
    app = _prepare(path_b, feed_file, readers=1)
    a_log: list[str] = []
    b_log: list[str] = []
    a = digest_process(path_a, "run")
    b = None
    try:
        read_until(a, "is the leader", a_log)
        drain(a, a_log)
        b = digest_process(path_b, "run")
        read_until(b, "is a standby", b_log)
        # A's database goes silent: no error, no closed connection, just no answer. Its
        # lease runs out and B is elected; by then A must have stopped scheduling (two
        # leaders would share APScheduler's job store, which its FAQ forbids).
        proxy.frozen.set()
        read_until(b, "is the leader", b_log, timeout=60)
        assert any("steps down as leader" in line for line in a_log), "".join(a_log)
    finally:
        a.kill()
        a.wait(30)
        if b is not None:
            stop_run(b)
        app.engine.dispose()


def test_a_leader_keeps_its_lease_while_the_ledger_is_locked(
    tmp_path: Path, feed_file: Path, pg: str, smtp_server: tuple[Controller, Recorder]
) -> None:
    from tests.test_schedule import _prepare

    path = pg_config(tmp_path, pg, smtp_server[0].port)
    app = _prepare(path, feed_file, readers=1)
    log: list[str] = []
    a = digest_process(path, "run")
    try:
        read_until(a, "is the leader", log)
        drain(a, log)
        # Someone holds the deliveries table (a schema upgrade run on another host, a
        # VACUUM FULL): the runner's look for a send to join waits for it. Its election
        # must go on meanwhile: a leader whose lease lapses while it still schedules
        # leaves the role to any standby while it leads on.
        lease_valid = text(
            "SELECT expires_at > timezone('UTC', clock_timestamp()) FROM leader_lease"
        )
        with app.engine.connect() as locker, app.engine.connect() as watcher:
            locker.execute(text("LOCK TABLE deliveries IN ACCESS EXCLUSIVE MODE"))
            deadline = time.monotonic() + 2 * LEASE
            while time.monotonic() < deadline:
                valid = watcher.execute(lease_valid).scalar_one()
                watcher.rollback()
                stepped_down = any("steps down as leader" in line for line in log)
                assert valid or stepped_down, "the leader's lease lapsed while it led"
                time.sleep(0.1)
            locker.rollback()
    finally:
        stop_run(a)
        app.engine.dispose()


# --- senders: slow, frozen and killed ------------------------------------------------------


class HeldRecorder(Recorder):
    """Holds the reply to each of the first ``held`` messages until ``release`` is set
    (or ``hold_seconds`` have passed), then accepts it; later messages go straight in."""

    def __init__(self, held: int, hold_seconds: float = 3600.0) -> None:
        super().__init__()
        self.held = held
        self.hold_seconds = hold_seconds
        self.release = threading.Event()
        self.holding = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.holding < self.held:
            self.holding += 1
            deadline = time.monotonic() + self.hold_seconds
            while not self.release.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        return await super().handle_DATA(server, session, envelope)


def received(*relays: Recorder) -> Counter[str]:
    return Counter(r for relay in relays for m in relay.messages for r in m.rcpt_tos)


def message_ids(address: str, *relays: Recorder) -> set[str]:
    return {
        str(m.message["Message-ID"])
        for relay in relays
        for m in relay.messages
        if address in m.rcpt_tos
    }


def test_a_data_reply_slower_than_the_lease_causes_no_takeover(
    tmp_path: Path, feed_file: Path, pg: str
) -> None:
    # The relay takes 2.5 leases to answer the first message on each of A's three
    # connections (smtp.data_timeout_seconds allows 10 minutes). A's heartbeat goes on
    # renewing meanwhile, so B, started while A waits, takes nothing over and sends
    # nothing: no reader gets two copies.
    relay = HeldRecorder(held=3, hold_seconds=2.5 * LEASE)
    controller = start(relay)
    try:
        path = pg_config(tmp_path, pg, controller.port)
        app, emails = prepared(path, 30)
        a = send_process(path)
        b = None
        try:
            poll(lambda: relay.holding >= 3, what="A's three connections to wait in DATA")
            b = send_process(path)
            out_b, err_b = b.communicate(timeout=120)
            out_a, err_a = a.communicate(timeout=120)
        finally:
            for p in (a, b):
                if p is not None and p.poll() is None:
                    p.kill()
        assert (a.returncode, b.returncode) == (0, 0), (err_a, err_b)
        assert "this run: 30 sent" in out_a and "this run: 0 sent" in out_b, (out_a, out_b)
        assert received(relay) == Counter({e: 1 for e in emails})
        assert owners_by_pid(app.engine, "sent") == Counter({a.pid: 30})
        app.engine.dispose()
    finally:
        controller.stop()


def test_a_frozen_worker_delivers_at_most_its_in_flight_messages_twice(
    tmp_path: Path, feed_file: Path, pg: str
) -> None:
    # A is frozen (SIGSTOP) while each of its three connections waits for a DATA reply;
    # B takes its rows over after the lease and sends them. Then A's relay accepts the
    # held messages and A thaws: those three readers have two copies (the documented
    # window: one per SMTP connection of the frozen worker), with one Message-ID, and A
    # records nothing over B's outcomes.
    relay_a, relay_b = HeldRecorder(held=3), Recorder()
    ca, cb = start(relay_a), start(relay_b)
    try:
        path_a = pg_config(tmp_path, pg, ca.port, name="a.toml")
        path_b = pg_config(tmp_path, pg, cb.port, name="b.toml")
        app, emails = prepared(path_a, 20)
        a = send_process(path_a)
        try:
            poll(lambda: relay_a.holding >= 3, what="A's three connections to wait in DATA")
            a.send_signal(signal.SIGSTOP)
            b = send_process(path_b)
            out_b, err_b = b.communicate(timeout=120)
            assert b.returncode == 0, err_b
            relay_a.release.set()
            a.send_signal(signal.SIGCONT)
            out_a, err_a = a.communicate(timeout=60)
        finally:
            if a.poll() is None:
                a.send_signal(signal.SIGCONT)
                a.kill()
        assert a.returncode == 0, err_a
        assert re.search(r"this run: 0 sent.*20 taken over by another worker", out_a), out_a
        assert "this run: 20 sent" in out_b, out_b
        counts = received(relay_a, relay_b)
        assert set(counts) == set(emails)
        twice = [e for e, n in counts.items() if n > 1]
        assert len(twice) == 3 and all(counts[e] == 2 for e in twice)  # concurrency = 3
        assert all(len(message_ids(e, relay_a, relay_b)) == 1 for e in twice)
        assert owners_by_pid(app.engine, "sent") == Counter({b.pid: 20})
        app.engine.dispose()
    finally:
        ca.stop()
        cb.stop()


_RECORD_AND_WAIT = """
import asyncio, sys, time
from digest import pipeline
from digest.config import load_config
from digest.ledger import Ledger
from digest.models import DeliveryStatus
from digest.send import Outcome

async def main() -> None:
    app = pipeline.open_app(load_config(sys.argv[1]))
    ledger = Ledger(app.engine, app.sessions, int(sys.argv[2]), 60, lambda s, d: None)
    writer = asyncio.create_task(ledger.run())
    (row,) = ledger.claim(0, limit=1)
    outcome = Outcome(row.delivery_id, row.subscriber_id, DeliveryStatus.SENT, 1, "<id@x>")
    assert await ledger.record(outcome)
    print(row.delivery_id, flush=True)
    time.sleep(60)  # killed here, right after the (asynchronous) commit
    await writer

asyncio.run(main())
"""


def test_a_worker_killed_right_after_its_asynchronous_commit_keeps_the_outcome(
    tmp_path: Path, feed_file: Path, pg: str
) -> None:
    # The ledger commits with synchronous_commit = off: the server acknowledges before its
    # log reaches the disk. That risks only a crash of the *server*; a worker killed the
    # moment its outcome is acknowledged must find it there, or it would send again.
    path = pg_config(tmp_path, pg, 25)
    app, _ = prepared(path, 2)
    issue, _ = pipeline.build_issue(app, pipeline.Renderer(app.config), D)
    with app.sessions() as session:
        store.create_deliveries(session, issue.id)
        session.commit()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    worker = subprocess.Popen(
        [sys.executable, "-c", _RECORD_AND_WAIT, str(path), str(issue.id)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert worker.stdout is not None
        line = worker.stdout.readline()
        worker.send_signal(signal.SIGKILL)
        worker.wait(30)
        assert line.strip().isdigit(), worker.stderr.read() if worker.stderr else line
    finally:
        if worker.poll() is None:
            worker.kill()
    rows = sql(
        app.engine,
        "SELECT status, message_id, lease_token FROM deliveries WHERE id = :i",
        i=int(line),
    )
    assert rows == [("sent", "<id@x>", None)]
    app.engine.dispose()


# --- locks held by a silent client -----------------------------------------------------------


def _within(seconds: float, fn: Any) -> bool:
    """Run ``fn`` in a thread; True when it returned within ``seconds``."""
    done = threading.Event()

    def run() -> None:
        fn()
        done.set()

    threading.Thread(target=run, daemon=True).start()
    return done.wait(seconds)


def test_a_worker_cut_off_mid_reservation_does_not_hold_up_the_others(
    pg: str, proxy: FreezableProxy
) -> None:
    # A worker is partitioned from the database in the middle of a reservation, holding
    # the relay's row lock. The server cannot tell silence from slowness: without a bound
    # it keeps the lock until its TCP keepalive gives up (two hours by default) and every
    # other worker's reservation waits as long.
    from digest import ratelimit

    engine = store.open_engine(pg)
    store.migrate(engine)
    cut_off = store.open_engine(proxy.url(pg))
    conn = None
    try:
        conn = cut_off.connect()
        conn.begin()
        ratelimit._locked_row(conn, "relay:25")
        proxy.frozen.set()
        granted: list[int] = []

        def reserve() -> None:
            with engine.connect() as other:
                granted.append(ratelimit.reserve(other, "relay:25", ratelimit.Limits(1), 1).count)

        assert _within(30, reserve), "the silent worker's lock held every other worker up"
        assert granted == [1]
    finally:
        proxy.close()
        if conn is not None:
            conn.invalidate()  # its session is gone: nothing to roll back
        cut_off.dispose()
        engine.dispose()


def test_a_runner_cut_off_mid_election_does_not_leave_the_role_locked(
    pg: str, proxy: FreezableProxy
) -> None:
    # A standby is partitioned while its election holds the lease row: the leader's
    # renewals time out, and nobody can be elected until the server drops the session.
    from digest import leader
    from digest.models import LeaderLease

    engine = store.open_engine(pg)
    store.migrate(engine)
    cut_off = store.open_engine(proxy.url(pg))
    conn = None
    ttl = 3.0
    try:
        first = leader.Elector(engine, ttl)
        assert first.tick()
        conn = cut_off.connect()
        conn.begin()
        leader._timeout(conn, ttl / 3)  # as elect() starts its transaction
        conn.execute(
            sqlalchemy.update(LeaderLease)
            .where(LeaderLease.name == leader.SCHEDULER)
            .values(expires_at=store.db_after("postgresql", ttl))
        )
        proxy.frozen.set()
        # Someone renews or is elected within a few leases: the role is not locked for
        # hours. (A tick that failed but is still within its trust does not count.)
        other = leader.Elector(engine, ttl)

        def renewed(e: leader.Elector) -> bool:
            return e.tick() and e.error is None

        deadline = time.monotonic() + 30
        while not (renewed(first) or renewed(other)):
            assert time.monotonic() < deadline, "nobody could lead: the lease row stayed locked"
            time.sleep(0.1)
    finally:
        proxy.close()
        if conn is not None:
            conn.invalidate()  # its session is gone: nothing to roll back
        cut_off.dispose()
        engine.dispose()


# --- claims racing ---------------------------------------------------------------------------


def test_due_retries_and_expired_leases_go_to_one_worker_each_however_many_race(
    tmp_path: Path, feed_file: Path, pg: str
) -> None:
    # Half the rows are deferred with their retry time come, half are `sending` under a
    # lease that ran out: the two kinds another worker's claim takes over. Eight workers
    # race for them in small claims (SKIP LOCKED, each rechecking what it locked).
    from digest import ledger

    path = pg_config(tmp_path, pg, 25)
    app, _ = prepared(path, 400)
    issue, _ = pipeline.build_issue(app, pipeline.Renderer(app.config), D)
    with app.sessions() as session:
        store.create_deliveries(session, issue.id)
        session.commit()
    with app.engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE deliveries SET status = 'deferred', attempts = 1, next_attempt_at = "
                "timezone('UTC', clock_timestamp()) - interval '1 minute' WHERE id % 2 = 0"
            )
        )
        conn.execute(
            text(
                "UPDATE deliveries SET status = 'sending', owner = 'dead:1:x', lease_token = 't',"
                " lease_until = timezone('UTC', clock_timestamp()) - interval '1 second'"
                " WHERE id % 2 = 1"
            )
        )
    claimed: dict[str, list[int]] = {}
    start_line = threading.Barrier(8)

    def worker(n: int) -> None:
        me = f"w:{n}:x"
        got: list[int] = []
        with app.engine.connect() as conn:
            start_line.wait()
            while True:
                rows = ledger.claim(conn, issue.id, 0, 7, me, f"t{n}", 60).rows
                if not rows:
                    break
                got += [r.delivery_id for r in rows]
        claimed[me] = got

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    every = [i for got in claimed.values() for i in got]
    assert len(every) == len(set(every)) == 400  # each row once, none left
    owners = dict(sql(app.engine, "SELECT owner, count(*) FROM deliveries GROUP BY owner"))
    assert owners == {me: len(got) for me, got in claimed.items() if got}
    app.engine.dispose()
