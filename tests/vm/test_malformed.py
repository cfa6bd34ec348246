"""Malformed packets written into the TUN device never hurt a live flow or the stack, IPv4 and
IPv6 (truncated headers, lying lengths, extension header chains, fragments).

An AF_PACKET socket bound to tun0 in the app namespace transmits its bytes into the device as
they are, so the stack's queue readers receive them exactly as written (no kernel checks).
"""

from __future__ import annotations

import ipaddress
import random
import socket
import struct
import sys

import pytest
from lab.netlab import (
    PEER_PORTS,
    SERVER_ADDRESS,
    SERVER_ADDRESS6,
    TUN_ADDRESS,
    TUN_ADDRESS6,
    TUN_NAME,
    UDP_ECHO_PORT,
    Lab,
    LineReader,
    TunioProcess,
    pattern,
    pattern_sha256,
    recv_all,
    recv_exact,
)
from lab.netns import netns_socket
from lab.tuntap import ETH_P_IP, ETH_P_IPV6

from tests.vm.conftest import FLOOD
from tunio.testing import packets
from tunio.testing.packets import TCP, UDP

APP_IP = str(ipaddress.IPv4Interface(TUN_ADDRESS).ip)
RANDOM_PACKETS = 300  # per round
ROUNDS = 4


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(int(word) for word in struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4(
    payload: bytes,
    *,
    proto: int = 6,
    src: str = APP_IP,
    dst: str = SERVER_ADDRESS,
    ihl: int = 5,
    total_length: int | None = None,
    frag: int = 0,
) -> bytes:
    """An IPv4 packet; every field can be made wrong on purpose."""
    length = 20 + len(payload) if total_length is None else total_length
    header = struct.pack(
        "!BBHHHBBH4s4s",
        (4 << 4) | (ihl & 0xF), 0, length & 0xFFFF, 0x1234, frag, 64, proto, 0,
        socket.inet_aton(src), socket.inet_aton(dst),
    )  # fmt: skip
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return header + payload


def tcp(sport: int, dport: int, flags: int, *, seq: int = 1, ack: int = 1) -> bytes:
    """A 20-byte TCP header from APP_IP to SERVER_ADDRESS with a correct checksum."""
    segment = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 65535, 0, 0)
    pseudo = socket.inet_aton(APP_IP) + socket.inet_aton(SERVER_ADDRESS)
    pseudo += struct.pack("!BBH", 0, 6, len(segment))
    csum = checksum(pseudo + segment)
    return segment[:16] + struct.pack("!H", csum) + segment[18:]


def malformed_packets(rng: random.Random) -> list[tuple[int, bytes]]:
    """(ethertype, bytes) pairs: each one a way a packet can be wrong."""
    syn = tcp(40000, PEER_PORTS["echo"], 0x02)
    ack = 0x10
    pkts = [
        (ETH_P_IP, b"\x45"),  # one byte
        (ETH_P_IP, ipv4(syn)[:12]),  # truncated inside the IPv4 header
        (ETH_P_IP, ipv4(syn)[:30]),  # truncated inside the TCP header
        (ETH_P_IP, ipv4(syn, ihl=3)),  # IHL below the minimum
        (ETH_P_IP, ipv4(syn, ihl=15)),  # IHL past the end of the packet
        (ETH_P_IP, ipv4(syn, total_length=1400)),  # claims more than was read
        (ETH_P_IP, ipv4(syn, total_length=10)),  # claims less than a header
        (ETH_P_IP, ipv4(syn, frag=0x2000)),  # first fragment (MF set)
        (ETH_P_IP, ipv4(syn[8:], frag=1)),  # a later fragment, offset 8
        (ETH_P_IP, ipv4(b"\0" * 32, proto=253)),  # an unknown protocol
        (ETH_P_IP, ipv4(b"\x08\0\0\0\0\0\0\0", proto=1)),  # ICMP echo, 8 bytes
        (ETH_P_IP, ipv4(tcp(40001, PEER_PORTS["echo"], ack))),  # bare ACK, no such flow
        (ETH_P_IP, ipv4(tcp(40002, 9999, 0x04))),  # a RST for no flow
        (ETH_P_IP, ipv4(syn, dst=APP_IP)),  # app traffic to the TUN's own address
        (ETH_P_IP, ipv4(syn, dst="198.18.255.7")),  # ... and into the NAT pool
        (ETH_P_IP, ipv4(b"\0" * 4, proto=17)),  # UDP shorter than its header
        (ETH_P_IPV6, b"\x60" + bytes(20)),  # IPv6 shorter than its header
        (ETH_P_IP, b"\x00" * 40),  # IP version 0
        (ETH_P_IP, b"\xf5" + bytes(39)),  # IP version 15
    ]
    for _ in range(RANDOM_PACKETS):
        size = rng.randint(1, 1500)
        pkts.append((ETH_P_IP, rng.randbytes(size)))
    return pkts


def inject(sock: socket.socket, packets: list[tuple[int, bytes]]) -> None:
    for ethertype, data in packets:
        sock.sendto(data, (TUN_NAME, ethertype))


def test_malformed_packets_do_not_disturb_a_live_flow(lab: Lab, tunio: TunioProcess) -> None:
    rng = random.Random(20240601)
    chunk = 8 << 20
    total = chunk * (ROUNDS + 1)
    data = memoryview(pattern(total))
    # Protocol 0: this socket only transmits, it does not receive copies of tun0's traffic.
    with (
        netns_socket(lab.app, socket.AF_PACKET, socket.SOCK_RAW, 0) as raw,
        lab.connect(PEER_PORTS["sink-hash"], timeout=60.0) as flow,
    ):
        # Interleave: the flow is mid-transfer while every kind of bad packet arrives.
        flow.sendall(data[:chunk])
        for r in range(ROUNDS):
            inject(raw, malformed_packets(rng))
            flow.sendall(data[chunk * (r + 1) : chunk * (r + 2)])
        flow.shutdown(socket.SHUT_WR)
        assert recv_all(flow).decode() == f"{pattern_sha256(total)} {total}\n"
    assert tunio.running(), tunio.log.text
    # And the stack still takes new flows.
    probe = pattern(65536)
    with lab.connect(PEER_PORTS["echo"]) as sock:
        sock.sendall(probe)
        assert recv_exact(sock, len(probe)) == probe


# ---- IPv6 ------------------------------------------------------------------------------------

APP_IP6 = str(ipaddress.IPv6Interface(TUN_ADDRESS6).ip)
HOP_BY_HOP, ROUTING, FRAGMENT, NO_NEXT, DEST_OPTS = 0, 43, 44, 59, 60
PAD8 = bytes([1, 4, 0, 0, 0, 0])  # a PadN option filling an 8-byte options header
IPV6_RANDOM_PACKETS = 150  # per round


@pytest.fixture(scope="module")
def udp_echo6(lab: Lab) -> LineReader:
    return lab.serve([sys.executable, str(FLOOD), "--serve",
                      f"[{SERVER_ADDRESS6}]:{UDP_ECHO_PORT}", "--mode", "udp-echo"])


def options_header(nxt: int, units: int = 0) -> bytes:
    """A hop-by-hop or destination options header of 8 * (units + 1) bytes (PadN inside)."""
    return bytes([nxt, units]) + PAD8 + bytes(8 * units)


def fragment_header(nxt: int, offset: int, more: bool, ident: int = 0x7475) -> bytes:
    return struct.pack("!BBHI", nxt, 0, (offset << 3) | int(more), ident)


def with_payload_length(pkt: bytes, plen: int) -> bytes:
    return pkt[:4] + struct.pack("!H", plen) + pkt[6:]


def malformed_ipv6(udp_port: int, tcp_port: int, rng: random.Random) -> list[bytes]:
    """IPv6 packets that are wrong, or valid but unusual; those on the live flows' 4-tuples
    must be dropped (each would break the flows' bytes if it were forwarded)."""
    a, s = APP_IP6, SERVER_ADDRESS6
    echo_port = PEER_PORTS["echo"]
    # segments with correct checksums (the pseudo-header does not see extension headers)
    live_udp = packets.udp(a, udp_port, s, UDP_ECHO_PORT, b"MUST NOT ARRIVE")[40:]
    # a first fragment says the whole datagram's length in its UDP header
    first_udp = live_udp[:4] + struct.pack("!H", 2000) + live_udp[6:]
    live_rst = packets.tcp(a, tcp_port, s, echo_port, flags=packets.RST | packets.ACK)[40:]
    other_udp = packets.udp(a, 42000, s, 9, b"other session")[40:]

    def v6(proto: int, payload: bytes, ext: bytes = b"", first: int | None = None) -> bytes:
        return packets.ipv6(a, s, proto, payload, extensions=ext, first_next=first)

    live = [
        v6(UDP, live_udp)[:30],  # truncated inside the IPv6 header
        v6(UDP, live_udp)[:44],  # truncated inside the UDP header
        with_payload_length(v6(UDP, live_udp), 1400),  # payload length beyond the read
        with_payload_length(v6(UDP, live_udp), 4),  # ... and shorter than a UDP header
        # a hop-by-hop header whose length runs past the end of the packet
        v6(UDP, live_udp, bytes([UDP, 200]) + PAD8, HOP_BY_HOP),
        # a chain whose last header is cut short
        v6(UDP, b"", options_header(DEST_OPTS) + bytes([UDP, 3]) + PAD8, HOP_BY_HOP),
        # fragments that never make a datagram: a first one whose length is not a multiple of 8
        # (more follow), a later one whose start never comes, a first one of a TCP RST
        v6(UDP, first_udp, fragment_header(UDP, 0, True), FRAGMENT),
        v6(UDP, live_udp, fragment_header(UDP, 8, False), FRAGMENT),
        v6(TCP, live_rst, fragment_header(TCP, 0, True), FRAGMENT),
        v6(TCP, live_rst, bytes([TCP, 250]) + PAD8, HOP_BY_HOP),  # a RST behind a lying one
        # "no next header": nothing follows, whatever bytes do
        v6(NO_NEXT, live_udp),
        v6(NO_NEXT, live_udp, options_header(NO_NEXT), DEST_OPTS),
        b"\x60" + bytes(10),  # shorter than a header
        b"\x60" + bytes(39),  # a header and nothing (next header 0: hop-by-hop, missing)
    ]
    # valid but unusual, on another session: forwarded or dropped, the live flows do not care
    chain = b"".join(options_header(DEST_OPTS) for _ in range(9)) + options_header(UDP)
    elsewhere = [
        v6(UDP, other_udp, chain, DEST_OPTS),  # ten extension headers
        v6(UDP, other_udp, options_header(UDP), HOP_BY_HOP),  # one hop-by-hop header
        v6(UDP, other_udp, fragment_header(UDP, 0, False), FRAGMENT),  # atomic fragment
        v6(UDP, other_udp, bytes([UDP, 0, 0, 0]) + bytes(4), ROUTING),  # routing type 0
        # ICMPv6 errors from the app: packet too big quoting the live TCP flow, and
        # destination unreachable quoting another session (a kernel answers with these)
        packets.ip(a, s, packets.ICMPV6, struct.pack("!BBHI", 2, 0, 0, 1280) + live_rst[:48]),
        packets.ip(a, s, packets.ICMPV6, struct.pack("!BBHI", 1, 4, 0, 0) + other_udp),
    ]
    nexts = [HOP_BY_HOP, ROUTING, FRAGMENT, NO_NEXT, DEST_OPTS, 50, 51, 135, 139, 140, 253,
             TCP, UDP, packets.ICMPV6]  # fmt: skip
    randoms = [v6(rng.choice(nexts), rng.randbytes(rng.randint(0, 1200)))
               for _ in range(IPV6_RANDOM_PACKETS)]  # fmt: skip
    return live + elsewhere + randoms


def test_malformed_ipv6_packets_leave_live_flows_untouched(
    lab: Lab, tunio: TunioProcess, udp_echo6: LineReader
) -> None:
    """A live IPv6 TCP flow and a live IPv6 UDP session stay byte-exact while broken IPv6
    packets (many on their own 4-tuples) arrive between their transfers."""
    del udp_echo6
    rng = random.Random(20261126)
    probe = pattern(200_000)
    seq = 0
    with (
        netns_socket(lab.app, socket.AF_PACKET, socket.SOCK_RAW, 0) as raw,
        lab.connect(PEER_PORTS["echo"], SERVER_ADDRESS6, timeout=30.0) as tcp_flow,
        lab.open_socket(family=socket.AF_INET6, type=socket.SOCK_DGRAM) as udp_flow,
    ):
        udp_flow.settimeout(5.0)
        udp_flow.connect((SERVER_ADDRESS6, UDP_ECHO_PORT))
        assert tcp_flow.getsockname()[0] == APP_IP6  # the flows come from the TUN's address
        for _ in range(4):
            for i in range(30):  # one at a time: any extra datagram shows as a mismatch
                data = struct.pack(">I", seq + i) + pattern(200 + i)
                udp_flow.send(data)
                assert udp_flow.recv(65535) == data
            seq += 30
            tcp_flow.sendall(probe)
            assert recv_exact(tcp_flow, len(probe)) == probe
            for pkt in malformed_ipv6(udp_flow.getsockname()[1], tcp_flow.getsockname()[1], rng):
                raw.sendto(pkt, (TUN_NAME, ETH_P_IPV6))
        tcp_flow.shutdown(socket.SHUT_WR)
        assert recv_all(tcp_flow) == b""  # an orderly end, no reset
    assert tunio.running(), tunio.log.text
