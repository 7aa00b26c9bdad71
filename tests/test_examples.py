"""The files in examples/ use commands and options this digest really has."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from digest.cli import main

EXAMPLES = Path(__file__).parent.parent / "examples"


def digest_commands() -> list[tuple[str, list[str]]]:
    """Every digest invocation in examples/: (file, arguments after the program)."""
    found = []
    for path in sorted(EXAMPLES.rglob("*")):
        if path.suffix not in (".service", "") or not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.split("#", 1)[0].strip()
            m = re.search(r"(?:^|[\s=])(\S*/)?digest\s+(.*)$", line)
            if m and not line.startswith(("Description", "Documentation")):
                found.append((path.name, shlex.split(m.group(2))))
    return found


def test_examples_hold_the_expected_commands() -> None:
    names = {(f, args[0]) for f, args in digest_commands()}
    assert {
        ("digest-run.service", "run"),
        ("digest-run.service", "init"),
        ("digest-serve.service", "serve"),
        ("crontab", "run"),
    } <= names
    assert ["run", "--once", "--quiet"] in [args for f, args in digest_commands() if f == "crontab"]


@pytest.mark.parametrize(("where", "args"), digest_commands())
def test_example_command_parses(where: str, args: list[str]) -> None:
    # click parses every option before it acts on --help: an unknown command or option
    # exits 2, a valid command line prints its help and exits 0 (needing no config).
    result = CliRunner().invoke(main, [*args, "--help"])
    assert result.exit_code == 0, (where, args, result.output)
    assert "Example:" in result.output


def unit(name: str) -> tuple[dict[str, list[str]], str]:
    """A systemd unit in examples/systemd: its settings (key → values) and its comments."""
    settings: dict[str, list[str]] = {}
    comments = []
    for line in (EXAMPLES / "systemd" / name).read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            comments.append(line.lstrip("# "))
        elif "=" in line:
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings, " ".join(comments)


def test_the_serve_unit_says_what_serve_does_and_what_it_must_write() -> None:
    """`digest serve` is the whole reader-facing side and sends the signup mails itself:
    through the relay (network, the relay's password) or into the [outbox] Maildir, which
    the sandbox must let it write wherever it is kept."""
    settings, comments = unit("digest-serve.service")
    description = settings["Description"][0]
    assert "unsubscribe" not in description or "signup" in description, description
    for page in ("/subscribe", "/confirm/", "/preferences/", "/archive", "/unsubscribe/"):
        assert page in comments, page
    assert "[smtp]" in comments and "[outbox]" in comments
    assert "ReadWritePaths" in comments  # what to add for an outbox kept elsewhere
    assert "/var/lib/digest" in settings["ReadWritePaths"][0].split()
    assert settings["EnvironmentFile"] == ["-/etc/digest/secrets.env"]  # the relay's password
