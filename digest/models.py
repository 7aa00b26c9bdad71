"""SQLAlchemy 2.0 tables of the article store, the subscriber list and the delivery ledger.

No business logic here; queries live in ``digest/store/``. Schema changes go through Alembic
migrations in ``digest/migrations``.
"""

from __future__ import annotations

import enum
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Date,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored as naive UTC and always returned timezone-aware.

    SQLite keeps no time zone; storing naive UTC everywhere keeps comparisons in SQL
    correct on both SQLite and PostgreSQL.
    """

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC)


class SubscriberStatus(enum.StrEnum):
    ACTIVE = "active"
    UNSUBSCRIBED = "unsubscribed"
    BOUNCED = "bounced"


class IssueStatus(enum.StrEnum):
    READY = "ready"
    SENDING = "sending"
    SENT = "sent"


class DeliveryStatus(enum.StrEnum):
    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    DEFERRED = "deferred"
    FAILED = "failed"
    SKIPPED = "skipped"


class SubscriberSource(enum.StrEnum):
    """How a subscriber's consent was given: on a list an editor imported, or by a
    confirmed signup (double opt-in). Imports store where they came from (``csv:list.csv``,
    ``config``) in ``subscribers.source``; see :func:`consent_source`."""

    IMPORT = "import"
    SIGNUP = "signup"


class SignupMailKind(enum.StrEnum):
    CONFIRM = "confirm"  # "confirm your subscription" with a /confirm/ link
    ALREADY = "already"  # "you are already subscribed; manage your regions here"


class SignupMailStatus(enum.StrEnum):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"


NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class FeedState(Base):
    """What we remember about a feed between fetches (conditional GET validators)."""

    __tablename__ = "feeds"
    id: Mapped[int] = mapped_column(primary_key=True)
    url: Mapped[str] = mapped_column(String(2048), unique=True)
    etag: Mapped[str | None] = mapped_column(String(512))
    last_modified: Mapped[str | None] = mapped_column(String(128))
    last_fetched_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)


class Article(Base):
    __tablename__ = "articles"
    id: Mapped[int] = mapped_column(primary_key=True)
    link: Mapped[str] = mapped_column(String(2048), unique=True)
    guid: Mapped[str | None] = mapped_column(String(2048), index=True)
    title: Mapped[str] = mapped_column(Text)
    dek: Mapped[str] = mapped_column(Text, default="")
    authors: Mapped[list[str]] = mapped_column(JSON, default=list)
    image_url: Mapped[str | None] = mapped_column(String(2048))
    # The photographer or agency, from the feed (Media RSS <media:credit>), printed under
    # the image as on the publication's site.
    image_credit: Mapped[str | None] = mapped_column(String(300))
    categories: Mapped[list[str]] = mapped_column(JSON, default=list)
    published_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    feed: Mapped[str] = mapped_column(String(2048))
    first_seen_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Subscriber(Base):
    __tablename__ = "subscribers"
    # Ids are never reused, not even the highest after a delete (SQLite's AUTOINCREMENT;
    # PostgreSQL sequences never go back): an unsubscribe link names its subscriber by id.
    __table_args__ = ({"sqlite_autoincrement": True},)
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    # None means every section; otherwise a list of region names from the config.
    regions: Mapped[list[str] | None] = mapped_column(JSON)
    status: Mapped[SubscriberStatus] = mapped_column(
        String(20), default=SubscriberStatus.ACTIVE, index=True
    )
    source: Mapped[str] = mapped_column(String(200), default="")
    hard_bounces: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # When the subscription last ended: an unsubscribe, or the bounce that stopped it.
    # Confirmation links asked for before it revive nothing (signup.link_standing).
    unsubscribed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The consent record: when the current subscription was asked for (import time or
    # signup request) and when the address owner confirmed it (signups only).
    subscribed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    confirmed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


def consent_source(source: str) -> SubscriberSource:
    """The kind of consent behind a stored ``subscribers.source``."""
    return SubscriberSource.SIGNUP if source == SubscriberSource.SIGNUP else SubscriberSource.IMPORT


class Issue(Base):
    __tablename__ = "issues"
    id: Mapped[int] = mapped_column(primary_key=True)
    edition_date: Mapped[date] = mapped_column(Date, unique=True)
    status: Mapped[IssueStatus] = mapped_column(String(20), default=IssueStatus.READY)
    subject: Mapped[str] = mapped_column(Text)
    built_at: Mapped[datetime] = mapped_column(UTCDateTime)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Editorial state (see editorial.py): the editor's lead story, their Markdown note and
    # the approval. Any edit clears approved_at, so an approval covers what was seen.
    lead_article_id: Mapped[int | None] = mapped_column(ForeignKey("articles.id"))
    note: Mapped[str | None] = mapped_column(Text)
    approved_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    approved_by: Mapped[str | None] = mapped_column(String(320))


class IssueArticle(Base):
    """The frozen selection of an issue: a resumed send renders exactly this."""

    __tablename__ = "issue_articles"
    __table_args__ = (UniqueConstraint("issue_id", "article_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    issue_id: Mapped[int] = mapped_column(ForeignKey("issues.id", ondelete="CASCADE"), index=True)
    article_id: Mapped[int] = mapped_column(ForeignKey("articles.id"), index=True)
    section: Mapped[str] = mapped_column(String(200))
    section_position: Mapped[int] = mapped_column(Integer)
    position: Mapped[int] = mapped_column(Integer)


_OPEN = "status IN ('pending', 'sending', 'deferred')"


class Delivery(Base):
    """One row per (issue, subscriber): the ledger that makes re-running ``send`` safe."""

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("issue_id", "subscriber_id"),
        Index("ix_deliveries_issue_status", "issue_id", "status"),
        # Claims walk an issue's open rows in id order: this index holds only those, so a
        # claim late in a 100,000-row send does not step over the rows already sent.
        Index(
            "ix_deliveries_open",
            "issue_id",
            "id",
            postgresql_where=text(_OPEN),
            sqlite_where=text(_OPEN),
        ),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    issue_id: Mapped[int] = mapped_column(ForeignKey("issues.id", ondelete="CASCADE"))
    subscriber_id: Mapped[int] = mapped_column(ForeignKey("subscribers.id"), index=True)
    status: Mapped[DeliveryStatus] = mapped_column(String(20), default=DeliveryStatus.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Who claimed the row (``host:pid:random``, kept after the outcome: who sent it) and
    # the claim's token; every outcome write is fenced by both (see ``ledger.py``).
    owner: Mapped[str | None] = mapped_column(String(200))
    lease_token: Mapped[str | None] = mapped_column(String(64))
    last_error: Mapped[str | None] = mapped_column(Text)
    message_id: Mapped[str | None] = mapped_column(String(300))
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class MissedSend(Base):
    """A scheduled send that did not run because the scheduler was down past the grace."""

    __tablename__ = "missed_sends"
    id: Mapped[int] = mapped_column(primary_key=True)
    edition_date: Mapped[date] = mapped_column(Date, unique=True)
    scheduled_at: Mapped[datetime] = mapped_column(UTCDateTime)
    noticed_at: Mapped[datetime] = mapped_column(UTCDateTime)


class SignupMail(Base):
    """A mail the signup form asked for, queued by the request and sent by ``digest serve``.

    Queued in the database, not in memory, so a relay that is down, a restart or another
    serve process never loses it. Confirmation tokens are made when the mail is sent.
    """

    __tablename__ = "signup_mails"
    __table_args__ = (Index("ix_signup_mails_status_next", "status", "next_attempt_at"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[SignupMailKind] = mapped_column(String(20))
    email: Mapped[str] = mapped_column(String(320))
    name: Mapped[str] = mapped_column(String(200), default="")
    regions: Mapped[list[str] | None] = mapped_column(JSON)
    status: Mapped[SignupMailStatus] = mapped_column(String(20), default=SignupMailStatus.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime)
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)


class Throttle(Base):
    """A named counter with a window: per-client request limits and per-address cooldowns.

    In the database so that every ``digest serve`` process, and a restarted one, sees
    the same counts.
    """

    __tablename__ = "throttles"
    key: Mapped[str] = mapped_column(String(400), primary_key=True)
    until: Mapped[datetime] = mapped_column(UTCDateTime)
    count: Mapped[int] = mapped_column(Integer, default=0)


class RelayLimit(Base):
    """The shared state of one relay's rate limiter (see ``ratelimit.py``).

    Times are seconds since the epoch by the database's clock, never a host's.
    """

    __tablename__ = "relay_limits"
    relay: Mapped[str] = mapped_column(String(300), primary_key=True)
    # GCRA: the theoretical arrival time of the next message under the per-second rate.
    tat: Mapped[float] = mapped_column(Float, default=0.0)
    # Throttle back-off (AIMD): the rate right after the last cut, the rate it recovers
    # towards, and when the cut happened. All null when the relay is not throttling us.
    rate: Mapped[float | None] = mapped_column(Float)
    ceiling: Mapped[float | None] = mapped_column(Float)
    cut_at: Mapped[float | None] = mapped_column(Float)
    throttles: Mapped[int] = mapped_column(Integer, default=0)


class RelayUsage(Base):
    """Messages handed to a relay per minute: the rolling hour and day windows."""

    __tablename__ = "relay_usage"
    relay: Mapped[str] = mapped_column(String(300), primary_key=True)
    minute: Mapped[int] = mapped_column(Integer, primary_key=True)  # epoch seconds // 60
    count: Mapped[int] = mapped_column(Integer, default=0)


class LeaderLease(Base):
    """Which ``digest run`` schedules: one row per role, renewed by its holder."""

    __tablename__ = "leader_lease"
    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    leader_id: Mapped[str] = mapped_column(String(200))
    elected_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)


class ScheduledFire(Base):
    """One firing of a scheduled job: the unique (job, slot) makes every firing happen once."""

    __tablename__ = "scheduled_fires"
    __table_args__ = (UniqueConstraint("job", "slot"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    job: Mapped[str] = mapped_column(String(100))
    slot: Mapped[datetime] = mapped_column(UTCDateTime)
    edition_date: Mapped[date] = mapped_column(Date)
    fired_at: Mapped[datetime] = mapped_column(UTCDateTime)
    fired_by: Mapped[str] = mapped_column(String(200))
