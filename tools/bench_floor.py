"""What one round trip between two processes costs on this machine, before any TUN or Python
work of tunio: over a bare Unix socket, and over ZeroMQ (a ROUTER and a DEALER on ipc://, as
the stack and a worker talk).

Each 100-byte echo through tunio crosses ZeroMQ once each way, so the ZeroMQ round trip is a
floor under the latency tunio adds; its excess over the Unix socket is what ZeroMQ's I/O
threads cost (each message wakes one thread on each side in addition to the two processes).

Run alone: python3 tools/bench_floor.py [--requests N]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import zmq

PAYLOAD = b"x" * 100
QUIT = b"quit"


def _percentiles(samples_ns: list[int]) -> dict[str, float]:
    samples = sorted(samples_ns)
    return {
        "p50": samples[len(samples) // 2] / 1000,
        "p99": samples[min(len(samples) - 1, len(samples) * 99 // 100)] / 1000,
        "mean": statistics.fmean(samples) / 1000,
    }


def _child(run: Callable[[], None]) -> int:
    """Fork; the child runs `run` and exits without returning to the caller's code."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            run()
        except BaseException:  # the parent sees a non-zero exit; nothing else may leak out
            code = 1
        os._exit(code)
    return pid


def _reap(pid: int) -> None:
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"echo process {pid} failed")


def unix_rtt(requests: int) -> dict[str, float]:
    """Round trips of a 100-byte message over a Unix stream socketpair to another process."""
    mine, theirs = socket.socketpair()

    def echo() -> None:
        mine.close()
        while data := theirs.recv(4096):
            theirs.sendall(data)

    pid = _child(echo)
    theirs.close()
    samples = []
    try:
        for _ in range(requests):
            t0 = time.perf_counter_ns()
            mine.sendall(PAYLOAD)
            got = 0
            while got < len(PAYLOAD):
                got += len(mine.recv(4096))
            samples.append(time.perf_counter_ns() - t0)
    finally:
        mine.close()  # the echo process reads EOF and exits
        _reap(pid)
    return _percentiles(samples)


def zmq_rtt(requests: int) -> dict[str, float]:
    """Round trips of a 100-byte message from a ROUTER to a DEALER in another process over
    ipc://, each side with its own context and I/O thread, as between the stack and a worker."""
    with tempfile.TemporaryDirectory(prefix="tunio-floor-") as tmp:
        endpoint = f"ipc://{Path(tmp) / 'floor.sock'}"

        def echo() -> None:
            ctx = zmq.Context()
            sock = ctx.socket(zmq.DEALER)
            sock.connect(endpoint)
            sock.send(b"hello")
            while (msg := sock.recv()) != QUIT:
                sock.send(msg)
            sock.close(linger=0)
            ctx.term()

        ctx = zmq.Context()
        router = ctx.socket(zmq.ROUTER)
        router.bind(endpoint)
        pid = _child(echo)
        samples = []
        try:
            poller = zmq.Poller()
            poller.register(router, zmq.POLLIN)
            if not poller.poll(10_000):
                raise RuntimeError("the echo process did not connect within 10 s")
            ident, _hello = router.recv_multipart()
            for _ in range(requests):
                t0 = time.perf_counter_ns()
                router.send_multipart([ident, PAYLOAD])
                router.recv_multipart()
                samples.append(time.perf_counter_ns() - t0)
            router.send_multipart([ident, QUIT])
        finally:
            _reap(pid)
            router.close(linger=0)
            ctx.term()
    return _percentiles(samples)


def measure(requests: int) -> dict[str, float]:
    unix = unix_rtt(requests)
    zmq_ = zmq_rtt(requests)
    return {
        "unix_rtt_p50_us": unix["p50"],
        "zmq_rtt_p50_us": zmq_["p50"],
        "zmq_added_p50_us": zmq_["p50"] - unix["p50"],
    }


def describe(floor: dict[str, float]) -> str:
    return (
        f"round trip between two processes, 100 B, p50: Unix socket "
        f"{floor['unix_rtt_p50_us']:.0f} µs, ZeroMQ ipc {floor['zmq_rtt_p50_us']:.0f} µs "
        f"(ZeroMQ's I/O threads add {floor['zmq_added_p50_us']:.0f} µs)"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=5000, help="round trips per measurement")
    args = ap.parse_args(argv)
    print(describe(measure(args.requests)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
