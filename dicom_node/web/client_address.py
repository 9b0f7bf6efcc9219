"""Who is on the other end of a web request: the one place that decides the client's address.

Why: login rate limits, the audit log and the sessions table all record "from where". A
reverse proxy in front of the app makes every request come from the proxy, so proxies
append the address they saw to ``X-Forwarded-For``; but anyone can send that header, and
believing it from any peer lets an attacker pick a fresh address for every guess (no rate
limit) and write any address into the audit log. So the header is believed only when the
connecting peer is one of ``web.trusted_proxies``, and then only as far as the chain of
trusted proxies goes: walking from the right (the hop nearest to us), the first address
that is not itself a trusted proxy is the client. Everything to the left of it was written
by that client and proves nothing. ``X-Forwarded-Proto`` is not used: the app builds no
absolute URLs and ``web.secure_cookies`` says whether cookies are HTTPS-only.

uvicorn's own proxy-header handling (which trusts 127.0.0.1 and anything in
``FORWARDED_ALLOW_IPS``) is switched off by :class:`dicom_node.web.server.WebServer`,
so this module is the only one that reads the header.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from fastapi import Request

__all__ = ["TrustedProxies", "forwarded_client", "request_client_address"]

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
#: More hops than this in X-Forwarded-For are not looked at (a header can be made huge).
MAX_HOPS = 32


def _parse_address(text: str) -> _Address | None:
    """An address from a header or the socket: ``1.2.3.4``, ``1.2.3.4:5678``, ``[::1]:80``, ``::ffff:1.2.3.4``."""
    text = text.strip().strip('"')
    if text.startswith("["):
        text = text[1:].split("]", 1)[0]
    elif text.count(":") == 1:  # IPv4 with a port; a bare IPv6 address has two or more colons
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class TrustedProxies:
    """The networks of ``web.trusted_proxies`` (validated by the settings)."""

    def __init__(self, entries: Iterable[str]) -> None:
        self._networks: tuple[_Network, ...] = tuple(ipaddress.ip_network(e, strict=False) for e in entries)

    def __bool__(self) -> bool:
        return bool(self._networks)

    def trusts(self, address: _Address | None) -> bool:
        return address is not None and any(address in network for network in self._networks)


def forwarded_client(peer: str | None, forwarded_for: Sequence[str], proxies: TrustedProxies) -> str | None:
    """The client's address, given the connecting ``peer`` and the ``X-Forwarded-For`` header values in order.

    The peer itself unless it is a trusted proxy; then the right-most forwarded address
    that is not a trusted proxy. A hop that is not an IP address (``unknown``, garbage)
    ends the walk at the trusted proxy that passed it on, as does running out of hops.
    """
    peer_address = _parse_address(peer) if peer else None
    if peer_address is None or not proxies.trusts(peer_address):
        return peer if peer_address is None else str(peer_address)
    hops = [hop for value in forwarded_for for hop in value.split(",") if hop.strip()]
    client = peer_address
    for hop in reversed(hops[-MAX_HOPS:]):
        address = _parse_address(hop)
        if address is None:
            break
        client = address
        if not proxies.trusts(address):
            break
    return str(client)


def request_client_address(request: Request, proxies: TrustedProxies) -> str | None:
    """The client address of ``request`` (see :func:`forwarded_client`); None when the server gave no peer."""
    peer = request.client.host if request.client else None
    return forwarded_client(peer, request.headers.getlist("x-forwarded-for"), proxies)
