"""The figures of one row of `make bench-peers`, with the same clients on every row.

  * bulk: iperf3, 1 and 8 flows, up (app -> server) and down (-R), Gbit/s received. On the
    danted-alone row iperf3 runs under proxychains4, whose preloaded connect() does the SOCKS5
    handshake and then leaves the socket to iperf3: no relay process is added to the data path.
  * conn/s: tools/flood.py, short connections (100 B each way), 2 processes x 25 at once; on the
    danted-alone row with --socks5, its own SOCKS5 client (the handshake is part of the cost).
  * rr: tools/flood.py --mode rr, 100-byte echoes on one connection (p50, p99 µs).
  * memory: VmRSS summed over the forwarder's process tree after the row's traffic, the sum of
    their peaks (VmHWM), and their PSS: forked processes (danted's helpers, tunio's workers)
    share pages that a sum of RSS counts once per process, PSS shares them out.
  * CPU: tools/bench_cost.py, per short connection and per GB of the 8 upload flows: the
    machine's, the forwarder's tree's and danted's (when the row goes through it).
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench_cost import CpuMeter, per_unit
from bench_peers_rows import Forwarder
from lab.chain import ChainLab
from lab.netlab import SERVER_ADDRESS, descendants

IPERF_PORT = 5201
FLOOD = str(Path(__file__).resolve().parent / "flood.py")
BULK = ((1, False), (8, False), (1, True), (8, True))  # (flows, download)


@dataclass(frozen=True)
class Load:
    """How much of each measurement one repeat does."""

    seconds: int  # per iperf3 run
    connections: int  # short connections
    requests: int  # rr exchanges


def bulk_key(flows: int, down: bool) -> str:
    return f"gbps_{'down' if down else 'up'}_{flows}"


def proxychains_conf(workdir: Path, proxy: tuple[str, int]) -> Path:
    """A proxychains4 configuration that sends every connect through `proxy`, quietly."""
    path = workdir / f"proxychains-{proxy[1]}.conf"
    path.write_text(
        "strict_chain\nquiet_mode\ntcp_read_time_out 15000\ntcp_connect_time_out 8000\n"
        f"[ProxyList]\nsocks5 {proxy[0]} {proxy[1]}\n"
    )
    return path


class Clients:
    """The clients of one row, speaking SOCKS5 themselves when the row says so."""

    def __init__(
        self, lab: ChainLab, echo_port: int, forwarder: Forwarder, workdir: Path
    ) -> None:
        self.lab = lab
        self.echo_port = echo_port
        self.socks5 = forwarder.socks5
        self.chains = proxychains_conf(workdir, self.socks5) if self.socks5 else None

    def iperf(self, flows: int, down: bool, seconds: int) -> float:
        """Gbit/s received (by the server up, by the client down)."""
        iperf_client = ["iperf3", "-c", SERVER_ADDRESS, "-p", str(IPERF_PORT),
                        "-P", str(flows), "-t", str(seconds), "-J"]  # fmt: skip
        if down:
            iperf_client.append("-R")
        argv = iperf_client
        if self.chains is not None:
            argv = ["proxychains4", "-q", "-f", str(self.chains), *iperf_client]
        out = self.lab.run(self.lab.app, argv, timeout=seconds + 30)
        return float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 1e9

    def _flood(self, *args: str, timeout: int) -> dict[str, Any]:
        argv = [sys.executable, FLOOD, "--connect", f"{SERVER_ADDRESS}:{self.echo_port}",
                "--bytes", "100", "--timeout", str(timeout), "--json", *args]  # fmt: skip
        if self.socks5:
            argv += ["--socks5", f"{self.socks5[0]}:{self.socks5[1]}"]
        result: dict[str, Any] = json.loads(self.lab.run(self.lab.app, argv, timeout=timeout + 30))
        if result["failed"]:
            msg = f"flood {args[:2]}: {result['failed']} failed: {result['errors']}"
            raise RuntimeError(msg)
        return result

    def short_connections(self, count: int) -> dict[str, Any]:
        return self._flood("--mode", "echo", "--connections", str(count), "--concurrency", "25",
                           "--processes", "2", timeout=120)  # fmt: skip

    def round_trips(self, count: int) -> dict[str, Any]:
        return self._flood("--mode", "rr", "--requests", str(count), timeout=60)


def meter_for(forwarder: Forwarder) -> CpuMeter:
    trees = {}
    if forwarder.root is not None:
        trees["forwarder"] = forwarder.root
    if forwarder.proxy is not None:
        trees["danted"] = forwarder.proxy
    return CpuMeter(trees=trees)


def _kib_fields(path: Path, names: tuple[str, ...]) -> dict[str, int]:
    """The "Name:  N kB" lines of a /proc file that are in `names` (none if it is gone)."""
    try:
        text = path.read_text()
    except OSError:
        return {}  # the process ended meanwhile
    found = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name in names:
            found[name] = int(value.split()[0])
    return found


def memory_mb(root: int) -> dict[str, float]:
    """VmRSS, VmHWM and PSS summed over `root`'s tree, in MB (10^6 bytes)."""
    total = {"VmRSS": 0, "VmHWM": 0, "Pss": 0}
    for pid in [root, *descendants(root)]:
        fields = _kib_fields(Path(f"/proc/{pid}/status"), ("VmRSS", "VmHWM"))
        fields.update(_kib_fields(Path(f"/proc/{pid}/smaps_rollup"), ("Pss",)))
        for name, kib in fields.items():
            total[name] += kib
    return {"rss_mb": total["VmRSS"] * 1024 / 1e6, "peak_rss_mb": total["VmHWM"] * 1024 / 1e6,
            "pss_mb": total["Pss"] * 1024 / 1e6}  # fmt: skip


def measure_once(clients: Clients, meter: CpuMeter, load: Load) -> dict[str, float]:
    before = meter.snapshot()
    short = clients.short_connections(load.connections)
    spent = meter.spent(before, meter.snapshot())
    figures = {"conn_per_s": float(short["conn_per_s"]),
               **per_unit(spent, short["ok"], 1e6, "cpu_us_per_conn")}  # fmt: skip
    rr = clients.round_trips(load.requests)
    figures["rr_p50_us"] = float(rr["latency_us"]["p50"])
    figures["rr_p99_us"] = float(rr["latency_us"]["p99"])
    for flows, down in BULK:
        before = meter.snapshot()
        gbps = clients.iperf(flows, down, load.seconds)
        figures[bulk_key(flows, down)] = gbps
        if flows == 8 and not down:
            spent = meter.spent(before, meter.snapshot())
            figures.update(per_unit(spent, gbps * load.seconds / 8, 1, "cpu_s_per_gb"))
    return figures


def median_of(runs: int, fn: Callable[[], dict[str, float]]) -> dict[str, float]:
    samples = [fn() for _ in range(runs)]
    common = set(samples[0]).intersection(*samples[1:])
    return {k: statistics.median(s[k] for s in samples) for k in samples[0] if k in common}


def measure_row(clients: Clients, forwarder: Forwarder, load: Load,
                repeat: int) -> dict[str, float]:
    """The median of `repeat` runs of every figure, and the forwarder's memory after them."""
    meter = meter_for(forwarder)
    figures = median_of(repeat, lambda: measure_once(clients, meter, load))
    if forwarder.root is not None:
        figures.update(memory_mb(forwarder.root))
    return figures
