"""Fragment reassembly in the C stack (csrc/reasm.c), through a socketpair TUN queue: a UDP
datagram sent as fragments reaches the worker whole, in any order and over both families;
overlaps, contradictions and a full table discard datagrams and count them."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from tunio import wire
from tunio.testing import packets
from tunio.testing.stackrig import APP, APP6, DST, DST6, Rig, stack_rig

MF = 0x2000  # IPv4: more fragments


def v4_fragments(datagram: bytes, size: int, ident: int = 0x4242) -> list[bytes]:
    """An IPv4 UDP packet's transport bytes cut into fragments of `size` (a multiple of 8)."""
    body = datagram[20:]
    out = []
    for off in range(0, len(body), size):
        piece = body[off : off + size]
        more = MF if off + size < len(body) else 0
        out.append(packets.ipv4(APP, DST, packets.UDP, piece, frag=more | off // 8, ident=ident))
    return out


def v6_fragments(datagram: bytes, size: int, ident: int = 0x42424242) -> list[bytes]:
    body = datagram[40:]
    out = []
    for off in range(0, len(body), size):
        piece = body[off : off + size]
        more = int(off + size < len(body))
        frag = struct.pack("!BBHI", packets.UDP, 0, off | more, ident)
        out.append(packets.ipv6(APP6, DST6, packets.UDP, piece, extensions=frag, first_next=44))
    return out


def expect_datagram(rig: Rig, data: bytes) -> None:
    msg = rig.recv()
    assert msg.cmd is wire.Cmd.DGRAM
    payload = bytes(msg.payload or b"")
    assert payload[wire.ADDRESS.size:] == data


def nothing_forwarded(rig: Rig) -> None:
    assert rig.probe().sport == 9  # the stray's RST is the first thing out


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("order", ["in-order", "reversed", "middle-first"])
def test_fragments_are_reassembled(tmp_path: Path, family: int, order: str) -> None:
    data = bytes(range(256)) * 16  # 4,096 bytes: three fragments
    if family == 4:
        frags = v4_fragments(packets.udp(APP, 5000, DST, 53, data), 1480)
    else:
        frags = v6_fragments(packets.udp(APP6, 5000, DST6, 53, data), 1448)
    assert len(frags) == 3
    frags = {"in-order": frags, "reversed": frags[::-1],
             "middle-first": [frags[1], frags[0], frags[2]]}[order]  # fmt: skip
    with stack_rig(tmp_path) as rig:
        for frag in frags:
            rig.write(frag)
        expect_datagram(rig, data)
        assert rig.stack.stats()["drop_fragment"] == 0


def test_an_atomic_fragment_is_a_whole_datagram(tmp_path: Path) -> None:
    udp = packets.udp(APP6, 5001, DST6, 53, b"all in one")
    frag = struct.pack("!BBHI", packets.UDP, 0, 0, 7)  # offset 0, no more
    with stack_rig(tmp_path) as rig:
        rig.write(packets.ipv6(APP6, DST6, packets.UDP, udp[40:], extensions=frag, first_next=44))
        expect_datagram(rig, b"all in one")


def test_overlap_discards_the_datagram(tmp_path: Path) -> None:
    data = bytes(3000)
    first, second, third = v4_fragments(packets.udp(APP, 5002, DST, 53, data), 1480)
    body = packets.udp(APP, 5002, DST, 53, data)[20:]
    # a fragment rewriting bytes 8..1488 of the first one: RFC 5722's rule, for IPv4 too
    overlapping = packets.ipv4(APP, DST, packets.UDP, body[8:1488], frag=MF | 1, ident=0x4242)
    with stack_rig(tmp_path) as rig:
        rig.write(first)
        rig.write(overlapping)
        rig.write(second)  # what comes after the discard starts a datagram that never ends
        rig.write(third)
        nothing_forwarded(rig)
        assert rig.stack.stats()["drop_fragment"] == 1


def test_two_different_ends_discard_the_datagram(tmp_path: Path) -> None:
    first, _second, last = v4_fragments(packets.udp(APP, 5003, DST, 53, bytes(3000)), 1480)
    shorter_end = packets.ipv4(APP, DST, packets.UDP, bytes(16), frag=1480 // 8, ident=0x4242)
    with stack_rig(tmp_path) as rig:
        rig.write(last)
        rig.write(shorter_end)  # says the datagram ends 1,496 bytes in; the last said 3,008
        rig.write(first)
        nothing_forwarded(rig)
        assert rig.stack.stats()["drop_fragment"] == 1


def test_a_middle_fragment_of_odd_length_is_discarded(tmp_path: Path) -> None:
    odd = packets.ipv4(APP, DST, packets.UDP, bytes(13), frag=MF, ident=9)
    with stack_rig(tmp_path) as rig:
        rig.write(odd)
        nothing_forwarded(rig)
        assert rig.stack.stats()["drop_fragment"] == 1


def test_a_full_table_pushes_out_the_oldest(tmp_path: Path) -> None:
    slots = 16  # TUNIO_REASM_SLOTS
    with stack_rig(tmp_path) as rig:
        halves = []
        for i in range(slots + 1):
            first, last = v4_fragments(packets.udp(APP, 6000 + i, DST, 53, bytes(2000)), 1480,
                                       ident=100 + i)  # fmt: skip
            rig.write(first)
            halves.append(last)
        nothing_forwarded(rig)
        assert rig.stack.stats()["drop_fragment"] == 1  # the first datagram made room
        rig.write(halves[-1])  # the newest is still there and completes
        expect_datagram(rig, bytes(2000))


def test_a_syn_too_long_to_release_is_refused_not_held(tmp_path: Path) -> None:
    """A reassembled IPv6 SYN of 65,575 bytes (a 65,535-byte payload) parses, but no TUN write
    could carry it back after its dial: the app gets its RST at once, no worker an OPEN, and no
    NAT entry is left holding a place."""
    syn = packets.tcp(APP6, 41000, DST6, 80, flags=packets.SYN, payload=bytes(65515))
    assert len(syn) == 40 + 65535
    body = syn[40:]
    frags = []
    for off in range(0, len(body), 1448):
        more = int(off + 1448 < len(body))
        frag = struct.pack("!BBHI", packets.TCP, 0, off | more, 0x5151)
        frags.append(packets.ipv6(APP6, DST6, packets.TCP, body[off : off + 1448],
                                  extensions=frag, first_next=44))  # fmt: skip
    with stack_rig(tmp_path) as rig:
        for frag in frags:
            rig.write(frag)
        rst = rig.read()
        assert (rst.dport, rst.flags & packets.RST) == (41000, packets.RST)
        assert rig.stack.stats()["flows_active"] == 0
        msg = rig.open(41001, 80, app=APP6, dst=DST6)  # a SYN of the usual size is held
        assert msg.cmd is wire.Cmd.OPEN
