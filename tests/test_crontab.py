"""Crontab expressions: croniter's meaning, fired by an APScheduler trigger."""

from __future__ import annotations

import pickle
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from digest.crontab import CrontabTrigger, check_crontab

NY = ZoneInfo("America/New_York")


def firings(trigger: CrontabTrigger, start: datetime, n: int) -> list[datetime]:
    out = [trigger.get_next_fire_time(None, start)]
    while len(out) < n:
        out.append(trigger.get_next_fire_time(out[-1], out[-1]))
    return out


def test_local_time_is_kept_across_the_dst_change() -> None:
    # New York leaves daylight saving time on Sunday 2026-11-01.
    fired = firings(CrontabTrigger("0 9 * * *", NY), datetime(2026, 10, 31, tzinfo=NY), 3)
    assert [f.astimezone(NY).strftime("%d %H:%M") for f in fired] == [
        "31 09:00",
        "01 09:00",
        "02 09:00",
    ]
    assert [f.astimezone(UTC).hour for f in fired] == [13, 14, 14]


def test_day_of_month_or_weekday_as_crontab_does() -> None:
    # crontab(5): when both day fields are restricted, either one matching fires.
    fired = firings(CrontabTrigger("0 9 1 * mon", NY), datetime(2026, 11, 25, tzinfo=NY), 4)
    assert [f"{f:%a %d}" for f in fired] == ["Mon 30", "Tue 01", "Mon 07", "Mon 14"]


def test_a_due_time_counts_once() -> None:
    trigger = CrontabTrigger("0 9 * * fri", NY)
    friday_nine = datetime(2026, 11, 27, 9, tzinfo=NY)
    assert trigger.get_next_fire_time(None, friday_nine) == friday_nine
    assert trigger.get_next_fire_time(friday_nine, friday_nine) == datetime(
        2026, 12, 4, 9, tzinfo=NY
    )
    # Missed firings are found one by one, as APScheduler's misfire handling asks.
    later = datetime(2026, 12, 20, tzinfo=NY)
    assert trigger.get_next_fire_time(friday_nine, later) == datetime(2026, 12, 4, 9, tzinfo=NY)


def test_the_trigger_survives_the_job_store() -> None:
    trigger = CrontabTrigger("30 8 * * 1-5", NY)
    again = pickle.loads(pickle.dumps(trigger))
    start = datetime(2026, 11, 27, 12, tzinfo=NY)
    assert again.get_next_fire_time(None, start) == trigger.get_next_fire_time(None, start)
    assert str(again) == str(trigger) == "crontab[30 8 * * 1-5, America/New_York]"


@pytest.mark.parametrize(
    ("expr", "reason"),
    [
        ("0 9 * * 5-0", "runs backwards"),
        ("0 9 * * sat-mon", "runs backwards"),
        ("0 9 30-2 * *", "runs backwards"),
        ("0 9 * *", "expected 5 fields"),
        ("0 9 * * * *", "expected 5 fields"),
        ("61 9 * * *", "out of range"),
        ("0 9 * * funday", "is not acceptable"),
    ],
)
def test_bad_expressions_say_why(expr: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        check_crontab(expr)
