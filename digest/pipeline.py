"""The jobs digest runs, composed from the stages: init, fetch, build, preview, send, status.

This is the one place that wires config, store, select, render, tokens and the send
engine together; the CLI and the scheduler call these functions and nothing below them.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import signal
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from email.message import EmailMessage
from typing import Literal

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from digest import ingest, store
from digest.config import Config
from digest.dkimsign import DKIMSigner, load_signer
from digest.errors import DigestError, NothingToSend, UsageError
from digest.ledger import Claimed, Ledger
from digest.models import Article, DeliveryStatus, Issue, IssueStatus
from digest.ratelimit import (
    Limits,
    Pause,
    RelayLimiter,
    pause_line,
    relay_key,
    window_pause,
)
from digest.render import IssueContext, MessageTemplate, Recipient, Renderer
from digest.select import Section, edition_key, edition_sections, select_sections, window
from digest.send import (
    Outcome,
    Outgoing,
    RetryPolicy,
    SendEngine,
    SendStats,
    TransportFactory,
    transport_factory,
)
from digest.tokens import MessageTags, TokenSigner

# Three hard bounces in a row and we stop mailing an address: mailbox providers read
# repeated sends to dead addresses as a spammer's sign.
BOUNCE_THRESHOLD = 3
PERSONALIZE_CHUNK = 64


@dataclass
class App:
    """The composed pieces one command needs."""

    config: Config
    engine: Engine
    sessions: sessionmaker[Session]


def open_app(config: Config, *, check_schema: bool = True) -> App:
    """Open the database named by the config (checking it is initialised)."""
    engine = store.open_engine(config.database.url)
    if check_schema:
        store.check_schema(engine)
    return App(config, engine, store.session_factory(engine))


def init_db(config: Config) -> str:
    """Create or upgrade the schema; return the revision now in place."""
    engine = store.open_engine(config.database.url)
    try:
        return store.migrate(engine)
    finally:
        engine.dispose()


def today(config: Config) -> date:
    """Today's date in the schedule's time zone (the default edition date)."""
    return datetime.now(config.schedule.tz).date()


def fetch(
    app: App,
    now: datetime | None = None,
    progress: Callable[[ingest.FeedReport], None] | None = None,
) -> ingest.FetchReport:
    """Pull every configured feed into the article store."""
    return ingest.fetch_all(
        app.sessions, app.config.feeds, now or datetime.now(UTC), progress=progress
    )


# --- issues ----------------------------------------------------------------------------------


def _frozen_sections(session: Session, config: Config, issue: Issue) -> list[Section[Article]]:
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


def _nothing(config: Config, edition_date: date) -> NothingToSend:
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
        return issue, _frozen_sections(session, config, issue)
    return None, plan_sections(session, config, edition_date)


@dataclass(frozen=True)
class Fire:
    """A scheduled firing: its (job, slot) row makes it happen once across all runners."""

    job: str
    slot: datetime
    by: str


class _AlreadyFired(Exception):
    """The scheduled firing being built was made already (by another runner)."""


def build_issue(
    app: App, renderer: Renderer, edition_date: date, fire: Fire | None = None
) -> tuple[Issue, list[Section[Article]]]:
    """Freeze the selection for ``edition_date`` once; later calls return the same issue.

    With ``fire``, its (job, slot) row is written in the same transaction; when that
    firing happened already, :class:`_AlreadyFired` is raised and nothing is written.
    """
    with app.sessions() as session:
        if fire is not None and not store.record_fire(
            session, fire.job, fire.slot, edition_date, datetime.now(UTC), fire.by
        ):
            raise _AlreadyFired(fire.job)
        issue, sections = issue_sections(session, app.config, edition_date)
        if issue is not None:
            session.commit()
            return issue, sections
        if not sections:
            raise _nothing(app.config, edition_date)
        ctx = renderer.context(IssueContext(edition_date, None), sections)
        issue = store.create_issue(
            session,
            edition_date,
            renderer.subject(ctx),
            [(s.name, [a.id for a in s.articles]) for s in sections],
            datetime.now(UTC),
        )
        session.commit()
        return issue, _frozen_sections(session, app.config, issue)


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


# --- preview ---------------------------------------------------------------------------------


PreviewFormat = Literal["html", "text", "eml"]


def preview(
    app: App,
    edition_date: date,
    subscriber_email: str | None,
    fmt: PreviewFormat,
    regions: Sequence[str] | None = None,
) -> bytes:
    """Exactly what ``send`` would send for that date; writes nothing.

    Without a subscriber: the edition of ``regions`` (None: every section).
    """
    config = app.config
    renderer = Renderer(config)
    with app.sessions() as session:
        issue, sections = issue_sections(session, config, edition_date)
        if not sections:
            raise _nothing(config, edition_date)
        issue_ctx = issue_context(edition_date, issue)
        if subscriber_email is None:
            chosen = edition_sections(sections, edition_key(regions, config.newsletter.regions))
            if not chosen:
                raise NothingToSend(f"the edition of {', '.join(regions or [])} is empty")
            template = renderer.edition(issue_ctx, chosen)
            rcpt = Recipient(
                "reader@example.org",
                "",
                f"{config.unsubscribe.base_url}/unsubscribe/PREVIEW",
                f"<preview.{edition_date:%Y%m%d}@{renderer.domain}>",
                f"{config.unsubscribe.base_url}/preferences/PREVIEW",
            )
        else:
            from digest.subscribers import normalize_email

            try:
                addr = normalize_email(subscriber_email)
            except ValueError as exc:
                raise UsageError(f"--subscriber {subscriber_email!r}: {exc}") from None
            sub = store.subscriber_by_email(session, addr)
            if sub is None:
                raise UsageError(
                    f"--subscriber: no subscriber {addr}; see `digest subscribers list`"
                )
            chosen = edition_sections(sections, edition_key(sub.regions, config.newsletter.regions))
            if not chosen:
                raise NothingToSend(
                    f"{addr} gets no email for {edition_date}: none of their regions has articles"
                )
            template = renderer.edition(issue_ctx, chosen)
            signer = TokenSigner(config.unsubscribe_secret, config.unsubscribe_old_secrets)
            fake_issue = issue or Issue(id=0, edition_date=edition_date)
            rcpt = Recipient(
                sub.email,
                sub.name,
                signer.url(config.unsubscribe.base_url, sub.id, sub.email),
                message_id(fake_issue, sub.id, renderer.domain, message_tags(config)),
                preferences_signer(config).url(config.unsubscribe.base_url, sub.id, sub.email),
            )
    raw = template.personalize(rcpt, dkim=load_signer(config.dkim))
    if fmt == "eml":
        return raw
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    part = msg.get_body(("html",) if fmt == "html" else ("plain",))
    assert part is not None
    return str(part.get_content()).encode("utf-8")


# --- send --------------------------------------------------------------------------------------


@dataclass
class SendReport:
    """What ``send`` did for one date."""

    edition_date: date
    subject: str
    dry_run: bool
    new_deliveries: int = 0
    editions: int = 0
    would_send: int = 0
    stats: SendStats = field(default_factory=SendStats)
    counts: dict[str, int] = field(default_factory=dict)
    already_fired: bool = False  # a scheduled firing that another runner made already


def send(
    app: App,
    edition_date: date,
    *,
    dry_run: bool = False,
    transports: TransportFactory | None = None,
    progress: Callable[[SendStats], None] | None = None,
    stop: threading.Event | None = None,
    fire: Fire | None = None,
) -> SendReport:
    """Build (once) and send the round-up for ``edition_date`` to everyone not yet served.

    Every call is a worker: on PostgreSQL any number of them, on any hosts, share the
    issue's deliveries through leased claims (see ``ledger.py``); on SQLite they take
    turns. SIGTERM/SIGINT (in the main thread) or ``stop`` end the run early: messages
    in flight finish and are recorded, the rest stay pending for the next run. When the
    relay's hour/day quota is full the run pauses (``report.stats.paused``). With
    ``fire``, nothing happens if that firing already happened (``report.already_fired``).
    """
    config = app.config
    renderer = Renderer(config)
    if dry_run:
        return _dry_run(app, renderer, edition_date)
    signer = TokenSigner(config.unsubscribe_secret, config.unsubscribe_old_secrets)
    dkim = load_signer(config.dkim)
    with store.sqlite_turn(app.engine, f"send:{edition_date.isoformat()}"):
        try:
            issue, sections = build_issue(app, renderer, edition_date, fire)
        except _AlreadyFired:
            return SendReport(edition_date, "", dry_run=False, already_fired=True)
        from digest.editorial import check_approval  # editorial builds on this module

        check_approval(app, issue)
        report = SendReport(edition_date, issue.subject, dry_run=False)
        with app.sessions() as session:
            # One worker at a time adds the deliveries; the others wait a moment.
            store.lock_issue(session, issue.id)
            report.new_deliveries = store.create_deliveries(session, issue.id)
            if report.new_deliveries >= 1000:
                store.refresh_statistics(session)
            if app.engine.dialect.name != "postgresql":
                # SQLite: we hold the turn, so every claim left is a crashed run's.
                store.release_orphans(session, issue.id)
            gone = store.skip_unsubscribed(session, issue.id)
            session.commit()
            total = store.count_sendable(session, issue.id, datetime.now(UTC))
        editions = Editions(config, renderer, issue_context(edition_date, issue), sections)
        factory = transports or transport_factory(config)
        ledger = Ledger(app.engine, app.sessions, issue.id, config.send.lease_seconds, _bounce)
        try:
            report.stats = asyncio.run(
                _send_async(
                    app,
                    issue,
                    editions,
                    signer,
                    dkim,
                    renderer,
                    factory,
                    progress,
                    stop,
                    total,
                    ledger,
                )
            )
        finally:
            # Whatever happened, rows this worker claimed but never finished go back.
            counts, gone_since = _settle(app, issue, ledger)
        report.stats.skipped += gone + gone_since + ledger.gone
        report.editions = editions.rendered
        report.counts = counts
        return report


def _bounce(session: Session, delivery_id: int) -> None:
    store.count_hard_bounce(session, delivery_id, BOUNCE_THRESHOLD)


def _settle(app: App, issue: Issue, ledger: Ledger) -> tuple[dict[str, int], int]:
    """Release our unsent claims and mark the issue sent once nothing is left open.

    Returns the ledger counts and how many rows were skipped here: readers who left the
    list while the run was going (a one-click unsubscribe mid-send) are never claimed,
    and leaving their rows pending would keep the issue open and the run "unfinished".
    """
    try:
        ledger.release()
    except DigestError:
        # The database is gone: our claims return to the pool when their leases expire.
        ledger.dispose()
        raise
    ledger.dispose()
    with app.sessions() as session:
        gone = store.skip_unsubscribed(session, issue.id)
        counts = store.delivery_counts(session, issue.id)
        store.advance_issue(session, issue.id, counts, datetime.now(UTC))
        session.commit()
        return counts, gone


def _read_final_issue(app: App, issue: Issue, editions: Editions) -> None:
    """Read the issue again once our first claim is committed, under the issue's row lock.

    From that claim on, editors' changes are refused (messages are out); one committing
    right now holds the row lock, so waiting for it and reading after it sees the issue
    as it will stay. (SQLite needs none of this: an edit waits for the sender's turn.)
    """
    with app.sessions() as session:
        store.lock_issue(session, issue.id)
        fresh = store.issue_for_date(session, issue.edition_date)
        assert fresh is not None
        session.refresh(fresh)
        sections = _frozen_sections(session, app.config, fresh)
        editions.refresh(issue_context(fresh.edition_date, fresh), sections)
        session.commit()


async def _send_async(
    app: App,
    issue: Issue,
    editions: Editions,
    signer: TokenSigner,
    dkim: DKIMSigner | None,
    renderer: Renderer,
    transports: TransportFactory,
    progress: Callable[[SendStats], None] | None,
    stop: threading.Event | None,
    total: int,
    ledger: Ledger,
) -> SendStats:
    config = app.config
    limits = Limits.from_config(config.smtp)
    relay = relay_key(config.smtp)
    limiter = RelayLimiter(app.engine, relay, limits, demand=lambda: engine.outstanding)
    engine = SendEngine(
        transports,
        ledger,
        renderer.envelope_from,
        config.smtp.concurrency,
        RetryPolicy(config.smtp.max_attempts, config.smtp.retry_base_seconds),
        progress,
        limiter,
    )
    engine.stats.total = total
    if progress is not None:
        progress(engine.stats)  # the total, before the first message
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        # Outside the main thread (the scheduler's worker, tests) the caller owns signals.
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, engine.stop)
    ledger_task = asyncio.create_task(ledger.run())
    heartbeat = asyncio.create_task(ledger.heartbeat())

    async def watch_stop() -> None:
        # A threading.Event set by another thread (the scheduler's signal handler).
        assert stop is not None
        while not stop.is_set():
            await asyncio.sleep(0.2)
        engine.stop()

    watcher = asyncio.create_task(watch_stop()) if stop is not None else None
    prefs = preferences_signer(config)

    Job = tuple[Claimed, MessageTemplate, Recipient]
    tags = message_tags(config)

    async def claimed_jobs() -> AsyncIterator[list[Job]]:
        """Claimed deliveries in keyset order, in chunks; empty editions recorded as skipped."""
        first = True
        async with contextlib.aclosing(ledger.batches(lambda: engine.stopping)) as batches:
            async for batch in batches:
                if not batch:  # the ledger is about to wait for other workers
                    yield []
                    continue
                if first and app.engine.dialect.name == "postgresql":
                    _read_final_issue(app, issue, editions)
                first = False
                jobs: list[Job] = []
                for c in batch:
                    template = editions.for_regions(c.regions)
                    if template is None:
                        engine.stats.skipped += 1
                        ledger.record_later(
                            Outcome(
                                c.delivery_id,
                                c.subscriber_id,
                                DeliveryStatus.SKIPPED,
                                c.attempts,
                                error="edition is empty: no articles in the chosen regions",
                            )
                        )
                        continue
                    mid = c.message_id or message_id(issue, c.subscriber_id, renderer.domain, tags)
                    url = signer.url(config.unsubscribe.base_url, c.subscriber_id, c.email)
                    prefs_url = prefs.url(config.unsubscribe.base_url, c.subscriber_id, c.email)
                    jobs.append((c, template, Recipient(c.email, c.name, url, mid, prefs_url)))
                for i in range(0, len(jobs), PERSONALIZE_CHUNK):
                    yield jobs[i : i + PERSONALIZE_CHUNK]

    def personalize(jobs: list[Job]) -> list[bytes]:
        return [template.personalize(rcpt, dkim=dkim) for _, template, rcpt in jobs]

    def start(jobs: list[Job]) -> asyncio.Future[list[bytes]]:
        # With DKIM, a chunk is personalized in a thread while the previous one is being
        # sent: the RSA step (~0.5 ms a message) runs in OpenSSL without the GIL, on the
        # other core. Without DKIM, personalizing is cheap enough to do inline.
        if dkim is not None:
            return asyncio.ensure_future(asyncio.to_thread(personalize, jobs))
        done: asyncio.Future[list[bytes]] = loop.create_future()
        done.set_result(personalize(jobs))
        return done

    async def chunks() -> AsyncIterator[tuple[list[Job], list[bytes]]]:
        ahead: tuple[list[Job], asyncio.Future[list[bytes]]] | None = None
        async for jobs in claimed_jobs():
            if not jobs:
                # Nothing more for now: hand over the chunk held back, or a worker waiting
                # for others would sit on claimed rows that they in turn wait for.
                if ahead is not None:
                    yield ahead[0], await ahead[1]
                    ahead = None
                continue
            current = (jobs, start(jobs))  # one chunk ahead of the one being sent
            if ahead is not None:
                yield ahead[0], await ahead[1]
            ahead = current
        if ahead is not None:
            yield ahead[0], await ahead[1]

    async def source() -> AsyncGenerator[Outgoing, None]:
        async for jobs, messages in chunks():
            for (c, _, rcpt), raw in zip(jobs, messages, strict=True):
                yield Outgoing(
                    c.delivery_id, c.subscriber_id, c.email, raw, rcpt.message_id, c.attempts
                )

    try:
        return await engine.run(source())
    finally:
        if watcher is not None:
            watcher.cancel()
        await ledger.close()
        heartbeat.cancel()
        try:
            await ledger_task
        finally:
            limiter.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(sig)


def _dry_run(app: App, renderer: Renderer, edition_date: date) -> SendReport:
    """Count what ``send`` would send now, rendering each edition once; nothing is written.

    Reads the ledger: after a complete send that is nothing, after a partial one only
    the rows still open (see :func:`store.unsent_subscribers`).
    """
    config = app.config
    with app.sessions() as session:
        issue, sections = issue_sections(session, config, edition_date)
        if not sections:
            raise _nothing(config, edition_date)
        subject = (
            issue.subject
            if issue
            else renderer.subject(renderer.context(IssueContext(edition_date, None), sections))
        )
        report = SendReport(edition_date, subject, dry_run=True)
        editions = Editions(config, renderer, issue_context(edition_date, issue), sections)
        now = datetime.now(UTC)
        for regions in store.unsent_subscribers(session, issue.id if issue else None, now):
            if editions.for_regions(regions) is None:
                report.stats.skipped += 1
            else:
                report.would_send += 1
        report.editions = editions.rendered
        return report


# --- status ------------------------------------------------------------------------------------


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
    from digest.editorial import display_status  # editorial builds on this module

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
