"""The forwarder, end to end: bulk transfers both ways and many concurrent connections.

The app is this test: its sockets live in the lab's app namespace, whose only route to the
server (198.18.0.10, fd00:18::10) is tunio's TUN device. Every test runs over IPv4 and IPv6.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from pathlib import Path

from lab.netlab import (
    FLOOD_PORTS,
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

FLOOD = Path(__file__).resolve().parents[2] / "tools" / "flood.py"
BULK = 64 << 20  # bytes each way


def test_upload_64mib_is_byte_exact(lab: Lab, tunio: TunioProcess, family: Family) -> None:
    data = pattern(BULK)
    with lab.connect(PEER_PORTS["sink-hash"], family.server, timeout=60.0) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        reply = recv_all(sock).decode()
    assert reply == f"{pattern_sha256(BULK)} {BULK}\n"
    assert tunio.running()


def test_download_64mib_is_byte_exact(lab: Lab, tunio: TunioProcess, family: Family) -> None:
    with lab.connect(PEER_PORTS["source"], family.server, timeout=60.0) as sock:
        sock.sendall(f"{BULK}\n".encode())
        data = recv_all(sock)
    assert len(data) == BULK
    assert data == pattern(BULK)
    assert tunio.running()


def test_both_directions_at_once(lab: Lab, tunio: TunioProcess, family: Family) -> None:
    # Echo while still sending: each direction's credit must keep flowing independently.
    size = 16 << 20
    data = pattern(size)
    with lab.connect(PEER_PORTS["echo"], family.server, timeout=60.0) as sock:
        errors: list[BaseException] = []

        def send() -> None:
            try:
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
            except BaseException as exc:
                errors.append(exc)

        sender = threading.Thread(target=send)
        sender.start()
        echoed = recv_all(sock)
        sender.join(60)
    assert not errors
    assert len(echoed) == size
    assert echoed == data
    assert tunio.running()


NAGLE_ROUNDS = 40
STALL = 0.02  # s: a second small write held back for a delayed ACK waits 40 ms


def test_a_second_small_write_is_not_held_back(
    lab: Lab, tunio: TunioProcess, family: Family
) -> None:
    """Each side writes 10 bytes, the other receives them, then 10 more. Neither relay socket
    (the worker's towards the destination, the stack's towards the app) may hold the second
    write back until the first is acknowledged (Nagle): the receiver, which has nothing to
    answer, delays that ACK for 40 ms once its first segments are past. A direct connection
    has no such stall, and the app, which asked for TCP_NODELAY, expects none."""
    del tunio
    stalls = {"to the destination": 0, "to the app": 0}
    with lab.open_socket(lab.srv, family.af) as listener:
        listener.bind((family.server, 0))
        listener.listen()
        port = listener.getsockname()[1]
        with lab.connect(port, family.server) as app:
            app.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            listener.settimeout(10.0)
            dst, _ = listener.accept()
            with dst:
                dst.settimeout(10.0)
                dst.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                for _ in range(NAGLE_ROUNDS):
                    for name, writer, reader in (("to the destination", app, dst),
                                                 ("to the app", dst, app)):  # fmt: skip
                        writer.sendall(b"a" * 10)
                        assert recv_exact(reader, 10) == b"a" * 10
                        started = time.monotonic()
                        writer.sendall(b"b" * 10)
                        assert recv_exact(reader, 10) == b"b" * 10
                        stalls[name] += time.monotonic() - started > STALL
    # a loaded machine may stall a round or two; Nagle stalls most of them
    assert all(n <= 2 for n in stalls.values()), stalls


def test_500_concurrent_connections_are_byte_exact(
    lab: Lab, tunio: TunioProcess, flood_echo: LineReader, family: Family
) -> None:
    del flood_echo  # it listens on both families' server addresses
    server = f"[{family.server}]" if family.af == socket.AF_INET6 else family.server
    argv = [
        sys.executable, str(FLOOD),
        "--connect", f"{server}:{FLOOD_PORTS['echo']}",
        "--mode", "echo",
        "--connections", "500",
        "--concurrency", "500",
        "--bytes", "64K",
        "--timeout", "90",
        "--json",
    ]  # fmt: skip
    out = lab.run(lab.app, argv, timeout=150.0)
    result = json.loads(out)
    assert result["ok"] == 500, result
    assert result["failed"] == 0, result
    assert result["errors"] == {}, result
    assert result["bytes_received"] == 500 * 64 * 1024
    assert tunio.running()
