"""Import, validate, unsubscribe and export subscribers.

Everything that reaches the ``subscribers`` table passes :func:`normalize_email` and
:func:`clean_name`, because those values end up in message headers: a stored CR/LF would
let one line of a spreadsheet inject headers into every issue.

Imports share one core, :func:`import_entries`, fed by a CSV reader (streamed) or a TOML
reader. The core validates row by row, reports rejected rows with their location instead
of stopping, and writes in chunks of :data:`CHUNK_SIZE`: one lookup of the chunk's existing
addresses, one bulk insert, one commit. File-level problems (missing file, bad header,
not UTF-8, broken quoting) are found before the first write, so a bad file never
half-imports.

An import never changes a subscriber's status: an address that unsubscribed or bounced
stays that way however often it reappears in a spreadsheet.
"""

from __future__ import annotations

import csv
import re
import tomllib
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Any, Final, TextIO

from email_validator import EmailNotValidError, validate_email
from sqlalchemy.orm import Session, sessionmaker

from digest import store
from digest.errors import UsageError
from digest.models import Subscriber, SubscriberStatus, consent_source
from digest.spreadsheet import neutralize, restore

CHUNK_SIZE: Final = 1000
"""Rows per lookup/insert/commit: large enough to amortize the round trips, small enough
that the IN (...) list stays far below SQLite's parameter limit and memory stays flat."""

NAME_MAX: Final = 200  # the width of subscribers.name (and .source)
CSV_COLUMNS: Final = ("email", "name", "regions")
# ``export_csv`` writes a status column and the consent record; accepting (and ignoring)
# them lets an export be re-imported as is. Import never sets a status or a consent, so
# honouring them is not an option.
CONSENT_COLUMNS: Final = ("source", "subscribed_at", "confirmed_at")
_IGNORED_COLUMNS: Final = ("status", *CONSENT_COLUMNS)
_TOML_KEYS: Final = frozenset(CSV_COLUMNS)
_VALUE_MAX: Final = 80
# No legal address is longer than 254 characters; the slack allows surrounding spaces.
# Anything longer is rejected before the (comparatively slow) validator sees it.
_EMAIL_RAW_MAX: Final = 1000
# RFC 5322 3.2.3 dot-atom of ASCII atext: the local parts email_validator accepts as they
# are, without normalization (its own fast path uses the same rule).
_ASCII_DOT_ATOM: Final = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*\Z"
)
_EMAIL_MAX_BYTES: Final = 254  # RFC 5321 path limit, as email_validator applies it
_DOMAIN_MEMO_MAX: Final = 10_000
# Control, format (bidi overrides, zero-width), surrogate, private-use and unassigned
# characters, and the Unicode line/paragraph separators, which some mail code treats as
# line breaks. None of them belongs in an address.
_UNSAFE_CATEGORIES: Final = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
_NAMED_ESCAPES: Final = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_UTF8_FIX: Final = "save it as UTF-8 (in Excel: Save As → 'CSV UTF-8')"


# --- validation -------------------------------------------------------------------------


def normalize_email(raw: str) -> str:
    """Return the canonical stored form of an address, or raise ``ValueError(reason)``.

    Any control or header-breaking character anywhere in ``raw`` rejects it (checked
    before trimming, so ``"a@example.org\\r\\nBcc: x"`` fails rather than being cut);
    surrounding spaces are then trimmed and the address validated by ``email_validator``
    without DNS lookups and without SMTPUTF8. The result is the ASCII form (IDN domains in
    punycode), lowercased entirely: mail systems treat the local part case-insensitively
    in practice, and two rows differing only in case must be one subscriber, not two
    deliveries.

    >>> normalize_email("  Ann.Lee@Example.ORG ")
    'ann.lee@example.org'
    """
    return _EmailNormalizer()(raw)


class _EmailNormalizer:
    """:func:`normalize_email` with a memo of validated domains, for bulk imports.

    ``email_validator`` spends most of its ~40 µs an address on the domain (IDNA/UTS-46
    checks), and a list of 100,000 addresses has a few thousand distinct
    domains. An address whose local part is a plain ASCII dot-atom is accepted by the
    validator exactly when its domain is and the whole fits in 254 bytes (it checks the
    local part's length only in strict mode), and its ASCII form is then
    ``local@ascii_domain``; so such addresses reuse the domain's verdict. Everything else,
    and every rejection, goes through the full validator, which words the reason.
    One instance lives for one import: no cache outlives the call that made it.
    """

    def __init__(self) -> None:
        # domain as written → (ASCII domain, its longest UTF-8 length in any of the forms
        # the validator length-checks), or None when the domain is not valid.
        self._domains: dict[str, tuple[str, int] | None] = {}

    def __call__(self, raw: str) -> str:
        bad = _first_unsafe(raw)
        if bad is not None:
            raise ValueError(
                f"contains a control character ({_printable(bad)}); an address cannot hold "
                "line breaks or invisible characters"
            )
        text = raw.strip()
        if not text:
            raise ValueError("the email address is empty")
        if len(text) > _EMAIL_RAW_MAX:
            raise ValueError("the email address is too long")
        local, _, domain = text.partition("@")
        if domain and _ASCII_DOT_ATOM.match(local):
            known = self._domain(domain)
            if known is not None and len(local) + 1 + known[1] <= _EMAIL_MAX_BYTES:
                return f"{local}@{known[0]}".lower()
        return _validated(text)

    def _domain(self, domain: str) -> tuple[str, int] | None:
        if domain in self._domains:
            return self._domains[domain]
        info: tuple[str, int] | None
        try:
            # "a" is the shortest valid local part, so a domain refused here (even for
            # length) is refused with any other local part too.
            result = validate_email(f"a@{domain}", check_deliverability=False, allow_smtputf8=False)
        except EmailNotValidError:
            info = None
        else:
            ascii_domain = result.ascii_domain
            longest = max(len(domain.encode()), len(result.domain.encode()), len(ascii_domain))
            info = (ascii_domain, longest)
        if len(self._domains) >= _DOMAIN_MEMO_MAX:
            self._domains.clear()  # bounded memory on lists with absurdly many domains
        self._domains[domain] = info
        return info


def _validated(text: str) -> str:
    try:
        result = validate_email(text, check_deliverability=False, allow_smtputf8=False)
    except EmailNotValidError as exc:
        raise ValueError(str(exc)) from None
    # With allow_smtputf8=False the validator rejects anything without an ASCII form, so
    # the fallback only satisfies the type checker.
    return (result.ascii_email or result.normalized).lower()


def clean_name(raw: str | None) -> str:
    """A display name safe to store and put in a header: one line, at most 200 characters.

    Whitespace of any kind (tabs, line breaks, U+2028) becomes a single space so that
    "Ann\\nLee" stays two words; other control/format characters (category C*) are removed.
    """
    if not raw:
        return ""
    # Fast path: a printable string holds no category C character and no line separator.
    if not raw.isprintable():
        raw = "".join(
            " " if ch.isspace() else ch
            for ch in raw
            if ch.isspace() or unicodedata.category(ch)[0] != "C"
        )
    name = " ".join(raw.split())
    return name[:NAME_MAX].rstrip() if len(name) > NAME_MAX else name


def _first_unsafe(text: str) -> str | None:
    # isprintable() is False only for categories C*, Z* other than the ASCII space, so the
    # common case (a plain address) costs one C-level scan.
    if text.isprintable():
        return None
    for ch in text:
        if unicodedata.category(ch) in _UNSAFE_CATEGORIES:
            return ch
    return None


def _printable(value: object, limit: int = _VALUE_MAX) -> str:
    """``value`` as one printable line, escaped like ``repr`` and cut to about ``limit``."""
    text = value if isinstance(value, str) else repr(value)
    out: list[str] = []
    size = 0
    for ch in text:
        piece = _NAMED_ESCAPES.get(ch)
        if piece is None:
            # As repr does: escape everything but the plain space that would not show as
            # itself (controls, line separators, NBSP and other invisible spaces).
            if not ch.isprintable():
                code = ord(ch)
                piece = (
                    f"\\x{code:02x}"
                    if code < 0x100
                    else f"\\u{code:04x}"
                    if code < 0x10000
                    else f"\\U{code:08x}"
                )
            else:
                piece = ch
        if size + len(piece) > limit:
            out.append("…")
            break
        out.append(piece)
        size += len(piece)
    return "".join(out)


# --- reports ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RejectedRow:
    """One input row that was not imported, and why."""

    line: str  # "line 7" for CSV, "subscribers[3]" for TOML
    value: str  # the offending value, printable and truncated
    reason: str


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

# (location, email, name, regions) as read, before any validation; TOML can put any
# type in any field, so the core checks types itself.
_RawRow = tuple[str, object, object, object]
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
                    f"unknown region '{_printable(part.strip(), 40)}'; allowed: {allowed} "
                    "(separate several with ';')"
                )
            if name not in picked:
                picked.append(name)
        # Config order makes "Asia;Europe" and "europe;asia" the same stored value, so a
        # re-import that only reorders regions counts as unchanged.
        return sorted(picked, key=self.order.__getitem__) if picked else None


def _validate(row: _RawRow, rules: _Rules, normalize: _EmailNormalizer) -> _Valid | RejectedRow:
    location, email, name, regions = row
    if email is None:
        return RejectedRow(location, "", "missing email")
    if not isinstance(email, str):
        return RejectedRow(location, _printable(email), "email must be text")
    try:
        address = normalize(email)
    except ValueError as exc:
        return RejectedRow(location, _printable(email), _printable(str(exc), 300))
    if name is not None and not isinstance(name, str):
        return RejectedRow(location, _printable(name), "name must be text")
    try:
        resolved = rules.resolve(regions)
    except ValueError as exc:
        return RejectedRow(location, _printable(regions), str(exc))
    return _Valid(location, address, clean_name(name), resolved)


def _import(
    sessions: sessionmaker[Session],
    rows: Iterable[_RawRow | RejectedRow],
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


# --- files ------------------------------------------------------------------------------


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
        rows = _check_csv(path)
        return _import(sessions, _csv_rows(path), regions, f"csv:{path.name}", now, progress, rows)
    if suffix == ".toml":
        entries = _toml_rows(path)
        source = f"toml:{path.name}"
        return _import(sessions, entries, regions, source, now, progress, len(entries))
    raise UsageError(
        f"{path}: cannot import '{suffix or path.name}' files; give a .csv file with the "
        "header email,name,regions or a .toml file with [[subscribers]] tables"
    )


def _unreadable(path: Path, exc: OSError) -> UsageError:
    if isinstance(exc, FileNotFoundError):
        return UsageError(f"{path}: no such file; check the path")
    if isinstance(exc, IsADirectoryError):
        return UsageError(f"{path}: is a folder; give the path of a .csv or .toml file")
    return UsageError(
        f"{path}: cannot read the file ({exc.strerror or exc}); check its permissions"
    )


def _open_csv(path: Path) -> TextIO:
    try:
        # utf-8-sig drops the BOM Excel writes; newline="" lets csv handle quoted newlines.
        return path.open(encoding="utf-8-sig", newline="")
    except OSError as exc:
        raise _unreadable(path, exc) from None


_DELIMITER_NAMES: Final = {",": "commas", ";": "semicolons", "\t": "tabs"}
_HEADER_MAX: Final = 65536  # enough for any header line; a file without newlines stops here


def _delimiter(f: TextIO) -> str:
    """The field delimiter, read off the header line: ',' or ';' (what Excel writes where
    the decimal separator is a comma) or a tab. ``f`` is rewound for the reader.

    Only the header is sniffed: data rows hold ';' inside cells (the regions), which
    would mislead a guess made over them.
    """
    header = f.readline(_HEADER_MAX)
    f.seek(0)
    try:
        return csv.Sniffer().sniff(header, delimiters=",;\t").delimiter
    except csv.Error:
        return ","  # one column (or none): the delimiter does not matter


def _csv_columns(path: Path, header: list[str] | None) -> dict[str, int]:
    if header is None:
        raise UsageError(
            f"{path}: the file is empty; its first line must be the header email,name,regions"
        )
    columns: dict[str, int] = {}
    for i, cell in enumerate(header):
        key = cell.strip().casefold()
        if key in columns:
            raise UsageError(
                f"{path}: line 1: column '{_printable(key, 40)}' appears twice; keep one"
            )
        if key not in CSV_COLUMNS and key not in _IGNORED_COLUMNS:
            raise UsageError(
                f"{path}: line 1 must be the header email,name,regions (separated by commas "
                "or semicolons; "
                f"name and regions optional), got '{_printable(','.join(header), 60)}'"
            )
        columns[key] = i
    if "email" not in columns:
        raise UsageError(
            f"{path}: line 1 has no 'email' column; the header must be email,name,regions"
        )
    return columns


def _check_csv(path: Path) -> int:
    """Read the whole file once without writing, so encoding and quoting errors stop the
    import before any row is stored (a half-imported list is worse than none). Returns
    the number of non-blank data rows (the import's progress total)."""
    rows = 0
    with _open_csv(path) as f:
        reader = csv.reader(f)  # replaced once the delimiter is known
        try:
            reader = csv.reader(f, delimiter=_delimiter(f))
            _csv_columns(path, next(reader, None))
            for cells in reader:
                if any(cell.strip() for cell in cells):
                    rows += 1
        except UnicodeDecodeError as exc:
            raise _not_utf8(path, exc) from None
        except csv.Error as exc:
            raise UsageError(
                f"{path}: line {reader.line_num}: {exc}; fix the quoting of that row"
            ) from None
        except OSError as exc:
            raise _unreadable(path, exc) from None
    return rows


def _not_utf8(path: Path, exc: UnicodeDecodeError) -> UsageError:
    # The decoder reports an offset within its buffer, which means nothing to an editor;
    # rescan the bytes to name the line. Newlines are ASCII, so a UTF-8 sequence never
    # spans two lines and each line can be decoded on its own.
    try:
        with path.open("rb") as f:
            offset = 0
            for number, line in enumerate(f, start=1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as bad:
                    return UsageError(
                        f"{path}: line {number} is not valid UTF-8 (byte {offset + bad.start}, "
                        f"0x{line[bad.start]:02x}); {_UTF8_FIX}"
                    )
                offset += len(line)
    except OSError:
        pass
    return UsageError(f"{path}: not valid UTF-8 ({exc.reason}); {_UTF8_FIX}")


def _csv_rows(path: Path) -> Iterator[_RawRow | RejectedRow]:
    """Stream the rows of an already checked CSV file, with their physical line numbers."""
    last = 1
    with _open_csv(path) as f:
        reader = csv.reader(f)  # replaced once the delimiter is known
        try:
            delimiter = _delimiter(f)
            reader = csv.reader(f, delimiter=delimiter)
            header = next(reader, None)
            columns = _csv_columns(path, header)
            width = len(header or ())
            email_at = columns["email"]
            name_at = columns.get("name")
            regions_at = columns.get("regions")
            last = reader.line_num
            for cells in reader:
                # line_num is where the row *ended*; a quoted field can span lines, and
                # editors look for the line where the row starts.
                location = f"line {last + 1}"
                last = reader.line_num
                if not any(cell.strip() for cell in cells):
                    continue  # blank lines and ",," rows that spreadsheets leave behind
                if len(cells) > width:
                    yield RejectedRow(
                        location,
                        _printable(delimiter.join(cells)),
                        f"{len(cells)} fields but the header has {width}; "
                        f"quote values that contain {_DELIMITER_NAMES[delimiter]}",
                    )
                    continue
                yield (
                    location,
                    _cell(cells, email_at) or "",
                    _cell(cells, name_at),
                    _cell(cells, regions_at),
                )
        except UnicodeDecodeError as exc:
            # Only if the file changed since _check_csv; earlier chunks are committed.
            raise UsageError(
                f"{_not_utf8(path, exc)} (rows before line {last + 1} were imported)"
            ) from None
        except csv.Error as exc:
            raise UsageError(
                f"{path}: line {reader.line_num}: {exc}; fix the quoting of that row "
                f"(rows before line {last + 1} were imported)"
            ) from None


def _cell(cells: list[str], index: int | None) -> str | None:
    """The cell of a column; None when the file has no such column."""
    if index is None:
        return None
    # A short row leaves its trailing cells empty, the same as ",,". An exported cell
    # that was made spreadsheet-safe ('=…) comes back as it was.
    return restore(cells[index]) if index < len(cells) else ""


def _toml_rows(path: Path) -> list[_RawRow | RejectedRow]:
    """Parse a TOML file completely (tomllib cannot stream) into rows for the core."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise _unreadable(path, exc) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise UsageError(
            f"{path}: line {line} is not valid UTF-8 (byte {exc.start}); save it as UTF-8"
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: not valid TOML: {exc}; fix that line") from None
    entries = data.get("subscribers")
    if not isinstance(entries, list):
        raise UsageError(
            f"{path}: no [[subscribers]] tables; add one per subscriber with "
            'email = "…" (and optional name, regions)'
        )
    rows: list[_RawRow | RejectedRow] = []
    for i, entry in enumerate(entries):
        location = f"subscribers[{i}]"
        if not isinstance(entry, dict):
            rows.append(
                RejectedRow(location, _printable(entry), "not a table; write it as [[subscribers]]")
            )
            continue
        unknown = sorted(set(entry) - _TOML_KEYS)
        if unknown:
            # A misspelt "region" would otherwise silently subscribe to every section.
            rows.append(
                RejectedRow(
                    location,
                    _printable(unknown[0], 40),
                    f"unknown key '{_printable(unknown[0], 40)}'; allowed: email, name, regions",
                )
            )
            continue
        rows.append((location, entry.get("email"), entry.get("name"), entry.get("regions")))
    return rows


# --- unsubscribe and export -------------------------------------------------------------


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


def consent_record(sub: Subscriber) -> tuple[str, str, str]:
    """``(source, subscribed_at, confirmed_at)`` of a subscriber: ``import`` or ``signup``
    and ISO 8601 UTC times (empty when unknown or not confirmed)."""

    def iso(value: datetime | None) -> str:
        return value.astimezone(UTC).isoformat(timespec="seconds") if value else ""

    return (
        str(consent_source(sub.source)),
        iso(sub.subscribed_at or sub.created_at),
        iso(sub.confirmed_at),
    )


def export_csv(session: Session, out: TextIO) -> int:
    """Write every subscriber as CSV; return the row count.

    Columns: ``email,name,regions,status`` and then the consent record
    ``source,subscribed_at,confirmed_at`` (see :func:`consent_record`).
    Regions are joined by ';' (empty = every section), so the file re-imports unchanged.
    Cells a spreadsheet would run as a formula (``=``, ``+``, ``-``, ``@``, tab, CR first)
    get a leading ``'`` (see :mod:`digest.spreadsheet`); import takes it off. Lines end
    in "\\n" rather than csv's default "\\r\\n", which a text-mode stream on Windows
    would turn into "\\r\\r\\n". Subscribers are streamed in id-ordered batches; note
    that this detaches objects from ``session`` as it goes.
    """
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(("email", "name", "regions", "status", *CONSENT_COLUMNS))
    count = 0
    for sub in store.iter_subscribers(session):
        row = (
            sub.email,
            sub.name,
            ";".join(sub.regions or ()),
            str(sub.status),
            *consent_record(sub),
        )
        writer.writerow([neutralize(cell) for cell in row])
        count += 1
    return count
