"""Progress of long commands (``send``, ``subscribers import``, ``fetch``, ``run --once``).

Three ways to show it, chosen by where stderr goes:

* a terminal: a rich progress bar with count, total, rate and time left, redrawn in place;
* anything else (cron, systemd, a pipe, ``tail -f`` of a log): one plain line every
  :data:`LINE_INTERVAL` seconds, flushed at once so journald stamps it when it happened,
  with no colour codes and no carriage returns;
* ``--quiet``: nothing at all while the command runs.

Commands call :func:`meter` and feed it counts; the pipeline reports totals (claimable
deliveries, rows in the file, feeds configured) so the bar knows where it ends. Updates are
cheap (a clock read, or rich's own lock), because ``send`` reports every message.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol, TextIO

LINE_INTERVAL = 10.0
"""Seconds between two plain progress lines when stderr is not a terminal."""


class Meter(Protocol):
    """A running count of work done, out of ``total`` when known."""

    def update(self, done: int, total: int | None = None) -> None: ...


class _Silent:
    def update(self, done: int, total: int | None = None) -> None:
        pass


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class LineMeter:
    """Plain progress lines for logs: ``digest send: 1200/5000 messages (24%), 40.0/s,
    about 1m35s left``, at most one every ``interval`` seconds."""

    def __init__(
        self,
        label: str,
        unit: str,
        stream: TextIO,
        total: int | None = None,
        interval: float = LINE_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._label = label
        self._unit = unit
        self._stream = stream
        self._total = total
        self._interval = interval
        self._clock = clock
        self._start = clock()
        self._next = self._start + interval

    def update(self, done: int, total: int | None = None) -> None:
        """Record progress; write a line when the interval has passed."""
        if total is not None:
            self._total = total
        now = self._clock()
        if now < self._next:
            return
        self._next = now + self._interval
        self._stream.write(self.line(done, now) + "\n")
        self._stream.flush()  # a log reader sees the line now, not when the buffer fills

    def line(self, done: int, now: float) -> str:
        """The text of one progress line."""
        elapsed = max(now - self._start, 1e-9)
        rate = done / elapsed
        total = self._total
        text = f"digest {self._label}: {done}"
        if total is not None:
            text += f"/{total} {self._unit}"
            if total:
                text += f" ({100 * done // total}%)"
        else:
            text += f" {self._unit}"
        text += f", {rate:.1f}/s"
        if total is not None and rate > 0 and done < total:
            text += f", about {_duration((total - done) / rate)} left"
        return text


@contextmanager
def _bar(label: str, unit: str, total: int | None, stream: TextIO) -> Iterator[Meter]:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        Task,
        TaskProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class RateColumn(ProgressColumn):
        """Items per second (rich's own speed column counts bytes)."""

        def render(self, task: Task) -> Text:
            # rich estimates speed from samples over time; a step done in a blink has
            # none, so fall back to the average.
            speed = task.finished_speed or task.speed
            if not speed and task.elapsed:
                speed = task.completed / task.elapsed
            return Text(f"{speed:,.1f} {unit}/s" if speed else f"? {unit}/s")

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        RateColumn(),
        TimeRemainingColumn(),
        console=Console(file=stream),
    )
    task = progress.add_task(label, total=total)

    class Bar:
        def update(self, done: int, total: int | None = None) -> None:
            if total is not None:
                progress.update(task, completed=done, total=total)
            else:
                progress.update(task, completed=done)

    with progress:
        yield Bar()


@contextmanager
def meter(
    label: str,
    unit: str,
    total: int | None = None,
    *,
    quiet: bool = False,
    stream: TextIO | None = None,
) -> Iterator[Meter]:
    """A progress display for one step on ``stream`` (stderr): a bar on a terminal,
    plain lines elsewhere, nothing when ``quiet``."""
    out = stream if stream is not None else sys.stderr
    if quiet:
        yield _Silent()
    elif out.isatty():
        with _bar(label, unit, total, out) as bar:
            yield bar
    else:
        yield LineMeter(label, unit, out, total)
