"""The worker against a fake stack (a ROUTER in this test) and real loopback destinations."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import queue
import select
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tunio import wire
from tunio.dialers import Address, Dialer, DirectDialer
from tunio.testing.fakestack import DEADLINE, SKIP, WINDOW, FakeStack, RunningWorker
from tunio.wire import Cmd, Message
from tunio.worker import Timing, Worker, run_worker

LINGER_ABORT = struct.pack("ii", 1, 0)


# ---- loopback destinations ---------------------------------------------------------------


class Server:
    """A loopback TCP server taking one connection and running `handler(conn, events)`."""

    def __init__(self, handler: Callable[[socket.socket, queue.Queue[Any]], None],
                 host: str = "127.0.0.1") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.create_server((host, 0), family=family)
        self.sock.settimeout(DEADLINE)
        self.port: int = self.sock.getsockname()[1]
        self.events: queue.Queue[Any] = queue.Queue()
        self.handler = handler
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError as exc:
            self.events.put(("accept-error", exc))
            return
        self.events.put(("accepted",))
        with conn:
            conn.settimeout(DEADLINE)
            try:
                self.handler(conn, self.events)
            except OSError as exc:
                self.events.put(("error", exc.errno))

    def event(self, timeout: float = DEADLINE) -> Any:
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no server event within {timeout}s") from None

    def close(self) -> None:
        self.sock.close()
        self.thread.join(DEADLINE)


def read_to_eof(conn: socket.socket) -> bytes:
    data = bytearray()
    while chunk := conn.recv(65536):
        data += chunk
    return bytes(data)


def echo(conn: socket.socket, events: queue.Queue[Any]) -> None:
    while chunk := conn.recv(65536):
        conn.sendall(chunk)
    events.put(("eof",))


# ---- fixtures ----------------------------------------------------------------------------


@pytest.fixture
def servers() -> Iterator[Callable[..., Server]]:
    made: list[Server] = []

    def make(handler: Callable[[socket.socket, queue.Queue[Any]], None],
             host: str = "127.0.0.1") -> Server:
        made.append(Server(handler, host))
        return made[-1]

    yield make
    for server in made:
        server.close()


StartWorker = Callable[..., tuple[Worker, RunningWorker]]


@pytest.fixture
def start_worker(endpoint: str) -> Iterator[StartWorker]:
    started: list[tuple[Worker, RunningWorker]] = []

    def start(dialer: Dialer | None = None, **options: Any) -> tuple[Worker, RunningWorker]:
        options.setdefault("window", WINDOW)
        options.setdefault("name", "test-worker")
        worker = Worker(endpoint, dialer or DirectDialer(), **options)

        def target(ready: Callable[[], None]) -> int:
            worker.ready = ready
            return worker.run()

        running = RunningWorker(target)
        started.append((worker, running))
        return worker, running

    yield start
    for worker, running in started:
        worker.stop()
        running.join()


def open_ok(stack: FakeStack, flow: int, server: Server, **kw: Any) -> Message:
    stack.open(flow, server.port, **kw)
    msg = stack.expect(Cmd.OPEN_OK, flow)
    assert server.event() == ("accepted",)
    return msg


# ---- session -----------------------------------------------------------------------------


def test_hello_exchange(stack: FakeStack, start_worker: StartWorker) -> None:
    _, running = start_worker(name="w-é" * 40, capacity=7)
    hello = stack.expect(Cmd.HELLO)
    assert hello.flow == 0
    assert hello.arg == 7
    assert hello.payload is not None
    name = bytes(hello.payload)
    assert len(name) <= wire.MAX_NAME
    assert ("w-é" * 40).startswith(name.decode())  # cut on a character boundary
    assert not running.ready.is_set()  # not before the stack has answered
    stack.send(Cmd.HELLO, payload=b"fake-stack")
    assert running.ready.wait(DEADLINE)


def test_bye_from_stack_makes_run_worker_return_0(
    stack: FakeStack, endpoint: str, servers: Callable[..., Server]
) -> None:
    running = RunningWorker(
        lambda ready: run_worker(endpoint, DirectDialer(), name="bye", ready=ready)
    )
    stack.handshake(running)

    def wait_for_reset(conn: socket.socket, events: queue.Queue[Any]) -> None:
        events.put(("read", read_to_eof(conn)))

    server = servers(wait_for_reset)
    open_ok(stack, 1, server)
    stack.send(Cmd.BYE, arg=0)
    assert running.join() == 0
    assert server.event() == ("error", errno.ECONNRESET)  # flows are closed abortively


class Stubborn:
    """A dialer whose dial catches every CancelledError and carries on, until released."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.cancels = 0

    async def dial(self, dst: Address, src: Address) -> socket.socket:
        self.started.set()
        while not self.release.is_set():
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                self.cancels += 1
        raise ConnectionRefusedError(errno.ECONNREFUSED, "released")


def test_a_dial_that_ignores_its_cancel_does_not_hold_the_worker_up_at_exit(
    stack: FakeStack, endpoint: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The stack's BYE ends the worker even while a dialer swallows the CancelledError of its
    dial: the wait for it is bounded and said, where asyncio.run would wait for ever (a
    tunio-worker that never exits, a local one killed after the stop deadline)."""
    dialer = Stubborn()
    running = RunningWorker(lambda ready: run_worker(endpoint, dialer, name="stubborn",
                                                     ready=ready))  # fmt: skip
    stack.handshake(running)
    try:
        stack.open(1, 9)
        assert dialer.started.wait(DEADLINE)
        with caplog.at_level(logging.WARNING, "tunio.worker"):
            stack.send(Cmd.BYE, arg=0)
            assert running.join() == 0
        assert dialer.cancels >= 1
        [said] = [r.getMessage() for r in caplog.records if "did not end" in r.getMessage()]
        assert said == ("worker stubborn: 1 task did not end when cancelled (a dialer that "
                        "catches CancelledError?); the worker exits without it")  # fmt: skip
    finally:
        dialer.release.set()


@contextlib.contextmanager
def _worker_process(stack: FakeStack, endpoint: str, prelude: str = "") -> Iterator[Any]:
    """run_worker in a process of its own (after `prelude`), greeted by `stack` and ready; it
    is killed at the end if it still runs."""
    code = textwrap.dedent(
        """
        import sys
        {prelude}
        from tunio.dialers import DirectDialer
        from tunio.worker import run_worker
        sys.exit(run_worker(sys.argv[1], DirectDialer(), name="sig",
                            ready=lambda: print("ready", flush=True)))
        """
    ).format(prelude=prelude)
    env = dict(os.environ, PYTHONPATH=str(Path(wire.__file__).resolve().parents[1]))
    with subprocess.Popen(
        [sys.executable, "-c", code, endpoint], stdout=subprocess.PIPE, env=env, text=True
    ) as proc:
        try:
            assert proc.stdout is not None
            stack.expect(Cmd.HELLO)
            stack.send(Cmd.HELLO, payload=b"fake-stack")
            readable, _, _ = select.select([proc.stdout], [], [], DEADLINE)
            assert readable, "the worker did not report ready"
            assert proc.stdout.readline() == "ready\n"
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()


def test_sigterm_sends_bye_and_exits_0(stack: FakeStack, endpoint: str) -> None:
    with _worker_process(stack, endpoint) as proc:
        proc.send_signal(signal.SIGTERM)
        bye = stack.expect(Cmd.BYE)
        assert bye.arg == 0
        assert proc.wait(DEADLINE) == 0


def _signal_masks(pid: int) -> dict[str, int]:
    """SigIgn and SigCgt of process `pid` (/proc/PID/status): the signals it ignores and
    those it has handlers for, as bit masks (signal n is bit n - 1)."""
    masks: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("SigIgn", "SigCgt"):
            masks[key] = int(value, 16)
    return masks


def test_a_worker_started_with_sigint_ignored_keeps_it_ignored(
    stack: FakeStack, endpoint: str
) -> None:
    """A supervisor's child ignores SIGINT (tunio.process.reset_child): a terminal's Ctrl-C,
    sent to the whole process group, is the supervisor's to act on. The worker keeps it
    ignored instead of taking it as a stop of its own (and so does the stack), and still stops
    on SIGTERM."""
    pid = os.fork()
    if pid == 0:  # what a supervisor's child is left with after reset_child
        from tunio.process import reset_child  # noqa: PLC0415

        reset_child((), "tunio-test-child")
        os._exit(0 if signal.getsignal(signal.SIGINT) is signal.SIG_IGN else 1)
    assert os.waitpid(pid, 0)[1] == 0
    prelude = "import signal; signal.signal(signal.SIGINT, signal.SIG_IGN)"
    with _worker_process(stack, endpoint, prelude) as proc:
        masks = _signal_masks(proc.pid)  # its handlers are in place before it is ready
        assert masks["SigIgn"] & (1 << (signal.SIGINT - 1))
        assert not masks["SigCgt"] & (1 << (signal.SIGINT - 1))
        assert masks["SigCgt"] & (1 << (signal.SIGTERM - 1))
        proc.send_signal(signal.SIGTERM)
        assert stack.expect(Cmd.BYE).arg == 0
        assert proc.wait(DEADLINE) == 0


def test_wrong_version_gets_bye_and_the_worker_carries_on(
    stack: FakeStack, start_worker: StartWorker
) -> None:
    worker, running = start_worker()
    stack.handshake(running)
    stack.send_raw([struct.pack(">BBHIQ", wire.VERSION + 1, Cmd.OPEN, 0, 1, WINDOW), bytes(40)])
    bye = stack.expect(Cmd.BYE)
    assert bye.arg == errno.EPROTONOSUPPORT
    # a wrong header size: counted, no answer
    stack.send_raw([bytes([wire.VERSION, Cmd.DATA]) + b"short"])
    stack.assert_freed(1)  # still serving (and the bad OPEN made no flow)
    assert worker.stats.protocol_errors == 2
    assert running.thread.is_alive()


def test_a_data_path_message_of_three_frames_is_a_protocol_error(
    stack: FakeStack, start_worker: StartWorker
) -> None:
    worker, running = start_worker()
    stack.handshake(running)
    stack.send_raw([wire.header(Cmd.CREDIT, 1, 5), b"", b""])
    stack.send_raw([wire.header(Cmd.FIN, 1, 0), b"", b""])
    stack.assert_freed(1)  # no answer to either, and still serving
    assert worker.stats.protocol_errors == 2


def test_stack_silence_drops_flows_and_says_hello_again(
    stack: FakeStack, start_worker: StartWorker, servers: Callable[..., Server]
) -> None:
    worker, running = start_worker(timing=Timing(heartbeat=0.1, liveness=3))
    stack.handshake(running)

    def wait_for_reset(conn: socket.socket, events: queue.Queue[Any]) -> None:
        events.put(("read", read_to_eof(conn)))

    server = servers(wait_for_reset)
    open_ok(stack, 1, server)
    # from here on the stack says nothing: the worker keeps beating, then gives up
    again = stack.expect(Cmd.HELLO, timeout=5.0)
    assert again.payload is not None
    assert bytes(again.payload) == b"test-worker"
    assert any(m.cmd is Cmd.HEARTBEAT for m in stack.skipped)
    assert server.event() == ("error", errno.ECONNRESET)
    stack.send(Cmd.HELLO, payload=b"fake-stack")
    stack.assert_freed(1)
    assert worker.stats.sessions == 2


def test_a_worker_no_stack_answers_says_so_and_keeps_trying(
    stack: FakeStack, start_worker: StartWorker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tunio.worker")
    worker, running = start_worker(timing=Timing(heartbeat=0.05, liveness=2))
    for _ in range(5):  # the first HELLO and four said again: none answered
        stack.expect(Cmd.HELLO)
    said = [r.getMessage() for r in caplog.records if "no stack answers" in r.getMessage()]
    # at the 1st, 2nd and 4th unanswered HELLO, not at each
    assert said == [
        f"worker test-worker: no stack answers at {worker.endpoint} ({n} HELLOs unanswered): "
        "still trying"
        for n in (1, 2, 4)
    ]
    stack.send(Cmd.HELLO, payload=b"fake-stack")  # a stack at last: the worker serves
    assert running.ready.wait(DEADLINE)
    assert worker.stats.sessions == 1


# ---- opening flows -----------------------------------------------------------------------


def test_open_to_closed_port_fails_with_econnrefused(
    stack: FakeStack, start_worker: StartWorker, caplog: pytest.LogCaptureFixture
) -> None:
    worker, running = start_worker()
    stack.handshake(running)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))  # bound, never listening: connect is refused
        port = held.getsockname()[1]
        with caplog.at_level("INFO", logger="tunio.worker"):
            stack.open(3, port)
            fail = stack.expect(Cmd.OPEN_FAIL, 3)
    assert fail.arg == errno.ECONNREFUSED
    assert worker.stats.open_fail == 1
    lines = [r.getMessage() for r in caplog.records if "ECONNREFUSED" in r.getMessage()]
    assert len(lines) == 1
    assert f"127.0.0.1:{port}" in lines[0]
    stack.assert_freed(3)


def test_dial_timeout_fails_with_etimedout(stack: FakeStack, start_worker: StartWorker) -> None:
    _, running = start_worker(connect_timeout=0.3)
    stack.handshake(running)
    with socket.socket() as srv, socket.socket() as first:
        srv.bind(("127.0.0.1", 0))
        srv.listen(0)
        first.connect(srv.getsockname())  # a full accept queue: further SYNs are dropped
        stack.open(4, srv.getsockname()[1])
        assert stack.expect(Cmd.OPEN_FAIL, 4).arg == errno.ETIMEDOUT


class RaisingDialer:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    async def dial(self, dst: Address, src: Address) -> socket.socket:
        raise self.exc


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (RuntimeError("bug in a dialer"), errno.ECONNABORTED),
        (OSError("no errno"), errno.ECONNABORTED),
        # OSError takes anything as its errno: what is no errno number is none either (these
        # failed the OPEN_FAIL itself, and the app heard nothing)
        (OSError("EHOSTUNREACH", "a name"), errno.ECONNABORTED),
        (OSError(-5, "negative"), errno.ECONNABORTED),
        (OSError(2**40, "too large"), errno.ECONNABORTED),
        (OSError(errno.EHOSTUNREACH, "unreachable"), errno.EHOSTUNREACH),
        (TimeoutError(), errno.ETIMEDOUT),
    ],
)
def test_dialer_errors_become_errnos(
    stack: FakeStack, start_worker: StartWorker, exc: BaseException, code: int
) -> None:
    _, running = start_worker(RaisingDialer(exc))
    stack.handshake(running)
    stack.open(5, 9)
    assert stack.expect(Cmd.OPEN_FAIL, 5).arg == code


def test_no_local_port_is_one_warning_with_the_hint(
    stack: FakeStack, start_worker: StartWorker, caplog: pytest.LogCaptureFixture
) -> None:
    _, running = start_worker(RaisingDialer(OSError(errno.EADDRNOTAVAIL, "no port")))
    stack.handshake(running)
    with caplog.at_level("WARNING", logger="tunio.worker"):
        for fid in (5, 6, 7):  # a flood of them: one line
            stack.open(fid, 9)
            assert stack.expect(Cmd.OPEN_FAIL, fid).arg == errno.EADDRNOTAVAIL
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "TIME_WAIT" in warnings[0]
    assert "net.ipv4.tcp_tw_reuse" in warnings[0]


class HangingDialer:
    def __init__(self) -> None:
        self.started = threading.Event()
        self.cancelled = threading.Event()

    async def dial(self, dst: Address, src: Address) -> socket.socket:
        self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        raise AssertionError("unreachable")


def test_rst_while_dialing_cancels_the_dial(stack: FakeStack, start_worker: StartWorker) -> None:
    dialer = HangingDialer()
    _, running = start_worker(dialer)
    stack.handshake(running)
    stack.open(6, 80)
    assert dialer.started.wait(DEADLINE)
    stack.send(Cmd.RST, 6, errno.ECONNRESET)
    assert dialer.cancelled.wait(DEADLINE)
    stack.assert_freed(6)  # and neither OPEN_OK nor OPEN_FAIL came before that RST


def test_capacity_and_non_tcp_opens_are_refused(
    stack: FakeStack, start_worker: StartWorker, servers: Callable[..., Server]
) -> None:
    _, running = start_worker(capacity=1)
    stack.handshake(running)
    server = servers(echo)
    open_ok(stack, 1, server)
    stack.open(2, server.port)
    assert stack.expect(Cmd.OPEN_FAIL, 2).arg == errno.EAGAIN
    stack.send(Cmd.RST, 1)
    stack.assert_freed(1)
    stack.open(3, server.port, proto=wire.IPPROTO_UDP)
    assert stack.expect(Cmd.OPEN_FAIL, 3).arg == errno.EPROTONOSUPPORT


# ---- data, credit, half-close, reset -----------------------------------------------------


def pump(stack: FakeStack, flow: int, data: bytes, *, expect_back: int, stack_window: int,
         worker_window: int, chunk: int = 16384) -> tuple[bytes, int]:
    """Send `data` within the worker's credit while taking DATA back within ours.

    Returns the bytes received and the credit the worker returned (by CREDIT, or carried on
    its DATA).
    """
    sent = outstanding = credited = unacked = 0
    received = bytearray()
    deadline = time.monotonic() + DEADLINE
    while sent < len(data) or len(received) < expect_back:
        while sent < len(data) and outstanding < worker_window:
            size = min(chunk, len(data) - sent, worker_window - outstanding)
            stack.send(Cmd.DATA, flow, 0, data[sent : sent + size])
            sent += size
            outstanding += size
        msg = stack.recv(max(0.0, deadline - time.monotonic()))
        if msg.cmd in (Cmd.DATA, Cmd.CREDIT):
            assert msg.flow == flow
            outstanding -= msg.arg
            credited += msg.arg
            assert outstanding >= 0, "credit for bytes never sent"
        if msg.cmd is Cmd.DATA:
            assert msg.payload is not None
            received += msg.payload
            unacked += len(msg.payload)
            assert unacked <= stack_window, "the worker sent beyond its credit"
            if unacked >= stack_window // 2:  # credit in batches, as a busy app would
                stack.send(Cmd.CREDIT, flow, unacked)
                unacked = 0
        elif msg.cmd is not Cmd.CREDIT:
            assert msg.cmd is Cmd.HEARTBEAT, f"unexpected {msg}"
    return bytes(received), credited


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_echo_is_byte_exact_both_ways(
    stack: FakeStack, start_worker: StartWorker, servers: Callable[..., Server], host: str
) -> None:
    worker, running = start_worker()
    stack.handshake(running)
    server = servers(echo, host)
    ok = open_ok(stack, 7, server, host=host)
    assert ok.arg == WINDOW  # the window the stack may use towards us
    data = os.urandom(1024 * 1024 + 17)
    back, credited = pump(stack, 7, data, expect_back=len(data), stack_window=WINDOW,
                          worker_window=ok.arg)
    assert back == data
    stack.send(Cmd.FIN, 7)
    assert server.event() == ("eof",)
    # the echo server closes: FIN comes back after the last credit
    stack.expect(Cmd.FIN, 7, skip=SKIP | {Cmd.CREDIT})
    credited += sum(m.arg for m in stack.skipped if m.cmd is Cmd.CREDIT)
    assert credited == len(data)
    stack.assert_freed(7)
    assert worker.stats.bytes_to_stack == len(data)
    assert worker.stats.bytes_to_destination == len(data)


def test_worker_never_exceeds_the_stack_window(
    stack: FakeStack, start_worker: StartWorker, servers: Callable[..., Server]
) -> None:
    _, running = start_worker()
    stack.handshake(running)
    data = os.urandom(1024 * 1024)
    window = 48 * 1024

    def source(conn: socket.socket, events: queue.Queue[Any]) -> None:
        conn.sendall(data)
        events.put(("sent",))

    server = servers(source)
    open_ok(stack, 8, server, window=window)
    received = bytearray()
    while len(received) < window:
        msg = stack.expect(Cmd.DATA, 8)
        assert msg.payload is not None
        received += msg.payload
        assert len(received) <= window
    # two round trips through the worker's loop: had it any credit left, more DATA would
    # come before these answers
    stack.assert_freed(99)
    stack.assert_freed(98)
    assert len(received) == window
    # credit in small pieces: the worker may only ever use what it was given
    given = window
    while len(received) < len(data):
        stack.send(Cmd.CREDIT, 8, 5000)
        given += 5000
        msg = stack.expect(Cmd.DATA, 8)
        assert msg.payload is not None
        received += msg.payload
        assert len(received) <= given
    assert bytes(received) == data
    assert server.event() == ("sent",)


class SmallSendBuffer:
    """A direct dialer whose sockets have a tiny send buffer, so the worker has to queue."""

    async def dial(self, dst: Address, src: Address) -> socket.socket:
        sock = await DirectDialer().dial(dst, src)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        return sock


def test_slow_destination_holds_credit_until_written(
    stack: FakeStack, start_worker: StartWorker, servers: Callable[..., Server]
) -> None:
    window = 1024 * 1024
    worker, running = start_worker(SmallSendBuffer(), window=window)
    stack.handshake(running)
    go = threading.Event()

    def slow_sink(conn: socket.socket, events: queue.Queue[Any]) -> None:
        events.put(("waiting",))
        assert go.wait(DEADLINE)
        events.put(("read", read_to_eof(conn)))

    server = servers(slow_sink)
    open_ok(stack, 9, server)
    assert server.event() == ("waiting",)
    data = os.urandom(window)
    for offset in range(0, window, 32768):
        stack.send(Cmd.DATA, 9, 0, data[offset : offset + 32768])
    stack.send(Cmd.FIN, 9)  # with data still queued in the worker: shut down after it
    stack.assert_freed(97)  # the worker has taken everything in
    credited = sum(m.arg for m in stack.skipped if m.cmd is Cmd.CREDIT)
    assert credited < window, "credit returned for bytes the destination has not taken"
    assert credited <= worker.stats.bytes_to_destination
    go.set()
    assert server.event() == ("read", data)
    # credit under a quarter window may be held back to ride on DATA the destination may still
    # send; the rest comes as CREDIT once written
    while credited < window - window // 4:
        credited += stack.expect(Cmd.CREDIT, 9).arg
    # the destination closes after reading: the worker says FIN, with the credit it held first
    seen = len(stack.skipped)
    stack.expect(Cmd.FIN, 9, skip=SKIP | {Cmd.CREDIT})
    credited += sum(m.arg for m in stack.skipped[seen:] if m.cmd is Cmd.CREDIT)
    assert credited == window


def test_data_beyond_the_window_resets_the_flow(
    stack: FakeStack, start_worker: StartWorker, servers: Callable[..., Server]
) -> None:
    _, running = start_worker(SmallSendBuffer(), window=8192)
    stack.handshake(running)
    go = threading.Event()

    def stalled(conn: socket.socket, events: queue.Queue[Any]) -> None:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        go.wait(DEADLINE)

    server = servers(stalled)
    open_ok(stack, 10, server)
    for _ in range(200):  # far beyond 8 KiB and beyond what the kernel buffers hold
        stack.send(Cmd.DATA, 10, 0, bytes(8192))
    rst = stack.expect(Cmd.RST, 10, skip=SKIP | {Cmd.CREDIT})
    assert rst.arg == errno.EPROTO
    go.set()


def test_fin_from_stack_half_closes_towards_the_destination(
    stack: FakeStack, start_worker: StartWorker, servers: Callable[..., Server]
) -> None:
    _, running = start_worker()
    stack.handshake(running)

    def reply_after_eof(conn: socket.socket, events: queue.Queue[Any]) -> None:
        events.put(("read", read_to_eof(conn)))
        conn.sendall(b"after-eof")  # the other direction still flows

    server = servers(reply_after_eof)
    open_ok(stack, 11, server)
    stack.send(Cmd.DATA, 11, 0, b"request")
    stack.send(Cmd.FIN, 11)
    assert server.event() == ("read", b"request")
    data = stack.expect(Cmd.DATA, 11, skip=SKIP | {Cmd.CREDIT})
    assert data.payload == b"after-eof"
    stack.expect(Cmd.FIN, 11, skip=SKIP | {Cmd.CREDIT})
    stack.assert_freed(11)


def test_fin_from_destination_half_closes_towards_the_stack(
    stack: FakeStack, start_worker: StartWorker, servers: Callable[..., Server]
) -> None:
    _, running = start_worker()
    stack.handshake(running)

    def close_first(conn: socket.socket, events: queue.Queue[Any]) -> None:
        conn.sendall(b"bye")
        conn.shutdown(socket.SHUT_WR)
        events.put(("read", read_to_eof(conn)))

    server = servers(close_first)
    open_ok(stack, 12, server)
    data = stack.expect(Cmd.DATA, 12)
    assert data.payload == b"bye"
    stack.expect(Cmd.FIN, 12)
    stack.send(Cmd.DATA, 12, 0, b"still ")
    stack.send(Cmd.DATA, 12, 0, b"flowing")
    credit = stack.expect(Cmd.CREDIT, 12)
    stack.send(Cmd.FIN, 12)
    assert server.event() == ("read", b"still flowing")
    if credit.arg < len(b"still flowing"):
        assert stack.expect(Cmd.CREDIT, 12).arg == len(b"still flowing") - credit.arg
    stack.assert_freed(12)


def test_destination_reset_becomes_rst(
    stack: FakeStack, start_worker: StartWorker, servers: Callable[..., Server]
) -> None:
    _, running = start_worker()
    stack.handshake(running)

    opened = threading.Event()

    def abort(conn: socket.socket, events: queue.Queue[Any]) -> None:
        assert opened.wait(DEADLINE)  # a reset before that would make the dial fail instead
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ABORT)

    server = servers(abort)
    open_ok(stack, 13, server)
    opened.set()
    rst = stack.expect(Cmd.RST, 13)
    assert rst.arg == errno.ECONNRESET
    stack.assert_freed(13)


def test_rst_from_stack_resets_the_destination(
    stack: FakeStack, start_worker: StartWorker, servers: Callable[..., Server]
) -> None:
    worker, running = start_worker()
    stack.handshake(running)

    def wait(conn: socket.socket, events: queue.Queue[Any]) -> None:
        events.put(("read", read_to_eof(conn)))

    server = servers(wait)
    open_ok(stack, 14, server)
    stack.send(Cmd.RST, 14, errno.ECONNRESET)
    assert server.event() == ("error", errno.ECONNRESET)
    stack.assert_freed(14)  # also: no RST is answered with a RST
    assert worker.stats.resets_received == 1


def test_unknown_flows(stack: FakeStack, start_worker: StartWorker) -> None:
    worker, running = start_worker()
    stack.handshake(running)
    stack.send(Cmd.CREDIT, 21, 100)  # late: ignored
    stack.send(Cmd.FIN, 22)  # late: ignored
    stack.send(Cmd.RST, 23)  # never answered
    stack.send(Cmd.DATA, 24, 0, b"x")
    rst = stack.expect(Cmd.RST, 24)  # the first answer is to the DATA
    assert rst.arg == 0
    assert worker.stats.resets_sent == 1


def test_stop_before_run_still_says_bye(stack: FakeStack, endpoint: str) -> None:
    worker = Worker(endpoint, DirectDialer(), name="early")
    worker.stop()
    assert worker.run() == 0
    assert stack.expect(Cmd.HELLO).arg == 0
    assert stack.expect(Cmd.BYE).arg == 0


# ---- a handler's fault -------------------------------------------------------------------


def test_a_fault_handling_a_message_ends_its_flow_only(
    stack: FakeStack, start_worker: StartWorker, servers: Callable[..., Server],
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """A message whose handling raises (a bug, or user code under it) ends the flow it was for:
    RST(ECONNABORTED) for an open flow, OPEN_FAIL(ECONNABORTED) for an OPEN that never made a
    flow; the other flows and the worker carry on."""
    from tunio.worker.opening import TcpOpener  # noqa: PLC0415
    from tunio.worker.tcp import TcpTable  # noqa: PLC0415

    real_on_data, real_on_open = TcpTable.on_data, TcpOpener.on_open

    def on_data(self: TcpTable, fid: int, payload: wire.Payload, credit: int = 0) -> None:
        if fid == 31:
            raise RuntimeError("a fault handling DATA")
        real_on_data(self, fid, payload, credit)

    def on_open(self: TcpOpener, fid: int, credit: int, payload: wire.Payload) -> None:
        if fid == 33:
            raise RuntimeError("a fault handling OPEN")
        real_on_open(self, fid, credit, payload)

    monkeypatch.setattr(TcpTable, "on_data", on_data)
    monkeypatch.setattr(TcpOpener, "on_open", on_open)
    worker, running = start_worker()
    stack.handshake(running)

    def wait(conn: socket.socket, events: queue.Queue[Any]) -> None:
        events.put(("read", read_to_eof(conn)))

    server, other = servers(wait), servers(wait)  # (a server takes one connection at a time)
    open_ok(stack, 31, server)
    open_ok(stack, 32, other)
    with caplog.at_level(logging.ERROR, "tunio.worker"):
        stack.send(Cmd.DATA, 31, 0, b"lost")
        assert stack.expect(Cmd.RST, 31).arg == errno.ECONNABORTED
        stack.open(33, server.port)
        assert stack.expect(Cmd.OPEN_FAIL, 33).arg == errno.ECONNABORTED
    assert server.event() == ("error", errno.ECONNRESET)  # flow 31's destination: reset
    stack.send(Cmd.DATA, 32, 0, b"still here")
    stack.send(Cmd.FIN, 32)
    assert other.event() == ("read", b"still here")
    assert 31 not in worker.flows
    assert any("handling a message failed" in r.getMessage() and r.exc_info
               for r in caplog.records)  # fmt: skip


class BlockingDialer:
    """A dialer that blocks the loop (time.sleep) before it connects: the mistake the stall
    watch is for."""

    def __init__(self, hold: float) -> None:
        self.hold = hold

    async def dial(self, dst: Address, src: Address) -> socket.socket:
        time.sleep(self.hold)  # blocks every flow of the worker, and its heartbeat
        return await DirectDialer().dial(dst, src)


def test_a_dialer_that_blocks_the_loop_is_warned_of(
    stack: FakeStack, start_worker: StartWorker, servers: Callable[..., Server],
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    from tunio.worker import stall  # noqa: PLC0415

    hold = stall.TICK + stall.STALL + 0.2  # long enough to be seen whatever the tick's phase
    worker, running = start_worker(BlockingDialer(hold))
    stack.handshake(running)
    server = servers(echo)
    with caplog.at_level(logging.WARNING, "tunio.worker"):
        open_ok(stack, 41, server)
        # the watch looks again within a tick of the loop's release
        deadline = time.monotonic() + DEADLINE
        while worker.stalls.stalls == 0:
            assert time.monotonic() < deadline, "the stall was never seen"
            stack.send(Cmd.DATA, 9999, 0, b"?")  # any answer is a pass of the loop
            assert stack.expect(Cmd.RST, 9999)
    assert worker.stalls.stalls == 1
    assert worker.stalls.longest >= stall.STALL
    [warning] = [r.getMessage() for r in caplog.records if "held up" in r.getMessage()]
    assert warning.startswith("worker test-worker: its loop was held up for ")
    assert "a dialer or policy calling time.sleep" in warning
