"""Queries of the subscriber list: look-ups by address or id, bulk inserts, and keyset walks
over the list that keep memory flat.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from digest.models import Subscriber, SubscriberStatus
from digest.store.database import _insert_ignoring_conflict


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
