"""DKIM signing (RFC 6376, rsa-sha256, relaxed/relaxed) of final message bytes.

The body differs per subscriber (their unsubscribe link), so every message needs its own
body hash and RSA signature. dkimpy does this correctly but slowly (its RSA is pure
Python: ~5 ms a message); here canonicalization is two C-speed regex passes, hashing is
hashlib and the RSA is OpenSSL through ``cryptography`` (~0.2 ms). The tests verify every
signature with dkimpy, so the two implementations are held to agree.

``h=`` lists the headers Gmail and Yahoo require for one-click unsubscribe
(List-Unsubscribe and List-Unsubscribe-Post) and those a forger would want to change.
Those a forger would want to *add* (a second From:, a Reply-To: where there was none)
are listed once more than they occur ("oversigning", RFC 6376 8.15): a verifier then
signs an empty value for the extra entry, and any added copy breaks the signature.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import time
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from digest.config import DKIM as DKIMConfig
from digest.errors import ConfigError, UsageError

SIGNED_HEADERS = (
    "From",
    "Reply-To",
    "To",
    "Subject",
    "Date",
    "Message-ID",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
    "List-Id",
    "MIME-Version",
    "Content-Type",
)

# Headers a forger could add to change what the reader sees or where replies and
# unsubscribes go; each is listed in h= once more than the message carries it.
OVERSIGNED = frozenset(
    {
        "from",
        "to",
        "subject",
        "date",
        "reply-to",
        "message-id",
        "list-unsubscribe",
        "list-unsubscribe-post",
    }
)

_WSP_RUN = re.compile(rb"[ \t]+")
_WSP_EOL = re.compile(rb" \r\n")
_FOLD = re.compile(rb"\r\n(?=[ \t])")


def canonical_piece(piece: bytes) -> bytes:
    """Relaxed canonicalization of part of a body: whitespace runs become one space and
    blanks before a line end go. Valid piece by piece when no blank run crosses pieces."""
    return _WSP_EOL.sub(b"\r\n", _WSP_RUN.sub(b" ", piece))


def canonical_body(body: bytes) -> bytes:
    """Relaxed body canonicalization (RFC 6376 3.4.4)."""
    body = canonical_piece(body).rstrip(b"\r\n")
    return body + b"\r\n" if body else b""


def canonical_header(name: bytes, value: bytes) -> bytes:
    """Relaxed header canonicalization (RFC 6376 3.4.2), without the final CRLF."""
    value = _WSP_RUN.sub(b" ", _FOLD.sub(b"", value)).strip(b" \r\n")
    return name.strip().lower() + b":" + value


def _split_headers(head: bytes) -> dict[bytes, list[tuple[bytes, bytes]]]:
    """Header name (lower-case) → its (name, raw value) fields, last occurrence first
    (the order in which a verifier takes them, RFC 6376 5.4.2)."""
    out: dict[bytes, list[tuple[bytes, bytes]]] = {}
    for field in reversed(re.split(rb"\r\n(?![ \t])", head)):
        if b":" in field:
            name, value = field.split(b":", 1)
            out.setdefault(name.strip().lower(), []).append((name, value))
    return out


def _fold_list(names: list[str], width: int = 70) -> bytes:
    """The h= value, folded after a colon before ``width`` (FWS is allowed there)."""
    lines = [""]
    for i, name in enumerate(names):
        piece = name + (":" if i < len(names) - 1 else "")
        if lines[-1] and len(lines[-1]) + len(piece) > width:
            lines.append("")
        lines[-1] += piece
    return "\r\n\t".join(lines).encode()


class DKIMSigner:
    """Signs final message bytes for one domain and selector."""

    def __init__(self, domain: str, selector: str, private_key_pem: bytes) -> None:
        try:
            key = serialization.load_pem_private_key(private_key_pem, password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(
                f"dkim: the private key is not an unencrypted PEM key ({exc})"
            ) from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ConfigError(
                "dkim: the private key must be an RSA key (digest dkim keygen makes one)"
            )
        self._key = key
        self.domain = domain
        self.selector = selector

    def sign(self, message: bytes, now: int | None = None) -> bytes:
        """``message`` with a DKIM-Signature header prepended."""
        head, _, body = message.partition(b"\r\n\r\n")
        bh = base64.b64encode(hashlib.sha256(canonical_body(body)).digest())
        return self.signature_header(head + b"\r\n", bh, now) + message

    def signature_header(self, head: bytes, body_hash: bytes, now: int | None = None) -> bytes:
        """The DKIM-Signature header line(s) for a header block and a body hash (base64)."""
        headers = _split_headers(head.removesuffix(b"\r\n"))
        names: list[str] = []
        signed = b""
        for n in SIGNED_HEADERS:
            fields = headers.get(n.lower().encode(), [])
            names += [n] * (len(fields) + (n.lower() in OVERSIGNED))
            # The extra (oversigned) entry matches no field and adds nothing here.
            signed += b"".join(canonical_header(*f) + b"\r\n" for f in fields)
        # Folded before signing: the fold inside h= is signed as the single space that
        # relaxed canonicalization turns it into, as a verifier will see it.
        tags = (
            (
                f"v=1; a=rsa-sha256; c=relaxed/relaxed; d={self.domain}; s={self.selector}; "
                f"t={now if now is not None else int(time.time())}; h="
            ).encode()
            + _fold_list(names)
            + f"; bh={body_hash.decode()}; b=".encode()
        )
        tags = tags.replace(b"; ", b";\r\n\t")
        signed += canonical_header(b"DKIM-Signature", tags)
        sig = base64.b64encode(self._key.sign(signed, padding.PKCS1v15(), hashes.SHA256()))
        # Whitespace inside b= is ignored by verifiers, so b= may be folded after signing.
        folded = tags + b"\r\n\t".join(sig[i : i + 72] for i in range(0, len(sig), 72))
        return b"DKIM-Signature: " + folded + b"\r\n"


def load_signer(cfg: DKIMConfig | None) -> DKIMSigner | None:
    """The configured signer, or None when [dkim] is absent."""
    if cfg is None:
        return None
    if cfg.private_key_env:
        pem = os.environ.get(cfg.private_key_env)
        if not pem:
            raise ConfigError(f"dkim.private_key_env: ${cfg.private_key_env} is not set")
        return DKIMSigner(cfg.domain, cfg.selector, pem.encode())
    if cfg.private_key_path is None:
        raise ConfigError(
            "dkim: set private_key_path or private_key_env (digest dkim keygen makes a key)"
        )
    try:
        pem_bytes = cfg.private_key_path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"dkim.private_key_path: cannot read {cfg.private_key_path}: {exc.strerror}; "
            "run `digest dkim keygen` to make one"
        ) from None
    return DKIMSigner(cfg.domain, cfg.selector, pem_bytes)


def keygen(path: Path, bits: int = 2048) -> str:
    """Write a new RSA private key (mode 0600) to ``path``; return the DNS TXT value.

    Raises :class:`UsageError` when ``path`` cannot be created (a missing folder, no
    permission, an existing file: a key is never overwritten).
    """
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise UsageError(
            f"{path}: cannot write the key ({exc.strerror or exc}); check that the folder "
            "exists and is writable, and that no file is there already"
        ) from None
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return dns_record(key.public_key())


def dns_record(public_key: rsa.RSAPublicKey) -> str:
    """The TXT record value that publishes ``public_key``."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"
