"""Packets on the lab's TUN device, as a guest behind the gateway would send and see them.

A guest's packets are written onto tun0 with an AF_PACKET socket in the app namespace (the
stack's readers get them exactly as written); a tap on tun0 sees every packet both ways, the
ones the stack writes for the guest among them.
"""

from __future__ import annotations

import socket
import time

from lab.netns import netns_socket
from tunio.testing import packets

__all__ = ["ETH_P_IP", "ETH_P_IPV6", "next_tcp", "tun_tap"]

ETH_P_ALL, ETH_P_IP, ETH_P_IPV6 = 0x0003, 0x0800, 0x86DD


def tun_tap(ns: str, tun: str) -> socket.socket:
    """A socket in namespace `ns` that receives every packet on device `tun`, either way."""
    tap = netns_socket(ns, socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
    try:
        tap.bind((tun, ETH_P_ALL))
    except OSError:
        tap.close()
        raise
    return tap


def next_tcp(
    tap: socket.socket, src: str, dst: str, dport: int, *, flags: int = 0, timeout: float = 15.0
) -> packets.Parsed:
    """The next TCP packet from `src` to `dst`:`dport` with all of `flags` that `tap` sees;
    TimeoutError if none comes within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        tap.settimeout(left)
        got = packets.parse(tap.recv(65535))
        if (got.proto == packets.TCP and (got.src, got.dst, got.dport) == (src, dst, dport)
                and got.flags & flags == flags):  # fmt: skip
            return got
    msg = f"no TCP packet {src} -> {dst}:{dport} with flags {flags:#x} in {timeout:g} s"
    raise TimeoutError(msg)
