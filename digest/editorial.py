"""The editor's week: drafts, curation edits, approval and test copies.

An issue is frozen (``issue_articles``) when its draft is built or its send starts; from
then until its first message leaves, editors may change it:

* **Curation** edits the frozen selection: choose the lead story, exclude, include (any
  stored article), move between sections, write a note, or reset to what the rules pick.
  Each edit is a pure function over the selection (``[(section, [article ids])]``); this
  module loads it, applies the function and stores the result.
* **Approval** (``[editorial] approval = "required"``): ``send`` refuses an issue nobody
  approved (:func:`check_approval`). Any edit withdraws the approval, so what was approved
  is what is sent.
* **Final once sent.** When any message of the issue may have reached a reader, every
  edit is refused (:class:`~digest.errors.EditRefused`). Edits take the issue's send lock,
  so an edit and a send never interleave.
* **Test copies** go to a few addresses with the bytes of the real send, apart from the
  recipient, the tokens, the Message-ID and a ``[TEST] `` subject prefix, and write
  nothing to the ledger.
"""

from __future__ import annotations

import asyncio
import enum
import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime

from sqlalchemy.orm import Session

from digest import issues, store
from digest.app import App, today
from digest.config import Config
from digest.dkimsign import load_signer
from digest.errors import (
    AwaitingApproval,
    DeliveryError,
    EditRefused,
    NothingToSend,
    SendInProgress,
    SMTPUnavailableError,
    UsageError,
)
from digest.models import Article, Issue, IssueStatus
from digest.note import check_note
from digest.render import Recipient, Renderer
from digest.select import Section
from digest.send import TransportFactory, transport_factory
from digest.tokens import TokenSigner

MAX_TEST_ADDRESSES = 10
TEST_PREFIX = "[TEST] "

Selection = list[tuple[str, list[int]]]


class EditorialStatus(enum.StrEnum):
    """Where an issue stands, as editors see it."""

    DRAFT = "draft"
    APPROVED = "approved"
    SENDING = "sending"
    SENT = "sent"


def status_of(issue: Issue) -> EditorialStatus:
    """``draft`` or ``approved`` until the send starts, then ``sending`` and ``sent``."""
    if issue.status == IssueStatus.SENT:
        return EditorialStatus.SENT
    if issue.status == IssueStatus.SENDING:
        return EditorialStatus.SENDING
    return EditorialStatus.APPROVED if issue.approved_at else EditorialStatus.DRAFT


def display_status(config: Config, issue: Issue, missed: bool = False) -> str:
    """The status ``digest status`` prints: ``awaiting approval`` where it applies."""
    status = status_of(issue)
    if issue.status == IssueStatus.READY and missed:
        return "missed"
    if status == EditorialStatus.DRAFT and config.editorial.approval == "required":
        return "awaiting approval"
    return str(status)


def awaiting_approval(config: Config, session: Session, issue: Issue) -> bool:
    """True when approval is required, missing, and the send has not started."""
    return (
        config.editorial.approval == "required"
        and issue.approved_at is None
        and issue.status == IssueStatus.READY
        and not store.messages_out(session, issue.id)
    )


def check_approval(app: App, issue: Issue) -> None:
    """Raise :class:`AwaitingApproval` when ``send`` must not send ``issue`` yet.

    An issue whose send has started is finished whatever the setting says now.
    """
    with app.sessions() as session:
        if awaiting_approval(app.config, session, issue):
            raise _awaits(issue.edition_date)


def _awaits(d: date) -> AwaitingApproval:
    return AwaitingApproval(f"issue {d} awaits approval: digest issue approve --date {d}")


def recheck_approval(config: Config, checked: Issue, fresh: Issue) -> None:
    """Raise :class:`AwaitingApproval` when the approval a send passed its gate with
    (``checked``: the issue as :func:`check_approval` saw it) is gone from ``fresh`` (the
    issue read again under its row lock once the send's first claim is in).

    On PostgreSQL nothing locks an issue between the gate and that claim, so an edit
    (which withdraws the approval) or ``issue unapprove`` may commit in between; the
    sender would then send an issue nobody approved. No message has left at that point.
    """
    if (
        config.editorial.approval == "required"
        and checked.approved_at is not None
        and fresh.approved_at is None
    ):
        raise _awaits(fresh.edition_date)


def waiting_for_approval(app: App, edition_date: date) -> bool:
    """True when the issue of that date exists and :func:`check_approval` would refuse it."""
    with app.sessions() as session:
        issue = store.issue_for_date(session, edition_date)
        return issue is not None and awaiting_approval(app.config, session, issue)


def unstarted(app: App, edition_date: date) -> bool:
    """True when the issue of that date exists and none of its messages has left."""
    with app.sessions() as session:
        issue = store.issue_for_date(session, edition_date)
        return (
            issue is not None
            and issue.status == IssueStatus.READY
            and not store.messages_out(session, issue.id)
        )


def is_missed(app: App, edition_date: date) -> bool:
    """True when the scheduled send of that date was recorded as missed."""
    with app.sessions() as session:
        return store.is_missed(session, edition_date)


# --- reading ------------------------------------------------------------------------------


@dataclass
class IssueView:
    """An issue as ``digest issue show`` prints it."""

    edition_date: date
    status: EditorialStatus
    subject: str
    lead: int | None
    note: str | None
    sections: list[Section[Article]]
    approved_at: datetime | None = None
    approved_by: str | None = None
    opening: Article | None = None  # the story the round-up opens with (lead or rules')

    def as_json(self) -> dict[str, object]:
        """The ``--json`` form."""
        return {
            "date": self.edition_date.isoformat(),
            "status": str(self.status),
            "subject": self.subject,
            "lead": self.lead,
            "note": self.note,
            "sections": [
                {
                    "name": s.name,
                    "articles": [{"id": a.id, "title": a.title, "url": a.link} for a in s.articles],
                }
                for s in self.sections
            ],
        }


def _view(session: Session, config: Config, issue: Issue) -> IssueView:
    sections = issues.frozen_sections(session, config, issue)
    lead = next((a for s in sections for a in s.articles if a.id == issue.lead_article_id), None)
    opening = lead or next((s.articles[0] for s in sections if s.articles), None)
    return IssueView(
        issue.edition_date,
        status_of(issue),
        issue.subject,
        issue.lead_article_id,
        issue.note,
        sections,
        issue.approved_at,
        issue.approved_by,
        opening,
    )


def next_send_date(config: Config, now: datetime | None = None) -> date:
    """The date of the next ``send_cron`` firing at or after ``now``."""
    trigger = config.schedule.cron_trigger()
    fire = trigger.get_next_fire_time(None, now or datetime.now(UTC))
    return (fire or now or datetime.now(UTC)).astimezone(config.schedule.tz).date()


def default_date(app: App) -> date:
    """The next issue not yet sent (from today on), for commands given no ``--date``."""
    from_date = today(app.config)
    with app.sessions() as session:
        issue = store.next_unsent_issue(session, from_date)
    if issue is None:
        raise UsageError(
            f"no unsent issue from {from_date} on: build one with `digest draft --date D`, "
            "or pass --date"
        )
    return issue.edition_date


def working_date(app: App) -> date:
    """The issue editors are working on: the next one not yet sent (from today on), else
    today (the rules' selection). What ``preview`` and ``send --test`` show without
    ``--date``: a test copy of anything but the draft would show the editor the wrong issue.
    """
    from_date = today(app.config)
    with app.sessions() as session:
        issue = store.next_unsent_issue(session, from_date)
    return from_date if issue is None else issue.edition_date


def _no_issue(edition_date: date) -> UsageError:
    return UsageError(
        f"no issue for {edition_date}: build its draft with `digest draft --date {edition_date}`"
    )


def show(app: App, edition_date: date) -> IssueView:
    """The issue of ``edition_date``; :class:`UsageError` when it was never built."""
    with app.sessions() as session:
        issue = store.issue_for_date(session, edition_date)
        if issue is None:
            raise _no_issue(edition_date)
        return _view(session, app.config, issue)


def build_draft(app: App, edition_date: date) -> tuple[IssueView, bool]:
    """Freeze the issue of ``edition_date`` now, by the rules (once); True if built now."""
    with app.sessions() as session:
        existed = store.issue_for_date(session, edition_date) is not None
    issue, _ = issues.build_issue(app, Renderer(app.config), edition_date)
    with app.sessions() as session:
        return _view(session, app.config, session.merge(issue)), not existed


# --- editing ------------------------------------------------------------------------------


@dataclass
class EditResult:
    """What an edit did, in a sentence, and the issue after it."""

    message: str
    view: IssueView
    withdrew_approval: bool = False
    notes: list[str] = field(default_factory=list)


@contextmanager
def _editable(app: App, edition_date: date) -> Iterator[tuple[Session, Issue]]:
    """The issue in a session, under its send lock; refused once a message has left."""
    try:
        with (
            store.exclusive_lock(app.engine, f"send:{edition_date.isoformat()}"),
            app.sessions() as session,
        ):
            issue = store.issue_for_date(session, edition_date)
            if issue is None:
                raise _no_issue(edition_date)
            # Senders lock this row too before they add deliveries; with it held, no send
            # can start between the check below and the commit of the edit.
            store.lock_issue(session, issue.id)
            session.refresh(issue)
            out = store.messages_out(session, issue.id)
            if out or issue.status != IssueStatus.READY:
                raise EditRefused(
                    f"issue {edition_date} can no longer be changed: its sending has "
                    f"started ({out} messages out), so readers already have it"
                )
            yield session, issue
    except SendInProgress:
        raise EditRefused(
            f"issue {edition_date} is being sent right now: it can no longer be changed"
        ) from None


def _selection(session: Session, issue: Issue) -> Selection:
    return [(name, [a.id for a in arts]) for name, arts in store.issue_sections(session, issue.id)]


def _locate(selection: Selection, article_id: int) -> tuple[str, int] | None:
    for name, ids in selection:
        if article_id in ids:
            return name, ids.index(article_id)
    return None


def _section_order(config: Config) -> list[str]:
    nl = config.newsletter
    return [*nl.regions, *([nl.catch_all] if nl.catch_all else [])]


def _section_name(config: Config, region: str) -> str:
    """The configured spelling of a section named on the command line."""
    for name in _section_order(config):
        if name.casefold() == region.strip().casefold():
            return name
    raise UsageError(
        f"--region {region!r} is not a section of this newsletter; use one of: "
        + ", ".join(_section_order(config))
    )


def _tidy(config: Config, selection: Selection) -> Selection:
    """Sections in the configured order (unknown ones keep theirs, after), none empty."""
    order = {n.casefold(): i for i, n in enumerate(_section_order(config))}
    kept = [(n, ids) for n, ids in selection if ids]
    return sorted(kept, key=lambda s: order.get(s[0].casefold(), len(order)))


def _commit_edit(
    app: App,
    session: Session,
    issue: Issue,
    message: str,
    selection: Selection | None = None,
    notes: Sequence[str] = (),
) -> EditResult:
    """Store the edit, recompute the subject, withdraw any approval."""
    config = app.config
    if selection is not None:
        store.replace_issue_articles(session, issue.id, _tidy(config, selection))
        session.flush()
    sections = issues.frozen_sections(session, config, issue)
    if issue.lead_article_id is not None and not any(
        a.id == issue.lead_article_id for s in sections for a in s.articles
    ):
        issue.lead_article_id = None
    renderer = Renderer(config)
    ctx = issues.issue_context(issue.edition_date, issue)
    issue.subject = renderer.subject(renderer.context(ctx, sections))
    withdrew = issue.approved_at is not None
    issue.approved_at = None
    issue.approved_by = None
    session.commit()
    return EditResult(message, _view(session, config, issue), withdrew, list(notes))


def _need_in_issue(selection: Selection, article_id: int, edition_date: date) -> tuple[str, int]:
    where = _locate(selection, article_id)
    if where is None:
        raise UsageError(
            f"article {article_id} is not in the issue of {edition_date}; "
            f"`digest issue show --date {edition_date}` lists its articles"
        )
    return where


def set_lead(app: App, edition_date: date, article_id: int | None) -> EditResult:
    """Make ``article_id`` (already in the issue) the lead story; None: the rules decide."""
    with _editable(app, edition_date) as (session, issue):
        if article_id is not None:
            _need_in_issue(_selection(session, issue), article_id, edition_date)
        issue.lead_article_id = article_id
        what = (
            f"article {article_id} leads the round-up"
            if article_id
            else "lead cleared: the round-up opens with the rules' first article"
        )
        return _commit_edit(app, session, issue, f"{edition_date}: {what}")


def exclude(app: App, edition_date: date, article_id: int) -> EditResult:
    """Take an article out of the issue."""
    with _editable(app, edition_date) as (session, issue):
        selection = _selection(session, issue)
        name, pos = _need_in_issue(selection, article_id, edition_date)
        if sum(len(ids) for _, ids in selection) == 1:
            raise UsageError(
                f"article {article_id} is the last one of the issue of {edition_date}; "
                "include another first"
            )
        for section, ids in selection:
            if section == name:
                del ids[pos]
        return _commit_edit(
            app, session, issue, f"{edition_date}: article {article_id} excluded", selection
        )


def _home_section(config: Config, article: Article) -> str:
    """The section the rules would give an article (select.py's first-match rule)."""
    tags = {c.strip().casefold() for c in article.categories}
    for region in config.newsletter.regions:
        if region.casefold() in tags:
            return region
    if config.newsletter.catch_all:
        return config.newsletter.catch_all
    raise UsageError(
        f"article {article.id} matches no region (its categories: "
        f"{', '.join(article.categories) or 'none'}) and catch_all is off; pass --region"
    )


def include(app: App, edition_date: date, article_id: int, region: str | None = None) -> EditResult:
    """Add any stored article (older ones too), last in ``region`` or its own section."""
    config = app.config
    with _editable(app, edition_date) as (session, issue):
        article = store.article_by_id(session, article_id)
        if article is None:
            raise UsageError(f"no stored article has id {article_id}")
        selection = _selection(session, issue)
        where = _locate(selection, article_id)
        if where is not None:
            raise UsageError(
                f"article {article_id} is already in the issue, under {where[0]}; "
                "use `digest issue move` to move it"
            )
        name = _section_name(config, region) if region else _home_section(config, article)
        for section, ids in selection:
            if section.casefold() == name.casefold():
                ids.append(article_id)
                break
        else:
            selection.append((name, [article_id]))
        notes = []
        for other, state in store.issues_with_article(session, article_id, edition_date):
            if state == IssueStatus.READY:
                notes.append(
                    f"article {article_id} is also in the issue of {other} (draft): readers "
                    "of both get it twice unless you exclude it from one"
                )
            else:
                notes.append(
                    f"article {article_id} was already in the round-up of {other} ({state}): "
                    "readers of both get it twice unless you exclude it"
                )
        return _commit_edit(
            app,
            session,
            issue,
            f"{edition_date}: article {article_id} included under {name}",
            selection,
            notes,
        )


def move(
    app: App,
    edition_date: date,
    article_id: int,
    region: str,
    position: int | None = None,
) -> EditResult:
    """Move an article of the issue to ``region``, at ``position`` (from 1) or last."""
    config = app.config
    with _editable(app, edition_date) as (session, issue):
        selection = _selection(session, issue)
        old, pos = _need_in_issue(selection, article_id, edition_date)
        name = _section_name(config, region)
        for section, ids in selection:
            if section == old:
                del ids[pos]
        target = next((ids for s, ids in selection if s.casefold() == name.casefold()), None)
        if target is None:
            target = []
            selection.append((name, target))
        if position is None:
            position = len(target) + 1
        if not 1 <= position <= len(target) + 1:
            raise UsageError(
                f"--position {position}: {name} would have {len(target) + 1} articles; "
                f"use 1 to {len(target) + 1}"
            )
        target.insert(position - 1, article_id)
        return _commit_edit(
            app,
            session,
            issue,
            f"{edition_date}: article {article_id} moved to {name}, position {position}",
            selection,
        )


def set_note(app: App, edition_date: date, text: str | None) -> EditResult:
    """Set (Markdown) or clear (None or blank) the editor's note."""
    note = check_note(text) if text is not None else ""
    with _editable(app, edition_date) as (session, issue):
        issue.note = note or None
        what = f"note set ({len(note):,} characters)" if note else "note cleared"
        return _commit_edit(app, session, issue, f"{edition_date}: {what}")


def reset(app: App, edition_date: date) -> EditResult:
    """Select again by the rules, dropping curation and the lead; the note is kept."""
    config = app.config
    with _editable(app, edition_date) as (session, issue):
        sections = issues.plan_sections(session, config, edition_date)
        if not sections:
            raise issues.nothing_to_send(config, edition_date)
        issue.lead_article_id = None
        selection = [(s.name, [a.id for a in s.articles]) for s in sections]
        kept = " (the note is kept: `digest issue note --clear` removes it)" if issue.note else ""
        return _commit_edit(
            app,
            session,
            issue,
            f"{edition_date}: selected again by the rules{kept}",
            selection,
        )


def approve(app: App, edition_date: date, by: str) -> EditResult:
    """Approve the issue as it stands (idempotent)."""
    with _editable(app, edition_date) as (session, issue):
        if issue.approved_at is not None:
            message = (
                f"{edition_date}: already approved by {issue.approved_by} at "
                f"{issue.approved_at:%Y-%m-%d %H:%M} UTC"
            )
        else:
            issue.approved_at = datetime.now(UTC)
            issue.approved_by = by
            session.commit()
            message = f"{edition_date}: approved by {by}"
        return EditResult(message, _view(session, app.config, issue))


def unapprove(app: App, edition_date: date) -> EditResult:
    """Withdraw the approval (idempotent)."""
    with _editable(app, edition_date) as (session, issue):
        was = issue.approved_at is not None
        issue.approved_at = None
        issue.approved_by = None
        session.commit()
        message = f"{edition_date}: approval withdrawn" if was else f"{edition_date}: not approved"
        return EditResult(message, _view(session, app.config, issue), was)


# --- test copies --------------------------------------------------------------------------


@dataclass
class SentCopy:
    """One test copy: to whom, and the server's reply or the error."""

    address: str
    ok: bool
    reply: str
    message_id: str


def copy_addresses(addresses: Sequence[str]) -> list[str]:
    """Validated, normalized, de-duplicated addresses; at most :data:`MAX_TEST_ADDRESSES`."""
    from digest.addresses import unique_addresses

    try:
        out = unique_addresses(addresses)
    except ValueError as exc:
        raise UsageError(f"--test {exc}") from None
    if not out:
        raise UsageError("--test needs at least one address: digest send --test you@example.org")
    if len(out) > MAX_TEST_ADDRESSES:
        raise UsageError(
            f"--test takes at most {MAX_TEST_ADDRESSES} addresses at a time (got {len(out)})"
        )
    return out


def copy_messages(
    app: App, edition_date: date, addresses: Sequence[str]
) -> list[tuple[str, bytes, str]]:
    """(address, bytes, Message-ID) of each test copy; nothing is written.

    The issue as frozen (or, before its draft exists, as the rules would pick it now), in
    the edition of a subscriber with every region: the real send's bytes but for the
    recipient, its tokens, the Message-ID and the subject prefix.
    """
    config = app.config
    renderer = Renderer(config)
    with app.sessions() as session:
        issue, sections = issues.issue_sections(session, config, edition_date)
        if not sections:
            raise issues.nothing_to_send(config, edition_date)
        subscribers = store.subscribers_by_email(session, list(addresses))
    ctx = issues.issue_context(edition_date, issue)
    template = renderer.edition(ctx, sections, None, subject_prefix=TEST_PREFIX)
    signer = TokenSigner(config.unsubscribe_secret, config.unsubscribe_old_secrets)
    prefs = issues.preferences_signer(config)
    base = config.unsubscribe.base_url
    dkim = load_signer(config.dkim)
    out = []
    for address in addresses:
        sub = subscribers.get(address)
        # Someone on the list gets their own working links; anyone else links that
        # verify but match nobody (subscriber id 0 is never assigned).
        mid = f"<test.{edition_date:%Y%m%d}.{secrets.token_hex(8)}.digest@{renderer.domain}>"
        sub_id = sub.id if sub else 0
        rcpt = Recipient(
            address,
            sub.name if sub else "",
            signer.url(base, sub_id, address),
            mid,
            prefs.url(base, sub_id, address),
        )
        out.append((address, template.personalize(rcpt, dkim=dkim), mid))
    return out


def send_test_copies(
    app: App,
    edition_date: date,
    addresses: Sequence[str],
    transports: TransportFactory | None = None,
) -> list[SentCopy]:
    """Send a test copy of the issue to each address; the ledger is not touched.

    :class:`SMTPUnavailableError` when the server cannot be used at all; a refused
    address is reported in its :class:`SentCopy`.
    """
    messages = copy_messages(app, edition_date, copy_addresses(addresses))
    # The configured transport, as for the real send: [outbox] catches test copies too.
    factory = transports or transport_factory(app.config)
    sender = Renderer(app.config).envelope_from

    async def deliver() -> list[SentCopy]:
        transport = factory()
        results = []
        try:
            for address, raw, mid in messages:
                try:
                    reply = await transport.send(sender, address, raw)
                    results.append(SentCopy(address, True, reply, mid))
                except SMTPUnavailableError:
                    raise
                except DeliveryError as exc:
                    results.append(SentCopy(address, False, str(exc), mid))
        finally:
            await transport.close()
        return results

    return asyncio.run(deliver())


def draft_and_copy(app: App, edition_date: date) -> tuple[IssueView, list[SentCopy]]:
    """The scheduler's draft job: freeze the draft, send a test copy to every editor."""
    view, _ = build_draft(app, edition_date)
    editors = app.config.editorial.editors
    if not editors or view.status in (EditorialStatus.SENDING, EditorialStatus.SENT):
        return view, []
    try:
        return view, send_test_copies(app, edition_date, editors)
    except NothingToSend:
        return view, []
