"""The scheduler's records: each scheduled firing (job, slot), unique so that it happens once
across runners, and the sends that were missed.
"""

from __future__ import annotations

from datetime import date, datetime

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from digest.models import MissedSend, ScheduledFire


def is_missed(session: Session, edition_date: date) -> bool:
    """True when the scheduled send of ``edition_date`` was recorded as missed."""
    stmt = select(MissedSend.id).where(MissedSend.edition_date == edition_date)
    return session.scalar(stmt) is not None


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
