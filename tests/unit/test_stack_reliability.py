"""The C stack under strain, through a socketpair in place of a TUN queue: admission limits
(--max-flows, --max-pending), held flows dialled again when their worker goes, a NAT table
adopted from the region a killed stack left, the per-worker numbers, and JSON log lines."""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import re
import signal
import socket
import threading
from pathlib import Path

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from tests.unit.logwait import wait_for_line
from tunio import wire
from tunio.defaults import READ_CHUNK
from tunio.stack import Stack, StackConfig, create_nat_region, nat_region_size
from tunio.testing import packets
from tunio.testing.stackrig import APP, APP6, DST, WINDOW, Rig, pool_of, stack_rig

in_pool = pool_of()


def _rst_to(pkt: packets.Parsed, sport: int) -> bool:
    return pkt.dport == sport and pkt.flags == packets.RST | packets.ACK


# ---------------------------------------------------------------- admission


def test_past_max_pending_a_syn_gets_a_rst_from_the_reader(tmp_path: Path) -> None:
    with stack_rig(tmp_path, max_flows=100, max_pending=2) as rig:
        rig.open(41000, 80, dst="192.0.2.2")
        rig.open(41001, 80, dst="192.0.2.3")
        rig.write(rig.syn(41002, 80, dst="192.0.2.4"))
        rst = rig.read()  # at once, from the reader: no OPEN reached the worker
        assert rst.checksums_ok
        assert _rst_to(rst, 41002)
        assert (rst.src, rst.sport) == ("192.0.2.4", 80)
        stats = rig.stack.stats()
        assert (stats["refused_max_pending"], stats["pending"], stats["pending_peak"]) == (1, 2, 2)
        assert stats["flows_opened"] == 2


def test_a_destination_holds_a_quarter_of_max_pending(tmp_path: Path) -> None:
    """Past its share a destination's SYN goes unanswered, as a server with a full SYN queue
    leaves it: the app sends it again, and it gets in once a held one is answered."""
    with stack_rig(tmp_path, max_flows=100, max_pending=8) as rig:
        first = rig.open(41010, 80)
        rig.open(41011, 80)
        rig.write(rig.syn(41012, 80))  # a third held SYN for DST: past its share of 2
        probe = rig.probe()  # the probe's RST comes first: nothing was written for 41012
        assert (probe.dport, probe.flags) == (9, packets.RST)
        rig.open(41013, 80, dst="192.0.2.9")  # another destination still gets in
        stats = rig.stack.stats()
        assert (stats["deferred_pending_share"], stats["refused_max_pending"]) == (1, 0)
        assert stats["pending"] == 3
        rig.send(wire.Cmd.OPEN_FAIL, first.flow, 111)  # a held one is answered: a place frees
        assert _rst_to(rig.read(), 41010)
        rig.wait_stat("pending", 2)
        again = rig.open(41012, 80)  # the app's retransmitted SYN now gets in
        assert again.cmd is wire.Cmd.OPEN


def test_a_destination_past_its_share_is_logged_with_its_usual_causes(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    with stack_rig(tmp_path, max_flows=100, max_pending=8) as rig:
        rig.open(41030, 80)
        rig.open(41031, 80)
        rig.write(rig.syn(41032, 80))  # past DST's share of 2: left unanswered
        rig.probe()
        line = wait_for_line(capfd, [], "SYNs left for the app to send again", 5)
        assert "1 SYNs left for the app to send again" in line
        assert line.endswith("a destination that does not answer, or the workers' own "
                             "connections routed back into the TUN (see the egress mark's "
                             "routing table)")  # fmt: skip


def test_released_flows_count_against_max_flows_until_closed(tmp_path: Path) -> None:
    with stack_rig(tmp_path, max_flows=1, max_pending=1) as rig:
        msg = rig.open(41020, 80)
        rig.send(wire.Cmd.OPEN_OK, msg.flow, WINDOW)
        assert rig.read().flags == packets.SYN  # released: the flow is open, still counted
        rig.wait_stat("pending", 0)
        rig.write(rig.syn(41021, 80, dst="192.0.2.3"))
        assert _rst_to(rig.read(), 41021)
        assert rig.stack.stats()["refused_max_flows"] == 1


def test_udp_session_past_max_flows_gets_port_unreachable(tmp_path: Path) -> None:
    with stack_rig(tmp_path, max_flows=1, max_pending=1) as rig:
        rig.write(packets.udp(APP, 42000, DST, 53, b"first"))
        assert rig.recv().cmd is wire.Cmd.DGRAM
        rig.write(packets.udp(APP, 42001, DST, 53, b"second"))
        icmp = rig.read()
        assert icmp.checksums_ok
        assert (icmp.proto, icmp.icmp_type, icmp.icmp_code) == (packets.ICMP, 3, 3)
        assert icmp.payload[20:24] == (42001).to_bytes(2, "big") + (53).to_bytes(2, "big")
        rig.write(packets.udp(APP, 42000, DST, 53, b"again"))  # the session in still works
        assert rig.recv().payload.endswith(b"again")  # type: ignore[union-attr]
        stats = rig.stack.stats()
        assert (stats["refused_max_flows"], stats["udp_sessions"]) == (1, 1)


# ---------------------------------------------------------------- invisible retry


def _next_open(rig: Rig, socks: list[zmq.Socket[bytes]]) -> tuple[int, wire.Message]:
    """The next OPEN any of `socks` receives: (its index, the message)."""
    poller = zmq.Poller()
    for s in socks:
        poller.register(s, zmq.POLLIN)
    for _ in range(50):
        for sock, _ in poller.poll(5000):
            msg = wire.decode([bytes(f) for f in sock.recv_multipart()])
            if msg.cmd is wire.Cmd.OPEN:
                return socks.index(sock), msg
            if msg.cmd is wire.Cmd.HEARTBEAT:
                rig.send(wire.Cmd.HEARTBEAT, sock=sock)
    pytest.fail("no OPEN reached a worker")


def test_held_flow_is_dialled_again_when_its_worker_leaves(tmp_path: Path) -> None:
    with stack_rig(tmp_path) as rig:
        socks = [rig.worker, rig.connect_worker(b"second")]
        rig.write(rig.syn(41100, 8080, seq=7000))
        first, msg = _next_open(rig, socks)
        rig.send(wire.Cmd.BYE, sock=socks[first])  # gone before it answered
        second, again = _next_open(rig, socks)
        assert second != first
        assert (again.flow, again.arg, again.payload) == (msg.flow, msg.arg, msg.payload)
        rig.send(wire.Cmd.OPEN_OK, msg.flow, WINDOW, sock=socks[second])
        syn = rig.read()
        assert (syn.flags, syn.seq, syn.dport) == (packets.SYN, 7000, rig.stack.listen_port)
        stats = rig.stack.stats()
        assert (stats["flows_retried"], stats["flows_reset"]) == (1, 0)
        [info] = [w for w in rig.stack.workers() if w.alive]
        assert (info.name, info.flows) == (("test-worker", "second")[second], 1)


def test_an_open_flow_is_still_reset_when_its_worker_leaves(tmp_path: Path) -> None:
    with stack_rig(tmp_path) as rig:
        socks = [rig.worker, rig.connect_worker(b"second")]
        rig.write(rig.syn(41110, 8080))
        first, msg = _next_open(rig, socks)
        rig.send(wire.Cmd.OPEN_OK, msg.flow, WINDOW, sock=socks[first])
        assert rig.read().flags == packets.SYN
        rig.send(wire.Cmd.BYE, sock=socks[first])
        rig.wait_stat("flows_reset", 1)
        assert rig.stack.stats()["flows_retried"] == 0


def test_worker_info_names_load_and_capacity(tmp_path: Path) -> None:
    with stack_rig(tmp_path) as rig:
        rig.open(41120, 80)
        [info] = rig.stack.workers()
        assert (info.name, info.alive, info.flows, info.capacity) == ("test-worker", True, 1, 0)


# ---------------------------------------------------------------- a killed stack's region


def _config(tun_fd: int, endpoint: str, region: int) -> StackConfig:
    return StackConfig(
        tun_fds=(tun_fd,),
        addresses=(ipaddress.IPv4Interface("127.0.0.1/8"), ipaddress.IPv6Interface(f"{APP6}/64")),
        endpoint=endpoint,
        window=WINDOW,
        log_level="warning",
        heartbeat_interval=30.0,
        nat_region_fd=region,
    )


def _hello(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str) -> zmq.Socket[bytes]:
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(endpoint)
    sock.send_multipart(wire.encode(wire.Message(wire.Cmd.HELLO, payload=b"w")))
    assert sock.poll(5000)
    assert wire.decode([bytes(f) for f in sock.recv_multipart()]).cmd is wire.Cmd.HELLO
    return sock


def _expect(sock: zmq.Socket[bytes], cmd: wire.Cmd) -> wire.Message:
    while True:
        assert sock.poll(5000), f"no {cmd.name} in time"
        msg = wire.decode([bytes(f) for f in sock.recv_multipart()])
        if msg.cmd is cmd:
            return msg


def test_a_new_stack_adopts_the_table_a_killed_one_left(tmp_path: Path) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    os.set_blocking(theirs.fileno(), False)
    ours.settimeout(5.0)
    old_ep, new_ep = f"ipc://{tmp_path}/old.sock", f"ipc://{tmp_path}/new.sock"
    region = create_nat_region(_config(theirs.fileno(), old_ep, -1))
    assert os.fstat(region).st_size == nat_region_size(_config(theirs.fileno(), old_ep, -1))
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the stack that will be killed: it never gets to clean anything up
        try:
            os.close(ready_r)
            stack = Stack(_config(theirs.fileno(), old_ep, region))
            threading.Thread(target=stack.run, daemon=True).start()
            os.write(ready_w, str(stack.listen_port).encode())
            signal.pause()
        finally:
            os._exit(1)
    os.close(ready_w)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    new = None
    try:
        old_port = int(os.read(ready_r, 16))
        worker = _hello(ctx, old_ep)
        # Flow A is open (its SYN released to the listener); flow B is still held.
        ours.send(packets.tcp(APP, 43000, DST, 80, flags=packets.SYN, seq=100,
                              options=packets.SYN_OPTIONS))  # fmt: skip
        a = _expect(worker, wire.Cmd.OPEN)
        worker.send_multipart(wire.encode(wire.Message(wire.Cmd.OPEN_OK, a.flow, WINDOW)))
        released = packets.parse(ours.recv(65536))
        assert (released.dport, released.flags) == (old_port, packets.SYN)
        ours.send(packets.tcp(APP, 43001, DST, 80, flags=packets.SYN, seq=200,
                              options=packets.SYN_OPTIONS))  # fmt: skip
        b = _expect(worker, wire.Cmd.OPEN)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pid = 0

        new = Stack(_config(theirs.fileno(), new_ep, region))
        thread = threading.Thread(target=new.run)
        thread.start()
        assert new.listen_port == old_port  # the old flows' packets still reach a listener
        stats = new.stats()
        assert (stats["nat_adopted"], stats["nat_entries"], stats["pending"]) == (1, 1, 0)
        # A's next segment goes where it went before: the same fake source, the same port.
        ours.send(packets.tcp(APP, 43000, DST, 80, flags=packets.ACK, seq=101, ack=1))
        seg = packets.parse(ours.recv(65536))
        assert (seg.src, seg.sport, seg.dport) == (released.src, released.sport, old_port)
        # The RST the dead stack's socket left (or the listener's) goes back to the app.
        ours.send(packets.tcp(APP, old_port, released.src, released.sport,
                              flags=packets.RST | packets.ACK, seq=1, ack=101))  # fmt: skip
        rst = packets.parse(ours.recv(65536))
        assert rst.checksums_ok
        assert (rst.src, rst.sport, rst.dst, rst.dport) == (DST, 80, APP, 43000)
        assert rst.flags & packets.RST
        assert new.stats()["rst_to_apps"] == 1
        # B's held SYN went with the old process: its retransmit opens a fresh flow.
        worker2 = _hello(ctx, new_ep)
        ours.send(packets.tcp(APP, 43001, DST, 80, flags=packets.SYN, seq=200,
                              options=packets.SYN_OPTIONS))  # fmt: skip
        b2 = _expect(worker2, wire.Cmd.OPEN)
        assert b2.payload == b.payload
        assert b2.flow > max(a.flow, b.flow)  # the id counter lives in the region too
        new.stop()
        thread.join()
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        if new is not None:
            new.close()
        ctx.destroy(linger=0)
        for fd in (region, ready_r):
            os.close(fd)
        ours.close()
        theirs.close()


def test_a_region_of_another_layout_is_not_adopted(tmp_path: Path) -> None:
    _, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with theirs:
        cfg = _config(theirs.fileno(), f"ipc://{tmp_path}/a.sock", -1)
        region = create_nat_region(cfg)
        try:
            os.pwrite(region, b"\xff" * 64, 0)  # not ours: wiped, not trusted
            stack = Stack(_config(theirs.fileno(), f"ipc://{tmp_path}/b.sock", region))
            try:
                assert stack.stats()["nat_adopted"] == 0
            finally:
                stack.close()
        finally:
            os.close(region)


# ---------------------------------------------------------------- HELLO said again


def test_a_hello_said_again_is_news_only_when_it_drops_flows(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A worker that started before its stack has said HELLO several times, and they all come
    at once: it joined once. A HELLO again with flows open resets them, and says so."""
    with stack_rig(tmp_path, log_level="info") as rig:
        rig.send(wire.Cmd.HELLO, payload=b"test-worker")
        assert rig.recv().cmd is wire.Cmd.HELLO
        msg = rig.open(41600, 80)
        rig.send(wire.Cmd.HELLO, payload=b"test-worker")
        assert rig.recv().cmd is wire.Cmd.HELLO
        rig.wait_stat("flows_active", 0)
        assert msg.flow  # the held flow went with the session
    err = capfd.readouterr().err
    assert err.count("worker test-worker joined (1 alive)") == 1
    said = ("worker test-worker said HELLO again: 1 flows reset, 0 held flows passed to other "
            "workers, 0 UDP sessions ended")  # fmt: skip
    assert err.count(said) == 1


# ---------------------------------------------------------------- a peer that floods the log


def test_a_peer_that_keeps_sending_garbage_costs_the_log_a_line_a_period(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Thirty unreadable frames: each is counted, the first is logged at once, the other 29 in
    one line when the period ends, and the stack serves on."""
    with stack_rig(tmp_path) as rig:
        peer = rig.ctx.socket(zmq.DEALER)
        peer.linger = 0
        peer.connect(rig.endpoint)
        for _ in range(30):
            peer.send_multipart([bytes([wire.VERSION])])  # our version, shorter than a header
        rig.wait_stat("protocol_errors", 30)
        seen: list[str] = []
        first = "malformed message from an unknown peer dropped (framing)"
        wait_for_line(capfd, seen, first, 5)
        period = wait_for_line(capfd, seen, "more malformed messages", 15)
        assert period.endswith("dropped 29 more malformed messages in the last 10 s, the last "
                               "from an unknown peer (framing)"), period  # fmt: skip
        assert sum("malformed" in line for line in seen) == 2
        rig.open(41700, 80)
        peer.close()


# ---------------------------------------------------------------- an oversized frame


def _events(monitor: zmq.Socket[bytes], until: int) -> list[int]:
    """The DEALER's socket events, up to and with `until` (ZeroMQ's monitor, in order)."""
    seen: list[int] = []
    while until not in seen:
        assert monitor.poll(5000), f"no socket event after {seen}"
        seen.append(recv_monitor_message(monitor)["event"])
    return seen


@pytest.mark.parametrize("window", [WINDOW, 4 * READ_CHUNK], ids=["small-window", "big-window"])
def test_a_frame_larger_than_any_worker_sends_cuts_that_peer_off(
    tmp_path: Path, window: int
) -> None:
    """A worker's largest frame is DATA of its whole credit (the window) or of one read of a
    destination (READ_CHUNK), whichever is larger: the stack takes it; one byte more and ZeroMQ
    disconnects the peer instead of holding what it claims. Other workers and the stack go on."""
    largest = max(window, READ_CHUNK)
    with stack_rig(tmp_path, window=window) as rig:
        peer = rig.connect_worker(name=b"big-sender")
        monitor = peer.get_monitor_socket()
        try:
            rig.send(wire.Cmd.DATA, flow=7, payload=b"x" * largest, sock=peer)  # no such flow
            rst = rig.recv(peer)  # the stack read it: a flow it does not know is reset
            assert (rst.cmd, rst.flow, rst.arg) == (wire.Cmd.RST, 7, errno.ENOTCONN)
            assert not monitor.poll(0)  # and the connection stands
            rig.send(wire.Cmd.DATA, flow=7, payload=b"x" * (largest + 1), sock=peer)
            assert _events(monitor, zmq.EVENT_DISCONNECTED)[-1] == zmq.EVENT_DISCONNECTED
        finally:
            peer.disable_monitor()
            monitor.close(0)
        rig.open(41500, 80)  # the stack and its other worker serve on
        assert rig.stack.stats()["workers"] >= 1


# ---------------------------------------------------------------- the stop


def test_stop_answers_held_syns_with_a_rst(tmp_path: Path) -> None:
    with stack_rig(tmp_path) as rig:
        rig.open(41200, 80)
        rig.stack.stop()
        assert _rst_to(rig.read(), 41200)


# ---------------------------------------------------------------- JSON log lines

_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def test_json_log_lines_have_the_python_shape(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    name = 'odd "name"\n\tand\\more \xe9'.encode() + b"\xff"
    with stack_rig(tmp_path, log_json=True) as rig:
        odd = rig.connect_worker(name)
        rig.send(wire.Cmd.BYE, sock=odd)
        rig.wait_stat("workers_lost", 1)
    lines = [line for line in capfd.readouterr().err.splitlines() if line]
    records = [json.loads(line) for line in lines]
    [lost] = [r for r in records if "lost" in r["message"]]
    assert list(lost) == ["time", "level", "process", "pid", "logger", "message"]
    assert _TIME.match(lost["time"])
    assert (lost["level"], lost["process"], lost["logger"]) == ("warning", "tunio-stack",
                                                                "tunio.stack")  # fmt: skip
    assert lost["pid"] == os.getpid()
    # JSON's escapes for the quote and the backslash, U+FFFD for what is not UTF-8; the control
    # bytes were made '?' when the worker joined (a name never writes a line of its own)
    assert 'odd "name"??and\\more \xe9\ufffd' in lost["message"]
    for line in lines:  # json.dumps's own spelling, separators included
        assert line == json.dumps(json.loads(line), ensure_ascii=False)
