"""Which ``digest run`` process schedules: a lease row on PostgreSQL, a file lock on SQLite.

Several ``digest run`` processes may share one PostgreSQL database; exactly one of them,
the leader, runs APScheduler (whose job store must never be shared by two schedulers).
The leader holds a row in ``leader_lease`` with a unique ``host:pid:random`` id and
renews it every third of its lifetime; the others are standbys and try to take the row
over once it has expired, by the database's clock. No session state is kept (no
advisory lock, no LISTEN), so it works behind PgBouncer in transaction mode.

Lessons taken from other schedulers' bugs:

* renewal is scoped to ``(leader_id, elected_at)``, so a process can only ever renew its
  own term (Oban #1488: a node renewed another node's row and cron ran twice for weeks);
* ids are unique per process, not per host (oban-py #32: processes sharing a hostname all
  became leader);
* a leader that cannot renew steps down before its lease can expire, rather than
  carrying on while another one is elected.

Leadership is an optimisation, not the guarantee: a scheduled firing happens once because
its ``(job, slot)`` row is unique and written with the issue (see ``pipeline.send``).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, Engine, delete, or_, select, text, update
from sqlalchemy.exc import SQLAlchemyError

from digest import store
from digest.models import LeaderLease

SCHEDULER = "scheduler"


@dataclass(frozen=True)
class Term:
    """One leader's term: renewals must name both, so no one renews someone else's."""

    leader_id: str
    elected_at: datetime


def _timeout(conn: Connection, seconds: float) -> None:
    # A hung statement must not keep a leader that cannot renew from stepping down, and
    # a process cut off in the middle of this transaction must not keep the lease row
    # locked from everyone (store.drop_if_silent).
    # SET LOCAL ends with the transaction: nothing is left on a pooled connection.
    if conn.dialect.name == "postgresql":
        conn.execute(text(f"SET LOCAL statement_timeout = {int(seconds * 1000)}"))
        store.drop_if_silent(conn, seconds)


def elect(conn: Connection, name: str, me: str, ttl: float) -> Term | None:
    """Become the leader if the role is free or its lease ran out; the term, or None.

    A row still ours (we stepped down after failed renewals, but the lease has not run
    out yet) starts a new term too, with a full lease: the caller trusts the term it gets
    for two thirds of a lease from now, and an old lease may end sooner than that.
    """
    dialect = conn.dialect.name
    with conn.begin():
        _timeout(conn, ttl / 3)
        now, later = store.db_now(dialect), store.db_after(dialect, ttl)
        conn.execute(
            store.insert_ignore(
                dialect,
                LeaderLease,
                {"name": name, "leader_id": me, "elected_at": now, "expires_at": later},
            )
        )
        conn.execute(
            update(LeaderLease)
            .where(
                LeaderLease.name == name,
                or_(LeaderLease.expires_at < now, LeaderLease.leader_id == me),
            )
            .values(leader_id=me, elected_at=now, expires_at=later)
        )
        row = conn.execute(
            select(LeaderLease.leader_id, LeaderLease.elected_at).where(LeaderLease.name == name)
        ).one()
    return Term(me, row.elected_at) if row.leader_id == me else None


def renew(conn: Connection, name: str, term: Term, ttl: float) -> bool:
    """Extend our own, still valid, term; False means we are no longer the leader."""
    dialect = conn.dialect.name
    with conn.begin():
        _timeout(conn, ttl / 3)
        done = conn.execute(
            update(LeaderLease)
            .where(
                LeaderLease.name == name,
                LeaderLease.leader_id == term.leader_id,
                LeaderLease.elected_at == term.elected_at,
                LeaderLease.expires_at > store.db_now(dialect),
            )
            .values(expires_at=store.db_after(dialect, ttl))
        )
    return done.rowcount == 1


def resign(conn: Connection, name: str, term: Term) -> None:
    """Give the role up at once (a clean exit), so a standby need not wait for expiry."""
    with conn.begin():
        conn.execute(
            delete(LeaderLease).where(
                LeaderLease.name == name,
                LeaderLease.leader_id == term.leader_id,
                LeaderLease.elected_at == term.elected_at,
            )
        )


def current_leader(conn: Connection, name: str) -> str | None:
    """The id of the process whose lease on ``name`` is valid now, if any."""
    with conn.begin():
        return conn.execute(
            select(LeaderLease.leader_id).where(
                LeaderLease.name == name,
                LeaderLease.expires_at > store.db_now(conn.dialect.name),
            )
        ).scalar_one_or_none()


class _Exchange:
    """One elect-or-renew round trip, in a thread of its own so a silent database cannot
    hold up the caller; ``result`` is (term, error) once it is done."""

    def __init__(self, elector: Elector, term: Term | None) -> None:
        self.started = time.monotonic()
        self.result: tuple[Term | None, str | None] | None = None
        self.thread = threading.Thread(
            target=self._run, args=(elector, term), name="digest-elector", daemon=True
        )
        self.thread.start()

    def _run(self, elector: Elector, term: Term | None) -> None:
        try:
            with elector.engine.connect() as conn:
                if term is None:
                    self.result = (elect(conn, elector.name, elector.id, elector.ttl), None)
                elif renew(conn, elector.name, term, elector.ttl):
                    self.result = (term, None)
                else:
                    self.result = (None, None)
        except SQLAlchemyError as exc:
            self.result = (term, str(getattr(exc, "orig", None) or exc).strip().splitlines()[0])


class Elector:
    """One process's side of the election, driven by :meth:`tick` every ``ttl / 3``.

    ``tick`` returns whether this process is the leader *now*. A leader stays one only
    while its renewals succeed, and trusts its term only until two thirds of the lease
    after the start of its last good renewal: it steps down (``tick`` returns False)
    before the lease can expire, so two leaders never overlap by the database's account.
    That holds when the database does not answer at all, too (a partition: no error,
    only silence, which no ``statement_timeout`` ends): ``tick`` waits for the round trip
    no longer than the term can be trusted.
    """

    def __init__(self, engine: Engine, ttl: float, name: str = SCHEDULER) -> None:
        self.engine = engine
        self.ttl = ttl
        self.name = name
        self.id = store.new_worker_id()
        self.term: Term | None = None
        self._trusted_until = 0.0
        self._exchange: _Exchange | None = None  # a round trip under way
        self.error: str | None = None  # why the last tick failed, if it did

    @property
    def interval(self) -> float:
        """Seconds between ticks: a third of the lease, and at most 30 s, so a standby
        takes over within ``ttl`` + 30 s of the leader's last renewal."""
        return min(self.ttl / 3, 30.0)

    def tick(self) -> bool:
        """Elect or renew once; True when this process is the leader afterwards.

        Waits for the database at most until the term's trust runs out (a standby: one
        interval). A round trip still under way from an earlier tick is waited for
        again rather than doubled; its result counts from when it started.
        """
        self.error = None
        if self._exchange is None:
            self._exchange = _Exchange(self, self.term)
        exchange = self._exchange
        now = time.monotonic()
        limit = self._trusted_until if self.term is not None else now + self.interval
        exchange.thread.join(max(0.0, limit - now))
        if exchange.result is None:
            self.error = "the database did not answer"
        else:
            self._exchange = None
            term, self.error = exchange.result
            if self.error is None:
                self.term = term
                if term is not None:
                    self._trusted_until = exchange.started + self.ttl * 2 / 3
        if self.term is not None and time.monotonic() > self._trusted_until:
            self.term = None  # step down: the lease may be about to run out
        return self.term is not None

    def resign(self) -> None:
        """Step down cleanly (best effort: the lease expires anyway)."""
        term, self.term = self.term, None
        if term is None:
            return
        try:
            with self.engine.connect() as conn:
                resign(conn, self.name, term)
        except SQLAlchemyError:
            pass
