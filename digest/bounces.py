"""Bounce reports (RFC 3464 delivery status notifications) → the delivery ledger.

Most sends go through a relay that answers 250 to everything, so a dead address only
shows up later, as a DSN in the bounce mailbox. :func:`import_bounces` reads such a
mailbox (mbox file or Maildir folder) and, for every *hard* bounce (``Action: failed``
with a 5.x.x status), marks the delivery it reports on ``failed`` and counts a hard bounce
against the subscriber; :data:`~digest.pipeline.BOUNCE_THRESHOLD` consecutive ones make the
subscriber ``bounced``, and later issues no longer create deliveries for them.

Matching a report to a delivery: the original message's Message-ID (from the report's
``message/rfc822`` or ``text/rfc822-headers`` part). Ours encode the issue and subscriber
and carry an HMAC tag (:class:`~digest.tokens.MessageTags`); the stored delivery must
carry exactly that id, and when the report names a recipient, it must be the
subscriber's address.

Anyone can send a bounce mailbox a report naming any address, and the issue and
subscriber numbers in an id are guessable: a report counts only when the id it quotes
carries a valid tag, which only a message we sent can show. Every other hard bounce
(no original headers, a foreign id, an id without a valid tag, such as one sent before
tags existed) is counted as ``ignored`` and changes nothing.

The import is idempotent: a report whose delivery is already ``failed`` is counted as
``already_recorded`` and changes nothing, so the same mailbox can be imported every week.
The mailbox itself is only read, never modified.
"""

from __future__ import annotations

import email
import email.errors
import email.policy
import mailbox
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import Message
from email.parser import HeaderParser
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Final

from sqlalchemy.orm import Session, sessionmaker

from digest import store
from digest.addresses import normalize_email
from digest.errors import UsageError
from digest.models import Delivery, DeliveryStatus
from digest.tokens import MessageTags

# The Message-ID ``issues.message_id`` gives each (issue, subscriber).
_OUR_MESSAGE_ID: Final = re.compile(
    r"<(?P<local>(?P<date>\d{8})\.(?P<issue>\d+)\.(?P<subscriber>\d+))"
    r"\.(?P<tag>[a-z2-7]{16})\.digest@[^<>\s@]+>"
)
# RFC 3463 enhanced status code; a Status field may carry a comment after it.
_STATUS_CODE: Final = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")
_ERROR_MAX: Final = 500  # keep a chatty Diagnostic-Code from bloating the ledger


@dataclass
class BounceReport:
    """What one import found, counted per recipient report (per message when not a DSN).

    ``unrelated``: not a failure report at all (ordinary mail, a success or relay notice,
    an unparseable message). ``ignored``: a hard bounce that does not quote a Message-ID
    carrying our valid tag, so it may be forged; nothing was recorded. ``unmatched``: a
    hard bounce about one of our messages that fits no delivery; nothing was recorded.
    """

    hard: int = 0
    soft_ignored: int = 0
    unrelated: int = 0
    unmatched: int = 0
    already_recorded: int = 0
    ignored: int = 0


@dataclass(frozen=True)
class RecipientStatus:
    """One per-recipient block of a ``message/delivery-status`` part."""

    action: str
    status: str
    final_recipient: str | None
    original_recipient: str | None
    diagnostic: str

    @property
    def is_hard(self) -> bool:
        """Failed for good: the server gave up and the status is permanent (5.x.x)."""
        return self.action == "failed" and self.status.startswith("5.")


@dataclass(frozen=True)
class DSN:
    """The parts of a delivery status notification that :func:`import_bounces` uses."""

    recipients: list[RecipientStatus]
    original_message_id: str | None
    reported_at: datetime | None


def parse_dsn(raw: bytes) -> DSN | None:
    """Parse a delivery status notification; None when ``raw`` is not one.

    A message whose report part is missing or unreadable is not one either: a bounce
    mailbox holds all kinds of mail, and none of it may stop an import.
    """
    try:
        msg = email.message_from_bytes(raw, policy=email.policy.compat32)
        if msg.get_content_type() != "multipart/report":
            return None
        if str(msg.get_param("report-type", "")).lower() != "delivery-status":
            return None
        return _parse_report(msg)
    except (email.errors.MessageError, ValueError, LookupError):
        # What hostile input can make the lenient parser raise: a malformed header
        # (MessageError), bad encodings or base64 (ValueError, UnicodeError), unknown
        # charsets (LookupError). Such a message is simply not a report we use. Anything
        # else is a bug and must not pass for "not a bounce".
        return None


def _parse_report(msg: Message) -> DSN | None:
    blocks: list[Message] | None = None
    original: Message | None = None
    for part in msg.walk():
        ctype = part.get_content_type()
        if ctype == "message/delivery-status" and blocks is None:
            blocks = _status_blocks(part)
        elif ctype in ("message/rfc822", "text/rfc822-headers") and original is None:
            original = _original_headers(part)
    if not blocks:
        return None
    per_message, per_recipient = blocks[0], blocks[1:]
    recipients = [_recipient_status(b) for b in per_recipient]
    if not recipients:
        return None
    mid = _text(original.get("Message-ID")) if original is not None else ""
    return DSN(
        recipients,
        mid or None,
        _date(per_message.get("Arrival-Date")) or _date(msg.get("Date")),
    )


def _status_blocks(part: Message) -> list[Message]:
    """The header blocks of a ``message/delivery-status`` part (per-message first)."""
    payload = part.get_payload()
    if isinstance(payload, list):
        return [b for b in payload if isinstance(b, Message)]
    # A transfer-encoded status part is left as a string by the parser: split it into
    # its blank-line separated blocks ourselves.
    data = part.get_payload(decode=True)
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else str(payload)
    text = text.replace("\r\n", "\n")
    return [HeaderParser().parsestr(b.strip() + "\n") for b in re.split(r"\n\s*\n", text)]


def _original_headers(part: Message) -> Message | None:
    payload = part.get_payload()
    if isinstance(payload, list):
        first = payload[0] if payload else None
        return first if isinstance(first, Message) else None
    data = part.get_payload(decode=True)
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else str(payload)
    return HeaderParser().parsestr(text.replace("\r\n", "\n"), headersonly=True)


def _recipient_status(block: Message) -> RecipientStatus:
    status = _STATUS_CODE.search(_text(block.get("Status")))
    diagnostic = _text(block.get("Diagnostic-Code"))
    # "smtp; 550 5.1.1 …": the type prefix says nothing to a reader of the ledger.
    diag_type, sep, diag_text = diagnostic.partition(";")
    if sep and " " not in diag_type.strip():
        diagnostic = diag_text.strip()
    return RecipientStatus(
        action=_text(block.get("Action")).lower(),
        status=".".join(status.groups()) if status else "",
        final_recipient=_address(block.get("Final-Recipient")),
        original_recipient=_address(block.get("Original-Recipient")),
        diagnostic=diagnostic,
    )


def _text(value: Any) -> str:
    """A header value as one line (compat32 may hand back a Header object, or None)."""
    return " ".join(str(value).split()) if value is not None else ""


def _address(value: Any) -> str | None:
    """The normalized address of a ``rfc822; user@example.org`` recipient field."""
    text = _text(value)
    addr_type, sep, addr = text.partition(";")
    if not sep:
        addr = addr_type
    elif addr_type.strip().lower() != "rfc822":
        return None
    try:
        return normalize_email(addr.strip().strip("<>"))
    except ValueError:
        return None


def _date(value: Any) -> datetime | None:
    text = _text(value)
    if not text:
        return None
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    # RFC 5322 "-0000" means UTC with unknown local zone; Python gives it back naive.
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


# --- mailbox ---------------------------------------------------------------------------------


def _open_mailbox(path: Path) -> mailbox.Mailbox[Any]:
    """Open ``path`` read-only as a Maildir (a folder with cur/new/tmp) or an mbox file."""
    if path.is_dir():
        if all((path / sub).is_dir() for sub in ("cur", "new", "tmp")):
            return mailbox.Maildir(path, factory=None, create=False)
        raise UsageError(f"{path} is a folder but not a Maildir (no cur/, new/ and tmp/ in it)")
    try:
        with path.open("rb") as handle:
            head = handle.read(5)
    except FileNotFoundError:
        raise UsageError(f"no such mailbox: {path}") from None
    except OSError as exc:
        raise UsageError(f"cannot read mailbox {path}: {exc.strerror or exc}") from None
    # Without this check any file "opens" as an mbox holding no messages, and a typo'd
    # path would report a clean, empty import.
    if head and head != b"From ":
        raise UsageError(
            f"{path} is not an mbox file (it does not start with a 'From ' line) "
            "nor a Maildir folder"
        )
    return mailbox.mbox(path, factory=None, create=False)


def _messages(path: Path) -> Iterator[bytes | None]:
    """Each message's bytes, or None for one that cannot be read."""
    box = _open_mailbox(path)
    try:
        try:
            keys = list(box.iterkeys())
        except OSError as exc:
            raise UsageError(f"cannot read mailbox {path}: {exc.strerror or exc}") from None
        for key in keys:
            try:
                yield box.get_bytes(key)
            except (OSError, KeyError):
                # Gone or unreadable since listing (a Maildir is live): skip it, do not stop.
                yield None
    finally:
        box.close()


# --- import ----------------------------------------------------------------------------------


def import_bounces(
    sessions: sessionmaker[Session], path: Path, threshold: int = 3, *, tags: MessageTags
) -> BounceReport:
    """Record every hard bounce in the mbox file or Maildir folder at ``path``.

    Soft bounces (4.x.x, ``Action: delayed``) are counted and ignored: the send retries
    those itself. A hard bounce counts only when it quotes one of our Message-IDs with a
    valid tag (``tags``, see :func:`digest.issues.message_tags`). Safe to run again on
    the same mailbox. Raises :class:`UsageError` when ``path`` is not a readable mailbox.

    >>> import_bounces(app.sessions, Path("/var/mail/bounces"), tags=tags)  # doctest: +SKIP
    BounceReport(hard=2, soft_ignored=1, unrelated=5, unmatched=0, already_recorded=0, ...)
    """
    report = BounceReport()
    with sessions() as session:
        for raw in _messages(path):
            dsn = parse_dsn(raw) if raw is not None else None
            if dsn is None:
                report.unrelated += 1
                continue
            changed = [
                _apply(session, dsn, rcpt, threshold, report, tags) for rcpt in dsn.recipients
            ]
            if any(changed):
                # Commit per report rather than once at the end: on SQLite the write lock
                # is held until commit, and a `digest send` may be writing its ledger.
                session.commit()
    return report


def _apply(
    session: Session,
    dsn: DSN,
    rcpt: RecipientStatus,
    threshold: int,
    report: BounceReport,
    tags: MessageTags,
) -> bool:
    """Count one recipient's report; True when it recorded a new hard bounce."""
    if rcpt.action not in ("failed", "delayed"):
        report.unrelated += 1  # delivered / relayed / expanded: a success notice
        return False
    if not rcpt.is_hard:
        report.soft_ignored += 1
        return False
    found = _OUR_MESSAGE_ID.fullmatch(dsn.original_message_id or "")
    if found is None or not tags.valid(found["local"], found["tag"]):
        report.ignored += 1  # not provably about a message we sent: maybe forged
        return False
    delivery = _match(session, dsn, rcpt, found)
    if delivery is not None and delivery.status == DeliveryStatus.FAILED:
        report.already_recorded += 1
        return False
    # Sent, or deferred: after a timeout on the final "." the message may have arrived.
    # Pending / sending / skipped were never handed over, so no report can be about them
    # (a forged or foreign id).
    if delivery is None or delivery.status not in (DeliveryStatus.SENT, DeliveryStatus.DEFERRED):
        report.unmatched += 1
        return False
    error = f"bounce: {rcpt.status} {rcpt.diagnostic}".strip()[:_ERROR_MAX]
    store.mark_delivery_bounced(session, delivery, error)
    store.count_hard_bounce(session, delivery.id, threshold)
    report.hard += 1
    return True


def _match(
    session: Session, dsn: DSN, rcpt: RecipientStatus, found: re.Match[str]
) -> Delivery | None:
    named = {a for a in (rcpt.final_recipient, rcpt.original_recipient) if a}
    delivery = store.delivery_for(session, int(found["issue"]), int(found["subscriber"]))
    if delivery is None or delivery.message_id != dsn.original_message_id:
        return None
    subscriber = store.subscriber_by_id(session, delivery.subscriber_id)
    # A report about someone else than the id's subscriber is not trusted for either.
    if subscriber is None or (named and subscriber.email not in named):
        return None
    return delivery
