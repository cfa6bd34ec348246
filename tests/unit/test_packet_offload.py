"""Address rewriting of segments whose checksum the kernel left partial (TSO / checksum offload
with virtio-net headers): only the pseudo-header sum may change. The kernel does not verify
partial checksums on local delivery, so this is where a mistake would be caught."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from tunio._stack import ffi, lib

from tunio.testing import packets

CASES = [
    ("198.18.255.1", 40000, "198.18.0.10", 80, "198.18.255.250", 1234, "198.18.255.1", 33000),
    ("fd00:18::1", 40000, "fd00:18::10", 443, "fd00:18::ffff:fffe", 1234, "fd00:18::1", 33000),
]


def _partial(pkt: bytes) -> tuple[bytearray, int]:
    """The segment as the kernel hands it over with NEEDS_CSUM: the checksum field holds the
    pseudo-header's sum, folded but not complemented."""
    v6 = pkt[0] >> 4 == 6
    l3 = 40 if v6 else 20
    seg = pkt[l3:]
    src, dst = (pkt[8:24], pkt[24:40]) if v6 else (pkt[12:16], pkt[16:20])
    pseudo = (src + dst + struct.pack("!IxxxB", len(seg), packets.TCP) if v6
              else src + dst + struct.pack("!BBH", 0, packets.TCP, len(seg)))
    partial = ~packets.checksum(pseudo) & 0xFFFF
    out = bytearray(pkt)
    struct.pack_into("!H", out, l3 + 16, partial)
    return out, l3


@pytest.mark.parametrize("case", CASES, ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("size", [0, 1, 1448, 65000 - 60])
def test_partial_checksum_stays_right_after_rewrite(
    case: tuple[str, int, str, int, str, int, str, int], size: int
) -> None:
    s, sp, d, dp, ns, nsp, nd, ndp = case
    payload = bytes((i * 7) & 0xFF for i in range(size))
    whole = packets.tcp(s, sp, d, dp, flags=packets.ACK | packets.PSH, seq=1, ack=2,
                        payload=payload)
    buf, l3 = _partial(whole)
    cbuf = ffi.from_buffer("uint8_t[]", buf)
    p = ffi.new("struct tunio_pkt *")
    assert lib.tunio_pkt_parse(p, cbuf, len(buf)) == 0
    p.partial_csum = 1
    a = ffi.new("uint8_t[16]", ipaddress.ip_address(ns).packed)
    b = ffi.new("uint8_t[16]", ipaddress.ip_address(nd).packed)
    lib.tunio_pkt_rewrite(p, a, nsp, b, ndp)
    # What the kernel will do before the segment leaves: complete it from csum_start.
    assert lib.tunio_pkt_complete_csum(p, l3, 16) == 0
    rewritten = packets.parse(bytes(ffi.buffer(cbuf, len(buf))))
    expected = packets.parse(packets.tcp(ns, nsp, nd, ndp, flags=packets.ACK | packets.PSH,
                                         seq=1, ack=2, payload=payload))
    assert rewritten.checksums_ok
    assert rewritten == expected


def test_complete_checksum_refuses_offsets_outside_the_packet() -> None:
    pkt = bytearray(packets.tcp("198.18.255.1", 1, "198.18.0.10", 2, flags=packets.ACK))
    cbuf = ffi.from_buffer("uint8_t[]", pkt)
    p = ffi.new("struct tunio_pkt *")
    assert lib.tunio_pkt_parse(p, cbuf, len(pkt)) == 0
    assert lib.tunio_pkt_complete_csum(p, 20, 19) == -1
    assert lib.tunio_pkt_complete_csum(p, 10, 16) == -1
    assert lib.tunio_pkt_complete_csum(p, 40, 0) == -1
