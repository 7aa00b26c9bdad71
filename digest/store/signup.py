"""Queries of double opt-in signup: throttles (cooldowns and hit counters shared by every
process) and the queue of signup mails with their leases.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import case, delete, or_, select, update
from sqlalchemy.orm import Session

from digest.models import SignupMail, SignupMailKind, SignupMailStatus, Throttle
from digest.store.database import _insert_ignoring_conflict


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
