"""The C stack's packet path, through a socketpair in place of a TUN queue: connect semantics,
address translation with correct checksums, answers to strays, and bad input."""

from __future__ import annotations

import errno
import ipaddress
import random
from pathlib import Path

import pytest

from tunio import wire
from tunio.testing import packets
from tunio.testing.stackrig import APP, APP6, DST, WINDOW, pool_of, stack_rig

in_pool = pool_of()


def test_open_names_the_flow_and_release_rewrites_the_syn(tmp_path: Path) -> None:
    with stack_rig(tmp_path) as rig:
        msg = rig.open(40000, 8080, seq=5000)
        assert msg.flow != 0
        assert msg.arg == WINDOW
        assert msg.payload is not None
        addr = wire.AddressBlock.unpack(msg.payload)
        assert (addr.proto, addr.version) == (6, 4)
        assert (str(addr.src), addr.src_port) == (APP, 40000)
        assert (str(addr.dst), addr.dst_port) == (DST, 8080)

        rig.send(wire.Cmd.OPEN_OK, msg.flow, WINDOW)
        syn = rig.read()
        assert syn.checksums_ok
        assert (syn.dst, syn.dport) == (APP, rig.stack.listen_port)
        assert in_pool(syn.src)
        assert (syn.flags, syn.seq) == (packets.SYN, 5000)
        assert syn.options == packets.SYN_OPTIONS  # MSS, SACK, timestamps, wscale untouched

        # The listener's SYN-ACK goes back to the app as coming from the destination.
        rig.write(packets.tcp(APP, rig.stack.listen_port, syn.src, syn.sport,
                              flags=packets.SYN | packets.ACK, seq=9000, ack=5001,
                              payload=b"", options=packets.SYN_OPTIONS))
        synack = rig.read()
        assert synack.checksums_ok
        assert (synack.src, synack.sport, synack.dst, synack.dport) == (DST, 8080, APP, 40000)
        assert (synack.seq, synack.ack) == (9000, 5001)

        # Later app segments follow the same mapping, payload intact.
        rig.write(packets.tcp(APP, 40000, DST, 8080, flags=packets.ACK | packets.PSH,
                              seq=5001, ack=9001, payload=b"GET / HTTP/1.0\r\n\r\n"))
        seg = rig.read()
        assert seg.checksums_ok
        assert (seg.src, seg.sport) == (syn.src, syn.sport)
        assert seg.payload == b"GET / HTTP/1.0\r\n\r\n"


@pytest.mark.parametrize("err", [errno.ECONNREFUSED, errno.EACCES, errno.ECONNABORTED])
def test_refused_dial_answers_the_syn_with_a_rst(tmp_path: Path, err: int) -> None:
    # A refusal, a refusal by policy (a proxy's rules or credentials) and any other failure.
    with stack_rig(tmp_path) as rig:
        msg = rig.open(40001, 81, seq=777)
        rig.send(wire.Cmd.OPEN_FAIL, msg.flow, err)
        rst = rig.read()
        assert rst.checksums_ok
        assert (rst.src, rst.sport, rst.dst, rst.dport) == (DST, 81, APP, 40001)
        assert rst.flags == packets.RST | packets.ACK
        assert rst.ack == 778  # SYN counts as one


@pytest.mark.parametrize(("err", "code"), [(errno.EHOSTUNREACH, 1), (errno.ENETUNREACH, 0)])
def test_unreachable_dial_answers_with_icmp(tmp_path: Path, err: int, code: int) -> None:
    with stack_rig(tmp_path) as rig:
        syn = rig.syn(40002, 82)
        rig.write(syn)
        msg = rig.recv()
        rig.send(wire.Cmd.OPEN_FAIL, msg.flow, err)
        icmp = rig.read()
        assert icmp.checksums_ok
        assert (icmp.proto, icmp.icmp_type, icmp.icmp_code) == (packets.ICMP, 3, code)
        assert (icmp.src, icmp.dst) == (DST, APP)
        assert icmp.payload == syn[: len(icmp.payload)]  # quotes the app's own SYN
        assert len(icmp.payload) >= 28


def test_timed_out_dial_is_silent_and_swallows_retransmits(tmp_path: Path) -> None:
    with stack_rig(tmp_path) as rig:
        msg = rig.open(40003, 83)
        rig.send(wire.Cmd.OPEN_FAIL, msg.flow, errno.ETIMEDOUT)
        rig.wait_stat("dial_failed", 1)
        rig.write(rig.syn(40003, 83))  # the app's retransmit
        probe = rig.probe()
        assert (probe.sport, probe.flags) == (9, packets.RST)  # nothing came before it
        assert rig.stack.stats()["flows_opened"] == 1


def test_retransmitted_syn_while_dialing_opens_nothing_new(tmp_path: Path) -> None:
    with stack_rig(tmp_path) as rig:
        msg = rig.open(40004, 84)
        rig.write(rig.syn(40004, 84))
        rig.write(rig.syn(40005, 84))
        second = rig.recv()
        assert second.cmd is wire.Cmd.OPEN
        assert wire.AddressBlock.unpack(second.payload or b"").src_port == 40005
        assert second.flow != msg.flow


def test_stray_segment_of_unknown_flow_gets_rst(tmp_path: Path) -> None:
    with stack_rig(tmp_path) as rig:
        rig.write(packets.tcp(APP, 40010, DST, 85, flags=packets.ACK, seq=1, ack=424242))
        rst = rig.read()
        assert rst.checksums_ok
        assert (rst.flags, rst.seq) == (packets.RST, 424242)
        assert (rst.src, rst.sport, rst.dst, rst.dport) == (DST, 85, APP, 40010)
        # A RST is never answered.
        rig.write(packets.tcp(APP, 40011, DST, 85, flags=packets.RST, seq=1))
        assert rig.probe().sport == 9
        assert rig.stack.stats()["rst_unknown_flow"] == 2


def _malformed() -> dict[str, tuple[bytes, str]]:
    good = packets.tcp(APP, 40020, DST, 86, flags=packets.SYN)
    bad_ihl = bytes([0x43]) + good[1:]
    long_total = good[:2] + (len(good) + 100).to_bytes(2, "big") + good[4:]
    frag = packets.ipv4(APP, DST, packets.TCP, good[20:], frag=0x2000)
    short_tcp = packets.ipv4(APP, DST, packets.TCP, good[20:30])
    bad_doff = good[:32] + bytes([0x20]) + good[33:]
    v6_no_next = bytes([0x60, 0, 0, 0, 0, 0, 59, 64]) + bytes(32)  # "no next header"
    return {
        "empty-ish": (b"\x45", "drop_truncated"),
        "truncated-ip": (good[:15], "drop_truncated"),
        "bad-ihl": (bad_ihl, "drop_bad_header"),
        "total-length-beyond-read": (long_total, "drop_truncated"),
        "fragment-not-8-byte-aligned": (frag, "drop_fragment"),  # more follow, 20 bytes
        "short-tcp": (short_tcp, "drop_truncated"),
        "bad-data-offset": (bad_doff, "drop_bad_header"),
        "ipv6-no-next-header": (v6_no_next, "drop_unsupported"),
        "ipv6-truncated-extension": (bytes([0x60, 0, 0, 0, 0, 4, 0, 64]) + bytes(36),
                                     "drop_truncated"),
        "icmp": (packets.ipv4(APP, DST, packets.ICMP, bytes(8)), "drop_unsupported"),
        "version-9": (bytes([0x95]) + bytes(30), "drop_bad_header"),
        # noise whose first nibble is neither 4 nor 6
        "noise": (bytes([0x0F]) + random.Random(7).randbytes(99), "drop_bad_header"),
    }


def test_malformed_packets_are_counted_and_dropped(tmp_path: Path) -> None:
    cases = _malformed()
    with stack_rig(tmp_path) as rig:
        expected = dict.fromkeys(("drop_truncated", "drop_bad_header", "drop_fragment",
                                  "drop_unsupported"), 0)
        for pkt, counter in cases.values():
            rig.write(pkt)
            expected[counter] += 1
        probe = rig.probe()
        assert probe.sport == 9  # nothing was written for any of them
        stats = rig.stack.stats()
        assert {k: stats[k] for k in expected} == expected
        # and the stack still forwards
        msg = rig.open(40030, 87)
        rig.send(wire.Cmd.OPEN_OK, msg.flow, WINDOW)
        assert rig.read().flags == packets.SYN


def test_traffic_to_the_stack_s_own_addresses_is_dropped(tmp_path: Path) -> None:
    with stack_rig(tmp_path) as rig:
        top = ipaddress.IPv4Address("127.255.255.254")
        rig.write(packets.tcp(APP, 40040, str(top), 80, flags=packets.SYN))
        assert rig.probe().sport == 9
        assert rig.stack.stats()["drop_reserved"] == 1


def test_no_worker_refuses_at_once(tmp_path: Path) -> None:
    with stack_rig(tmp_path) as rig:
        rig.send(wire.Cmd.BYE)
        rig.wait_stat("workers", 0)
        rig.write(rig.syn(40050, 88))
        rst = rig.read()
        assert rst.flags == packets.RST | packets.ACK
        assert rig.stack.stats()["no_worker"] == 1


def test_silent_worker_is_declared_dead_and_its_held_syn_refused(tmp_path: Path) -> None:
    with stack_rig(tmp_path, heartbeat_interval=0.1) as rig:
        rig.open(40060, 89)
        # The test worker never answers heartbeats: after 3 intervals it is dead.
        rst = rig.read()
        assert (rst.dport, rst.flags) == (40060, packets.RST | packets.ACK)
        assert rig.stack.stats()["workers_lost"] == 1


def test_data_for_unknown_flow_is_reset(tmp_path: Path) -> None:
    with stack_rig(tmp_path) as rig:
        rig.send(wire.Cmd.DATA, 123456, 0, b"late")
        msg = rig.recv()
        assert (msg.cmd, msg.flow) == (wire.Cmd.RST, 123456)


def test_other_protocol_version_gets_bye(tmp_path: Path) -> None:
    with stack_rig(tmp_path) as rig:
        peer = rig.ctx.socket(__import__("zmq").DEALER)
        peer.linger = 0
        peer.connect(rig.endpoint)
        peer.send_multipart([bytes([wire.VERSION + 1, 1]) + bytes(14), b"future-worker"])
        assert peer.poll(5000)
        frames = peer.recv_multipart()
        assert frames[0][:2] == bytes([wire.VERSION, wire.Cmd.BYE])
        assert int.from_bytes(frames[0][8:16], "big") == errno.EPROTONOSUPPORT
        assert rig.stack.stats()["protocol_errors"] == 1
        peer.close()


def test_worker_data_beyond_the_window_resets_the_flow(tmp_path: Path) -> None:
    with stack_rig(tmp_path) as rig:
        msg = rig.open(40070, 90)
        rig.send(wire.Cmd.OPEN_OK, msg.flow, WINDOW)
        rig.read()  # the released SYN; the flow is never accepted here
        rig.send(wire.Cmd.DATA, msg.flow, 0, b"x" * WINDOW)
        rig.send(wire.Cmd.DATA, msg.flow, 0, b"y")
        reply = rig.recv()
        assert (reply.cmd, reply.flow, reply.arg) == (wire.Cmd.RST, msg.flow, errno.EPROTO)


# Destinations no router forwards to. A flow there would reach the gateway's own loopback
# services (127.0.0.53 is a host's resolver; ::ffff:127.0.0.1 is IPv4's loopback to a
# dual-stack socket) or its LAN's multicast groups. The rig's own addresses are in 127.0.0.0/8,
# so these are other ones of it.
MARTIANS = ("127.0.0.53", "127.1.2.3", "0.0.0.0", "0.1.2.3", "224.0.0.251", "239.255.255.250",
            "255.255.255.255", "::1", "::", "ff02::fb", "ff05::1:3", "::ffff:127.0.0.1",
            "::ffff:192.0.2.2")  # fmt: skip


def test_packets_to_martian_destinations_are_dropped_counted_and_never_dialed(
    tmp_path: Path,
) -> None:
    with stack_rig(tmp_path) as rig:
        for n, dst in enumerate(MARTIANS):
            app = APP6 if ":" in dst else APP
            rig.write(packets.tcp(app, 41000 + n, dst, 80, flags=packets.SYN,
                                  options=packets.SYN_OPTIONS))  # fmt: skip
            rig.write(packets.tcp(app, 41000 + n, dst, 80, flags=packets.ACK, seq=1, ack=1))
            rig.write(packets.udp(app, 42000 + n, dst, 53, b"query"))
            rig.write(packets.echo(app, dst, 43000 + n, 1, b"ping"))
        # Nothing went back into the TUN: not even the RST a stray ACK gets elsewhere.
        assert rig.probe().sport == 9
        assert rig.stack.stats()["drop_martian"] == 4 * len(MARTIANS)
        # Nothing reached the worker: the first messages it gets are those of the flows after.
        rig.write(packets.udp(APP, 42999, DST, 53, b"after"))
        dgram = rig.recv()
        assert dgram.cmd is wire.Cmd.DGRAM
        assert bytes(dgram.payload or b"")[40:] == b"after"
        opened = rig.open(41999, 80)
        block = wire.AddressBlock.unpack(bytes(opened.payload or b""))
        assert (str(block.dst), block.src_port) == (DST, 41999)
        stats = rig.stack.stats()
        assert (stats["flows_opened"], stats["udp_sessions_opened"]) == (1, 1)


def test_the_stacks_own_loopback_addresses_are_not_martians(tmp_path: Path) -> None:
    """The rig's TUN is 127.0.0.1/8: its listener and pool addresses are loopback ones, and a
    packet to them stays the reserved-address drop it was (an address of the stack is not a
    destination anywhere)."""
    pool = str(ipaddress.ip_network("127.0.0.0/8").broadcast_address - 1)
    assert in_pool(pool)
    with stack_rig(tmp_path) as rig:
        rig.write(packets.tcp(APP, 41500, APP, 80, flags=packets.SYN))
        rig.write(packets.tcp(APP, 41501, pool, 80, flags=packets.SYN))
        assert rig.probe().sport == 9
        stats = rig.stack.stats()
        assert (stats["drop_reserved"], stats["drop_martian"]) == (2, 0)
