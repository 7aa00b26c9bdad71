"""The delivery ledger: claims under leases, heartbeats, and fenced outcome writes.

Any number of ``digest send`` processes, on any hosts sharing the database, work on one
issue. Each is a *worker* with a unique id (``host:pid:random``) and:

* claims batches of deliveries (``SELECT … FOR UPDATE SKIP LOCKED`` on PostgreSQL, so
  workers take disjoint batches without waiting on each other); a claim marks the rows
  ``sending`` with the worker as owner, a token for the claim, and a lease that ends
  ``lease_seconds`` later *by the database's clock*;
* renews the leases of every row it holds every third of ``lease_seconds`` (heartbeat);
  a row whose lease ran out (its worker died, or froze) can be claimed by anyone;
* writes every outcome *fenced*: ``WHERE owner = me AND lease_token = t AND status =
  'sending'``, checking the row count. A worker whose row was taken over drops its claim
  instead of overwriting the new owner's outcome (River #1302, solid_queue #589);
* fences itself: when its last good renewal started more than two thirds of the lease
  ago, it opens no new SMTP transaction until a renewal succeeds, so it starts nothing
  once anyone could take its rows over (pgqueuer #430 re-picked jobs that were still
  running). A transaction already under way runs to its end (DATA may take minutes,
  and the heartbeat keeps renewing meanwhile); if the worker froze or lost the database
  during it, the new owner sends that message too: at most one per SMTP connection.

Each worker awaits the commit of a message's outcome before starting its next message, so
a crash re-sends at most one message per SMTP connection, with the same Message-ID.

Every statement of a worker runs on one connection, in the event loop's thread, and
commits before the next one starts: a worker's own transactions never wait on each other,
and no session state survives a commit (PgBouncer in transaction mode is fine).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, TypeVar

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    and_,
    bindparam,
    exists,
    func,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from digest import store
from digest.errors import DatabaseError
from digest.models import Delivery, DeliveryStatus, Issue, IssueStatus, Subscriber, SubscriberStatus
from digest.send import Outcome

T = TypeVar("T")

# A claim is small enough that workers started together on a list of a few thousand
# each get a share, and large enough that claiming costs little per message.
CLAIM_BATCH = 200
# How often a worker with nothing left to claim looks again while others hold rows.
WAIT_POLL_MAX = 1.0
# A claim whose client is silent this long is ended by the server (see store.drop_if_silent).
CLAIM_SILENT_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class Claimed:
    """A delivery claimed for sending, with what the sender needs of its subscriber."""

    delivery_id: int
    subscriber_id: int
    email: str
    name: str
    regions: list[str] | None
    attempts: int
    message_id: str | None


# --- queries --------------------------------------------------------------------------------


def _claimable(dialect: str) -> Any:
    now = store.db_now(dialect)
    return or_(
        Delivery.status == DeliveryStatus.PENDING,
        and_(
            Delivery.status == DeliveryStatus.DEFERRED,
            or_(Delivery.next_attempt_at.is_(None), Delivery.next_attempt_at <= now),
        ),
        # A worker died or froze: its lease ran out, by the database's clock.
        and_(
            Delivery.status == DeliveryStatus.SENDING,
            or_(Delivery.lease_until.is_(None), Delivery.lease_until < now),
        ),
    )


@dataclass(frozen=True)
class Claim:
    """One claim: the rows taken, the last id looked at, and how many were skipped."""

    rows: list[Claimed]
    last_id: int | None  # None: nothing was left to look at after ``after_id``
    gone: int = 0  # rows of readers who left the list meanwhile, marked skipped


def claim(
    conn: Connection,
    issue_id: int,
    after_id: int,
    limit: int,
    owner: str,
    token: str,
    lease_seconds: float,
) -> Claim:
    """Claim up to ``limit`` sendable deliveries with id > ``after_id`` (keyset order).

    Sendable: pending, deferred whose retry time has come, or sending under an expired
    lease. Rows of subscribers no longer active are marked skipped instead. One
    transaction, committed on return.
    """
    dialect = conn.dialect.name
    # The rows first, from the deliveries table alone (its partial index of open rows,
    # in id order), then their subscribers by primary key: a join here lets a planner
    # with stale statistics (right after a big import) scan the list once per row.
    pick = (
        select(Delivery.id)
        .where(Delivery.issue_id == issue_id, Delivery.id > after_id, _claimable(dialect))
        .order_by(Delivery.id)
        .limit(limit)
    )
    if dialect == "postgresql":
        pick = pick.with_for_update(skip_locked=True)
    with conn.begin():
        _async_commit(conn)
        # Cut off mid-claim, we would keep these rows locked (and skipped by everyone).
        store.drop_if_silent(conn, min(CLAIM_SILENT_SECONDS, lease_seconds / 3))
        ids = list(conn.execute(pick).scalars())
        if not ids:
            return Claim([], None)
        found = conn.execute(
            select(
                Delivery.id,
                Subscriber.id,
                Subscriber.email,
                Subscriber.name,
                Subscriber.regions,
                Delivery.attempts,
                Delivery.message_id,
                Subscriber.status,
            )
            .join(Subscriber, Subscriber.id == Delivery.subscriber_id)
            .where(Delivery.id.in_(ids))
            .order_by(Delivery.id)
        ).all()
        rows = [Claimed(*r[:7]) for r in found if r[7] == SubscriberStatus.ACTIVE]
        gone = [r[0] for r in found if r[7] != SubscriberStatus.ACTIVE]
        if rows:
            conn.execute(
                update(Delivery)
                .where(Delivery.id.in_([r.delivery_id for r in rows]))
                .values(
                    status=DeliveryStatus.SENDING,
                    owner=owner,
                    lease_token=token,
                    lease_until=store.db_after(dialect, lease_seconds),
                )
            )
        if gone:
            conn.execute(
                update(Delivery)
                .where(Delivery.id.in_(gone))
                .values(
                    status=DeliveryStatus.SKIPPED,
                    last_error="subscriber is no longer active",
                    owner=None,
                    lease_token=None,
                    lease_until=None,
                )
            )
    return Claim(rows, ids[-1], len(gone))


def _held(issue_id: int, owner: str) -> tuple[ColumnElement[bool], ...]:
    """The rows of the issue that ``owner`` claimed and has not finished (its to renew or
    release)."""
    return (
        Delivery.issue_id == issue_id,
        Delivery.owner == owner,
        Delivery.status == DeliveryStatus.SENDING,
    )


def renew(conn: Connection, issue_id: int, owner: str, lease_seconds: float) -> dict[int, str]:
    """Extend the lease of every row ``owner`` still holds; those rows' claim tokens by id."""
    with conn.begin():
        store.drop_if_silent(conn, min(CLAIM_SILENT_SECONDS, lease_seconds / 3))
        rows = conn.execute(
            update(Delivery)
            .where(*_held(issue_id, owner))
            .values(lease_until=store.db_after(conn.dialect.name, lease_seconds))
            .returning(Delivery.id, Delivery.lease_token)
        ).all()
    return {int(i): str(t) for i, t in rows}


def release(conn: Connection, issue_id: int, owner: str) -> int:
    """Give ``owner``'s unsent claims back to the pool (pending, no owner)."""
    with conn.begin():
        store.drop_if_silent(conn, CLAIM_SILENT_SECONDS)
        result = conn.execute(
            update(Delivery)
            .where(*_held(issue_id, owner))
            .values(status=DeliveryStatus.PENDING, owner=None, lease_token=None, lease_until=None)
        )
    return int(result.rowcount or 0)


def held_by_others(conn: Connection, issue_id: int, owner: str) -> int:
    """Rows of the issue that other workers hold under a live lease."""
    with conn.begin():
        n = conn.execute(
            select(func.count())
            .select_from(Delivery)
            .where(
                Delivery.issue_id == issue_id,
                Delivery.status == DeliveryStatus.SENDING,
                or_(Delivery.owner.is_(None), Delivery.owner != owner),
                Delivery.lease_until >= store.db_now(conn.dialect.name),
            )
        ).scalar_one()
    return int(n)


def joinable_sends(conn: Connection, not_owner_prefix: str) -> list[date]:
    """Edition dates of sends under way elsewhere that still have rows to claim.

    "Under way": another worker (whose id does not start with ``not_owner_prefix``, i.e.
    not this process) holds rows under a live lease. ``digest run`` joins these.
    """
    dialect = conn.dialect.name
    live = exists().where(
        Delivery.issue_id == Issue.id,
        Delivery.status == DeliveryStatus.SENDING,
        Delivery.lease_until >= store.db_now(dialect),
        ~Delivery.owner.startswith(not_owner_prefix, autoescape=True),
    )
    mine = exists().where(
        Delivery.issue_id == Issue.id,
        Delivery.status == DeliveryStatus.SENDING,
        Delivery.lease_until >= store.db_now(dialect),
        Delivery.owner.startswith(not_owner_prefix, autoescape=True),
    )
    open_rows = exists().where(Delivery.issue_id == Issue.id, _claimable(dialect))
    with conn.begin():
        return list(
            conn.execute(
                select(Issue.edition_date)
                .where(Issue.status != IssueStatus.SENT, live, ~mine, open_rows)
                .order_by(Issue.edition_date)
            ).scalars()
        )


OUTCOME_FIELDS = ("status", "attempts", "last_error", "message_id", "sent_at", "next_attempt_at")

# One Core UPDATE … WHERE id = ? run as executemany: the ORM's bulk-update path costs
# several times more Python per row, and this runs for every message sent. The owner
# stays on the row (who sent it); the lease goes.
_RECORD = (
    update(Delivery.__table__)  # type: ignore[arg-type]
    .where(
        Delivery.__table__.c.id == bindparam("b_id"),
        Delivery.__table__.c.owner == bindparam("b_owner"),
        Delivery.__table__.c.lease_token == bindparam("b_token"),
        Delivery.__table__.c.status == DeliveryStatus.SENDING.value,
    )
    .values(
        {f: bindparam(f"b_{f}") for f in OUTCOME_FIELDS}
        | {"lease_until": None, "lease_token": None}
    )
)


def _async_commit(conn: Connection) -> None:
    # The ledger's commits do not wait for the WAL to reach the disk: the same bargain as
    # SQLite's WAL with synchronous=NORMAL. The commit is visible to every worker at once,
    # so a crash of digest still re-sends at most one message per connection; only a
    # crash of the database server itself may forget the outcomes of its last three
    # wal_writer_delays (0.6 s by default), and those messages go out again with the same
    # Message-ID. A later synchronous commit (the issue's status, a bounce) flushes the
    # log up to itself, so nothing it was based on can be forgotten. Per
    # transaction (SET LOCAL), so nothing leaks to a pooled connection.
    if conn.dialect.name == "postgresql":
        conn.execute(text("SET LOCAL synchronous_commit = off"))


# PostgreSQL: the whole batch in one statement, one round trip, in autocommit. The rows
# come in as typed arrays (unnest), RETURNING says which ones the fence let through, and
# set_config makes this statement's commit asynchronous (see _async_commit).
_RECORD_PG = text(
    """
    UPDATE deliveries AS d
    SET status = v.status, attempts = v.attempts, last_error = v.last_error,
        message_id = v.message_id, sent_at = v.sent_at, next_attempt_at = v.next_attempt_at,
        lease_until = NULL, lease_token = NULL
    FROM unnest(
            CAST(:ids AS integer[]), CAST(:tokens AS text[]), CAST(:statuses AS text[]),
            CAST(:attempts AS integer[]), CAST(:errors AS text[]), CAST(:mids AS text[]),
            CAST(:sent AS timestamp[]), CAST(:next AS timestamp[])
         ) AS v(id, token, status, attempts, last_error, message_id, sent_at, next_attempt_at),
         (SELECT set_config('synchronous_commit', 'off', true)) AS async_commit
    WHERE d.id = v.id AND d.owner = :owner AND d.lease_token = v.token
      AND d.status = 'sending'
    RETURNING d.id
    """
)


def _naive_utc(t: datetime | None) -> datetime | None:
    return None if t is None else t.astimezone(UTC).replace(tzinfo=None)


def write_outcomes(conn: Connection, rows: list[dict[str, Any]]) -> list[bool]:
    """Write fenced outcomes in one commit; which rows were written (False: taken over).

    Each row has ``id``, ``owner``, ``token`` and every name in :data:`OUTCOME_FIELDS`.
    On PostgreSQL ``conn`` must be in autocommit (one statement is one transaction).
    """
    if conn.dialect.name == "postgresql":
        written = set(
            conn.execute(
                _RECORD_PG,
                {
                    "ids": [r["id"] for r in rows],
                    "tokens": [r["token"] for r in rows],
                    "statuses": [str(r["status"]) for r in rows],
                    "attempts": [r["attempts"] for r in rows],
                    "errors": [r["last_error"] for r in rows],
                    "mids": [r["message_id"] for r in rows],
                    "sent": [_naive_utc(r["sent_at"]) for r in rows],
                    "next": [_naive_utc(r["next_attempt_at"]) for r in rows],
                    "owner": rows[0]["owner"],
                },
            ).scalars()
        )
        conn.commit()
        return [r["id"] in written for r in rows]
    params = [{f"b_{k}": v for k, v in r.items()} for r in rows]
    with conn.begin() as tx:
        if conn.execute(_RECORD, params).rowcount == len(params):
            return [True] * len(params)
        tx.rollback()  # some row was taken over: find which, one by one (rare)
    with conn.begin():
        return [conn.execute(_RECORD, p).rowcount == 1 for p in params]


# --- one worker -----------------------------------------------------------------------------


class Ledger:
    """One worker's side of the ledger for one issue (implements ``send.Ledger``).

    Outcomes from all SMTP connections are batched into one commit; each ``record``
    waits for it, so a connection's next message starts only after its previous outcome
    is durable, yet the rows of K connections share a commit.
    """

    def __init__(
        self,
        engine: Engine,
        sessions: sessionmaker[Session],
        issue_id: int,
        lease_seconds: float,
        bounce: Callable[[Session, int], None],
    ) -> None:
        self.owner = store.new_worker_id()
        self.issue_id = issue_id
        self.lease = float(lease_seconds)
        self._sessions = sessions
        self._bounce = bounce
        self._conn = engine.connect()
        # Outcomes: one statement per commit on PostgreSQL, so a connection of their own
        # in autocommit (claims and renewals need real transactions).
        self._out = engine.connect()
        if engine.dialect.name == "postgresql":
            self._out = self._out.execution_options(isolation_level="AUTOCOMMIT")
        self._held: dict[int, str] = {}  # delivery id → token of the claim that holds it
        self._rows_lock = asyncio.Lock()
        self._renewed_at = time.monotonic()  # start of the last good renewal
        self._pending: list[tuple[Outcome, asyncio.Future[bool] | None]] = []
        self._wake = asyncio.Event()
        self._closed = False
        self._failed: DatabaseError | None = None
        self.scanned_to: int | None = None
        self.gone = 0  # rows skipped at claim time: their reader left the list
        self.lost = 0  # claims found taken over by another worker
        self.heartbeat_error: str | None = None

    # claims

    def claim(self, after_id: int, limit: int | None = None) -> list[Claimed]:
        """Claim the next batch (default :data:`CLAIM_BATCH`) after ``after_id``, new token.

        :attr:`scanned_to` is then the last id looked at (None: nothing after ``after_id``).
        """
        token = secrets.token_hex(8)
        limit = limit or CLAIM_BATCH
        got = self._db(
            lambda c: claim(c, self.issue_id, after_id, limit, self.owner, token, self.lease)
        )
        for r in got.rows:
            self._held[r.delivery_id] = token
        self.scanned_to = got.last_id
        self.gone += got.gone
        return got.rows

    async def batches(self, stopped: Callable[[], bool]) -> AsyncGenerator[list[Claimed], None]:
        """Claimed batches until none is left, waiting out other workers' live leases.

        A worker that finds nothing to claim while others still hold rows waits until
        those rows are sent or their leases expire (then takes them over), so the last
        worker standing finishes the issue. Before each wait it yields an empty batch:
        whatever the caller claimed and holds back must go out now.
        """
        after = 0
        poll = min(WAIT_POLL_MAX, self.lease / 10)
        while not stopped():
            batch = await self._claim_soon(after)
            if self.scanned_to is not None:
                after = self.scanned_to
                if batch:
                    yield batch
                continue
            if after:
                after = 0  # rows behind us may have been released or expired since
                continue
            if not self._db(lambda c: held_by_others(c, self.issue_id, self.owner)):
                return
            yield []  # "waiting": the caller must not hold back rows it already claimed
            await asyncio.sleep(poll)

    async def _claim_soon(self, after_id: int) -> list[Claimed]:
        if self._conn.dialect.name != "postgresql":
            return self.claim(after_id)
        # In a thread, as outcomes are written: the SMTP workers go on meanwhile. Under
        # the rows lock, because renewals use the same connection.
        async with self._rows_lock:
            return await asyncio.to_thread(self.claim, after_id)

    # leases

    @property
    def fenced(self) -> bool:
        """True when our leases may be about to expire (no good renewal for 2/3 of one)."""
        return time.monotonic() - self._renewed_at > self.lease * 2 / 3

    def renew(self) -> None:
        """Renew every lease we hold now; rows no longer ours are dropped from our claims."""
        started = time.monotonic()
        ours = self._db(lambda c: renew(c, self.issue_id, self.owner, self.lease))
        for delivery_id, token in list(self._held.items()):
            if ours.get(delivery_id) != token:
                del self._held[delivery_id]
                self.lost += 1
        self._renewed_at = started

    async def heartbeat(self) -> None:
        """Renew every third of the lease until closed; failures only fence (see ``admit``)."""
        while not self._closed:
            await asyncio.sleep(self.lease / 3)
            if self._closed:
                return
            try:
                async with self._rows_lock:
                    self.renew()
                self.heartbeat_error = None
            except DatabaseError as exc:
                self.heartbeat_error = str(exc)

    async def admit(self, delivery_id: int) -> bool:
        """May an SMTP transaction for this delivery start now?

        No when the row was taken over. When our leases may be about to expire, renew
        first; if that fails the error stops the run (we cannot know we still hold it).
        """
        if self.fenced:
            async with self._rows_lock:
                if self.fenced:
                    self.renew()
        return delivery_id in self._held

    # outcomes

    async def record(self, outcome: Outcome) -> bool:
        """Queue one outcome and wait until it is committed; False when it was fenced off."""
        if self._failed is not None:
            raise self._failed
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.append((outcome, fut))
        self._wake.set()
        return await fut

    def record_later(self, outcome: Outcome) -> None:
        """Queue one outcome without waiting (skips, written with the next batch)."""
        self._pending.append((outcome, None))
        self._wake.set()

    async def run(self) -> None:
        """Flush whenever something is queued, until closed."""
        while not self._closed or self._pending:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(0)  # let the other workers' outcomes join this commit
            try:
                await self.flush()
            except DatabaseError as exc:
                # Every waiting and every later ``record`` gets the error: the run stops.
                self._failed = exc
                for _, fut in self._pending:
                    if fut is not None and not fut.done():
                        fut.set_exception(exc)
                self._pending = []
                return

    async def close(self) -> None:
        """Flush what is left and stop :meth:`run` and :meth:`heartbeat`."""
        self._closed = True
        self._wake.set()

    async def flush(self) -> None:
        """Write every queued outcome in one transaction, fenced by our claims.

        Renewals wait for it (and it for them): both touch the rows we hold, from two
        connections, and must not lock them in opposite orders.
        """
        async with self._rows_lock:
            await self._flush()

    async def _flush(self) -> None:
        batch, self._pending = self._pending, []
        if not batch:
            return
        now = datetime.now(UTC)
        rows: list[dict[str, Any]] = []
        mine: list[tuple[Outcome, asyncio.Future[bool] | None]] = []
        results: dict[int, bool] = {}
        for o, fut in batch:
            token = self._held.get(o.delivery_id)
            if token is None:  # taken over already: nothing to write
                results[id(o)] = False
                continue
            mine.append((o, fut))
            rows.append(
                {
                    "id": o.delivery_id,
                    "owner": self.owner,
                    "token": token,
                    "status": o.status,
                    "attempts": o.attempts,
                    "last_error": o.error,
                    "message_id": o.message_id,
                    "sent_at": now if o.status == DeliveryStatus.SENT else None,
                    "next_attempt_at": o.next_attempt_at,
                }
            )
        try:
            written = await self._write(rows) if rows else []
            for (o, _), ok in zip(mine, written, strict=True):
                results[id(o)] = ok
                self._held.pop(o.delivery_id, None)
                if not ok:
                    self.lost += 1
            bounced = [o.delivery_id for o, _ in mine if o.permanent and results[id(o)]]
            if bounced:  # rare: a query each, after the statuses above are written
                with self._sessions() as session:
                    for delivery_id in bounced:
                        self._bounce(session, delivery_id)
                    session.commit()
        except (DatabaseError, SQLAlchemyError) as exc:
            error = exc if isinstance(exc, DatabaseError) else _db_error(exc)
            for _, fut in batch:
                if fut is not None and not fut.done():
                    fut.set_exception(error)
            raise error from None
        for o, fut in batch:
            if fut is not None and not fut.done():
                fut.set_result(results[id(o)])

    async def _write(self, rows: list[dict[str, Any]]) -> list[bool]:
        out = self._out
        if out.dialect.name == "postgresql":
            # In a thread: the round trip to the server releases the GIL, so the SMTP
            # workers go on meanwhile. (SQLite's in-process write is quicker inline.)
            return await asyncio.to_thread(self._db, lambda c: write_outcomes(c, rows), out)
        return self._db(lambda c: write_outcomes(c, rows), out)

    # the end

    def release(self) -> int:
        """Give back the rows we claimed but did not finish (they become pending)."""
        self._held.clear()
        return self._db(lambda c: release(c, self.issue_id, self.owner))

    def dispose(self) -> None:
        """Release the ledger's connections."""
        self._conn.close()
        self._out.close()

    def _db(self, fn: Callable[[Connection], T], conn: Connection | None = None) -> T:
        conn = conn or self._conn
        try:
            return fn(conn)
        except SQLAlchemyError as exc:
            # A dropped connection: the next statement gets a fresh one from the pool.
            with contextlib.suppress(SQLAlchemyError):
                conn.invalidate()
            raise _db_error(exc) from None


def _db_error(exc: SQLAlchemyError) -> DatabaseError:
    reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
    return DatabaseError(
        f"lost the database while sending ({reason}); nothing unconfirmed was recorded as "
        "sent: run the send again to finish"
    )
