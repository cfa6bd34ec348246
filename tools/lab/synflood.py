"""A bounded SYN flood from a raw socket: what a port scanner or a flood of new connections looks
like to tunio, without the sender keeping any state.

Run it in the lab's app namespace (a raw socket needs root)::

    python tools/lab/synflood.py --source 198.18.255.1 --target 198.18.3.1:80 \\
        --target 198.18.9.1:80 --count 20000 --rate 10000 --seconds 10

It sends `--count` IPv4 SYNs, one source port each (cycling over 20000-59999), round-robin over
the targets, at most `--rate` a second, and stops after `--seconds` whatever it has sent. The
kernel answers what comes back (a SYN-ACK gets a RST: no socket of its own). It prints
``sent N in S s`` at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import struct
import sys
import time

from tunio.testing import packets

PORT_BASE = 20000
PORT_SPAN = 40000
BATCH = 100  # SYNs between two looks at the clock


def syn(src: str, dst: str, sport: int, dport: int, seq: int) -> bytes:
    """An IPv4 SYN (MSS option) with correct checksums."""
    return packets.tcp(src, sport, dst, dport, flags=packets.SYN, seq=seq,
                       options=struct.pack("!BBH", 2, 4, 1460), window=65535)  # fmt: skip


def flood(sock: socket.socket, source: str, targets: list[tuple[str, int]], *, count: int,
          rate: float, seconds: float) -> int:  # fmt: skip
    """Sends up to `count` SYNs through raw socket `sock`; how many it sent."""
    start = time.monotonic()
    sent = 0
    while sent < count:
        now = time.monotonic()
        if now - start >= seconds:
            break
        ahead = sent - (now - start) * rate
        if ahead > 0:
            time.sleep(ahead / rate)  # pacing the sender, not waiting for anything
            continue
        for _ in range(min(BATCH, count - sent)):
            host, port = targets[sent % len(targets)]
            packet = syn(source, host, PORT_BASE + sent % PORT_SPAN, port, sent * 7919)
            with contextlib.suppress(OSError):  # a full device queue drops it, as any packet
                sock.sendto(packet, (host, 0))
            sent += 1
    return sent



def raw_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
    return sock


def _target(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", required=True, help="the SYNs' source address (the app's)")
    ap.add_argument("--target", action="append", type=_target, required=True, metavar="HOST:PORT")
    ap.add_argument("--count", type=int, default=20000)
    ap.add_argument("--rate", type=float, default=10000.0, help="SYNs a second at most")
    ap.add_argument("--seconds", type=float, default=10.0, help="stop after this, sent or not")
    args = ap.parse_args(argv)
    if not 0 < args.count <= 1_000_000 or not 0 < args.seconds <= 60 or args.rate <= 0:
        ap.error("--count 1..1000000, --seconds up to 60, --rate above 0")
    start = time.monotonic()
    with raw_socket() as sock:
        sent = flood(sock, args.source, args.target, count=args.count, rate=args.rate,
                     seconds=args.seconds)
    print(f"sent {sent} in {time.monotonic() - start:.2f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
