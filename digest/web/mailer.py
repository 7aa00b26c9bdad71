"""The signup mailer: a background task of ``digest serve`` that sends queued signup mails.

A signup request only queues its mail in the database (``signup_mails``) and rings
:meth:`SignupMailer.wake`; this task sends it within seconds through the configured
transport (the ``[smtp]`` relay or the ``[outbox]`` Maildir, as
:func:`digest.send.transport_factory` picks). Because the queue is in the database:

* a relay that is down loses nothing: the mail is retried with exponential backoff (one
  log line per failed try saying when the next one is), until it is older than the
  confirmation link would live (``[signup] confirm_ttl_hours``), then marked failed;
* a restarted serve process, or any of several, picks up what is due: a mail is taken
  with a lease (a conditional UPDATE one process wins), so two processes never send the
  same mail, and one that dies mid-send leaves it to the others when the lease ends.

A 5xx reply (no such mailbox) fails the mail at once: retrying would not help, and
addresses typed in by bots are often invalid.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, make_msgid, parseaddr
from typing import Final

from sqlalchemy.orm import Session, sessionmaker

from digest import store
from digest.config import Config
from digest.dkimsign import DKIMSigner, load_signer
from digest.errors import DeliveryError, PermanentDeliveryError, SMTPUnavailableError
from digest.models import SignupMail, SignupMailKind, SignupMailStatus, SubscriberStatus
from digest.send import Transport, TransportFactory
from digest.tokens import ConfirmSigner, TokenSigner
from digest.web.pages import Pages

log = logging.getLogger("digest.serve")

BATCH: Final = 20
KEEP_DONE: Final = timedelta(days=7)  # sent/failed rows hold addresses; not kept longer
PRUNE_EVERY: Final = timedelta(minutes=10)


class SignupMailer:
    """Sends due signup mails; :meth:`run` until stopped, :meth:`wake` to send now."""

    def __init__(
        self,
        config: Config,
        sessions: sessionmaker[Session],
        pages: Pages,
        confirm: ConfirmSigner,
        preferences: TokenSigner,
        transports: TransportFactory,
        *,
        poll_seconds: float = 2.0,
        retry_base_seconds: float = 5.0,
        retry_cap_seconds: float = 300.0,
    ) -> None:
        self.config = config
        self.sessions = sessions
        self.pages = pages
        self.confirm = confirm
        self.preferences = preferences
        self.transports = transports
        self.poll = poll_seconds
        self.retry_base = retry_base_seconds
        self.retry_cap = retry_cap_seconds
        self.dkim: DKIMSigner | None = load_signer(config.dkim)
        self.sender = config.newsletter.sender
        self.envelope_from = parseaddr(self.sender)[1]
        self.domain = self.envelope_from.rpartition("@")[2] or "localhost"
        # Longer than any single send may take (the reply to DATA is awaited this long),
        # so no other process takes over a mail that is still being sent.
        self.lease = timedelta(seconds=max(120.0, config.smtp.data_timeout_seconds + 60))
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pause_until: datetime | None = None
        self._relay_failures = 0
        self._pruned_at: datetime | None = None

    # -- the loop ---------------------------------------------------------------------

    def wake(self) -> None:
        """Send what is due now instead of at the next poll (call from the event loop)."""
        if self._wake is not None:
            self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Send due mails until ``stop`` is set; polls, so other processes' mails go too."""
        self._wake = asyncio.Event()
        while not stop.is_set():
            try:
                await self.process_due()
            except Exception:  # the database went away, say; try again at the next poll
                log.exception("signup mailer: sending queued mails failed; retrying shortly")
            timeout = self.poll
            if self._pause_until is not None:
                timeout = max(timeout, (self._pause_until - datetime.now(UTC)).total_seconds())
            waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._wake.wait())]
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            for w in waiters:
                w.cancel()
            self._wake.clear()

    async def process_due(self) -> int:
        """Send every mail that is due now; return how many were sent."""
        now = datetime.now(UTC)
        if self._pause_until is not None and now < self._pause_until:
            return 0  # the relay was down a moment ago: wait out the backoff
        await asyncio.to_thread(self._prune, now)
        ids = await asyncio.to_thread(self._due, now)
        if not ids:
            return 0
        sent = 0
        transport = self.transports()
        try:
            for mail_id in ids:
                mail = await asyncio.to_thread(self._claim, mail_id)
                if mail is None:
                    continue  # another serve process took it
                outcome = await self._send(transport, mail)
                if outcome is SignupMailStatus.SENT:
                    sent += 1
                if self._pause_until is not None:
                    break  # the relay is down: the rest wait for the backoff too
        finally:
            with contextlib.suppress(Exception):
                await transport.close()
        return sent

    # -- one mail ---------------------------------------------------------------------

    async def _send(self, transport: Transport, mail: SignupMail) -> SignupMailStatus:
        now = datetime.now(UTC)
        attempts = mail.attempts + 1
        what = f"signup mail {mail.id} ({mail.kind}) to {mail.email}"
        message = await asyncio.to_thread(self.compose, mail, now)
        if message is None:
            log.info("%s: not sent, the address is no longer subscribed", what)
            await asyncio.to_thread(
                self._finish, mail.id, SignupMailStatus.FAILED, attempts, "no longer subscribed"
            )
            return SignupMailStatus.FAILED
        try:
            await transport.send(self.envelope_from, mail.email, message)
        except PermanentDeliveryError as exc:
            log.error("%s: refused by the relay (%s); not retried", what, exc.reply or exc)
            await asyncio.to_thread(
                self._finish, mail.id, SignupMailStatus.FAILED, attempts, exc.reply or str(exc)
            )
            return SignupMailStatus.FAILED
        except DeliveryError as exc:
            return await self._retry_later(mail, attempts, exc, what)
        self._pause_until = None
        self._relay_failures = 0
        log.info("%s: sent", what)
        await asyncio.to_thread(self._finish, mail.id, SignupMailStatus.SENT, attempts, None)
        return SignupMailStatus.SENT

    async def _retry_later(
        self, mail: SignupMail, attempts: int, exc: DeliveryError, what: str
    ) -> SignupMailStatus:
        now = datetime.now(UTC)
        if now - mail.created_at > self.confirm.ttl:
            log.error(
                "%s: giving up after %d tries over %s (%s)",
                what,
                attempts,
                self.confirm.ttl,
                exc,
            )
            await asyncio.to_thread(
                self._finish, mail.id, SignupMailStatus.FAILED, attempts, str(exc)
            )
            return SignupMailStatus.FAILED
        delay = self._delay(attempts)
        retry_at = now + timedelta(seconds=delay)
        if isinstance(exc, SMTPUnavailableError):
            self._relay_failures += 1
            self._pause_until = now + timedelta(seconds=self._delay(self._relay_failures))
        log.warning("%s: not sent (%s); retrying in %.0f s (try %d)", what, exc, delay, attempts)
        await asyncio.to_thread(
            self._finish, mail.id, SignupMailStatus.PENDING, attempts, str(exc), retry_at
        )
        return SignupMailStatus.PENDING

    def _delay(self, attempts: int) -> float:
        # Exponential with jitter, so several serve processes do not retry in step.
        backoff = min(self.retry_cap, self.retry_base * 2.0 ** (attempts - 1))
        return random.uniform(0.75, 1.0) * backoff

    def compose(self, mail: SignupMail, now: datetime) -> bytes | None:
        """The message for a queued mail; None when an "already subscribed" mail has no
        subscriber to point at any more."""
        base = self.config.unsubscribe.base_url
        title = self.config.newsletter.title
        ttl_hours = int(self.confirm.ttl.total_seconds() // 3600)
        if mail.kind == SignupMailKind.CONFIRM:
            subject = f"Confirm your subscription to {title}"
            url = self.confirm.url(base, mail.email, mail.name, mail.regions, mail.created_at)
            body = self.pages.text("web/mail/confirm.txt.j2", confirm_url=url, ttl_hours=ttl_hours)
        else:
            with self.sessions() as session:
                sub = store.subscriber_by_email(session, mail.email)
                if sub is None or sub.status != SubscriberStatus.ACTIVE:
                    return None
                url = self.preferences.url(base, sub.id, sub.email)
            subject = f"You are already subscribed to {title}"
            body = self.pages.text("web/mail/already.txt.j2", preferences_url=url)
        msg = EmailMessage(policy=SMTP)
        msg["From"] = self.sender
        if self.config.newsletter.reply_to:
            msg["Reply-To"] = self.config.newsletter.reply_to
        msg["To"] = mail.email  # the address only: the name is unconfirmed input
        msg["Subject"] = subject
        msg["Date"] = format_datetime(now, usegmt=True)
        msg["Message-ID"] = make_msgid("signup", domain=self.domain)
        # RFC 3834: an automatic reply to a request; vacation responders stay quiet.
        msg["Auto-Submitted"] = "auto-generated"
        msg.set_content(body, cte="quoted-printable")
        raw = msg.as_bytes()
        return self.dkim.sign(raw) if self.dkim is not None else raw

    # -- database steps (run in a thread) ---------------------------------------------

    def _due(self, now: datetime) -> list[int]:
        with self.sessions() as session:
            return store.due_signup_mails(session, now, BATCH)

    def _claim(self, mail_id: int) -> SignupMail | None:
        with self.sessions.begin() as session:
            return store.claim_signup_mail(session, mail_id, datetime.now(UTC), self.lease)

    def _finish(
        self,
        mail_id: int,
        status: SignupMailStatus,
        attempts: int,
        error: str | None,
        retry_at: datetime | None = None,
    ) -> None:
        with self.sessions.begin() as session:
            store.finish_signup_mail(
                session, mail_id, status, attempts, datetime.now(UTC), error, retry_at
            )

    def _prune(self, now: datetime) -> None:
        if self._pruned_at is not None and now - self._pruned_at < PRUNE_EVERY:
            return
        self._pruned_at = now
        with self.sessions.begin() as session:
            store.prune_throttles(session, now)
            store.prune_signup_mails(session, now - KEEP_DONE)
