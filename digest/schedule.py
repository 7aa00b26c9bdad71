"""APScheduler wiring only: which job runs when. The jobs themselves are in ``jobs.py``.

Jobs live in a persistent SQLAlchemy job store in the digest database, so a firing that
was due while the service was down is still known when it comes back: within
``misfire_grace_hours`` it runs once (coalesced), later it is skipped and logged.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from apscheduler.events import (
    EVENT_JOB_ERROR,
    EVENT_JOB_EXECUTED,
    EVENT_JOB_MISSED,
    JobExecutionEvent,
)
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.interval import IntervalTrigger

from digest import store
from digest.config import Config
from digest.jobs import SHUTDOWN, record_missed

SEND_JOB = "digest-weekly-send"
FETCH_JOB = "digest-fetch"
RESUME_JOB = "digest-resume"
DRAFT_JOB = "digest-draft"
APPROVAL_JOB = "digest-approval-wait"
STARTUP_JOB = "digest-resume-now"  # once, at start-up
# How often an unfinished send (killed run, deferred deliveries) is picked up again.
RESUME_MINUTES = 15
# How soon an approval given after the send time is acted on (while within the grace).
APPROVAL_POLL_MINUTES = 1


class AheadTrigger(BaseTrigger):  # type: ignore[misc]  # apscheduler is untyped
    """Fires a fixed time before each firing of another trigger (the draft before a send).

    Defined here, at module level, because the job store pickles triggers by reference.
    """

    def __init__(self, trigger: BaseTrigger, ahead: timedelta) -> None:
        self.trigger = trigger
        self.ahead = ahead
        self.jitter = None

    def get_next_fire_time(
        self, previous_fire_time: datetime | None, now: datetime
    ) -> datetime | None:
        """The inner trigger's next firing after ``now + ahead``, moved ``ahead`` earlier."""
        previous = previous_fire_time + self.ahead if previous_fire_time else None
        t = self.trigger.get_next_fire_time(previous, now + self.ahead)
        return t - self.ahead if t is not None else None

    def __str__(self) -> str:
        return f"ahead[{self.ahead} before {self.trigger}]"


def build_scheduler(config: Config) -> BackgroundScheduler:
    """A scheduler with the persistent job store; jobs are added by :func:`sync_jobs`."""
    return BackgroundScheduler(
        jobstores={
            "default": SQLAlchemyJobStore(url=config.database.url, tablename="apscheduler_jobs")
        },
        executors={"default": {"type": "threadpool", "max_workers": 2}},
        job_defaults={"coalesce": True, "max_instances": 1},
        timezone=config.schedule.tz,
    )


def sync_jobs(scheduler: BackgroundScheduler, config: Config) -> None:
    """Make the stored jobs match the config, keeping a stored job that already does.

    Re-adding an unchanged job would recompute its next run time from now and so forget
    a firing missed while the service was down; that is why unchanged jobs are kept.
    """
    assert config.path is not None
    args = [str(config.path)]
    grace = int(config.schedule.misfire_grace_hours * 3600) or 1
    wanted: dict[str, dict[str, Any]] = {
        SEND_JOB: {
            "func": "digest.jobs:scheduled_send",
            "trigger": config.schedule.cron_trigger(),
            "misfire_grace_time": grace,
        },
        RESUME_JOB: {
            "func": "digest.jobs:scheduled_resume",
            "trigger": IntervalTrigger(minutes=RESUME_MINUTES, timezone=config.schedule.tz),
            "misfire_grace_time": 60 * RESUME_MINUTES,
        },
        FETCH_JOB: {
            "func": "digest.jobs:scheduled_fetch",
            "trigger": IntervalTrigger(
                minutes=config.schedule.fetch_interval_minutes, timezone=config.schedule.tz
            ),
            "misfire_grace_time": 60 * config.schedule.fetch_interval_minutes,
        },
    }
    editorial = config.editorial
    # A draft frozen a day early loses that day's articles, so only when someone will look
    # at it: approval is required or editors get a copy.
    if editorial.draft_ahead_hours and (editorial.approval == "required" or editorial.editors):
        wanted[DRAFT_JOB] = {
            "func": "digest.jobs:scheduled_draft",
            "trigger": AheadTrigger(
                config.schedule.cron_trigger(), timedelta(hours=editorial.draft_ahead_hours)
            ),
            "misfire_grace_time": int(editorial.draft_ahead_hours * 3600),
        }
    if editorial.approval == "required":
        wanted[APPROVAL_JOB] = {
            "func": "digest.jobs:scheduled_approval_wait",
            "trigger": IntervalTrigger(minutes=APPROVAL_POLL_MINUTES, timezone=config.schedule.tz),
            "misfire_grace_time": 60 * APPROVAL_POLL_MINUTES,
        }
    for job_id in (DRAFT_JOB, APPROVAL_JOB):
        if job_id not in wanted and scheduler.get_job(job_id) is not None:
            scheduler.remove_job(job_id)
    for job_id, spec in wanted.items():
        job = scheduler.get_job(job_id)
        if (
            job is not None
            and str(job.trigger) == str(spec["trigger"])
            and job.misfire_grace_time == spec["misfire_grace_time"]
            and list(job.args) == args
            and job.func_ref == spec["func"]
        ):
            continue
        scheduler.add_job(id=job_id, name=job_id, args=args, replace_existing=True, **spec)


def run_scheduler(
    config: Config, log: Callable[[str], None], stop: threading.Event | None = None
) -> None:
    """Run until SIGINT/SIGTERM (or ``stop`` is set); one scheduler per database."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stop = stop or threading.Event()
    SHUTDOWN.clear()
    engine = store.open_engine(config.database.url)
    with store.exclusive_lock(engine, "scheduler"):
        scheduler = build_scheduler(config)

        def on_event(event: JobExecutionEvent) -> None:
            if event.code == EVENT_JOB_MISSED and event.job_id == SEND_JOB:
                edition = record_missed(str(config.path), event.scheduled_run_time)
                log(
                    f"digest run: {event.job_id} missed its run time {event.scheduled_run_time} "
                    f"(more than misfire_grace_hours late); not sending the {edition} round-up "
                    "late (recorded; see `digest status`)"
                )
            elif event.code == EVENT_JOB_MISSED:
                log(f"digest run: {event.job_id} missed its run time {event.scheduled_run_time}")
            elif event.exception is not None:
                log(f"digest run: {event.job_id} failed: {event.exception}")
            elif event.job_id == STARTUP_JOB:
                log("digest run: start-up check done (an unfinished send was resumed if any)")

        scheduler.add_listener(on_event, EVENT_JOB_ERROR | EVENT_JOB_EXECUTED | EVENT_JOB_MISSED)
        # Start paused: jobs are reconciled first, then due (missed) firings are processed.
        scheduler.start(paused=True)
        sync_jobs(scheduler, config)
        scheduler.resume()
        # Finish a send that a previous process left half done, now rather than in 15 min.
        scheduler.add_job(
            "digest.jobs:scheduled_resume",
            args=[str(config.path)],
            id=STARTUP_JOB,
            replace_existing=True,
            misfire_grace_time=None,
        )
        send_job = scheduler.get_job(SEND_JOB)
        log(
            f"digest run: next send at {send_job.next_run_time if send_job else '?'}; "
            f"fetching every {config.schedule.fetch_interval_minutes} min; Ctrl-C to stop"
        )

        def handle(signum: int, _frame: Any) -> None:
            SHUTDOWN.set()  # a send in a worker thread finishes its in-flight messages
            stop.set()

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, handle)
            signal.signal(signal.SIGINT, handle)
        try:
            while not stop.wait(1.0):
                pass
        finally:
            log("digest run: stopping; a running send finishes its in-flight messages first")
            SHUTDOWN.set()
            scheduler.shutdown(wait=True)
            engine.dispose()
