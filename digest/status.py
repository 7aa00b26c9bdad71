"""What ``digest status`` and ``digest deliveries --failed`` report: recent issues with
their delivery counts, the subscriber list, missed sends, a paused relay quota, and the
failed deliveries with the server's reply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime

from digest import store
from digest.app import App
from digest.editorial import display_status
from digest.models import IssueStatus
from digest.ratelimit import Limits, Pause, pause_line, relay_key, window_pause


@dataclass
class IssueStatusRow:
    """One line of ``digest status``."""

    edition_date: date
    status: str
    subject: str
    counts: dict[str, int]


@dataclass
class StatusReport:
    """Recent issues and the subscriber list at a glance."""

    issues: list[IssueStatusRow]
    subscribers: dict[str, int]
    articles: int
    missed: list[date] = field(default_factory=list)
    paused: Pause | None = None  # the relay's hour/day quota is full right now
    pending: int = 0  # rows still to send in issues not completely sent
    paused_line: str | None = None  # how ``status`` says so


def has_open_issue(app: App, edition_date: date) -> bool:
    """True when the issue of that date exists and is not completely sent."""
    with app.sessions() as session:
        return bool(store.open_issues(session, edition_date))


def record_missed(app: App, edition_date: date, scheduled_at: datetime) -> None:
    """Record a missed scheduled send (shown by ``status``)."""
    with app.sessions() as session:
        store.record_missed_send(session, edition_date, scheduled_at, datetime.now(UTC))
        session.commit()


@dataclass
class FailedRow:
    """One failed delivery, for ``digest deliveries --failed``."""

    edition_date: date
    email: str
    attempts: int
    error: str


def failed_deliveries(app: App, edition_date: date | None) -> list[FailedRow]:
    """Failed deliveries (of one edition, or all), with the server's reply."""
    with app.sessions() as session:
        issue_id = None
        if edition_date is not None:
            issue = store.issue_for_date(session, edition_date)
            if issue is None:
                return []
            issue_id = issue.id
        return [
            FailedRow(i.edition_date, s.email, d.attempts, d.last_error or "")
            for i, s, d in store.failed_deliveries(session, issue_id)
        ]


def status(app: App, limit: int = 10) -> StatusReport:
    """Recent issues with their delivery counts, and subscriber counts."""
    with app.sessions() as session:
        missed_dates = {m.edition_date for m in store.missed_sends(session, limit)}
        rows = [
            IssueStatusRow(
                i.edition_date,
                display_status(app.config, i, i.edition_date in missed_dates),
                i.subject,
                store.delivery_counts(session, i.id),
            )
            for i in store.recent_issues(session, limit)
        ]
        built = {r.edition_date for r in rows}
        missed = sorted((d for d in missed_dates if d not in built), reverse=True)
        report = StatusReport(
            rows, store.subscriber_counts(session), store.article_count(session), missed
        )
    report.pending = sum(
        r.counts["pending"] + r.counts["sending"] for r in rows if r.status != IssueStatus.SENT
    )
    limits = Limits.from_config(app.config.smtp)
    if limits.windowed:
        with app.engine.connect() as conn:
            report.paused = window_pause(conn, relay_key(app.config.smtp), limits)
    if report.paused is not None:
        p = report.paused
        tz = app.config.schedule.tz
        report.paused_line = pause_line(p.window, p.limit, report.pending, p.resumes_at, tz)
    return report
