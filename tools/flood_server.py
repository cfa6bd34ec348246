"""The flood server: echo, sink or source over TCP, one edge-triggered epoll loop per process.

Several processes each own a listener on the same port (SO_REUSEPORT), so the kernel spreads the
connections and the server is not the bottleneck of a load test.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import multiprocessing
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import wait as wait_any

from flood_common import (
    CHUNK,
    REQUEST,
    TURN,
    Stream,
    Yield,
    die_with_parent,
    format_endpoint,
    raise_nofile_limit,
    resolve,
)

_IN = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET
_INOUT = _IN | select.EPOLLOUT
_ACCEPT_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class _Conn:
    """One accepted connection; which fields matter depends on the mode."""

    __slots__ = ("eof", "hasher", "out", "pending", "req", "seen", "sock", "stream", "watch_out")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pending: memoryview | None = None  # bytes accepted but not yet sent
        self.eof = False
        self.seen = 0  # payload bytes received (echo, sink) or sent (source)
        self.hasher: hashlib._Hash | None = None
        self.req = b""
        self.stream: Stream | None = None
        self.out = 0  # source: index of the chunk being sent
        self.watch_out = False  # EPOLLOUT wanted: a send would have blocked


def _corrupt(data: memoryview, start: int, at: int) -> memoryview:
    """`data` (stream offset `start`) with the byte at stream offset `at` flipped, if inside."""
    if at < 0 or not start <= at < start + len(data):
        return data
    copy = bytearray(data)
    copy[at - start] ^= 0xFF
    return memoryview(copy)


class _Server:
    def __init__(self, lsock: socket.socket, mode: str, corrupt_at: int) -> None:
        self.lsock = lsock
        self.corrupt_at = corrupt_at
        self.buf = bytearray(CHUNK)
        self.view = memoryview(self.buf)
        handlers: dict[str, Callable[[_Conn], bool]] = {
            "echo": self._echo,
            "sink": self._sink,
            "source": self._source,
        }
        self.handle = handlers[mode]
        self.conns: dict[int, _Conn] = {}
        self.again: dict[int, _Conn] = {}  # connections that yielded with work left
        self.left = 0
        self.ep = select.epoll()

    def _spend(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise Yield

    def _send(self, c: _Conn, data: memoryview) -> bool:
        """Send what the socket takes now and keep the rest; False if some had to wait."""
        try:
            n = c.sock.send(data)
        except BlockingIOError:
            n = 0
        if n < len(data):
            c.pending = data[n:] if data.obj is not self.buf else memoryview(bytes(data[n:]))
            return False
        c.pending = None
        return True

    def _flush(self, c: _Conn) -> bool:
        return c.pending is None or self._send(c, c.pending)

    def _echo(self, c: _Conn) -> bool:
        """Send back every byte; close after the client's FIN once all is echoed."""
        while self._flush(c):
            if c.eof:
                return True
            self._spend()
            n = c.sock.recv_into(self.buf)
            if n == 0:
                c.eof = True
                continue
            data = _corrupt(self.view[:n], c.seen, self.corrupt_at)
            c.seen += n
            self._send(c, data)
        return False

    def _sink(self, c: _Conn) -> bool:
        """Hash everything up to the client's FIN, answer with the SHA-256, close."""
        if c.hasher is None:
            c.hasher = hashlib.sha256()
        while not c.eof:
            self._spend()
            n = c.sock.recv_into(self.buf)
            if n == 0:
                c.eof = True
                self._send(c, memoryview(c.hasher.digest()))
                break
            c.hasher.update(_corrupt(self.view[:n], c.seen, self.corrupt_at))
            c.seen += n
        return self._flush(c)

    def _source(self, c: _Conn) -> bool:
        """Read the (seed, length) request, send that stream, close."""
        while c.stream is None:
            got = c.sock.recv(REQUEST.size - len(c.req))
            if not got:
                return True  # the client left before asking: nothing to send
            c.req += got
            if len(c.req) == REQUEST.size:
                seed, length = REQUEST.unpack(c.req)
                c.stream = Stream(seed, length)
        while self._flush(c):
            start = c.out * CHUNK
            if start >= c.stream.length:
                return True
            self._spend()
            data = _corrupt(c.stream.chunk(c.out), start, self.corrupt_at)
            c.out += 1
            # A view on the stream's buffer stays valid while pending: the next chunk is only
            # built once this one is out.
            self._send(c, data)
        return False

    def _step(self, c: _Conn, registered: bool = True) -> bool:
        """Advance one connection; True when it is finished (or broken) and must be closed."""
        self.left = TURN
        try:
            done = self.handle(c)
        except BlockingIOError:
            done = False
        except Yield:
            done = False
            self.again[c.sock.fileno()] = c
        except OSError:
            return True
        if not done and c.pending is not None and not c.watch_out:
            c.watch_out = True
            if registered:
                self.ep.modify(c.sock.fileno(), _INOUT)
        return done

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.lsock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in _ACCEPT_ERRORS:
                    return  # out of descriptors: retried on the next wakeup
                raise
            sock.setblocking(False)
            c = _Conn(sock)
            # The client usually sent its data before we got here: try once before epoll.
            if self._step(c, registered=False):
                sock.close()
                continue
            fd = sock.fileno()
            self.conns[fd] = c
            self.ep.register(fd, _INOUT if c.watch_out else _IN)

    def run(self, stop_fd: int, deadline: float | None) -> None:
        lfd = self.lsock.fileno()
        self.ep.register(lfd, select.EPOLLIN | select.EPOLLET)
        self.ep.register(stop_fd, select.EPOLLIN)
        conns = self.conns
        while True:
            timeout = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
            if timeout <= 0:
                return
            events = self.ep.poll(0 if self.again else timeout)
            for fd, _ in events:
                if fd == stop_fd:
                    return
                c = conns.get(fd)  # None for the listener
                if c is not None and self._step(c):
                    del conns[fd]
                    c.sock.close()
            again, self.again = self.again, {}
            for fd, c in again.items():
                if conns.get(fd) is c and self._step(c):
                    del conns[fd]
                    c.sock.close()
            # Accept last (and on every wakeup, which also retries after EMFILE).
            self._accept()


def _stop_pipe() -> int:
    """A pipe that becomes readable on SIGTERM/SIGINT (via the signal wakeup fd)."""
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(w)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda _sig, _frame: None)
    return r


def _serve_one(lsock: socket.socket, mode: str, corrupt_at: int, parent: int) -> None:
    die_with_parent(parent)
    raise_nofile_limit()
    _Server(lsock, mode, corrupt_at).run(_stop_pipe(), None)


def _listeners(family: int, addr: tuple[str, int], count: int) -> list[socket.socket]:
    socks: list[socket.socket] = []
    for _ in range(count):
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        # Port 0: the first listener picks the port, the others join it.
        s.bind(addr if not socks else (addr[0], socks[0].getsockname()[1]))
        s.listen(4096)
        s.setblocking(False)
        socks.append(s)
    return socks


def serve(host: str, port: int, mode: str, processes: int, *, duration: float | None = None,
          corrupt_at: int = -1) -> int:
    """Serve until SIGTERM/SIGINT or `duration` seconds; print `listening HOST:PORT` when ready."""
    raise_nofile_limit()
    family, addr = resolve(host, port)
    socks = _listeners(family, addr, processes)
    deadline = None if duration is None else time.monotonic() + duration
    bound = format_endpoint(addr[0], socks[0].getsockname()[1])
    if processes == 1:
        stop = _stop_pipe()
        print(f"listening {bound}", flush=True)
        _Server(socks[0], mode, corrupt_at).run(stop, deadline)
        return 0
    # Before the forks, so no signal finds a process without a handler; each child then takes a
    # stop pipe of its own.
    stop = _stop_pipe()
    ctx = multiprocessing.get_context("fork")
    children = [
        # The parent alone keeps time: it stops the children at the deadline.
        ctx.Process(target=_serve_one, args=(s, mode, corrupt_at, os.getpid()), daemon=True,
                    name=f"flood-server-{i}")
        for i, s in enumerate(socks)
    ]
    for child in children:
        child.start()
    print(f"listening {bound}", flush=True)
    code = 0
    while True:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready = wait_any([stop, *(c.sentinel for c in children)], timeout)
        if stop in ready or not ready:
            break
        dead = [c for c in children if not c.is_alive()]
        if dead:
            # Exit code 0: the child got SIGINT/SIGTERM too (a terminal's ^C reaches them all).
            if dead[0].exitcode != 0:
                print(f"flood: server process {dead[0].name} exited ({dead[0].exitcode})",
                      file=sys.stderr)
                code = 1
            break
    for child in children:
        with contextlib.suppress(OSError):
            child.terminate()
    for child in children:
        child.join(5)
        if child.is_alive():
            child.kill()
            child.join()
    return code
