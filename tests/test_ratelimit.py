"""The shared relay limiter: hour/day windows, per-second smoothing, throttle back-off.

Each test runs on SQLite and on PostgreSQL (a schema of its own on 127.0.0.1:5432).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine

from digest import ratelimit
from digest.errors import RatePaused
from digest.models import RelayLimit
from digest.ratelimit import Limits, RelayLimiter
from tests.test_postgres import migrated_engine

RELAY = "relay.example.org:587"


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    with migrated_engine(request.param, tmp_path / "limits.db") as eng:
        yield eng


def test_hourly_quota_is_shared_and_survives_a_restart(engine: Engine) -> None:
    limits = Limits(per_hour=100)
    granted = []
    with engine.connect() as conn:
        for _ in range(4):
            granted.append(ratelimit.reserve(conn, RELAY, limits, 30).count)
    assert granted == [30, 30, 30, 10]
    # A new connection (a restarted process, another host) sees the same budget.
    with engine.connect() as conn:
        grant = ratelimit.reserve(conn, RELAY, limits, 5)
        assert grant.count == 0 and grant.pause is not None
        assert grant.pause.window == "hourly" and grant.pause.limit == 100
        # Everything was used within this minute (perhaps in its last second), so it
        # all falls out of the window an hour after this minute ends.
        now = datetime.fromtimestamp(grant.now, UTC)
        assert timedelta(minutes=60) <= grant.pause.resumes_at - now <= timedelta(minutes=61)
        assert ratelimit.usage(conn, RELAY, 60) == 100
        assert ratelimit.window_pause(conn, RELAY, limits) == grant.pause
        # Another relay (or account) has its own budget.
        assert ratelimit.reserve(conn, "other:25", limits, 5).count == 5


def test_daily_quota_pauses_too(engine: Engine) -> None:
    limits = Limits(per_hour=50, per_day=70)
    with engine.connect() as conn:
        assert ratelimit.reserve(conn, RELAY, limits, 60).count == 50
        assert ratelimit.reserve(conn, RELAY, limits, 60).count == 0
        # Both are full after another 20 in the next hour; the day reopens later.
        pause = ratelimit.window_pause(conn, RELAY, Limits(per_day=50))
        assert pause is not None and pause.window == "daily" and pause.limit == 50


@pytest.fixture
def pg_engine() -> Iterator[Engine]:
    """PostgreSQL only: the race between hosts is PostgreSQL's (SQLite senders take turns)."""
    with migrated_engine("postgresql") as eng:
        yield eng


def test_concurrent_workers_never_exceed_the_quota(pg_engine: Engine) -> None:
    engine = pg_engine
    limits = Limits(per_hour=100)
    totals: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        got = 0
        with engine.connect() as conn:
            for _ in range(10):
                got += ratelimit.reserve(conn, RELAY, limits, 7).count
        with lock:
            totals.append(got)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(totals) == 100
    with engine.connect() as conn:
        assert ratelimit.usage(conn, RELAY, 60) == 100


def test_per_second_tokens_are_spaced_beyond_the_burst(engine: Engine) -> None:
    limits = Limits(per_second=20, burst=3)
    times: list[float] = []
    with engine.connect() as conn:
        for _ in range(6):
            g = ratelimit.reserve(conn, RELAY, limits, 10)
            assert g.count == 10 and g.interval == pytest.approx(0.05)
            times += [g.start + k * g.interval for k in range(g.count)]
            now = g.now
    # Tokens are used no earlier than their time (or at once when that has passed):
    # in any one-second window at most the rate plus the burst.
    used = sorted(max(t, now - 10) for t in times)
    for i, t in enumerate(used):
        in_window = sum(1 for u in used[i:] if u < t + 1.0)
        assert in_window <= 20 + 3
    # 60 tokens at 20/s stretch over about three seconds of schedule.
    assert used[-1] - used[0] == pytest.approx(59 * 0.05, abs=0.2)


def test_throttle_halves_once_per_holdoff_and_recovers() -> None:
    row = RelayLimit(relay=RELAY, tat=0.0, rate=10.0, ceiling=40.0, cut_at=1000.0, throttles=1)
    assert ratelimit._aimd_rate(row, 1000.0) == 10.0
    # Recovery is linear: the whole ceiling over RECOVER_SECONDS.
    half = ratelimit.RECOVER_SECONDS / 2
    assert ratelimit._aimd_rate(row, 1000.0 + half) == pytest.approx(30.0)
    assert ratelimit._aimd_rate(row, 1000.0 + ratelimit.RECOVER_SECONDS) is None


def test_throttling_reply_cuts_the_shared_rate(engine: Engine) -> None:
    limits = Limits()
    with engine.connect() as conn:
        first = ratelimit.throttled(conn, RELAY, limits, observed_rate=80.0)
        assert first.rate == pytest.approx(40.0, rel=0.05) and first.throttles == 1
        # A burst of replies to messages already in flight is one signal, not five.
        for _ in range(4):
            again = ratelimit.throttled(conn, RELAY, limits, observed_rate=80.0)
        assert again.rate is not None and again.rate >= first.rate
        assert again.throttles == 5
        # Tokens now follow the throttled rate even though no limit is configured.
        g = ratelimit.reserve(conn, RELAY, limits, 4)
        assert g.interval == pytest.approx(1 / again.rate, rel=0.1)
    # Another worker (its own connection) sees the same state.
    with engine.connect() as other:
        assert ratelimit.throttle_state(other, RELAY, limits).rate is not None


async def test_limiter_pauses_when_the_window_is_full(engine: Engine) -> None:
    limits = Limits(per_hour=12)
    limiter = RelayLimiter(engine, RELAY, limits, demand=lambda: 100)
    try:
        for _ in range(12):
            await limiter.acquire()
        with pytest.raises(RatePaused) as info:
            await limiter.acquire()
        assert info.value.window == "hourly" and info.value.limit == 12
    finally:
        limiter.close()


async def test_limiter_reserves_only_what_it_still_has_to_send(engine: Engine) -> None:
    limits = Limits(per_hour=100)
    left = [3]
    limiter = RelayLimiter(engine, RELAY, limits, demand=lambda: left[0])
    try:
        for _ in range(3):
            await limiter.acquire()
            left[0] -= 1
    finally:
        limiter.close()
    with engine.connect() as conn:
        assert ratelimit.usage(conn, RELAY, 60) == 3  # no tokens wasted at the end


async def test_a_throttle_seen_by_one_worker_slows_the_others(engine: Engine) -> None:
    a = RelayLimiter(engine, RELAY, Limits(), demand=lambda: 100)
    b = RelayLimiter(engine, RELAY, Limits(), demand=lambda: 100)
    try:
        await b.acquire()
        assert not b.limited
        await a.throttled()
        assert a.limited
        await asyncio.sleep(ratelimit.REFRESH_SECONDS)
        await b.acquire()  # looks at the shared row again, at most once a second
        assert b.limited
    finally:
        a.close()
        b.close()


def test_the_rolling_hour_counts_a_message_for_a_whole_hour(engine: Engine) -> None:
    # 100 messages reserved in the last second of a minute: the relay counts them for a
    # full hour from then, so the window must not reopen when their minute turns 60 min
    # old (59 min 0.5 s later) but only once they are an hour old.
    limits = Limits(per_hour=100, per_day=1000)
    minute = 29_000_000  # a minute in 2025, as epoch seconds // 60
    sent = minute * 60 + 59.5
    with engine.connect() as conn:
        with conn.begin():
            ratelimit._count_usage(conn, RELAY, sent, 100)
        for later in (3540.5, 3599.0):  # still within the hour after the send
            with conn.begin():
                room, pause = ratelimit._room(conn, RELAY, limits, sent + later)
            assert room == 0, later
            assert pause is not None and pause.resumes_at.timestamp() >= sent + 3600
        with conn.begin():
            room, pause = ratelimit._room(conn, RELAY, limits, sent + 3600.5)
        assert room == 100 and pause is None  # an hour later the window has reopened
        # The day window keeps them for a whole day too (23 h 59 min 0.5 s later they
        # still count), and the clean-up does not drop their bucket early.
        with conn.begin():
            ratelimit._count_usage(conn, RELAY, sent + 86_340.5, 1)  # 23 h 59 min later
            room, _ = ratelimit._room(conn, RELAY, Limits(per_day=101), sent + 86_340.5)
        assert room == 0
