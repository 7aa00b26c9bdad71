"""Leader election for `digest run`: one lease row, renewed by its holder, taken over on expiry.

Runs on SQLite and on PostgreSQL (a schema of its own). Process-level fail-over (SIGKILL
of the leading `digest run`) is in ``test_scale_out.py``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, update

from digest import leader, store
from digest.leader import Elector
from digest.models import LeaderLease
from tests.test_postgres import migrated_engine

TTL = 1.5


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    with migrated_engine(request.param, tmp_path / "leader.db") as eng:
        yield eng


def poll(cond: object, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_one_leader_and_takeover_after_expiry(engine: Engine) -> None:
    a, b = Elector(engine, TTL), Elector(engine, TTL)
    assert a.id != b.id and a.id.count(":") == 2  # host:pid:random, unique per process
    assert a.tick() and not b.tick()
    assert a.tick() and not b.tick()  # renewed; still the only leader
    with engine.connect() as conn:
        assert leader.current_leader(conn, leader.SCHEDULER) == a.id
    # A stops renewing (killed, frozen): B takes over once the lease has expired...
    poll(b.tick)
    with engine.connect() as conn:
        assert leader.current_leader(conn, leader.SCHEDULER) == b.id
    # ...and A, back to life, finds its renewal refused and steps down.
    assert not a.tick() and a.term is None
    assert b.tick()


def test_renewal_is_scoped_to_the_term(engine: Engine) -> None:
    a = Elector(engine, TTL)
    assert a.tick() and a.term is not None
    old = a.term
    # The same process elected again in a new term (e.g. after a restart of its row):
    with engine.begin() as conn:
        conn.execute(
            update(LeaderLease)
            .where(LeaderLease.name == leader.SCHEDULER)
            .values(elected_at=store.db_after(engine.dialect.name, -30))
        )
    with engine.connect() as conn:
        assert not leader.renew(conn, leader.SCHEDULER, old, TTL)


def test_resign_hands_over_at_once(engine: Engine) -> None:
    a, b = Elector(engine, 60), Elector(engine, 60)
    assert a.tick() and not b.tick()
    a.resign()
    assert b.tick()  # no need to wait 60 s for the lease to expire


def test_a_leader_that_cannot_renew_steps_down_before_its_lease_expires(
    engine: Engine,
) -> None:
    a = Elector(engine, TTL)
    assert a.tick()
    elected = time.monotonic()
    # It trusts its term for two thirds of the lease from its last good renewal: it is out
    # before anyone else can be in.
    assert a._trusted_until <= elected + TTL * 2 / 3
    # The database becomes unreachable for this process.
    a.engine = create_engine("postgresql+psycopg://postgres@127.0.0.1:1/none")
    assert a.tick() and a.error  # within its trust window (two thirds of the lease)
    poll(lambda: not a.tick())
    assert a.term is None and a.error and time.monotonic() > a._trusted_until
    a.engine.dispose()


def test_a_leader_elected_again_while_its_old_lease_runs_gets_a_lease_for_its_trust(
    engine: Engine,
) -> None:
    ttl = 3.0
    a, b = Elector(engine, ttl), Elector(engine, ttl)
    assert a.tick()
    reachable = a.engine
    # A loses the database for a while and steps down (two thirds of the lease)...
    a.engine = create_engine("postgresql+psycopg://postgres@127.0.0.1:1/none")
    poll(lambda: not a.tick())
    a.engine.dispose()
    a.engine = reachable
    # ...and gets it back while its old lease is still valid: it leads again, and trusts
    # its term for two thirds of a lease from now. The database must agree: no one else
    # may be elected before that trust runs out (else two processes schedule at once).
    poll(a.tick)  # (a round trip still under way from before may fail first)
    while time.monotonic() <= a._trusted_until:
        if b.tick():
            assert time.monotonic() > a._trusted_until, "B elected while A still leads"
        time.sleep(0.05)
