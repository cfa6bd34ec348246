"""One process of the flood client: up to `concurrency` connections at a time in an epoll loop.

Each connection carries its own stream (seeded by its index) and checks every byte it gets back:
echo compares the echoed bytes, source compares the server's stream with the one it computes
itself, sink compares the server's SHA-256 with the hash of what it sent.
"""

from __future__ import annotations

import errno
import hashlib
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from flood_common import (
    CHUNK,
    DIGEST_SIZE,
    REQUEST,
    TURN,
    Stream,
    Yield,
    error_name,
    handshake_age,
)
from flood_socks import Handshake, SocksError


class Held(Exception):
    """The connection has more to send than the rate allows now: it waits for the bucket."""


_BURST = 0.02  # seconds of plan.rate that may go at once
_EVENTS = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
_REPORT_EVERY = 0.2  # seconds between progress reports


@dataclass(frozen=True)
class Plan:
    family: int
    addr: tuple[str, int]
    mode: str
    nbytes: int  # payload per connection
    first: int  # index of this process's first connection (names its streams)
    count: int
    concurrency: int
    deadline: float  # time.monotonic() at which unfinished connections fail with "timeout"
    nonce: int  # distinguishes runs: part of every stream's seed
    proxy: tuple[str, int] | None = None  # a SOCKS5 proxy to reach `addr` through
    # time.monotonic() after which no connection is opened (those open still finish); the ones
    # not opened by then are not counted at all. None: all `count` are opened.
    open_until: float | None = None
    rate: float | None = None  # bytes per second this process sends at most (None: no bound)


@dataclass
class Outcome:
    ok: int = 0
    failed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    bytes_sent: int = 0
    bytes_received: int = 0
    latencies_us: list[int] = field(default_factory=list)
    connect_ns: list[int] = field(default_factory=list)  # connect() to seen established, ok ones
    handshake_ns: list[int] = field(default_factory=list)  # connect() to the kernel's SYN-ACK
    syn_retransmits: int = 0  # SYNs the kernel sent again, over every ok connection
    start: float = 0.0
    end: float = 0.0

    def fail(self, name: str, count: int = 1) -> None:
        self.failed += count
        self.errors[name] = self.errors.get(name, 0) + count


class _Conn:
    __slots__ = (
        "answer",
        "check",
        "connected_ns",
        "done_ns",
        "handshake_ns",
        "hasher",
        "out",
        "received",
        "sent",
        "shut",
        "sock",
        "socks",
        "start_ns",
        "stream",
    )

    def __init__(self, sock: socket.socket, stream: Stream, mode: str, start_ns: int,
                 socks: Handshake | None) -> None:
        self.sock = sock
        self.socks = socks  # the SOCKS5 handshake still to do before the test stream
        self.stream = stream
        self.start_ns = start_ns
        self.done_ns = 0  # when the last expected byte arrived
        self.connected_ns = 0  # when the handshake was seen done
        self.handshake_ns = 0  # when the kernel got the SYN-ACK (TCP_INFO), however late seen
        self.sent = 0  # payload bytes sent
        self.received = 0  # payload bytes received (echo, source)
        self.shut = False  # our FIN is out
        # echo checks the echo against a second copy (the sender relabels its own buffer)
        self.check = Stream(stream.seed, stream.length) if mode == "echo" else stream
        self.hasher = hashlib.sha256() if mode == "sink" else None
        self.answer = bytearray()  # sink: the server's digest
        self.out: memoryview | None = (
            memoryview(REQUEST.pack(stream.seed, stream.length)) if mode == "source" else None
        )


class _Client:
    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.buf = bytearray(CHUNK)
        self.view = memoryview(self.buf)
        self.result = Outcome()
        self.again: dict[int, _Conn] = {}  # connections that yielded with work left
        # plan.rate: a token bucket of bytes; a connection that finds it empty waits in `held`
        # (epoll is edge-triggered: it would not wake for a socket that stayed writable)
        self.tokens = 0.0
        self.refilled = time.monotonic()
        self.held: dict[int, _Conn] = {}
        self.left = 0
        steps: dict[str, Callable[[_Conn], str | None]] = {
            "echo": self._echo,
            "sink": self._sink,
            "source": self._source,
        }
        self.step = steps[plan.mode]

    def _spend(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise Yield

    def _send_payload(self, c: _Conn) -> None:
        """Send as much of the stream as the socket takes, then our FIN."""
        length = c.stream.length
        while c.sent < length:
            self._spend()
            if self.plan.rate is not None and self.tokens <= 0:
                raise Held
            if not c.out:
                chunk = c.stream.chunk(c.sent // CHUNK)
                if c.hasher is not None:
                    c.hasher.update(chunk)
                c.out = chunk
            try:
                n = c.sock.send(c.out)
            except BlockingIOError:
                return
            c.sent += n
            self.tokens -= n
            self.result.bytes_sent += n
            c.out = c.out[n:]
        if not c.shut:
            c.sock.shutdown(socket.SHUT_WR)
            c.shut = True

    def _receive_stream(self, c: _Conn) -> str | None:
        """Read and check the stream until EOF: "" when exact, else what went wrong."""
        while True:
            self._spend()
            try:
                n = c.sock.recv_into(self.buf)
            except BlockingIOError:
                return None
            if n == 0:
                return "" if c.received == c.check.length else "eof"
            self.result.bytes_received += n
            if c.received + n > c.check.length:
                return "excess"
            if not c.check.matches(c.received, self.view[:n]):
                return "verify"
            c.received += n
            if c.received == c.check.length:
                c.done_ns = time.monotonic_ns()

    def _echo(self, c: _Conn) -> str | None:
        try:
            self._send_payload(c)
        except Held:
            outcome = self._receive_stream(c)  # the echo of what went keeps coming back
            if outcome is not None:
                return outcome
            raise
        return self._receive_stream(c)

    def _source(self, c: _Conn) -> str | None:
        while c.out:
            n = c.sock.send(c.out)  # BlockingIOError: not connected yet
            c.out = c.out[n:]
        if not c.shut:
            c.sock.shutdown(socket.SHUT_WR)
            c.shut = True
        return self._receive_stream(c)

    def _sink(self, c: _Conn) -> str | None:
        self._send_payload(c)
        while True:
            data = c.sock.recv(DIGEST_SIZE + 1)  # BlockingIOError: nothing yet
            if not data:
                break
            c.answer += data
            if len(c.answer) >= DIGEST_SIZE:
                c.done_ns = c.done_ns or time.monotonic_ns()
        if len(c.answer) < DIGEST_SIZE or c.sent < c.stream.length:
            return "eof"
        if len(c.answer) > DIGEST_SIZE:
            return "excess"
        assert c.hasher is not None
        return "" if c.answer == c.hasher.digest() else "verify"

    def _advance(self, c: _Conn) -> str | None:
        self.left = TURN
        if not c.connected_ns:
            try:
                c.sock.getpeername()  # ENOTCONN while the handshake runs
            except OSError:
                pass
            else:
                c.connected_ns = time.monotonic_ns()
                self._handshake_done(c)
        try:
            if c.socks is not None:
                c.socks.step(c.sock)
                c.socks = None
            return self.step(c)
        except BlockingIOError:
            return None
        except Yield:
            self.again[c.sock.fileno()] = c
            return None
        except Held:
            self.held[c.sock.fileno()] = c
            return None
        except SocksError as exc:
            return str(exc)
        except OSError as exc:
            return error_name(exc)

    def _handshake_done(self, c: _Conn) -> None:
        """When the kernel finished the handshake, and its SYN retransmits: nothing is sent yet."""
        try:
            ack_age_ms, retransmits = handshake_age(c.sock)
        except OSError:
            c.handshake_ns = c.connected_ns
            return
        c.handshake_ns = max(c.start_ns, c.connected_ns - ack_age_ms * 1_000_000)
        self.result.syn_retransmits += retransmits

    def _finish(self, c: _Conn, outcome: str) -> None:
        c.sock.close()
        if outcome:
            self.result.fail(outcome)
        else:
            self.result.ok += 1
            self.result.latencies_us.append((c.done_ns or time.monotonic_ns()) - c.start_ns)
            if c.connected_ns:
                self.result.connect_ns.append(c.connected_ns - c.start_ns)
                self.result.handshake_ns.append(c.handshake_ns - c.start_ns)

    def _open(self, index: int, ep: select.epoll, conns: dict[int, _Conn]) -> None:
        plan = self.plan
        seed = (plan.nonce << 32) | (plan.first + index)
        start_ns = time.monotonic_ns()
        try:
            sock = socket.socket(plan.family, socket.SOCK_STREAM)
        except OSError as exc:
            self.result.fail(error_name(exc))
            return
        sock.setblocking(False)
        rc = sock.connect_ex(plan.proxy or plan.addr)
        socks = Handshake(plan.addr) if plan.proxy else None
        c = _Conn(sock, Stream(seed, plan.nbytes), plan.mode, start_ns, socks)
        if rc not in (0, errno.EINPROGRESS):
            self._finish(c, errno.errorcode.get(rc, f"errno{rc}"))
            return
        # Over loopback the handshake is often done already: go as far as we can before epoll.
        outcome = self._advance(c)
        if outcome is not None:
            self._finish(c, outcome)
            return
        fd = sock.fileno()
        conns[fd] = c
        ep.register(fd, _EVENTS)

    def _refill(self, now: float) -> float:
        """Adds the bytes earned since the last refill (at most a 20 ms burst): 0 when some may
        be sent now, else the seconds until some may."""
        rate = self.plan.rate
        assert rate is not None
        self.tokens = min(self.tokens + (now - self.refilled) * rate, rate * _BURST)
        self.refilled = now
        return 0.0 if self.tokens > 0 else max(-self.tokens / rate, 0.001)

    def _turn(self, conns: dict[int, _Conn], fd: int, c: _Conn) -> None:
        outcome = self._advance(c)
        if outcome is not None:
            del conns[fd]
            self._finish(c, outcome)

    def run(self, report: Callable[[int], None] | None) -> Outcome:
        plan, result = self.plan, self.result
        conns: dict[int, _Conn] = {}
        opened = 0
        next_report = 0.0
        result.start = time.monotonic()
        with select.epoll() as ep:
            while True:
                while len(conns) < plan.concurrency and opened < plan.count:
                    if plan.open_until is not None and time.monotonic() >= plan.open_until:
                        break
                    self._open(opened, ep, conns)
                    opened += 1
                now = time.monotonic()
                closing = plan.open_until is not None and now >= plan.open_until
                if report is not None and now >= next_report:
                    report(result.ok + result.failed)
                    next_report = now + _REPORT_EVERY
                if not conns and (opened >= plan.count or closing):
                    break
                if now >= plan.deadline:
                    break
                wait = 0 if self.again else min(plan.deadline - now, _REPORT_EVERY)
                if self.held and not self.again:
                    wait = min(wait, self._refill(now))
                for fd, _ in ep.poll(wait):
                    self._turn(conns, fd, conns[fd])
                if self.held and self._refill(time.monotonic()) == 0:
                    self.again.update(self.held)
                    self.held = {}
                again, self.again = self.again, {}
                for fd, c in again.items():
                    if conns.get(fd) is c:
                        self._turn(conns, fd, c)
        for c in conns.values():
            c.sock.close()
        unfinished = len(conns) + (plan.count - opened if plan.open_until is None else 0)
        if unfinished:
            result.fail("timeout", unfinished)
        result.end = time.monotonic()
        if report is not None:
            report(result.ok + result.failed)
        return result


def run_client(plan: Plan, report: Callable[[int], None] | None = None) -> Outcome:
    """Make `plan.count` connections; every one ends ok, failed, or "timeout" at the deadline."""
    return _Client(plan).run(report)
