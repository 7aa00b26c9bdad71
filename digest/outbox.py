"""The outbox: a Maildir that receives every message instead of an SMTP relay.

``[outbox] path = "outbox"`` (and no ``[smtp]``) makes ``send`` write each message into
that Maildir through the same send engine and ledger, so a first run needs no mail
server, and what lands there is exactly what a relay would have been given:

* the file holds the bytes SMTP DATA would carry (CRLF line ends, as on the wire and as
  ``aiosmtpd`` receives them), with the envelope prepended the way a delivery agent
  records it: ``Return-Path: <sender>`` and ``Delivered-To: recipient``. Neither header
  is in the DKIM signature's ``h=``, so a signed message still verifies from the file;
* one file per message, written to ``tmp/``, flushed to disk and then linked into
  ``new/`` (the standard library's :class:`mailbox.Maildir` does exactly the Maildir
  delivery dance), so a reader never sees half a message and the ledger says ``sent``
  only for a message that is on disk;
* mutt (``mutt -f outbox``), Thunderbird, Dovecot and ``mailbox.Maildir`` read it.

A write that fails (folder not writable, disk full) stops the run like an unreachable SMTP
server does: nothing is marked sent for it, and the next run sends what is left.
"""

from __future__ import annotations

import asyncio
import mailbox
import re
from pathlib import Path

from digest.errors import OutboxUnavailableError, PermanentDeliveryError, SenderRejectedError

# The line-ending rule of SMTP DATA (aiosmtplib applies the same one before sending): a
# lone CR or LF becomes CRLF, and the message ends with a line break.
_LINE_ENDS = re.compile(rb"\r\n|\n|\r(?!\n)")
_UNSAFE_ADDRESS = re.compile(r"[\x00-\x20\x7f<>]")
# Two workers can draw the same unique file name in the same microsecond; mailbox refuses
# the clash (it never overwrites) and a second draw differs.
_CLASH_RETRIES = 5


def as_data(message: bytes) -> bytes:
    """The bytes an SMTP server receives for ``message`` (after dot-unstuffing)."""
    wire = _LINE_ENDS.sub(b"\r\n", message)
    return wire if wire.endswith(b"\r\n") else wire + b"\r\n"


def envelope_headers(sender: str, recipient: str) -> bytes:
    """``Return-Path`` and ``Delivered-To``, as a delivery agent prepends them."""
    # Stored addresses are validated on the way in; this only keeps a header line whole.
    if _UNSAFE_ADDRESS.search(sender):
        raise SenderRejectedError(f"envelope sender {sender!r} cannot go into Return-Path")
    if _UNSAFE_ADDRESS.search(recipient):
        text = "550 5.1.3 address cannot go into Delivered-To"
        raise PermanentDeliveryError(f"RCPT: {text}", 550, text)
    return f"Return-Path: <{sender}>\r\nDelivered-To: {recipient}\r\n".encode()


class MaildirTransport:
    """A :class:`digest.send.Transport` that delivers into a Maildir folder."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._box: mailbox.Maildir | None = None

    def _open(self) -> mailbox.Maildir:
        if self._box is None:
            try:
                # 0700: the messages hold subscribers' addresses and their own links. An
                # existing folder keeps the permissions its owner gave it.
                self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
                for sub in ("tmp", "new", "cur"):
                    (self.path / sub).mkdir(mode=0o700, exist_ok=True)
            except OSError as exc:
                raise self._unavailable(exc) from None
            self._box = mailbox.Maildir(self.path, factory=None, create=False)
        return self._box

    def _unavailable(self, exc: OSError) -> OutboxUnavailableError:
        return OutboxUnavailableError(
            f"cannot write to the outbox {self.path}: {exc.strerror or exc}; check [outbox] "
            "path (a folder digest may create and write) and the free disk space"
        )

    def _deliver(self, data: bytes) -> str:
        box = self._open()
        for _ in range(_CLASH_RETRIES):
            try:
                return str(box.add(data))
            except mailbox.ExternalClashError:
                continue
            except OSError as exc:
                raise self._unavailable(exc) from None
        raise OutboxUnavailableError(
            f"cannot write to the outbox {self.path}: every new file name was taken; "
            "is another program writing the same names into it?"
        )

    async def send(self, sender: str, recipient: str, message: bytes) -> str:
        """Write one message for ``recipient`` into ``new/``; return where it went."""
        data = envelope_headers(sender, recipient) + as_data(message)
        # The write ends in fsync: off the event loop, so the other workers keep going.
        key = await asyncio.to_thread(self._deliver, data)
        return f"250 stored as {self.path / 'new' / key}"

    async def close(self) -> None:
        """Nothing to close: every message is complete on disk when send returns."""
        self._box = None
