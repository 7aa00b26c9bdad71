"""The scheduler's jobs: thin, importable by reference (``digest.jobs:scheduled_send``).

APScheduler persists jobs by reference and arguments, so each job reloads the config from
its path and composes what it needs through :mod:`digest.pipeline`.
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, date, datetime, timedelta

from apscheduler.triggers.cron import CronTrigger

from digest import pipeline
from digest.config import load_config
from digest.errors import DigestError, NothingToSend

log = logging.getLogger("digest.jobs")

# Set by `digest run` on SIGTERM/SIGINT. Signals are process-wide and jobs run in the
# scheduler's worker threads, which cannot receive them; this is the one way to tell a
# running send to finish its in-flight messages and stop.
SHUTDOWN = threading.Event()


def edition_date_for(trigger: CronTrigger, now: datetime) -> date:
    """The date of the latest cron firing at or before ``now`` (in the trigger's zone).

    A late firing (the service came back at 02:00 on Saturday) still sends Friday's
    edition, and a duplicate firing maps to the same date, whose issue is unique.
    """
    t = trigger.get_next_fire_time(None, now - timedelta(days=32))
    latest = None
    while t is not None and t <= now:
        latest = t
        t = trigger.get_next_fire_time(t, t + timedelta(seconds=1))
    return (latest or now).astimezone(trigger.timezone).date()


def scheduled_send(config_path: str) -> None:
    """Send the round-up of the latest scheduled date (idempotent)."""
    config = load_config(config_path)
    edition = edition_date_for(config.schedule.cron_trigger(), datetime.now(UTC))
    try:
        report = pipeline.send(pipeline.open_app(config), edition, stop=SHUTDOWN)
    except NothingToSend as exc:
        log.warning("send %s: %s", edition, exc)
        return
    except DigestError as exc:
        log.error("send %s: %s", edition, exc)
        raise
    s = report.stats
    log.info(
        "send %s: %d sent, %d failed, %d deferred, %d skipped",
        edition,
        s.sent,
        s.failed,
        s.deferred,
        s.skipped,
    )


def scheduled_fetch(config_path: str) -> None:
    """Fetch every feed; feed errors are logged, not raised (the next fetch retries)."""
    config = load_config(config_path)
    report = pipeline.fetch(pipeline.open_app(config))
    for r in report.feeds:
        if r.error:
            log.warning("fetch %s: %s", r.feed, r.error)
    log.info("fetch: %d new, %d updated, %d rejected", report.new, report.updated, report.rejected)


def scheduled_resume(config_path: str) -> None:
    """Finish the latest scheduled edition if it is still open.

    Covers a ``digest run`` killed mid-send (its cron firing is spent) and deliveries
    deferred after their last in-run attempt. Only the latest scheduled edition is
    resumed: an old round-up is not worth sending late without an editor deciding so.
    """
    config = load_config(config_path)
    edition = edition_date_for(config.schedule.cron_trigger(), datetime.now(UTC))
    app = pipeline.open_app(config)
    if not pipeline.has_open_issue(app, edition):
        return
    log.info("resuming the send of %s", edition)
    try:
        pipeline.send(app, edition, stop=SHUTDOWN)
    except DigestError as exc:
        log.warning("resume %s: %s", edition, exc)


def record_missed(config_path: str, scheduled_at: datetime) -> date:
    """Remember a send the scheduler skipped as too late, for ``digest status``."""
    config = load_config(config_path)
    edition = scheduled_at.astimezone(config.schedule.tz).date()
    pipeline.record_missed(pipeline.open_app(config), edition, scheduled_at)
    return edition
