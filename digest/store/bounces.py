"""Hard bounces: a bounce report against a delivery, and the run of failed issues that ends a
subscription.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from digest.models import Delivery, DeliveryStatus, Issue, Subscriber, SubscriberStatus


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
