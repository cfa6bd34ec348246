"""flood: a TCP load generator and its server, for measuring a path byte-exactly.

  server: flood.py --serve HOST:PORT [--mode echo|sink|source] [--processes P] [--duration S]
  client: flood.py --connect HOST:PORT --connections N --concurrency C --bytes B
                   [--mode echo|sink|source] [--processes P] [--timeout S] [--json]

Modes (the client checks every byte without trusting the server):
  echo    the client sends B bytes and half-closes; the server sends them back and closes.
  sink    the client sends B bytes and half-closes; the server answers with their SHA-256.
  source  the client asks for (seed, B); the server sends that stream, which the client rebuilds.

Client and server must use the same --mode. The client exits 0 iff every connection was
byte-exact; errors are counted by errno name (ECONNREFUSED, ...) or as timeout, verify (wrong
bytes), eof (too few) and excess (too many). --concurrency is per process.
bytes_sent/bytes_received count payload only; throughput_bps is their sum over the run's time.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from flood_common import MODES, format_endpoint, parse_endpoint, raise_nofile_limit, resolve
from flood_run import Job, run
from flood_server import serve


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text}")
    return value


def _size(text: str) -> int:
    """A byte count, with an optional K/M/G suffix (powers of 1024)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    scale = units.get(text[-1:].upper(), 1)
    value = int(text[:-1] if scale > 1 else text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text}")
    return value * scale


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flood.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    role = p.add_mutually_exclusive_group(required=True)
    role.add_argument("--serve", metavar="HOST:PORT", help="run the server (port 0: any)")
    role.add_argument("--connect", metavar="HOST:PORT", help="run the client against a server")
    p.add_argument("--mode", choices=MODES, default="echo")
    p.add_argument("--processes", type=_positive, default=1, help="processes (client or server)")
    p.add_argument("--duration", type=float, help="server: stop after this many seconds")
    p.add_argument("--connections", type=_positive, default=1, help="client: connections in all")
    p.add_argument("--concurrency", type=_positive, default=1,
                   help="client: connections open at once, per process")
    p.add_argument("--bytes", type=_size, default=100, help="client: payload per connection")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="client: bound on the whole run; unfinished connections fail")
    p.add_argument("--json", action="store_true", help="client: print one JSON object")
    # Test hook: the server flips the byte at this stream offset, so the checks can fail.
    p.add_argument("--corrupt-at", type=int, default=-1, help=argparse.SUPPRESS)
    return p


def _human(summary: dict[str, Any]) -> str:
    lat = summary["latency_us"]
    errors = ", ".join(f"{k}={v}" for k, v in summary["errors"].items()) or "none"
    rows = [
        ("mode", f"{summary['mode']}  ({summary['bytes_per_connection']} B per connection, "
                 f"{summary['processes']} x {summary['concurrency']} concurrent)"),
        ("connections", f"{summary['ok']} ok / {summary['failed']} failed "
                        f"of {summary['connections']}"),
        ("errors", errors),
        ("bytes", f"{summary['bytes_sent']} sent, {summary['bytes_received']} received"),
        ("time", f"{summary['seconds']:.3f} s"),
        ("rate", f"{summary['conn_per_s']:.1f} conn/s, "
                 f"{summary['throughput_bps'] / 1e9:.3f} Gbit/s"),
        ("latency", f"p50 {lat['p50']} us, p90 {lat['p90']} us, p99 {lat['p99']} us, "
                    f"max {lat['max']} us"),
    ]
    return "\n".join(f"{name:<12} {value}" for name, value in rows)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        host, port = parse_endpoint(args.serve or args.connect)
    except ValueError as exc:
        parser.error(str(exc))
    if args.serve:
        return serve(host, port, args.mode, args.processes, duration=args.duration,
                     corrupt_at=args.corrupt_at)
    if port == 0:
        parser.error("--connect needs a port")
    raise_nofile_limit()
    try:
        family, addr = resolve(host, port)
    except OSError as exc:
        parser.error(f"cannot resolve {format_endpoint(host, port)}: {exc}")
    job = Job(family, addr, args.mode, args.bytes, args.connections, args.concurrency,
              args.processes, args.timeout)
    try:
        summary = run(job)
    except KeyboardInterrupt:
        return 130
    print(json.dumps(summary) if args.json else _human(summary), flush=True)
    return 0 if summary["ok"] == job.connections else 1


if __name__ == "__main__":
    sys.exit(main())
