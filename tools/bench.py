"""Benchmarks tunio against the plain veth path, in one run, in a lab of network namespaces.

The same traffic goes first over the plain veth (a host route straight to the server, no TUN),
then through tunio with each --workers count (1 and 2 by default):

  * iperf3, one flow and 8 flows (Gbit/s received by the server);
  * tools/flood.py: 2,000 short connections (connect, 100 B each way, close), 50 at a time
    (conn/s);
  * tools/flood.py --mode rr: round-trip time of a 100-byte echo on one persistent connection
    (p50/p99 µs; "added" is tunio's p50 minus the plain path's), and exchanges per second with
    8 such connections at once (rr x8: a loaded gateway);
  * through tunio only: 10,000 idle connections held open (tools/bench_idle.py), and what they
    add to the resident memory (VmRSS) of the stack and worker processes, per connection.

Each figure is the median of --repeat runs; ratios are tunio / plain. Every configuration talks
to its own server ports, so the TIME_WAIT sockets one leaves behind do not slow the next one's
connects. Prints a table and the issue's targets, writes JSON and a PNG chart to --out.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_cost import CpuMeter, per_unit  # noqa: E402
from bench_floor import describe as describe_floor  # noqa: E402
from bench_floor import measure as measure_floor  # noqa: E402
from bench_report import write_report  # noqa: E402
from lab.netlab import SERVER_ADDRESS, SRV_ADDRESS, Lab, TunioProcess  # noqa: E402

IPERF_PORT = 5201
ECHO_BASE_PORT = 7100  # short connections and rr: one port per configuration
IDLE_BASE_PORT = 7200  # idle connections: one port per configuration
FLOOD = str(ROOT / "tools" / "flood.py")
IDLE = str(ROOT / "tools" / "bench_idle.py")
PLAIN = "plain veth"

# The issue's targets: (metric, worker count it is judged at, lowest ratio to plain)
TARGETS = (("gbps_1_flow", 1, 0.5), ("gbps_8_flows", 2, 0.6), ("conn_per_s", 2, 0.5))
ADDED_LATENCY_TARGET_US = 60.0
IDLE_TARGET_KIB = 20.0
RR_CLIENTS = 8  # connections doing request/response at once, for the loaded figure


def iperf(lab: Lab, streams: int, seconds: int) -> float:
    """Gbit/s received by the server, for `streams` parallel flows from the app namespace."""
    out = lab.run(
        lab.app,
        ["iperf3", "-c", SERVER_ADDRESS, "-p", str(IPERF_PORT), "-P", str(streams),
         "-t", str(seconds), "-J"],
        timeout=seconds + 30,
    )  # fmt: skip
    return float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 1e9


def flood(lab: Lab, port: int, args: argparse.Namespace) -> dict[str, Any]:
    """Short connections: 100 B each way, 2 processes x 25 at a time (50 in all)."""
    out = lab.run(
        lab.app,
        [sys.executable, FLOOD, "--connect", f"{SERVER_ADDRESS}:{port}", "--mode", "echo",
         "--connections", str(args.connections), "--concurrency", "25", "--processes", "2",
         "--bytes", "100", "--timeout", "60", "--json"],
        timeout=90,
    )  # fmt: skip
    result: dict[str, Any] = json.loads(out)
    if result["failed"]:
        msg = f"flood: {result['failed']} of {result['connections']} failed: {result['errors']}"
        raise RuntimeError(msg)
    return result


def rr_argv(port: int, args: argparse.Namespace) -> list[str]:
    """tools/flood.py: 100-byte request/response exchanges on one connection."""
    return [sys.executable, FLOOD, "--connect", f"{SERVER_ADDRESS}:{port}", "--mode", "rr",
            "--requests", str(args.requests), "--bytes", "100", "--timeout", "30", "--json"]


def round_trip(lab: Lab, port: int, args: argparse.Namespace) -> dict[str, Any]:
    """Latency of 100-byte request/response exchanges on one connection."""
    result: dict[str, Any] = json.loads(lab.run(lab.app, rr_argv(port, args), timeout=60))
    return result


def loaded_round_trips(lab: Lab, port: int, args: argparse.Namespace) -> dict[str, float]:
    """RR_CLIENTS connections doing 100-byte exchanges at once, as a loaded gateway sees them:
    exchanges per second in all, and the median of their p50s."""
    argv = rr_argv(port, args)
    procs = [lab.popen(lab.app, argv, stdout=subprocess.PIPE, text=True)
             for _ in range(RR_CLIENTS)]  # fmt: skip
    outs: list[dict[str, Any]] = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        outs.append(json.loads(out) if out else {"requests_per_s": 0.0, "latency_us": {}})
    p50s = [float(o["latency_us"].get("p50", 0.0)) for o in outs]
    return {
        "rr_loaded_per_s": sum(float(o["requests_per_s"]) for o in outs),
        "rr_loaded_p50_us": statistics.median(p50s),
    }


def measure(lab: Lab, port: int, args: argparse.Namespace, meter: CpuMeter) -> dict[str, float]:
    """The figures, and what the short connections and the 8 flows cost in CPU: µs per
    connection and CPU-seconds per GB, for the machine and for each of the meter's groups."""
    before = meter.snapshot()
    short = flood(lab, port, args)
    per_conn = per_unit(meter.spent(before, meter.snapshot()), short["connections"], 1e6,
                        "cpu_us_per_conn")  # fmt: skip
    rr = round_trip(lab, port, args)
    loaded = loaded_round_trips(lab, port, args)
    one = iperf(lab, 1, args.seconds)
    before = meter.snapshot()
    eight = iperf(lab, 8, args.seconds)
    gigabytes = eight * args.seconds / 8
    per_gb = per_unit(meter.spent(before, meter.snapshot()), gigabytes, 1, "cpu_s_per_gb")
    return {
        "gbps_1_flow": one,
        "gbps_8_flows": eight,
        "conn_per_s": float(short["conn_per_s"]),
        "rr_p50_us": float(rr["latency_us"]["p50"]),
        "rr_p99_us": float(rr["latency_us"]["p99"]),
        **loaded,
        **per_conn,
        **per_gb,
    }


def median_of(runs: int, fn: Callable[[], dict[str, float]]) -> dict[str, float]:
    samples = [fn() for _ in range(runs)]
    common = set(samples[0]).intersection(*samples[1:])  # a thread may come or go between runs
    return {k: statistics.median(s[k] for s in samples) for k in samples[0] if k in common}


def rss_kib(pids: list[int]) -> int:
    """Sum of VmRSS over `pids` (KiB; a process that is gone counts 0)."""
    total = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def idle_memory(lab: Lab, tunio: TunioProcess, port: int, count: int) -> dict[str, float]:
    """RSS the stack and workers add for `count` idle connections (KiB per connection)."""
    pids = tunio.children()  # the stack and the workers
    before = rss_kib(pids)
    holder = lab.popen(
        lab.app,
        [sys.executable, IDLE, "--connect", f"{SERVER_ADDRESS}:{port}",
         "--connections", str(count), "--timeout", "90", "--hold", "60"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdin is not None
    assert holder.stdout is not None
    try:
        line = holder.stdout.readline()  # printed once every connect has ended
        report: dict[str, Any] = (
            json.loads(line) if line else {"open": 0, "errors": {"no-output": 1}}
        )
        after = rss_kib(pids)
    finally:
        holder.stdin.close()  # the holder closes its connections and exits
        try:
            holder.wait(60)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait(5)
    opened = int(report["open"])
    if opened < count:
        print(f"idle: only {opened} of {count} connections opened: {report['errors']}",
              file=sys.stderr)  # fmt: skip
    return {
        "idle_connections": float(opened),
        "idle_rss_before_kib": float(before),
        "idle_rss_after_kib": float(after),
        "idle_kib_per_conn": (after - before) / opened if opened else float("nan"),
    }


def plain_path(lab: Lab, args: argparse.Namespace) -> dict[str, float]:
    # A host route straight over the veth: the physical path, same namespaces, same servers.
    route = [f"{SERVER_ADDRESS}/32", "via", SRV_ADDRESS, "dev", lab.veth_app, "onlink"]
    lab.ip(lab.app, "route", "add", *route)
    try:
        meter = CpuMeter()
        return median_of(args.repeat, lambda: measure(lab, ECHO_BASE_PORT, args, meter))
    finally:
        lab.ip(lab.app, "route", "del", *route)


def through_tunio(lab: Lab, args: argparse.Namespace, workers: int, index: int) -> dict[str, float]:
    extra = ["--workers", str(workers), "--queues", "2"]
    if args.window:
        extra += ["--window", str(args.window)]
    tunio = lab.start_tunio(extra)
    failed = True
    try:
        port = ECHO_BASE_PORT + index
        workers_pids = tunio.workers()
        stack = [pid for pid in tunio.children() if pid not in workers_pids]
        meter = CpuMeter({"stack": stack, "workers": workers_pids}, threads_of=stack[0])
        result = median_of(args.repeat, lambda: measure(lab, port, args, meter))
        if args.idle:
            result.update(idle_memory(lab, tunio, IDLE_BASE_PORT + index, args.idle))
        failed = False
        return result
    finally:
        tunio.stop()
        if failed:  # what tunio said about it: its warnings and its counters at exit
            marks = (" WARNING ", " ERROR ", "statistics")
            said = [line for line in tunio.log.lines if any(m in line for m in marks)]
            print("tunio-run's log:\n" + "\n".join(said[-40:]), file=sys.stderr)


def table(results: dict[str, dict[str, float]]) -> str:
    plain = results[PLAIN]
    head = (f"{'path':<20}{'1 flow Gbit/s':>14}{'8 flows Gbit/s':>15}{'conn/s':>9}"
            f"{'rr p50 µs':>10}{'rr p99 µs':>10}{'rr x8 /s':>10}{'idle KiB/conn':>14}")  # fmt: skip
    rows = [head]
    for name, r in results.items():
        idle = r.get("idle_kib_per_conn")
        rows.append(
            f"{name:<20}{r['gbps_1_flow']:>14.2f}{r['gbps_8_flows']:>15.2f}"
            f"{r['conn_per_s']:>9.0f}{r['rr_p50_us']:>10.0f}{r['rr_p99_us']:>10.0f}"
            f"{r['rr_loaded_per_s']:>10.0f}{'' if idle is None else f'{idle:.1f}':>14}"
        )
        if name != PLAIN:
            rows.append(
                f"{'  ratio to plain':<20}{r['gbps_1_flow'] / plain['gbps_1_flow']:>14.2f}"
                f"{r['gbps_8_flows'] / plain['gbps_8_flows']:>15.2f}"
                f"{r['conn_per_s'] / plain['conn_per_s']:>9.2f}"
                f"{'+' + format(r['rr_p50_us'] - plain['rr_p50_us'], '.0f'):>10}{'':>10}"
                f"{r['rr_loaded_per_s'] / plain['rr_loaded_per_s']:>10.2f}"
            )
    return "\n".join(rows)


GROUPS = ("all", "stack", "workers", "other")


def _cells(r: dict[str, float], prefix: str, widths: tuple[int, ...], scale: float) -> str:
    values = [r.get(f"{prefix}_{group}") for group in GROUPS]
    return "".join(f"{'' if v is None else f'{v * scale:.0f}':>{w}}"
                   for v, w in zip(values, widths, strict=True))  # fmt: skip


def cost_table(results: dict[str, dict[str, float]]) -> str:
    """CPU per short connection and per GB (8 flows), whole machine and split by process. On a
    machine where every path is CPU-bound, plain's cost over tunio's is the ratio tunio can
    reach; "other" is the traffic generators, the servers and interrupt-context kernel work."""
    plain = results[PLAIN]
    rows = [f"{'CPU cost':<20}{'µs/conn':>9}{'stack':>7}{'workers':>8}{'other':>7}"
            f"{'CPU ms/GB':>11}{'stack':>7}{'workers':>8}{'other':>7}"
            f"{'plain/tunio':>14}"]  # fmt: skip
    for name, r in results.items():
        if "cpu_us_per_conn_all" not in r or "cpu_s_per_gb_all" not in r:
            continue
        ratios = "" if name == PLAIN else (
            f"{plain['cpu_us_per_conn_all'] / r['cpu_us_per_conn_all']:.2f} / "
            f"{plain['cpu_s_per_gb_all'] / r['cpu_s_per_gb_all']:.2f}"
        )
        rows.append(f"{name:<20}{_cells(r, 'cpu_us_per_conn', (9, 7, 8, 7), 1)}"
                    f"{_cells(r, 'cpu_s_per_gb', (11, 7, 8, 7), 1000)}{ratios:>14}")  # fmt: skip
    return "\n".join(rows)


THREAD = "cpu_s_per_gb_thread:"


def stack_threads(results: dict[str, dict[str, float]]) -> str:
    """CPU per GB (8 flows) of each stack thread, and the Gbit/s at which the busiest one would
    fill a core on its own: where the stack process's own limit is, whatever the machine."""
    rows = []
    for name, r in results.items():
        threads = {k[len(THREAD):]: v for k, v in r.items() if k.startswith(THREAD) and v > 0}
        if not threads:
            continue
        busiest = max(threads, key=lambda t: threads[t])
        cells = ", ".join(f"{t} {v * 1000:.0f}" for t, v in sorted(threads.items()))
        ceiling = 8 / threads[busiest]
        rows.append(f"{name}: stack threads, CPU ms per GB (8 flows): {cells}\n"
                    f"  busiest: {busiest}, one core at {ceiling:.0f} Gbit/s")  # fmt: skip
    return "\n".join(rows)


def targets(results: dict[str, dict[str, float]]) -> tuple[str, list[dict[str, Any]]]:
    """The issue's targets, each judged at its worker count: text and JSON."""
    plain = results[PLAIN]
    lines, out = [], []
    for metric, workers, floor in TARGETS:
        r = results.get(f"tunio workers={workers}")
        if r is None:
            continue
        ratio = r[metric] / plain[metric]
        out.append({"metric": metric, "workers": workers, "value": ratio, "target": floor,
                    "met": ratio >= floor})  # fmt: skip
        lines.append(f"{metric} (workers={workers}): {ratio:.2f}x plain, target >= {floor}x"
                     f"  {'met' if ratio >= floor else 'NOT met'}")  # fmt: skip
    for name, r in results.items():
        if name == PLAIN:
            continue
        added = r["rr_p50_us"] - plain["rr_p50_us"]
        ok = added <= ADDED_LATENCY_TARGET_US
        out.append({"metric": "added_rr_p50_us", "path": name, "value": added,
                    "target": ADDED_LATENCY_TARGET_US, "met": ok})  # fmt: skip
        lines.append(f"added p50 latency ({name}): {added:.0f} µs, target <= "
                     f"{ADDED_LATENCY_TARGET_US:.0f} µs  {'met' if ok else 'NOT met'}")
        if "idle_kib_per_conn" in r:
            kib = r["idle_kib_per_conn"]
            ok = kib <= IDLE_TARGET_KIB
            out.append({"metric": "idle_kib_per_conn", "path": name, "value": kib,
                        "target": IDLE_TARGET_KIB, "met": ok})  # fmt: skip
            lines.append(f"idle memory ({name}): {kib:.1f} KiB per connection, target <= "
                         f"{IDLE_TARGET_KIB:.0f} KiB  {'met' if ok else 'NOT met'}")
    return "\n".join(lines), out


def chart(results: dict[str, dict[str, float]], path: Path) -> bool:
    """Bars of each figure as a ratio to plain; False if matplotlib is missing."""
    try:
        import matplotlib  # noqa: PLC0415 (optional: only `make bench` installs it)

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return False
    plain = results[PLAIN]
    metrics = [("gbps_1_flow", "1 flow"), ("gbps_8_flows", "8 flows"), ("conn_per_s", "conn/s"),
               ("rr_loaded_per_s", "rr x8 /s")]
    fig, (ax, lat) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    names = [n for n in results if n != PLAIN]
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        ratios = [results[name][m] / plain[m] for m, _ in metrics]
        xs = [x + i * width for x in range(len(metrics))]
        bars = ax.bar(xs, ratios, width, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    for (metric, workers, floor) in TARGETS:
        x = [m for m, _ in metrics].index(metric)
        ax.hlines(floor, x - 0.1, x + 0.8, colors="red", linestyles="dashed")
        ax.annotate(f"target (w={workers})", (x - 0.1, floor), fontsize=7, color="red",
                    xytext=(0, 3), textcoords="offset points")  # fmt: skip
    ax.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(metrics))],
                  [label for _, label in metrics])  # fmt: skip
    ax.set_ylabel("tunio / plain veth")
    ax.set_title("Throughput relative to the plain path")
    ax.legend(fontsize=8)
    all_names = list(results)
    p50 = [results[n]["rr_p50_us"] for n in all_names]
    p99 = [results[n]["rr_p99_us"] for n in all_names]
    xs = list(range(len(all_names)))
    lat.bar([x - 0.2 for x in xs], p50, 0.4, label="p50")
    lat.bar([x + 0.2 for x in xs], p99, 0.4, label="p99")
    lat.set_xticks(xs, all_names, fontsize=7)
    lat.set_ylabel("µs")
    lat.set_title("100-byte echo round trip")
    lat.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=5, help="seconds per iperf3 run")
    ap.add_argument("--repeat", type=int, default=3, help="runs per figure (the median is kept)")
    ap.add_argument("--connections", type=int, default=2000, help="short connections per run")
    ap.add_argument("--requests", type=int, default=2000, help="rr exchanges per run")
    ap.add_argument("--idle", type=int, default=10_000,
                    help="idle connections held through tunio (0: skip)")  # fmt: skip
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts")
    ap.add_argument("--window", type=int, default=0, help="tunio-run --window (0: its default)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args(argv)
    # thousands of sockets in the idle test: every process we start inherits the limit
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    started = time.time()
    results: dict[str, dict[str, float]] = {}
    configs = len(args.workers) + 1
    with Lab() as lab:
        iperf_server = ["iperf3", "-s", "-p", str(IPERF_PORT), "--forceflush"]
        lab.serve(iperf_server, ready=r"Server listening")
        for i in range(configs):
            for port in (ECHO_BASE_PORT + i, IDLE_BASE_PORT + i):
                lab.serve([sys.executable, FLOOD, "--serve", f"{SERVER_ADDRESS}:{port}",
                           "--mode", "echo", "--processes", "2"])  # fmt: skip
        results[PLAIN] = plain_path(lab, args)
        for i, n in enumerate(args.workers, start=1):
            results[f"tunio workers={n}"] = through_tunio(lab, args, n, i)
    text = table(results)
    floor = measure_floor(args.requests)
    text += "\n\n" + cost_table(results) + "\n\n" + stack_threads(results)
    text += "\n\n" + describe_floor(floor)
    goals, goal_json = targets(results)
    print(text)
    print()
    print(goals)
    stem = write_report(args, "bench", started, text + "\n\n" + goals, results=results,
                        targets=goal_json, floor=floor)
    png = stem.with_suffix(".png")
    if chart(results, png):
        print(f"\nwrote {png.with_suffix('.json')} and {png}")
    else:
        print(f"\nwrote {png.with_suffix('.json')} (no chart: pip install '.[bench]')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
