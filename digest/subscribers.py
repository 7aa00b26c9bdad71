"""Import subscribers, and unsubscribe them.

Imports share one core, :func:`import_entries`, fed by the CSV reader (streamed) or the TOML
reader of :mod:`digest.subscriber_files`. The core validates row by row (addresses and
names by :mod:`digest.addresses`), reports rejected rows with their location instead of
stopping, and writes in chunks of :data:`CHUNK_SIZE`: one lookup of the chunk's existing
addresses, one bulk insert, one commit. File-level problems (missing file, bad header,
not UTF-8, broken quoting) are found before the first write, so a bad file never
half-imports.

An import never changes a subscriber's status: an address that unsubscribed or bounced
stays that way however often it reappears in a spreadsheet.

Validation (:func:`normalize_email`, :func:`clean_name`) and the export (:func:`export_csv`,
:func:`consent_record`) live in those two modules and are importable from here too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Any, Final

from sqlalchemy.orm import Session, sessionmaker

from digest import store
from digest.addresses import NAME_MAX, clean_name, normalize_email, printable
from digest.addresses import EmailNormalizer as _EmailNormalizer  # one per import
from digest.errors import UsageError
from digest.models import SubscriberStatus
from digest.subscriber_files import (
    CONSENT_COLUMNS,
    CSV_COLUMNS,
    RawRow,
    RejectedRow,
    check_csv,
    consent_record,
    csv_rows,
    export_csv,
    toml_rows,
)

__all__ = [
    "CHUNK_SIZE",
    "CONSENT_COLUMNS",
    "CSV_COLUMNS",
    "NAME_MAX",
    "ImportProgress",
    "ImportReport",
    "RejectedRow",
    "clean_name",
    "consent_record",
    "export_csv",
    "import_entries",
    "import_path",
    "normalize_email",
    "unsubscribe",
]

CHUNK_SIZE: Final = 1000
"""Rows per lookup/insert/commit: large enough to amortize the round trips, small enough
that the IN (...) list stays far below SQLite's parameter limit and memory stays flat."""


# --- reports ----------------------------------------------------------------------------


@dataclass
class ImportReport:
    """What one import did: each non-blank input row is counted exactly once."""

    added: int = 0
    updated: int = 0
    unchanged: int = 0
    kept_unsubscribed: int = 0
    rejected: list[RejectedRow] = field(default_factory=list)

    @property
    def processed(self) -> int:
        """Input rows dealt with so far (each counted once, whatever became of it)."""
        return (
            self.added + self.updated + self.unchanged + self.kept_unsubscribed + len(self.rejected)
        )

    def summary(self) -> str:
        """One line for the CLI, e.g. ``added 3, updated 1, unchanged 0, …``."""
        return (
            f"added {self.added}, updated {self.updated}, unchanged {self.unchanged}, "
            f"kept unsubscribed {self.kept_unsubscribed}, rejected {len(self.rejected)}"
        )


# --- the import core --------------------------------------------------------------------


class _Missing(Enum):
    # "regions not given" (keep what is stored) differs from "given but empty" (None: all
    # sections), and None is taken by the latter.
    MISSING = "missing"


_MISSING: Final = _Missing.MISSING

_Regions = list[str] | None | _Missing

ImportProgress = Callable[[int, int | None], None]
"""Called with (rows processed, rows in the input or None when unknown) after every chunk."""


@dataclass(frozen=True, slots=True)
class _Valid:
    location: str
    email: str
    name: str  # "" = not given: keep the stored name
    regions: _Regions


class _Rules:
    """The configured regions, indexed for case-insensitive matching."""

    def __init__(self, regions: Sequence[str]) -> None:
        self.names = [r.strip() for r in regions]
        self.by_key = {r.casefold(): r for r in self.names}
        self.order = {r: i for i, r in enumerate(self.names)}

    def resolve(self, raw: object) -> _Regions:
        """Config-spelled regions in config order; raise ``ValueError(reason)`` if unknown."""
        if raw is None:
            return _MISSING
        if isinstance(raw, str):
            parts: list[str] = raw.split(";")
        elif isinstance(raw, list) and all(isinstance(p, str) for p in raw):
            parts = raw
        else:
            raise ValueError("regions must be a list of region names")
        picked: list[str] = []
        for part in parts:
            key = part.strip().casefold()
            if not key:
                continue
            name = self.by_key.get(key)
            if name is None:
                allowed = ", ".join(self.names) or "(none configured)"
                raise ValueError(
                    f"unknown region '{printable(part.strip(), 40)}'; allowed: {allowed} "
                    "(separate several with ';')"
                )
            if name not in picked:
                picked.append(name)
        # Config order makes "Asia;Europe" and "europe;asia" the same stored value, so a
        # re-import that only reorders regions counts as unchanged.
        return sorted(picked, key=self.order.__getitem__) if picked else None


def _validate(row: RawRow, rules: _Rules, normalize: _EmailNormalizer) -> _Valid | RejectedRow:
    location, email, name, regions = row
    if email is None:
        return RejectedRow(location, "", "missing email")
    if not isinstance(email, str):
        return RejectedRow(location, printable(email), "email must be text")
    try:
        address = normalize(email)
    except ValueError as exc:
        return RejectedRow(location, printable(email), printable(str(exc), 300))
    if name is not None and not isinstance(name, str):
        return RejectedRow(location, printable(name), "name must be text")
    try:
        resolved = rules.resolve(regions)
    except ValueError as exc:
        return RejectedRow(location, printable(regions), str(exc))
    return _Valid(location, address, clean_name(name), resolved)


def _import(
    sessions: sessionmaker[Session],
    rows: Iterable[RawRow | RejectedRow],
    regions: Sequence[str],
    source: str,
    now: datetime,
    progress: ImportProgress | None = None,
    total: int | None = None,
) -> ImportReport:
    _require_aware(now)
    rules = _Rules(regions)
    normalize = _EmailNormalizer()
    source = clean_name(source)
    report = ImportReport()
    # Where each accepted address was first seen, for "duplicate of line N". This is the
    # one structure that grows with the file (about 100 bytes per distinct address); the
    # rows themselves and the ORM objects are dropped chunk by chunk.
    seen: dict[str, str] = {}
    chunk: list[_Valid] = []
    for row in rows:
        checked = row if isinstance(row, RejectedRow) else _validate(row, rules, normalize)
        if isinstance(checked, RejectedRow):
            report.rejected.append(checked)
            continue
        first = seen.get(checked.email)
        if first is not None:
            report.rejected.append(
                RejectedRow(checked.location, checked.email, f"duplicate of {first}")
            )
            continue
        seen[checked.email] = checked.location
        chunk.append(checked)
        if len(chunk) >= CHUNK_SIZE:
            _write_chunk(sessions, chunk, source, now, report)
            chunk = []
            if progress is not None:
                progress(report.processed, total)
    if chunk:
        _write_chunk(sessions, chunk, source, now, report)
    if progress is not None:
        progress(report.processed, total)
    return report


def _write_chunk(
    sessions: sessionmaker[Session],
    chunk: Sequence[_Valid],
    source: str,
    now: datetime,
    report: ImportReport,
) -> None:
    added = updated = unchanged = kept = 0
    new: list[dict[str, Any]] = []
    # One transaction per chunk: a crash loses at most one chunk, and re-running the
    # import is safe because it is idempotent.
    with sessions.begin() as session:
        existing = store.subscribers_by_email(session, [row.email for row in chunk])
        for row in chunk:
            sub = existing.get(row.email)
            if sub is None:
                new.append(
                    {
                        "email": row.email,
                        "name": row.name,
                        "regions": None if row.regions is _MISSING else row.regions,
                        "status": SubscriberStatus.ACTIVE,
                        "source": source,
                        "hard_bounces": 0,
                        "created_at": now,
                        "updated_at": now,
                        "subscribed_at": now,
                    }
                )
                continue
            if sub.status != SubscriberStatus.ACTIVE:
                kept += 1
                continue
            # A blank name or absent regions column is "no information", not "erase":
            # importing a bare list of addresses must not wipe names entered earlier.
            name = row.name or sub.name
            wanted = sub.regions if row.regions is _MISSING else row.regions
            if name == sub.name and wanted == sub.regions:
                unchanged += 1
                continue
            sub.name = name
            sub.regions = wanted
            sub.updated_at = now
            updated += 1
        store.add_subscribers(session, new)
        added = len(new)
    report.added += added
    report.updated += updated
    report.unchanged += unchanged
    report.kept_unsubscribed += kept


def _require_aware(now: datetime) -> None:
    # UTCDateTime would refuse a naive value anyway, but only at flush, mid-import.
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime")


def import_entries(
    sessions: sessionmaker[Session],
    entries: Iterable[tuple[str, str, str | None, list[str] | str | None]],
    regions: Sequence[str],
    source: str,
    now: datetime,
    progress: ImportProgress | None = None,
) -> ImportReport:
    """Import ``(location, email, name, regions)`` rows; the core of every import.

    ``location`` names the row in rejections ("line 7"). ``name`` None or blank keeps a
    stored name. ``regions`` is a list or a ';'-separated string matched case-insensitively
    against ``regions`` (the configured ones) and stored in their spelling; None means
    "not given" (new subscribers get every section, existing ones keep theirs), while an
    empty list or string means every section. New subscribers are active, with ``source``
    and ``now`` as created/updated time; existing active ones are updated when name or
    regions differ; unsubscribed and bounced ones are never touched. Within one call the
    first row of an address wins and later ones are rejected as duplicates.

    ``entries`` is consumed lazily and written every :data:`CHUNK_SIZE` valid rows, one
    commit each, so memory does not grow with the input. ``progress`` hears after each
    chunk (the total is ``len(entries)`` when it has one).
    """
    total = len(entries) if isinstance(entries, Sequence) else None
    return _import(sessions, entries, regions, source, now, progress, total)


def import_path(
    sessions: sessionmaker[Session],
    path: Path,
    regions: Sequence[str],
    now: datetime,
    progress: ImportProgress | None = None,
) -> ImportReport:
    """Import subscribers from a ``.csv`` or ``.toml`` file (see :func:`import_entries`).

    CSV: UTF-8 with or without BOM; fields separated by ',' or ';' (as Excel saves in
    locales with a decimal comma; detected from the header) or tabs; header ``email``
    plus optional ``name`` and ``regions`` (any order, any case; a ``status`` column, as
    exported, is ignored); regions separated by ';' (quoted in a ';' file). Rejections
    name the physical line (the header is line 1).
    TOML: ``[[subscribers]]`` tables with ``email``, optional ``name`` and ``regions``
    (a list); rejections name ``subscribers[i]`` (counted from 0, as config errors do).

    Raises :class:`UsageError` naming the file and the fix when the file is missing,
    unreadable, of another type, not UTF-8, malformed, or has a bad header. Those checks
    run before anything is written.

    Example::

        report = import_path(sessions, Path("list.csv"), config.newsletter.regions, now)
        print(report.summary())
    """
    suffix = path.suffix.lower()
    if suffix == ".csv":
        rows = check_csv(path)
        return _import(sessions, csv_rows(path), regions, f"csv:{path.name}", now, progress, rows)
    if suffix == ".toml":
        entries = toml_rows(path)
        source = f"toml:{path.name}"
        return _import(sessions, entries, regions, source, now, progress, len(entries))
    raise UsageError(
        f"{path}: cannot import '{suffix or path.name}' files; give a .csv file with the "
        "header email,name,regions or a .toml file with [[subscribers]] tables"
    )


# --- unsubscribe -----------------------------------------------------------------------


def unsubscribe(session: Session, email_or_id: str | int, now: datetime) -> bool:
    """Mark a subscriber unsubscribed; return True only if this call changed the status.

    ``email_or_id`` is an address (any case, surrounding spaces allowed) or a subscriber
    id (an int, or a string of digits). Unknown or invalid values return False, as does a
    repeat, so an unsubscribe link can be followed any number of times. A bounced
    subscriber who unsubscribes becomes unsubscribed: their explicit wish is the stronger
    fact. The caller owns the session and commits.
    """
    _require_aware(now)
    if isinstance(email_or_id, int):
        sub = store.subscriber_by_id(session, email_or_id)
    elif email_or_id.strip().isascii() and email_or_id.strip().isdecimal():
        sub = store.subscriber_by_id(session, int(email_or_id))
    else:
        try:
            email = normalize_email(email_or_id)
        except ValueError:
            return False
        sub = store.subscriber_by_email(session, email)
    if sub is None or sub.status == SubscriberStatus.UNSUBSCRIBED:
        return False
    sub.status = SubscriberStatus.UNSUBSCRIBED
    sub.unsubscribed_at = now
    sub.updated_at = now
    return True
