"""The C stack's UDP sessions through a socketpair TUN queue: DGRAMs out with their address
block, replies built as IP/UDP packets with correct checksums, ICMP errors, credit, the bounds on
bytes in flight, and expiry."""

from __future__ import annotations

import errno
import ipaddress
from pathlib import Path

import pytest
from tunio._stack import lib

from tunio import wire
from tunio.stack import milliseconds
from tunio.testing import packets
from tunio.testing.stackrig import APP, APP6, DST, DST6, WINDOW, Rig, stack_rig


def _reply_block(sport: int, dport: int) -> bytes:
    return wire.AddressBlock(17, 4, ipaddress.IPv4Address(DST), dport,
                             ipaddress.IPv4Address(APP), sport).pack()


def test_datagram_goes_to_a_worker_with_its_tuple(tmp_path: Path) -> None:
    with stack_rig(tmp_path) as rig:
        rig.write(packets.udp(APP, 5353, DST, 53, b"\x12\x34query"))
        msg = rig.recv()
        assert msg.cmd is wire.Cmd.DGRAM
        assert msg.flow != 0
        payload = bytes(msg.payload or b"")
        block = wire.AddressBlock.unpack(payload)
        assert (block.proto, str(block.src), block.src_port) == (17, APP, 5353)
        assert (str(block.dst), block.dst_port) == (DST, 53)
        assert payload[40:] == b"\x12\x34query"
        # The same tuple stays one session; another source port is a new one.
        rig.write(packets.udp(APP, 5353, DST, 53, b"again"))
        rig.write(packets.udp(APP, 5354, DST, 53, b"other"))
        same, other = rig.recv(), rig.recv()
        assert same.flow == msg.flow
        assert other.flow not in (0, msg.flow)
        assert rig.stack.stats()["udp_sessions"] == 2


def test_reply_becomes_a_udp_packet_to_the_app(tmp_path: Path) -> None:
    with stack_rig(tmp_path) as rig:
        rig.write(packets.udp(APP, 40000, DST, 7, b"ping"))
        msg = rig.recv()
        data = bytes(range(256)) * 5 + b"end"
        rig.send(wire.Cmd.DGRAM, msg.flow, 0, _reply_block(40000, 7) + data)
        pkt = rig.read()
        assert pkt.checksums_ok
        assert (pkt.proto, pkt.src, pkt.dst) == (packets.UDP, DST, APP)
        assert pkt.payload[:8][:2] == (7).to_bytes(2, "big")
        assert pkt.payload[8:] == data  # parse() leaves the UDP header in the payload


def test_a_reply_goes_to_the_sessions_app_whatever_its_block_says(tmp_path: Path) -> None:
    """A worker naming another destination in a reply's block cannot address another socket of
    the host (a spoofed DNS answer to some resolver's port): the reply goes to the session's app."""
    with stack_rig(tmp_path) as rig:
        rig.write(packets.udp(APP, 40001, DST, 53, b"query"))
        msg = rig.recv()
        elsewhere = wire.AddressBlock(17, 4, ipaddress.IPv4Address(DST), 53,
                                      ipaddress.IPv4Address("192.0.2.9"), 5353).pack()
        rig.send(wire.Cmd.DGRAM, msg.flow, 0, elsewhere + b"answer")
        pkt = rig.read()
        assert pkt.checksums_ok
        assert (pkt.src, pkt.dst) == (DST, APP)
        assert pkt.payload[:4] == (53).to_bytes(2, "big") + (40001).to_bytes(2, "big")
        assert pkt.payload[8:] == b"answer"


def test_refused_session_answers_with_icmp_port_unreachable(tmp_path: Path) -> None:
    with stack_rig(tmp_path) as rig:
        rig.write(packets.udp(APP, 40001, DST, 9999, b"hello?"))
        msg = rig.recv()
        rig.send(wire.Cmd.RST, msg.flow, errno.ECONNREFUSED)
        icmp = rig.read()
        assert icmp.checksums_ok
        assert (icmp.icmp_type, icmp.icmp_code) == (3, 3)
        assert (icmp.src, icmp.dst) == (DST, APP)
        quoted = packets.parse(icmp.payload)
        assert (quoted.src, quoted.dst, quoted.proto) == (APP, DST, packets.UDP)
        assert icmp.payload[20:24] == (40001).to_bytes(2, "big") + (9999).to_bytes(2, "big")
        rig.wait_stat("udp_sessions", 0)


def test_credit_bounds_datagrams_in_flight(tmp_path: Path) -> None:
    with stack_rig(tmp_path) as rig:
        for i in range(300):
            rig.write(packets.udp(APP, 40002, DST, 7, i.to_bytes(2, "big")))
        got = [rig.recv() for _ in range(256)]
        assert [bytes(m.payload or b"")[40:] for m in got] == [
            i.to_bytes(2, "big") for i in range(256)]  # in order, none lost before the limit
        rig.wait_stat("udp_dropped", 44)
        rig.send(wire.Cmd.CREDIT, got[0].flow, 10)
        # The credit and the next datagram take different paths into the stack: wait until the
        # stack has handled the credit (DATA for no flow is answered after it, in order).
        rig.send(wire.Cmd.DATA, 4242, 0, b"sync")
        assert (rig.recv().cmd, 4242) == (wire.Cmd.RST, 4242)
        rig.write(packets.udp(APP, 40002, DST, 7, b"after"))
        assert bytes(rig.recv().payload or b"")[40:] == b"after"


BIG = 60_000  # a reassembled datagram's size; the rig's socketpair takes it in one write
#: what one BIG datagram counts against the byte bounds: its DGRAM payload frame and the overhead
COST = wire.ADDRESS.size + BIG + lib.TUNIO_UDP_DGRAM_OVERHEAD


def _big(i: int) -> bytes:
    return i.to_bytes(2, "big") + bytes(BIG - 2)


def _index(msg: wire.Message) -> int:
    payload = bytes(msg.payload or b"")
    assert msg.cmd is wire.Cmd.DGRAM
    assert len(payload) == wire.ADDRESS.size + BIG
    return int.from_bytes(payload[40:42], "big")


def _sync(rig: Rig) -> None:
    """Waits until the stack has handled what the worker sent so far: DATA for no flow is
    answered with RST after it, in order (a datagram written next takes another path in)."""
    rig.send(wire.Cmd.DATA, 4242, 0, b"sync")
    assert (rig.recv().cmd, 4242) == (wire.Cmd.RST, 4242)


def test_bytes_in_flight_bound_a_session(tmp_path: Path) -> None:
    """Large datagrams stop at the session's byte bound, long before its credit of 256 is spent,
    and go again when the worker credits them back."""
    fits = lib.TUNIO_UDP_SESSION_BYTES // COST
    assert 1 < fits < lib.TUNIO_UDP_CREDIT
    with stack_rig(tmp_path) as rig:
        for i in range(fits + 3):
            rig.write(packets.udp(APP, 40010, DST, 7, _big(i)))
        got = [rig.recv() for _ in range(fits)]
        assert [_index(m) for m in got] == list(range(fits))
        rig.wait_stat("udp_dropped", 3)
        stats = rig.stack.stats()
        assert (stats["udp_to_workers"], stats["udp_dropped_backlog"]) == (fits, 3)
        assert stats["udp_backlog_bytes"] == fits * COST
        rig.send(wire.Cmd.CREDIT, got[0].flow, 5)  # the oldest five are handled
        _sync(rig)
        assert rig.stack.stats()["udp_backlog_bytes"] == (fits - 5) * COST
        for i in range(100, 106):
            rig.write(packets.udp(APP, 40010, DST, 7, _big(i)))
        assert [_index(rig.recv()) for _ in range(5)] == list(range(100, 105))
        rig.wait_stat("udp_dropped", 4)
        stats = rig.stack.stats()
        assert (stats["udp_to_workers"], stats["udp_dropped_backlog"]) == (fits + 5, 4)
        assert stats["udp_backlog_bytes"] == fits * COST


def test_bytes_in_flight_bound_a_worker_whatever_the_sessions(tmp_path: Path) -> None:
    """Many sessions' large datagrams stop at --worker-backlog, all sessions together; a new
    session is not even opened past it. Credit and ended sessions give the bytes back."""
    with stack_rig(tmp_path, worker_backlog=5 * COST) as rig:
        for port in range(41000, 41010):  # two datagrams each, one session after the other
            for i in range(2):
                rig.write(packets.udp(APP, port, DST, 7, _big(2 * (port - 41000) + i)))
        got = [rig.recv() for _ in range(5)]
        assert [_index(m) for m in got] == [0, 1, 2, 3, 4]  # sessions 0 and 1, and 2's first
        rig.wait_stat("udp_dropped", 15)
        stats = rig.stack.stats()
        assert (stats["udp_to_workers"], stats["udp_dropped_backlog"]) == (5, 15)
        assert (stats["udp_backlog_bytes"], stats["udp_sessions"]) == (5 * COST, 3)
        flows = [got[0].flow, got[2].flow, got[4].flow]
        # Credit makes room for one more, here a new session's.
        rig.send(wire.Cmd.CREDIT, flows[0], 1)
        _sync(rig)
        rig.write(packets.udp(APP, 41100, DST, 7, _big(100)))
        rig.write(packets.udp(APP, 41101, DST, 7, _big(101)))
        assert _index(rig.recv()) == 100
        rig.wait_stat("udp_dropped", 16)
        assert rig.stack.stats()["udp_backlog_bytes"] == 5 * COST
        # Sessions 0 (one in flight) and 1 (two) end: their three go back to the worker's room.
        rig.send(wire.Cmd.RST, flows[0])
        rig.send(wire.Cmd.RST, flows[1])
        _sync(rig)
        stats = rig.stack.stats()
        assert (stats["udp_backlog_bytes"], stats["udp_sessions"]) == (2 * COST, 2)
        for n in range(4):
            rig.write(packets.udp(APP, 41200 + n, DST, 7, _big(200 + n)))
        assert [_index(rig.recv()) for _ in range(3)] == [200, 201, 202]
        rig.wait_stat("udp_dropped", 17)
        stats = rig.stack.stats()
        assert (stats["udp_to_workers"], stats["udp_dropped_backlog"]) == (9, 17)
        assert (stats["udp_backlog_bytes"], stats["udp_sessions"]) == (5 * COST, 5)
        # A lost worker's sessions end with it, and nothing of theirs stays counted.
        rig.send(wire.Cmd.BYE)
        rig.wait_stat("udp_sessions", 0)
        assert rig.stack.stats()["udp_backlog_bytes"] == 0


def test_a_datagram_larger_than_the_worker_bound_goes_when_none_is_in_flight(
        tmp_path: Path) -> None:  # fmt: skip
    largest = 65_535 - 20 - 8  # an IPv4 datagram's most
    with stack_rig(tmp_path, worker_backlog=WINDOW) as rig:
        assert wire.ADDRESS.size + largest > WINDOW
        rig.write(packets.udp(APP, 40020, DST, 7, bytes(largest)))
        rig.write(packets.udp(APP, 40020, DST, 7, bytes(largest)))
        msg = rig.recv()
        assert len(bytes(msg.payload or b"")) == wire.ADDRESS.size + largest
        rig.wait_stat("udp_dropped_backlog", 1)
        rig.send(wire.Cmd.CREDIT, msg.flow, 1)
        _sync(rig)
        assert rig.stack.stats()["udp_backlog_bytes"] == 0
        rig.write(packets.udp(APP, 40020, DST, 7, b"small"))
        assert bytes(rig.recv().payload or b"")[40:] == b"small"


def test_idle_session_expires_with_rst_to_the_worker(tmp_path: Path) -> None:
    with stack_rig(tmp_path, udp_timeout=0.3) as rig:
        rig.write(packets.udp(APP, 40003, DST, 7, b"x"))
        msg = rig.recv()
        end = rig.recv()
        assert (end.cmd, end.flow, end.arg) == (wire.Cmd.RST, msg.flow, 0)
        assert rig.stack.stats()["udp_sessions"] == 0


def test_reply_for_unknown_session_is_reset(tmp_path: Path) -> None:
    with stack_rig(tmp_path) as rig:
        rig.send(wire.Cmd.DGRAM, 999, 0, _reply_block(1, 2) + b"late")
        msg = rig.recv()
        assert (msg.cmd, msg.flow) == (wire.Cmd.RST, 999)


def _destination_options(next_header: int, size: int) -> bytes:
    # a destination options header of `size` bytes (a multiple of 8): PadN fills it
    assert size % 8 == 0
    assert 8 <= size <= 2048
    options, left = b"", size - 2
    while left:  # PadN options of at most 255 bytes of padding each
        take = min(left, 257)
        if left - take == 1:
            take -= 2  # (a PadN needs two bytes of its own)
        options += bytes([1, take - 2]) + bytes(take - 2)
        left -= take
    return bytes([next_header, size // 8 - 1]) + options


@pytest.mark.parametrize("ext_size", [200, 1600], ids=["quoted-whole", "quoted-cut-to-1280"])
def test_icmp_errors_quote_long_extension_headers(tmp_path: Path, ext_size: int) -> None:
    """A datagram behind long IPv6 extension headers still gets its ICMPv6 error (here: a new
    session past --max-flows): all of its headers quoted when they fit, else as much as 1280
    bytes in all carry (RFC 4443 2.4)."""
    with stack_rig(tmp_path, max_flows=1, max_pending=1) as rig:
        rig.write(packets.udp(APP6, 40010, DST6, 9998, b"first"))
        assert bytes(rig.recv().payload or b"")[wire.ADDRESS.size :] == b"first"  # the one flow
        dgram = packets.udp(APP6, 40011, DST6, 9999, b"hello?")[40:]
        ext = _destination_options(packets.UDP, ext_size)
        pkt = packets.ipv6(APP6, DST6, packets.UDP, dgram, extensions=ext, first_next=60)
        rig.write(pkt)
        icmp = rig.read()
        assert icmp.checksums_ok
        assert (icmp.proto, icmp.icmp_type, icmp.icmp_code) == (packets.ICMPV6, 1, 4)
        assert (icmp.src, icmp.dst) == (DST6, APP6)
        quoted = icmp.payload  # the offending packet, from its first byte
        if 48 + len(pkt) <= 1280:
            assert quoted == pkt
        else:
            assert 48 + len(quoted) == 1280
            assert quoted == pkt[: len(quoted)]


def test_a_time_under_a_millisecond_is_one_not_the_default() -> None:
    assert milliseconds(0.0004) == 1  # 0 would be the C configuration's default (60 s, UDP)
    assert milliseconds(0.0) == 0
    assert milliseconds(2.5) == 2500
    assert milliseconds(0.0016) == 2
