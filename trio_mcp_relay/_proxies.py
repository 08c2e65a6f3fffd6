"""Trusted proxies: which client address a connection stands for.

Behind a reverse proxy (the usual way to get ``wss://``) every connection comes from the
proxy's address, so limits and logs would lump all clients together. A proxy says who its
client was in a header; but any client can send the same header, so it is believed only from
a configured trusted proxy. Pure functions, no I/O.

Headers, the first present wins: ``Forwarded`` (RFC 7239, its ``for=`` parameters),
``X-Forwarded-For``, ``X-Real-IP``. Each lists hops oldest first, every proxy appending the
address it got the request from. Read from the right, the hops are skipped while they are
trusted proxies themselves; the first that is not is the client (a client can prepend what it
likes, but not what the trusted proxies appended after it). When every hop is trusted, the
leftmost is used. A hop that is not an IP address (``unknown``, an obfuscated ``_name``,
garbage) ends the walk: the last trusted address seen before it stands for the client, since
nothing further left can be trusted.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from typing import Final, TypeAlias

__all__ = ["Network", "TrustedProxies", "parse_networks"]

Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
Address: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address

_HEADERS: Final = ("forwarded", "x-forwarded-for", "x-real-ip")


def parse_networks(values: Iterable[str]) -> tuple[Network, ...]:
    """Parse addresses (``10.0.0.1``, ``::1``) and networks (``10.0.0.0/8``).

    Raises:
        ValueError: An entry is neither; the message quotes it.
    """
    networks = []
    for value in values:
        text = value.strip()
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address or network") from None
    return tuple(networks)


def _address(text: str) -> Address | None:
    """An IP address from a header hop or a socket: ports, brackets and quotes removed,
    IPv4-mapped IPv6 turned into IPv4 (a dual-stack socket reports ``::ffff:a.b.c.d``)."""
    text = text.strip().strip('"').strip()
    if text.startswith("["):  # "[2001:db8::1]:8080" or "[2001:db8::1]"
        text = text[1 : text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:  # "192.0.2.1:8080"
        text = text.partition(":")[0]
    text = text.partition("%")[0]  # a zone id ("fe80::1%eth0") says nothing about the host
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _forwarded_hops(value: str) -> list[str]:
    """The ``for=`` values of a ``Forwarded`` header, in order (one per element)."""
    hops = []
    for element in value.split(","):
        for pair in element.split(";"):
            name, _, item = pair.partition("=")
            if name.strip().lower() == "for":
                hops.append(item.strip())
    return hops


class TrustedProxies:
    """Decides the client address of a connection.

    Args:
        networks: The trusted proxies' addresses and networks; empty trusts nobody, and then
            the socket's peer address is always the client.
    """

    def __init__(self, networks: Sequence[Network] = ()) -> None:
        self.networks = tuple(networks)

    @classmethod
    def parse(cls, values: Iterable[str]) -> TrustedProxies:
        """From the setting's text form (see :func:`parse_networks`)."""
        return cls(parse_networks(values))

    def trusts(self, address: str) -> bool:
        """Whether ``address`` is a trusted proxy."""
        parsed = _address(address)
        return parsed is not None and self._trusted(parsed)

    def _trusted(self, address: Address) -> bool:
        return any(address.version == net.version and address in net for net in self.networks)

    def client_address(self, peer: str, headers: Mapping[str, str]) -> str:
        """The address to limit and log a request by.

        Args:
            peer: The socket's peer address (no port).
            headers: The request headers, names lower-case.

        Returns:
            ``peer`` itself unless it is a trusted proxy that sent one of the headers;
            otherwise the client address the headers give (see the module docstring),
            normalised (``::ffff:192.0.2.1`` becomes ``192.0.2.1``).
        """
        if not self.networks:
            return peer
        current = _address(peer)
        if current is None or not self._trusted(current):
            return peer
        for name in _HEADERS:
            value = headers.get(name)
            if value is None:
                continue
            hops = _forwarded_hops(value) if name == "forwarded" else value.split(",")
            for hop in reversed(hops):
                address = _address(hop)
                if address is None:
                    break
                current = address
                if not self._trusted(address):
                    break
            return str(current)
        return str(current)
