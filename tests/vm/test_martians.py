"""Packets into the TUN aimed at martian destinations (loopback, multicast, limited broadcast,
0.0.0.0/8, ::, IPv4-mapped) are dropped and counted, never dialed: a container or VM behind the
gateway must not reach the gateway's own loopback services, nor its LAN's multicast groups.

The workers run in the app namespace, so a flow the stack let through to 127.0.0.1:PORT would
reach the listeners this test holds there. The packets are written with AF_PACKET, as a hostile
guest writes them: no local stack sends them into a TUN.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from collections.abc import Iterator

from lab.netlab import (
    PEER_PORTS,
    SERVER_ADDRESS,
    TUN_ADDRESS,
    TUN_ADDRESS6,
    TUN_NAME,
    UDP_ECHO_PORT,
    Lab,
    LineReader,
)
from lab.tuntap import ETH_P_IP, ETH_P_IPV6

from tests.vm.test_metrics import METRICS, wait_for
from tunio.testing import packets
from tunio.testing.packets import SYN

APP = str(ipaddress.IPv4Interface(TUN_ADDRESS).ip)
APP6 = str(ipaddress.IPv6Interface(TUN_ADDRESS6).ip)
PORT = 47011  # the app namespace's own services listen here, on loopback
DROPPED = 'tunio_dropped_packets_total{reason="martian_destination"}'


@contextlib.contextmanager
def loopback_services(lab: Lab) -> Iterator[list[socket.socket]]:
    """A TCP listener and a UDP socket on 127.0.0.1:PORT and on [::1]:PORT, non-blocking."""
    socks: list[socket.socket] = []
    try:
        for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                sock = lab.open_socket(family=family, type=kind)
                socks.append(sock)
                sock.bind((host, PORT))
                if kind == socket.SOCK_STREAM:
                    sock.listen(16)
                sock.setblocking(False)
        yield socks
    finally:
        for sock in socks:
            sock.close()


def martians() -> list[tuple[int, bytes]]:
    """(ethertype, packet): a SYN or a datagram to each kind of martian destination."""
    v4 = [("127.0.0.1", "tcp"), ("127.0.0.1", "udp"), ("127.3.2.1", "tcp"), ("0.0.0.0", "tcp"),
          ("0.1.2.3", "udp"), ("224.0.0.251", "udp"), ("239.255.255.250", "udp"),
          ("255.255.255.255", "udp")]  # fmt: skip
    v6 = [("::1", "tcp"), ("::1", "udp"), ("::", "tcp"), ("ff02::fb", "udp"),
          ("ff05::c", "udp"), ("::ffff:127.0.0.1", "tcp"), ("::ffff:127.0.0.1", "udp")]  # fmt: skip
    out = []
    for src, ethertype, dsts in ((APP, ETH_P_IP, v4), (APP6, ETH_P_IPV6, v6)):
        for i, (dst, kind) in enumerate(dsts):
            sport = 41000 + i
            if kind == "tcp":
                pkt = packets.tcp(src, sport, dst, PORT, flags=SYN, options=packets.SYN_OPTIONS)
            else:
                pkt = packets.udp(src, sport, dst, PORT, b"hello loopback")
            out.append((ethertype, pkt))
    return out


def test_martian_destinations_are_dropped_counted_and_never_reach_loopback(
    fresh_lab: Lab, fresh_servers: dict[str, LineReader]
) -> None:
    del fresh_servers
    lab = fresh_lab
    tunio = lab.start_tunio(["--metrics", METRICS])
    wait_for(lab, lambda s: s.get('tunio_workers{state="alive"}') == 2, "two workers")
    bad = martians()
    # One SYN and one datagram to the server, written the same way: they must become a flow
    # and a session, which shows the written packets do reach the stack.
    good = [
        (ETH_P_IP, packets.tcp(APP, 42000, SERVER_ADDRESS, PEER_PORTS["echo"], flags=SYN,
                               options=packets.SYN_OPTIONS)),
        (ETH_P_IP, packets.udp(APP, 42001, SERVER_ADDRESS, UDP_ECHO_PORT, b"ping")),
    ]  # fmt: skip
    with (
        loopback_services(lab) as services,
        lab.open_socket(family=socket.AF_PACKET, type=socket.SOCK_RAW) as raw,
    ):
        for ethertype, pkt in bad + good:
            raw.sendto(pkt, (TUN_NAME, ethertype))

        def settled(s: dict[str, float]) -> bool:
            return (s.get(DROPPED) == len(bad) and s.get('tunio_flows_total{kind="tcp"}') == 1
                    and s.get('tunio_flows_total{kind="datagram"}') == 1)  # fmt: skip

        after = wait_for(lab, settled, f"{len(bad)} martians dropped, one flow, one session")
        assert sum(v for k, v in after.items() if k.startswith("tunio_worker_dials_total")) == 1
        # Each martian was counted as dropped; none may have gone on all the same: a dial to
        # loopback takes well under the time the good flow's dial took to be counted.
        for sock in services:
            if sock.type == socket.SOCK_STREAM:
                try:
                    conn, peer = sock.accept()
                except BlockingIOError:
                    continue
                conn.close()
                raise AssertionError(f"a flow reached {sock.getsockname()} from {peer}")
            try:
                data, peer = sock.recvfrom(2048)
            except BlockingIOError:
                continue
            raise AssertionError(f"{data!r} reached {sock.getsockname()} from {peer}")
    assert tunio.stop() == 0, tunio.log.text
