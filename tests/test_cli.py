"""The CLI contract: command names, outputs, exit codes and one-line errors."""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
import sys
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
    # CliRunner never prints a traceback: an unexpected exception shows up here instead.
    assert isinstance(result.exception, SystemExit)


def test_fetch_reports_a_broken_feed_and_keeps_the_others(tmp_path: Path, feed_file: Path) -> None:
    from tests.conftest import write_config

    (tmp_path / "broken.xml").write_text("<rss><channel><item>", encoding="utf-8")
    path = write_config(tmp_path, feeds=["feed.xml", "broken.xml", "missing.xml"])
    run(path, "init")
    result = run(path, "fetch")
    assert result.exit_code == 1
    assert "feed.xml: ok, 10 new" in result.stdout
    assert "broken.xml" in result.stderr and "missing.xml" in result.stderr
    assert isinstance(result.exception, SystemExit)


def test_help_has_examples() -> None:
    for cmd in (["send"], ["fetch"], ["preview"], ["subscribers", "import"], ["serve"], ["status"]):
        result = CliRunner().invoke(main, [*cmd, "--help"])
        assert result.exit_code == 0 and "Example:" in result.output


def test_preview_out_into_a_missing_folder_is_exit_2_in_one_line(
    ready: Path, tmp_path: Path
) -> None:
    target = tmp_path / "missing" / "dir" / "x.html"
    result = run(ready, "preview", "--date", "2026-11-27", "--out", str(target))
    assert result.exit_code == 2
    assert isinstance(result.exception, SystemExit)
    assert result.stderr.count("\n") == 1 and f"--out {target}: cannot write it" in result.stderr
    assert not target.parent.exists()


DIGEST = shutil.which("digest", path=str(Path(sys.executable).parent))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a fetched database, one subscriber, and no SMTP server listening."""
    from tests.conftest import free_port, rss, week_items, write_config

    folder = tmp_path_factory.mktemp("cli")
    (folder / "feed.xml").write_text(rss(week_items()), encoding="utf-8")
    config = write_config(folder, port=free_port())
    (folder / "subs.csv").write_text("email,name,regions\nada@example.org,Ada,\n", "utf-8")
    for args in (["init"], ["fetch"], ["subscribers", "import", str(folder / "subs.csv")]):
        assert run(config, *args).exit_code == 0
    (folder / "taken.pem").write_text("precious", encoding="utf-8")
    (folder / "folder.mbox").mkdir()
    text = config.read_text(encoding="utf-8")
    (folder / "typo.toml").write_text(text.replace("concurrency", "concurency"), "utf-8")
    (folder / "broken.toml").write_text("[newsletter\n", encoding="utf-8")
    fresh = text.replace("sqlite:///digest.db", "sqlite:///fresh.db")
    (folder / "fresh.toml").write_text(fresh, encoding="utf-8")
    return folder


# (arguments after --config, exit code, a fragment of the one line on stderr)
USER_ERRORS = [
    (["--config", "typo.toml", "status"], 2, "unknown key 'smtp.concurency'"),
    (["--config", "nope.toml", "status"], 2, "no such config file"),
    (["--config", "broken.toml", "status"], 2, "not valid TOML"),
    (["--config", "fresh.toml", "status"], 1, "run `digest init` first"),
    (["send", "--date", "27/11/2026"], 2, "use YYYY-MM-DD"),
    (["preview", "--date", "2026-13-01"], 2, "use YYYY-MM-DD"),
    (["deliveries", "--date", "soon"], 2, "use YYYY-MM-DD"),
    (["send", "--bogus"], 2, "No such option '--bogus'"),
    (["preview", "--format", "pdf"], 2, "'pdf' is not one of"),
    (["sned"], 2, "No such command 'sned'"),
    (["subscribers", "import", "missing.csv"], 2, "no such file"),
    (["subscribers", "import", "config.toml.bak"], 2, "cannot import"),
    (["preview", "--date", "2026-11-27", "--out", "missing/dir/x.html"], 2, "cannot write it"),
    (["preview", "--date", "2026-11-27", "--out", "."], 2, "is a directory"),
    (["preview", "--date", "2026-11-27", "--subscriber", "nobody@example.org"], 2, "nobody"),
    (["preview", "--date", "2026-11-27", "--subscriber", "not an address"], 2, "--subscriber"),
    (
        [
            "dkim",
            "keygen",
            "--out",
            "missing/dir/k.pem",
            "--selector",
            "s",
            "--domain",
            "d.example",
        ],
        2,
        "cannot write the key",
    ),
    (
        ["dkim", "keygen", "--out", "taken.pem", "--selector", "s", "--domain", "d.example"],
        2,
        "refusing to overwrite",
    ),
    (["dkim", "keygen"], 2, "no [dkim] section"),
    (["unsubscribe", "not an address"], 2, "is not an email address"),
    (["bounces", "import", "missing.mbox"], 2, "missing.mbox"),
    (["bounces", "import", "folder.mbox"], 2, "folder.mbox"),
    (["draft", "--date", "2026-02-30"], 2, "use YYYY-MM-DD"),
    (["issue", "lead", "not-a-number", "--date", "2026-11-27"], 2, "not-a-number"),
    (["issue", "show", "--date", "2030-01-04"], 2, "2030-01-04"),
    (["run", "--once", "--date", "someday"], 2, "use YYYY-MM-DD"),
    (["send", "--date", "2020-01-03"], 1, "no new articles published"),
    (["send", "--date", "2026-11-27"], 1, "cannot connect to SMTP server"),
]


@pytest.mark.skipif(DIGEST is None, reason="the digest console script is not installed")
@pytest.mark.parametrize(("args", "code", "fragment"), USER_ERRORS, ids=lambda v: str(v))
def test_the_real_binary_answers_user_errors_in_one_line(
    prepared: Path, args: list[str], code: int, fragment: str
) -> None:
    assert DIGEST is not None
    argv = args if args[0] == "--config" else ["--config", "config.toml", *args]
    proc = subprocess.run(
        [DIGEST, *argv], cwd=prepared, capture_output=True, text=True, timeout=120
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == code, proc.stderr
    assert proc.stderr.startswith("digest: error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert fragment in proc.stderr
