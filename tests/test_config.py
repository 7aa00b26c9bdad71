"""Config loading: every mistake is one line naming the key and the fix, exit 2, no traceback."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from click.testing import CliRunner

from digest.cli import main
from digest.config import load_config
from digest.errors import ConfigError

ROOT = Path(__file__).parent.parent
NY = ZoneInfo("America/New_York")
# The example config sends to an outbox; these swap it for an [smtp] section.
OUTBOX = '[outbox]\npath = "outbox"'


def test_example_config_loads_and_resolves_paths() -> None:
    config = load_config(ROOT / "config.example.toml")
    assert config.newsletter.regions[0] == "Asia-Pacific"
    assert config.newsletter.catch_all == "Also this week"
    assert config.newsletter.lookback_days == 7 and config.newsletter.max_per_region == 5
    assert config.feeds[0].url == str(ROOT / "examples" / "sample-feed.xml")
    assert config.database.url == f"sqlite:///{ROOT / 'digest.db'}"
    assert config.schedule.misfire_grace_hours == 12
    assert config.outbox is not None and config.outbox.path == ROOT / "outbox"
    assert config.unsubscribe_secret


def edit(tmp_path: Path, old: str, new: str) -> Path:
    text = (ROOT / "config.example.toml").read_text(encoding="utf-8")
    assert old in text
    path = tmp_path / "config.toml"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            '[outbox]\npath = "outbox"',
            "[smtp]\nconcurency = 4",
            "unknown key 'smtp.concurency'",
        ),
        ("lookback_days = 7", 'lookback_days = "seven"', "key 'newsletter.lookback_days'"),
        ('send_cron = "0 9 * * fri"', 'send_cron = "0 25 * * fri"', "key 'schedule.send_cron'"),
        (
            'timezone = "America/New_York"',
            'timezone = "Mars/Olympus"',
            "unknown time zone 'Mars/Olympus'",
        ),
        (
            'regions = ["Europe", "Middle East"]',
            'regions = ["Europa"]',
            "'Europa' is not in newsletter.regions",
        ),
        ('[outbox]\npath = "outbox"', '[smtp]\nsecurity = "ssl"', "key 'smtp.security'"),
        (
            'base_url = "http://127.0.0.1:8080"',
            'base_url = "127.0.0.1"',
            "key 'unsubscribe.base_url'",
        ),
        ("[publication]", "[publication]\nname2 = 1", "unknown key 'publication.name2'"),
        # Relay limits and the send lease: whole numbers in range, else the key is named.
        (OUTBOX, "[smtp]\nmax_per_hour = -1", "key 'smtp.max_per_hour': must be a whole"),
        (OUTBOX, "[smtp]\nmax_per_hour = 1.5", "key 'smtp.max_per_hour': must be a whole"),
        (OUTBOX, '[smtp]\nmax_per_second = "14"', "key 'smtp.max_per_second'"),
        (OUTBOX, "[smtp]\nmax_per_day = 100.0", "key 'smtp.max_per_day'"),
        (OUTBOX, "[smtp]\nmax_per_day = true", "key 'smtp.max_per_day'"),
        ("# [send]", "[send]\nlease_seconds = 4", "key 'send.lease_seconds': must be"),
        ("# [send]", "[send]\nlease_seconds = 7.5", "key 'send.lease_seconds'"),
        ("# [send]", "[send]\nlease_second = 60", "unknown key 'send.lease_second'"),
        (
            'base_url = "http://127.0.0.1:8080"',
            'base_url = "https://n.example/' + "u" * 500 + '"',
            "key 'unsubscribe.base_url': must be at most 500 characters",
        ),
        (
            'sender = "The Foreign Desk <roundup@foreign-desk.example.org>"',
            'sender = "nobody"',
            "newsletter.sender",
        ),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, old: str, new: str, expected: str) -> None:
    path = edit(tmp_path, old, new)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert expected in str(info.value)
    assert str(path) in str(info.value)
    # Through the CLI: exit 2, one line on stderr, no traceback.
    result = CliRunner().invoke(main, ["--config", str(path), "status"])
    assert result.exit_code == 2
    assert expected in result.stderr
    assert isinstance(result.exception, SystemExit)  # not an unexpected exception
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            'title = "The Weekly Round-up"',
            'titel = "The Weekly Round-up"',
            "unknown key 'newsletter.titel' — did you mean 'title'? "
            "('newsletter.title' is required and missing)",
        ),
        (
            "[smtp]\nconcurency = 4",
            "[smtp]\nconcurency = 4",
            "unknown key 'smtp.concurency' — did you mean 'concurrency'?",
        ),
        ("[newsletter]", "[newsleter]", "unknown key 'newsleter' — did you mean 'newsletter'?"),
        (
            'regions = ["Europe", "Middle East"]',
            'Regions = ["Europe", "Middle East"]',
            "unknown key 'subscribers[1].Regions' — did you mean 'regions'?",
        ),
        (
            'url = "examples/sample-feed.xml"',
            'URL = "examples/sample-feed.xml"',
            "unknown key 'feeds[0].URL' — did you mean 'url'? ('feeds[0].url' is required",
        ),
        (
            "[publication]",
            "[publication]\nzzz = 1",
            "unknown key 'publication.zzz': remove it or check its spelling in [publication]",
        ),
    ],
)
def test_a_typo_names_itself_and_the_nearest_key(
    tmp_path: Path, old: str, new: str, expected: str
) -> None:
    if old.startswith("[smtp]"):
        path = edit(tmp_path, '[outbox]\npath = "outbox"', new)
    else:
        path = edit(tmp_path, old, new)
    result = CliRunner().invoke(main, ["--config", str(path), "status"])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert result.stderr.startswith(f"digest: error: {path}: {expected}")
    assert len(result.stderr.strip().splitlines()) == 1


def test_relay_limits_and_lease_default_and_load(tmp_path: Path) -> None:
    config = load_config(ROOT / "config.example.toml")
    assert config.send.lease_seconds == 60
    assert (config.smtp.max_per_second, config.smtp.max_per_hour, config.smtp.max_per_day) == (
        0,
        0,
        0,
    )
    path = edit(tmp_path, OUTBOX, "[smtp]\nmax_per_hour = 100")
    path.write_text(
        path.read_text(encoding="utf-8").replace("# [send]", "[send]\nlease_seconds = 5"),
        encoding="utf-8",
    )
    config = load_config(path)
    assert config.smtp.max_per_hour == 100 and config.send.lease_seconds == 5


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["--config", str(tmp_path / "nope.toml"), "status"])
    assert result.exit_code == 2 and "no such config file" in result.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[newsletter\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["--config", str(bad), "status"])
    assert result.exit_code == 2 and "not valid TOML" in result.stderr


def test_config_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = edit(
        tmp_path,
        'secret = "dev-only-change-me-0123456789abcdef"',
        'secret_env = "TEST_DIGEST_SECRET"',
    )
    monkeypatch.setenv("DIGEST_CONFIG", str(path))
    monkeypatch.setenv("TEST_DIGEST_SECRET", "from-the-environment-123456")
    assert load_config().unsubscribe_secret == "from-the-environment-123456"


@pytest.mark.parametrize(
    ("cron", "days"),
    [
        ("0 9 * * 0-5", ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri"]),
        ("0 9 * * 0-6", ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"]),
        ("0 9 * * 1-7", ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"]),
        ("0 9 * * 5", ["Fri"]),
        ("0 9 * * 0", ["Sun"]),
        ("0 9 * * 7", ["Sun"]),
        ("0 9 * * sat,sun", ["Sun", "Sat"]),
    ],
)
def test_crontab_weekdays_are_accepted_and_mean_what_crontab_means(
    tmp_path: Path, cron: str, days: list[str]
) -> None:
    config = load_config(edit(tmp_path, 'send_cron = "0 9 * * fri"', f'send_cron = "{cron}"'))
    trigger = config.schedule.cron_trigger()
    # A week of firings from Sunday 2026-11-22 00:00 in the schedule's zone.
    t = trigger.get_next_fire_time(None, datetime(2026, 11, 22, tzinfo=NY))
    fired = []
    while t < datetime(2026, 11, 29, tzinfo=NY):
        fired.append(t)
        t = trigger.get_next_fire_time(t, t)
    assert [f"{f:%a}" for f in fired] == days
    assert {(f.hour, f.minute) for f in fired} == {(9, 0)} and fired[0].tzinfo is not None


@pytest.mark.parametrize("cron", ["0 9 * * 5-0", "0 9 * * fri-sun", "0 9 * 12-1 *", "0 9 * * 8"])
def test_invalid_crontab_ranges_are_rejected(tmp_path: Path, cron: str) -> None:
    path = edit(tmp_path, 'send_cron = "0 9 * * fri"', f'send_cron = "{cron}"')
    with pytest.raises(ConfigError, match=r"key 'schedule.send_cron': .* is not a cron expression"):
        load_config(path)


def test_old_unsubscribe_secrets_from_the_file_and_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = edit(
        tmp_path,
        'secret = "dev-only-change-me-0123456789abcdef"',
        'secret = "new-secret-0123456789abcdef"\n'
        'old_secrets = ["file-old-secret-0123456789"]\n'
        'old_secrets_env = "TEST_DIGEST_OLD_SECRETS"',
    )
    monkeypatch.setenv(
        "TEST_DIGEST_OLD_SECRETS", "env-old-one-0123456789, env-old-two-0123456789\n"
    )
    config = load_config(path)
    assert config.unsubscribe_secret == "new-secret-0123456789abcdef"
    assert config.unsubscribe_old_secrets == (
        "file-old-secret-0123456789",
        "env-old-one-0123456789",
        "env-old-two-0123456789",
    )
    monkeypatch.delenv("TEST_DIGEST_OLD_SECRETS")
    assert load_config(path).unsubscribe_old_secrets == ("file-old-secret-0123456789",)
    bad = edit(tmp_path, "[publication]", 'unsubscribe_old_secrets = ["x"]\n[publication]')
    with pytest.raises(ConfigError, match="unknown key 'unsubscribe_old_secrets'"):
        load_config(bad)
