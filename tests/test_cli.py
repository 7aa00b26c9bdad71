"""The CLI contract: command names, outputs, exit codes and one-line errors."""

from __future__ import annotations

import csv
import io
from email import message_from_bytes, policy
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from digest.cli import main
from tests.conftest import Recorder


def run(config_path: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["--config", str(config_path), *args])


@pytest.fixture
def ready(config_path: Path, tmp_path: Path) -> Path:
    """Initialised, fetched, with three subscribers."""
    (tmp_path / "subs.csv").write_text(
        "email,name,regions\nada@example.org,Ada,\nkofi@example.org,Kofi,Europe\nlin@example.org,Lin,Asia-Pacific\n",
        encoding="utf-8",
    )
    assert run(config_path, "init").exit_code == 0
    assert run(config_path, "init").exit_code == 0  # idempotent
    assert run(config_path, "fetch").exit_code == 0
    assert run(config_path, "subscribers", "import", str(tmp_path / "subs.csv")).exit_code == 0
    return config_path


def test_list_export_and_unsubscribe(ready: Path) -> None:
    listed = run(ready, "subscribers", "list")
    assert listed.exit_code == 0
    lines = listed.stdout.splitlines()
    assert lines[0].split() == [
        "EMAIL",
        "STATUS",
        "REGIONS",
        "NAME",
        "SOURCE",
        "SUBSCRIBED",
        "CONFIRMED",
    ]
    assert [line.split()[:5] for line in lines[1:]] == [
        ["ada@example.org", "active", "(all)", "Ada", "import"],
        ["kofi@example.org", "active", "Europe", "Kofi", "import"],
        ["lin@example.org", "active", "Asia-Pacific", "Lin", "import"],
    ]
    assert all(line.endswith("  -") for line in lines[1:])  # imports are never confirmed
    result = run(ready, "unsubscribe", " KOFI@example.org ")
    assert result.exit_code == 0 and "kofi@example.org: unsubscribed" in result.stdout
    again = run(ready, "unsubscribe", "kofi@example.org")
    assert again.exit_code == 0 and "already unsubscribed" in again.stdout
    exported = run(ready, "subscribers", "export")
    rows = list(csv.DictReader(io.StringIO(exported.stdout)))
    assert {r["email"]: r["status"] for r in rows} == {
        "ada@example.org": "active",
        "kofi@example.org": "unsubscribed",
        "lin@example.org": "active",
    }
    bad = run(ready, "unsubscribe", "not an address")
    assert bad.exit_code == 2 and "is not an email address" in bad.stderr


def test_preview_formats_and_subscriber_editions(ready: Path, tmp_path: Path) -> None:
    eml = run(
        ready,
        "preview",
        "--date",
        "2026-11-27",
        "--subscriber",
        "kofi@example.org",
        "--format",
        "eml",
    )
    assert eml.exit_code == 0
    msg = message_from_bytes(eml.stdout_bytes, policy=policy.default)
    assert msg["To"] == "Kofi <kofi@example.org>"
    text = msg.get_body(("plain",)).get_content()
    assert "EUROPE" in text and "ASIA-PACIFIC" not in text
    assert "/unsubscribe/" in msg["List-Unsubscribe"] and "PREVIEW" not in msg["List-Unsubscribe"]
    html = run(ready, "preview", "--date", "2026-11-27", "--format", "html")
    assert html.stdout.lstrip().lower().startswith("<!doctype html>")
    unknown = run(ready, "preview", "--subscriber", "nobody@example.org", "--date", "2026-11-27")
    assert unknown.exit_code == 2 and "no subscriber nobody@example.org" in unknown.stderr
    bad_date = run(ready, "preview", "--date", "27/11/2026")
    assert bad_date.exit_code == 2 and "use YYYY-MM-DD" in bad_date.stderr


def test_dry_run_sends_and_records_nothing(
    ready: Path, smtp_server: tuple[object, Recorder]
) -> None:
    _, server = smtp_server
    result = run(ready, "send", "--date", "2026-11-27", "--dry-run")
    assert result.exit_code == 0
    assert "would send 3 messages in 3 editions" in result.stdout
    assert server.messages == []
    assert "no issues yet" in run(ready, "status").stdout


def test_nothing_to_send_is_explained(ready: Path) -> None:
    result = run(ready, "send", "--date", "2020-01-03")
    assert result.exit_code == 1
    assert (
        "no new articles published between 2019-12-28 00:00 and 2020-01-04 00:00" in result.stderr
    )
    assert "digest fetch" in result.stderr


def test_uninitialised_database_says_run_init(config_path: Path) -> None:
    result = run(config_path, "status")
    assert result.exit_code == 1
    assert "is not initialised; run `digest init` first" in result.stderr
    assert "Traceback" not in result.output


def test_fetch_reports_a_broken_feed_and_keeps_the_others(tmp_path: Path, feed_file: Path) -> None:
    from tests.conftest import write_config

    (tmp_path / "broken.xml").write_text("<rss><channel><item>", encoding="utf-8")
    path = write_config(tmp_path, feeds=["feed.xml", "broken.xml", "missing.xml"])
    run(path, "init")
    result = run(path, "fetch")
    assert result.exit_code == 1
    assert "feed.xml: ok, 10 new" in result.stdout
    assert "broken.xml" in result.stderr and "missing.xml" in result.stderr
    assert "Traceback" not in result.output


def test_help_has_examples() -> None:
    for cmd in (["send"], ["fetch"], ["preview"], ["subscribers", "import"], ["serve"], ["status"]):
        result = CliRunner().invoke(main, [*cmd, "--help"])
        assert result.exit_code == 0 and "Example:" in result.output
