"""Hold many idle TCP connections open, for measuring what each one costs a proxy.

    bench_idle.py --connect HOST:PORT --connections N [--in-flight K] [--timeout S]

Opens N connections (at most K connecting at once) to an echo server, prints one JSON line
{"open", "failed", "errors", "seconds"} once every connect has ended, then holds them until its
stdin closes (or --hold seconds pass) and closes them all. Nothing is sent: the connections are
idle. Exit 0 iff all N opened.
"""

from __future__ import annotations

import argparse
import errno
import json
import select
import socket
import sys
import time

from flood_common import error_name, parse_endpoint, raise_nofile_limit, resolve


def open_idle(
    family: int, addr: tuple[str, int], count: int, in_flight: int, deadline: float
) -> tuple[list[socket.socket], dict[str, int]]:
    """`count` connected sockets (fewer if some fail or the deadline passes) and the errors."""
    done: list[socket.socket] = []
    errors: dict[str, int] = {}
    pending: dict[int, socket.socket] = {}
    started = 0
    with select.epoll() as ep:
        while (started < count or pending) and time.monotonic() < deadline:
            while started < count and len(pending) < in_flight:
                started += 1
                sock = socket.socket(family, socket.SOCK_STREAM)
                sock.setblocking(False)
                rc = sock.connect_ex(addr)
                if rc == 0:
                    done.append(sock)
                elif rc == errno.EINPROGRESS:
                    pending[sock.fileno()] = sock
                    ep.register(sock.fileno(), select.EPOLLOUT)
                else:
                    name = errno.errorcode.get(rc, str(rc))
                    errors[name] = errors.get(name, 0) + 1
                    sock.close()
            for fd, _ in ep.poll(min(0.5, max(0.0, deadline - time.monotonic()))):
                sock = pending.pop(fd)
                ep.unregister(fd)
                rc = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if rc == 0:
                    done.append(sock)
                else:
                    name = errno.errorcode.get(rc, str(rc))
                    errors[name] = errors.get(name, 0) + 1
                    sock.close()
    if pending or started < count:
        errors["timeout"] = len(pending) + count - started
        for sock in pending.values():
            sock.close()
    return done, errors


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connect", required=True, metavar="HOST:PORT")
    ap.add_argument("--connections", type=int, default=10_000)
    ap.add_argument("--in-flight", type=int, default=256, help="connects outstanding at once")
    ap.add_argument("--timeout", type=float, default=60.0, help="bound on opening them all")
    ap.add_argument("--hold", type=float, default=120.0, help="bound on holding them open")
    args = ap.parse_args(argv)
    raise_nofile_limit()
    host, port = parse_endpoint(args.connect)
    family, addr = resolve(host, port)
    start = time.monotonic()
    try:
        socks, errors = open_idle(
            family, addr, args.connections, args.in_flight, start + args.timeout
        )
    except OSError as exc:
        print(json.dumps({"open": 0, "failed": args.connections, "errors": {error_name(exc): 1}}))
        return 1
    report = {
        "open": len(socks),
        "failed": args.connections - len(socks),
        "errors": errors,
        "seconds": round(time.monotonic() - start, 3),
    }
    print(json.dumps(report), flush=True)
    # held until the caller has measured: it closes our stdin (a real event), or --hold passes
    select.select([sys.stdin], [], [], args.hold)
    for sock in socks:
        sock.close()
    return 0 if len(socks) == args.connections else 1


if __name__ == "__main__":
    sys.exit(main())
