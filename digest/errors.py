"""The one exception tree of digest.

Everything digest raises on purpose derives from :class:`DigestError`; the CLI catches it
once, prints ``str(error)`` as a one-line message on stderr and exits with ``exit_code``.
Third-party errors (SQLAlchemy, aiosmtplib, httpx, feedparser, TOML) are translated into
these at the module that talks to the library, so nothing above ``send.py`` imports
aiosmtplib and nothing above ``store/`` needs to know SQLAlchemy's exceptions::

    DigestError                      exit 1 unless noted
    ├── ConfigError                  exit 2: bad or missing configuration (names the key)
    ├── UsageError                   exit 2: a bad command-line value or input file
    ├── DatabaseError                the database cannot be opened, migrated or queried
    ├── FeedError                    one feed could not be fetched or parsed
    ├── RenderError                  a template is missing or does not compile
    ├── TokenError                   a link's token is malformed, tampered or foreign
    │   └── ExpiredToken             a genuine confirmation link past its lifetime
    ├── NothingToSend                the week has no articles (run ``digest fetch``)
    ├── SendInProgress               SQLite: another process holds the lock (a second
    │                                ``digest run``; an edit while the issue is sent)
    ├── AwaitingApproval             approval is required and the issue has none yet
    ├── EditRefused                  exit 2: the issue's sending has started; it is final
    ├── RatePaused                   exit 0: the relay's hour/day quota is used up for now
    └── DeliveryError                one SMTP delivery went wrong
        ├── TransientDeliveryError   4xx reply, dropped connection, timeout: retry later
        │   ├── AmbiguousDeliveryError  the reply to the final "." never came
        │   └── ThrottledError       421 / 4xx with 4.7.x: the relay asks us to slow down
        ├── PermanentDeliveryError   the recipient was refused (5xx to RCPT, 5.1.x/5.2.x)
        └── SMTPUnavailableError     cannot connect or log in at all: abort the run
            ├── SenderRejectedError  the server refuses our sender, session or message
            │                        as a whole: abort the run, count against nobody
            └── OutboxUnavailableError  the [outbox] Maildir cannot be written: abort the run
"""

from __future__ import annotations

from datetime import datetime


class DigestError(Exception):
    """Base of every error digest raises on purpose."""

    exit_code = 1


class ConfigError(DigestError):
    """The configuration file is missing, malformed or inconsistent."""

    exit_code = 2


class UsageError(DigestError):
    """A command-line value or an input file given on the command line is unusable."""

    exit_code = 2


class DatabaseError(DigestError):
    """The article store could not be opened, migrated or queried."""


class FeedError(DigestError):
    """A feed could not be fetched or parsed."""


class RenderError(DigestError):
    """A template is missing or fails to render."""


class TokenError(DigestError):
    """A token (unsubscribe, preferences, confirmation) does not verify."""


class ExpiredToken(TokenError):
    """A confirmation token that is genuine but older than ``[signup] confirm_ttl_hours``."""


class NothingToSend(DigestError):
    """The selected week holds no articles."""


class SendInProgress(DigestError):
    """Another process holds a lock beside the SQLite database (PostgreSQL uses leases)."""


class AwaitingApproval(DigestError):
    """``[editorial] approval = "required"`` and nobody approved this issue yet.

    The message is the whole instruction: ``issue D awaits approval: digest issue approve
    --date D``.
    """


class EditRefused(DigestError):
    """An edit of an issue whose first message has left: readers already have it."""

    exit_code = 2


class RatePaused(DigestError):
    """An hour or day window of the relay's quota is full: stop sending until it reopens.

    Not a failure (exit 0): the send pauses and resumes after ``resumes_at``.
    """

    exit_code = 0

    def __init__(self, message: str, window: str, limit: int, resumes_at: datetime) -> None:
        super().__init__(message)
        self.window = window
        self.limit = limit
        self.resumes_at = resumes_at


class DeliveryError(DigestError):
    """One message could not be handed to the SMTP server.

    ``code`` is the SMTP reply code (0 when there was no reply) and ``reply`` the server's
    text, stored in the ledger's ``last_error``.
    """

    def __init__(self, message: str, code: int = 0, reply: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.reply = reply


class TransientDeliveryError(DeliveryError):
    """A 4xx reply, a dropped connection or a timeout: the message may be retried."""


class AmbiguousDeliveryError(TransientDeliveryError):
    """The server never answered the final ".": the message may have been delivered."""


class ThrottledError(TransientDeliveryError):
    """The relay asks us to slow down: 421, a 4xx with a 4.7.x code, or "throttling".

    Gmail ``421 4.7.28``, Microsoft ``451 4.7.650``, Yahoo ``421 4.7.0 [TSS04]``, SES
    ``454 Throttling failure``. Every worker slows down; the message is retried without
    using up its retry budget.
    """


class PermanentDeliveryError(DeliveryError):
    """The recipient was refused for good (a 5xx to RCPT, or 5.1.x/5.2.x at DATA).

    Only this counts as a hard bounce against the subscriber.
    """


class SMTPUnavailableError(DeliveryError):
    """The SMTP server refuses connections or credentials: the whole run stops."""


class SenderRejectedError(SMTPUnavailableError):
    """A 5xx about us, not about the recipient: our sender, session or message is refused.

    A 5xx to MAIL FROM, "authentication required", "relay access denied", or a DATA
    reply refusing the message as a whole (policy, content, size). Every other recipient
    would get the same answer, so counting it as their bounce would mark the whole list
    bounced within three issues; instead the run stops and the rows stay pending.
    """


class OutboxUnavailableError(SMTPUnavailableError):
    """The outbox folder cannot be created or written: the whole run stops, as when the
    SMTP server is down (nothing is marked sent for the message that failed)."""
