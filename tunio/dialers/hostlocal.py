"""Answers that mean "this host", for a flow from another host.

A fake-IP flow reaches the direct dialer as a name, resolved here, on the gateway. An answer
of 127.0.0.1, ::1, 0.0.0.0 or :: (a DNS-rebinding name, or a blocklist's 0.0.0.0) then means the
gateway itself: for an app on the gateway that is what it asked for (its own loopback is the
gateway's), but a container's or a VM's app behind it asked for its *own* loopback, and must
not reach the gateway's local services instead. So such answers are dropped for a flow whose
source is not an address of the host the worker runs on; a name left with no other answer is
refused (ECONNREFUSED, as a port where nothing listens). Multicast and broadcast answers go
the same way: no app behind a gateway means the gateway's LAN by them.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from pathlib import Path

from tunio.errors import DialError
from tunio.martians import martian


def from_this_host(src: str) -> bool:
    """Whether `src` is an address of this host (of the worker's network namespace): one a
    socket may bind to. With net.ipv*.ip_nonlocal_bind set, binding tells nothing: then a UDP
    socket connected to `src` (which sends nothing) takes `src` as its source if it is ours."""
    family = socket.AF_INET6 if ":" in src else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            if not _nonlocal_bind(family):
                probe.bind((src, 0))
                return True
            probe.connect((src, 9))
            local = probe.getsockname()[0]
        except OSError:
            return False
    try:
        return ipaddress.ip_address(local.partition("%")[0]) == ipaddress.ip_address(src)
    except ValueError:
        return False


def _nonlocal_bind(family: int) -> bool:
    version = "ipv6" if family == socket.AF_INET6 else "ipv4"
    try:
        return Path(f"/proc/sys/net/{version}/ip_nonlocal_bind").read_text().strip() != "0"
    except OSError:
        return True  # unknown: the connect test, which holds either way


def for_flow_from(
    src: str, name: str, v6: list[str], v4: list[str]
) -> tuple[list[str], list[str]]:
    """`name`'s answers (IPv6, IPv4) that a flow from `src` may be dialed to."""
    own = {ip: why for ip in (*v6, *v4) if (why := martian(ipaddress.ip_address(ip)))}
    if not own or from_this_host(src):
        return v6, v4
    keep6 = [ip for ip in v6 if ip not in own]
    keep4 = [ip for ip in v4 if ip not in own]
    if not keep6 and not keep4:
        ip, why = next(iter(own.items()))
        raise DialError(
            errno.ECONNREFUSED,
            f"{name}: the name answers {ip}, {why}: from here, this host and its LAN, not "
            f"the app's own; the flow is from {src}, another host: refused",
        )
    return keep6, keep4
