"""tools/flood.py --socks5: every TCP mode and rr through a SOCKS5 proxy, byte-exact, on loopback;
the proxy's refusals counted by name; the handshake parser on its own."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import pytest
from flood_socks import Handshake, SocksError, request

from tests.unit.test_flood import FLOOD, assert_exact, flood_server, run_client

TIMEOUT = 30.0  # bound on every socket operation of the test proxy


class SocksProxy:
    """A SOCKS5 proxy on 127.0.0.1 for these tests: CONNECT without authentication, relaying
    both ways and passing half-closes on. It answers with `reply` (0: connected) and picks
    `method` (0: no authentication; 0xFF: none acceptable)."""

    def __init__(self, reply: int = 0, method: int = 0) -> None:
        self.reply, self.method = reply, method
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.connects = 0  # CONNECT requests that reached a target
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _recv(conn: socket.socket, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = conn.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf

    def _serve(self, conn: socket.socket) -> None:
        with conn, suppress(OSError, EOFError):
            conn.settimeout(TIMEOUT)
            _ver, count = self._recv(conn, 2)
            assert 0 in self._recv(conn, count)
            conn.sendall(bytes([5, self.method]))
            if self.method != 0:
                return
            head = self._recv(conn, 4)
            assert head[:3] == b"\x05\x01\x00"
            family = socket.AF_INET if head[3] == 1 else socket.AF_INET6
            host = socket.inet_ntop(family, self._recv(conn, 4 if head[3] == 1 else 16))
            port = int.from_bytes(self._recv(conn, 2), "big")
            if self.reply:
                conn.sendall(bytes([5, self.reply, 0, 1, 0, 0, 0, 0, 0, 0]))
                return
            with socket.create_connection((host, port), timeout=TIMEOUT) as upstream:
                with self._lock:
                    self.connects += 1
                conn.sendall(b"\x05\x00\x00\x01\x7f\x00\x00\x01\x04\x38")
                back = threading.Thread(target=self._pump, args=(upstream, conn), daemon=True)
                back.start()
                self._pump(conn, upstream)
                back.join(TIMEOUT)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with suppress(OSError):
            while chunk := src.recv(65536):
                dst.sendall(chunk)
            dst.shutdown(socket.SHUT_WR)


@contextmanager
def socks_proxy(reply: int = 0, method: int = 0) -> Iterator[SocksProxy]:
    proxy = SocksProxy(reply, method)
    try:
        yield proxy
    finally:
        proxy.close()


@pytest.mark.parametrize(("mode", "nbytes"), [("echo", 100), ("sink", 300_000),
                                              ("source", 300_000)])
def test_tcp_modes_through_the_proxy_are_byte_exact(mode: str, nbytes: int) -> None:
    with flood_server(mode, "--processes", "2") as addr, socks_proxy() as proxy:
        code, summary = run_client(addr, "--mode", mode, "--connections", "40",
                                   "--concurrency", "10", "--processes", "2",
                                   "--bytes", str(nbytes), "--socks5", proxy.address)
    assert code == 0
    assert_exact(summary, mode, 40, nbytes)
    assert summary["socks5"] == proxy.address
    assert proxy.connects == 40  # every connection went through the proxy


def test_rr_through_the_proxy() -> None:
    with flood_server("echo") as addr, socks_proxy() as proxy:
        code, summary = run_client(addr, "--mode", "rr", "--requests", "200",
                                   "--socks5", proxy.address)
    assert code == 0
    assert summary["ok"] == 200
    assert summary["errors"] == {}
    assert summary["socks5"] == proxy.address
    assert proxy.connects == 1


def test_without_the_option_no_proxy_is_named() -> None:
    with flood_server("echo") as addr:
        code, summary = run_client(addr, "--connections", "3")
    assert code == 0
    assert summary["socks5"] is None


@pytest.mark.parametrize(("reply", "method", "error"), [(5, 0, "socks-rep5"),
                                                        (0, 0xFF, "socks-method")])
def test_refusals_are_counted_by_name(reply: int, method: int, error: str) -> None:
    with flood_server("echo") as addr, socks_proxy(reply, method) as proxy:
        code, summary = run_client(addr, "--connections", "6", "--concurrency", "3",
                                   "--socks5", proxy.address)
        rr_code, rr = run_client(addr, "--mode", "rr", "--requests", "5",
                                 "--socks5", proxy.address)
    assert code == 1
    assert summary["errors"] == {error: 6}
    assert rr_code == 1
    assert rr["errors"] == {error: 1}


@pytest.mark.parametrize("argv", [
    ["--connect", "127.0.0.1:9", "--mode", "udp-echo", "--socks5", "127.0.0.1:1080"],
    ["--connect", "localhost:9", "--socks5", "127.0.0.1:1080"],
    ["--connect", "127.0.0.1:9", "--socks5", "127.0.0.1"],
])
def test_bad_socks_arguments(argv: list[str]) -> None:
    done = subprocess.run([sys.executable, str(FLOOD), *argv], capture_output=True,
                          timeout=30, check=False)
    assert done.returncode == 2, done.stderr


def _feed(reply: bytes, then: bytes = b"") -> tuple[Handshake, socket.socket]:
    """A handshake whose proxy sends its method choice, then `reply` one byte at a time."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    hs = Handshake(("192.0.2.7", 4242))
    with pytest.raises(BlockingIOError):
        hs.step(ours)
    assert theirs.recv(16) == b"\x05\x01\x00"
    theirs.sendall(b"\x05\x00")
    with pytest.raises(BlockingIOError):
        hs.step(ours)
    assert theirs.recv(64) == request(("192.0.2.7", 4242))
    for byte in reply[:-1]:
        theirs.sendall(bytes([byte]))
        with pytest.raises(BlockingIOError):
            hs.step(ours)
    theirs.sendall(reply[-1:] + then)
    hs.step(ours)
    theirs.close()
    return hs, ours


@pytest.mark.parametrize("bound", [
    b"\x01\xc0\x00\x02\x01\x00\x50",
    b"\x04" + bytes(16) + b"\x00\x50",
    b"\x03\x09proxy.lab\x00\x50",
])
def test_the_handshake_reads_exactly_the_reply(bound: bytes) -> None:
    hs, ours = _feed(b"\x05\x00\x00" + bound, then=b"payload")
    with ours:
        assert hs.done
        ours.setblocking(True)
        assert ours.recv(64) == b"payload"  # what followed the reply is the test's


def test_a_reply_of_another_version_is_refused() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(b"\x05\x00\x04\x00\x00\x01")
        with pytest.raises(SocksError, match="socks-reply"):
            Handshake(("192.0.2.7", 1)).step(ours)


def test_requests_for_both_families() -> None:
    assert request(("10.1.2.3", 80)) == b"\x05\x01\x00\x01\x0a\x01\x02\x03\x00\x50"
    assert request(("::1", 443)) == b"\x05\x01\x00\x04" + bytes(15) + b"\x01\x01\xbb"
