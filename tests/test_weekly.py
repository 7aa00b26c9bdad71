"""`digest run --once`: the weekly job in one command, from a fresh folder to the outbox."""

from __future__ import annotations

import mailbox
import os
import re
import shlex
import shutil
import subprocess
import sys
from email import message_from_bytes, policy
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from digest.cli import main
from tests.conftest import Recorder, write_config

ROOT = Path(__file__).parent.parent


def run(config_path: Path, *args: str) -> Result:
    result = CliRunner().invoke(main, ["--config", str(config_path), *args])
    assert not (result.exception and not isinstance(result.exception, SystemExit)), result.output
    return result


def quick_start_command() -> list[str]:
    """The README's quick-start command that runs the weekly job."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("## Quick start", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    (line,) = [ln for ln in block.splitlines() if "run --once" in ln]
    return shlex.split(line.split("#", 1)[0])


@pytest.fixture
def example(tmp_path: Path) -> Path:
    """The shipped example config and sample feed, copied into an empty folder."""
    shutil.copy(ROOT / "config.example.toml", tmp_path)
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    return tmp_path / "config.example.toml"


def test_readme_quick_start_runs_the_week_into_the_outbox(example: Path) -> None:
    args = quick_start_command()
    assert args[:3] == ["digest", "--config", "config.example.toml"]
    # The installed entry point, in the folder holding the config: nothing else running.
    exe = Path(sys.executable).with_name("digest")
    env = {k: v for k, v in os.environ.items() if k != "DIGEST_CONFIG"}
    proc = subprocess.run(
        [str(exe), *args[1:]], cwd=example.parent, capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert "2 added" in proc.stdout and "2 sent" in proc.stdout
    box = mailbox.Maildir(example.parent / "outbox", create=False)
    messages = [message_from_bytes(m.as_bytes(), policy=policy.default) for m in box]
    assert sorted(str(m["To"]) for m in messages) == [
        "Ada Lovelace <ada@example.org>",
        "Kofi <kofi@example.org>",
    ]
    for m in messages:
        assert m["Subject"].startswith("The Weekly Round-up: ")
        assert m["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    kofi = next(m for m in messages if "kofi" in str(m["To"]))
    text = kofi.get_body(("plain",)).get_content()
    assert "EUROPE" in text and "ASIA-PACIFIC" not in text  # Kofi chose two regions
    # Again: nothing new is sent, no file is added, still exit 0.
    again = subprocess.run(
        [str(exe), *args[1:]], cwd=example.parent, capture_output=True, text=True, env=env
    )
    assert again.returncode == 0, again.stderr
    assert "this run: 0 sent" in again.stdout and "2 unchanged" in again.stdout
    assert len(os.listdir(example.parent / "outbox" / "new")) == 2


def test_run_once_reports_each_step(example: Path) -> None:
    result = run(example, "run", "--once", "--date", "2026-11-27")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert re.match(r"database ready at schema revision \w+: sqlite:///", lines[0])
    assert lines[1] == "sample: ok, 12 new, 0 updated, 0 rejected"
    assert lines[2] == "feeds: 12 new, 0 updated, 0 rejected"
    assert lines[3].startswith("subscribers from config.example.toml: 2 added, 0 updated")
    assert lines[4].startswith("round-up 2026-11-27: The Weekly Round-up: ")
    assert lines[5].startswith("this run: 2 sent, 0 failed")
    assert lines[-1] == f"written to the outbox {example.parent / 'outbox' / 'new'} (Maildir)"


def test_run_once_exits_1_when_a_delivery_fails_as_send_does(
    tmp_path: Path, feed_file: Path, smtp_server: tuple[object, Recorder]
) -> None:
    controller, server = smtp_server
    path = write_config(
        tmp_path,
        port=controller.port,  # type: ignore[attr-defined]
        extra='\n[[subscribers]]\nemail = "ok@example.org"\n'
        '\n[[subscribers]]\nemail = "gone@example.org"\nname = "Gone 🦊 & Co"\n',
    )
    server.rcpt_replies = {"gone@example.org": "550 5.1.1 no such user"}
    result = run(path, "run", "--once", "--date", "2026-11-27")
    assert result.exit_code == 1
    assert "1 deliveries failed permanently" in result.stderr
    assert [m.rcpt_tos for m in server.messages] == [["ok@example.org"]]
    assert "2 added" in result.stdout and "this run: 1 sent, 1 failed" in result.stdout


def test_run_once_without_config_subscribers_and_with_a_broken_feed(
    tmp_path: Path, feed_file: Path, smtp_server: tuple[object, Recorder]
) -> None:
    controller, _ = smtp_server
    (tmp_path / "broken.xml").write_text("<rss><channel><item>", encoding="utf-8")
    path = write_config(
        tmp_path,
        port=controller.port,  # type: ignore[attr-defined]
        feeds=["feed.xml", "broken.xml"],
    )
    result = run(path, "run", "--once", "--date", "2026-11-27")
    # The week is still sent (to nobody: no subscribers), but a feed failed: exit 1.
    assert result.exit_code == 1
    assert "broken.xml" in result.stderr
    assert "the config has no [[subscribers]]; none imported" in result.stdout
    assert "this run: 0 sent" in result.stdout


def test_run_once_with_nothing_to_send_still_reports_the_fetch(example: Path) -> None:
    result = run(example, "run", "--once", "--date", "2020-01-03")
    assert result.exit_code == 1
    assert "feeds: 12 new" in result.stdout and "2 added" in result.stdout
    assert "no new articles published between" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_date_without_once_is_a_usage_error(example: Path) -> None:
    result = run(example, "run", "--date", "2026-11-27")
    assert result.exit_code == 2 and "--date needs --once" in result.stderr
