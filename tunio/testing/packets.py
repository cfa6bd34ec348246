"""Builds and parses the IPv4/TCP packets that tests write into (and read from) the stack's TUN
queues: real headers with real checksums, so that what the stack gets is what a kernel sends."""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
TCP, UDP, ICMP, ICMPV6 = 6, 17, 1, 58

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
    if len(src) == 16:
        return src + dst + struct.pack("!IxxxB", length, proto)
    return src + dst + struct.pack("!BBH", 0, proto, length)


def _packed(addr: str) -> bytes:
    return ipaddress.ip_address(addr).packed


def ip(src: str, dst: str, proto: int, payload: bytes) -> bytes:
    """An IPv4 or IPv6 packet, by the addresses' family."""
    if ":" in src:
        return ipv6(src, dst, proto, payload)
    return ipv4(src, dst, proto, payload)


def ipv6(src: str, dst: str, proto: int, payload: bytes, *, hop_limit: int = 64,
         extensions: bytes = b"", first_next: int | None = None) -> bytes:
    """`extensions`: extension headers put before the payload; `first_next` names the first."""
    nxt = proto if first_next is None else first_next
    hdr = struct.pack("!IHBB16s16s", 6 << 28, len(extensions) + len(payload), nxt, hop_limit,
                      _packed(src), _packed(dst))
    return hdr + extensions + payload


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
    s, d = _packed(src), _packed(dst)
    csum = checksum(_pseudo(s, d, TCP, len(seg)) + seg)
    seg = seg[:16] + struct.pack("!H", csum) + seg[18:]
    return ip(src, dst, TCP, seg)


def udp(src: str, sport: int, dst: str, dport: int, payload: bytes) -> bytes:
    seg = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    s, d = _packed(src), _packed(dst)
    csum = checksum(_pseudo(s, d, UDP, len(seg)) + seg) or 0xFFFF
    return ip(src, dst, UDP, seg[:6] + struct.pack("!H", csum) + seg[8:])


def echo(src: str, dst: str, ident: int, seq: int, data: bytes = b"", *,
         reply: bool = False) -> bytes:
    """An ICMP (IPv4) or ICMPv6 echo request, or reply."""
    v6 = ":" in src
    kind = (129 if reply else 128) if v6 else (0 if reply else 8)
    msg = struct.pack("!BBHHH", kind, 0, 0, ident, seq) + data
    proto = ICMPV6 if v6 else ICMP
    pseudo = _pseudo(_packed(src), _packed(dst), proto, len(msg)) if v6 else b""
    msg = msg[:2] + struct.pack("!H", checksum(pseudo + msg)) + msg[4:]
    return ip(src, dst, proto, msg)


@dataclass(frozen=True)
class Parsed:
    """The fields of an IPv4 packet the tests look at, and whether its checksums are right."""

    src: str
    dst: str
    proto: int
    sport: int = 0  # ICMP: the echo identifier
    dport: int = 0  # ICMP: the echo sequence number
    flags: int = 0
    seq: int = 0
    ack: int = 0
    options: bytes = b""
    payload: bytes = b""
    icmp_type: int = -1
    icmp_code: int = -1
    checksums_ok: bool = False


def _parse_ipv6(pkt: bytes) -> Parsed:
    """The fixed header only: the packets the stack writes carry no extension headers."""
    plen, proto = struct.unpack_from("!HB", pkt, 4)
    src = str(ipaddress.IPv6Address(pkt[8:24]))
    dst = str(ipaddress.IPv6Address(pkt[24:40]))
    l4 = pkt[40 : 40 + plen]
    ok = checksum(_pseudo(pkt[8:24], pkt[24:40], proto, len(l4)) + l4) == 0
    if proto == TCP:
        sport, dport, seq, ack, off, flags = struct.unpack_from("!HHIIBB", l4)
        hlen = (off >> 4) * 4
        return Parsed(src, dst, proto, sport, dport, flags, seq, ack, l4[20:hlen], l4[hlen:],
                      checksums_ok=ok)
    if proto == ICMPV6:
        ident, seq = struct.unpack_from("!HH", l4, 4)
        return Parsed(src, dst, proto, ident, seq, payload=l4[8:], icmp_type=l4[0],
                      icmp_code=l4[1], checksums_ok=ok)
    return Parsed(src, dst, proto, payload=l4, checksums_ok=ok)


def parse(pkt: bytes) -> Parsed:
    if pkt[0] >> 4 == 6:
        return _parse_ipv6(pkt)
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
        ident, seq = struct.unpack_from("!HH", l4, 4)  # an echo's; rest-of-header otherwise
        return Parsed(src, dst, proto, ident, seq, payload=l4[8:], icmp_type=l4[0],
                      icmp_code=l4[1], checksums_ok=ok)
    return Parsed(src, dst, proto, payload=l4, checksums_ok=ok)
