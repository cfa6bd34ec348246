"""Benchmarks tunio against the physical path, in one run, in a lab of network namespaces.

The same traffic goes first over the plain veth (a route straight to the server, no TUN), then
through tunio with 1 and 2 workers: iperf3 with one flow and with 8 flows, and tools/flood.py
with 2,000 short connections (connect, 100 B each way, close), 50 at a time. Each figure is the
median of --repeat runs; ratios are tunio / plain. Prints a table, writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tunio.testing.netlab import SERVER_ADDRESS, SRV_ADDRESS, Lab  # noqa: E402

IPERF_PORT = 5201
ECHO_PORT = 7000
FLOOD = str(ROOT / "tools" / "flood.py")


def iperf(lab: Lab, streams: int, seconds: int) -> float:
    """Gbit/s received by the server, for `streams` parallel flows from the app namespace."""
    out = lab.run(
        lab.app,
        ["iperf3", "-c", SERVER_ADDRESS, "-p", str(IPERF_PORT), "-P", str(streams),
         "-t", str(seconds), "-J"],
        timeout=seconds + 30,
    )  # fmt: skip
    return float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 1e9


def short_connections(lab: Lab, count: int) -> dict[str, Any]:
    out = lab.run(
        lab.app,
        [sys.executable, FLOOD, "--connect", f"{SERVER_ADDRESS}:{ECHO_PORT}", "--mode", "echo",
         "--connections", str(count), "--concurrency", "25", "--processes", "2",
         "--bytes", "100", "--timeout", "120", "--json"],
        timeout=150,
    )  # fmt: skip
    result: dict[str, Any] = json.loads(out)
    return result


def measure(lab: Lab, args: argparse.Namespace) -> dict[str, float]:
    flood = short_connections(lab, args.connections)
    if flood["failed"]:
        msg = f"flood: {flood['failed']} of {flood['connections']} connections failed"
        raise RuntimeError(msg)
    return {
        "gbps_1_flow": iperf(lab, 1, args.seconds),
        "gbps_8_flows": iperf(lab, 8, args.seconds),
        "conn_per_s": float(flood["conn_per_s"]),
        "latency_p50_us": float(flood["latency_us"]["p50"]),
    }


def median_of(runs: int, fn: Callable[[], dict[str, float]]) -> dict[str, float]:
    samples = [fn() for _ in range(runs)]
    return {k: statistics.median(s[k] for s in samples) for k in samples[0]}


def plain_path(lab: Lab, args: argparse.Namespace) -> dict[str, float]:
    # A host route straight over the veth: the physical path, same namespaces, same servers.
    route = [f"{SERVER_ADDRESS}/32", "via", SRV_ADDRESS, "dev", lab.veth_app, "onlink"]
    lab.ip(lab.app, "route", "add", *route)
    try:
        return median_of(args.repeat, lambda: measure(lab, args))
    finally:
        lab.ip(lab.app, "route", "del", *route)


def through_tunio(lab: Lab, args: argparse.Namespace, workers: int) -> dict[str, float]:
    extra = ["--workers", str(workers), "--queues", "2"]
    tunio = lab.start_tunio(extra)
    try:
        return median_of(args.repeat, lambda: measure(lab, args))
    finally:
        tunio.stop()


def table(results: dict[str, dict[str, float]]) -> str:
    plain = results["plain veth"]
    rows = [f"{'path':<18}{'1 flow Gbit/s':>15}{'8 flows Gbit/s':>16}{'conn/s':>10}"
            f"{'p50 conn µs':>13}"]  # fmt: skip
    for name, r in results.items():
        rows.append(
            f"{name:<18}{r['gbps_1_flow']:>15.2f}{r['gbps_8_flows']:>16.2f}"
            f"{r['conn_per_s']:>10.0f}{r['latency_p50_us']:>13.0f}"
        )
        if name != "plain veth":
            rows.append(
                f"{'  ratio to plain':<18}{r['gbps_1_flow'] / plain['gbps_1_flow']:>15.2f}"
                f"{r['gbps_8_flows'] / plain['gbps_8_flows']:>16.2f}"
                f"{r['conn_per_s'] / plain['conn_per_s']:>10.2f}"
            )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=5, help="seconds per iperf3 run")
    ap.add_argument("--repeat", type=int, default=3, help="runs per figure (the median is kept)")
    ap.add_argument("--connections", type=int, default=2000, help="short connections per run")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args(argv)
    started = time.time()
    results: dict[str, dict[str, float]] = {}
    with Lab() as lab:
        iperf_server = ["iperf3", "-s", "-p", str(IPERF_PORT), "--forceflush"]
        lab.serve(iperf_server, ready=r"Server listening")
        lab.serve([sys.executable, FLOOD, "--serve", f"{SERVER_ADDRESS}:{ECHO_PORT}",
                   "--mode", "echo", "--processes", "2"])  # fmt: skip
        results["plain veth"] = plain_path(lab, args)
        for n in args.workers:
            results[f"tunio workers={n}"] = through_tunio(lab, args, n)
    text = table(results)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    report = {
        "started": started,
        "seconds": time.time() - started,
        "args": {k: str(v) for k, v in vars(args).items()},
        "results": results,
    }
    (args.out / f"bench-{stamp}.json").write_text(json.dumps(report, indent=2))
    (args.out / f"bench-{stamp}.txt").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
