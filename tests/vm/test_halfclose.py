"""Half-close in each direction and resets in each direction, through tunio, over IPv4 and
IPv6 (the test peers listen on both: tests/vm/conftest.py)."""

from __future__ import annotations

import errno
import re
import socket
import struct

import pytest
from lab.netlab import (
    PEER_PORTS,
    Lab,
    LineReader,
    TunioProcess,
    pattern,
    pattern_sha256,
    recv_all,
    recv_exact,
)

from tests.vm.conftest import Family

HALFCLOSE_BYTES = 1 << 20  # what peers.py halfclose sends first (its default --bytes)


def test_client_half_close_server_still_replies(
    lab: Lab, tunio: TunioProcess, servers: dict[str, LineReader], family: Family
) -> None:
    # The app shuts down its write side; the server must see EOF, and its answer, sent only
    # after that EOF, must still reach the app.
    del servers
    size = 3 << 20
    with lab.connect(PEER_PORTS["sink-hash"], family.server, timeout=30.0) as sock:
        sock.sendall(pattern(size))
        sock.shutdown(socket.SHUT_WR)
        reply = recv_all(sock).decode()
    assert reply == f"{pattern_sha256(size)} {size}\n"
    assert tunio.running()


def test_server_half_close_client_still_sends(
    lab: Lab, tunio: TunioProcess, servers: dict[str, LineReader], family: Family
) -> None:
    # The server sends its part and shuts down its write side at once; the app must see EOF
    # after exactly those bytes and still be able to send, and the server must get it all.
    reader = servers["halfclose"]
    mark = len(reader.lines)
    size = 2 << 20
    with lab.connect(PEER_PORTS["halfclose"], family.server, timeout=30.0) as sock:
        assert recv_all(sock) == pattern(HALFCLOSE_BYTES)  # EOF came after these bytes
        sock.sendall(pattern(size))  # the other direction is still open
        sock.shutdown(socket.SHUT_WR)
        line = reader.wait_for(r"^(received|error) ", 30.0, start=mark)
        assert line == f"received {size} {pattern_sha256(size)}"
        assert sock.recv(1) == b""  # and nothing but the orderly end follows
    assert tunio.running()


def _read_then_write(sock: socket.socket) -> None:
    """Read to EOF, then write: after a RST the read fails, or at the latest the write."""
    while sock.recv(65536):
        pass
    sock.sendall(b"more")


def test_server_reset_reaches_the_client(
    lab: Lab, tunio: TunioProcess, servers: dict[str, LineReader], family: Family
) -> None:
    del servers
    with lab.connect(PEER_PORTS["rst"], family.server, timeout=15.0) as sock:
        sock.sendall(b"please reset\n")
        with pytest.raises(ConnectionResetError) as info:
            _read_then_write(sock)
        assert info.value.errno == errno.ECONNRESET
    assert tunio.running()


def test_client_reset_reaches_the_server(
    lab: Lab, tunio: TunioProcess, servers: dict[str, LineReader], family: Family
) -> None:
    reader = servers["echo"]
    mark = len(reader.lines)
    with lab.connect(PEER_PORTS["echo"], family.server, timeout=15.0) as sock:
        sock.sendall(b"ping")
        assert recv_exact(sock, 4) == b"ping"  # the flow is established end to end
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    # The echo server is blocked in recv(): it must fail with ECONNRESET, not see an EOF.
    line = reader.wait_for(re.compile(r"^error "), 15.0, start=mark)
    assert line == f"error ConnectionResetError {errno.ECONNRESET}"
    assert tunio.running()
