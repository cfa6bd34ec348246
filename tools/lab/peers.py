"""Test servers with the special behaviours the end-to-end tests need.

Run one per process (in the lab's srv namespace)::

    python tools/lab/peers.py MODE --listen HOST:PORT

HOST may be IPv6 in brackets; ``[::]`` serves IPv4 too (IPV6_V6ONLY off), which is how the
lab's peers answer on both server addresses. It prints ``listening HOST:PORT`` on stdout once
the socket listens, serves each connection on its own thread, and runs until SIGTERM/SIGINT.
Modes:

- ``echo``: sends back what it reads; shuts down its write side after the client's EOF.
- ``sink-hash``: reads to EOF, then answers ``<sha256 hex> <byte count>\\n`` and closes.
- ``source``: reads one line ``N\\n``, sends ``pattern(N)``, shuts down its write side, reads to
  EOF and closes.
- ``rst``: reads one line, then closes with SO_LINGER 0 (the client sees a reset).
- ``trickle``: reads one line ``N\\n``, then sends N bytes in writes of ``--write`` bytes
  (1,000: ``pattern(1000)`` each time), one a millisecond, so that the other side reads them in
  small pieces; then closes.
- ``deaf``: never reads, never writes: holds each connection until the server stops, so that
  whatever the client sends fills the buffers on the way (no port either).
- ``halfclose``: sends ``pattern(--bytes)``, shuts down its write side at once (the client sees
  EOF), then reads to EOF while the client keeps sending and prints
  ``received <byte count> <sha256 hex>`` on stdout: the test reads that line.

`lab.netlab.pattern(n)` gives the deterministic bytes both sides compare against;
the ports are `lab.netlab.PEER_PORTS` (trickle and deaf have none: a test that wants one starts
it).
"""

from __future__ import annotations

import argparse
import hashlib
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType

from lab.netlab import pattern

CHUNK = 256 * 1024
HALFCLOSE_BYTES = 1 << 20
TRICKLE_WRITE = 1000

_print_lock = threading.Lock()


def say(line: str) -> None:
    with _print_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def read_line(conn: socket.socket, limit: int = 256) -> bytes:
    """Bytes up to (not including) the first newline; what came before EOF if none."""
    buf = bytearray()
    while len(buf) < limit:
        b = conn.recv(1)
        if not b or b == b"\n":
            break
        buf += b
    return bytes(buf)


def drain(conn: socket.socket) -> tuple[int, str]:
    """Read to EOF; (byte count, sha256 hex) of what was read."""
    h = hashlib.sha256()
    n = 0
    while chunk := conn.recv(CHUNK):
        h.update(chunk)
        n += len(chunk)
    return n, h.hexdigest()


def serve_echo(conn: socket.socket, _args: argparse.Namespace) -> None:
    while chunk := conn.recv(CHUNK):
        conn.sendall(chunk)
    conn.shutdown(socket.SHUT_WR)


def serve_sink_hash(conn: socket.socket, _args: argparse.Namespace) -> None:
    n, digest = drain(conn)
    conn.sendall(f"{digest} {n}\n".encode())


def serve_source(conn: socket.socket, _args: argparse.Namespace) -> None:
    n = int(read_line(conn))
    conn.sendall(pattern(n))
    conn.shutdown(socket.SHUT_WR)
    drain(conn)


def serve_trickle(conn: socket.socket, args: argparse.Namespace) -> None:
    size, piece = int(read_line(conn)), pattern(args.write)
    for _ in range(0, size, args.write):
        conn.sendall(piece)
        time.sleep(0.001)  # the pace of a slow source, not a synchronisation


def serve_deaf(_conn: socket.socket, _args: argparse.Namespace) -> None:
    threading.Event().wait()  # until the process ends


def serve_rst(conn: socket.socket, _args: argparse.Namespace) -> None:
    read_line(conn)
    # SO_LINGER on with a zero timeout: close() sends a RST instead of a FIN.
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def serve_halfclose(conn: socket.socket, args: argparse.Namespace) -> None:
    conn.sendall(pattern(args.bytes))
    conn.shutdown(socket.SHUT_WR)
    n, digest = drain(conn)
    say(f"received {n} {digest}")


HANDLERS: dict[str, Callable[[socket.socket, argparse.Namespace], None]] = {
    "echo": serve_echo,
    "sink-hash": serve_sink_hash,
    "source": serve_source,
    "rst": serve_rst,
    "halfclose": serve_halfclose,
    "trickle": serve_trickle,
    "deaf": serve_deaf,
}
MODES = tuple(HANDLERS)


def handle(conn: socket.socket, mode: str, args: argparse.Namespace) -> None:
    with conn:
        try:
            HANDLERS[mode](conn, args)
        except OSError as exc:  # a reset client is part of some tests: report, keep serving
            say(f"error {type(exc).__name__} {exc.errno}")


def parse_hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Test servers for the end-to-end tests.")
    parser.add_argument("mode", choices=MODES)
    parser.add_argument("--listen", required=True, type=parse_hostport, metavar="HOST:PORT")
    parser.add_argument(
        "--bytes", type=int, default=HALFCLOSE_BYTES, help="halfclose: bytes sent first"
    )
    parser.add_argument("--write", type=int, default=TRICKLE_WRITE, help="trickle: bytes a write")
    args = parser.parse_args(argv)

    def stop(_signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    host, port = args.listen
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as lsock:
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:  # [::] serves IPv4 too (as v4-mapped addresses)
            lsock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        lsock.bind((host, port))
        lsock.listen(1024)
        bound = lsock.getsockname()
        say(f"listening {f'[{bound[0]}]' if ':' in bound[0] else bound[0]}:{bound[1]}")
        while True:
            conn, _ = lsock.accept()
            threading.Thread(target=handle, args=(conn, args.mode, args), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
