"""Malformed packets written into the TUN device never hurt a live flow or the stack.

An AF_PACKET socket bound to tun0 in the app namespace transmits its bytes into the device as
they are, so the stack's queue readers receive them exactly as written (no kernel checks).
"""

from __future__ import annotations

import ipaddress
import random
import socket
import struct

from tunio.testing.netlab import (
    PEER_PORTS,
    SERVER_ADDRESS,
    TUN_ADDRESS,
    TUN_NAME,
    Lab,
    TunioProcess,
    pattern,
    pattern_sha256,
    recv_all,
    recv_exact,
)
from tunio.testing.netns import netns_socket

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
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
