"""Builds and parses the IPv4/TCP packets that tests write into (and read from) the stack's TUN
queues: real headers with real checksums, so that what the stack gets is what a kernel sends."""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
TCP, UDP, ICMP = 6, 17, 1

# MSS 1460, SACK permitted, timestamps, window scale 7: what Linux puts on a SYN.
SYN_OPTIONS = bytes.fromhex("020405b4" "0402" "080a0001e24000000000" "01" "030307")


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _pseudo(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    return src + dst + struct.pack("!BBH", 0, proto, length)


def ipv4(src: str, dst: str, proto: int, payload: bytes, *, ttl: int = 64, frag: int = 0x4000,
         ident: int = 0x1234) -> bytes:
    hdr = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, frag, ttl, proto, 0,
        ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed,
    )
    hdr = hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:]
    return hdr + payload


def tcp(src: str, sport: int, dst: str, dport: int, *, flags: int, seq: int = 1000,
        ack: int = 0, payload: bytes = b"", options: bytes = b"", window: int = 64240) -> bytes:
    if len(options) % 4:
        options += b"\0" * (4 - len(options) % 4)
    off = (20 + len(options)) // 4
    hdr = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, off << 4, flags, window, 0, 0)
    seg = hdr + options + payload
    s, d = ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed
    csum = checksum(_pseudo(s, d, TCP, len(seg)) + seg)
    seg = seg[:16] + struct.pack("!H", csum) + seg[18:]
    return ipv4(src, dst, TCP, seg)


def udp(src: str, sport: int, dst: str, dport: int, payload: bytes) -> bytes:
    seg = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    s, d = ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed
    csum = checksum(_pseudo(s, d, UDP, len(seg)) + seg) or 0xFFFF
    return ipv4(src, dst, UDP, seg[:6] + struct.pack("!H", csum) + seg[8:])


@dataclass(frozen=True)
class Parsed:
    """The fields of an IPv4 packet the tests look at, and whether its checksums are right."""

    src: str
    dst: str
    proto: int
    sport: int = 0
    dport: int = 0
    flags: int = 0
    seq: int = 0
    ack: int = 0
    options: bytes = b""
    payload: bytes = b""
    icmp_type: int = -1
    icmp_code: int = -1
    checksums_ok: bool = False


def parse(pkt: bytes) -> Parsed:
    ihl = (pkt[0] & 0x0F) * 4
    total = struct.unpack_from("!H", pkt, 2)[0]
    proto = pkt[9]
    src = str(ipaddress.IPv4Address(pkt[12:16]))
    dst = str(ipaddress.IPv4Address(pkt[16:20]))
    l4 = pkt[ihl:total]
    ok = checksum(pkt[:ihl]) == 0
    if proto == TCP:
        sport, dport, seq, ack, off, flags = struct.unpack_from("!HHIIBB", l4)
        hlen = (off >> 4) * 4
        ok = ok and checksum(_pseudo(pkt[12:16], pkt[16:20], TCP, len(l4)) + l4) == 0
        return Parsed(src, dst, proto, sport, dport, flags, seq, ack, l4[20:hlen], l4[hlen:],
                      checksums_ok=ok)
    if proto == ICMP:
        ok = ok and checksum(l4) == 0
        return Parsed(src, dst, proto, payload=l4[8:], icmp_type=l4[0], icmp_code=l4[1],
                      checksums_ok=ok)
    return Parsed(src, dst, proto, payload=l4, checksums_ok=ok)
