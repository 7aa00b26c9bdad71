"""The scheduler's jobs: thin, importable by reference (``digest.jobs:scheduled_send``).

APScheduler persists jobs by reference and arguments, so each job reloads the config from
its path and composes what it needs through :mod:`digest.pipeline`.
"""

from __future__ import annotations

import logging
from datetime import UTC, date, datetime, timedelta

from apscheduler.triggers.cron import CronTrigger

from digest import pipeline
from digest.config import load_config
from digest.errors import DigestError, NothingToSend

log = logging.getLogger("digest.jobs")


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
        report = pipeline.send(pipeline.open_app(config), edition)
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
