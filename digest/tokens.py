"""Signed, opaque, rotatable tokens for the links in a message (unsubscribe, preferences),
and the double opt-in links of signup (:class:`ConfirmSigner`, at the end).

A token names one subscriber: their id *and* a short hash of their address, encrypted and
authenticated (Fernet: AES-128-CBC + HMAC-SHA256, from ``cryptography``), so the link
shows neither the id nor the address, a tampered token does not verify, and a token only
acts on the person it was made for (:meth:`TokenClaim.matches`). Tokens do not expire:
CAN-SPAM wants an opt-out that keeps working, and a reader may click an old issue.

Keys: each ``purpose`` derives its own key from the secret, so a token made for one
purpose never verifies as another. Rotation: new tokens are made with ``secret``;
``old_secrets`` still verify, so links in mail already sent keep working after a change.

Tokens made before address binding (itsdangerous over the bare id, salt
``digest.unsubscribe.v1``) still verify for the unsubscribe purpose; their claim matches
any address. That is safe because subscriber ids are never reused (AUTOINCREMENT on
SQLite, sequences on PostgreSQL): such an id names the person it was sent to, or nobody.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import itsdangerous
from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from digest.errors import ConfigError, ExpiredToken, TokenError

_LEGACY_SALT = "digest.unsubscribe.v1"
_ADDRESS_HASH_BYTES = 8

SECRET_HINT = (
    "set [unsubscribe] secret (or secret_env) to a long random string, made with: "
    "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
)


def address_hash(email: str) -> bytes:
    """A short hash of a normalized address (stored addresses are already normalized)."""
    return hashlib.sha256(email.strip().lower().encode()).digest()[:_ADDRESS_HASH_BYTES]


@dataclass(frozen=True)
class TokenClaim:
    """What a verified token says: a subscriber id and (except old tokens) their address."""

    subscriber_id: int
    address_hash: bytes | None = None  # None: a token from before address binding

    def matches(self, email: str) -> bool:
        """True when the token was made for ``email`` (old tokens: for any address)."""
        if self.address_hash is None:
            return True
        return hmac.compare_digest(self.address_hash, address_hash(email))


def _check(secret: str | None, key: str) -> str:
    if not secret or len(secret) < 16:
        raise ConfigError(f"{key} missing or shorter than 16 characters: {SECRET_HINT}")
    return secret


class TokenSigner:
    """Makes tokens with ``secret`` and verifies those of ``secret`` or any ``old_secrets``."""

    def __init__(
        self,
        secret: str | None,
        old_secrets: Sequence[str] = (),
        purpose: str = "unsubscribe",
    ) -> None:
        secrets = [_check(secret, "unsubscribe secret")]
        secrets += [_check(s, "unsubscribe.old_secrets entry") for s in old_secrets]
        self.purpose = purpose
        # One Fernet key per (secret, purpose): the purpose is part of the derivation, so
        # an unsubscribe token is no preference token. Derived once; a token is made per
        # message sent.
        self._fernet = MultiFernet([Fernet(self._derive(s, purpose)) for s in secrets])
        # The tokens of before, for links already in readers' mailboxes.
        self._legacy = (
            [
                itsdangerous.URLSafeSerializer(
                    s, salt=_LEGACY_SALT, signer_kwargs={"digest_method": hashlib.sha256}
                )
                for s in secrets
            ]
            if purpose == "unsubscribe"
            else []
        )

    @staticmethod
    def _derive(secret: str, purpose: str) -> bytes:
        key = hmac.new(secret.encode(), f"digest.{purpose}.v2".encode(), hashlib.sha256)
        return base64.urlsafe_b64encode(key.digest())

    def token(self, subscriber_id: int, email: str) -> str:
        """The token for one subscriber at one address (URL-safe, no padding)."""
        if subscriber_id < 0:
            raise ValueError("subscriber ids are not negative")
        size = max(1, (subscriber_id.bit_length() + 7) // 8)
        payload = address_hash(email) + subscriber_id.to_bytes(size, "big")
        return self._fernet.encrypt(payload).decode("ascii").rstrip("=")

    def verify(self, token: str) -> TokenClaim:
        """What ``token`` claims; :class:`TokenError` when it does not verify."""
        if "." in token:  # itsdangerous' "payload.signature": a token from before
            return self._verify_legacy(token)
        try:
            raw = token.encode("ascii")
            payload = self._fernet.decrypt(raw + b"=" * (-len(raw) % 4))
        except (InvalidToken, UnicodeEncodeError, ValueError):
            raise TokenError("invalid token") from None
        if len(payload) <= _ADDRESS_HASH_BYTES:
            raise TokenError("invalid token")
        return TokenClaim(
            int.from_bytes(payload[_ADDRESS_HASH_BYTES:], "big"), payload[:_ADDRESS_HASH_BYTES]
        )

    def _verify_legacy(self, token: str) -> TokenClaim:
        for serializer in self._legacy:
            try:
                value = serializer.loads(token)
            except itsdangerous.BadData:
                continue
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                return TokenClaim(value)
        raise TokenError("invalid token")

    def url(self, base_url: str, subscriber_id: int, email: str) -> str:
        """The one-click unsubscribe URL served by ``digest serve``."""
        return f"{base_url}/{self.purpose}/{self.token(subscriber_id, email)}"


# --- double opt-in links ----------------------------------------------------------------

_MAX_CONFIRM_TOKEN = 8192  # longer than any token we make; refused before any decoding
_CONFIRM_ALPHABET = re.compile(r"[A-Za-z0-9_-]+")  # unpadded base64url, one path segment
_LEGACY_CONFIRM_SALT = "digest.confirm.v1"


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _micros(moment: datetime) -> int:
    return (moment - _EPOCH) // timedelta(microseconds=1)


def _from_micros(value: object) -> datetime:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError("not a time")
    return _EPOCH + timedelta(microseconds=value)


@dataclass(frozen=True)
class SignupClaim:
    """What a verified confirmation link asks for.

    ``requested_at`` is when the form was posted, ``issued_at`` when the link was made
    (the mail was composed); both to the microsecond (links from before encryption: to
    the second, rounded down), so they can be ordered against an unsubscribe.
    """

    email: str
    name: str
    regions: list[str] | None
    requested_at: datetime
    issued_at: datetime


class ConfirmSigner:
    """Double opt-in links: the address, name, regions and times of a signup, encrypted
    and authenticated (Fernet, a key of its own derived from each secret), expiring
    ``ttl`` after the link was made.

    Nothing about a pending signup is stored: the link carries it, and only a person
    who received the mail can present it. Encrypted, because a link is logged by
    whatever it passes (proxies, mail scanners, browser history) and must not show
    who signed up. ``old_secrets`` still verify after a rotation.

    Links mailed before encryption (itsdangerous, readable, ``payload.time.signature``)
    still verify until they expire; only the new kind is made.
    """

    def __init__(self, secret: str | None, ttl: timedelta, old_secrets: Sequence[str] = ()) -> None:
        secrets = [_check(secret, "unsubscribe secret")]
        secrets += [_check(s, "unsubscribe.old_secrets entry") for s in old_secrets]
        self.ttl = ttl
        self._fernet = MultiFernet([Fernet(TokenSigner._derive(s, "confirm")) for s in secrets])
        # itsdangerous signs with the last key and verifies with any.
        self._legacy = itsdangerous.URLSafeTimedSerializer(
            list(reversed(secrets)),
            salt=_LEGACY_CONFIRM_SALT,
            signer_kwargs={"digest_method": hashlib.sha256},
        )

    def token(
        self,
        email: str,
        name: str,
        regions: Sequence[str] | None,
        requested_at: datetime,
        issued_at: datetime | None = None,
    ) -> str:
        """A confirmation token; its clock starts at ``issued_at`` (default: now)."""
        issued = issued_at or datetime.now(UTC)
        payload = {
            "e": email,
            "n": name,
            "r": None if regions is None else list(regions),
            "t": _micros(requested_at),
            "i": _micros(issued),
        }
        data = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
        token = self._fernet.encrypt_at_time(data, int(issued.timestamp()))
        return token.decode("ascii").rstrip("=")

    def verify(self, token: str, now: datetime | None = None) -> SignupClaim:
        """The claim; :class:`ExpiredToken` when it is genuine but too old,
        :class:`TokenError` when it is not genuine."""
        if len(token) > _MAX_CONFIRM_TOKEN:
            raise TokenError("invalid confirmation token")
        if "." in token:
            return self._verify_legacy(token)
        # Fernet's base64 decoding skips characters outside its alphabet; a link has one
        # spelling only.
        if not _CONFIRM_ALPHABET.fullmatch(token):
            raise TokenError("invalid confirmation token")
        try:
            raw = token.encode("ascii")
            data = self._fernet.decrypt(raw + b"=" * (-len(raw) % 4))
            value = json.loads(data)
            claim = self._claim(value, _from_micros(value["t"]), _from_micros(value["i"]))
        except (InvalidToken, KeyError, TypeError, ValueError, OverflowError):
            raise TokenError("invalid confirmation token") from None
        if (now or datetime.now(UTC)) - claim.issued_at > self.ttl:
            raise ExpiredToken("the confirmation link has expired")
        return claim

    def _verify_legacy(self, token: str) -> SignupClaim:
        try:
            value, issued = self._legacy.loads(
                token, max_age=int(self.ttl.total_seconds()), return_timestamp=True
            )
        except itsdangerous.SignatureExpired:
            raise ExpiredToken("the confirmation link has expired") from None
        except itsdangerous.BadData:
            raise TokenError("invalid confirmation token") from None
        try:
            requested = datetime.fromtimestamp(int(value["t"]), UTC)
            return self._claim(value, requested, issued.astimezone(UTC))
        except (KeyError, TypeError, ValueError, OverflowError):
            raise TokenError("invalid confirmation token") from None

    @staticmethod
    def _claim(value: Any, requested_at: datetime, issued_at: datetime) -> SignupClaim:
        email, name, regions = value["e"], value["n"], value["r"]
        if not isinstance(email, str) or not isinstance(name, str):
            raise TypeError("not a signup")
        if regions is not None and not isinstance(regions, list):
            raise TypeError("not a signup")
        return SignupClaim(
            email=email,
            name=name,
            regions=None if regions is None else [str(r) for r in regions],
            requested_at=requested_at,
            issued_at=issued_at,
        )

    def url(
        self,
        base_url: str,
        email: str,
        name: str,
        regions: Sequence[str] | None,
        requested_at: datetime,
    ) -> str:
        """``{base_url}/confirm/{token}``."""
        return f"{base_url}/confirm/{self.token(email, name, regions, requested_at)}"


# --- Message-ID tags --------------------------------------------------------------------


class MessageTags:
    """HMAC tags that mark a Message-ID as one of ours.

    Our Message-IDs name the issue and subscriber, which anyone can guess; a bounce report
    (DSN) about such an id would let a stranger mark any subscriber bounced. The tag
    (80 bits of HMAC-SHA256 over the id's other parts, keyed from the unsubscribe secret)
    can only come from a message we sent, so only reports quoting a tagged id count.
    Tags made with ``old_secrets`` still verify after a rotation.
    """

    def __init__(self, secret: str | None, old_secrets: Sequence[str] = ()) -> None:
        secrets = [_check(secret, "unsubscribe secret")]
        secrets += [_check(s, "unsubscribe.old_secrets entry") for s in old_secrets]
        self._keys = [
            hmac.new(s.encode(), b"digest.message-id.v1", hashlib.sha256).digest() for s in secrets
        ]

    @staticmethod
    def _tag(key: bytes, text: str) -> str:
        digest = hmac.new(key, text.encode(), hashlib.sha256).digest()[:10]
        return base64.b32encode(digest).decode("ascii").lower()

    def tag(self, text: str) -> str:
        """The tag of ``text`` (16 characters of a-z and 2-7), with the current secret."""
        return self._tag(self._keys[0], text)

    def valid(self, text: str, tag: str) -> bool:
        """Whether ``tag`` was made for ``text`` with the current or an old secret."""
        return any(hmac.compare_digest(self._tag(k, text), tag) for k in self._keys)
