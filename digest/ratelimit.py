"""The relay's rate limits, shared by every worker on the database, and throttle back-off.

Relays cap what they take (SES 14/s and 50,000/day by default, Gmail and Microsoft per
hour) and answer ``421 4.7.x`` past the cap. The limits live in the database, not in a
process, so they hold across every ``digest send`` on every host and survive restarts:

* one ``relay_limits`` row per relay, locked for the few milliseconds of a reservation;
* per-second smoothing by GCRA (the row keeps one "theoretical arrival time"): at most the
  rate in any one-second window, beyond a burst of ``concurrency``;
* rolling hour and day windows counted per minute in ``relay_usage``: a window also
  counts the minute that began a whole window ago, since a message counted in it may
  have gone out in its last second (the relay counts it for a whole window from then);
* a worker reserves a few tokens at a time and never gives any back, so a crash can only
  make digest send *less* than the limit allows, never more;
* a throttling reply halves the rate of every worker (at most once a second, so the
  replies to messages already in flight count as one), which then recovers linearly over
  a minute (AIMD, as TCP does); the state is in the row, so every worker slows down.

Times are seconds since the epoch by the database's clock.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from typing import Literal, TypeVar

from sqlalchemy import Connection, Engine, delete, func, select, update
from sqlalchemy.exc import SQLAlchemyError

from digest import store
from digest.config import SMTP as SMTPConfig
from digest.errors import DatabaseError, RatePaused
from digest.models import RelayLimit, RelayUsage

# Throttle back-off: how low a cut can take the rate, how long a full recovery takes, and
# how long after a cut further throttling replies are taken as echoes of the same one.
MIN_RATE = 1.0
RECOVER_SECONDS = 60.0
CUT_HOLDOFF = 1.0
# A reservation covers about this much sending time, and never more than RESERVE_MAX
# tokens: few enough that a crash wastes little, enough that the row is rarely locked.
RESERVE_SECONDS = 0.5
RESERVE_MAX = 50
# How often a worker that is not limited looks whether another one got throttled.
REFRESH_SECONDS = 1.0
# A reservation whose client is silent this long is ended by the server (a partition),
# so the relay's row lock is not held from everyone (see ``store.drop_if_silent``).
SILENT_SECONDS = 5.0

HOUR, DAY = 60, 1440  # window lengths in minutes

T = TypeVar("T")


@dataclass(frozen=True)
class Limits:
    """What the config allows one relay (0 = unlimited); ``burst`` is the smoothing slack."""

    per_second: int = 0
    per_hour: int = 0
    per_day: int = 0
    burst: int = 1

    @classmethod
    def from_config(cls, cfg: SMTPConfig) -> Limits:
        """The ``[smtp]`` limits, with ``concurrency`` as the burst."""
        return cls(cfg.max_per_second, cfg.max_per_hour, cfg.max_per_day, cfg.concurrency)

    @property
    def windowed(self) -> bool:
        """True when an hour or day quota applies."""
        return bool(self.per_hour or self.per_day)


def relay_key(cfg: SMTPConfig) -> str:
    """Which relay (and account: quotas are per account) the limits belong to."""
    where = f"{cfg.host}:{cfg.port}"
    return f"{cfg.username}@{where}" if cfg.username else where


@dataclass(frozen=True)
class Pause:
    """A full hour or day window: nothing more may be sent until ``resumes_at``."""

    window: Literal["hourly", "daily"]
    limit: int
    resumes_at: datetime

    def error(self) -> RatePaused:
        """The exception that carries this pause out of the send engine."""
        return RatePaused(
            f"{self.window} limit of {self.limit} reached; resumes after {self.resumes_at}",
            self.window,
            self.limit,
            self.resumes_at,
        )


def pause_line(window: str, limit: int, pending: int, resumes_at: datetime, tz: tzinfo) -> str:
    """The line ``send`` and ``status`` print for a full window (local time of ``tz``)."""
    when = resumes_at.astimezone(tz).strftime("%Y-%m-%d %H:%M %Z")
    return f"paused: {window} limit of {limit} reached; {pending} pending; resumes after {when}"


@dataclass(frozen=True)
class Grant:
    """Tokens from one reservation: the k-th may be used at ``start + k * interval``."""

    count: int
    start: float
    interval: float
    now: float
    pause: Pause | None = None


@dataclass(frozen=True)
class Throttle:
    """The shared back-off state of a relay at one moment."""

    rate: float | None  # messages per second now; None when not throttled
    throttles: int


def _aimd_rate(row: RelayLimit, now: float) -> float | None:
    """The throttle rate at ``now``: the cut rate plus the linear recovery since the cut."""
    if row.rate is None or row.ceiling is None or row.cut_at is None:
        return None
    rate = row.rate + row.ceiling / RECOVER_SECONDS * max(0.0, now - row.cut_at)
    return None if rate >= row.ceiling else rate


def _effective_rate(row: RelayLimit, limits: Limits, now: float) -> float | None:
    rates = [r for r in (_aimd_rate(row, now), float(limits.per_second or 0)) if r]
    return min(rates) if rates else None


def _locked_row(conn: Connection, relay: str) -> tuple[RelayLimit, float]:
    """The relay's row, locked until the transaction ends, and the database's time."""
    dialect = conn.dialect.name
    # Every worker needs this row: a holder cut off mid-reservation must not keep it.
    store.drop_if_silent(conn, SILENT_SECONDS)
    # Also what takes SQLite's write lock at once, so the read below cannot go stale.
    conn.execute(
        store.insert_ignore(dialect, RelayLimit, {"relay": relay, "tat": 0.0, "throttles": 0})
    )
    stmt = select(RelayLimit).where(RelayLimit.relay == relay)
    if dialect == "postgresql":
        stmt = stmt.with_for_update()
    row = conn.execute(stmt).one()
    now = conn.execute(select(store.db_epoch(dialect))).scalar_one()
    limit = RelayLimit(
        relay=row.relay,
        tat=row.tat,
        rate=row.rate,
        ceiling=row.ceiling,
        cut_at=row.cut_at,
        throttles=row.throttles,
    )
    return limit, float(now)


def _window_usage(conn: Connection, relay: str, minute: int, length: int) -> list[tuple[int, int]]:
    # ``length + 1`` buckets: the oldest one's messages may be less than ``length``
    # minutes old (sent late in that minute), so it still counts until it has ended
    # ``length`` minutes ago. Counting too long only under-sends; too short over-sends.
    rows = conn.execute(
        select(RelayUsage.minute, RelayUsage.count)
        .where(RelayUsage.relay == relay, RelayUsage.minute >= minute - length)
        .order_by(RelayUsage.minute)
    )
    return [(int(m), int(c)) for m, c in rows]


def _room(
    conn: Connection, relay: str, limits: Limits, now: float
) -> tuple[int | None, Pause | None]:
    """How many more messages the hour and day windows take now (None: no quota)."""
    minute = int(now // 60)
    room: int | None = None
    pause: Pause | None = None
    for window, length, limit in (
        ("daily", DAY, limits.per_day),
        ("hourly", HOUR, limits.per_hour),
    ):
        if not limit:
            continue
        buckets = _window_usage(conn, relay, minute, length)
        left = limit - sum(c for _, c in buckets)
        room = left if room is None else min(room, left)
        if left <= 0:
            # Rolling window: it reopens once enough of the oldest minutes fall out of it.
            excess, freed = 1 - left, 0
            for m, c in buckets:
                freed += c
                if freed >= excess:
                    # Minute m falls out of the window once it ended ``length`` minutes ago.
                    resumes = datetime.fromtimestamp((m + 1 + length) * 60, UTC)
                    if pause is None or resumes > pause.resumes_at:
                        pause = Pause(window, limit, resumes)  # type: ignore[arg-type]
                    break
    return (None if room is None else max(0, room)), pause


def _count_usage(conn: Connection, relay: str, now: float, n: int) -> None:
    minute = int(now // 60)
    done = conn.execute(
        update(RelayUsage)
        .where(RelayUsage.relay == relay, RelayUsage.minute == minute)
        .values(count=RelayUsage.count + n)
    )
    if not done.rowcount:
        conn.execute(
            store.insert_ignore(
                conn.dialect.name,
                RelayUsage,
                {"relay": relay, "minute": minute, "count": n},
            )
        )
    conn.execute(
        delete(RelayUsage).where(RelayUsage.relay == relay, RelayUsage.minute < minute - DAY)
    )


def reserve(conn: Connection, relay: str, limits: Limits, wanted: int) -> Grant:
    """Take up to ``wanted`` tokens from the relay's shared budget, in one transaction.

    Returns how many were granted and when each may be used; ``count`` is 0 and
    ``pause`` says until when when an hour or day window is full. Tokens are never
    given back.
    """
    with conn.begin():
        row, now = _locked_row(conn, relay)
        room, pause = _room(conn, relay, limits, now) if limits.windowed else (None, None)
        n = max(0, wanted if room is None else min(wanted, room))
        if n == 0:
            return Grant(0, now, 0.0, now, pause or _full(limits, now))
        rate = _effective_rate(row, limits, now)
        interval, start = 0.0, now
        if rate is not None:
            interval = 1.0 / rate
            # GCRA: up to `burst` tokens may be early, the rest follow at the rate.
            start = max(row.tat, now - (limits.burst - 1) * interval)
            conn.execute(
                update(RelayLimit).where(RelayLimit.relay == relay).values(tat=start + n * interval)
            )
        if limits.windowed:
            _count_usage(conn, relay, now, n)
        return Grant(n, start, interval, now)


def _full(limits: Limits, now: float) -> Pause:
    # Only reached when a window has no room but no bucket explains it (cannot happen
    # unless the quota is 0 and windowed, which config rules out); be safe anyway.
    return Pause("hourly", limits.per_hour or limits.per_day, datetime.fromtimestamp(now, UTC))


def throttled(conn: Connection, relay: str, limits: Limits, observed_rate: float) -> Throttle:
    """Record a throttling reply: halve the shared rate, unless it was cut a moment ago."""
    with conn.begin():
        row, now = _locked_row(conn, relay)
        current = _effective_rate(row, limits, now)
        if current is None:
            current = max(MIN_RATE, observed_rate)
        values: dict[str, float | int] = {"throttles": row.throttles + 1}
        recent = row.cut_at is not None and now - row.cut_at < CUT_HOLDOFF
        if not recent or _aimd_rate(row, now) is None:
            new_rate = max(MIN_RATE, current / 2)
            ceiling = row.ceiling if _aimd_rate(row, now) is not None else current
            values |= {
                "rate": new_rate,
                # Recover towards the rate before the first cut (at least twice the floor,
                # so a cut at the floor still means something).
                "ceiling": max(ceiling or current, 2 * new_rate),
                "cut_at": now,
            }
            # Later tokens follow the new rate; ones already granted stand.
            values["tat"] = max(row.tat, now)
        conn.execute(update(RelayLimit).where(RelayLimit.relay == relay).values(values))
    return throttle_state(conn, relay, limits)


def throttle_state(conn: Connection, relay: str, limits: Limits) -> Throttle:
    """The relay's back-off as it stands (read only)."""
    with conn.begin():
        found = conn.execute(select(RelayLimit).where(RelayLimit.relay == relay)).first()
        now = float(conn.execute(select(store.db_epoch(conn.dialect.name))).scalar_one())
    if found is None:
        return Throttle(None, 0)
    row = RelayLimit(
        relay=relay,
        tat=found.tat,
        rate=found.rate,
        ceiling=found.ceiling,
        cut_at=found.cut_at,
        throttles=found.throttles,
    )
    return Throttle(_aimd_rate(row, now), row.throttles)


def window_pause(conn: Connection, relay: str, limits: Limits) -> Pause | None:
    """The hour or day window that is full right now, if any (for ``digest status``)."""
    if not limits.windowed:
        return None
    with conn.begin():
        now = float(conn.execute(select(store.db_epoch(conn.dialect.name))).scalar_one())
        room, pause = _room(conn, relay, limits, now)
    return pause if room == 0 else None


def usage(conn: Connection, relay: str, minutes: int) -> int:
    """Messages counted against the relay in the last ``minutes`` minutes."""
    with conn.begin():
        now = float(conn.execute(select(store.db_epoch(conn.dialect.name))).scalar_one())
        total = conn.execute(
            select(func.coalesce(func.sum(RelayUsage.count), 0)).where(
                RelayUsage.relay == relay, RelayUsage.minute > int(now // 60) - minutes
            )
        ).scalar_one()
    return int(total)


# --- the per-process side -----------------------------------------------------------------


class RelayLimiter:
    """One process's door to the shared budget: SMTP workers ``acquire`` before each message.

    Unlimited and unthrottled, it costs nothing but a look at the relay's row once a
    second (so a throttle seen by another worker slows this one too). Otherwise it
    reserves a few tokens at a time, sized to what this process still has to send, so
    the end of a send wastes none of an hourly quota.
    """

    def __init__(
        self, engine: Engine, relay: str, limits: Limits, demand: Callable[[], int]
    ) -> None:
        self._engine = engine
        self._relay = relay
        self._limits = limits
        self._demand = demand
        self._conn: Connection | None = None
        self._lock = asyncio.Lock()
        self._tokens: deque[float] = deque()  # local monotonic times
        self._throttled_rate: float | None = None
        self._refreshed = -math.inf
        self._paused: Pause | None = None
        self._started: deque[float] = deque()  # recent sends, for the observed rate
        self.throttles = 0

    @property
    def limited(self) -> bool:
        """True when tokens must come from the database."""
        return bool(
            self._limits.per_second or self._limits.windowed or self._throttled_rate is not None
        )

    async def acquire(self) -> None:
        """Wait for this process's next token; raise :class:`RatePaused` when a window is full."""
        async with self._lock:
            if self._paused is not None:
                raise self._paused.error()
            if time.monotonic() - self._refreshed >= REFRESH_SECONDS:
                await self._call(self._refresh)
            if not self.limited:
                self._mark_start()
                return
            while not self._tokens:
                await self._refill()
            due = self._tokens.popleft()
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        self._mark_start()

    def _mark_start(self) -> None:
        now = time.monotonic()
        self._started.append(now)
        while self._started and self._started[0] < now - 2.0:
            self._started.popleft()

    async def throttled(self) -> None:
        """The relay asked us to slow down: cut the shared rate and drop spare tokens."""
        # What this process sent over the last two seconds (or since it started sending).
        span = time.monotonic() - self._started[0] if self._started else 2.0
        observed = max(MIN_RATE, len(self._started) / max(span, 0.1))
        async with self._lock:
            state = await self._call(
                lambda conn: throttled(conn, self._relay, self._limits, observed)
            )
            self._throttled_rate = state.rate
            self.throttles += 1
            self._tokens.clear()  # reserved at the old rate; the new one applies at once
            self._refreshed = time.monotonic()

    def _refresh(self, conn: Connection) -> None:
        self._throttled_rate = throttle_state(conn, self._relay, self._limits).rate
        self._refreshed = time.monotonic()

    async def _refill(self) -> None:
        rate = self._throttled_rate or self._limits.per_second
        size = RESERVE_MAX if not rate else max(1, math.ceil(rate * RESERVE_SECONDS))
        wanted = max(1, min(size, RESERVE_MAX, self._demand()))
        grant = await self._call(lambda conn: reserve(conn, self._relay, self._limits, wanted))
        if grant.count == 0:
            self._paused = grant.pause or _full(self._limits, grant.now)
            raise self._paused.error()
        # Map the database's times onto this host's monotonic clock.
        offset = time.monotonic() - grant.now
        self._tokens.extend(grant.start + k * grant.interval + offset for k in range(grant.count))

    async def _call(self, fn: Callable[[Connection], T]) -> T:
        def run() -> T:
            try:
                if self._conn is None:
                    self._conn = self._engine.connect()
                return fn(self._conn)
            except SQLAlchemyError as exc:
                if self._conn is not None:
                    self._conn.invalidate()
                    self._conn = None
                raise DatabaseError(
                    f"database error in the relay rate limiter: {_reason(exc)}; nothing was "
                    "sent past it; run the send again"
                ) from None

        # In a thread: a slow database must not stall the workers that hold tokens.
        return await asyncio.to_thread(run)

    def close(self) -> None:
        """Release the limiter's connection."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _reason(exc: SQLAlchemyError) -> str:
    return str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
