"""IPv6 through the C stack (socketpair TUN queue): the same connect semantics and translation as
IPv4, ICMPv6 errors, extension headers, and UDP."""

from __future__ import annotations

import errno
import ipaddress
import struct
from pathlib import Path

import pytest

from tunio import wire
from tunio.testing import packets
from tunio.testing.stackrig import APP6, DST6, WINDOW, pool_of, stack_rig

in_pool = pool_of(f"{APP6}/64")


def test_open_and_release_over_ipv6(tmp_path: Path) -> None:
    with stack_rig(tmp_path) as rig:
        msg = rig.open(41000, 443, seq=77, app=APP6, dst=DST6)
        block = wire.AddressBlock.unpack(msg.payload or b"")
        assert (block.version, str(block.src), block.src_port) == (6, APP6, 41000)
        assert (str(block.dst), block.dst_port) == (DST6, 443)

        rig.send(wire.Cmd.OPEN_OK, msg.flow, WINDOW)
        syn = rig.read()
        assert syn.checksums_ok
        assert (syn.dst, syn.dport) == (APP6, rig.stack.listen_port_of(6))
        assert in_pool(syn.src)
        assert (syn.flags, syn.seq, syn.options) == (packets.SYN, 77, packets.SYN_OPTIONS)

        rig.write(packets.tcp(APP6, rig.stack.listen_port_of(6), syn.src, syn.sport,
                              flags=packets.SYN | packets.ACK, seq=5, ack=78))
        synack = rig.read()
        assert synack.checksums_ok
        assert (synack.src, synack.sport, synack.dst, synack.dport) == (DST6, 443, APP6, 41000)


def test_refused_over_ipv6_is_a_rst(tmp_path: Path) -> None:
    with stack_rig(tmp_path) as rig:
        msg = rig.open(41001, 444, seq=10, app=APP6, dst=DST6)
        rig.send(wire.Cmd.OPEN_FAIL, msg.flow, errno.ECONNREFUSED)
        rst = rig.read()
        assert rst.checksums_ok
        assert (rst.src, rst.dst, rst.flags, rst.ack) == (
            DST6, APP6, packets.RST | packets.ACK, 11)


@pytest.mark.parametrize(("err", "code"), [(errno.ENETUNREACH, 0), (errno.EHOSTUNREACH, 3)])
def test_unreachable_over_ipv6_is_icmpv6(tmp_path: Path, err: int, code: int) -> None:
    with stack_rig(tmp_path) as rig:
        syn = rig.syn(41002, 445, app=APP6, dst=DST6)
        rig.write(syn)
        msg = rig.recv()
        rig.send(wire.Cmd.OPEN_FAIL, msg.flow, err)
        icmp = rig.read()
        assert icmp.checksums_ok  # ICMPv6 sums the pseudo-header
        assert (icmp.proto, icmp.icmp_type, icmp.icmp_code) == (packets.ICMPV6, 1, code)
        assert (icmp.src, icmp.dst) == (DST6, APP6)
        assert icmp.payload == syn[: len(icmp.payload)]


def _options_header(next_header: int) -> bytes:
    # hop-by-hop or destination options: next, length 0 (8 bytes), PadN filling the rest
    return bytes([next_header, 0, 1, 4, 0, 0, 0, 0])


def test_extension_headers_are_skipped_and_kept(tmp_path: Path) -> None:
    with stack_rig(tmp_path) as rig:
        seg = packets.tcp(APP6, 41003, DST6, 446, flags=packets.SYN, seq=9)[40:]
        ext = _options_header(60) + _options_header(packets.TCP)  # hop-by-hop, dest. options
        pkt = packets.ipv6(APP6, DST6, packets.TCP, seg, extensions=ext, first_next=0)
        rig.write(pkt)
        msg = rig.recv()
        assert wire.AddressBlock.unpack(msg.payload or b"").src_port == 41003
        rig.send(wire.Cmd.OPEN_OK, msg.flow, WINDOW)
        raw = rig.tun.recv(65536)
        assert raw[40:56] == ext  # the extension headers travel on untouched
        body = raw[56:]
        src, dst = raw[8:24], raw[24:40]
        pseudo = src + dst + struct.pack("!IxxxB", len(body), packets.TCP)
        assert packets.checksum(pseudo + body) == 0
        assert ipaddress.IPv6Address(dst) == ipaddress.IPv6Address(APP6)


def test_ipv6_fragment_not_8_byte_aligned_is_dropped(tmp_path: Path) -> None:
    # more fragments follow a 20-byte one: no datagram can be made of it (reasm.c)
    with stack_rig(tmp_path) as rig:
        seg = packets.tcp(APP6, 41004, DST6, 447, flags=packets.SYN)[40:]
        frag = bytes([packets.TCP, 0, 0, 1, 0, 0, 0, 7])  # offset 0, more fragments
        rig.write(packets.ipv6(APP6, DST6, packets.TCP, seg, extensions=frag, first_next=44))
        assert rig.probe().sport == 9
        assert rig.stack.stats()["drop_fragment"] == 1


def test_udp_over_ipv6(tmp_path: Path) -> None:
    with stack_rig(tmp_path) as rig:
        rig.write(packets.udp(APP6, 5353, DST6, 53, b"q6"))
        msg = rig.recv()
        block = wire.AddressBlock.unpack(msg.payload or b"")
        assert (block.version, str(block.dst), block.dst_port) == (6, DST6, 53)
        reply = wire.AddressBlock(17, 6, ipaddress.IPv6Address(DST6), 53,
                                  ipaddress.IPv6Address(APP6), 5353).pack()
        rig.send(wire.Cmd.DGRAM, msg.flow, 0, reply + b"answer")
        pkt = rig.read()
        assert pkt.checksums_ok
        assert (pkt.proto, pkt.src, pkt.dst, pkt.payload[8:]) == (
            packets.UDP, DST6, APP6, b"answer")
        rig.send(wire.Cmd.RST, msg.flow, errno.ECONNREFUSED)
        icmp = rig.read()
        assert icmp.checksums_ok
        assert (icmp.icmp_type, icmp.icmp_code) == (1, 4)  # port unreachable
