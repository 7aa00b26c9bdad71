"""Subscriber lists as files: the CSV and TOML readers an import reads, and the CSV export.

The readers turn a file into ``(location, email, name, regions)`` rows for the import core
(:func:`digest.subscribers.import_entries`), or :class:`RejectedRow` for a row they cannot
read. File-level problems (missing file, bad header, not UTF-8, broken quoting) raise
:class:`~digest.errors.UsageError` naming the file and the fix; :func:`check_csv` finds them
before the first write, so a bad file never half-imports.

The export writes every subscriber with the consent record, spreadsheet-safe
(:mod:`digest.spreadsheet`), so that the file re-imports unchanged.
"""

from __future__ import annotations

import csv
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, TextIO

from sqlalchemy.orm import Session

from digest import store
from digest.addresses import printable
from digest.errors import UsageError
from digest.models import Subscriber, consent_source
from digest.spreadsheet import neutralize, restore

CSV_COLUMNS: Final = ("email", "name", "regions")
# ``export_csv`` writes a status column and the consent record; accepting (and ignoring)
# them lets an export be re-imported as is. Import never sets a status or a consent, so
# honouring them is not an option.
CONSENT_COLUMNS: Final = ("source", "subscribed_at", "confirmed_at")
_IGNORED_COLUMNS: Final = ("status", *CONSENT_COLUMNS)
_TOML_KEYS: Final = frozenset(CSV_COLUMNS)
_UTF8_FIX: Final = "save it as UTF-8 (in Excel: Save As → 'CSV UTF-8')"

# (location, email, name, regions) as read, before any validation; TOML can put any
# type in any field, so the import core checks types itself.
RawRow = tuple[str, object, object, object]


@dataclass(frozen=True)
class RejectedRow:
    """One input row that was not imported, and why."""

    line: str  # "line 7" for CSV, "subscribers[3]" for TOML
    value: str  # the offending value, printable and truncated
    reason: str


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
                f"{path}: line 1: column '{printable(key, 40)}' appears twice; keep one"
            )
        if key not in CSV_COLUMNS and key not in _IGNORED_COLUMNS:
            raise UsageError(
                f"{path}: line 1 must be the header email,name,regions (separated by commas "
                "or semicolons; "
                f"name and regions optional), got '{printable(','.join(header), 60)}'"
            )
        columns[key] = i
    if "email" not in columns:
        raise UsageError(
            f"{path}: line 1 has no 'email' column; the header must be email,name,regions"
        )
    return columns


def check_csv(path: Path) -> int:
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


def csv_rows(path: Path) -> Iterator[RawRow | RejectedRow]:
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
                        printable(delimiter.join(cells)),
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
            # Only if the file changed since check_csv; earlier chunks are committed.
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


def toml_rows(path: Path) -> list[RawRow | RejectedRow]:
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
    rows: list[RawRow | RejectedRow] = []
    for i, entry in enumerate(entries):
        location = f"subscribers[{i}]"
        if not isinstance(entry, dict):
            rows.append(
                RejectedRow(location, printable(entry), "not a table; write it as [[subscribers]]")
            )
            continue
        unknown = sorted(set(entry) - _TOML_KEYS)
        if unknown:
            # A misspelt "region" would otherwise silently subscribe to every section.
            rows.append(
                RejectedRow(
                    location,
                    printable(unknown[0], 40),
                    f"unknown key '{printable(unknown[0], 40)}'; allowed: email, name, regions",
                )
            )
            continue
        rows.append((location, entry.get("email"), entry.get("name"), entry.get("regions")))
    return rows


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
