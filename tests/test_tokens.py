"""Link tokens: opaque, bound to id and address, per purpose, rotatable, old links kept."""

from __future__ import annotations

import base64
import hashlib
import re
from datetime import UTC, datetime, timedelta

import itsdangerous
import pytest
from hypothesis import given
from hypothesis import strategies as st

from digest.errors import ConfigError, ExpiredToken, TokenError
from digest.tokens import ConfirmSigner, TokenClaim, TokenSigner

SECRET = "test-secret-0123456789abcdef"
OLD = "old-secret-0123456789abcdef"


def legacy_token(secret: str, subscriber_id: int) -> str:
    """A token exactly as TokenSigner made them before tokens named the address."""
    serializer = itsdangerous.URLSafeSerializer(
        secret, salt="digest.unsubscribe.v1", signer_kwargs={"digest_method": hashlib.sha256}
    )
    return str(serializer.dumps(subscriber_id))


def decoded(token: str) -> bytes:
    """Every byte a reader of the link can recover without the secret."""
    out = b""
    for part in token.split("."):
        out += base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    return out


@given(
    subscriber_id=st.integers(min_value=0, max_value=2**63),
    email=st.emails().map(str.lower),
)
def test_a_token_names_its_subscriber_and_address(subscriber_id: int, email: str) -> None:
    signer = TokenSigner(SECRET)
    token = signer.token(subscriber_id, email)
    claim = signer.verify(token)
    assert claim.subscriber_id == subscriber_id
    assert claim.matches(email) and claim.matches(f" {email.upper()} ")
    assert not claim.matches("x" + email)
    assert "/" not in token and "=" not in token and "." not in token


def test_the_id_and_address_are_not_readable_in_the_link() -> None:
    subscriber_id, email = 123456789, "reader@example.org"
    token = TokenSigner(SECRET).token(subscriber_id, email)
    raw = decoded(token)
    assert b"123456789" not in raw and str(subscriber_id) not in token
    assert subscriber_id.to_bytes(4, "big") not in raw
    assert b"reader" not in raw and hashlib.sha256(email.encode()).digest()[:8] not in raw


def test_a_purpose_never_verifies_as_another() -> None:
    unsub = TokenSigner(SECRET)
    prefs = TokenSigner(SECRET, purpose="preferences")
    with pytest.raises(TokenError):
        unsub.verify(prefs.token(7, "a@example.org"))
    with pytest.raises(TokenError):
        prefs.verify(unsub.token(7, "a@example.org"))
    with pytest.raises(TokenError):  # old links were unsubscribe links only
        prefs.verify(legacy_token(SECRET, 7))
    assert prefs.url("https://n.example", 7, "a@example.org").startswith(
        "https://n.example/preferences/"
    )


def test_rotation_signs_with_the_new_secret_and_verifies_the_old() -> None:
    before = TokenSigner(OLD).token(42, "a@example.org")
    rotated = TokenSigner(SECRET, old_secrets=[OLD])
    assert rotated.verify(before).subscriber_id == 42
    assert rotated.verify(before).matches("a@example.org")
    assert rotated.verify(legacy_token(OLD, 42)).subscriber_id == 42
    fresh = rotated.token(42, "a@example.org")
    assert TokenSigner(SECRET).verify(fresh).subscriber_id == 42  # signed with the new one
    with pytest.raises(TokenError):
        TokenSigner(OLD).verify(fresh)
    with pytest.raises(TokenError):
        TokenSigner(SECRET).verify(before)  # the old secret retired: its links are dead


def test_links_made_before_this_change_still_verify_for_any_address() -> None:
    claim = TokenSigner(SECRET).verify(legacy_token(SECRET, 42))
    assert claim == TokenClaim(42, None)
    assert claim.matches("anyone@example.org")  # safe: ids are never reused
    url = TokenSigner(SECRET).url("https://n.example/u", 42, "a@example.org")
    assert url.startswith("https://n.example/u/unsubscribe/")


@pytest.mark.parametrize(
    "token",
    [
        "",
        "not-a-token",
        "🦊",
        legacy_token(SECRET, 42)[:-2] + "xx",
        legacy_token("another-secret-0123456789", 42),
        TokenSigner(SECRET).token(42, "a@example.org")[:-2] + "AA",
        TokenSigner("another-secret-0123456789").token(42, "a@example.org"),
    ],
)
def test_bad_tokens_raise_token_error(token: str) -> None:
    with pytest.raises(TokenError):
        TokenSigner(SECRET).verify(token)


def test_short_secrets_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="unsubscribe secret missing"):
        TokenSigner("short")
    with pytest.raises(ConfigError, match="old_secrets"):
        TokenSigner(SECRET, old_secrets=["short"])


# --- confirmation links -----------------------------------------------------------------

TTL = timedelta(hours=72)
SIGNUP = ("zoë.reader@example.org", "Zoë <b>&</b> 𝔘🦊 Lee", ["Europe", "Middle East"])


def legacy_confirm_token(secret: str, issued: datetime, requested: datetime) -> str:
    """A confirmation token exactly as ConfirmSigner made them before they were encrypted
    (itsdangerous, readable), issued at ``issued``."""

    class At(itsdangerous.TimestampSigner):
        def get_timestamp(self) -> int:
            return int(issued.timestamp())

    serializer = itsdangerous.URLSafeTimedSerializer(
        secret, salt="digest.confirm.v1", signer=At, signer_kwargs={"digest_method": hashlib.sha256}
    )
    email, name, regions = SIGNUP
    return str(
        serializer.dumps({"e": email, "n": name, "r": regions, "t": int(requested.timestamp())})
    )


def test_a_confirmation_link_shows_nothing_of_the_signup() -> None:
    email, name, regions = SIGNUP
    now = datetime.now(UTC)
    signer = ConfirmSigner(SECRET, TTL)
    token = signer.token(email, name, regions, now)
    raw = decoded(token)
    for part in ("reader", "example", "europe", "middle"):  # (long enough not to occur by chance)
        assert part not in token.lower() and part.encode() not in raw.lower()
    for text in (email, name):
        assert text.encode("utf-8") not in raw and text.encode("unicode_escape") not in raw
    assert re.fullmatch(r"[A-Za-z0-9_-]+", token)  # one URL path segment, no padding
    claim = signer.verify(token)
    assert (claim.email, claim.name, claim.regions) == (email, name, regions)
    assert claim.requested_at == now  # to the microsecond: ordered against unsubscribes
    assert now <= claim.issued_at <= datetime.now(UTC)


def test_confirmation_links_expire_after_the_ttl_and_rotate() -> None:
    email, name, regions = SIGNUP
    now = datetime.now(UTC)
    old = ConfirmSigner(OLD, TTL)
    rotated = ConfirmSigner(SECRET, TTL, old_secrets=[OLD])
    fresh = old.token(email, name, None, now, issued_at=now - TTL + timedelta(minutes=5))
    assert rotated.verify(fresh).regions is None  # made with the old secret: still good
    stale = old.token(email, name, regions, now, issued_at=now - TTL - timedelta(minutes=5))
    with pytest.raises(ExpiredToken):
        rotated.verify(stale)
    with pytest.raises(TokenError):
        ConfirmSigner(SECRET, TTL).verify(fresh)  # the old secret retired
    for other in (
        TokenSigner(SECRET, purpose="preferences").token(7, email),
        TokenSigner(SECRET).token(7, email),
        ConfirmSigner("another-secret-0123456789", TTL).token(email, name, regions, now),
        rotated.token(email, name, regions, now)[:-3] + "AAA",
        rotated.token(email, name, regions, now) + "%0d%0a",
        rotated.token(email, name, regions, now) + "=",
        "x" * 9000,
    ):
        with pytest.raises(TokenError) as caught:
            rotated.verify(other)
        assert caught.type is TokenError  # not genuine; never "expired"


def test_confirmation_links_mailed_before_encryption_still_work_until_they_expire() -> None:
    email, name, regions = SIGNUP
    now = datetime.now(UTC)
    requested = now - timedelta(hours=2)
    rotated = ConfirmSigner(SECRET, TTL, old_secrets=[OLD])
    for secret in (SECRET, OLD):
        claim = rotated.verify(legacy_confirm_token(secret, now - timedelta(hours=1), requested))
        assert (claim.email, claim.name, claim.regions) == (email, name, regions)
        assert claim.requested_at == requested.replace(microsecond=0)
        assert claim.issued_at == (now - timedelta(hours=1)).replace(microsecond=0)
    with pytest.raises(ExpiredToken):
        rotated.verify(legacy_confirm_token(SECRET, now - TTL - timedelta(minutes=1), requested))
    with pytest.raises(TokenError):
        rotated.verify(legacy_confirm_token("another-secret-0123456789", now, requested))
    # Only the new kind is made.
    assert "." not in rotated.token(email, name, regions, now)
