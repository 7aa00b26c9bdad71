"""Reports as aligned tables for people and as JSON for scripts (``--json``).

A report is a list of :class:`Column`: one line each, naming the JSON key, the table
heading and how to get the value from a row. The same list drives both outputs, so a
new column (``Column("source", "SOURCE", lambda s: s.source)``) is one line and appears
in the table and in the JSON at once. JSON keys are part of the interface (documented
in the README): add keys, never rename or remove one.

Values are JSON-ready (dates as ISO strings, regions as a list); the table prints them
on one line each (lists joined with ";", None as "") and aligns them by display width,
so names with wide characters (CJK, emoji) keep the columns straight.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import TYPE_CHECKING, Any, Generic, TextIO, TypeVar

from rich.cells import cell_len

R = TypeVar("R")
JSON = Any  # str | int | float | bool | None | list | dict, as json.dumps takes them

_BREAKS = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]+")


def iso(value: date | datetime | None) -> str | None:
    """A date or timestamp as ISO 8601 text (timestamps in UTC, as stored)."""
    return None if value is None else value.isoformat()


def cell(value: JSON) -> str:
    """How a table shows a value: one line; lists joined by ';'; None as empty."""
    if value is None:
        return ""
    if isinstance(value, list):
        value = ";".join(str(v) for v in value)
    return " ".join(_BREAKS.sub(" ", str(value)).split())


@dataclass(frozen=True)
class Column(Generic[R]):
    """One column of a report: JSON key, table heading, and the value of a row."""

    key: str
    header: str
    get: Callable[[R], JSON]
    show: Callable[[JSON], str] = cell
    right: bool = False  # numbers read best right-aligned
    in_table: bool = True  # False: JSON only (too wide or too detailed for the table)


def records(columns: Sequence[Column[R]], rows: Iterable[R]) -> Iterator[dict[str, JSON]]:
    """Each row as a JSON object with every column's key."""
    for row in rows:
        yield {c.key: c.get(row) for c in columns}


def table(columns: Sequence[Column[R]], rows: Iterable[R]) -> list[str]:
    """The rows as aligned text lines, headings first; two spaces between columns."""
    shown = [c for c in columns if c.in_table]
    cells = [[c.header for c in shown]]
    cells += [[c.show(c.get(row)) for c in shown] for row in rows]
    widths = [max(cell_len(line[i]) for line in cells) for i in range(len(shown))]
    lines = []
    for line in cells:
        parts = []
        for i, (text, col) in enumerate(zip(line, shown, strict=True)):
            pad = " " * (widths[i] - cell_len(text))
            last = i == len(shown) - 1
            parts.append(pad + text if col.right else text + ("" if last else pad))
        lines.append("  ".join(parts).rstrip())
    return lines


def write_json(document: JSON, out: TextIO) -> None:
    """One JSON document, UTF-8 as is (no \\u escapes), ending in a newline."""
    json.dump(document, out, ensure_ascii=False, indent=2)
    out.write("\n")


def write_json_list(key: str, items: Iterable[dict[str, JSON]], out: TextIO) -> None:
    """``{"key": [item, …]}`` written item by item, so a long list never sits in memory."""
    out.write("{" + json.dumps(key) + ": [")
    first = True
    for item in items:
        out.write(("\n  " if first else ",\n  ") + json.dumps(item, ensure_ascii=False))
        first = False
    out.write("\n]}\n" if not first else "]}\n")


# --- the reports ---------------------------------------------------------------------------
# The column lists below are the reports' whole definition: the CLI prints them as a table
# or, with --json, as the JSON the README documents.

if TYPE_CHECKING:
    from digest.models import Subscriber
    from digest.status import FailedRow, IssueStatusRow, StatusReport


def _or_dash(value: JSON) -> str:
    # "-" rather than a blank: the table's last column would otherwise just end.
    return cell(value) or "-"


def consent_record(sub: Subscriber) -> tuple[str, str, str]:
    """``(source, subscribed_at, confirmed_at)``, as the export writes them."""
    from digest.subscriber_files import consent_record as record

    return record(sub)


def _pending(counts: dict[str, int]) -> int | None:
    # "sending" rows of a stopped run are pending to anyone reading the report.
    return counts["pending"] + counts["sending"] if counts else None


SUBSCRIBER_COLUMNS: list[Column[Subscriber]] = [
    Column("email", "EMAIL", lambda s: s.email),
    Column("status", "STATUS", lambda s: str(s.status)),
    Column("regions", "REGIONS", lambda s: s.regions, lambda v: cell(v) if v else "(all)"),
    Column("name", "NAME", lambda s: s.name),
    # The consent record, as `subscribers export` writes it (import/signup, UTC times).
    Column("source", "SOURCE", lambda s: consent_record(s)[0]),
    Column("subscribed_at", "SUBSCRIBED", lambda s: consent_record(s)[1] or None),
    Column("confirmed_at", "CONFIRMED", lambda s: consent_record(s)[2] or None, _or_dash),
    Column("origin", "ORIGIN", lambda s: s.source, in_table=False),  # csv:list.csv, signup…
    Column("unsubscribed_at", "UNSUBSCRIBED", lambda s: iso(s.unsubscribed_at), in_table=False),
    Column("hard_bounces", "BOUNCES", lambda s: s.hard_bounces, in_table=False),
]

ISSUE_COLUMNS: list[Column[IssueStatusRow]] = [
    Column("edition_date", "EDITION", lambda r: iso(r.edition_date)),
    Column("status", "STATUS", lambda r: r.status),
    Column("sent", "SENT", lambda r: r.counts.get("sent"), right=True),
    Column("deferred", "DEFERRED", lambda r: r.counts.get("deferred"), right=True),
    Column("failed", "FAILED", lambda r: r.counts.get("failed"), right=True),
    Column("skipped", "SKIPPED", lambda r: r.counts.get("skipped"), right=True),
    Column("pending", "PENDING", lambda r: _pending(r.counts), right=True),
    Column("subject", "SUBJECT", lambda r: r.subject),
]

FAILED_COLUMNS: list[Column[FailedRow]] = [
    Column("edition_date", "EDITION", lambda r: iso(r.edition_date)),
    Column("email", "EMAIL", lambda r: r.email),
    Column("attempts", "ATTEMPTS", lambda r: r.attempts, right=True),
    Column("error", "ERROR", lambda r: r.error),
]


def status_document(report: StatusReport) -> dict[str, JSON]:
    """``digest status --json``: one object; add keys here, never rename one."""
    from digest.models import SubscriberStatus

    return {
        "subscribers": {s.value: report.subscribers.get(s.value, 0) for s in SubscriberStatus},
        "articles": report.articles,
        "issues": list(records(ISSUE_COLUMNS, report.issues)),
        "missed": [iso(d) for d in report.missed],
        # The relay's hour/day quota is full: nothing more is sent until resumes_at.
        "paused": None
        if report.paused is None
        else {
            "window": report.paused.window,
            "limit": report.paused.limit,
            "pending": report.pending,
            "resumes_at": iso(report.paused.resumes_at),
        },
    }


def status_lines(report: StatusReport) -> list[str]:
    """``digest status`` for people: the subscriber line, then issues and missed weeks,
    newest first."""
    from digest.status import IssueStatusRow

    subs = report.subscribers
    lines = [
        f"subscribers: {subs.get('active', 0)} active, {subs.get('unsubscribed', 0)} "
        f"unsubscribed, {subs.get('bounced', 0)} bounced; articles stored: {report.articles}"
    ]
    if report.paused_line:
        lines.append(report.paused_line)
    missed = [
        IssueStatusRow(
            d,
            "MISSED",
            "not sent: the scheduler was down at send time (past misfire_grace_hours); "
            f"`digest send --date {d}` sends it late",
            {},
        )
        for d in report.missed
    ]
    rows = sorted([*report.issues, *missed], key=lambda r: r.edition_date, reverse=True)
    return [*lines, *table(ISSUE_COLUMNS, rows)] if rows else [*lines, "no issues yet"]
