"""Pure selection rules: articles + rules + date → sections.

Nothing here touches the network, the database or the clock: the edition date is passed
in, so an editor can predict (and a test can pin) exactly what a round-up will carry.

The rules, in the words an editor would use:

* The round-up for date D covers the ``lookback_days`` days that end at midnight after D,
  in the schedule's time zone.
* Each article goes under the first configured region (config order) that matches one of
  its categories, case-insensitively; articles matching none go to the catch-all section
  (left out when ``catch_all`` is empty).
* Newest first; at most ``max_per_region`` per section; empty sections are left out.
* Articles that appeared in an earlier sent round-up are excluded before these rules run
  (``store.candidate_articles``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from typing import Generic, Protocol, TypeVar, cast


class Selectable(Protocol):
    """What selection needs of an article."""

    @property
    def id(self) -> int: ...
    @property
    def categories(self) -> list[str]: ...
    @property
    def published_at(self) -> datetime: ...


# Unbounded on purpose: mypy does not see SQLAlchemy's Mapped[...] attributes as
# satisfying a Protocol bound of a TypeVar (it does for plain assignment), so the
# functions below view their items through ``_view`` instead.
A = TypeVar("A")


def _view(item: object) -> Selectable:
    return cast(Selectable, item)


@dataclass
class Section(Generic[A]):
    """One heading of the round-up and its articles, newest first."""

    name: str
    articles: list[A] = field(default_factory=list)
    is_region: bool = True


def window(edition_date: date, tz: tzinfo, lookback_days: int) -> tuple[datetime, datetime]:
    """The UTC [start, end) covered by the round-up for ``edition_date``.

    Both ends are local midnights, so a daylight-saving change inside the week shifts
    the UTC span by an hour rather than shifting which local days are covered.
    """
    end_day = edition_date + timedelta(days=1)
    start_day = end_day - timedelta(days=lookback_days)
    end = datetime.combine(end_day, time(0), tzinfo=tz)
    start = datetime.combine(start_day, time(0), tzinfo=tz)
    return start.astimezone(UTC), end.astimezone(UTC)


def select_sections(
    articles: Sequence[A],
    regions: Sequence[str],
    catch_all: str,
    max_per_region: int,
) -> list[Section[A]]:
    """Group ``articles`` into sections by the rules in this module's docstring."""
    by_key = {r.casefold(): Section[A](r) for r in regions}
    rest = Section[A](catch_all, is_region=False)
    # Newest first; the id breaks ties so two runs never disagree on order.
    ordered = sorted(articles, key=lambda a: (_view(a).published_at, _view(a).id), reverse=True)
    for article in ordered:
        tags = {c.strip().casefold() for c in _view(article).categories}
        target = next((s for key, s in by_key.items() if key in tags), None)
        if target is None:
            if not catch_all:
                continue
            target = rest
        if len(target.articles) < max_per_region:
            target.articles.append(article)
    sections = [s for s in by_key.values() if s.articles]
    if catch_all and rest.articles:
        sections.append(rest)
    return sections


def edition_sections(
    sections: Sequence[Section[A]], regions: Sequence[str] | None
) -> list[Section[A]]:
    """The part of an issue one subscriber gets.

    ``regions`` None means every section; otherwise only those regions' sections, and
    never the catch-all (a reader who picked regions asked for just those).
    """
    if regions is None:
        return list(sections)
    wanted = {r.casefold() for r in regions}
    return [s for s in sections if s.is_region and s.name.casefold() in wanted]


def edition_key(regions: Sequence[str] | None, configured: Sequence[str]) -> tuple[str, ...] | None:
    """A canonical key for subscribers who share an edition (same regions, config order).

    Regions no longer in the config are ignored; ``None`` stands for "everything".
    """
    if regions is None:
        return None
    wanted = {r.casefold() for r in regions}
    return tuple(r for r in configured if r.casefold() in wanted)
