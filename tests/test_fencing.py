"""Fences under partitions, freezes and crashes (PostgreSQL, real processes).

The faults here are the ones a lease cannot see as errors: a database that stops
answering without closing anything (a network partition, made with a TCP proxy that
stops passing bytes), a worker frozen in the middle of an SMTP transaction, a worker
killed right after its outcome was committed asynchronously. Every test uses a schema of
its own on 127.0.0.1:5432 and polls against deadlines.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import text
from sqlalchemy.engine import make_url

from tests.conftest import Recorder
from tests.test_postgres import PG, pg_schema
from tests.test_scale_out import LEASE, digest_process, drain, pg_config, read_until, stop_run


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
            upstream = socket.create_connection(self.upstream)
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
            except OSError:
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
        assert not any("steps down" in line for line in log), "".join(log)
    finally:
        stop_run(a)
        app.engine.dispose()
