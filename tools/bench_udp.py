"""Benchmarks UDP and DNS through tunio against the plain veth path, in one lab run.

The same traffic goes first over the plain veth (a host route straight to the server, no TUN),
then through tunio with each --workers count:

  * a paced UDP echo: --sessions sessions of 1,400-byte datagrams at --rate datagrams/s in all,
    reporting the loss;
  * a UDP burst: the same sessions sending as fast as they can (tools/flood.py --rate 0),
    reporting datagrams/s echoed and the loss;
  * DNS: --queries A queries to dnsmasq, --dns-concurrency outstanding (tools/flood.py --mode
    dns), reporting queries/s, latency and lost queries.

Each figure is the median of --repeat runs. Prints a table, writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_report import write_report  # noqa: E402
from lab.netlab import (  # noqa: E402
    DNS_PORT,
    SERVER_ADDRESS,
    SRV_ADDRESS,
    UDP_ECHO_PORT,
    Lab,
    dnsmasq_argv,
)

FLOOD = str(ROOT / "tools" / "flood.py")
SIZE = 1400
DNS_NAME = "bench.tunio.test"


def flood(lab: Lab, *args: str, timeout: float = 300.0) -> dict[str, Any]:
    """tools/flood.py in the app namespace; its JSON (its exit code only says if all was exact)."""
    proc = lab.popen(lab.app, [sys.executable, FLOOD, "--json", *args],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=timeout)
    if not out.strip():
        msg = f"flood {' '.join(args)}: no result; stderr: {err}"
        raise RuntimeError(msg)
    result: dict[str, Any] = json.loads(out)
    return result


def udp_run(lab: Lab, args: argparse.Namespace, rate: float) -> dict[str, Any]:
    return flood(lab, "--connect", f"{SERVER_ADDRESS}:{UDP_ECHO_PORT}", "--mode", "udp-echo",
                 "--connections", str(args.sessions), "--datagrams", str(args.datagrams),
                 "--size", str(SIZE), "--rate", str(rate), "--linger", "1",
                 "--processes", str(args.processes), "--timeout", "240")


def measure(lab: Lab, args: argparse.Namespace) -> dict[str, float]:
    paced = udp_run(lab, args, args.rate)
    burst = udp_run(lab, args, 0)
    dns = flood(lab, "--connect", f"{SERVER_ADDRESS}:{DNS_PORT}", "--mode", "dns",
                "--name", DNS_NAME, "--connections", str(args.queries),
                "--concurrency", str(args.dns_concurrency), "--rate", "0", "--timeout", "240")
    return {
        "paced_dgram_per_s": float(paced["datagrams_per_s"]),
        "paced_loss": float(paced["loss_ratio"]),
        "paced_p50_us": float(paced["latency_us"]["p50"]),
        "burst_dgram_per_s": float(burst["datagrams_per_s"]),
        "burst_loss": float(burst["loss_ratio"]),
        "burst_mbit_s": float(burst["datagrams_per_s"]) * SIZE * 8 / 1e6,
        "dns_qps": float(dns["queries_per_s"]),
        "dns_p50_us": float(dns["latency_us"]["p50"]),
        "dns_lost": float(dns["lost"]),
    }


def median_of(runs: int, fn: Callable[[], dict[str, float]]) -> dict[str, float]:
    samples = [fn() for _ in range(runs)]
    return {k: statistics.median(s[k] for s in samples) for k in samples[0]}


def plain_path(lab: Lab, args: argparse.Namespace) -> dict[str, float]:
    route = [f"{SERVER_ADDRESS}/32", "via", SRV_ADDRESS, "dev", lab.veth_app, "onlink"]
    lab.ip(lab.app, "route", "add", *route)
    try:
        return median_of(args.repeat, lambda: measure(lab, args))
    finally:
        lab.ip(lab.app, "route", "del", *route)


def through_tunio(lab: Lab, args: argparse.Namespace, workers: int) -> dict[str, float]:
    tunio = lab.start_tunio(["--workers", str(workers), "--queues", "2"])
    try:
        return median_of(args.repeat, lambda: measure(lab, args))
    finally:
        tunio.stop()


def table(results: dict[str, dict[str, float]], args: argparse.Namespace) -> str:
    rows = [
        f"UDP {SIZE} B datagrams, {args.sessions} sessions; paced at {args.rate:g}/s; "
        f"DNS {args.queries} queries, {args.dns_concurrency} outstanding",
        f"{'path':<18}{'paced dg/s':>11}{'loss':>8}{'p50 µs':>8}{'burst dg/s':>12}"
        f"{'Mbit/s':>8}{'loss':>8}{'DNS q/s':>9}{'p50 µs':>8}{'lost':>6}",
    ]
    plain = results["plain veth"]
    for name, r in results.items():
        rows.append(
            f"{name:<18}{r['paced_dgram_per_s']:>11.0f}{r['paced_loss']:>8.2%}"
            f"{r['paced_p50_us']:>8.0f}{r['burst_dgram_per_s']:>12.0f}{r['burst_mbit_s']:>8.0f}"
            f"{r['burst_loss']:>8.2%}{r['dns_qps']:>9.0f}{r['dns_p50_us']:>8.0f}"
            f"{r['dns_lost']:>6.0f}"
        )
        if name != "plain veth":
            rows.append(
                f"{'  ratio to plain':<18}{'':>27}"
                f"{r['burst_dgram_per_s'] / max(plain['burst_dgram_per_s'], 1):>12.2f}{'':>16}"
                f"{r['dns_qps'] / max(plain['dns_qps'], 1):>9.2f}"
            )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--sessions", type=int, default=4, help="UDP sessions per run")
    ap.add_argument("--datagrams", type=int, default=25000, help="datagrams per session")
    ap.add_argument("--rate", type=float, default=20000, help="paced run: datagrams/s in all")
    ap.add_argument("--processes", type=int, default=1, help="flood client processes")
    ap.add_argument("--queries", type=int, default=20000, help="DNS queries per run")
    ap.add_argument("--dns-concurrency", type=int, default=32, help="DNS queries outstanding")
    ap.add_argument("--repeat", type=int, default=3, help="runs per figure (the median is kept)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args(argv)
    started = time.time()
    results: dict[str, dict[str, float]] = {}
    with Lab() as lab:
        lab.serve([sys.executable, FLOOD, "--serve", f"{SERVER_ADDRESS}:{UDP_ECHO_PORT}",
                   "--mode", "udp-echo", "--processes", "2"])  # fmt: skip
        lab.serve(dnsmasq_argv(f"--address=/{DNS_NAME}/198.51.100.1", "--cache-size=0"),
                  ready=r"started")
        lab.wait_for_dns(DNS_NAME)
        results["plain veth"] = plain_path(lab, args)
        for n in args.workers:
            results[f"tunio workers={n}"] = through_tunio(lab, args, n)
    text = table(results, args)
    print(text)
    write_report(args, "bench-udp", started, text, results=results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
