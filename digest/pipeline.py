"""The jobs digest runs, composed from the stages: fetch, and send (with its dry run).

This is the one place that wires config, store, select, render, tokens and the send
engine together; the CLI and the scheduler call these functions and nothing below them.
The other jobs have rooms of their own (:mod:`digest.app`: opening and init;
:mod:`digest.issues`: building an issue and its editions; :mod:`digest.preview`;
:mod:`digest.status`) and are reached through here as ``pipeline.x`` too.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime

from sqlalchemy.orm import Session

from digest import ingest, store
from digest.app import App, init_db, open_app, today
from digest.dkimsign import DKIMSigner, load_signer
from digest.editorial import check_approval, recheck_approval
from digest.errors import DigestError
from digest.issues import (
    AlreadyFired,
    Editions,
    Fire,
    build_issue,
    frozen_sections,
    issue_context,
    issue_sections,
    message_id,
    message_tags,
    nothing_to_send,
    plan_sections,
    preferences_signer,
)
from digest.ledger import Claimed, Ledger
from digest.models import DeliveryStatus, Issue
from digest.preview import PreviewFormat, preview
from digest.ratelimit import Limits, RelayLimiter, relay_key
from digest.render import IssueContext, MessageTemplate, Recipient, Renderer
from digest.send import (
    Outcome,
    Outgoing,
    RetryPolicy,
    SendEngine,
    SendStats,
    TransportFactory,
    transport_factory,
)
from digest.status import (
    FailedRow,
    IssueStatusRow,
    StatusReport,
    failed_deliveries,
    has_open_issue,
    record_missed,
    status,
)
from digest.tokens import TokenSigner

__all__ = [
    "BOUNCE_THRESHOLD",
    "PERSONALIZE_CHUNK",
    "App",
    "Editions",
    "FailedRow",
    "Fire",
    "IssueStatusRow",
    "PreviewFormat",
    "SendReport",
    "StatusReport",
    "build_issue",
    "failed_deliveries",
    "fetch",
    "frozen_sections",
    "has_open_issue",
    "init_db",
    "issue_context",
    "issue_sections",
    "message_id",
    "message_tags",
    "nothing_to_send",
    "open_app",
    "plan_sections",
    "preferences_signer",
    "preview",
    "record_missed",
    "send",
    "status",
    "today",
]

# Three hard bounces in a row and we stop mailing an address: mailbox providers read
# repeated sends to dead addresses as a spammer's sign.
BOUNCE_THRESHOLD = 3
PERSONALIZE_CHUNK = 64


def fetch(
    app: App,
    now: datetime | None = None,
    progress: Callable[[ingest.FeedReport], None] | None = None,
) -> ingest.FetchReport:
    """Pull every configured feed into the article store."""
    return ingest.fetch_all(
        app.sessions, app.config.feeds, now or datetime.now(UTC), progress=progress
    )


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
        except AlreadyFired:
            return SendReport(edition_date, "", dry_run=False, already_fired=True)
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
        recheck_approval(app.config, issue, fresh)  # an edit since the gate withdrew it
        sections = frozen_sections(session, app.config, fresh)
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
            raise nothing_to_send(config, edition_date)
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
