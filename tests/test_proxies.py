"""Trusted proxies: which client address a request stands for. Pure: no sockets."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_mcp_relay._proxies import TrustedProxies, parse_networks

PROXY = "10.0.0.5"
proxies = TrustedProxies.parse(["10.0.0.0/24", "::1", "2001:db8:1::/48"])


def test_no_trusted_proxies_means_the_peer_is_the_client() -> None:
    headers = {"x-forwarded-for": "198.51.100.7", "x-real-ip": "198.51.100.8"}
    assert TrustedProxies().client_address(PROXY, headers) == PROXY


def test_headers_from_an_untrusted_peer_are_ignored() -> None:
    headers = {"x-forwarded-for": "198.51.100.7", "forwarded": "for=198.51.100.9"}
    assert proxies.client_address("192.0.2.1", headers) == "192.0.2.1"


@pytest.mark.parametrize(
    ("headers", "client"),
    [
        ({"x-forwarded-for": "198.51.100.7"}, "198.51.100.7"),
        ({"x-forwarded-for": " 198.51.100.7 , 10.0.0.9"}, "198.51.100.7"),  # two proxies
        # A client cannot hide behind what it prepends: the rightmost untrusted hop counts.
        ({"x-forwarded-for": "203.0.113.66, 198.51.100.7"}, "198.51.100.7"),
        ({"x-real-ip": "198.51.100.8"}, "198.51.100.8"),
        ({"forwarded": "for=198.51.100.9;proto=https;by=10.0.0.5"}, "198.51.100.9"),
        ({"forwarded": 'for="[2001:db8::7]:4711"'}, "2001:db8::7"),
        ({"forwarded": "for=203.0.113.1, for=198.51.100.9"}, "198.51.100.9"),
        ({"forwarded": 'For="198.51.100.9:80"'}, "198.51.100.9"),
        # Forwarded wins over X-Forwarded-For, which wins over X-Real-IP.
        (
            {
                "forwarded": "for=198.51.100.1",
                "x-forwarded-for": "198.51.100.2",
                "x-real-ip": "198.51.100.3",
            },
            "198.51.100.1",
        ),
        ({"x-forwarded-for": "198.51.100.2", "x-real-ip": "198.51.100.3"}, "198.51.100.2"),
        ({"x-forwarded-for": "198.51.100.2:5555"}, "198.51.100.2"),
        ({"x-forwarded-for": "::ffff:198.51.100.2"}, "198.51.100.2"),
        # Every hop trusted: the leftmost.
        ({"x-forwarded-for": "10.0.0.7, 10.0.0.8"}, "10.0.0.7"),
        # Not an address: the last trusted hop stands for the client.
        ({"x-forwarded-for": "unknown"}, PROXY),
        ({"x-forwarded-for": "198.51.100.7, garbage, 10.0.0.9"}, "10.0.0.9"),
        ({"forwarded": "for=_hidden"}, PROXY),
        ({"x-forwarded-for": ""}, PROXY),
        ({}, PROXY),
    ],
)
def test_client_address_from_a_trusted_proxy(headers: dict[str, str], client: str) -> None:
    assert proxies.client_address(PROXY, headers) == client


def test_ipv6_and_mapped_proxies() -> None:
    assert proxies.client_address("::1", {"x-real-ip": "198.51.100.8"}) == "198.51.100.8"
    mapped = "::ffff:10.0.0.5"  # a dual-stack listener reports IPv4 peers this way
    assert proxies.client_address(mapped, {"x-real-ip": "198.51.100.8"}) == "198.51.100.8"
    assert proxies.trusts("2001:db8:1:2::3")
    assert not proxies.trusts("2001:db8:2::3")
    assert not proxies.trusts("not an address")


def test_parse_networks_accepts_addresses_and_networks_and_names_bad_ones() -> None:
    assert parse_networks(["10.1.2.3", " 10.0.0.0/8", "::1", "10.1.2.3/16"]) == (
        ipaddress.ip_network("10.1.2.3/32"),
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
        ipaddress.ip_network("10.1.0.0/16"),
    )
    with pytest.raises(ValueError, match=r"'proxy\.local' is not an IP address or network"):
        parse_networks(["proxy.local"])


@given(
    spoofed=st.lists(st.ip_addresses(v=4).map(str), max_size=4),
    client=st.ip_addresses(v=4).filter(lambda a: a not in ipaddress.ip_network("10.0.0.0/24")),
    hops=st.lists(st.integers(1, 254).map(lambda n: f"10.0.0.{n}"), max_size=3),
)
def test_whatever_a_client_prepends_the_address_its_proxy_saw_is_used(
    spoofed: list[str], client: ipaddress.IPv4Address, hops: list[str]
) -> None:
    chain = ", ".join([*spoofed, str(client), *hops])
    assert proxies.client_address(PROXY, {"x-forwarded-for": chain}) == str(client)
