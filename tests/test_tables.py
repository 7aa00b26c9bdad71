"""`status`, `subscribers list`, `deliveries --failed`: aligned tables; --json parsed back."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from rich.cells import cell_len

from digest import pipeline
from digest.cli import main
from digest.config import load_config
from digest.tables import Column, records, table
from tests.conftest import Recorder
from tests.test_send import D

SUBSCRIBER_KEYS = {
    "email",
    "name",
    "status",
    "regions",
    "source",
    "subscribed_at",
    "confirmed_at",
    "origin",
    "unsubscribed_at",
    "hard_bounces",
}
ISSUE_KEYS = {
    "edition_date",
    "status",
    "subject",
    "sent",
    "deferred",
    "failed",
    "skipped",
    "pending",
}


def run(config_path: Path, *args: str) -> Result:
    result = CliRunner().invoke(main, ["--config", str(config_path), *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


@pytest.fixture
def sent(config_path: Path, tmp_path: Path, smtp_server: tuple[object, Recorder]) -> Path:
    """Four subscribers (wide and awkward names), one refused with a two-line reply."""
    _, server = smtp_server
    (tmp_path / "subs.csv").write_text(
        "email,name,regions\n"
        "ada@example.org,Ada & Co 🦊,\n"
        "kofi@example.org,寺田 𝔘 Kofi,Europe;Middle East\n"
        "gone@example.org,Gone,\n"
        "left@example.org,Left,Asia-Pacific\n",
        encoding="utf-8",
    )
    for args in (["init"], ["fetch"], ["subscribers", "import", str(tmp_path / "subs.csv")]):
        assert run(config_path, *args).exit_code == 0
    assert run(config_path, "unsubscribe", "left@example.org").exit_code == 0
    server.rcpt_replies = {"gone@example.org": "550-5.1.1 no such user\r\n550 5.1.1 try 🦊 never"}
    assert run(config_path, "send", "--date", str(D)).exit_code == 1
    return config_path


def test_subscribers_list_json_parses_back(sent: Path) -> None:
    result = run(sent, "subscribers", "list", "--json")
    assert result.exit_code == 0
    doc = json.loads(result.stdout)
    assert list(doc) == ["subscribers"]
    subs = {s["email"]: s for s in doc["subscribers"]}
    assert set(subs) == {
        "ada@example.org",
        "kofi@example.org",
        "gone@example.org",
        "left@example.org",
    }
    for s in subs.values():
        assert set(s) == SUBSCRIBER_KEYS
        assert datetime.fromisoformat(s["subscribed_at"]).tzinfo is not None
        assert s["confirmed_at"] is None  # imported, never confirmed
    assert subs["ada@example.org"]["name"] == "Ada & Co 🦊"
    assert subs["ada@example.org"]["regions"] is None  # every section
    assert subs["kofi@example.org"]["regions"] == ["Europe", "Middle East"]
    assert subs["left@example.org"]["status"] == "unsubscribed"
    assert subs["left@example.org"]["unsubscribed_at"] is not None
    assert subs["gone@example.org"]["hard_bounces"] == 1
    assert subs["ada@example.org"]["source"] == "import"
    assert subs["ada@example.org"]["origin"] == "csv:subs.csv"


def test_tables_align_by_display_width(sent: Path) -> None:
    lines = run(sent, "subscribers", "list").stdout.splitlines()
    assert lines[0].split() == [
        "EMAIL",
        "STATUS",
        "REGIONS",
        "NAME",
        "SOURCE",
        "SUBSCRIBED",
        "CONFIRMED",
    ]
    # Every column starts at the same screen column, wide characters (in NAME) included.
    for heading in ("STATUS", "REGIONS", "NAME", "SOURCE", "SUBSCRIBED", "CONFIRMED"):
        at = lines[0].index(heading)  # the heading line is ASCII: index = screen column
        for line in lines[1:]:
            starts = [i for i in range(1, len(line)) if cell_len(line[:i]) == at]
            assert starts and line[starts[0] - 1] == " " != line[starts[0]], (heading, line)
    assert any("  寺田 𝔘 Kofi  import  " in line for line in lines)
    assert any("Europe;Middle East" in line for line in lines)
    assert all(line == line.rstrip() for line in lines)


def test_deliveries_failed_json_keeps_the_whole_reply(sent: Path) -> None:
    result = run(sent, "deliveries", "--failed", "--json")
    assert result.exit_code == 0
    (row,) = json.loads(result.stdout)["deliveries"]
    assert set(row) == {"edition_date", "email", "attempts", "error"}
    assert (row["edition_date"], row["email"], row["attempts"]) == (str(D), "gone@example.org", 1)
    assert row["error"] == "550 5.1.1 no such user 5.1.1 try 🦊 never"
    lines = run(sent, "deliveries", "--failed").stdout.splitlines()
    assert lines[1].endswith("550 5.1.1 no such user 5.1.1 try 🦊 never")
    none = run(sent, "deliveries", "--failed", "--date", "2026-11-20", "--json")
    assert json.loads(none.stdout) == {"deliveries": []}


def test_status_json_and_table(sent: Path) -> None:
    app = pipeline.open_app(load_config(sent))
    pipeline.record_missed(app, date(2026, 11, 20), datetime(2026, 11, 20, 14, tzinfo=UTC))
    app.engine.dispose()
    result = run(sent, "status", "--json")
    assert result.exit_code == 0
    doc = json.loads(result.stdout)
    assert set(doc) == {"subscribers", "articles", "issues", "missed", "paused"}
    assert doc["paused"] is None  # the relay's quota is not full (no limits set)
    assert doc["subscribers"] == {"active": 3, "unsubscribed": 1, "bounced": 0}
    assert doc["articles"] == 10
    assert doc["missed"] == ["2026-11-20"]
    (issue,) = doc["issues"]
    assert set(issue) == ISSUE_KEYS
    assert {k: issue[k] for k in ISSUE_KEYS - {"subject"}} == {
        "edition_date": "2026-11-27",
        "status": "sent",
        "sent": 2,
        "deferred": 0,
        "failed": 1,
        "skipped": 0,
        "pending": 0,
    }
    lines = run(sent, "status").stdout.splitlines()
    assert lines[0] == "subscribers: 3 active, 1 unsubscribed, 0 bounced; articles stored: 10"
    assert lines[1].split() == [
        "EDITION",
        "STATUS",
        "SENT",
        "DEFERRED",
        "FAILED",
        "SKIPPED",
        "PENDING",
        "SUBJECT",
    ]
    assert lines[2].startswith("2026-11-27  sent       2         0       1        0        0  ")
    assert lines[3].startswith("2026-11-20  MISSED ")
    assert "`digest send --date 2026-11-20` sends it late" in lines[3]


def test_empty_outputs_are_valid(config_path: Path) -> None:
    assert run(config_path, "init").exit_code == 0
    assert json.loads(run(config_path, "subscribers", "list", "--json").stdout) == {
        "subscribers": []
    }
    doc = json.loads(run(config_path, "status", "--json").stdout)
    assert doc == {
        "subscribers": {"active": 0, "unsubscribed": 0, "bounced": 0},
        "articles": 0,
        "issues": [],
        "missed": [],
        "paused": None,
    }
    assert run(config_path, "status").stdout.splitlines()[-1] == "no issues yet"


@dataclass
class Row:
    name: str
    n: int


def test_a_new_column_is_one_line_and_shows_in_both_outputs() -> None:
    columns = [
        Column("name", "NAME", lambda r: r.name),
        Column("n", "N", lambda r: r.n, right=True),
    ]
    rows = [Row("a\tb\nc", 5), Row("🦊🦊", 120)]
    assert table(columns, rows) == ["NAME     N", "a b c    5", "🦊🦊   120"]
    columns.append(Column("double", "TWICE", lambda r: r.n * 2, right=True))
    assert table(columns, rows)[0] == "NAME     N  TWICE"
    assert list(records(columns, rows))[1] == {"name": "🦊🦊", "n": 120, "double": 240}
