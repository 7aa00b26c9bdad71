"""Queries of the delivery ledger as a whole: creating an issue's deliveries, what a send would
still mail, counts per status, and the failed ones. (A worker's claims, leases and fenced
outcome writes are :mod:`digest.ledger`'s.)
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime

from sqlalchemy import and_, exists, func, insert, literal, or_, select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from digest.models import Delivery, DeliveryStatus, Issue, Subscriber, SubscriberStatus


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
