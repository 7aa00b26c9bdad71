"""Every database query of digest, as named functions.

Stages never build ``select()`` statements themselves: they call these, so the queries
(and their indexes) can be read, tuned and tested in one place. SQLAlchemy errors are
translated to :class:`~digest.errors.DatabaseError` at :func:`open_engine` and
:func:`check_schema`; the rest run inside a session the caller owns.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import filelock
from sqlalchemy import (
    ColumnElement,
    Engine,
    Float,
    and_,
    case,
    create_engine,
    delete,
    event,
    exists,
    func,
    insert,
    inspect,
    literal,
    or_,
    select,
    text,
    type_coerce,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from digest.errors import DatabaseError, SendInProgress
from digest.models import (
    Article,
    Base,
    Delivery,
    DeliveryStatus,
    FeedState,
    Issue,
    IssueArticle,
    IssueStatus,
    MissedSend,
    ScheduledFire,
    SignupMail,
    SignupMailKind,
    SignupMailStatus,
    Subscriber,
    SubscriberStatus,
    Throttle,
    UTCDateTime,
)

MIGRATIONS = Path(__file__).parent / "migrations"
log = logging.getLogger("digest")

# --- engine and schema ------------------------------------------------------------------


def open_engine(url: str) -> Engine:
    """Create an engine; SQLite gets WAL, foreign keys and a busy timeout.

    WAL lets ``digest serve`` unsubscribe readers while ``send`` writes the ledger, and the
    busy timeout turns short lock contention into a wait instead of an error.
    """
    try:
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite":
            db = parsed.database
            if db and db != ":memory:" and not Path(db).parent.exists():
                raise DatabaseError(
                    f"database.url: folder {Path(db).parent} does not exist; create it "
                    "or point database.url elsewhere"
                )
            engine = create_engine(url, connect_args={"timeout": 30})

            @event.listens_for(engine, "connect")
            def _pragmas(dbapi_conn: Any, _record: Any) -> None:
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.close()

            return engine
        # application_name shows which process a backend serves (pg_stat_activity), so
        # an operator, or a test, can tell digest's connections apart.
        # (unless the URL names one itself).
        named = "application_name" in url
        # No server-side prepared statements (psycopg prepares a query after 5 runs):
        # behind PgBouncer in transaction mode the next transaction may get another
        # server connection, which does not have them.
        args: dict[str, Any] = {"prepare_threshold": None}
        if not named:
            args["application_name"] = f"digest:{os.getpid()}"
        return create_engine(url, pool_pre_ping=True, connect_args=args)
    except ArgumentError as exc:
        raise DatabaseError(f"database.url: {url!r} is not a database URL ({exc})") from None
    except ModuleNotFoundError as exc:
        raise DatabaseError(
            f"database.url: driver {exc.name!r} is not installed; for PostgreSQL run "
            "pip install 'digest[postgres]'"
        ) from None


def _alembic_config(engine: Engine) -> Any:
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


def migrate(engine: Engine) -> str:
    """Upgrade the schema to the newest migration (idempotent); return the revision."""
    from alembic import command

    try:
        command.upgrade(_alembic_config(engine), "head")
        return current_revision(engine) or "?"
    except OperationalError as exc:
        raise DatabaseError(f"cannot open database {engine.url!r}: {exc.orig}") from None


def current_revision(engine: Engine) -> str | None:
    """The schema revision the database is at, or None when it was never initialised."""
    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return None
        return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def head_revision() -> str:
    """The newest migration shipped with this version of digest."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory(str(MIGRATIONS))
    head = script.get_current_head()
    assert head is not None
    return head


def check_schema(engine: Engine) -> None:
    """Raise a clear error unless the database is initialised and up to date."""
    try:
        rev = current_revision(engine)
    except OperationalError as exc:
        raise DatabaseError(f"cannot open database {engine.url!r}: {exc.orig}") from None
    if rev is None:
        raise DatabaseError(
            f"database {engine.url.render_as_string(hide_password=True)} is not initialised; "
            "run `digest init` first"
        )
    if rev != head_revision():
        raise DatabaseError(
            f"database schema is at {rev}, this digest needs {head_revision()}; "
            "run `digest init` to upgrade"
        )


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded objects usable after commit."""
    return sessionmaker(engine, expire_on_commit=False)


# --- the database's clock, and who we are ------------------------------------------------
#
# Leases and rate windows are judged by the database's clock: hosts' clocks drift, and a
# lease is only as good as the clock both its holder and its taker read.


def db_now(dialect: str) -> ColumnElement[datetime]:
    """The database's current time as a UTC timestamp (a :class:`UTCDateTime` value)."""
    if dialect == "postgresql":
        # clock_timestamp(), not now(): now() is frozen at the start of the transaction.
        return type_coerce(func.timezone("UTC", func.clock_timestamp()), UTCDateTime)
    return type_coerce(func.strftime("%Y-%m-%d %H:%M:%f000", "now"), UTCDateTime)


def db_after(dialect: str, seconds: float) -> ColumnElement[datetime]:
    """The database's current time plus ``seconds`` (a :class:`UTCDateTime` value)."""
    if dialect == "postgresql":
        later = func.timezone("UTC", func.clock_timestamp()) + func.make_interval(
            0, 0, 0, 0, 0, 0, literal(float(seconds), Float)
        )
        return type_coerce(later, UTCDateTime)
    # SQLite stores these as text in the same format, which sorts like the times.
    return type_coerce(
        func.strftime("%Y-%m-%d %H:%M:%f000", "now", f"{seconds:+.3f} seconds"), UTCDateTime
    )


def db_epoch(dialect: str) -> ColumnElement[float]:
    """The database's current time in seconds since the epoch."""
    if dialect == "postgresql":
        return type_coerce(func.extract("epoch", func.clock_timestamp()), Float)
    return type_coerce((func.julianday("now") - 2440587.5) * 86400.0, Float)


def insert_ignore(dialect: str, model: type[Base], values: dict[str, Any]) -> Any:
    """``INSERT … ON CONFLICT DO NOTHING`` on either dialect (a statement to execute)."""
    if dialect == "postgresql":
        return postgresql.insert(model).values(values).on_conflict_do_nothing()
    return sqlite.insert(model).values(values).on_conflict_do_nothing()


def new_worker_id() -> str:
    """A process's identity in leases: ``host:pid:random``.

    The random part keeps two processes apart even when hostnames repeat (containers)
    and pids are reused: sharing an id is how two nodes each end up "the leader".
    """
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


# --- locks --------------------------------------------------------------------------------


def _lock_file(engine: Engine, name: str) -> filelock.FileLock | None:
    db = engine.url.database
    if not db or db == ":memory:":
        return None
    safe = hashlib.sha1(name.encode()).hexdigest()[:12]
    return filelock.FileLock(f"{db}.{safe}.lock")


@contextmanager
def exclusive_lock(engine: Engine, name: str) -> Iterator[None]:
    """Hold a named lock beside a SQLite database, or raise :class:`SendInProgress` at once.

    SQLite only (one machine is the point of SQLite): a lock file beside the database
    file. It dies with the process, so a crash never leaves it stuck. PostgreSQL needs
    none: its senders share work through leases and its runners elect a leader.
    """
    lock = None if engine.dialect.name == "postgresql" else _lock_file(engine, name)
    if lock is None:
        yield
        return
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        raise SendInProgress(f"another digest process holds '{name}'; try again later") from None
    try:
        yield
    finally:
        lock.release()


@contextmanager
def sqlite_turn(engine: Engine, name: str) -> Iterator[None]:
    """On SQLite, wait for the named lock (senders take turns); on PostgreSQL, nothing.

    SQLite has one writer at a time anyway; taking turns keeps a second ``send`` of the
    same date from racing the first, and it then finds nothing left to send.
    """
    lock = None if engine.dialect.name == "postgresql" else _lock_file(engine, name)
    if lock is None:
        yield
        return
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        log.warning("waiting for another digest process holding '%s' to finish", name)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


# --- feeds ----------------------------------------------------------------------------------


def feed_state(session: Session, url: str) -> FeedState:
    """The stored validators of a feed, created on first use."""
    state = session.scalar(select(FeedState).where(FeedState.url == url))
    if state is None:
        state = FeedState(url=url)
        session.add(state)
    return state


# --- articles -------------------------------------------------------------------------------


def find_article(session: Session, link: str, guid: str | None) -> Article | None:
    """The stored article with this canonical link or (when given) this guid."""
    cond = Article.link == link
    if guid:
        cond = or_(cond, Article.guid == guid)
    return session.scalars(select(Article).where(cond).order_by(Article.id).limit(1)).first()


def candidate_articles(
    session: Session, start: datetime, end: datetime, before_date: date
) -> list[Article]:
    """Articles published in [start, end) that no earlier sent issue carried.

    An issue counts as sent from the moment its sending started: most readers have it
    even when a few deliveries are still deferred.
    """
    in_sent_issue = exists().where(
        IssueArticle.article_id == Article.id,
        IssueArticle.issue_id == Issue.id,
        Issue.status.in_([IssueStatus.SENDING, IssueStatus.SENT]),
        Issue.edition_date != before_date,
    )
    stmt = (
        select(Article)
        .where(Article.published_at >= start, Article.published_at < end, ~in_sent_issue)
        .order_by(Article.published_at.desc(), Article.id.desc())
    )
    return list(session.scalars(stmt))


def article_count(session: Session) -> int:
    """How many articles the store holds."""
    return session.scalar(select(func.count(Article.id))) or 0


# --- issues ---------------------------------------------------------------------------------


def issue_for_date(session: Session, edition_date: date) -> Issue | None:
    """The issue built for this date, if any."""
    return session.scalar(select(Issue).where(Issue.edition_date == edition_date))


def create_issue(
    session: Session,
    edition_date: date,
    subject: str,
    sections: Sequence[tuple[str, Sequence[int]]],
    now: datetime,
) -> Issue:
    """Freeze a selection as the issue for ``edition_date``.

    Never raises for a duplicate: when another process froze the same date first, that
    issue is returned instead (the date is unique).
    """
    issue = Issue(
        edition_date=edition_date, subject=subject, built_at=now, status=IssueStatus.READY
    )
    try:
        with session.begin_nested():
            session.add(issue)
            session.flush()
            rows = [
                {
                    "issue_id": issue.id,
                    "article_id": article_id,
                    "section": section,
                    "section_position": s_pos,
                    "position": pos,
                }
                for s_pos, (section, ids) in enumerate(sections)
                for pos, article_id in enumerate(ids)
            ]
            if rows:
                session.execute(insert(IssueArticle), rows)
    except IntegrityError:
        existing = issue_for_date(session, edition_date)
        assert existing is not None
        return existing
    return issue


def issue_sections(session: Session, issue_id: int) -> list[tuple[str, list[Article]]]:
    """The frozen sections of an issue, in order."""
    stmt = (
        select(IssueArticle.section, Article)
        .join(Article, Article.id == IssueArticle.article_id)
        .where(IssueArticle.issue_id == issue_id)
        .order_by(IssueArticle.section_position, IssueArticle.position)
    )
    out: list[tuple[str, list[Article]]] = []
    for section, article in session.execute(stmt):
        if not out or out[-1][0] != section:
            out.append((section, []))
        out[-1][1].append(article)
    return out


def replace_issue_articles(
    session: Session, issue_id: int, sections: Sequence[tuple[str, Sequence[int]]]
) -> None:
    """Store an edited selection: ``sections`` in order, each with its article ids in order."""
    session.execute(delete(IssueArticle).where(IssueArticle.issue_id == issue_id))
    rows = [
        dict(issue_id=issue_id, article_id=a, section=name, section_position=i, position=j)
        for i, (name, ids) in enumerate(sections)
        for j, a in enumerate(ids)
    ]
    if rows:
        session.execute(insert(IssueArticle), rows)


def lock_issue(session: Session, issue_id: int) -> None:
    """Lock the issue's row until the transaction ends (PostgreSQL; SQLite locks on write)."""
    session.execute(select(Issue.id).where(Issue.id == issue_id).with_for_update())


def messages_out(session: Session, issue_id: int) -> int:
    """Deliveries of an issue that may have reached a reader: every one tried (sent, in
    flight, deferred, failed, or pending again after a try); not untried ones or skips."""
    untried = and_(
        Delivery.status.in_([DeliveryStatus.PENDING, DeliveryStatus.SKIPPED]),
        Delivery.attempts == 0,
    )
    stmt = select(func.count(Delivery.id)).where(Delivery.issue_id == issue_id, ~untried)
    return session.scalar(stmt) or 0


def next_unsent_issue(session: Session, from_date: date) -> Issue | None:
    """The earliest issue dated ``from_date`` or later that is not completely sent."""
    return session.scalar(
        select(Issue)
        .where(Issue.edition_date >= from_date, Issue.status != IssueStatus.SENT)
        .order_by(Issue.edition_date)
        .limit(1)
    )


def article_by_id(session: Session, article_id: int) -> Article | None:
    """One stored article by id."""
    return session.get(Article, article_id)


def earlier_issue_with(session: Session, article_id: int, edition_date: date) -> date | None:
    """The date of another issue, sending or sent, that carried this article, if any."""
    return session.scalar(
        select(Issue.edition_date)
        .join(IssueArticle, IssueArticle.issue_id == Issue.id)
        .where(
            IssueArticle.article_id == article_id,
            Issue.edition_date != edition_date,
            Issue.status.in_([IssueStatus.SENDING, IssueStatus.SENT]),
        )
        .order_by(Issue.edition_date.desc())
        .limit(1)
    )


def is_missed(session: Session, edition_date: date) -> bool:
    """True when the scheduled send of ``edition_date`` was recorded as missed."""
    stmt = select(MissedSend.id).where(MissedSend.edition_date == edition_date)
    return session.scalar(stmt) is not None


def set_issue_status(session: Session, issue: Issue, status: IssueStatus, now: datetime) -> None:
    """Move an issue along ready → sending → sent."""
    issue.status = status
    if status == IssueStatus.SENT and issue.sent_at is None:
        issue.sent_at = now


def advance_issue(session: Session, issue_id: int, counts: dict[str, int], now: datetime) -> None:
    """Move an issue to ``sent`` when nothing is open, or to ``sending`` once one was sent.

    Conditional UPDATEs, not an object write: another worker may have moved the issue on
    meanwhile, and a stale ``ready`` must never overwrite its ``sent``.
    """
    if counts["pending"] + counts["deferred"] + counts["sending"] == 0:
        session.execute(
            update(Issue)
            .where(Issue.id == issue_id)
            .values(status=IssueStatus.SENT, sent_at=func.coalesce(Issue.sent_at, now))
        )
    elif counts["sent"]:
        # "sending" from the first delivered message: from then on readers have these
        # articles, so later issues must not repeat them even if some rows are deferred.
        session.execute(
            update(Issue)
            .where(Issue.id == issue_id, Issue.status == IssueStatus.READY)
            .values(status=IssueStatus.SENDING)
        )


def record_fire(
    session: Session, job: str, slot: datetime, edition_date: date, now: datetime, by: str
) -> bool:
    """Record a scheduled firing; False when that (job, slot) had fired already."""
    try:
        with session.begin_nested():
            session.add(
                ScheduledFire(
                    job=job, slot=slot, edition_date=edition_date, fired_at=now, fired_by=by
                )
            )
            session.flush()
    except IntegrityError:
        return False
    return True


def fires(session: Session, job: str) -> list[ScheduledFire]:
    """The recorded firings of a job, oldest first."""
    return list(
        session.scalars(
            select(ScheduledFire).where(ScheduledFire.job == job).order_by(ScheduledFire.id)
        )
    )


def recent_issues(session: Session, limit: int = 10) -> list[Issue]:
    """The newest issues first."""
    return list(session.scalars(select(Issue).order_by(Issue.edition_date.desc()).limit(limit)))


def record_missed_send(
    session: Session, edition_date: date, scheduled_at: datetime, now: datetime
) -> None:
    """Remember that the send for ``edition_date`` was missed (idempotent)."""
    exists_already = session.scalar(
        select(MissedSend.id).where(MissedSend.edition_date == edition_date)
    )
    if exists_already is None:
        session.add(
            MissedSend(edition_date=edition_date, scheduled_at=scheduled_at, noticed_at=now)
        )


def missed_sends(session: Session, limit: int = 10) -> list[MissedSend]:
    """Missed scheduled sends, newest first."""
    return list(
        session.scalars(select(MissedSend).order_by(MissedSend.edition_date.desc()).limit(limit))
    )


def open_issues(session: Session, edition_date: date) -> list[Issue]:
    """Issues of ``edition_date`` whose sending is not finished."""
    return list(
        session.scalars(
            select(Issue).where(
                Issue.edition_date == edition_date, Issue.status != IssueStatus.SENT
            )
        )
    )


# --- subscribers ----------------------------------------------------------------------------


def subscribers_by_email(session: Session, emails: Sequence[str]) -> dict[str, Subscriber]:
    """Stored subscribers among ``emails`` (already normalized), keyed by email."""
    if not emails:
        return {}
    found = session.scalars(select(Subscriber).where(Subscriber.email.in_(emails)))
    return {s.email: s for s in found}


def subscriber_by_email(session: Session, email: str) -> Subscriber | None:
    """One subscriber by normalized email."""
    return session.scalar(select(Subscriber).where(Subscriber.email == email))


def subscriber_by_id(session: Session, subscriber_id: int) -> Subscriber | None:
    """One subscriber by id."""
    return session.get(Subscriber, subscriber_id)


def add_subscribers(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    """Insert many new subscribers in one statement."""
    if rows:
        session.execute(insert(Subscriber), list(rows))


def add_subscriber_if_absent(session: Session, values: dict[str, Any]) -> bool:
    """Insert one subscriber unless the address is stored; True when inserted.

    Two concurrent confirmations of one new address insert one row, not an error.
    """
    return _insert_ignoring_conflict(session, Subscriber, values)


def iter_subscribers(session: Session, batch: int = 1000) -> Iterator[Subscriber]:
    """Every subscriber in id order, fetched in keyset batches (flat memory)."""
    after = 0
    while True:
        page = list(
            session.scalars(
                select(Subscriber).where(Subscriber.id > after).order_by(Subscriber.id).limit(batch)
            )
        )
        if not page:
            return
        yield from page
        after = page[-1].id
        session.expunge_all()


def active_subscribers(session: Session, limit: int) -> list[Subscriber]:
    """The first ``limit`` active subscribers in id order (the preview's switch)."""
    return list(
        session.scalars(
            select(Subscriber)
            .where(Subscriber.status == SubscriberStatus.ACTIVE)
            .order_by(Subscriber.id)
            .limit(limit)
        )
    )


def iter_active_regions(session: Session, batch: int = 5000) -> Iterator[list[str] | None]:
    """Every active subscriber's regions, in keyset batches (flat memory)."""
    after = 0
    while True:
        page = session.execute(
            select(Subscriber.id, Subscriber.regions)
            .where(Subscriber.id > after, Subscriber.status == SubscriberStatus.ACTIVE)
            .order_by(Subscriber.id)
            .limit(batch)
        ).all()
        if not page:
            return
        for _, regions in page:
            yield regions
        after = page[-1][0]


def subscriber_counts(session: Session) -> dict[str, int]:
    """Subscribers per status."""
    rows = session.execute(select(Subscriber.status, func.count()).group_by(Subscriber.status))
    return {str(status): n for status, n in rows}


# --- deliveries -----------------------------------------------------------------------------


def create_deliveries(session: Session, issue_id: int) -> int:
    """Add a pending delivery for every active subscriber that has none for this issue.

    One INSERT … SELECT, so a 100,000-row list costs one statement, and the unique
    (issue, subscriber) constraint makes a concurrent duplicate impossible.
    """
    already = exists().where(Delivery.issue_id == issue_id, Delivery.subscriber_id == Subscriber.id)
    src = select(
        literal(issue_id, Delivery.issue_id.type).label("issue_id"),
        Subscriber.id,
        literal(DeliveryStatus.PENDING.value, Delivery.status.type),
        literal(0, Delivery.attempts.type),
    ).where(Subscriber.status == SubscriberStatus.ACTIVE, ~already)
    result = session.execute(
        insert(Delivery).from_select(["issue_id", "subscriber_id", "status", "attempts"], src)
    )
    return int(getattr(result, "rowcount", 0) or 0)


def refresh_statistics(session: Session) -> None:
    """PostgreSQL: ANALYZE the ledger and the list after adding many deliveries.

    Autovacuum gets to it within a minute or so, but the send starts now, and plans
    made from the statistics of an empty table are the slow kind. Best effort: a role
    that may not ANALYZE just goes without.
    """
    if session.bind is None or session.bind.dialect.name != "postgresql":
        return
    try:
        with session.begin_nested():
            session.execute(text("ANALYZE deliveries, subscribers"))
    except DBAPIError:
        pass


def release_orphans(session: Session, issue_id: int) -> int:
    """Return every ``sending`` row of the issue to ``pending`` (SQLite, at start).

    Only called while holding the SQLite turn for the date, so no live sender owns them.
    They keep their Message-ID: a re-send of a message that did arrive collapses into
    the first copy in the reader's mailbox.
    """
    result = session.execute(
        update(Delivery)
        .where(Delivery.issue_id == issue_id, Delivery.status == DeliveryStatus.SENDING)
        .values(status=DeliveryStatus.PENDING, lease_until=None, owner=None, lease_token=None)
    )
    return int(getattr(result, "rowcount", 0) or 0)


def unsent_subscribers(
    session: Session, issue_id: int | None, now: datetime, batch: int = 1000
) -> Iterator[list[str] | None]:
    """The regions of every active subscriber a ``send`` of ``issue_id`` would mail now.

    That is: no delivery yet (``send`` creates it), pending, orphaned ``sending``
    (released at start, or held by another worker), or deferred with its retry time
    come; the rule of ``ledger.claim``. ``issue_id`` None (not built yet): every active subscriber.
    Keyset batches, so a dry run over a large list keeps memory flat.
    """
    open_row = or_(
        Delivery.id.is_(None),
        Delivery.status.in_([DeliveryStatus.PENDING, DeliveryStatus.SENDING]),
        and_(
            Delivery.status == DeliveryStatus.DEFERRED,
            or_(Delivery.next_attempt_at.is_(None), Delivery.next_attempt_at <= now),
        ),
    )
    after = 0
    while True:
        stmt = (
            select(Subscriber.id, Subscriber.regions)
            .outerjoin(
                Delivery,
                and_(
                    Delivery.subscriber_id == Subscriber.id,
                    # -1: no issue yet, so no delivery joins and every row is open.
                    Delivery.issue_id == (issue_id if issue_id is not None else -1),
                ),
            )
            .where(Subscriber.status == SubscriberStatus.ACTIVE, Subscriber.id > after, open_row)
            .order_by(Subscriber.id)
            .limit(batch)
        )
        page = session.execute(stmt).all()
        if not page:
            return
        for _, regions in page:
            yield regions
        after = page[-1][0]


def count_sendable(session: Session, issue_id: int, now: datetime) -> int:
    """How many deliveries :func:`claim_deliveries` would hand out now (progress totals).

    The same condition as a claim, counted once at the start of a run, not per batch.
    """
    due = or_(
        Delivery.status == DeliveryStatus.PENDING,
        and_(
            Delivery.status == DeliveryStatus.DEFERRED,
            or_(Delivery.next_attempt_at.is_(None), Delivery.next_attempt_at <= now),
        ),
    )
    stmt = (
        select(func.count())
        .select_from(Delivery)
        .join(Subscriber, Subscriber.id == Delivery.subscriber_id)
        .where(Delivery.issue_id == issue_id, due, Subscriber.status == SubscriberStatus.ACTIVE)
    )
    return session.scalar(stmt) or 0


def skip_unsubscribed(session: Session, issue_id: int) -> int:
    """Mark not-yet-sent deliveries of people who left the list since as skipped."""
    gone = select(Subscriber.id).where(Subscriber.status != SubscriberStatus.ACTIVE)
    result = session.execute(
        update(Delivery)
        .where(
            Delivery.issue_id == issue_id,
            Delivery.status.in_([DeliveryStatus.PENDING, DeliveryStatus.DEFERRED]),
            Delivery.subscriber_id.in_(gone),
        )
        .values(status=DeliveryStatus.SKIPPED, last_error="subscriber is no longer active")
    )
    return int(getattr(result, "rowcount", 0) or 0)


def delivery_counts(session: Session, issue_id: int) -> dict[str, int]:
    """Deliveries of an issue per status (every status present, zero when absent)."""
    counts = {s.value: 0 for s in DeliveryStatus}
    rows = session.execute(
        select(Delivery.status, func.count())
        .where(Delivery.issue_id == issue_id)
        .group_by(Delivery.status)
    )
    for status, n in rows:
        counts[str(status)] = n
    return counts


def failed_deliveries(
    session: Session, issue_id: int | None
) -> list[tuple[Issue, Subscriber, Delivery]]:
    """Failed deliveries with their issue and subscriber, newest issue first."""
    stmt = (
        select(Issue, Subscriber, Delivery)
        .join(Delivery, Delivery.issue_id == Issue.id)
        .join(Subscriber, Subscriber.id == Delivery.subscriber_id)
        .where(Delivery.status == DeliveryStatus.FAILED)
        .order_by(Issue.edition_date.desc(), Delivery.id)
    )
    if issue_id is not None:
        stmt = stmt.where(Issue.id == issue_id)
    return [tuple(row) for row in session.execute(stmt)]  # type: ignore[misc]


def delete_all(session: Session) -> None:
    """Empty every table (tests and benchmarks only)."""
    for model in (
        Delivery,
        IssueArticle,
        Issue,
        Subscriber,
        Article,
        FeedState,
        SignupMail,
        Throttle,
    ):
        session.execute(delete(model))
    session.commit()


# --- bounces --------------------------------------------------------------------------------


def delivery_for(session: Session, issue_id: int, subscriber_id: int) -> Delivery | None:
    """The delivery of one (issue, subscriber), if any (the unique pair's index)."""
    return session.scalar(
        select(Delivery).where(
            Delivery.issue_id == issue_id, Delivery.subscriber_id == subscriber_id
        )
    )


def mark_delivery_bounced(session: Session, delivery: Delivery, error: str) -> None:
    """Record a bounce report against a delivery the SMTP server had accepted."""
    delivery.status = DeliveryStatus.FAILED
    delivery.last_error = error
    session.flush()


def failed_run_length(session: Session, delivery: Delivery) -> int:
    """How many consecutive issues, around this delivery's, failed for its subscriber.

    Only deliveries that were tried count (sent or failed, in issue order); a skipped or
    still deferred one neither extends nor breaks the run. The run is found in both
    directions, so bounce reports arriving out of order add up the same way.
    """
    stmt = (
        select(Delivery.id, Delivery.status)
        .join(Issue, Issue.id == Delivery.issue_id)
        .where(
            Delivery.subscriber_id == delivery.subscriber_id,
            Delivery.status.in_([DeliveryStatus.SENT, DeliveryStatus.FAILED]),
        )
        .order_by(Issue.edition_date, Delivery.id)
    )
    run, found = 0, False
    for delivery_id, status in session.execute(stmt):
        if status == DeliveryStatus.FAILED:
            run += 1
            found = found or delivery_id == delivery.id
        elif found:
            break
        else:
            run = 0
    return run if found else 0


def count_hard_bounce(session: Session, delivery_id: int, threshold: int) -> None:
    """Count a hard bounce (a 5xx reply, or a bounce report) of one delivery.

    The consecutive count is read from the ledger (the run of failed issues around this
    one), not kept as a counter: through a relay every message first gets a 250 and its
    bounce arrives days later, possibly after the next issue, possibly out of order.
    """
    delivery = session.get(Delivery, delivery_id)
    if delivery is not None:
        run = failed_run_length(session, delivery)
        raise_hard_bounces(session, delivery.subscriber_id, run, threshold)


def raise_hard_bounces(
    session: Session,
    subscriber_id: int,
    at_least: int,
    threshold: int,
    now: datetime | None = None,
) -> None:
    """Lift the hard-bounce count to ``at_least``; at ``threshold`` the subscriber is bounced.

    The bounce ends the subscription, so ``unsubscribed_at`` records when (``now``,
    default the current time): a confirmation link asked for before it must not revive
    the address (:func:`digest.signup.link_standing`).
    """
    session.execute(
        update(Subscriber)
        .where(Subscriber.id == subscriber_id, Subscriber.hard_bounces < at_least)
        .values(hard_bounces=at_least)
    )
    when = now or datetime.now(UTC)
    session.execute(
        update(Subscriber)
        .where(
            Subscriber.id == subscriber_id,
            Subscriber.hard_bounces >= threshold,
            Subscriber.status == SubscriberStatus.ACTIVE,
        )
        .values(status=SubscriberStatus.BOUNCED, unsubscribed_at=when, updated_at=when)
    )


# --- archive --------------------------------------------------------------------------------

# An issue is public from the moment its sending started: readers have it in their inbox,
# and its "View in browser" link must work even while some deliveries are deferred.
_PUBLISHED = (IssueStatus.SENDING, IssueStatus.SENT)


def published_issues(session: Session, limit: int | None = None) -> list[Issue]:
    """Issues whose sending has started, newest edition first."""
    stmt = (
        select(Issue)
        .where(Issue.status.in_(_PUBLISHED))
        .order_by(Issue.edition_date.desc())
        .limit(limit)
    )
    return list(session.scalars(stmt))


def published_issue(session: Session, edition_date: date) -> Issue | None:
    """The issue of ``edition_date`` if its sending has started, else None."""
    return session.scalar(
        select(Issue).where(Issue.edition_date == edition_date, Issue.status.in_(_PUBLISHED))
    )


# --- signup: throttles and queued mails -----------------------------------------------------


def _insert_ignoring_conflict(session: Session, model: Any, values: dict[str, Any]) -> bool:
    """INSERT … ON CONFLICT DO NOTHING; True when the row was inserted.

    Both SQLite and PostgreSQL have it; it needs no savepoint (pysqlite's are unreliable)
    and, unlike catching IntegrityError, leaves the transaction usable.
    """
    from sqlalchemy.dialects import postgresql, sqlite

    if session.get_bind().dialect.name == "postgresql":
        stmt: Any = postgresql.insert(model).values(**values).on_conflict_do_nothing()
    else:
        stmt = sqlite.insert(model).values(**values).on_conflict_do_nothing()
    # RETURNING, not rowcount: through the ORM, psycopg reports -1 for this statement.
    return session.execute(stmt.returning(literal(1))).first() is not None


def claim_cooldown(session: Session, key: str, period: timedelta, now: datetime) -> bool:
    """Start the cooldown ``key`` for ``period`` unless it is running; True when started.

    Atomic across processes: of two concurrent claims exactly one wins (the row's
    primary key, then a conditional UPDATE that PostgreSQL re-checks after waiting for
    the other writer, and that SQLite runs alone). The caller commits.
    """
    if _insert_ignoring_conflict(
        session, Throttle, {"key": key, "until": now + period, "count": 1}
    ):
        return True
    result = session.execute(
        update(Throttle)
        .where(Throttle.key == key, Throttle.until <= now)
        .values(until=now + period, count=1)
    )
    return bool(getattr(result, "rowcount", 0))


def hit_counter(session: Session, key: str, period: timedelta, now: datetime) -> int:
    """Count one hit on ``key`` and return the hits in its current window (this one
    included). A window starts with the first hit after the previous one ended.

    The UPDATE locks the row until the caller commits, so concurrent hits never read
    the same count.
    """
    if _insert_ignoring_conflict(
        session, Throttle, {"key": key, "until": now + period, "count": 1}
    ):
        return 1
    expired = Throttle.until <= now
    session.execute(
        update(Throttle)
        .where(Throttle.key == key)
        .values(
            count=case((expired, 1), else_=Throttle.count + 1),
            until=case((expired, now + period), else_=Throttle.until),
        )
    )
    return int(session.scalar(select(Throttle.count).where(Throttle.key == key)) or 0)


def throttle_until(session: Session, key: str) -> datetime | None:
    """When the window of ``key`` ends (None when there is no such throttle)."""
    return session.scalar(select(Throttle.until).where(Throttle.key == key))


def prune_throttles(session: Session, now: datetime) -> int:
    """Delete throttles whose window ended (they would restart at the next hit anyway)."""
    result = session.execute(delete(Throttle).where(Throttle.until <= now))
    return int(getattr(result, "rowcount", 0) or 0)


def queue_signup_mail(
    session: Session,
    kind: SignupMailKind,
    email: str,
    name: str,
    regions: list[str] | None,
    now: datetime,
) -> SignupMail:
    """Queue one signup mail, due now."""
    mail = SignupMail(
        kind=kind,
        email=email,
        name=name,
        regions=regions,
        status=SignupMailStatus.PENDING,
        attempts=0,
        created_at=now,
        next_attempt_at=now,
    )
    session.add(mail)
    session.flush()
    return mail


def due_signup_mails(session: Session, now: datetime, limit: int) -> list[int]:
    """Ids of pending signup mails whose time has come and that no process holds."""
    stmt = (
        select(SignupMail.id)
        .where(
            SignupMail.status == SignupMailStatus.PENDING,
            SignupMail.next_attempt_at <= now,
            or_(SignupMail.lease_until.is_(None), SignupMail.lease_until <= now),
        )
        .order_by(SignupMail.next_attempt_at, SignupMail.id)
        .limit(limit)
    )
    return list(session.scalars(stmt))


def claim_signup_mail(
    session: Session, mail_id: int, now: datetime, lease: timedelta
) -> SignupMail | None:
    """Take a due mail for ``lease`` (one process wins); None when another took it.

    A process that dies holding it lets the lease run out, and another sends it.
    """
    result = session.execute(
        update(SignupMail)
        .where(
            SignupMail.id == mail_id,
            SignupMail.status == SignupMailStatus.PENDING,
            or_(SignupMail.lease_until.is_(None), SignupMail.lease_until <= now),
        )
        .values(lease_until=now + lease)
    )
    if not getattr(result, "rowcount", 0):
        return None
    return session.get(SignupMail, mail_id, populate_existing=True)


def finish_signup_mail(
    session: Session,
    mail_id: int,
    status: SignupMailStatus,
    attempts: int,
    now: datetime,
    error: str | None = None,
    retry_at: datetime | None = None,
) -> None:
    """Record the outcome of one try: sent, failed for good, or pending until ``retry_at``."""
    session.execute(
        update(SignupMail)
        .where(SignupMail.id == mail_id)
        .values(
            status=status,
            attempts=attempts,
            lease_until=None,
            last_error=error,
            sent_at=now if status == SignupMailStatus.SENT else None,
            next_attempt_at=retry_at or now,
        )
    )


def prune_signup_mails(session: Session, before: datetime) -> int:
    """Delete sent and failed signup mails created before ``before`` (they hold addresses
    and names of people who may never have confirmed)."""
    result = session.execute(
        delete(SignupMail).where(
            SignupMail.status != SignupMailStatus.PENDING, SignupMail.created_at < before
        )
    )
    return int(getattr(result, "rowcount", 0) or 0)


def signup_mails(session: Session) -> list[SignupMail]:
    """Every queued signup mail, oldest first (tests and the operator's eye)."""
    return list(session.scalars(select(SignupMail).order_by(SignupMail.id)))
