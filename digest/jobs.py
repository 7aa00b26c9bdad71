"""The scheduler's jobs: thin, importable by reference (``digest.jobs:scheduled_send``).

APScheduler persists jobs by reference and arguments, so each job reloads the config from
its path and composes what it needs through :mod:`digest.pipeline`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta

from digest import editorial, pipeline, store
from digest.config import Config, load_config
from digest.crontab import CrontabTrigger
from digest.errors import AwaitingApproval, DigestError, NothingToSend

log = logging.getLogger("digest.jobs")

# Set by `digest run` on SIGTERM/SIGINT. Signals are process-wide and jobs run in the
# scheduler's worker threads, which cannot receive them; this is the one way to tell a
# running send to finish its in-flight messages and stop.
SHUTDOWN = threading.Event()


@contextmanager
def _opened(config: Config) -> Iterator[pipeline.App]:
    """The app for one job run, its engine disposed afterwards.

    `digest run` lives for months and runs a job every few minutes: an engine left
    behind per run keeps its pooled connections (and, on PostgreSQL, a server backend
    each) until the process ends.
    """
    app = pipeline.open_app(config)
    try:
        yield app
    finally:
        app.engine.dispose()


def latest_firing(trigger: CrontabTrigger, now: datetime) -> datetime:
    """The latest cron firing at or before ``now`` (``now`` itself if none in 32 days)."""
    t = trigger.get_next_fire_time(None, now - timedelta(days=32))
    latest = None
    while t is not None and t <= now:
        latest = t
        t = trigger.get_next_fire_time(t, t + timedelta(seconds=1))
    return latest or now


def edition_date_for(trigger: CrontabTrigger, now: datetime) -> date:
    """The date of the latest cron firing at or before ``now`` (in the trigger's zone).

    A late firing (the service came back at 02:00 on Saturday) still sends Friday's
    edition, and a duplicate firing maps to the same date, whose issue is unique.
    """
    return latest_firing(trigger, now).astimezone(trigger.timezone).date()


SEND_JOB = "digest-weekly-send"


def scheduled_send(
    config_path: str, now: datetime | None = None, slot: str | None = None
) -> datetime | None:
    """Send the round-up of the latest scheduled date (``slot``: that firing), once.

    The firing's (job, slot) row is written with the issue, so when several runners (or
    a leader and its successor) fire the same slot only the first one sends. An issue
    that awaits approval is left for :func:`scheduled_approval_wait`. Returns when to
    resume if the relay's hour/day quota paused the send.
    """
    config = load_config(config_path)
    now = now or datetime.now(UTC)
    trigger = config.schedule.cron_trigger()
    fired = datetime.fromisoformat(slot) if slot else latest_firing(trigger, now)
    edition = edition_date_for(trigger, fired)
    fire = pipeline.Fire(SEND_JOB, fired, store.new_worker_id())
    try:
        with _opened(config) as app:
            report = pipeline.send(app, edition, stop=SHUTDOWN, fire=fire)
    except AwaitingApproval as exc:
        grace = timedelta(hours=config.schedule.misfire_grace_hours)
        log.warning("send %s: %s (sent when approved until %s)", edition, exc, fired + grace)
        return None
    except NothingToSend as exc:
        log.warning("send %s: %s", edition, exc)
        return None
    except DigestError as exc:
        log.error("send %s: %s", edition, exc)
        raise
    if report.already_fired:
        log.info("send %s: this firing (%s) was made already by another runner", edition, fired)
        return None
    return _log_send(edition, report)


def catch_up_send(config_path: str, slot: str) -> datetime | None:
    """Fire a slot the previous leader may have lost (it died while firing it).

    Only when nothing at all happened for that edition: no firing row (checked by
    :func:`scheduled_send`) and no issue (a manual send, or a half-finished one that
    the resume job finishes instead).
    """
    config = load_config(config_path)
    edition = edition_date_for(config.schedule.cron_trigger(), datetime.fromisoformat(slot))
    with _opened(config) as app, app.sessions() as session:
        if store.issue_for_date(session, edition) is not None:
            return None
    log.info("catching up the send of %s (fell due at %s while no leader ran)", edition, slot)
    return scheduled_send(config_path, slot=slot)


def join_send(config_path: str, edition: date) -> None:
    """Work on a send that another process started (every ``digest run`` is a sender)."""
    config = load_config(config_path)
    log.info("joining the send of %s as a worker", edition)
    try:
        with _opened(config) as app:
            report = pipeline.send(app, edition, stop=SHUTDOWN)
    except DigestError as exc:
        log.warning("send %s (joined): %s", edition, exc)
        return
    _log_send(edition, report)


def _log_send(edition: date, report: pipeline.SendReport) -> datetime | None:
    s = report.stats
    if s.paused is not None:
        log.warning("send %s paused: %s", edition, s.paused)
    log.info(
        "send %s: %d sent, %d failed, %d deferred, %d skipped",
        edition,
        s.sent,
        s.failed,
        s.deferred,
        s.skipped,
    )
    return s.paused.resumes_at if s.paused is not None else None


def scheduled_fetch(config_path: str) -> None:
    """Fetch every feed; feed errors are logged, not raised (the next fetch retries)."""
    config = load_config(config_path)
    with _opened(config) as app:
        report = pipeline.fetch(app)
    for r in report.feeds:
        if r.error:
            log.warning("fetch %s: %s", r.feed, r.error)
    log.info("fetch: %d new, %d updated, %d rejected", report.new, report.updated, report.rejected)


def scheduled_resume(config_path: str, now: datetime | None = None) -> datetime | None:
    """Finish the latest scheduled edition if it is still open.

    Covers a ``digest run`` killed mid-send (its cron firing is spent) and deliveries
    deferred after their last in-run attempt. Only the latest scheduled edition is
    resumed: an old round-up is not worth sending late without an editor deciding so.
    """
    return _resume(load_config(config_path), now or datetime.now(UTC), only_unstarted=False)


def scheduled_approval_wait(config_path: str, now: datetime | None = None) -> datetime | None:
    """Send the latest scheduled edition as soon as it is approved, within the grace.

    Runs every minute while ``[editorial] approval = "required"``. Past
    ``misfire_grace_hours`` after the send time an issue still unapproved is recorded
    as missed, and neither this job nor the resume job sends it afterwards.
    """
    return _resume(load_config(config_path), now or datetime.now(UTC), only_unstarted=True)


def _resume(config: Config, now: datetime, only_unstarted: bool) -> datetime | None:
    trigger = config.schedule.cron_trigger()
    fired = latest_firing(trigger, now)
    edition = fired.astimezone(trigger.timezone).date()
    with _opened(config) as app:
        if not pipeline.has_open_issue(app, edition) or editorial.is_missed(app, edition):
            return None
        if only_unstarted and not editorial.unstarted(app, edition):
            return None  # the resume job finishes a send that has started
        if editorial.waiting_for_approval(app, edition):
            if now > fired + timedelta(hours=config.schedule.misfire_grace_hours):
                pipeline.record_missed(app, edition, fired)
                log.warning(
                    "send %s: not approved within misfire_grace_hours of %s; recorded as missed "
                    "(`digest send --date %s` sends it late once approved)",
                    edition,
                    fired,
                    edition,
                )
            return None
        log.info("sending %s", edition)
        try:
            report = pipeline.send(app, edition, stop=SHUTDOWN)
        except DigestError as exc:
            log.warning("resume %s: %s", edition, exc)
            return None
        return _log_send(edition, report)


def scheduled_draft(config_path: str, now: datetime | None = None) -> None:
    """Fetch, freeze the draft of the next scheduled send and mail each editor a copy."""
    config = load_config(config_path)
    now = now or datetime.now(UTC)
    edition = editorial.next_send_date(config, now)
    with _opened(config) as app:
        report = pipeline.fetch(app)
        for r in report.feeds:
            if r.error:
                log.warning("fetch %s: %s", r.feed, r.error)
        try:
            view, copies = editorial.draft_and_copy(app, edition)
        except DigestError as exc:
            log.warning("draft %s: %s", edition, exc)
            return
        log.info("draft %s built (%s): %s", edition, view.status, view.subject)
        for copy in copies:
            level = logging.INFO if copy.ok else logging.WARNING
            log.log(level, "draft %s: test copy to %s: %s", edition, copy.address, copy.reply)


def record_missed(config_path: str, scheduled_at: datetime) -> date:
    """Remember a send the scheduler skipped as too late, for ``digest status``."""
    config = load_config(config_path)
    edition = scheduled_at.astimezone(config.schedule.tz).date()
    with _opened(config) as app:
        pipeline.record_missed(app, edition, scheduled_at)
    return edition
