"""APScheduler wiring only: which job runs when. The jobs themselves are in ``jobs.py``.

Jobs live in a persistent SQLAlchemy job store in the digest database, so a firing that
was due while the service was down is still known when it comes back: within
``misfire_grace_hours`` it runs once (coalesced), later it is skipped and logged.

On PostgreSQL several ``digest run`` processes may share the database: only the elected
leader (``leader.py``) runs APScheduler; every runner joins a send under way.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
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
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from digest import store
from digest.config import Config
from digest.jobs import SEND_JOB, SHUTDOWN, join_send, latest_firing, record_missed
from digest.leader import Elector
from digest.ledger import joinable_sends

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
    """Run until SIGINT/SIGTERM (or ``stop`` is set).

    SQLite: one runner per database (a lock file), which schedules. PostgreSQL: any
    number of runners; one is elected leader and schedules, the others are standbys
    that take over when it dies, and every runner joins a send under way as a worker.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stop = stop or threading.Event()
    SHUTDOWN.clear()

    def handle(signum: int, _frame: Any) -> None:
        SHUTDOWN.set()  # a send in a worker thread finishes its in-flight messages
        stop.set()

    engine = store.open_engine(config.database.url)
    try:
        if engine.dialect.name == "postgresql":
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, handle)
                signal.signal(signal.SIGINT, handle)
            _run_elected(config, log, stop, engine)
            return
        with store.exclusive_lock(engine, "scheduler"):
            leading = _Leading(config, log)
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, handle)
                signal.signal(signal.SIGINT, handle)
            try:
                while not stop.wait(1.0):
                    pass
            finally:
                _stopping(log)
                leading.stop(wait=True)
    finally:
        engine.dispose()


def _stopping(log: Callable[[str], None]) -> None:
    log("digest run: stopping; a running send finishes its in-flight messages first")
    SHUTDOWN.set()


class _Leading:
    """The leader's APScheduler: started on election, shut down on stepping down.

    Only the leader has one (APScheduler's job store must never be shared by two
    schedulers at once).
    """

    def __init__(self, config: Config, log: Callable[[str], None], elected: bool = False) -> None:
        self.config = config
        self.log = log
        path = str(config.path)
        scheduler = self.scheduler = build_scheduler(config)

        def on_event(event: JobExecutionEvent) -> None:
            if event.code == EVENT_JOB_MISSED and event.job_id == SEND_JOB:
                edition = record_missed(path, event.scheduled_run_time)
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
            elif isinstance(getattr(event, "retval", None), datetime):
                # The relay's hour/day quota paused the send: resume once it reopens.
                log(f"digest run: send paused by the relay's quota; resuming at {event.retval}")
                scheduler.add_job(
                    "digest.jobs:scheduled_resume",
                    "date",
                    run_date=event.retval + timedelta(seconds=5),
                    args=[path],
                    id="digest-resume-after-pause",
                    replace_existing=True,
                    misfire_grace_time=None,
                )

        scheduler.add_listener(on_event, EVENT_JOB_ERROR | EVENT_JOB_EXECUTED | EVENT_JOB_MISSED)
        # Start paused: jobs are reconciled first, then due (missed) firings are processed.
        scheduler.start(paused=True)
        stored = scheduler.get_job(SEND_JOB)
        sync_jobs(scheduler, config)
        if elected and stored is not None:
            self._catch_up(stored.next_run_time)
        scheduler.resume()
        # Finish a send that a previous process left half done, now rather than in 15 min.
        scheduler.add_job(
            "digest.jobs:scheduled_resume",
            args=[path],
            id=STARTUP_JOB,
            replace_existing=True,
            misfire_grace_time=None,
        )
        send_job = scheduler.get_job(SEND_JOB)
        log(
            f"digest run: next send at {send_job.next_run_time if send_job else '?'}; "
            f"fetching every {config.schedule.fetch_interval_minutes} min; Ctrl-C to stop"
        )

    def _catch_up(self, stored_next: datetime | None) -> None:
        """Fire a slot the stored job moved past but that may never have fired.

        APScheduler moves a job's next run time on before the job has done anything;
        a leader killed in between loses that firing. The unique (job, slot) row, and
        the issue, tell whether it happened (see ``jobs.catch_up_send``).
        """
        now = datetime.now(UTC)
        slot = latest_firing(self.config.schedule.cron_trigger(), now)
        grace = timedelta(hours=self.config.schedule.misfire_grace_hours)
        if stored_next is None or stored_next <= slot or now - slot > grace:
            return
        self.scheduler.add_job(
            "digest.jobs:catch_up_send",
            args=[str(self.config.path), slot.isoformat()],
            id="digest-catch-up",
            replace_existing=True,
            misfire_grace_time=None,
        )

    def stop(self, wait: bool) -> None:
        """Shut the scheduler down (``wait``: until running jobs finish)."""
        self.scheduler.shutdown(wait=wait)


def _run_elected(
    config: Config, log: Callable[[str], None], stop: threading.Event, engine: Engine
) -> None:
    """PostgreSQL: elect, lead or stand by, and join sends under way, until ``stop``."""
    elector = Elector(engine, config.send.lease_seconds)
    prefix = elector.id.rsplit(":", 1)[0] + ":"  # this process's workers: host:pid:*
    leading: _Leading | None = None
    standby_logged = False
    joined: threading.Thread | None = None
    try:
        while not stop.is_set():
            is_leader = elector.tick()
            if is_leader and leading is None:
                log(f"digest run: {elector.id} is the leader: it schedules fetches and sends")
                leading = _Leading(config, log, elected=True)
                standby_logged = False
            elif not is_leader and leading is not None:
                why = elector.error or "its lease was taken or ran out"
                log(f"digest run: {elector.id} steps down as leader ({why}); now a standby")
                leading.stop(wait=False)
                leading = None
            if not is_leader and not standby_logged:
                log(
                    f"digest run: {elector.id} is a standby: another process leads; "
                    "it takes over if that one stops renewing its lease"
                )
                standby_logged = True
            if joined is None or not joined.is_alive():
                joined = _join_open_send(config, engine, prefix)
            stop.wait(elector.interval)
    finally:
        _stopping(log)
        if leading is not None:
            leading.stop(wait=True)
        if joined is not None:
            joined.join()
        elector.resign()


def _join_open_send(config: Config, engine: Engine, prefix: str) -> threading.Thread:
    """Look, in a thread, for a send another process has under way, and work on it.

    In a thread, not in the election loop: a database that stops answering must not
    keep the loop from ticking, or a leader cut off from it would lead on past its lease.
    """

    def look_and_join() -> None:
        try:
            with engine.connect() as conn:
                dates = joinable_sends(conn, prefix)
        except SQLAlchemyError:
            return  # the database is unreachable: the next tick tries again
        if dates:
            join_send(str(config.path), dates[-1])

    thread = threading.Thread(target=look_and_join, name="digest-join", daemon=True)
    thread.start()
    return thread
