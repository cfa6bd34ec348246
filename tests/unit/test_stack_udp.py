"""The C stack's UDP sessions through a socketpair TUN queue: DGRAMs out with their address
block, replies built as IP/UDP packets with correct checksums, ICMP errors, credit and expiry."""

from __future__ import annotations

import errno
import ipaddress
from pathlib import Path

from tunio import wire
from tunio.testing import packets
from tunio.testing.stackrig import APP, DST, stack_rig


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
                                      ipaddress.IPv4Address("127.0.0.9"), 5353).pack()
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
