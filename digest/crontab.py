"""Crontab expressions: croniter reads them, an APScheduler trigger fires on them.

``schedule.send_cron`` means what it means in crontab(5): weekdays 0-7 with 0 and 7 both
Sunday, names, ranges, steps, and a day of the month *or* a weekday when both are given.
APScheduler 3's own ``CronTrigger`` counts weekdays from Monday and ANDs the two day
fields, so it is not used: croniter is the one parser of the expression, for validation
and for every fire time (:class:`CrontabTrigger`).
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, tzinfo
from typing import Any

from apscheduler.triggers.base import BaseTrigger
from croniter import CroniterError, croniter

_RANGE = re.compile(r"^([0-9a-z]+)-([0-9a-z]+)(?:/\d+)?$", re.IGNORECASE)
_WEEKDAY_FIELD = 4


def check_crontab(expr: str) -> None:
    """Raise ``ValueError`` (with the reason) unless ``expr`` is a five-field crontab line."""
    fields = expr.split()
    if len(fields) != 5:
        raise ValueError(f"expected 5 fields, got {len(fields)}")
    try:
        croniter.expand(expr)
    except CroniterError as exc:
        raise ValueError(str(exc)) from None
    # croniter reads a reversed range such as 5-0 as wrapping round (Fri, Sat, Sun);
    # crontab(5) ranges go from low to high and cron rejects the line. Be as strict, so
    # an expression means the same here as in any crontab.
    for index, field in enumerate(fields):
        for atom in field.split(","):
            m = _RANGE.match(atom)
            if m and _value(index, m[1]) > _value(index, m[2]):
                raise ValueError(
                    f"range {m[1]}-{m[2]} runs backwards; write it from low to high "
                    "(e.g. 5-6,0 for Friday to Sunday)"
                )


def _value(index: int, atom: str) -> int:
    """The number croniter gives one field value (a name such as 'fri' or 'jan', or digits)."""
    if atom.isdigit():
        return int(atom)  # keeps weekday 7 (Sunday) above 6, as in the range 1-7
    fields = ["*"] * 5
    fields[index] = atom
    value = croniter.expand(" ".join(fields))[0][index][0]
    return int(value)


class CrontabTrigger(BaseTrigger):  # type: ignore[misc]  # APScheduler 3 is untyped
    """Fires on a crontab expression in a time zone (the times are croniter's)."""

    def __init__(self, expr: str, timezone: tzinfo) -> None:
        check_crontab(expr)
        self.expr = expr
        self.timezone = timezone

    def get_next_fire_time(
        self, previous_fire_time: datetime | None, now: datetime
    ) -> datetime | None:
        """The first firing at or after ``now`` (strictly after ``previous_fire_time``)."""
        start = now if previous_fire_time is None else min(now, previous_fire_time)
        # croniter answers "strictly after"; a microsecond back makes ``start`` itself
        # count (as APScheduler's own triggers do), except the firing already done.
        base = start if start == previous_fire_time else start - timedelta(microseconds=1)
        nxt: datetime = croniter(self.expr, base.astimezone(self.timezone)).get_next(datetime)
        return nxt

    def __getstate__(self) -> dict[str, Any]:
        return {"version": 1, "expr": self.expr, "timezone": self.timezone}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.expr = state["expr"]
        self.timezone = state["timezone"]

    def __str__(self) -> str:
        return f"crontab[{self.expr}, {self.timezone}]"

    def __repr__(self) -> str:
        return f"<CrontabTrigger ({self.expr!r}, timezone={self.timezone!s})>"
