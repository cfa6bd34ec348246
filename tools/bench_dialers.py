"""Benchmarks tunio's dialers against each other, in one run, in a lab of network namespaces.

tunio-run (2 workers, 2 queues) forwards the same traffic with `--dialer direct`, then through
danted (`socks5://`) and tinyproxy (`http://`) started in the srv namespace: iperf3 with one
flow, and tools/flood.py with short connections (connect, 100 B each way, close), 25 at a time
from 2 processes. Each figure is the median of --repeat runs; ratios are dialer / direct.
Prints a table, writes JSON to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_report import write_report  # noqa: E402
from lab.netlab import SERVER_ADDRESS, Lab  # noqa: E402
from lab.proxies import add_proxy_address, start_dante, start_tinyproxy  # noqa: E402

IPERF_PORT = 5201
ECHO_PORT = 7000
CONCURRENCY = 50
FLOOD = str(ROOT / "tools" / "flood.py")


def iperf(lab: Lab, seconds: int) -> float:
    """Gbit/s received by the server for one flow from the app namespace."""
    out = lab.run(
        lab.app,
        ["iperf3", "-c", SERVER_ADDRESS, "-p", str(IPERF_PORT), "-t", str(seconds), "-J"],
        timeout=seconds + 30,
    )
    return float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 1e9


def short_connections(lab: Lab, count: int) -> dict[str, Any]:
    out = lab.run(
        lab.app,
        [sys.executable, __file__, "--conn-client", f"{SERVER_ADDRESS}:{ECHO_PORT}",
         "--connections", str(count), "--concurrency", str(CONCURRENCY)],
        timeout=150,
    )  # fmt: skip
    result: dict[str, Any] = json.loads(out)
    return result


async def _one_connection(host: str, port: int, payload: bytes) -> tuple[float, str]:
    started = time.monotonic()
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError as exc:
        return 0.0, type(exc).__name__
    try:
        writer.write(payload)
        got = await reader.readexactly(len(payload))
        ok = got == payload
    except (OSError, asyncio.IncompleteReadError) as exc:
        return 0.0, type(exc).__name__
    finally:
        writer.close()
    return time.monotonic() - started, "" if ok else "verify"


async def _conn_client(target: str, count: int, concurrency: int) -> dict[str, Any]:
    host, _, port = target.rpartition(":")
    payload = bytes(range(100))
    latencies: list[float] = []
    errors: dict[str, int] = {}
    todo = iter(range(count))

    async def lane() -> None:
        for _ in todo:
            seconds, err = await _one_connection(host, int(port), payload)
            if err:
                errors[err] = errors.get(err, 0) + 1
            else:
                latencies.append(seconds)

    started = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*(lane() for _ in range(concurrency))), 120)
    elapsed = time.monotonic() - started
    latencies.sort()
    return {
        "connections": count,
        "failed": count - len(latencies),
        "errors": errors,
        "conn_per_s": len(latencies) / elapsed,
        "latency_us": {"p50": latencies[len(latencies) // 2] * 1e6 if latencies else 0.0},
    }


def measure(lab: Lab, args: argparse.Namespace) -> dict[str, float]:
    flood = short_connections(lab, args.connections)
    if flood["failed"]:
        msg = f"flood: {flood['failed']} of {flood['connections']} failed: {flood['errors']}"
        raise RuntimeError(msg)
    return {
        "gbps_1_flow": iperf(lab, args.seconds),
        "conn_per_s": float(flood["conn_per_s"]),
        "latency_p50_us": float(flood["latency_us"]["p50"]),
    }


def through(lab: Lab, args: argparse.Namespace, dialer: str) -> dict[str, float]:
    tunio = lab.start_tunio(["--dialer", dialer])
    try:
        samples = [measure(lab, args) for _ in range(args.repeat)]
    finally:
        tunio.stop()
    return {k: statistics.median(s[k] for s in samples) for k in samples[0]}


def table(results: dict[str, dict[str, float]]) -> str:
    direct = results["direct"]
    rows = [
        f"{'dialer':<10}{'1 flow Gbit/s':>15}{'ratio':>7}{'conn/s':>9}{'ratio':>7}"
        f"{'p50 conn µs':>13}"
    ]
    for name, r in results.items():
        rows.append(
            f"{name:<10}{r['gbps_1_flow']:>15.2f}"
            f"{r['gbps_1_flow'] / direct['gbps_1_flow']:>7.2f}"
            f"{r['conn_per_s']:>9.0f}{r['conn_per_s'] / direct['conn_per_s']:>7.2f}"
            f"{r['latency_p50_us']:>13.0f}"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=5, help="seconds per iperf3 run")
    ap.add_argument("--repeat", type=int, default=3, help="runs per figure (the median is kept)")
    ap.add_argument("--connections", type=int, default=2000, help="short connections per run")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--conn-client", metavar="HOST:PORT", help=argparse.SUPPRESS)
    ap.add_argument("--concurrency", type=int, default=CONCURRENCY, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.conn_client:  # the short-connection client, run inside the app namespace
        result = asyncio.run(_conn_client(args.conn_client, args.connections, args.concurrency))
        print(json.dumps(result))
        return 0
    started = time.time()
    results: dict[str, dict[str, float]] = {}
    with Lab() as lab, tempfile.TemporaryDirectory(prefix="tunio-bench-") as tmp:
        add_proxy_address(lab)
        lab.serve(["iperf3", "-s", "-p", str(IPERF_PORT), "--forceflush"],
                  ready=r"Server listening")  # fmt: skip
        lab.serve([sys.executable, FLOOD, "--serve", f"{SERVER_ADDRESS}:{ECHO_PORT}",
                   "--mode", "echo", "--processes", "2"])  # fmt: skip
        dante = start_dante(lab, Path(tmp), auth=False)
        tinyproxy = start_tinyproxy(lab, Path(tmp), auth=False)
        results["direct"] = through(lab, args, "direct")
        results["socks5"] = through(lab, args, dante.url("socks5"))
        results["http"] = through(lab, args, tinyproxy.url("http"))
    text = table(results)
    print(text)
    write_report(args, "dialers", started, text, results=results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
