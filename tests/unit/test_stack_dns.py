"""The C stack's DNS (--dns), through a socketpair TUN and the test as its worker: A/AAAA answered
from the fake-IP pool, recycling and its limits, NAME before a fake address's OPEN, other queries
sent to the upstream with the reply's source put back, the same over TCP (framed, pipelined, the
upstream dialled only for what it must answer), and the map adopted from the region by the next
stack."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lab.netlab import recv_exact

from tunio import wire
from tunio.dialers.resolve import TYPE_A, TYPE_AAAA, parse_answer, query
from tunio.stack import StackConfig, create_nat_region
from tunio.testing import packets
from tunio.testing.stackrig import APP, WINDOW, Rig, stack_rig

POOL = ipaddress.ip_network("198.18.64.0/28")  # 14 usable addresses
POOL6 = ipaddress.ip_network("fd00:7475::/124")
DNS = ipaddress.ip_address("192.0.2.53")
UPSTREAM = (ipaddress.ip_address("127.0.0.9"), 5353)
TYPE_MX = 15
TYPE_TXT = 16


def dns_fields(**extra: Any) -> dict[str, Any]:
    fields = {"dns_mode": "fake-ip", "dns_pools": (POOL, POOL6), "dns_addresses": (DNS,),
              "dns_upstream": UPSTREAM, "dns_ttl": 0, "dns_hold": 0.0}  # fmt: skip
    fields.update(extra)
    return fields


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    with stack_rig(tmp_path, features=wire.FEATURE_NAMES, **dns_fields()) as r:
        yield r


def read_udp(rig: Rig) -> tuple[str, int, str, int, bytes]:
    """The next packet out, a UDP datagram: (src, sport, dst, dport, data); checksums right."""
    pkt = rig.read()
    assert pkt.proto == 17
    assert pkt.checksums_ok
    sport, dport, length, _ = struct.unpack_from("!HHHH", pkt.payload)
    assert length == len(pkt.payload)
    return pkt.src, sport, pkt.dst, dport, pkt.payload[8:]


def ask(rig: Rig, name: str, qtype: int = TYPE_A, qid: int = 7, sport: int = 5353
        ) -> tuple[int, list[str], bytes]:  # fmt: skip
    rig.write(packets.udp(APP, sport, str(DNS), 53, query(name, qtype, qid)))
    src, got_sport, dst, dport, data = read_udp(rig)
    assert (src, got_sport, dst, dport) == (str(DNS), 53, APP, sport)
    rcode, found, _, _ = parse_answer(data, qid, qtype)
    return rcode, found, data


def test_a_and_aaaa_come_from_the_pool_one_index_per_name(rig: Rig) -> None:
    rcode, [a], _ = ask(rig, "www.tunio.test")
    assert rcode == 0
    assert ipaddress.ip_address(a) == POOL[1]  # the first usable address
    _, [a6], _ = ask(rig, "WWW.TUNIO.TEST", TYPE_AAAA)
    assert ipaddress.ip_address(a6) == POOL6[1]
    assert ask(rig, "other.tunio.test")[1] == [str(POOL[2])]
    assert ask(rig, "www.tunio.test")[1] == [a]
    stats = rig.stack.stats()
    assert (stats["dns_answered"], stats["dns_map_entries"]) == (4, 2)


def test_the_pool_is_recycled_least_recently_used_first(rig: Rig) -> None:
    first = ask(rig, "n0.tunio.test")[1]
    for i in range(1, 14):
        ask(rig, f"n{i}.tunio.test")
    ask(rig, "n0.tunio.test")  # n0 used again: n1 is now the least recently used
    got = ask(rig, "n14.tunio.test")[1]
    assert got == ask(rig, "n14.tunio.test")[1]
    assert got != first
    assert ask(rig, "n0.tunio.test")[1] == first  # kept
    stats = rig.stack.stats()
    assert (stats["dns_recycled"], stats["dns_map_entries"]) == (1, 14)
    assert ask(rig, "n1.tunio.test")[1] != []  # n1 lost its address: it gets another


def test_a_pool_held_within_the_ttl_and_hold_answers_servfail(tmp_path: Path) -> None:
    with stack_rig(tmp_path, features=wire.FEATURE_NAMES, **dns_fields(dns_hold=600.0)) as rig:
        for i in range(14):
            assert ask(rig, f"n{i}.tunio.test")[0] == 0
        rcode, found, _ = ask(rig, "n14.tunio.test")
        assert (rcode, found) == (2, [])  # SERVFAIL, nothing taken
        assert ask(rig, "n3.tunio.test")[1] == [str(POOL[4])]  # still its own
        stats = rig.stack.stats()
        assert (stats["dns_pool_full"], stats["dns_recycled"]) == (1, 0)


def test_a_flow_to_a_fake_address_sends_its_name_first_and_holds_it(rig: Rig) -> None:
    _, [a], _ = ask(rig, "held.tunio.test")
    rig.write(rig.syn(40000, 443, dst=a))
    name = rig.recv()
    assert (name.cmd, bytes(name.payload or b"")) == (wire.Cmd.NAME, b"held.tunio.test")
    opened = rig.recv()
    assert opened.cmd is wire.Cmd.OPEN
    assert opened.flow == name.flow
    assert opened.payload is not None
    assert str(wire.AddressBlock.unpack(opened.payload).dst) == a
    for i in range(20):  # with the flow pending, its address is never given away
        assert ask(rig, f"n{i}.tunio.test")[1] != [a]
    assert ask(rig, "held.tunio.test")[1] == [a]


def test_a_flow_to_a_fake_address_no_name_has_is_unreachable(rig: Rig) -> None:
    rig.write(rig.syn(40001, 443, dst=str(POOL[9])))
    reply = rig.read()
    assert (reply.proto, reply.icmp_type, reply.icmp_code) == (1, 3, 1)  # host unreachable


def test_a_worker_without_names_gets_no_fake_flow(tmp_path: Path) -> None:
    with stack_rig(tmp_path, **dns_fields()) as rig:  # its HELLO says no NAME
        _, [a], _ = ask(rig, "www.tunio.test")
        rig.write(rig.syn(40002, 443, dst=a))
        reply = rig.read()
        assert reply.proto == 6
        assert reply.flags & packets.RST


def drain(rig: Rig, sock: Any) -> None:
    """`sock`'s worker says DRAIN; a protocol error sent after it (an OPEN from a worker) tells
    when the stack has taken it, since one worker's messages are handled in order."""
    errors = rig.stack.stats()["protocol_errors"]
    rig.send(wire.Cmd.DRAIN, sock=sock)
    rig.send(wire.Cmd.OPEN, 1, 0, bytes(wire.ADDRESS.size), sock=sock)
    rig.wait_stat("protocol_errors", errors + 1)


def test_a_draining_worker_gets_no_fake_flow_another_taking_names_does(rig: Rig) -> None:
    fresh = rig.connect_worker(b"fresh", features=wire.FEATURE_NAMES)
    drain(rig, rig.worker)
    _, [a], _ = ask(rig, "drained.tunio.test")
    rig.write(rig.syn(40003, 443, dst=a))
    name = rig.recv(fresh)
    assert (name.cmd, bytes(name.payload or b"")) == (wire.Cmd.NAME, b"drained.tunio.test")
    assert rig.recv(fresh).cmd is wire.Cmd.OPEN
    assert not rig.worker.poll(100)  # nothing for the draining one


def test_a_fake_flow_with_only_a_draining_worker_taking_names_is_refused(rig: Rig) -> None:
    plain = rig.connect_worker(b"plain")  # takes no NAME
    drain(rig, rig.worker)
    _, [a], _ = ask(rig, "nobody.tunio.test")
    rig.write(rig.syn(40004, 443, dst=a))
    reply = rig.read()
    assert reply.proto == 6
    assert reply.flags & packets.RST
    rig.write(rig.syn(40005, 443))  # a flow to a real address: the plain worker takes it
    assert rig.recv(plain).cmd is wire.Cmd.OPEN
    assert not rig.worker.poll(100)  # nothing for the draining one


def test_other_queries_go_to_the_upstream_and_come_back_from_the_dns_address(rig: Rig) -> None:
    mx = query("tunio.test", TYPE_MX, 99)
    rig.write(packets.udp(APP, 5454, str(DNS), 53, mx))
    msg = rig.recv()
    assert msg.cmd is wire.Cmd.DGRAM
    assert msg.payload is not None
    block = wire.AddressBlock.unpack(msg.payload)
    assert (block.dst, block.dst_port) == UPSTREAM
    assert bytes(msg.payload[wire.ADDRESS.size :]) == mx
    answer = mx[:2] + b"\x81\x80" + mx[4:]
    back = wire.AddressBlock(17, 4, UPSTREAM[0], UPSTREAM[1], block.src, block.src_port)
    rig.send(wire.Cmd.DGRAM, msg.flow, 0, back.pack() + answer)
    assert read_udp(rig) == (str(DNS), 53, APP, 5454, answer)
    assert rig.stack.stats()["dns_forwarded"] == 1


def test_malformed_queries_get_formerr_or_nothing(rig: Rig) -> None:
    good = query("x.tunio.test", TYPE_A, 0x4242)
    rig.write(packets.udp(APP, 5353, str(DNS), 53, good[:4] + b"\0\2" + good[6:]))
    data = read_udp(rig)[4]
    assert data[:2] == b"\x42\x42"
    assert data[3] & 0xF == 1  # FORMERR
    assert struct.unpack_from(">H", data, 4)[0] == 0  # no question echoed
    rig.write(packets.udp(APP, 5353, str(DNS), 53, good[:20]))  # the question cut short
    assert read_udp(rig)[4][:4] == b"\x42\x42\x81\x81"  # FORMERR again
    for bad in (b"\1\2\3", good[:2] + b"\x81\x80" + good[4:]):  # dropped: no answer at all
        rig.write(packets.udp(APP, 5353, str(DNS), 53, bad))
    assert ask(rig, "x.tunio.test", qid=5)[0] == 0  # the next packet out is this answer
    stats = rig.stack.stats()
    assert (stats["dns_malformed"], stats["dns_map_entries"]) == (4, 1)


def test_the_next_stack_adopts_the_map_from_the_region(tmp_path: Path) -> None:
    probe = StackConfig(tun_fds=(0,), addresses=(ipaddress.IPv4Interface("127.0.0.1/8"),
                        ipaddress.IPv6Interface("fd00:18::1/64")), endpoint="ipc://x",
                        **dns_fields())  # fmt: skip
    region = create_nat_region(probe)
    try:
        with stack_rig(tmp_path, features=wire.FEATURE_NAMES, nat_region_fd=region,
                       **dns_fields()) as rig:  # fmt: skip
            before = {n: ask(rig, n)[1] for n in ("a.test", "b.test", "c.test")}
        with stack_rig(tmp_path, features=wire.FEATURE_NAMES, nat_region_fd=region,
                       **dns_fields()) as rig:  # fmt: skip
            assert rig.stack.stats()["dns_map_entries"] == 3
            assert {n: ask(rig, n)[1] for n in ("c.test", "b.test", "a.test")} == before
            assert ask(rig, "d.test")[1] == [str(POOL[4])]
    finally:
        os.close(region)


# ---------------------------------------------------------------- over TCP


def frame(msg: bytes) -> bytes:
    return struct.pack(">H", len(msg)) + msg


def read_message(sock: socket.socket) -> bytes:
    (length,) = struct.unpack(">H", recv_exact(sock, 2))
    return recv_exact(sock, length)


def answer_to(msg: bytes, extra: bytes = b"") -> bytes:
    """An upstream's answer to query `msg` (no records; `extra` makes it longer)."""
    return msg[:2] + b"\x81\x80" + msg[4:] + extra


def dns_connect(rig: Rig, sport: int) -> socket.socket:
    """A TCP connection to DNS:53, as the app's: its SYN is released at once (no OPEN), and the
    test's socket bound to the flow's NAT slot makes the handshake with the listener."""
    rig.write(rig.syn(sport, 53, dst=str(DNS)))
    syn = rig.read()
    assert syn.proto == 6
    assert syn.flags & packets.SYN
    assert not syn.flags & packets.ACK
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((syn.src, syn.sport))
    sock.settimeout(5)
    sock.connect(("127.0.0.1", rig.stack.listen_port))
    return sock


def test_tcp_a_and_aaaa_are_answered_here_as_over_udp_and_dial_nothing(rig: Rig) -> None:
    _, [a], udp_answer = ask(rig, "tcp.tunio.test", qid=11)
    with dns_connect(rig, 41000) as sock:
        q = frame(query("tcp.tunio.test", TYPE_A, 11))
        sock.sendall(q[:1])  # the length itself split, then the message in two
        sock.sendall(q[1:9])
        sock.sendall(q[9:] + frame(query("TCP.tunio.test", TYPE_AAAA, 12)))
        first, second = read_message(sock), read_message(sock)
        assert first == udp_answer  # byte for byte what UDP answered: address, TTL, question
        rcode, [a6], _, _ = parse_answer(second, 12, TYPE_AAAA)
        assert rcode == 0
        assert int(ipaddress.ip_address(a6)) - int(POOL6[0]) == (
            int(ipaddress.ip_address(a)) - int(POOL[0]))
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(1) == b""  # an orderly close once everything is answered
    assert not rig.worker.poll(100)  # no OPEN: nothing needed the upstream
    stats = rig.stack.stats()
    assert (stats["dns_answered"], stats["dns_forwarded"], stats["dns_map_entries"]) == (3, 0, 1)
    rig.wait_stat("flows_active", 0)


def test_tcp_pipelined_queries_other_types_go_upstream_answers_never_interleave(rig: Rig) -> None:
    mx, txt = query("tunio.test", TYPE_MX, 2), query("txt.tunio.test", TYPE_TXT, 5)
    with dns_connect(rig, 41001) as sock:
        sock.sendall(frame(query("p.tunio.test", TYPE_A, 1)) + frame(mx)
                     + frame(query("p.tunio.test", TYPE_AAAA, 3)) + frame(txt))  # fmt: skip
        # A and AAAA at once, before the upstream is even dialled
        got = {struct.unpack_from(">H", m)[0]: m for m in (read_message(sock), read_message(sock))}
        assert sorted(got) == [1, 3]
        assert parse_answer(got[1], 1, TYPE_A)[1] == ask(rig, "p.tunio.test", qid=9)[1]
        opened = rig.recv()
        assert opened.cmd is wire.Cmd.OPEN
        assert opened.payload is not None
        block = wire.AddressBlock.unpack(opened.payload)
        assert (block.dst, block.dst_port) == UPSTREAM
        rig.send(wire.Cmd.OPEN_OK, opened.flow, WINDOW)
        sent = b""
        while len(sent) < len(frame(mx) + frame(txt)):
            data = rig.recv()
            assert (data.cmd, data.flow) == (wire.Cmd.DATA, opened.flow), data
            sent += bytes(data.payload or b"")
        assert sent == frame(mx) + frame(txt)  # the queries for the upstream only
        mx_answer, txt_answer = frame(answer_to(mx, b"m" * 40)), frame(answer_to(txt, b"t" * 30))
        rig.send(wire.Cmd.DATA, opened.flow, 0, mx_answer[:10])
        assert recv_exact(sock, 10) == mx_answer[:10]  # the stack is inside the MX answer now
        answered = rig.stack.stats()["dns_answered"]
        sock.sendall(frame(query("p.tunio.test", TYPE_A, 4)))  # answered inside the MX answer
        rig.wait_stat("dns_answered", answered + 1)
        rig.send(wire.Cmd.DATA, opened.flow, 0, mx_answer[10:] + txt_answer[:5])
        rig.send(wire.Cmd.DATA, opened.flow, 0, txt_answer[5:])
        # whole messages in the order they could go: the local answer between the two upstream
        # ones, never inside one
        assert recv_exact(sock, len(mx_answer) - 10) == mx_answer[10:]
        assert struct.unpack_from(">H", read_message(sock))[0] == 4
        assert read_message(sock) == txt_answer[2:]
        sock.shutdown(socket.SHUT_WR)
        fin = rig.recv()
        assert (fin.cmd in (wire.Cmd.FIN, wire.Cmd.CREDIT_FIN), fin.flow) == (True, opened.flow)
        rig.send(wire.Cmd.FIN, opened.flow)
        assert sock.recv(1) == b""
    stats = rig.stack.stats()
    assert stats["dns_forwarded"] == 2
    assert stats["protocol_errors"] == 0
    rig.wait_stat("flows_active", 0)


@pytest.mark.parametrize("bad", [b"\0\0", frame(b"\1\2\3"),
                                 frame(answer_to(query("x.tunio.test", TYPE_A, 7)))])  # fmt: skip
def test_tcp_a_stream_no_client_sends_is_reset_and_counted(rig: Rig, bad: bytes) -> None:
    good = query("x.tunio.test", TYPE_A, 0x4242)
    with dns_connect(rig, 41002) as sock:
        sock.sendall(frame(good[:4] + b"\0\2" + good[6:]))  # two questions: FORMERR, as UDP
        formerr = read_message(sock)
        assert formerr[:2] == b"\x42\x42"
        assert formerr[3] & 0xF == 1
        sock.sendall(bad)
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(1) == b""
    assert rig.stack.stats()["dns_malformed"] == 2
    assert not rig.worker.poll(100)
    rig.wait_stat("flows_active", 0)


def test_tcp_a_message_cut_short_by_the_app_is_counted(rig: Rig) -> None:
    with dns_connect(rig, 41003) as sock:
        sock.sendall(frame(query("x.tunio.test", TYPE_A, 1))[:9])
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(1) == b""
    assert rig.stack.stats()["dns_malformed"] == 1
    rig.wait_stat("flows_active", 0)


def test_tcp_the_upstream_closing_with_a_query_unanswered_resets_the_app(rig: Rig) -> None:
    mx = query("tunio.test", TYPE_MX, 2)
    with dns_connect(rig, 41004) as sock:
        sock.sendall(frame(mx))
        opened = rig.recv()
        assert opened.cmd is wire.Cmd.OPEN
        rig.send(wire.Cmd.OPEN_OK, opened.flow, WINDOW)
        assert bytes(rig.recv().payload or b"") == frame(mx)
        rig.send(wire.Cmd.FIN, opened.flow)
        with pytest.raises(ConnectionResetError):
            sock.recv(1)
    rig.wait_stat("flows_active", 0)


def servfail_of(msg: bytes, query_msg: bytes, qid: int) -> None:
    """`msg` is the SERVFAIL answer to `query_msg`: its id, a response, RCODE 2, no records, and
    its question echoed (a query of another opcode: the header alone)."""
    got_id, flags, qd, an, ns, ar = struct.unpack_from(">HHHHHH", msg)
    assert got_id == qid
    assert flags & 0x8000  # QR: a response
    assert flags & 0xF == 2  # SERVFAIL
    assert (flags >> 11) & 0xF == (struct.unpack_from(">H", query_msg, 2)[0] >> 11) & 0xF
    assert (an, ns, ar) == (0, 0, 0)
    if qd:
        assert msg[12:] == query_msg[12:]  # the question, as the app wrote it
    else:
        assert len(msg) == 12


def _upstream_fails(rig: Rig, how: str, flow: int) -> None:
    if how == "refused":
        rig.send(wire.Cmd.OPEN_FAIL, flow, errno.ECONNREFUSED)
    elif how == "lost":  # the only worker: no other can dial
        rig.send(wire.Cmd.BYE)
    else:  # "lost, then refused": dialled again on the other worker, which fails it
        other = rig.connect_worker(b"other", features=wire.FEATURE_NAMES)
        rig.send(wire.Cmd.BYE)
        again = rig.recv(other)
        assert (again.cmd, again.flow) == (wire.Cmd.OPEN, flow)
        rig.send(wire.Cmd.OPEN_FAIL, flow, errno.ETIMEDOUT, sock=other)


@pytest.mark.parametrize("how", ["refused", "lost", "lost, then refused"])
def test_tcp_a_failed_upstream_dial_answers_each_waiting_query_servfail(
    rig: Rig, how: str
) -> None:
    """The queries that waited for the upstream's dial each get one SERVFAIL of their id, in the
    order they came, none lost and none twice; the connection stays up: A is answered here as
    before, and a later query for the upstream gets SERVFAIL at once, with no second dial."""
    mx, txt = query("tunio.test", TYPE_MX, 2), query("txt.tunio.test", TYPE_TXT, 5)
    notify = struct.pack(">HH", 6, 0x2000) + query("tunio.test", 6, 6)[4:]  # opcode 4
    srv = query("_sip._tcp.tunio.test", 33, 8)
    with dns_connect(rig, 41010) as sock:
        sock.sendall(frame(mx) + frame(query("f.tunio.test", TYPE_A, 1)) + frame(txt))
        assert struct.unpack_from(">H", read_message(sock))[0] == 1  # the A, at once
        opened = rig.recv()
        assert opened.cmd is wire.Cmd.OPEN
        forwarded = rig.stack.stats()["dns_forwarded"]
        sock.sendall(frame(notify) + frame(srv))  # more while the dial runs
        rig.wait_stat("dns_forwarded", forwarded + 2)  # taken in, waiting for the dial
        _upstream_fails(rig, how, opened.flow)
        waited = [(mx, 2), (txt, 5), (notify, 6), (srv, 8)]
        for q, qid in waited:
            servfail_of(read_message(sock), q, qid)
        # the next reply is the next query's: nothing more came for the four
        sock.sendall(frame(query("f.tunio.test", TYPE_A, 9)))
        rcode, [a], _, _ = parse_answer(read_message(sock), 9, TYPE_A)
        assert (rcode, ipaddress.ip_address(a) in POOL) == (0, True)
        later = query("later.tunio.test", TYPE_TXT, 10)
        sock.sendall(frame(later))
        servfail_of(read_message(sock), later, 10)
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(1) == b""  # an orderly end: every query had its answer
    rig.wait_stat("flows_active", 0)
    stats = rig.stack.stats()
    assert stats["flows_reset"] == 0
    assert stats["dial_failed"] == (0 if how == "lost" else 1)
    assert all(w.flows == 0 for w in rig.stack.workers())  # the flow left its worker
    if how != "lost":
        assert not rig.worker.poll(100)  # no second OPEN for the later query


@pytest.fixture
def idle_rig(tmp_path: Path) -> Iterator[Rig]:
    with stack_rig(tmp_path, features=wire.FEATURE_NAMES,
                   **dns_fields(dns_tcp_idle=IDLE)) as r:  # fmt: skip
        yield r


IDLE = 0.3  # dns_tcp_idle of idle_rig, s (the stack looks every 250 ms)


def test_tcp_an_idle_connection_is_closed_with_a_fin_and_counted(idle_rig: Rig) -> None:
    rig = idle_rig
    with dns_connect(rig, 41020) as sock:
        sock.sendall(frame(query("idle.tunio.test", TYPE_A, 1)))
        assert parse_answer(read_message(sock), 1, TYPE_A)[0] == 0
        sock.sendall(frame(query("idle.tunio.test", TYPE_A, 2))[:5])  # begun, never finished
        started = time.monotonic()
        assert sock.recv(1) == b""  # EOF: a FIN, not a RST (that would raise)
        assert time.monotonic() - started >= IDLE - 0.05  # the idle time, not before
    rig.wait_stat("flows_active", 0)
    stats = rig.stack.stats()
    assert (stats["dns_idle_closed"], stats["flows_reset"], stats["dns_malformed"]) == (1, 0, 0)


def test_tcp_a_query_waiting_for_the_upstream_keeps_the_connection_open(idle_rig: Rig) -> None:
    """A connection whose query waits for the dial, then for the upstream's answer, is not idle;
    once answered it is, and its end reaches the upstream as a FIN. The clock: a connection
    that went quiet after the waiting one, closed first."""
    rig = idle_rig
    mx = query("tunio.test", TYPE_MX, 2)
    with dns_connect(rig, 41021) as waiting, dns_connect(rig, 41022) as quiet:
        waiting.sendall(frame(mx))
        opened = rig.recv()
        assert opened.cmd is wire.Cmd.OPEN
        quiet.sendall(frame(query("q.tunio.test", TYPE_A, 1)))
        read_message(quiet)
        assert quiet.recv(1) == b""  # idle past IDLE: the waiting one too, but not closed
        rig.send(wire.Cmd.OPEN_OK, opened.flow, WINDOW)
        data = rig.recv()
        assert (data.cmd, bytes(data.payload or b"")) == (wire.Cmd.DATA, frame(mx))
        assert rig.stack.stats()["dns_idle_closed"] == 1
        waiting.sendall(frame(query("w.tunio.test", TYPE_A, 3)))  # still served here
        assert struct.unpack_from(">H", read_message(waiting))[0] == 3
        rig.send(wire.Cmd.DATA, opened.flow, 0, frame(answer_to(mx)))
        assert read_message(waiting) == answer_to(mx)
        assert waiting.recv(1) == b""  # idle once answered
        fin = rig.recv()
        assert (fin.cmd in (wire.Cmd.FIN, wire.Cmd.CREDIT_FIN), fin.flow) == (True, opened.flow)
    rig.wait_stat("flows_active", 0)
    stats = rig.stack.stats()
    assert (stats["dns_idle_closed"], stats["flows_reset"]) == (2, 0)
