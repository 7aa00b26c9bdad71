"""An issue from its selection to its mail: the sections it carries (frozen once built,
planned before), building it once per date, the context its templates need, the
per-subscriber Message-ID and signed links, and :class:`Editions` (each region set's
rendering, made once and reused).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime

from sqlalchemy.orm import Session

from digest import store
from digest.app import App
from digest.config import Config
from digest.errors import NothingToSend
from digest.models import Article, Issue
from digest.render import IssueContext, MessageTemplate, Renderer
from digest.select import Section, edition_key, edition_sections, select_sections, window
from digest.tokens import MessageTags, TokenSigner


def frozen_sections(session: Session, config: Config, issue: Issue) -> list[Section[Article]]:
    """The sections an issue was frozen with, in order, region sections marked as such."""
    regions = {r.casefold() for r in config.newsletter.regions}
    return [
        Section(name, articles, is_region=name.casefold() in regions)
        for name, articles in store.issue_sections(session, issue.id)
    ]


def plan_sections(session: Session, config: Config, edition_date: date) -> list[Section[Article]]:
    """What the round-up for ``edition_date`` would carry if it were built now."""
    nl = config.newsletter
    start, end = window(edition_date, config.schedule.tz, nl.lookback_days)
    candidates = store.candidate_articles(session, start, end, edition_date)
    return select_sections(candidates, nl.regions, nl.catch_all, nl.max_per_region)


def nothing_to_send(config: Config, edition_date: date) -> NothingToSend:
    """The error for a date whose window holds no new article, naming the window."""
    start, end = window(edition_date, config.schedule.tz, config.newsletter.lookback_days)
    tz = config.schedule.tz
    return NothingToSend(
        f"no new articles published between {start.astimezone(tz):%Y-%m-%d %H:%M} and "
        f"{end.astimezone(tz):%Y-%m-%d %H:%M} ({config.schedule.timezone}); "
        "run `digest fetch` first, or check [[feeds]]"
    )


def issue_sections(
    session: Session, config: Config, edition_date: date
) -> tuple[Issue | None, list[Section[Article]]]:
    """The frozen sections when the issue exists, else the planned ones (nothing written)."""
    issue = store.issue_for_date(session, edition_date)
    if issue is not None:
        return issue, frozen_sections(session, config, issue)
    return None, plan_sections(session, config, edition_date)


@dataclass(frozen=True)
class Fire:
    """A scheduled firing: its (job, slot) row makes it happen once across all runners."""

    job: str
    slot: datetime
    by: str


class AlreadyFired(Exception):
    """The scheduled firing being built was made already (by another runner)."""


def build_issue(
    app: App, renderer: Renderer, edition_date: date, fire: Fire | None = None
) -> tuple[Issue, list[Section[Article]]]:
    """Freeze the selection for ``edition_date`` once; later calls return the same issue.

    With ``fire``, its (job, slot) row is written in the same transaction; when that
    firing happened already, :class:`AlreadyFired` is raised and nothing is written.
    """
    with app.sessions() as session:
        if fire is not None and not store.record_fire(
            session, fire.job, fire.slot, edition_date, datetime.now(UTC), fire.by
        ):
            raise AlreadyFired(fire.job)
        issue, sections = issue_sections(session, app.config, edition_date)
        if issue is not None:
            session.commit()
            return issue, sections
        if not sections:
            raise nothing_to_send(app.config, edition_date)
        ctx = renderer.context(IssueContext(edition_date, None), sections)
        issue = store.create_issue(
            session,
            edition_date,
            renderer.subject(ctx),
            [(s.name, [a.id for a in s.articles]) for s in sections],
            datetime.now(UTC),
        )
        session.commit()
        return issue, frozen_sections(session, app.config, issue)


def preferences_signer(config: Config) -> TokenSigner:
    """Signs the per-subscriber "Choose your regions" links (``/preferences/{token}``)."""
    return TokenSigner(
        config.unsubscribe_secret, config.unsubscribe_old_secrets, purpose="preferences"
    )


def issue_context(edition_date: date, issue: Issue | None) -> IssueContext:
    """What the templates need of the issue, the editor's lead and note included."""
    if issue is None:
        return IssueContext(edition_date, None)
    return IssueContext(edition_date, issue.id, issue.lead_article_id, issue.note)


def message_tags(config: Config) -> MessageTags:
    """The tags that mark our Message-IDs (see :class:`digest.tokens.MessageTags`)."""
    return MessageTags(config.unsubscribe_secret, config.unsubscribe_old_secrets)


def message_id(issue: Issue, subscriber_id: int, domain: str, tags: MessageTags) -> str:
    """The stable Message-ID of one (issue, subscriber): a re-send collapses into the first.

    It carries an HMAC tag, so a bounce report quoting it provably concerns a message we
    sent (``bounces.py`` ignores reports about ids without a valid tag). The ledger keeps
    the id of the first attempt, and a resumed send reuses that stored id.
    """
    local = f"{issue.edition_date:%Y%m%d}.{issue.id}.{subscriber_id}"
    return f"<{local}.{tags.tag(local)}.digest@{domain}>"


class Editions:
    """Each distinct region set's edition, rendered on first use and then reused."""

    def __init__(
        self,
        config: Config,
        renderer: Renderer,
        issue_ctx: IssueContext,
        sections: Sequence[Section[Article]],
    ) -> None:
        self._config = config
        self._renderer = renderer
        self._ctx = issue_ctx
        self._sections = sections
        self._cache: dict[tuple[str, ...] | None, MessageTemplate | None] = {}

    def for_regions(self, regions: Sequence[str] | None) -> MessageTemplate | None:
        """The edition for a subscriber's regions; None when it would be empty."""
        key = edition_key(regions, self._config.newsletter.regions)
        if key not in self._cache:
            chosen = edition_sections(self._sections, key)
            self._cache[key] = self._renderer.edition(self._ctx, chosen, key) if chosen else None
        return self._cache[key]

    def refresh(self, issue_ctx: IssueContext, sections: Sequence[Section[Article]]) -> None:
        """Use the issue as it stands now (before anything was rendered)."""
        assert not self._cache, "an edition was rendered already"
        self._ctx, self._sections = issue_ctx, sections

    @property
    def rendered(self) -> int:
        """How many non-empty editions were rendered."""
        return sum(1 for t in self._cache.values() if t is not None)
