"""Double opt-in signup, confirmation and preference changes: the consent rules.

The web pages (``digest.web``) parse requests and show pages; what a request *means* is
decided here, against the store:

* :func:`validate_signup` checks what a form sent and names the problem per field.
* :func:`request_signup` decides which mail, if any, a valid signup earns. An address gets
  at most one mail an hour however often it is submitted, and an address that is already
  subscribed at most one "you are already subscribed" mail a day, so nobody can use the
  form to flood someone's inbox. The caller shows the same page whatever happened.
* :func:`confirm_signup` turns a confirmed link into an active subscriber: explicit
  consent, so it re-activates an address that unsubscribed or bounced (an import never
  does) -- but only with a link asked for *after* that: a link from before the last
  unsubscribe or bounce is superseded (see :func:`link_standing`).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from sqlalchemy.orm import Session

from digest import store
from digest.addresses import NAME_MAX, clean_name, normalize_email
from digest.models import SignupMailKind, Subscriber, SubscriberSource, SubscriberStatus
from digest.tokens import SignupClaim

MAIL_COOLDOWN: Final = timedelta(hours=1)
ALREADY_COOLDOWN: Final = timedelta(days=1)
EMAIL_FIELD_MAX: Final = 320  # characters a form may send for the address (RFC 5321 path: 254)


class SignupOutcome(enum.StrEnum):
    """What a valid signup did. Never shown to the requester (no enumeration)."""

    CONFIRM_QUEUED = "confirm-queued"
    ALREADY_QUEUED = "already-queued"
    COOLDOWN = "cooldown"


class ConfirmOutcome(enum.StrEnum):
    """What posting a genuine, unexpired confirmation link does."""

    CONFIRMED = "confirmed"  # the address is active with this link's choices now
    ALREADY = "already"  # used already, and that confirmation is still in force: no change
    SUPERSEDED = "superseded"  # asked for before the last unsubscribe or bounce: no change


@dataclass(frozen=True)
class SignupRequest:
    """A validated signup: normalized address, cleaned name, regions (None = every one)."""

    email: str
    name: str
    regions: list[str] | None


def parse_regions(
    values: Sequence[str], configured: Sequence[str]
) -> tuple[list[str] | None, str | None]:
    """Ticked region boxes → ``(regions, error)``.

    Matched case-insensitively and stored in the config's spelling and order. None ticked,
    or every one ticked, means every section (including the catch-all), stored as None.
    """
    by_key = {r.casefold(): r for r in configured}
    chosen: set[str] = set()
    for value in values:
        region = by_key.get(value.strip().casefold())
        if region is None:
            shown = value if len(value) <= 60 else value[:60] + "…"
            return None, f"unknown region {shown!r}; choose from {', '.join(configured)}"
        chosen.add(region)
    if not chosen or len(chosen) == len(configured):
        return None, None
    return [r for r in configured if r in chosen], None


def validate_name(raw: str) -> tuple[str, str | None]:
    """A name field → ``(clean name, error)``; at most 200 characters."""
    if len(raw) > NAME_MAX:
        return "", f"the name is too long ({len(raw)} characters; at most {NAME_MAX})"
    return clean_name(raw), None


def validate_signup(
    email: str, name: str, regions: Sequence[str], configured: Sequence[str]
) -> tuple[SignupRequest | None, dict[str, str]]:
    """Check a signup form; the request, or None and a message per bad field."""
    errors: dict[str, str] = {}
    address = ""
    if len(email) > EMAIL_FIELD_MAX:
        errors["email"] = "the email address is too long"
    else:
        try:
            address = normalize_email(email)
        except ValueError as exc:
            errors["email"] = str(exc)
    clean, name_error = validate_name(name)
    if name_error:
        errors["name"] = name_error
    chosen, regions_error = parse_regions(regions, configured)
    if regions_error:
        errors["regions"] = regions_error
    if errors:
        return None, errors
    return SignupRequest(address, clean, chosen), {}


def request_signup(session: Session, req: SignupRequest, now: datetime) -> SignupOutcome:
    """Queue the mail a valid signup earns, within the per-address cooldowns.

    New, unsubscribed and bounced addresses get a confirmation link; active ones a
    "you are already subscribed" mail with a link to their preferences. The caller
    commits (the cooldown claims and the queued mail in one transaction).
    """
    sub = store.subscriber_by_email(session, req.email)
    if not store.claim_cooldown(session, f"mail:{req.email}", MAIL_COOLDOWN, now):
        return SignupOutcome.COOLDOWN
    if sub is not None and sub.status == SubscriberStatus.ACTIVE:
        if not store.claim_cooldown(session, f"already:{req.email}", ALREADY_COOLDOWN, now):
            return SignupOutcome.COOLDOWN
        store.queue_signup_mail(session, SignupMailKind.ALREADY, req.email, "", None, now)
        return SignupOutcome.ALREADY_QUEUED
    store.queue_signup_mail(session, SignupMailKind.CONFIRM, req.email, req.name, req.regions, now)
    return SignupOutcome.CONFIRM_QUEUED


def link_standing(sub: Subscriber | None, claim: SignupClaim) -> ConfirmOutcome:
    """What a confirmation link may still do for ``sub`` (the subscriber of its address).

    A link dates from when it was asked for (the form's request; for a mail held up by
    a relay outage the link is made later, but the consent it carries is as old as the
    request). Withdrawn consent is the stronger fact: a link from before the address
    last unsubscribed or bounced (``unsubscribed_at``) revives nothing, or anyone holding
    an old mail -- or its copy in a scanner's log -- could undo an unsubscribe. A link
    from before the confirmation in force was used, or overtaken by a newer one.
    """
    if sub is None:
        return ConfirmOutcome.CONFIRMED
    asked = min(claim.requested_at, claim.issued_at)
    if (
        sub.status == SubscriberStatus.ACTIVE
        and sub.confirmed_at is not None
        and sub.confirmed_at >= asked
    ):
        return ConfirmOutcome.ALREADY
    if sub.unsubscribed_at is not None and sub.unsubscribed_at >= asked:
        return ConfirmOutcome.SUPERSEDED
    return ConfirmOutcome.CONFIRMED


def confirm_signup(
    session: Session, claim: SignupClaim, configured: Sequence[str], now: datetime
) -> tuple[Subscriber, ConfirmOutcome]:
    """Make the address of a verified confirmation link an active subscriber, unless the
    link is no longer good for that (:func:`link_standing`; then nothing changes).

    Records ``source = signup``, when it was asked for and when it was confirmed. Posting
    the same link again changes nothing (nor does it undo preferences saved since). The
    caller commits.
    """
    email = normalize_email(claim.email)
    regions, _ = parse_regions(claim.regions or [], configured)  # regions removed since: dropped
    name, _ = validate_name(claim.name)
    values = {
        "email": email,
        "name": name,
        "regions": regions,
        "status": SubscriberStatus.ACTIVE,
        "source": SubscriberSource.SIGNUP.value,
        "hard_bounces": 0,
        "created_at": now,
        "updated_at": now,
        "subscribed_at": claim.requested_at,
        "confirmed_at": now,
    }
    created = store.add_subscriber_if_absent(session, values)
    sub = store.subscriber_by_email(session, email)
    assert sub is not None
    if created:
        return sub, ConfirmOutcome.CONFIRMED
    standing = link_standing(sub, claim)
    if standing != ConfirmOutcome.CONFIRMED:
        return sub, standing
    sub.status = SubscriberStatus.ACTIVE
    sub.name = name or sub.name
    sub.regions = regions
    sub.source = SubscriberSource.SIGNUP.value
    sub.subscribed_at = claim.requested_at
    sub.confirmed_at = now
    sub.unsubscribed_at = None
    sub.hard_bounces = 0
    sub.updated_at = now
    return sub, ConfirmOutcome.CONFIRMED


def save_preferences(sub: Subscriber, name: str, regions: list[str] | None, now: datetime) -> bool:
    """Store a subscriber's chosen name and regions; True when anything changed."""
    if sub.name == name and sub.regions == regions:
        return False
    sub.name = name
    sub.regions = regions
    sub.updated_at = now
    return True
