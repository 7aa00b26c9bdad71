"""Queries of the article store: feeds' stored validators, and articles by link, by id and
by publication window.
"""

from __future__ import annotations

from datetime import date, datetime

from sqlalchemy import exists, func, or_, select
from sqlalchemy.orm import Session

from digest.models import Article, FeedState, Issue, IssueArticle, IssueStatus, MissedSend


def feed_state(session: Session, url: str) -> FeedState:
    """The stored validators of a feed, created on first use."""
    state = session.scalar(select(FeedState).where(FeedState.url == url))
    if state is None:
        state = FeedState(url=url)
        session.add(state)
    return state


def find_article(session: Session, link: str, guid: str | None) -> Article | None:
    """The stored article with this canonical link or (when given) this guid."""
    cond = Article.link == link
    if guid:
        cond = or_(cond, Article.guid == guid)
    return session.scalars(select(Article).where(cond).order_by(Article.id).limit(1)).first()


def candidate_articles(
    session: Session, start: datetime, end: datetime, before_date: date
) -> list[Article]:
    """Articles published in [start, end) that no other issue carries, unless that issue's
    scheduled send was recorded as missed (its articles are free again).

    Not only sent issues count: an unsent one is on its way (an editor's draft, a send
    to be finished), and an editor may pull a later week's article into it (``digest
    issue include``); a draft built before it goes out must not carry that article a
    second time. Only an editor's explicit include puts an article into two issues, and
    ``include`` says so.
    """
    missed = exists().where(MissedSend.edition_date == Issue.edition_date)
    in_other_issue = exists().where(
        IssueArticle.article_id == Article.id,
        IssueArticle.issue_id == Issue.id,
        Issue.edition_date != before_date,
        or_(Issue.status.in_([IssueStatus.SENDING, IssueStatus.SENT]), ~missed),
    )
    stmt = (
        select(Article)
        .where(Article.published_at >= start, Article.published_at < end, ~in_other_issue)
        .order_by(Article.published_at.desc(), Article.id.desc())
    )
    return list(session.scalars(stmt))


def article_count(session: Session) -> int:
    """How many articles the store holds."""
    return session.scalar(select(func.count(Article.id))) or 0


def article_by_id(session: Session, article_id: int) -> Article | None:
    """One stored article by id."""
    return session.get(Article, article_id)
