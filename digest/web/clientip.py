"""Who is asking: the client address that per-client limits count against.

``X-Forwarded-For`` is believed only when the TCP peer is one of ``[signup]
trusted_proxies``; anyone else can write anything in it. ``digest serve`` runs uvicorn with
``proxy_headers=False`` so that this decision is made here and nowhere else (uvicorn
would otherwise believe the header from 127.0.0.1 by default).

A proxy appends the address it saw to the right of the header, so the list is walked from
the right, over our own proxies, to the first address that is not one of them: that is
the client. Entries to its left were written by the client and mean nothing.

IPv6 clients are counted per /64: one host commonly holds a whole /64, so counting single
addresses would give it billions of allowances.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def trusted_networks(values: Iterable[str]) -> tuple[Network, ...]:
    """``[signup] trusted_proxies`` as networks (validated when the config was loaded)."""
    return tuple(ipaddress.ip_network(v, strict=False) for v in values)


def _parse(value: str) -> Address | None:
    value = value.strip()
    if value.startswith("[") and "]" in value:  # "[2001:db8::1]:443"
        value = value[1 : value.index("]")]
    elif value.count(":") == 1:  # "192.0.2.1:443"
        value = value.split(":", 1)[0]
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _trusted(addr: Address, trusted: Sequence[Network]) -> bool:
    return any(addr.version == net.version and addr in net for net in trusted)


def client_address(
    peer: str | None, forwarded_for: Sequence[str], trusted: Sequence[Network]
) -> str:
    """The client's address for rate limits, as a stable key (IPv6 as its /64).

    ``peer`` is the TCP peer's host, ``forwarded_for`` every X-Forwarded-For header value
    in order. A peer that is not an IP address (a Unix socket, a test client) is its own
    key.
    """
    addr = _parse(peer or "")
    if addr is None:
        return peer or "unknown"
    if _trusted(addr, trusted):
        hops = [h for value in forwarded_for for h in value.split(",") if h.strip()]
        for hop in reversed(hops):
            parsed = _parse(hop)
            if parsed is None:
                break  # not written by a proxy of ours: keep the last hop we trust
            addr = parsed
            if not _trusted(parsed, trusted):
                break
    if isinstance(addr, ipaddress.IPv6Address):
        return str(ipaddress.ip_network(f"{addr}/64", strict=False))
    return str(addr)
