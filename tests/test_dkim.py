"""DKIM: what `send` signs verifies with dkimpy against the key `digest dkim keygen` made."""

from __future__ import annotations

import re
from datetime import date
from pathlib import Path

import dkim
import pytest
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from digest import pipeline
from digest.cli import main
from digest.config import Config, load_config
from digest.dkimsign import DKIMSigner, keygen
from digest.errors import UsageError
from digest.render import IssueContext, Renderer
from digest.select import Section
from tests.conftest import Recorder
from tests.test_render import Art, rcpt
from tests.test_send import D, add_subscribers


def keygen_cli(config_path: Path, key: Path, selector: str, domain: str) -> Result:
    args = ["dkim", "keygen", "--out", str(key), "--selector", selector, "--domain", domain]
    return CliRunner().invoke(main, ["--config", str(config_path), *args])


def test_send_signs_and_dkimpy_verifies(
    tmp_path: Path, config_path: Path, smtp_server: tuple[object, Recorder]
) -> None:
    _, server = smtp_server
    key = tmp_path / "dkim.pem"
    result = keygen_cli(config_path, key, "digest", "news.example.org")
    assert result.exit_code == 0, result.output
    assert key.stat().st_mode & 0o777 == 0o600
    m = re.search(
        r'^digest\._domainkey\.news\.example\.org\. IN TXT "(v=DKIM1; k=rsa; p=[A-Za-z0-9+/=]+)"$',
        result.stdout,
        re.M,
    )
    assert m
    txt = m.group(1).encode()
    with config_path.open("a", encoding="utf-8") as f:
        f.write(
            '\n[dkim]\ndomain = "news.example.org"\nselector = "digest"\n'
            'private_key_path = "dkim.pem"\n'
        )
    config = load_config(config_path)
    pipeline.init_db(config)
    app = pipeline.open_app(config)
    pipeline.fetch(app)
    add_subscribers(app, 3)
    assert pipeline.send(app, D).stats.sent == 3

    def dns(name: bytes, timeout: int = 5) -> bytes:
        assert name == b"digest._domainkey.news.example.org."
        return txt

    for received in server.messages:
        assert dkim.verify(received.data, dnsfunc=dns)
        sig = received.message["DKIM-Signature"]
        h = (
            re.search(r"h=([^;]+)", sig.replace("\r\n", "").replace("\t", ""))
            .group(1)
            .lower()
            .split(":")
        )
        for needed in (
            "from",
            "to",
            "subject",
            "date",
            "message-id",
            "list-unsubscribe",
            "list-unsubscribe-post",
            "list-id",
            "mime-version",
            "content-type",
        ):
            assert needed in h
        # A changed unsubscribe header breaks the signature.
        tampered = received.data.replace(b"List-Unsubscribe: <https", b"List-Unsubscribe: <http")
        assert not dkim.verify(tampered, dnsfunc=dns)
        lines = received.data.split(b"\r\n")
        assert max(map(len, lines)) <= 998


def test_keygen_refuses_to_overwrite(tmp_path: Path, config_path: Path) -> None:
    key = tmp_path / "k.pem"
    key.write_text("precious")
    result = keygen_cli(config_path, key, "s", "d.example")
    assert result.exit_code == 2 and "refusing to overwrite" in result.stderr
    assert key.read_text() == "precious"


def test_missing_key_is_a_config_error(tmp_path: Path, config_path: Path) -> None:
    with config_path.open("a", encoding="utf-8") as f:
        f.write(
            '\n[dkim]\ndomain = "news.example.org"\nselector = "digest"\n'
            'private_key_path = "nope.pem"\n'
        )
    result = CliRunner().invoke(main, ["--config", str(config_path), "init"])
    assert result.exit_code == 0
    result = CliRunner().invoke(main, ["--config", str(config_path), "send", "--date", str(D)])
    assert result.exit_code == 2
    assert "dkim.private_key_path" in result.stderr and "digest dkim keygen" in result.stderr


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(name=st.text(alphabet=st.sampled_from(list("ab \t=.é<>&\r\n")), max_size=40))
def test_fast_body_hash_agrees_with_dkimpy_whatever_the_name(
    tmp_path_factory: pytest.TempPathFactory, config: Config, name: str
) -> None:
    key = tmp_path_factory.mktemp("k") / "k.pem"
    txt = keygen(key).encode()
    signer = DKIMSigner("news.example.org", "s", key.read_bytes())
    secs = [
        Section(
            "Europe", [Art(1, "Title  with   runs\tof blanks ", "https://n.example/a", dek="a  b ")]
        )
    ]
    template = Renderer(config).edition(IssueContext(date(2026, 11, 27), 1), secs)
    raw = template.personalize(rcpt(name=name), dkim=signer)
    assert dkim.verify(raw, dnsfunc=lambda _name, timeout=5: txt)
    # The same as signing the finished message the slow, obvious way.
    plain = template.personalize(rcpt(name=name), date_header="Sat, 28 Nov 2026 10:00:00 +0000")
    assert dkim.verify(signer.sign(plain), dnsfunc=lambda _name, timeout=5: txt)


def test_keygen_into_a_missing_folder_is_exit_2_in_one_line(
    tmp_path: Path, config_path: Path
) -> None:
    key = tmp_path / "missing" / "dir" / "k.pem"
    result = keygen_cli(config_path, key, "s", "d.example")
    assert result.exit_code == 2
    assert isinstance(result.exception, SystemExit)  # not an OSError escaping as a traceback
    assert result.stderr.count("\n") == 1
    assert f"{key}: cannot write the key (No such file or directory)" in result.stderr
    with pytest.raises(UsageError, match="cannot write the key"):
        keygen(key)


ADDED = [
    b"From: The Test Desk <roundup@attacker.example>",
    b"Reply-To: refunds@attacker.example",
    b"To: someone-else@example.org",
    b"Subject: Your account is suspended",
    b"Date: Mon, 1 Jan 2024 00:00:00 +0000",
    b"Message-ID: <forged@attacker.example>",
    b"List-Unsubscribe: <https://attacker.example/unsubscribe>",
    b"List-Unsubscribe-Post: List-Unsubscribe=One-Click",
]


@pytest.mark.parametrize("reply_to", [None, "Desk <desk@news.example.org>"])
@pytest.mark.parametrize("where", ["top", "bottom"])
def test_an_added_header_breaks_the_signature(
    tmp_path: Path, config: Config, reply_to: str | None, where: str
) -> None:
    key = tmp_path / "k.pem"
    txt = keygen(key).encode()
    signer = DKIMSigner("news.example.org", "s", key.read_bytes())
    newsletter = config.newsletter.model_copy(update={"reply_to": reply_to})
    renderer = Renderer(config.model_copy(update={"newsletter": newsletter}))
    secs = [Section("Europe", [Art(1, "Title", "https://n.example/a")])]
    raw = renderer.edition(IssueContext(date(2026, 11, 27), 1), secs).personalize(
        rcpt(), dkim=signer
    )

    def dns(_name: bytes, timeout: int = 5) -> bytes:
        return txt

    assert dkim.verify(raw, dnsfunc=dns)
    head, body = raw.split(b"\r\n\r\n", 1)
    sig = re.search(rb"DKIM-Signature:.*?(?=\r\n[^ \t])", head, re.S).group(0)
    h = re.search(rb"h=([^;]+)", re.sub(rb"\r\n[ \t]", b"", sig)).group(1).lower().split(b":")
    for name in (b"from", b"to", b"subject", b"date", b"message-id", b"list-unsubscribe"):
        assert h.count(name) == 2, h  # once for the header, once for any added copy
    assert h.count(b"reply-to") == (2 if reply_to else 1)
    assert max(len(line) for line in sig.split(b"\r\n")) <= 78
    for added in ADDED:
        tampered = (
            added + b"\r\n" + raw if where == "top" else head + b"\r\n" + added + b"\r\n\r\n" + body
        )
        assert not dkim.verify(tampered, dnsfunc=dns), added
