"""The outbox: [outbox] writes into a Maildir exactly what SMTP DATA would carry."""

from __future__ import annotations

import mailbox
import re
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path

import dkim
import pytest
from click.testing import CliRunner

from digest import pipeline
from digest.cli import main
from digest.config import Config, load_config
from digest.dkimsign import DKIMSigner, keygen
from digest.errors import (
    ConfigError,
    OutboxUnavailableError,
    PermanentDeliveryError,
    SenderRejectedError,
)
from digest.outbox import MaildirTransport
from digest.render import IssueContext, Recipient, Renderer
from digest.select import Section
from digest.send import SMTPTransport, transport_factory
from tests.conftest import Recorder, write_config
from tests.test_render import Art
from tests.test_send import D, add_subscribers, ledger

SENDER = "roundup@news.example.org"
SMTP_BLOCK = re.compile(r"\n\[smtp\]\n.*?(?=\n\[schedule\])", re.S)


def outbox_config(tmp_path: Path, extra: str = "", outbox: str = "outbox") -> Path:
    """The test config with its [smtp] table replaced by an [outbox]."""
    path = write_config(tmp_path)
    text, n = SMTP_BLOCK.subn("", path.read_text(encoding="utf-8"))
    assert n == 1
    path.write_text(text + f'\n[outbox]\npath = "{outbox}"\n' + extra, encoding="utf-8")
    return path


def maildir_files(folder: Path) -> list[Path]:
    assert sorted(p.name for p in folder.iterdir()) == ["cur", "new", "tmp"]
    assert list((folder / "tmp").iterdir()) == [] and list((folder / "cur").iterdir()) == []
    return sorted((folder / "new").iterdir())


def dns_for(txt: bytes):  # type: ignore[no-untyped-def]
    return lambda name, timeout=5: txt


def signed_message(config: Config, signer: DKIMSigner, name: str) -> bytes:
    sections = [
        Section(
            "Europe",
            [Art(1, "A & B 🦊 in 𝔘", "https://news.example.org/a?x=1&y=2", dek="Dek " * 40)],
        ),
        # A title starting with "." puts a dot at a line start: SMTP must dot-stuff it.
        Section("Also this week", [Art(2, ".Leading dot", "https://n.example/b")], False),
    ]
    template = Renderer(config).edition(IssueContext(D, 1), sections)
    rcpt = Recipient("reader@example.org", name, "https://news.example.org/u/x", "<m.1@x>")
    return template.personalize(rcpt, dkim=signer)


async def test_outbox_file_is_the_bytes_smtp_data_delivers(
    tmp_path: Path, config: Config, smtp_server: tuple[object, Recorder]
) -> None:
    _, server = smtp_server
    key = tmp_path / "dkim.pem"
    txt = keygen(key).encode()
    signer = DKIMSigner("news.example.org", "s", key.read_bytes())
    messages = [
        signed_message(config, signer, "Zoë “Z” O'Brien-Ångström 🦊"),
        # Bare LF and a lone CR: SMTP clients turn both into CRLF; so must the outbox.
        b"Subject: raw\n\n.first\r..second\nlast line without an end",
    ]
    smtp = SMTPTransport(config.smtp, None)
    box = MaildirTransport(tmp_path / "box")
    try:
        for raw in messages:
            assert (await smtp.send(SENDER, "reader@example.org", raw)).startswith("250")
            assert (await box.send(SENDER, "reader@example.org", raw)).startswith("250")
    finally:
        await smtp.close()
        await box.close()
    files = maildir_files(tmp_path / "box")
    assert len(files) == 2 == len(server.messages)
    envelope = b"Return-Path: <roundup@news.example.org>\r\nDelivered-To: reader@example.org\r\n"
    by_content = {f.read_bytes() for f in files}
    assert by_content == {envelope + received.data for received in server.messages}
    signed = next(f.read_bytes() for f in files if b"DKIM-Signature" in f.read_bytes())
    # The envelope headers sit outside h=, so the signature verifies from the file as it is.
    assert dkim.verify(signed, dnsfunc=dns_for(txt))
    raw = next(f.read_bytes() for f in files if b"Subject: raw" in f.read_bytes())
    # Lines that start with dots are stored as written (SMTP's dot-stuffing is undone).
    assert raw.endswith(b"\r\n\r\n.first\r\n..second\r\nlast line without an end\r\n")


def test_send_writes_one_maildir_message_per_subscriber(tmp_path: Path, feed_file: Path) -> None:
    key = tmp_path / "dkim.pem"
    txt = keygen(key).encode()
    path = outbox_config(
        tmp_path,
        '\n[dkim]\ndomain = "news.example.org"\nselector = "digest"\n'
        'private_key_path = "dkim.pem"\n',
    )
    config = load_config(path)
    assert config.outbox is not None and config.outbox.path == tmp_path / "outbox"
    pipeline.init_db(config)
    app = pipeline.open_app(config)
    pipeline.fetch(app)
    emails = add_subscribers(app, 7)
    report = pipeline.send(app, D)
    assert report.stats.sent == 7 and ledger(app)["sent"] == 7
    files = maildir_files(tmp_path / "outbox")
    assert len(files) == 7
    assert (tmp_path / "outbox").stat().st_mode & 0o777 == 0o700
    # Readable as a Maildir by the standard library (mutt and Dovecot read the same layout).
    box = mailbox.Maildir(tmp_path / "outbox", create=False)
    seen = {}
    for msg in box:
        assert msg.get_subdir() == "new"
        assert msg["Return-Path"] == f"<{SENDER}>"
        seen[msg["Delivered-To"]] = msg
        parsed = message_from_bytes(msg.as_bytes(), policy=policy.default)
        assert isinstance(parsed, EmailMessage)
        assert parsed["To"].addresses[0].addr_spec == msg["Delivered-To"]
        assert parsed.get_body(("plain",)) is not None and parsed.get_body(("html",)) is not None
    assert sorted(seen) == sorted(emails)
    for f in files:
        assert dkim.verify(f.read_bytes(), dnsfunc=dns_for(txt))
    # One stable Message-ID per (issue, subscriber), as over SMTP.
    mids = {m["Message-ID"] for m in seen.values()}
    assert len(mids) == 7 and all(m.startswith("<20261127.") for m in mids)
    # A second run sends nothing new and writes no file.
    assert pipeline.send(app, D).stats.sent == 0
    assert len(maildir_files(tmp_path / "outbox")) == 7
    app.engine.dispose()


def test_smtp_and_outbox_together_is_a_config_error(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    with path.open("a", encoding="utf-8") as f:
        f.write('\n[outbox]\npath = "outbox"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "[smtp]" in str(info.value) and "[outbox]" in str(info.value)
    result = CliRunner().invoke(main, ["--config", str(path), "status"])
    assert result.exit_code == 2
    assert "both [smtp] and [outbox] are set" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.exception is not None
    assert isinstance(result.exception, SystemExit)


def test_outbox_alone_uses_the_default_smtp_settings(tmp_path: Path) -> None:
    config = load_config(outbox_config(tmp_path, outbox="/var/tmp/../tmp/box"))
    assert config.outbox is not None and config.outbox.path == Path("/var/tmp/../tmp/box")
    assert isinstance(transport_factory(config)(), MaildirTransport)
    plain = load_config(write_config(tmp_path))
    assert isinstance(transport_factory(plain)(), SMTPTransport)


def test_an_unwritable_outbox_stops_the_run_and_marks_nothing_sent(
    tmp_path: Path, feed_file: Path
) -> None:
    (tmp_path / "outbox").write_text("a file where the folder should be", encoding="utf-8")
    path = outbox_config(tmp_path)
    config = load_config(path)
    pipeline.init_db(config)
    app = pipeline.open_app(config)
    pipeline.fetch(app)
    add_subscribers(app, 3)
    result = CliRunner().invoke(main, ["--config", str(path), "send", "--date", str(D)])
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1
    assert f"cannot write to the outbox {tmp_path / 'outbox'}" in result.stderr
    assert ledger(app)["sent"] == 0 and ledger(app)["pending"] == 3
    with pytest.raises(OutboxUnavailableError):
        pipeline.send(app, D)
    # Fixed: the next run delivers everything.
    (tmp_path / "outbox").unlink()
    assert pipeline.send(app, D).stats.sent == 3
    assert len(maildir_files(tmp_path / "outbox")) == 3
    app.engine.dispose()


async def test_an_address_that_would_break_a_header_line_is_refused(tmp_path: Path) -> None:
    box = MaildirTransport(tmp_path / "box")
    with pytest.raises(PermanentDeliveryError):
        await box.send(SENDER, "a@example.org\r\nBcc: x@example.org", b"Subject: x\r\n\r\nx\r\n")
    with pytest.raises(SenderRejectedError):
        await box.send("a b@example.org", "a@example.org", b"Subject: x\r\n\r\nx\r\n")
    assert not (tmp_path / "box").exists() or maildir_files(tmp_path / "box") == []
    assert (await box.send(SENDER, "a@example.org", b"Subject: x\r\n\r\nx\r\n")).startswith("250")
