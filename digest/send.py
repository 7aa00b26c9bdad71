"""The send engine: K long-lived SMTP connections, a retry policy and the delivery ledger.

The engine neither renders nor selects. It takes :class:`Outgoing` messages (already
personalized bytes) from an async source and, for each, reports exactly one final
:class:`Outcome` to a :class:`Ledger`. aiosmtplib is imported here and nowhere else; its
exceptions become :mod:`digest.errors` classes in :class:`SMTPTransport`.

Why it is shaped this way:

* One ``aiosmtplib.SMTP`` client per worker: SMTP is strictly request/response on a
  connection, so gathering several sends on one client only queues them on its lock.
* A worker awaits the ledger commit of its message before taking the next one, so a crash
  can re-send at most one message per connection (the in-flight window is K).
* Transient failures (4xx, dropped connection, timeout) are retried on a fresh connection
  after an exponential backoff with jitter, so a relay that rate-limits us is not hammered
  by K workers retrying in lockstep.
* Throttling replies (421, 4xx with 4.7.x) also slow every worker down through the shared
  :class:`Limiter`, and are retried without using up the message's retry budget: a relay
  that says "slower" has not refused the message.
* Before each SMTP transaction the ledger must ``admit`` the delivery: a worker whose
  claim was taken over, or whose lease may be about to expire, opens no new transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import ssl
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

import aiosmtplib

from digest.config import SMTP as SMTPConfig
from digest.config import Config
from digest.errors import (
    AmbiguousDeliveryError,
    DeliveryError,
    DigestError,
    PermanentDeliveryError,
    RatePaused,
    SenderRejectedError,
    SMTPUnavailableError,
    ThrottledError,
    TransientDeliveryError,
)
from digest.models import DeliveryStatus

# --- transport -----------------------------------------------------------------------------


class Transport(Protocol):
    """One connection's worth of SMTP: hand over a message or raise a DeliveryError."""

    async def send(self, sender: str, recipient: str, message: bytes) -> str: ...

    async def close(self) -> None: ...


class SMTPTransport:
    """An aiosmtplib client that (re)connects on demand and maps its errors to ours."""

    def __init__(self, cfg: SMTPConfig, password: str | None) -> None:
        self.cfg = cfg
        self.password = password
        self._smtp: aiosmtplib.SMTP | None = None

    async def _connect(self) -> aiosmtplib.SMTP:
        cfg = self.cfg
        smtp = aiosmtplib.SMTP(
            hostname=cfg.host,
            port=cfg.port,
            use_tls=cfg.security == "tls",
            start_tls=cfg.security == "starttls",
            timeout=cfg.timeout_seconds,
        )
        where = f"{cfg.host}:{cfg.port}"
        try:
            await smtp.connect()
            if cfg.username:
                await smtp.login(cfg.username, self.password or "")
        except aiosmtplib.SMTPConnectResponseError as exc:
            smtp.close()
            if is_throttle(exc.code, exc.message):  # "421 too many connections": slow down
                text = f"{exc.code} {exc.message}"
                raise ThrottledError(f"connect: {text}", exc.code, text) from None
            raise SMTPUnavailableError(
                f"SMTP server {where} refused the connection: {exc.code} {exc.message}; "
                "check smtp.host and smtp.port"
            ) from None
        except aiosmtplib.SMTPAuthenticationError as exc:
            smtp.close()
            raise SMTPUnavailableError(
                f"SMTP server {where} refused the login for {cfg.username!r}: "
                f"{exc.code} {exc.message}; check smtp.username and ${cfg.password_env}",
                exc.code,
                exc.message,
            ) from None
        except (aiosmtplib.SMTPException, OSError, ssl.SSLError) as exc:
            smtp.close()
            raise SMTPUnavailableError(
                f"cannot connect to SMTP server {where}: {_reason(exc)}; check smtp.host, "
                "smtp.port and smtp.security"
            ) from None
        return smtp

    async def send(self, sender: str, recipient: str, message: bytes) -> str:
        """Send one message to one recipient; the server's reply to DATA on success."""
        if self._smtp is None or not self._smtp.is_connected:
            self._smtp = await self._connect()
        smtp = self._smtp
        short = self.cfg.timeout_seconds
        stage = "MAIL"
        try:
            await smtp.mail(sender, timeout=short)
            stage = "RCPT"
            await smtp.rcpt(recipient, timeout=short)
            stage = "DATA"
            # The long wait is the point: giving up on the reply to "." while the server
            # is still writing the message to disk is how duplicates are made.
            response = await _data(smtp, message, self.cfg.data_timeout_seconds)
            return f"{response.code} {response.message}"
        except aiosmtplib.SMTPResponseException as exc:
            await self._reset()
            if exc.code == 421:
                await self.close()  # 421: the server is closing this channel
            raise self._classify(stage, exc.code, exc.message) from None
        except aiosmtplib.SMTPRecipientsRefused as exc:
            await self._reset()
            first = exc.recipients[0]
            raise self._classify("RCPT", first.code, first.message) from None
        except aiosmtplib.SMTPTimeoutError:
            await self.close()
            if stage == "DATA":
                raise AmbiguousDeliveryError(
                    "timed out waiting for the reply to DATA; the message may have been delivered"
                ) from None
            raise TransientDeliveryError(f"{stage}: timed out") from None
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPException, OSError) as exc:
            await self.close()
            raise TransientDeliveryError(f"{stage}: connection lost ({_reason(exc)})") from None

    def _classify(self, stage: str, code: int, message: str) -> DeliveryError:
        """The error for a refusal ``code`` at ``stage``: whom it is about decides.

        Only a refusal of the *recipient* may count as their hard bounce. A refusal of
        our sender, session or message would be the same for every recipient, and
        counting it would mark the whole list bounced within three issues.
        """
        reply = " ".join(f"{code} {message}".split())
        if is_throttle(code, message):
            return ThrottledError(f"{stage}: {reply}", code, reply)
        if 400 <= code < 500:
            return TransientDeliveryError(f"{stage}: {reply}", code, reply)
        about = _refused_party(stage, code, message)
        if about == "recipient":
            return PermanentDeliveryError(f"{stage}: {reply}", code, reply)
        where = f"{self.cfg.host}:{self.cfg.port}"
        return SenderRejectedError(
            f"SMTP server {where} refused {about} at {stage} ({reply}); nobody's bounce "
            f"count changed and the rest stay pending: {_FIXES[about]}, then run send again",
            code,
            reply,
        )

    async def _reset(self) -> None:
        if self._smtp is not None and self._smtp.is_connected:
            try:
                await self._smtp.rset(timeout=self.cfg.timeout_seconds)
            except (aiosmtplib.SMTPException, OSError):
                await self.close()

    async def close(self) -> None:
        """QUIT politely; a connection that is already gone is just dropped."""
        smtp, self._smtp = self._smtp, None
        if smtp is not None and smtp.is_connected:
            try:
                await smtp.quit(timeout=5)
            except (aiosmtplib.SMTPException, OSError):
                smtp.close()


# RFC 3463 enhanced status code at the start of a reply's text, e.g. "5.7.1 Sender rejected".
_ENHANCED = re.compile(r"\s*([245])\.(\d{1,3})\.(\d{1,3})\b")
# "Relay access denied" (Postfix), "Relaying denied" (Sendmail), "relay not permitted"
# (Exim), "Unable to relay" (Exchange): the relay will not take mail from us at all.
_RELAY_DENIED = re.compile(r"\brelay", re.IGNORECASE)
_FIXES = {
    "our sender": "check newsletter.sender is an address the relay accepts from us",
    "our session": "check smtp.username, smtp.password_env and smtp.security",
    "the message": "read the reply (policy, content or size) and fix the message",
}


def _refused_party(stage: str, code: int, message: str) -> str:
    """Whom a 5xx refusal is about: "recipient", "our sender", "our session" or "the message".

    * 530/538 (authentication or encryption required) and the X.7.8-X.7.14 family
      (credentials, trust) at any stage: our session.
    * MAIL: our sender (e.g. ``553 5.7.1 Sender rejected``).
    * RCPT: the recipient, unless the relay refuses to relay for us at all.
    * DATA: the recipient only for ``5.1.x`` (address) and ``5.2.x`` (mailbox); anything
      else (``5.7.x`` policy, ``5.6.x`` content, ``5.3.4`` size, no code) refuses a
      message every other recipient would get as well.
    """
    enhanced = _ENHANCED.match(message)
    subject, detail = (int(enhanced[2]), int(enhanced[3])) if enhanced else (0, 0)
    if code in (530, 538) or (subject == 7 and 8 <= detail <= 14):
        return "our session"
    if stage == "MAIL":
        return "our sender"
    if stage == "RCPT":
        return "our session" if _RELAY_DENIED.search(message) else "recipient"
    if stage == "DATA" and subject in (1, 2):
        return "recipient"
    return "the message"


def wire_payload(message: bytes) -> bytes | None:
    """What follows DATA for a CRLF-only message: dot-stuffed, then ".". None otherwise."""
    crlf = message.count(b"\r\n")
    if not (message.endswith(b"\r\n") and message.count(b"\n") == crlf == message.count(b"\r")):
        return None
    stuffed = message.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed + b".\r\n"


async def _data(smtp: aiosmtplib.SMTP, message: bytes, timeout: float) -> aiosmtplib.SMTPResponse:
    """DATA, the message and the final ".", without aiosmtplib's two regex passes.

    ``SMTP.data`` rewrites every line ending and dot-stuffs with regexes over the whole
    message: half of a send's time on the profile in bench/README.md. Our messages are
    already CRLF-only, so dot-stuffing is one ``bytes.replace``; anything else (a bare CR
    or LF) takes aiosmtplib's own path. Same commands, same bytes on the wire.
    """
    payload = wire_payload(message)
    if payload is None:
        return await smtp.data(message, timeout=timeout)
    start = await smtp.execute_command(b"DATA", timeout=timeout)
    if start.code != 354:
        raise aiosmtplib.SMTPDataError(start.code, start.message)
    protocol = smtp.protocol
    if protocol is None:
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    try:
        protocol.write(payload)
        response = await protocol.read_response(timeout=timeout)
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
        smtp.close()
        raise
    if response.code != 250:
        raise aiosmtplib.SMTPDataError(response.code, response.message)
    return response


# A 4.7.x enhanced status code at the start of a reply (RFC 3463: "security or policy").
_POLICY_4XX = re.compile(r"\s*4\.7\.\d{1,3}\b")


def is_throttle(code: int, message: str) -> bool:
    """True for replies that ask us to slow down rather than refuse a message.

    421 (the server closes the channel: Gmail 4.7.28, Yahoo TSS04, Microsoft RP-00x),
    any 4xx with a 4.7.x code (Microsoft 451 4.7.650), and SES's "454 Throttling failure".
    """
    if not 400 <= code < 500:
        return False
    return code == 421 or bool(_POLICY_4XX.match(message)) or "throttl" in message.lower()


TransportFactory = Callable[[], Transport]


def transport_factory(config: Config) -> TransportFactory:
    """What delivers mail for this config: the ``[outbox]`` Maildir, else the ``[smtp]`` relay.

    Every sender of mail (the weekly send, and any one-off message such as a signup
    confirmation or an editor's test copy) goes through this, so ``[outbox]`` catches them
    all. Call the factory once per connection; a transport sends many messages::

        transport = transport_factory(config)()
        try:
            await transport.send(envelope_from, "reader@example.org", message_bytes)
        finally:
            await transport.close()

    ``send`` raises :class:`~digest.errors.DeliveryError` subclasses (see
    :mod:`digest.errors`) and returns the server's reply (or where the file went).
    """
    if config.outbox is not None:
        from digest.outbox import MaildirTransport

        path = config.outbox.path
        return lambda: MaildirTransport(path)
    smtp, password = config.smtp, config.smtp_password
    return lambda: SMTPTransport(smtp, password)


def _reason(exc: BaseException) -> str:
    # aiosmtplib wraps the socket error; its strerror ("Connection refused") says it best.
    for e in (exc, exc.__cause__, exc.__context__):
        if isinstance(e, OSError) and e.strerror:
            return e.strerror
    return str(exc).strip() or type(exc).__name__


# --- engine --------------------------------------------------------------------------------


@dataclass
class Outgoing:
    """One message to send and where its outcome goes."""

    delivery_id: int
    subscriber_id: int
    recipient: str
    message: bytes
    message_id: str
    attempts: int = 0  # attempts before this run (from the ledger)
    tries: int = 0  # attempts in this run that count against the retry budget
    throttles: int = 0  # attempts in this run the relay answered with "slow down"


@dataclass(frozen=True)
class Outcome:
    """The final state of one delivery in this run."""

    delivery_id: int
    subscriber_id: int
    status: DeliveryStatus
    attempts: int
    message_id: str | None = None
    error: str | None = None
    next_attempt_at: datetime | None = None
    permanent: bool = False


class Ledger(Protocol):
    """Where outcomes are recorded, and who may send what.

    ``admit`` says whether an SMTP transaction for a delivery may start now (False: the
    claim was taken over). ``record`` returns once the outcome is durable: True, or
    False when the claim was taken over and the outcome was therefore not written.
    """

    async def admit(self, delivery_id: int) -> bool: ...

    async def record(self, outcome: Outcome) -> bool: ...


class Limiter(Protocol):
    """The relay's shared rate limit (see ``ratelimit.py``)."""

    async def acquire(self) -> None:
        """Wait for a token; raise :class:`RatePaused` when an hour/day window is full."""
        ...

    async def throttled(self) -> None:
        """The relay asked us to slow down."""
        ...


class NoLimit:
    """No rate limit at all (tests, transports that are not a relay)."""

    async def acquire(self) -> None:
        """Never waits."""

    async def throttled(self) -> None:
        """Ignored."""


@dataclass
class SendStats:
    """What one run did."""

    sent: int = 0
    failed: int = 0
    interrupted: bool = False
    deferred: int = 0
    skipped: int = 0
    retries: int = 0
    throttled: int = 0  # throttling replies (retried without using the retry budget)
    lost: int = 0  # claims another worker took over (not sent, or sent but not recorded)
    paused: RatePaused | None = None  # an hour/day quota of the relay is full
    errors: list[str] = field(default_factory=list)
    # Deliveries claimable when the run started (set by the caller; progress bars' total).
    total: int = 0

    @property
    def done(self) -> int:
        """Deliveries that reached their outcome for this run (retries still pending excluded)."""
        return self.sent + self.failed + self.deferred + self.skipped


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with equal jitter, at most ``max_attempts`` tries per run."""

    max_attempts: int = 4
    base_seconds: float = 2.0
    cap_seconds: float = 300.0
    # Throttled tries of one message per run: not the retry budget, but a bound, so a
    # relay that never stops throttling cannot keep a send going for ever.
    max_throttles: int = 30

    def delay(self, tries: int) -> float:
        """Seconds to wait before try number ``tries + 1``."""
        # "Equal jitter": half the backoff fixed, half random. The random half spreads K
        # workers' retries so a throttling relay sees no burst; the fixed half means no
        # retry comes back at once (full jitter, uniform(0, backoff), can).
        backoff: float = min(self.cap_seconds, self.base_seconds * 2.0 ** (tries - 1))
        return random.uniform(0.5, 1.0) * backoff


class SendEngine:
    """Runs K workers over a source of messages until every message has an outcome."""

    def __init__(
        self,
        transports: Callable[[], Transport],
        ledger: Ledger,
        sender: str,
        concurrency: int,
        policy: RetryPolicy,
        progress: Callable[[SendStats], None] | None = None,
        limiter: Limiter | None = None,
    ) -> None:
        self._transports = transports
        self._ledger = ledger
        self._limiter = limiter or NoLimit()
        self._sender = sender
        self._k = concurrency
        self._policy = policy
        self._progress = progress
        self.stats = SendStats()
        self._queue: asyncio.Queue[Outgoing | None] = asyncio.Queue(maxsize=concurrency * 4)
        self._outstanding = 0
        self._idle = asyncio.Event()
        self._fatal: DigestError | None = None
        self._stop = asyncio.Event()

    def stop(self) -> None:
        """Finish in-flight messages, then stop taking new ones (SIGTERM)."""
        self.stats.interrupted = True
        self._stop.set()

    @property
    def stopping(self) -> bool:
        """True once the run takes no new messages (stopped, paused or failed)."""
        return self._stop.is_set()

    @property
    def outstanding(self) -> int:
        """Messages taken from the source and not finished yet (what is left to send)."""
        return self._outstanding

    def _pause(self, paused: RatePaused) -> None:
        # Not an interruption: the relay's quota is used up, the rest waits for the window.
        self.stats.paused = self.stats.paused or paused
        self._stop.set()

    async def run(self, source: AsyncGenerator[Outgoing, None]) -> SendStats:
        """Send everything ``source`` yields; raise SMTPUnavailableError if SMTP is down.

        A :class:`DigestError` from the ledger (the database is gone) stops the run the
        same way and is raised at the end.
        """
        workers = [asyncio.create_task(self._worker(self._transports())) for _ in range(self._k)]
        try:
            # aclosing: when we stop early, the source's database session closes now.
            async with contextlib.aclosing(source):
                async for item in source:
                    if self._fatal or self._stop.is_set():
                        break
                    self._outstanding += 1
                    self._idle.clear()
                    await self._queue.put(item)
            if self._outstanding and not (self._fatal or self._stop.is_set()):
                await self._wait_idle()
        except BaseException:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            raise
        # Workers finish the message in hand (and its ledger write) before seeing None.
        for _ in workers:
            await self._queue.put(None)
        await asyncio.gather(*workers)
        if self._fatal:
            raise self._fatal
        return self.stats

    async def _wait_idle(self) -> None:
        stop = asyncio.create_task(self._stop.wait())
        idle = asyncio.create_task(self._idle.wait())
        await asyncio.wait({stop, idle}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        idle.cancel()

    def _done_one(self) -> None:
        self._outstanding -= 1
        if self._outstanding == 0:
            self._idle.set()
        if self._progress:
            self._progress(self.stats)

    async def _worker(self, transport: Transport) -> None:
        try:
            while True:
                item = await self._queue.get()
                if item is None:
                    return
                if self._fatal or self._stop.is_set():
                    # Not tried: it stays claimed-but-unsent and the next run takes it.
                    self._done_one()
                    continue
                await self._attempt(transport, item)
        finally:
            await transport.close()

    async def _attempt(self, transport: Transport, item: Outgoing) -> None:
        try:
            if not await self._ledger.admit(item.delivery_id):
                self._lost(item)
                return
            await self._limiter.acquire()
            # The wait for a token may have been long: ask again.
            if not await self._ledger.admit(item.delivery_id):
                self._lost(item)
                return
        except RatePaused as exc:
            self._pause(exc)
            self._done_one()  # not tried: it goes back to pending
            return
        except DigestError as exc:
            self._fail(exc)
            return
        item.tries += 1
        attempts = item.attempts + item.tries + item.throttles
        try:
            await transport.send(self._sender, item.recipient, item.message)
        except SMTPUnavailableError as exc:
            # Connect/login failed: nothing was sent. One worker saying so is enough.
            self._fail(exc)
            return
        except PermanentDeliveryError as exc:
            await self._record(
                item,
                Outcome(
                    item.delivery_id,
                    item.subscriber_id,
                    DeliveryStatus.FAILED,
                    attempts,
                    item.message_id,
                    exc.reply or str(exc),
                    permanent=True,
                ),
            )
            return
        except ThrottledError as exc:
            await self._throttled(item, attempts, exc)
            return
        except DeliveryError as exc:
            await self._defer(item, attempts, exc)
            return
        await self._record(
            item,
            Outcome(
                item.delivery_id, item.subscriber_id, DeliveryStatus.SENT, attempts, item.message_id
            ),
        )

    async def _record(self, item: Outgoing, outcome: Outcome) -> None:
        """Record a final outcome and count it, unless our claim was taken over meanwhile."""
        try:
            written = await self._ledger.record(outcome)
        except DigestError as exc:
            self._fail(exc)
            return
        if not written:
            self._lost(item)
            return
        if outcome.status == DeliveryStatus.SENT:
            self.stats.sent += 1
        elif outcome.status == DeliveryStatus.FAILED:
            self.stats.failed += 1
        elif outcome.status == DeliveryStatus.DEFERRED:
            self.stats.deferred += 1
        self._done_one()

    def _lost(self, item: Outgoing) -> None:
        # Another worker owns the row now; its outcome stands, ours is dropped.
        self.stats.lost += 1
        self._done_one()

    def _fail(self, exc: DigestError) -> None:
        self._fatal = self._fatal or exc
        self._stop.set()
        self._done_one()

    async def _throttled(self, item: Outgoing, attempts: int, exc: ThrottledError) -> None:
        self.stats.throttled += 1
        item.tries -= 1  # a throttled try does not use up the retry budget...
        item.throttles += 1
        try:
            await self._limiter.throttled()  # ...but slows every worker down
        except DigestError as err:
            self._fail(err)
            return
        if item.throttles >= self._policy.max_throttles or self._stop.is_set():
            await self._defer(item, attempts, exc, final=True)
            return
        self.stats.retries += 1
        delay = self._policy.delay(min(item.throttles, 4))
        asyncio.get_running_loop().call_later(delay, self._requeue, item)

    async def _defer(
        self, item: Outgoing, attempts: int, exc: DeliveryError, final: bool = False
    ) -> None:
        ambiguous = isinstance(exc, AmbiguousDeliveryError)
        retry_here = (
            not final
            and not ambiguous
            and item.tries < self._policy.max_attempts
            and not self._stop.is_set()
        )
        if not retry_here:
            # Given up for this run: the row goes back to the pool with a retry time.
            delay = self._policy.cap_seconds
            await self._record(
                item,
                Outcome(
                    item.delivery_id,
                    item.subscriber_id,
                    DeliveryStatus.DEFERRED,
                    attempts,
                    item.message_id,
                    str(exc),
                    next_attempt_at=datetime.now(UTC) + timedelta(seconds=delay),
                ),
            )
            return
        # Retried here, still under our claim (so no other worker takes it meanwhile);
        # the attempt count is written with its final outcome.
        self.stats.retries += 1
        # Re-queue after the backoff without holding this worker (or its connection) idle.
        asyncio.get_running_loop().call_later(self._policy.delay(item.tries), self._requeue, item)

    def _requeue(self, item: Outgoing) -> None:
        if self._stop.is_set() or self._fatal:
            self._done_one()  # not retried in this run: released to pending at the end
            return
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            asyncio.get_running_loop().call_later(0.05, self._requeue, item)
