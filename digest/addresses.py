"""What may be stored as a subscriber's address and name, and how a rejected value is shown.

Everything that reaches the ``subscribers`` table passes :func:`normalize_email` and
:func:`clean_name`, because those values end up in message headers: a stored CR/LF would
let one line of a spreadsheet inject headers into every issue. Imports, signup, the
editors' list in the config and ``send --test`` all validate addresses here.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from typing import Final

from email_validator import EmailNotValidError, validate_email

NAME_MAX: Final = 200  # the width of subscribers.name (and .source)
_VALUE_MAX: Final = 80
# No legal address is longer than 254 characters; the slack allows surrounding spaces.
# Anything longer is rejected before the (comparatively slow) validator sees it.
_EMAIL_RAW_MAX: Final = 1000
# RFC 5322 3.2.3 dot-atom of ASCII atext: the local parts email_validator accepts as they
# are, without normalization (its own fast path uses the same rule).
_ASCII_DOT_ATOM: Final = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*\Z"
)
_EMAIL_MAX_BYTES: Final = 254  # RFC 5321 path limit, as email_validator applies it
_DOMAIN_MEMO_MAX: Final = 10_000
# Control, format (bidi overrides, zero-width), surrogate, private-use and unassigned
# characters, and the Unicode line/paragraph separators, which some mail code treats as
# line breaks. None of them belongs in an address.
_UNSAFE_CATEGORIES: Final = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
_NAMED_ESCAPES: Final = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def normalize_email(raw: str) -> str:
    """Return the canonical stored form of an address, or raise ``ValueError(reason)``.

    Any control or header-breaking character anywhere in ``raw`` rejects it (checked
    before trimming, so ``"a@example.org\\r\\nBcc: x"`` fails rather than being cut);
    surrounding spaces are then trimmed and the address validated by ``email_validator``
    without DNS lookups and without SMTPUTF8. The result is the ASCII form (IDN domains in
    punycode), lowercased entirely: mail systems treat the local part case-insensitively
    in practice, and two rows differing only in case must be one subscriber, not two
    deliveries.

    >>> normalize_email("  Ann.Lee@Example.ORG ")
    'ann.lee@example.org'
    """
    return EmailNormalizer()(raw)


class EmailNormalizer:
    """:func:`normalize_email` with a memo of validated domains, for bulk imports.

    ``email_validator`` spends most of its ~40 µs an address on the domain (IDNA/UTS-46
    checks), and a list of 100,000 addresses has a few thousand distinct
    domains. An address whose local part is a plain ASCII dot-atom is accepted by the
    validator exactly when its domain is and the whole fits in 254 bytes (it checks the
    local part's length only in strict mode), and its ASCII form is then
    ``local@ascii_domain``; so such addresses reuse the domain's verdict. Everything else,
    and every rejection, goes through the full validator, which words the reason.
    One instance lives for one import: no cache outlives the call that made it.
    """

    def __init__(self) -> None:
        # domain as written → (ASCII domain, its longest UTF-8 length in any of the forms
        # the validator length-checks), or None when the domain is not valid.
        self._domains: dict[str, tuple[str, int] | None] = {}

    def __call__(self, raw: str) -> str:
        bad = _first_unsafe(raw)
        if bad is not None:
            raise ValueError(
                f"contains a control character ({printable(bad)}); an address cannot hold "
                "line breaks or invisible characters"
            )
        text = raw.strip()
        if not text:
            raise ValueError("the email address is empty")
        if len(text) > _EMAIL_RAW_MAX:
            raise ValueError("the email address is too long")
        local, _, domain = text.partition("@")
        if domain and _ASCII_DOT_ATOM.match(local):
            known = self._domain(domain)
            if known is not None and len(local) + 1 + known[1] <= _EMAIL_MAX_BYTES:
                return f"{local}@{known[0]}".lower()
        return _validated(text)

    def _domain(self, domain: str) -> tuple[str, int] | None:
        if domain in self._domains:
            return self._domains[domain]
        info: tuple[str, int] | None
        try:
            # "a" is the shortest valid local part, so a domain refused here (even for
            # length) is refused with any other local part too.
            result = validate_email(f"a@{domain}", check_deliverability=False, allow_smtputf8=False)
        except EmailNotValidError:
            info = None
        else:
            ascii_domain = result.ascii_domain
            longest = max(len(domain.encode()), len(result.domain.encode()), len(ascii_domain))
            info = (ascii_domain, longest)
        if len(self._domains) >= _DOMAIN_MEMO_MAX:
            self._domains.clear()  # bounded memory on lists with absurdly many domains
        self._domains[domain] = info
        return info


def _validated(text: str) -> str:
    try:
        result = validate_email(text, check_deliverability=False, allow_smtputf8=False)
    except EmailNotValidError as exc:
        raise ValueError(str(exc)) from None
    # With allow_smtputf8=False the validator rejects anything without an ASCII form, so
    # the fallback only satisfies the type checker.
    return (result.ascii_email or result.normalized).lower()


def clean_name(raw: str | None) -> str:
    """A display name safe to store and put in a header: one line, at most 200 characters.

    Whitespace of any kind (tabs, line breaks, U+2028) becomes a single space so that
    "Ann\\nLee" stays two words; other control/format characters (category C*) are removed.
    """
    if not raw:
        return ""
    # Fast path: a printable string holds no category C character and no line separator.
    if not raw.isprintable():
        raw = "".join(
            " " if ch.isspace() else ch
            for ch in raw
            if ch.isspace() or unicodedata.category(ch)[0] != "C"
        )
    name = " ".join(raw.split())
    return name[:NAME_MAX].rstrip() if len(name) > NAME_MAX else name


def _first_unsafe(text: str) -> str | None:
    # isprintable() is False only for categories C*, Z* other than the ASCII space, so the
    # common case (a plain address) costs one C-level scan.
    if text.isprintable():
        return None
    for ch in text:
        if unicodedata.category(ch) in _UNSAFE_CATEGORIES:
            return ch
    return None


def printable(value: object, limit: int = _VALUE_MAX) -> str:
    """``value`` as one printable line, escaped like ``repr`` and cut to about ``limit``."""
    text = value if isinstance(value, str) else repr(value)
    out: list[str] = []
    size = 0
    for ch in text:
        piece = _NAMED_ESCAPES.get(ch)
        if piece is None:
            # As repr does: escape everything but the plain space that would not show as
            # itself (controls, line separators, NBSP and other invisible spaces).
            if not ch.isprintable():
                code = ord(ch)
                piece = (
                    f"\\x{code:02x}"
                    if code < 0x100
                    else f"\\u{code:04x}"
                    if code < 0x10000
                    else f"\\U{code:08x}"
                )
            else:
                piece = ch
        if size + len(piece) > limit:
            out.append("…")
            break
        out.append(piece)
        size += len(piece)
    return "".join(out)


def unique_addresses(values: Iterable[str]) -> list[str]:
    """``values`` normalized (:func:`normalize_email`), first occurrence kept, in order.

    Raises ``ValueError("'value' is not an email address: reason")`` at the first bad one.
    """
    out: list[str] = []
    for value in values:
        try:
            address = normalize_email(value)
        except ValueError as exc:
            raise ValueError(f"{value!r} is not an email address: {exc}") from None
        if address not in out:
            out.append(address)
    return out
