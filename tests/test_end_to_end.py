"""The whole round-up through the CLI: feed files → store → selection → SMTP → parsed messages."""

from __future__ import annotations

import json
import re
from pathlib import Path

from click.testing import CliRunner

from digest.cli import main
from digest.tokens import TokenSigner
from tests.conftest import REGIONS, Recorder


def run(config_path: Path, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["--config", str(config_path), *args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def test_round_up_end_to_end(
    tmp_path: Path, config_path: Path, smtp_server: tuple[object, Recorder]
) -> None:
    _, server = smtp_server
    csv = tmp_path / "readers.csv"
    csv.write_text(
        "\ufeffemail,name,regions\n"
        "all@example.org,Ada <Lovelace>,\n"
        "EU@Example.org,Émile Zola,Europe;middle east\n"
        "asia@example.org,,Asia-Pacific\n"
        "bad-address,Nobody,\n",
        encoding="utf-8",
    )
    assert run(config_path, "init")[0] == 0
    code, out, _ = run(config_path, "fetch")
    assert code == 0 and "10 new" in out
    code, out, err = run(config_path, "subscribers", "import", str(csv))
    assert code == 1  # one row rejected, the others taken
    assert "3 added" in out and "line 5" in err and "bad-address" in err

    code, out, err = run(config_path, "send", "--date", "2026-11-27")
    assert code == 0, err
    assert "3 sent" in out
    assert len(server.messages) == 3

    signer = TokenSigner("test-secret-0123456789abcdef")
    ids = {}
    for received in server.messages:
        msg = received.message
        (rcpt,) = received.rcpt_tos
        assert received.mail_from == "roundup@news.example.org"
        assert msg["To"].addresses[0].addr_spec == rcpt
        text = msg.get_body(("plain",)).get_content()
        html = msg.get_body(("html",)).get_content()
        sections = [r for r in [*REGIONS, "Also this week"] if r.upper() in text]
        if rcpt == "all@example.org":
            assert sections == [*REGIONS, "Also this week"]
            assert "Ada &lt;Lovelace&gt;" in html and "<Lovelace>" not in html
            assert "Hello Ada <Lovelace>," in text
        elif rcpt == "eu@example.org":
            assert sections == ["Europe", "Middle East"]
            assert "Émile Zola" in html
            assert msg["To"].addresses[0].display_name == "Émile Zola"
        else:
            assert sections == ["Asia-Pacific"]
            assert "Hello there," in text
        # Same articles and links in both parts.
        links = set(re.findall(r"https://news\.example\.org/(?!img)[a-z-]+/\d", text))
        assert links and links == set(
            re.findall(r"https://news\.example\.org/(?!img)[a-z-]+/\d", html)
        )
        # Their own unsubscribe link, in the header and both parts, verifying to their id.
        url = msg["List-Unsubscribe"].strip("<>")
        assert url in text and url in html
        claim = signer.verify(url.rsplit("/", 1)[1])
        assert claim.matches(rcpt) and not claim.matches("someone.else@example.org")
        ids[rcpt] = claim.subscriber_id
        assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        assert msg["Message-ID"].startswith("<20261127.")
    assert len(set(ids.values())) == 3

    # Re-running sends nothing new.
    code, out, _ = run(config_path, "send", "--date", "2026-11-27")
    assert code == 0 and "0 sent" in out
    assert len(server.messages) == 3

    code, out, _ = run(config_path, "status", "--json")
    doc = json.loads(out)
    assert doc["subscribers"]["active"] == 3
    assert [(i["edition_date"], i["status"], i["sent"]) for i in doc["issues"]] == [
        ("2026-11-27", "sent", 3)
    ]


def test_preview_writes_nothing_and_matches_send(
    tmp_path: Path, config_path: Path, smtp_server: tuple[object, Recorder]
) -> None:
    _, server = smtp_server
    run(config_path, "init")
    run(config_path, "fetch")
    run(config_path, "subscribers", "import")  # the config has none: 0 added
    out_file = tmp_path / "x.html"
    code, _, err = run(config_path, "preview", "--date", "2026-11-27", "--out", str(out_file))
    assert code == 0, err
    html = out_file.read_text(encoding="utf-8")
    assert "Asia-Pacific story 0" in html and "style=" in html
    code, out, _ = run(config_path, "status")
    assert "no issues yet" in out  # preview froze nothing
    code, out, _ = run(config_path, "preview", "--date", "2026-11-27", "--format", "text")
    assert "Europe story 1" in out and "<" not in out.split("Hello", 1)[1][:50]
    assert server.messages == []


def test_empty_edition_is_skipped_not_failed(
    tmp_path: Path, config_path: Path, smtp_server: tuple[object, Recorder]
) -> None:
    _, server = smtp_server
    extra = tmp_path / "subs.toml"
    extra.write_text(
        '[[subscribers]]\nemail = "asia@example.org"\nregions = ["Asia-Pacific"]\n'
        '[[subscribers]]\nemail = "all@example.org"\n',
        encoding="utf-8",
    )
    run(config_path, "init")
    run(config_path, "fetch")
    assert run(config_path, "subscribers", "import", str(extra))[0] == 0
    # The week ending 2026-11-26 has no Asia-Pacific story (they were published on the 27th).
    code, out, err = run(config_path, "send", "--date", "2026-11-26")
    assert code == 0, err
    assert [m.rcpt_tos for m in server.messages] == [["all@example.org"]]
    assert "1 skipped" in out
