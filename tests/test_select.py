"""Selection rules an editor can predict."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

from digest import pipeline, store
from digest.models import IssueStatus
from digest.select import edition_key, edition_sections, select_sections, window

NY = ZoneInfo("America/New_York")
REGIONS = ["Asia-Pacific", "Europe", "Middle East"]


@dataclass
class A:
    id: int
    categories: list[str]
    published_at: datetime = field(default_factory=lambda: datetime(2026, 11, 25, tzinfo=UTC))


def test_window_is_local_midnights() -> None:
    start, end = window(date(2026, 11, 27), NY, 7)
    assert start == datetime(2026, 11, 21, 5, tzinfo=UTC)  # 00:00 EST
    assert end == datetime(2026, 11, 28, 5, tzinfo=UTC)


def test_window_across_daylight_saving_change() -> None:
    # DST ends 2026-11-01 in New York: the week starts at 00:00 EDT and ends at 00:00 EST.
    start, end = window(date(2026, 11, 4), NY, 7)
    assert start == datetime(2026, 10, 29, 4, tzinfo=UTC)
    assert end == datetime(2026, 11, 5, 5, tzinfo=UTC)


def test_first_configured_region_wins_case_insensitively() -> None:
    a = A(1, ["middle east", "EUROPE"])
    sections = select_sections([a], REGIONS, "Also", 5)
    assert [(s.name, [x.id for x in s.articles]) for s in sections] == [("Europe", [1])]


def test_unmatched_go_to_catch_all_or_nowhere() -> None:
    arts = [A(1, ["Sport"]), A(2, []), A(3, ["Europe"])]
    assert [s.name for s in select_sections(arts, REGIONS, "Also this week", 5)] == [
        "Europe",
        "Also this week",
    ]
    assert [s.name for s in select_sections(arts, REGIONS, "", 5)] == ["Europe"]


def test_newest_first_capped_and_empty_sections_left_out() -> None:
    base = datetime(2026, 11, 25, tzinfo=UTC)
    arts = [A(i, ["Asia-Pacific"], base + timedelta(hours=i)) for i in range(8)]
    (section,) = select_sections(arts, REGIONS, "Also", 5)
    assert section.name == "Asia-Pacific"
    assert [a.id for a in section.articles] == [7, 6, 5, 4, 3]


def test_ties_break_by_id_deterministically() -> None:
    arts = [A(2, ["Europe"]), A(9, ["Europe"]), A(5, ["Europe"])]
    (section,) = select_sections(arts, REGIONS, "", 5)
    assert [a.id for a in section.articles] == [9, 5, 2]


def test_editions() -> None:
    arts = [A(1, ["Europe"]), A(2, ["Middle East"]), A(3, ["Sport"])]
    sections = select_sections(arts, REGIONS, "Also", 5)
    assert [s.name for s in edition_sections(sections, None)] == ["Europe", "Middle East", "Also"]
    assert [s.name for s in edition_sections(sections, ["middle east"])] == ["Middle East"]
    assert edition_sections(sections, ["Asia-Pacific"]) == []
    assert edition_key(["Middle East", "europe", "Gone"], REGIONS) == ("Europe", "Middle East")
    assert edition_key(None, REGIONS) is None


def test_articles_of_another_issue_are_not_repeated(app: pipeline.App) -> None:
    config = app.config
    with app.sessions() as session:
        first = pipeline.plan_sections(session, config, date(2026, 11, 26))
        ids = [a.id for s in first for a in s.articles]
        issue = store.create_issue(
            session,
            date(2026, 11, 26),
            "s",
            [(s.name, [a.id for a in s.articles]) for s in first],
            datetime.now(UTC),
        )
        session.commit()
        # An unsent issue hides its articles (it is on its way: a draft, a send to
        # finish), unless its scheduled send was recorded as missed…
        unsent = pipeline.plan_sections(session, config, date(2026, 11, 27))
        assert not set(ids) & {a.id for s in unsent for a in s.articles}
        store.record_missed_send(
            session, date(2026, 11, 26), datetime(2026, 11, 26, 14, tzinfo=UTC), datetime.now(UTC)
        )
        session.commit()
        again = pipeline.plan_sections(session, config, date(2026, 11, 27))
        assert set(ids) <= {a.id for s in again for a in s.articles}
        # …and a sent one always does.
        store.set_issue_status(session, issue, IssueStatus.SENT, datetime.now(UTC))
        session.commit()
        later = pipeline.plan_sections(session, config, date(2026, 11, 27))
        assert not set(ids) & {a.id for s in later for a in s.articles}
        assert {a.id for s in later for a in s.articles}  # the newer ones remain
        # The sent issue itself still renders its frozen selection.
        _, frozen = pipeline.issue_sections(session, config, date(2026, 11, 26))
        assert [a.id for s in frozen for a in s.articles] == ids
