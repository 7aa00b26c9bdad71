"""The weekly job in one call (``digest run --once``): schema, feeds, subscribers, send.

For a first run on a fresh checkout, and for system cron instead of the ``digest run``
daemon. Every step is the same function its own command runs, so each is as safe to
repeat: the schema upgrade is idempotent, feeds are fetched conditionally, the config's
``[[subscribers]]`` import never re-subscribes anyone, and the ledger sends nothing twice.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, date, datetime

from digest import ingest, pipeline
from digest.config import Config
from digest.progress import Meter
from digest.subscribers import ImportProgress, ImportReport, import_entries

MeterFactory = Callable[[str, str, int | None], AbstractContextManager[Meter]]
"""(step label, unit, total) → a progress display for that step, e.g. ``progress.meter``."""


@dataclass
class Hooks:
    """What the caller hears while the job runs; every hook is optional.

    ``fetched``/``imported`` arrive as each step finishes, so a log shows the feeds'
    result before a long send starts (and even when the send then fails). ``meter``
    shows each step's progress while it runs.
    """

    migrated: Callable[[str], None] | None = None
    feed_done: Callable[[ingest.FeedReport], None] | None = None
    fetched: Callable[[ingest.FetchReport], None] | None = None
    imported: Callable[[ImportReport | None], None] | None = None
    meter: MeterFactory | None = None

    def step(self, label: str, unit: str, total: int | None) -> AbstractContextManager[Meter]:
        """The progress display of one step (one that shows nothing without ``meter``)."""
        if self.meter is None:
            return contextlib.nullcontext(_NO_METER)
        return self.meter(label, unit, total)


class _NoMeter:
    def update(self, done: int, total: int | None = None) -> None:
        pass


_NO_METER = _NoMeter()


@dataclass
class WeeklyReport:
    """What one ``run --once`` did."""

    revision: str
    fetch: ingest.FetchReport
    subscribers: ImportReport | None  # None: the config has no [[subscribers]]
    send: pipeline.SendReport

    @property
    def ok(self) -> bool:
        """False when part of the work failed: a feed, a subscriber row, a delivery."""
        return (
            self.fetch.ok
            and not (self.subscribers and self.subscribers.rejected)
            and not self.send.stats.interrupted
            and not self.send.counts.get("failed", 0)
        )


def import_config_subscribers(
    app: pipeline.App, progress: ImportProgress | None = None
) -> ImportReport | None:
    """Import the config file's ``[[subscribers]]`` as ``subscribers import`` does; None
    when it has none (subscribers may come only from CSV files or the signup form)."""
    config = app.config
    if not config.subscribers:
        return None
    entries = [
        (f"subscribers[{i}]", s.email, s.name, s.regions) for i, s in enumerate(config.subscribers)
    ]
    name = config.path.name if config.path else "config"
    return import_entries(
        app.sessions,
        entries,
        config.newsletter.regions,
        f"toml:{name}",
        datetime.now(UTC),
        progress,
    )


def run_once(
    config: Config,
    edition_date: date,
    hooks: Hooks | None = None,
    stop: threading.Event | None = None,
) -> WeeklyReport:
    """Upgrade the schema, fetch every feed, import the config's subscribers, send the
    round-up of ``edition_date``.

    A feed that fails does not stop the run (the others are stored and the week is sent
    with what there is); errors that stop ``send`` (nothing to send, SMTP or outbox
    unusable, another sender) are raised after the earlier steps were reported.
    """
    hooks = hooks or Hooks()
    revision = pipeline.init_db(config)
    if hooks.migrated:
        hooks.migrated(revision)
    app = pipeline.open_app(config)
    try:
        feeds: list[ingest.FeedReport] = []
        with hooks.step("fetch", "feeds", len(config.feeds)) as meter:

            def feed_done(report: ingest.FeedReport) -> None:
                feeds.append(report)
                if hooks.feed_done:
                    hooks.feed_done(report)
                meter.update(len(feeds))

            fetched = pipeline.fetch(app, progress=feed_done)
        if hooks.fetched:
            hooks.fetched(fetched)
        imported = None
        if config.subscribers:
            with hooks.step("import", "rows", len(config.subscribers)) as meter:
                imported = import_config_subscribers(app, meter.update)
        if hooks.imported:
            hooks.imported(imported)
        with hooks.step("send", "messages", None) as meter:
            sent = pipeline.send(
                app,
                edition_date,
                progress=lambda stats: meter.update(stats.done, stats.total),
                stop=stop,
            )
        return WeeklyReport(revision, fetched, imported, sent)
    finally:
        app.engine.dispose()
