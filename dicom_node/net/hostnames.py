"""Does a configured host (an address or a name) name a peer's address?

The receiver answers this on every association (a caller's ``hosts``, a destination that
reports storage commitment), so names are resolved at most once per refresh period, not
per association. A name that does not resolve matches nothing and is warned about once
(again only after it has resolved in between).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
#: A look-up: a name to its addresses (empty when it does not resolve).
Resolve = Callable[[str], frozenset[Address]]


def parse_address(text: str) -> Address | None:
    """The address ``text`` writes (an IPv4-mapped IPv6 address as its IPv4 one), or None."""
    try:
        address = ipaddress.ip_address(text.strip().strip("[]").split("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def resolve_name(name: str) -> frozenset[Address]:
    """Every address ``name`` resolves to (empty when it does not)."""
    try:
        infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return frozenset()
    found = (parse_address(str(info[4][0])) for info in infos)
    return frozenset(a for a in found if a is not None)


@dataclass(frozen=True)
class _Resolved:
    addresses: frozenset[Address]
    at: float


class HostNames:
    """Matches configured hosts against peer addresses, names resolved through a cache.

    Parameters
    ----------
    refresh_seconds
        How long a name's addresses are trusted before it is resolved again
        (``[receiver] caller_hosts_refresh_seconds``).
    resolve
        The look-up (default :func:`resolve_name`).
    """

    def __init__(self, refresh_seconds: float, resolve: Resolve = resolve_name) -> None:
        self.refresh_seconds = refresh_seconds
        self._resolve = resolve
        self._cache: dict[str, _Resolved] = {}
        self._unresolved: set[str] = set()
        self._lock = threading.Lock()

    def addresses(self, host: str) -> frozenset[Address]:
        """The addresses ``host`` names: itself when it is an address, else its look-up."""
        literal = parse_address(host)
        if literal is not None:
            return frozenset({literal})
        name = host.strip().lower()
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(name)
            if cached is not None and now - cached.at < self.refresh_seconds:
                return cached.addresses
        addresses = self._resolve(name)  # outside the lock: a slow resolver holds up no one else
        with self._lock:
            self._cache[name] = _Resolved(addresses, now)
            if addresses:
                self._unresolved.discard(name)
                return addresses
            if name in self._unresolved:
                return addresses
            self._unresolved.add(name)
        log.warning(
            "host name %r does not resolve: it matches no peer until it does (tried again every %g s)",
            name,
            self.refresh_seconds,
        )
        return addresses

    def matches(self, host: str, peer_host: str) -> bool:
        """Is ``peer_host`` (the address a peer connected from) one that ``host`` names?"""
        if host == peer_host:
            return True
        peer = parse_address(peer_host)
        return peer is not None and peer in self.addresses(host)

    def any_matches(self, hosts: tuple[str, ...] | list[str], peer_host: str) -> bool:
        return any(self.matches(host, peer_host) for host in hosts)
