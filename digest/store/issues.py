"""Queries of issues: freezing a selection, its sections, the editor's edits of them, the
issue's status on its way ready → sending → sent, and the published archive.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime

from sqlalchemy import and_, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from digest.models import Article, Delivery, DeliveryStatus, Issue, IssueArticle, IssueStatus


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


def issues_with_article(
    session: Session, article_id: int, edition_date: date
) -> list[tuple[date, IssueStatus]]:
    """The other issues (date, status) that carry this article, latest first."""
    rows = session.execute(
        select(Issue.edition_date, Issue.status)
        .join(IssueArticle, IssueArticle.issue_id == Issue.id)
        .where(IssueArticle.article_id == article_id, Issue.edition_date != edition_date)
        .order_by(Issue.edition_date.desc())
    )
    return [(d, IssueStatus(s)) for d, s in rows]


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


def recent_issues(session: Session, limit: int = 10) -> list[Issue]:
    """The newest issues first."""
    return list(session.scalars(select(Issue).order_by(Issue.edition_date.desc()).limit(limit)))


def open_issues(session: Session, edition_date: date) -> list[Issue]:
    """Issues of ``edition_date`` whose sending is not finished."""
    return list(
        session.scalars(
            select(Issue).where(
                Issue.edition_date == edition_date, Issue.status != IssueStatus.SENT
            )
        )
    )


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
