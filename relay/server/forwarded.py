"""The client's address behind a reverse proxy: ``X-Forwarded-For``, trusted only from
the proxies named in ``trusted_proxies``.

A proxy appends the address it received the request from to ``X-Forwarded-For``; a
client can put anything in front. So the header is read from the right: the first address
that is not one of our trusted proxies is the client. A request that does not come from a
trusted proxy keeps its TCP peer address, whatever headers it carries (forged ones
included). Sans-IO: addresses and headers in, an address out.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from .security import peer_ip

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class TrustedProxies:
    """The proxies whose ``X-Forwarded-For`` relay believes."""

    def __init__(self, entries: Iterable[str]) -> None:
        self._networks: tuple[_Network, ...] = tuple(ipaddress.ip_network(e, strict=False) for e in entries)

    def __bool__(self) -> bool:
        return bool(self._networks)

    def trusts(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self._networks)

    def client(self, peer: str, headers: Sequence[tuple[bytes, bytes]]) -> str:
        """Return the client's address for a request from ``peer`` (``"host:port"``).

        Behind trusted proxies it is the right-most ``X-Forwarded-For`` address that is
        not a trusted proxy (``"203.0.113.7"``, ``"[2001:db8::7]"``: no port); otherwise,
        or when the header holds nothing usable, ``peer`` itself.
        """
        if not self._networks or not self.trusts(peer_ip(peer)):
            return peer
        hops: list[str] = []
        for name, value in headers:
            if name.lower() == b"x-forwarded-for":
                hops.extend(part.strip() for part in value.decode("latin-1").split(","))
        for hop in reversed(hops):
            address = _address(hop)
            if address is None:
                return peer  # garbage in the chain: do not guess past it
            if not self.trusts(address):
                return f"[{address}]" if ":" in address else address
        return peer


def _address(hop: str) -> str | None:
    """The IP address in one X-Forwarded-For entry (``1.2.3.4``, ``1.2.3.4:5``, ``[::1]:5``, ``::1``)."""
    text = hop.strip()
    if text.startswith("[") and "]" in text:
        text = text[1:text.index("]")]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


__all__ = ["TrustedProxies"]
