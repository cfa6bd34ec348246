"""ICMP echo through the C stack: requests go to a worker as datagram sessions keyed by the echo
identifier; replies come back with the app's identifier, for IPv4 and IPv6."""

from __future__ import annotations

import errno
import ipaddress
from pathlib import Path

import pytest

from tunio import wire
from tunio.testing import packets
from tunio.testing.stackrig import APP, APP6, DST, DST6, stack_rig


@pytest.mark.parametrize(("app", "dst", "proto", "echo_type", "reply"),
                         [(APP, DST, packets.ICMP, 8, 0),
                          (APP6, DST6, packets.ICMPV6, 128, 129)])
def test_echo_goes_to_a_worker_and_the_reply_comes_back(
    tmp_path: Path, app: str, dst: str, proto: int, echo_type: int, reply: int
) -> None:
    with stack_rig(tmp_path) as rig:
        rig.write(packets.echo(app, dst, 0x4242, 7, b"ping data"))
        msg = rig.recv()
        assert msg.cmd is wire.Cmd.DGRAM
        payload = bytes(msg.payload or b"")
        block = wire.AddressBlock.unpack(payload)
        assert (block.proto, str(block.src), block.src_port) == (proto, app, 0x4242)
        assert (str(block.dst), block.dst_port) == (dst, 0)
        assert payload[40] == echo_type  # the whole ICMP message follows the block
        assert payload[44:] == b"\x42\x42\x00\x07ping data"

        # A ping socket's kernel picks its own identifier: the stack puts the app's back.
        worker_reply = bytes([reply, 0, 0, 0, 0x99, 0x99, 0, 7]) + b"ping data"
        ip = ipaddress.ip_address
        back = wire.AddressBlock(proto, block.version, ip(dst), 0, ip(app), 0x4242).pack()
        rig.send(wire.Cmd.DGRAM, msg.flow, 0, back + worker_reply)
        pkt = rig.read()
        assert pkt.checksums_ok
        assert (pkt.src, pkt.dst, pkt.proto, pkt.icmp_type) == (dst, app, proto, reply)
        assert (pkt.sport, pkt.dport, pkt.payload) == (0x4242, 7, b"ping data")

        # Another identifier is another session; the same one stays in its session.
        rig.write(packets.echo(app, dst, 0x4242, 8))
        rig.write(packets.echo(app, dst, 0x5151, 1))
        same, other = rig.recv(), rig.recv()
        assert same.flow == msg.flow
        assert other.flow != msg.flow


def test_unreachable_ping_gets_icmp_unreachable(tmp_path: Path) -> None:
    with stack_rig(tmp_path) as rig:
        rig.write(packets.echo(APP, DST, 0x0101, 1))
        msg = rig.recv()
        rig.write(packets.echo(APP, DST, 0x0101, 2))
        rig.recv()
        rig.send(wire.Cmd.RST, msg.flow, errno.EHOSTUNREACH)
        icmp = rig.read()
        assert icmp.checksums_ok
        assert (icmp.icmp_type, icmp.icmp_code) == (3, 1)
        quoted = icmp.payload
        assert (quoted[9], quoted[20]) == (packets.ICMP, 8)  # quotes an echo request
        assert quoted[24:28] == b"\x01\x01\x00\x02"  # its identifier and the last sequence


def test_a_worker_s_non_echo_reply_is_dropped(tmp_path: Path) -> None:
    with stack_rig(tmp_path) as rig:
        rig.write(packets.echo(APP, DST, 0x0202, 1))
        msg = rig.recv()
        ip = ipaddress.ip_address
        back = wire.AddressBlock(packets.ICMP, 4, ip(DST), 0, ip(APP), 0x0202).pack()
        rig.send(wire.Cmd.DGRAM, msg.flow, 0, back + bytes([3, 1, 0, 0, 0, 0, 0, 0]))
        assert rig.probe().sport == 9  # nothing was built from it
        # the DGRAM reaches the loop thread by ZeroMQ, the probe a reader by the TUN: either may
        # be seen first, so the count is waited for (bounded), not read at once
        rig.wait_stat("protocol_errors", 1)


def test_other_icmp_messages_are_not_carried(tmp_path: Path) -> None:
    with stack_rig(tmp_path) as rig:
        rig.write(packets.echo(APP, DST, 1, 1, reply=True))  # an echo reply from the app
        rig.write(packets.ipv4(APP, DST, packets.ICMP, bytes([13, 0, 0, 0]) + bytes(16)))
        assert rig.probe().sport == 9
        assert rig.stack.stats()["drop_unsupported"] == 2
