"""flood: a TCP and UDP load generator and its server, for measuring a path byte-exactly.

  server: flood.py --serve HOST:PORT [--mode echo|sink|source|udp-echo] [--processes P]
                   [--duration S]
  client: flood.py --connect HOST:PORT --connections N --concurrency C --bytes B
                   [--mode echo|sink|source] [--processes P] [--timeout S] [--json]
                   [--socks5 PROXY:PORT] [--duration S]
          flood.py --connect HOST:PORT --mode udp-echo --connections SESSIONS --datagrams N
                   --size S [--rate R] [--linger S] [--processes P] [--timeout S] [--json]
          flood.py --connect HOST:PORT --mode rr --requests N --bytes B [--timeout S] [--json]
                   [--socks5 PROXY:PORT]
          flood.py --connect RESOLVER:53 --mode dns --name NAME [--qtype A] --connections Q
                   --concurrency C [--rate R] [--query-timeout S] [--timeout S] [--json]

Modes (the client checks every byte without trusting the server):
  echo    the client sends B bytes and half-closes; the server sends them back and closes.
  sink    the client sends B bytes and half-closes; the server answers with their SHA-256.
  source  the client asks for (seed, B); the server sends that stream, which the client rebuilds.

UDP modes:
  udp-echo  each of SESSIONS connected UDP sockets sends N datagrams of S bytes (at most R
            datagrams/s over all, or as fast as it can with --rate 0); the server echoes each
            one. The client counts what came back: lost, reordered (older than the newest seen
            on its session), duplicated, corrupted ("verify"); a session is ok if all N came back
            once, in order, byte-exact. Echoes still missing --linger seconds after the last
            send are lost.
  dns       Q queries for NAME (type --qtype) to a real resolver (there is no flood server for
            it), at most C outstanding, one UDP socket per outstanding query; an answer is ok
            with NOERROR and at least one record; unanswered after --query-timeout: lost.
  Their JSON adds "datagrams_sent", "datagrams_received", "lost", "reordered",
  "datagrams_per_s" (and "queries_per_s" for dns); "connections" counts sessions (udp-echo) or
  queries (dns).

rr (request/response): one connection sends B bytes and waits for their echo, N times (after a
few untimed exchanges); latency_us is per exchange, "requests_per_s" is added. It talks to the
echo server (`--serve … --mode rr` is the same as `--mode echo`).

--socks5 (TCP modes and rr): every connection goes to PROXY:PORT and asks it, in a SOCKS5
CONNECT without authentication, for HOST:PORT (an IP literal); the test stream starts once the
proxy has said it is connected. Latencies and conn/s include that handshake; a refusal counts as
socks-method, socks-rep<N> (the proxy's reply code), socks-eof or socks-reply. The JSON names
the proxy in "socks5" (null without one).

Client and server must use the same --mode. The client exits 0 iff every connection was
byte-exact; errors are counted by errno name (ECONNREFUSED, ...) or as timeout, verify (wrong
bytes), eof (too few) and excess (too many). --concurrency is per process.
bytes_sent/bytes_received count payload only; throughput_bps is their sum over the run's time.
connect_us is connect() to the handshake seen done by the client's loop (its own lag included);
handshake_us is connect() to the SYN-ACK as the kernel got it (TCP_INFO), and syn_retransmits
counts the SYNs the kernel had to send again: under a load that saturates the client, those two
tell the path's delay apart from the client's.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import socket
import sys
import time
from typing import Any

from flood_common import MODES, format_endpoint, parse_endpoint, raise_nofile_limit, resolve
from flood_dns import QTYPES, DnsPlan, question, run_dns
from flood_dns import summary as dns_summary
from flood_rr import run_rr
from flood_run import Job, run
from flood_server import serve
from flood_udp import DGRAM_HEADER, MAX_DATAGRAM, human, run_udp_echo, serve_udp_echo

UDP_MODES = ("udp-echo", "dns")
RR_MODE = "rr"


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text}")
    return value


def _seconds(text: str) -> float:
    """A time bound: above 0, at most a day (NaN and infinity would leave a run unbounded)."""
    value = float(text)
    if not 0 < value <= 86400:
        raise argparse.ArgumentTypeError(f"must be above 0 and at most 86400 s: {text}")
    return value


def _above_zero(text: str) -> float:
    value = float(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number above 0: {text}")
    return value


def _at_least_zero(text: str) -> float:
    value = float(text)
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number, 0 or more: {text}")
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
    p.add_argument("--mode", choices=(*MODES, RR_MODE, *UDP_MODES), default="echo")
    p.add_argument("--processes", type=_positive, default=1, help="processes (client or server)")
    p.add_argument("--duration", type=_seconds,
                   help="server: stop after this many seconds; client (TCP modes): open new "
                        "connections for this many seconds (at most --connections), then let "
                        "the open ones finish")
    p.add_argument("--connections", type=_positive, default=1, help="client: connections in all")
    p.add_argument("--concurrency", type=_positive, default=1,
                   help="client: connections open at once, per process")
    p.add_argument("--bytes", type=_size, default=100, help="client: payload per connection")
    p.add_argument("--max-mbps", type=_above_zero,
                   help="client (echo, sink): send at most this many Mbit/s in all, so that "
                        "connections last and stay open at once without the machine at full load")
    p.add_argument("--timeout", type=_seconds, default=60.0,
                   help="client: bound on the whole run; unfinished connections fail")
    p.add_argument("--json", action="store_true", help="client: print one JSON object")
    p.add_argument("--requests", type=_positive, default=1000,
                   help="rr: timed request/response exchanges")
    p.add_argument("--socks5", metavar="PROXY:PORT",
                   help="client, TCP modes and rr: go through this SOCKS5 proxy (no auth)")
    udp = p.add_argument_group("UDP modes (client)")
    udp.add_argument("--datagrams", type=_positive, default=100, help="udp-echo: per session")
    udp.add_argument("--size", type=int, default=1400, help="udp-echo: bytes per datagram")
    udp.add_argument("--rate", type=_at_least_zero, default=1000.0,
                     help="datagrams (udp-echo) or queries (dns) per second in all; 0: no limit")
    udp.add_argument("--linger", type=_at_least_zero, default=2.0,
                     help="udp-echo: seconds to wait for echoes after the last send")
    udp.add_argument("--name", default="example.test", help="dns: the name to ask for")
    udp.add_argument("--qtype", choices=sorted(QTYPES), default="A", help="dns: record type")
    udp.add_argument("--query-timeout", type=_seconds, default=1.0,
                     help="dns: seconds before a query counts as lost")
    # Test hook: the server flips the byte at this stream offset, so the checks can fail.
    p.add_argument("--corrupt-at", type=int, default=-1, help=argparse.SUPPRESS)
    return p


def _human(summary: dict[str, Any]) -> str:
    lat = summary["latency_us"]
    hs = summary["handshake_us"]
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
        ("handshake", f"p50 {hs['p50']} us, p99 {hs['p99']} us, max {hs['max']} us, "
                      f"{summary['syn_retransmits']} SYNs sent again"),
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
        if args.mode == "dns":
            parser.error("dns mode has no flood server: point the client at a resolver")
        if args.mode == "udp-echo":
            return serve_udp_echo(host, port, args.processes, duration=args.duration)
        mode = "echo" if args.mode == RR_MODE else args.mode
        return serve(host, port, mode, args.processes, duration=args.duration,
                     corrupt_at=args.corrupt_at)
    if port == 0:
        parser.error("--connect needs a port")
    raise_nofile_limit()
    try:
        family, addr = resolve(host, port)
    except OSError as exc:
        parser.error(f"cannot resolve {format_endpoint(host, port)}: {exc}")
    if args.mode in UDP_MODES:
        if args.socks5:
            parser.error("--socks5 is for the TCP modes and rr")
        return _udp_client(parser, args, family, addr)
    proxy = None
    if args.socks5:
        # the proxy is asked for an address, not a name: the target must be an IP literal
        try:
            ipaddress.ip_address(host)
        except ValueError:
            parser.error("--socks5 needs --connect with an IP address")
        family, proxy = _endpoint(parser, args.socks5)
    job = Job(family, addr, args.mode, args.bytes, args.connections, args.concurrency,
              args.processes, args.timeout, proxy, args.duration, args.max_mbps)
    if args.mode == RR_MODE:
        summary = run_rr(job, args.requests)
        print(json.dumps(summary) if args.json else _human(summary), flush=True)
        return 0 if summary["ok"] == args.requests else 1
    try:
        summary = run(job)
    except KeyboardInterrupt:
        return 130
    print(json.dumps(summary) if args.json else _human(summary), flush=True)
    return 0 if summary["ok"] == summary["connections"] else 1


def _endpoint(parser: argparse.ArgumentParser,
              text: str) -> tuple[socket.AddressFamily, tuple[str, int]]:
    try:
        host, port = parse_endpoint(text)
        return resolve(host, port)
    except (ValueError, OSError) as exc:
        parser.error(f"bad address {text}: {exc}")


def _udp_client(parser: argparse.ArgumentParser, args: argparse.Namespace, family: int,
                addr: tuple[str, int]) -> int:
    if args.rate < 0:
        parser.error("--rate must not be negative")
    if args.mode == "udp-echo":
        if not DGRAM_HEADER.size <= args.size <= MAX_DATAGRAM:
            parser.error(f"--size must be {DGRAM_HEADER.size}..{MAX_DATAGRAM}")
        summary = run_udp_echo(family, addr, sessions=args.connections,
                               datagrams=args.datagrams, size=args.size, rate=args.rate,
                               processes=args.processes, timeout=args.timeout,
                               linger=args.linger)
        clean = summary["ok"] == args.connections
    else:
        try:
            question(args.name, args.qtype)
        except ValueError as exc:
            parser.error(str(exc))
        plan = DnsPlan(family, addr, args.name, args.qtype, args.connections, args.concurrency,
                       args.rate, args.query_timeout, time.monotonic() + args.timeout)
        summary = dns_summary(plan, run_dns(plan))
        clean = summary["ok"] == args.connections
    print(json.dumps(summary) if args.json else human(summary), flush=True)
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
