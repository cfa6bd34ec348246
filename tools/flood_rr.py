"""flood's request/response mode: round-trip latency over one persistent TCP connection.

The client sends B bytes, waits until the echo server has sent those B bytes back, checks them,
and repeats N times; each exchange's time is one latency sample. One connection at a time, so
what is measured is the path's added latency, not its queueing. The server side is the echo
server (`--serve … --mode rr` is the same as `--mode echo`).
"""

from __future__ import annotations

import math
import socket
import time
from typing import Any

from flood_common import error_name, format_endpoint
from flood_run import Job
from flood_socks import SocksError
from flood_socks import connect as socks_connect

#: exchanges done before timing starts (connection set-up, caches, the first CREDIT)
WARMUP = 20


def percentile(ordered: list[int], p: float) -> int:
    """Nearest-rank percentile of a sorted list (0 when empty)."""
    if not ordered:
        return 0
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def _exchange(sock: socket.socket, request: bytes, buf: memoryview) -> str:
    """One round trip: "" when the echo came back byte-exact, else what went wrong."""
    sock.sendall(request)
    got = 0
    size = len(request)
    while got < size:
        n = sock.recv_into(buf[got:size])
        if n == 0:
            return "eof"
        got += n
    return "" if buf[:size] == request else "verify"


def run_rr(job: Job, requests: int) -> dict[str, Any]:
    """`requests` timed exchanges of `job.nbytes` bytes on one connection, within job.timeout."""
    deadline = time.monotonic() + job.timeout
    request = bytes((i * 7 + 1) & 0xFF for i in range(job.nbytes))
    buf = memoryview(bytearray(max(1, job.nbytes)))
    samples: list[int] = []
    errors: dict[str, int] = {}
    start = end = time.monotonic()
    try:
        with socket.socket(job.family, socket.SOCK_STREAM) as sock:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            sock.connect(job.proxy or job.addr)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if job.proxy:
                socks_connect(sock, job.addr)
            for _ in range(WARMUP):
                if (why := _exchange(sock, request, buf)) != "":
                    errors[why] = 1
                    break
            start = time.monotonic()
            while not errors and len(samples) < requests:
                if time.monotonic() >= deadline:
                    errors["timeout"] = requests - len(samples)
                    break
                t0 = time.monotonic_ns()
                why = _exchange(sock, request, buf)
                if why:
                    errors[why] = 1
                    break
                samples.append(time.monotonic_ns() - t0)
            end = time.monotonic()
    except SocksError as exc:
        end = time.monotonic()
        errors[str(exc)] = 1
    except OSError as exc:
        end = time.monotonic()
        errors[error_name(exc)] = errors.get(error_name(exc), 0) + 1
    lat = sorted(ns // 1000 for ns in samples)
    seconds = end - start
    ok = len(samples)
    return {
        "mode": "rr",
        "connections": 1,
        "requests": requests,
        "ok": ok,
        "failed": requests - ok,
        "errors": errors,
        "bytes_sent": ok * job.nbytes,
        "bytes_received": ok * job.nbytes,
        "seconds": round(seconds, 6),
        "requests_per_s": round(ok / seconds, 1) if seconds > 0 else 0.0,
        "conn_per_s": 0.0,
        "throughput_bps": round(2 * ok * job.nbytes * 8 / seconds) if seconds > 0 else 0,
        "latency_us": {
            "p50": percentile(lat, 50),
            "p90": percentile(lat, 90),
            "p99": percentile(lat, 99),
            "max": lat[-1] if lat else 0,
        },
        "processes": 1,
        "concurrency": 1,
        "bytes_per_connection": job.nbytes,
        "socks5": format_endpoint(*job.proxy) if job.proxy else None,
    }
