"""Signed, opaque unsubscribe tokens.

A token is the subscriber id signed with HMAC-SHA256 (itsdangerous); it does not expire,
because CAN-SPAM wants an opt-out that keeps working and a reader may click an old issue.
A tampered token, or one signed with another secret, does not verify.
"""

from __future__ import annotations

import hashlib

import itsdangerous

from digest.errors import ConfigError, TokenError

_SALT = "digest.unsubscribe.v1"

SECRET_HINT = (
    "set [unsubscribe] secret (or secret_env) to a long random string, made with: "
    "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
)


class TokenSigner:
    """Makes and checks unsubscribe tokens for one secret."""

    def __init__(self, secret: str | None) -> None:
        if not secret or len(secret) < 16:
            raise ConfigError(
                f"unsubscribe secret missing or shorter than 16 characters: {SECRET_HINT}"
            )
        # itsdangerous derives the HMAC key from secret and salt on every call; derive it
        # once (a token is made per message sent) and sign with it directly. The tokens
        # are byte-for-byte those of the plain serializer.
        key = itsdangerous.Signer(secret, salt=_SALT, digest_method=hashlib.sha256).derive_key()
        self._s = itsdangerous.URLSafeSerializer(
            key,
            salt=_SALT,
            signer_kwargs={"digest_method": hashlib.sha256, "key_derivation": "none"},
        )

    def token(self, subscriber_id: int) -> str:
        """The token for one subscriber."""
        return str(self._s.dumps(subscriber_id))

    def verify(self, token: str) -> int:
        """The subscriber id a token was made for; :class:`TokenError` when it does not verify."""
        try:
            value = self._s.loads(token)
        except itsdangerous.BadData:
            raise TokenError("invalid unsubscribe token") from None
        if not isinstance(value, int) or isinstance(value, bool):
            raise TokenError("invalid unsubscribe token")
        return value

    def url(self, base_url: str, subscriber_id: int) -> str:
        """The one-click unsubscribe URL served by ``digest serve``."""
        return f"{base_url}/unsubscribe/{self.token(subscriber_id)}"
