"""UDP sessions in the worker, against a fake stack (a ROUTER) and real loopback UDP servers."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tunio import wire
from tunio.dialers import Address, DirectDialer
from tunio.dialers.base import DatagramDialer
from tunio.dialers.udp import SocketSession
from tunio.testing.fakestack import DEADLINE, SKIP, FakeStack, RunningWorker
from tunio.wire import AddressBlock, Cmd, Message
from tunio.worker import Worker
from tunio.worker.datagram import UDP_WINDOW, UdpSession

APP_V4 = "198.18.255.9"
APP_V6 = "fd00::9"
SEQ = struct.Struct(">I")


# ---- loopback UDP servers ----------------------------------------------------------------


class UdpEcho:
    """A loopback UDP server on a thread: echoes every datagram, or sends `burst(n)` on demand.

    A datagram starting with b"burst" (then a u32 count) makes it send that many numbered
    datagrams back instead of an echo.
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind((host, 0))
        self.host = host
        self.port: int = self.sock.getsockname()[1]
        self.received = 0
        self._stop_r, self._stop_w = os.pipe()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            ready, _, _ = select.select([self.sock.fileno(), self._stop_r], [], [], DEADLINE)
            if self._stop_r in ready or not ready:
                return
            data, peer = self.sock.recvfrom(65535)
            self.received += 1
            if data.startswith(b"burst"):
                (count,) = SEQ.unpack_from(data, 5)
                for i in range(count):
                    self.sock.sendto(SEQ.pack(i), peer)
            else:
                self.sock.sendto(data, peer)

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        self.thread.join(DEADLINE)
        self.sock.close()
        os.close(self._stop_r)
        os.close(self._stop_w)


@pytest.fixture
def udp_echo() -> Iterator[Callable[..., UdpEcho]]:
    made: list[UdpEcho] = []

    def make(host: str = "127.0.0.1") -> UdpEcho:
        made.append(UdpEcho(host))
        return made[-1]

    yield make
    for server in made:
        server.close()


# ---- the fake stack's UDP side -----------------------------------------------------------


def block(fid: int, port: int, host: str = "127.0.0.1") -> AddressBlock:
    dst = ipaddress.ip_address(host)
    src = ipaddress.ip_address(APP_V4 if dst.version == 4 else APP_V6)
    return AddressBlock(wire.IPPROTO_UDP, dst.version, src, 30000 + fid, dst, port)


def dgram(stack: FakeStack, fid: int, addr: AddressBlock, data: bytes) -> None:
    stack.send(Cmd.DGRAM, fid, 0, addr.pack() + data)


def reply(msg: Message) -> tuple[AddressBlock, bytes]:
    assert msg.cmd is Cmd.DGRAM, msg
    assert msg.payload is not None
    return AddressBlock.unpack(msg.payload), bytes(msg.payload)[wire.ADDRESS.size :]


def barrier(stack: FakeStack, collected: list[Message], marker: int = 999_999) -> None:
    """Collect every message the worker sent before it handled this call's probe.

    DATA for an unknown flow is answered with RST at once, and the DEALER keeps order, so all
    that the worker had sent before lands in `collected` first.
    """
    stack.send(Cmd.DATA, marker, 0, b"?")
    while True:
        msg = stack.recv()
        if msg.cmd is Cmd.RST and msg.flow == marker:
            return
        if msg.cmd is not Cmd.HEARTBEAT:
            collected.append(msg)


def wait_until(cond: Callable[[], bool], what: str) -> None:
    """Poll a counter of the in-process worker until `cond` holds (bounded by DEADLINE)."""
    deadline = time.monotonic() + DEADLINE
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)  # the worker's counters have no event to wait on


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# ---- fixtures ----------------------------------------------------------------------------


StartWorker = Callable[..., Worker]


@pytest.fixture
def start_worker(endpoint: str, stack: FakeStack) -> Iterator[StartWorker]:
    """Start a worker in a thread and do the HELLO exchange with it."""
    started: list[tuple[Worker, RunningWorker]] = []

    def start(dialer: Any = None, **options: Any) -> Worker:
        options.setdefault("name", "udp-worker")
        worker = Worker(endpoint, dialer or DirectDialer(), **options)

        def target(ready: Callable[[], None]) -> int:
            worker.ready = ready
            return worker.run()

        running = RunningWorker(target)
        started.append((worker, running))
        stack.handshake(running)
        return worker

    yield start
    for worker, running in started:
        worker.stop()
        running.join()


# ---- the direct dialer's sessions --------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_direct_dial_udp_is_a_connected_session(
    host: str, udp_echo: Callable[..., UdpEcho]
) -> None:
    server = udp_echo(host)
    dialer = DirectDialer()
    assert isinstance(dialer, DatagramDialer)
    session = asyncio.run(dialer.dial_udp(Address(host, server.port), Address(APP_V4, 1)))
    try:
        assert isinstance(session, SocketSession)
        assert session.recv() is None  # non-blocking: nothing waits yet
        assert session.send(b"ping")
        ready, _, _ = select.select([session.fileno()], [], [], DEADLINE)
        assert ready
        assert session.recv() == (b"ping", Address(host, server.port))
    finally:
        session.close()


def test_direct_dial_udp_sets_mark_and_needs_an_ip_literal() -> None:
    if os.geteuid() != 0:
        pytest.skip("SO_MARK needs CAP_NET_ADMIN")
    dialer = DirectDialer(mark=0x2A)
    session = asyncio.run(dialer.dial_udp(Address("127.0.0.1", 9), Address(APP_V4, 1)))
    try:
        assert isinstance(session, SocketSession)
        assert session.sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == 0x2A
        assert session.sock.gettimeout() == 0.0
    finally:
        session.close()
    with pytest.raises(OSError, match="IP literal") as info:
        asyncio.run(dialer.dial_udp(Address("example.invalid", 53), Address(APP_V4, 1)))
    assert info.value.errno == errno.EINVAL


def test_reply_block_names_the_source() -> None:
    udp = UdpSession(5, block(5, 53))
    same = AddressBlock.unpack(udp.block_from(Address("127.0.0.1", 53)))
    assert (str(same.src), same.src_port, str(same.dst), same.dst_port) == (
        "127.0.0.1", 53, APP_V4, 30005,
    )
    other = AddressBlock.unpack(udp.block_from(Address("127.0.0.2", 5353)))
    assert (str(other.src), other.src_port, str(other.dst)) == ("127.0.0.2", 5353, APP_V4)
    assert other.proto == wire.IPPROTO_UDP
    # a name or the other IP version cannot go in the block: the destination stands in
    assert udp.block_from(Address("relay.example", 1)) == udp.reply_block
    assert udp.block_from(Address("::1", 53)) == udp.reply_block


# ---- sessions through the worker ---------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_datagrams_round_trip_byte_exact(
    stack: FakeStack, start_worker: StartWorker, udp_echo: Callable[..., UdpEcho], host: str
) -> None:
    worker = start_worker()
    server = udp_echo(host)
    addr = block(1, server.port, host)
    biggest = 65507 if ":" not in host else 65527
    sizes = [0, 1, 40, 512, 1400, 1472, 9000, biggest]
    payloads = [os.urandom(n) for n in sizes]
    for data in payloads:
        dgram(stack, 1, addr, data)
    got: list[bytes] = []
    credited = 0
    while len(got) < len(payloads):
        msg = stack.expect(Cmd.DGRAM, 1, skip=SKIP | {Cmd.CREDIT})
        back, data = reply(msg)
        assert back.proto == wire.IPPROTO_UDP
        assert (back.src, back.src_port) == (addr.dst, addr.dst_port)
        assert (back.dst, back.dst_port) == (addr.src, addr.src_port)
        got.append(data)
    assert got == payloads
    collected: list[Message] = []
    barrier(stack, collected)
    credits = [m for m in [*stack.skipped, *collected] if m.cmd is Cmd.CREDIT]
    credited = sum(m.arg for m in credits)
    assert all(m.flow == 1 for m in credits)
    assert credited == len(payloads)
    assert worker.stats.udp_opens == 1
    assert worker.stats.datagrams_to_destination == len(payloads)
    assert worker.stats.datagrams_to_stack == len(payloads)


def test_order_kept_within_a_session_under_credit(
    stack: FakeStack, start_worker: StartWorker, udp_echo: Callable[..., UdpEcho]
) -> None:
    """5,000 numbered datagrams over each of 2 sessions, with no loss and in order.

    Credit covers what has been handed on, not what is still on its way back, so for no loss a
    sender keeps its datagrams in flight (sent, not yet echoed) below the window, as an app at
    a moderate rate does; each side's credit is checked all along.
    """
    worker = start_worker()
    server = udp_echo()
    count = 5000
    in_flight_limit = UDP_WINDOW // 2
    fids = (11, 12)
    addrs = {fid: block(fid, server.port) for fid in fids}
    sent = dict.fromkeys(fids, 0)
    outstanding = dict.fromkeys(fids, 0)  # our DGRAMs the worker has not credited
    unacked = dict.fromkeys(fids, 0)  # its DGRAMs we have not credited
    seen: dict[int, list[int]] = {fid: [] for fid in fids}
    deadline = time.monotonic() + 30
    while any(len(seen[f]) < count for f in fids):
        for fid in fids:
            while sent[fid] < count and sent[fid] - len(seen[fid]) < in_flight_limit:
                dgram(stack, fid, addrs[fid], SEQ.pack(sent[fid]) + b"x" * 100)
                sent[fid] += 1
                outstanding[fid] += 1
                assert outstanding[fid] <= UDP_WINDOW
        msg = stack.recv(max(0.0, deadline - time.monotonic()))
        if msg.cmd is Cmd.CREDIT:
            outstanding[msg.flow] -= msg.arg
            assert outstanding[msg.flow] >= 0, "credit for datagrams never sent"
        elif msg.cmd is Cmd.DGRAM:
            _, data = reply(msg)
            seen[msg.flow].append(SEQ.unpack_from(data)[0])
            unacked[msg.flow] += 1
            assert unacked[msg.flow] <= UDP_WINDOW
            if unacked[msg.flow] >= 32:
                stack.send(Cmd.CREDIT, msg.flow, unacked[msg.flow])
                unacked[msg.flow] = 0
        else:
            assert msg.cmd is Cmd.HEARTBEAT, (msg, worker.stats)
    for fid in fids:
        assert seen[fid] == list(range(count)), f"session {fid} lost or reordered datagrams"
    assert worker.stats.datagrams_dropped_credit == 0
    assert worker.stats.datagrams_dropped_send == 0


def test_never_more_than_the_window_of_uncredited_replies(
    stack: FakeStack, start_worker: StartWorker, udp_echo: Callable[..., UdpEcho]
) -> None:
    worker = start_worker()
    server = udp_echo()
    addr = block(3, server.port)
    stats = worker.stats

    def handled() -> int:  # replies the worker has read: sent on or dropped for credit
        return stats.datagrams_to_stack + stats.datagrams_dropped_credit

    dgram(stack, 3, addr, b"burst" + SEQ.pack(400))
    wait_until(lambda: handled() == 400, "the worker to read the burst")
    collected: list[Message] = []
    barrier(stack, collected)
    replies = [m for m in collected if m.cmd is Cmd.DGRAM]
    assert len(replies) == UDP_WINDOW
    seqs = [SEQ.unpack_from(reply(m)[1])[0] for m in replies]
    assert seqs == list(range(UDP_WINDOW))
    assert stats.datagrams_to_stack == UDP_WINDOW
    assert stats.datagrams_dropped_credit == 400 - UDP_WINDOW
    # credit for 10 more: exactly 10 more replies may come, no matter how many wait
    stack.send(Cmd.CREDIT, 3, 10)
    dgram(stack, 3, addr, b"burst" + SEQ.pack(50))
    wait_until(lambda: handled() == 450, "the worker to read the second burst")
    collected.clear()
    barrier(stack, collected)
    again = [SEQ.unpack_from(reply(m)[1])[0] for m in collected if m.cmd is Cmd.DGRAM]
    assert again == list(range(10))
    assert stats.datagrams_to_stack == UDP_WINDOW + 10


def test_closed_port_resets_with_econnrefused_and_the_next_dgram_reopens(
    stack: FakeStack, start_worker: StartWorker
) -> None:
    worker = start_worker()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as held:
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
    # nothing listens on `port` any more: loopback answers ICMP port unreachable
    addr = block(4, port)
    fds = open_fds()
    dgram(stack, 4, addr, b"anyone?")
    rst = stack.expect(Cmd.RST, 4, skip=SKIP | {Cmd.CREDIT})
    assert rst.arg == errno.ECONNREFUSED
    assert 4 not in worker.udp
    assert open_fds() == fds
    dgram(stack, 4, addr, b"again?")
    assert stack.expect(Cmd.RST, 4, skip=SKIP | {Cmd.CREDIT}).arg == errno.ECONNREFUSED
    assert worker.stats.udp_opens == 2


def test_rst_from_the_stack_closes_the_sockets(
    stack: FakeStack, start_worker: StartWorker, udp_echo: Callable[..., UdpEcho]
) -> None:
    worker = start_worker()
    server = udp_echo()
    fds = open_fds()
    fids = range(100, 120)
    for fid in fids:
        dgram(stack, fid, block(fid, server.port), b"hello %d" % fid)
    for _ in fids:
        stack.expect(Cmd.DGRAM, skip=SKIP | {Cmd.CREDIT})
    assert open_fds() == fds + len(fids)
    for fid in fids:
        stack.send(Cmd.RST, fid, 0)
    collected: list[Message] = []
    barrier(stack, collected)
    assert not [m for m in collected if m.cmd is Cmd.RST]  # a RST is never answered
    assert worker.udp == {}
    assert open_fds() == fds
    assert worker.stats.resets_received == len(fids)


class TcpOnlyDialer:
    async def dial(self, dst: Address, src: Address) -> socket.socket:
        raise AssertionError("not used")


def test_a_dialer_without_udp_refuses_sessions(stack: FakeStack, start_worker: StartWorker) -> None:
    worker = start_worker(TcpOnlyDialer())
    dgram(stack, 6, block(6, 53), b"query")
    assert stack.expect(Cmd.RST, 6).arg == errno.EPROTONOSUPPORT
    assert worker.udp == {}
    assert worker.stats.udp_open_fail == 1


class GatedDialer:
    """A direct dialer whose dial_udp waits until the test opens the gate (or fails)."""

    def __init__(self, error: OSError | None = None) -> None:
        self.gate = threading.Event()
        self.started = threading.Event()
        self.error = error

    async def dial(self, dst: Address, src: Address) -> socket.socket:
        raise AssertionError("not used")

    async def dial_udp(self, dst: Address, src: Address) -> SocketSession:
        self.started.set()
        await asyncio.to_thread(self.gate.wait, DEADLINE)
        if self.error is not None:
            raise self.error
        return await DirectDialer().dial_udp(dst, src)


def test_datagrams_wait_in_order_while_dialing_up_to_the_window(
    stack: FakeStack, start_worker: StartWorker, udp_echo: Callable[..., UdpEcho]
) -> None:
    dialer = GatedDialer()
    worker = start_worker(dialer)
    server = udp_echo()
    addr = block(7, server.port)
    extra = 20
    for i in range(UDP_WINDOW + extra):  # a stack beyond its window: the rest is dropped
        dgram(stack, 7, addr, SEQ.pack(i))
    assert dialer.started.wait(DEADLINE)
    wait_until(
        lambda: worker.stats.datagrams_dropped_window == extra, "DGRAMs beyond the window"
    )
    dialer.gate.set()
    seqs: list[int] = []
    credited = 0
    while len(seqs) < UDP_WINDOW:
        msg = stack.recv()
        if msg.cmd is Cmd.DGRAM:
            seqs.append(SEQ.unpack_from(reply(msg)[1])[0])
            stack.send(Cmd.CREDIT, 7, 1)
        elif msg.cmd is Cmd.CREDIT:
            credited += msg.arg
    assert seqs == list(range(UDP_WINDOW))
    collected: list[Message] = []
    barrier(stack, collected)
    credited += sum(m.arg for m in collected if m.cmd is Cmd.CREDIT)
    assert credited == UDP_WINDOW
    assert server.received == UDP_WINDOW


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (OSError(errno.EHOSTUNREACH, "unreachable"), errno.EHOSTUNREACH),
        (OSError("no errno"), errno.ECONNABORTED),
    ],
)
def test_a_failed_udp_dial_resets_with_its_errno(
    stack: FakeStack, start_worker: StartWorker, error: OSError, code: int
) -> None:
    dialer = GatedDialer(error)
    dialer.gate.set()
    worker = start_worker(dialer)
    fds = open_fds()
    dgram(stack, 8, block(8, 53), b"q")
    assert stack.expect(Cmd.RST, 8).arg == code
    assert worker.udp == {}
    assert open_fds() == fds


def test_rst_while_dialing_drops_the_session(
    stack: FakeStack, start_worker: StartWorker, udp_echo: Callable[..., UdpEcho]
) -> None:
    dialer = GatedDialer()
    worker = start_worker(dialer)
    server = udp_echo()
    dgram(stack, 9, block(9, server.port), b"never sent")
    assert dialer.started.wait(DEADLINE)
    stack.send(Cmd.RST, 9, 0)
    collected: list[Message] = []
    barrier(stack, collected)
    assert worker.udp == {}
    dialer.gate.set()
    # a new session on another id goes through: the cancelled one sent nothing
    dgram(stack, 10, block(10, server.port), b"new")
    assert reply(stack.expect(Cmd.DGRAM, 10, skip=SKIP | {Cmd.CREDIT}))[1] == b"new"
    assert server.received == 1


def test_udp_and_tcp_share_the_flow_ids_without_mixing(
    stack: FakeStack, start_worker: StartWorker, udp_echo: Callable[..., UdpEcho]
) -> None:
    worker = start_worker()
    server = udp_echo()
    dgram(stack, 30, block(30, server.port), b"u")
    stack.expect(Cmd.DGRAM, 30, skip=SKIP | {Cmd.CREDIT})
    stack.send(Cmd.CREDIT, 30, 1)  # credit for a UDP session is not a TCP flow's
    stack.send(Cmd.DATA, 30, 0, b"t")  # DATA on a UDP session's id: no such TCP flow
    assert stack.expect(Cmd.RST, 30, skip=SKIP | {Cmd.CREDIT}).arg == 0
    assert 30 in worker.udp
    wrong = AddressBlock(wire.IPPROTO_TCP, 4, ipaddress.ip_address(APP_V4), 1,
                         ipaddress.ip_address("127.0.0.1"), server.port)
    stack.send(Cmd.DGRAM, 31, 0, wrong.pack() + b"x")
    assert stack.expect(Cmd.RST, 31).arg == errno.EPROTONOSUPPORT
    assert worker.stats.protocol_errors == 1


class NotASession:
    """A dialer whose dial_udp answers what has no file descriptor to relay from."""

    def __init__(self) -> None:
        self.closed = False

    async def dial(self, dst: Address, src: Address) -> socket.socket:
        raise AssertionError("not used")

    async def dial_udp(self, dst: Address, src: Address) -> NotASession:
        return self

    def close(self) -> None:
        self.closed = True


def test_a_udp_dialer_answering_no_session_resets_with_econnaborted(
    stack: FakeStack, start_worker: StartWorker
) -> None:
    dialer = NotASession()
    worker = start_worker(dialer)
    dgram(stack, 9, block(9, 53), b"q")
    assert stack.expect(Cmd.RST, 9).arg == errno.ECONNABORTED
    assert worker.udp == {}
    assert dialer.closed  # what it answered was closed all the same
    dgram(stack, 10, block(10, 53), b"q")  # the worker still serves
    assert stack.expect(Cmd.RST, 10).arg == errno.ECONNABORTED


class FaultySession:
    """A session of a user's dialer whose `where` ("send", "recv" or "shape") goes wrong: send
    or recv raise what is not an OSError, or recv answers bytes instead of (bytes, Address).
    Its socket is a real one, connected to `server`, so its descriptor is readable when a
    reply waits; recv() fails before it reads, as code that trips over its own state would."""

    def __init__(self, where: str, server: UdpEcho) -> None:
        self.where = where
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.connect((server.host, server.port))
        self.recvs = 0
        self.closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, data: bytes | memoryview) -> bool:
        if self.where == "send":
            raise RuntimeError("a bug in send")
        if self.where == "named-errno":  # OSError takes anything for its errno
            raise OSError("EPIPE", "an errno by name")
        self.sock.send(data)
        return True

    def recv(self) -> object:
        self.recvs += 1
        if self.where == "recv":
            raise RuntimeError("a bug in recv")
        try:
            data = self.sock.recv(65535)
        except BlockingIOError:
            return None
        return data  # ("shape") not (data, address)

    def close(self) -> None:
        self.closed = True
        self.sock.close()


class FaultyDialer:
    def __init__(self, where: str, server: UdpEcho) -> None:
        self.where = where
        self.server = server
        self.sessions: list[FaultySession] = []

    async def dial(self, dst: Address, src: Address) -> socket.socket:
        raise AssertionError("not used")

    async def dial_udp(self, dst: Address, src: Address) -> FaultySession:
        self.sessions.append(FaultySession(self.where, self.server))
        return self.sessions[-1]


@pytest.mark.parametrize("where", ["send", "recv", "shape"])
def test_a_session_whose_code_fails_resets_with_econnaborted(
    stack: FakeStack, start_worker: StartWorker, udp_echo: Callable[..., UdpEcho], where: str
) -> None:
    """User code failing in a session's send or recv (or answering the wrong shape) ends that
    session with a RST (the app gets an ICMP error), closes it, and leaves the worker serving;
    it is not left registered, silent, with its reader failing on every turn of the loop."""
    server = udp_echo()
    dialer = FaultyDialer(where, server)
    worker = start_worker(dialer)
    dgram(stack, 11, block(11, server.port), b"q")
    assert stack.expect(Cmd.RST, 11, skip=SKIP | {Cmd.CREDIT}).arg == errno.ECONNABORTED
    assert worker.udp == {}
    (session,) = dialer.sessions
    assert session.closed
    assert session.recvs <= 1
    dgram(stack, 12, block(12, server.port), b"q")  # the worker still serves
    assert stack.expect(Cmd.RST, 12, skip=SKIP | {Cmd.CREDIT}).arg == errno.ECONNABORTED


def test_a_session_failing_with_what_is_no_errno_resets_with_eio(
    stack: FakeStack, start_worker: StartWorker, udp_echo: Callable[..., UdpEcho]
) -> None:
    """An OSError whose errno is no number still ends the session with a RST (EIO), where the
    RST itself failed to be made and the app heard nothing."""
    server = udp_echo()
    worker = start_worker(FaultyDialer("named-errno", server))
    dgram(stack, 13, block(13, server.port), b"q")
    assert stack.expect(Cmd.RST, 13, skip=SKIP | {Cmd.CREDIT}).arg == errno.EIO
    assert worker.udp == {}
