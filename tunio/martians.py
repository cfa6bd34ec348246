"""Martian addresses: the ones no packet into a TUN is ever for, because each means "this host"
(loopback, 0.0.0.0/8, ::, IPv4-mapped) or "every host here" (multicast, the limited broadcast).

The stack drops packets to them as Linux drops them on input (tunio_pkt_dst_martian in
csrc/packet.c); the options refuse them as the TUN's own addresses; the direct dialer refuses a
name whose answers are all of them for a flow from another host (tunio/dialers/hostlocal.py).
"""

from __future__ import annotations

import ipaddress

_THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")
_LIMITED_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


def martian(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """What kind of martian `ip` is, in words ("a loopback address"), or None."""
    v4 = isinstance(ip, ipaddress.IPv4Address)
    for why, hit in (
        ("a loopback address", ip.is_loopback),
        ("a multicast address", ip.is_multicast),
        ("an address of 0.0.0.0/8", v4 and ip in _THIS_NETWORK),
        ("the limited broadcast address", ip == _LIMITED_BROADCAST),
        ("the unspecified address", ip.is_unspecified),
        ("an IPv4-mapped address", not v4 and ip.ipv4_mapped is not None),  # type: ignore[union-attr]
    ):
        if hit:
            return why
    return None
