"""Preview: exactly the message ``send`` would send for a date, for one subscriber or one
edition, as HTML, plain text or the whole .eml; nothing is written.
"""

from __future__ import annotations

import email
import email.policy
from collections.abc import Sequence
from datetime import date
from email.message import EmailMessage
from typing import Literal

from digest import store
from digest.addresses import normalize_email
from digest.app import App
from digest.dkimsign import load_signer
from digest.errors import NothingToSend, UsageError
from digest.issues import (
    issue_context,
    issue_sections,
    message_id,
    message_tags,
    nothing_to_send,
    preferences_signer,
)
from digest.models import Issue, SubscriberStatus
from digest.render import Recipient, Renderer
from digest.select import edition_key, edition_sections
from digest.tokens import TokenSigner

PreviewFormat = Literal["html", "text", "eml"]


def preview(
    app: App,
    edition_date: date,
    subscriber_email: str | None,
    fmt: PreviewFormat,
    regions: Sequence[str] | None = None,
) -> bytes:
    """Exactly what ``send`` would send for that date; writes nothing.

    Without a subscriber: the edition of ``regions`` (None: every section).
    """
    config = app.config
    renderer = Renderer(config)
    with app.sessions() as session:
        issue, sections = issue_sections(session, config, edition_date)
        if not sections:
            raise nothing_to_send(config, edition_date)
        issue_ctx = issue_context(edition_date, issue)
        if subscriber_email is None:
            chosen = edition_sections(sections, edition_key(regions, config.newsletter.regions))
            if not chosen:
                raise NothingToSend(f"the edition of {', '.join(regions or [])} is empty")
            template = renderer.edition(issue_ctx, chosen)
            rcpt = Recipient(
                "reader@example.org",
                "",
                f"{config.unsubscribe.base_url}/unsubscribe/PREVIEW",
                f"<preview.{edition_date:%Y%m%d}@{renderer.domain}>",
                f"{config.unsubscribe.base_url}/preferences/PREVIEW",
            )
        else:
            try:
                addr = normalize_email(subscriber_email)
            except ValueError as exc:
                raise UsageError(f"--subscriber {subscriber_email!r}: {exc}") from None
            sub = store.subscriber_by_email(session, addr)
            if sub is None:
                raise UsageError(
                    f"--subscriber: no subscriber {addr}; see `digest subscribers list`"
                )
            if sub.status != SubscriberStatus.ACTIVE:  # send passes them by
                raise NothingToSend(
                    f"{addr} gets no email for {edition_date}: they are {sub.status} "
                    "(only active subscribers get the round-up)"
                )
            chosen = edition_sections(sections, edition_key(sub.regions, config.newsletter.regions))
            if not chosen:
                raise NothingToSend(
                    f"{addr} gets no email for {edition_date}: none of their regions has articles"
                )
            template = renderer.edition(issue_ctx, chosen)
            signer = TokenSigner(config.unsubscribe_secret, config.unsubscribe_old_secrets)
            fake_issue = issue or Issue(id=0, edition_date=edition_date)
            rcpt = Recipient(
                sub.email,
                sub.name,
                signer.url(config.unsubscribe.base_url, sub.id, sub.email),
                message_id(fake_issue, sub.id, renderer.domain, message_tags(config)),
                preferences_signer(config).url(config.unsubscribe.base_url, sub.id, sub.email),
            )
    raw = template.personalize(rcpt, dkim=load_signer(config.dkim))
    if fmt == "eml":
        return raw
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    part = msg.get_body(("html",) if fmt == "html" else ("plain",))
    assert part is not None
    return str(part.get_content()).encode("utf-8")
