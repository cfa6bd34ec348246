"""What one connection and one exchange cost through tunio, A/B-ready: `make bench-conn`.

The path of `make bench-peers` (app -> gw -> srv, danted in gw; tools/lab/chain.py), for the
rows tunio socks5:// (to danted) and tunio direct, 2 workers, 2 queues. Per repeat:

  * conn/s: tools/flood.py, 4,000 short connections (100 B each way), 2 processes x 25 at once;
  * connect: 1,000 sequential connects (one at a time), the connect() time's p50 (µs): the
    app's connect waits for the whole dial, the proxy handshake included;
  * rr: 5,000 100-byte echoes on one connection, p50 (µs);
  * bulk: iperf3, one flow up, Gbit/s;
  * CPU per short connection (µs) of the stack process by thread (tunio-loop, tunio-rd*,
    ZeroMQ's I/O thread), and of the workers;
  * with --profile DIR, where that CPU goes (tools/bench_profile.py: perf, py-spy);
  * wake-ups per short connection and per rr exchange: the voluntary context switches (a
    thread going to sleep, so once per wake-up) of each thread of the stack and of the
    workers during the conn/s and the rr runs, by thread group (stack loop, readers, ZeroMQ
    I/O; the workers' main and ZeroMQ I/O threads).

Each figure is printed as the median of --repeat runs with its spread (min-max). JSON to --out.
Run the same command before and after a change, on the same machine state, for an A/B.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_cost import CpuMeter  # noqa: E402
from bench_peers_measure import FLOOD, IPERF_PORT  # noqa: E402
from bench_peers_rows import Forwarder, RowEnv, danted_alone, plain, probe  # noqa: E402
from bench_profile import Profiler  # noqa: E402
from lab.chain import PROXY_ADDRESS, ChainLab  # noqa: E402
from lab.netlab import SERVER_ADDRESS, TunioProcess  # noqa: E402
from lab.proxies import start_dante  # noqa: E402

ECHO_PORT = 7400
DANTE_PORT = 1080
ROWS = ("socks5", "direct")
REFERENCES = ("plain", "danted")  # the plain veth; danted alone, the clients speaking SOCKS5


class Target:
    """What probe() needs of a row: tunio's clients speak plain TCP (no SOCKS5 of their own)."""

    socks5 = None


SOCKS5: list[str] = []  # the clients' own --socks5, on the danted row


def flood(lab: ChainLab, *args: str, timeout: int = 120) -> dict[str, Any]:
    argv = [sys.executable, FLOOD, "--connect", f"{SERVER_ADDRESS}:{ECHO_PORT}", "--bytes", "100",
            "--timeout", str(timeout), "--json", *args, *SOCKS5]  # fmt: skip
    result: dict[str, Any] = json.loads(lab.run(lab.app, argv, timeout=timeout + 30))
    if result["failed"]:
        msg = f"flood {args[:2]}: {result['failed']} failed: {result['errors']}"
        raise RuntimeError(msg)
    return result


def iperf(lab: ChainLab, seconds: int) -> float:
    argv = ["iperf3", "-c", SERVER_ADDRESS, "-p", str(IPERF_PORT), "-t", str(seconds), "-J"]
    out = lab.run(lab.app, argv, timeout=seconds + 30)
    return float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 1e9


def stack_pid(run: TunioProcess) -> int:
    for pid in run.children():
        if Path(f"/proc/{pid}/task").is_dir() and any(
            (t / "comm").read_text().strip() == "tunio-loop"
            for t in Path(f"/proc/{pid}/task").iterdir()
            if (t / "comm").exists()
        ):
            return pid
    msg = "no stack process (no thread named tunio-loop)"
    raise RuntimeError(msg)


def thread_group(name: str) -> str:
    if name.startswith("tunio-rd"):
        return "readers"
    if name.startswith("ZMQbg/IO"):
        return "zmq-io"
    if name == "tunio-loop":
        return "loop"
    return "other"


def switches(pids: dict[str, int]) -> dict[str, int]:
    """Voluntary context switches by thread group ("stack:loop", "workers:zmq-io", ...)."""
    out: dict[str, int] = {}
    for role, pid in pids.items():
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                name = (task / "comm").read_text().strip()
                status = (task / "status").read_text()
            except OSError:
                continue  # the thread ended meanwhile
            group = thread_group(name)
            if role.startswith("worker"):
                group = "zmq-io" if group == "zmq-io" else "main" if group == "other" else group
            key = f"{role.split('-')[0]}:{group}"
            count = next(int(line.split()[1]) for line in status.splitlines()
                         if line.startswith("voluntary_ctxt_switches"))  # fmt: skip
            out[key] = out.get(key, 0) + count
    return out


def reference(lab: ChainLab, args: argparse.Namespace) -> dict[str, float]:
    """The figures of a reference row (no tunio): conn/s, sequential connects, rr."""
    short = flood(lab, "--mode", "echo", "--connections", str(args.connections),
                  "--concurrency", "25", "--processes", "2")  # fmt: skip
    seq = flood(lab, "--mode", "echo", "--connections", str(args.sequential), "--concurrency", "1")
    rr = flood(lab, "--mode", "rr", "--requests", str(args.requests))
    return {"conn_per_s": float(short["conn_per_s"]),
            "connect_p50_us": float(seq["connect_us"]["p50"]),
            "seq_latency_p50_us": float(seq["latency_us"]["p50"]),
            "seq_conn_per_s": float(seq["conn_per_s"]),
            "rr_p50_us": float(rr["latency_us"]["p50"])}  # fmt: skip


def once(lab: ChainLab, run: TunioProcess, args: argparse.Namespace,
         profile: Path | None) -> dict[str, float]:  # fmt: skip
    """One repeat's figures; with `profile`, the short-connection flood profiled into it."""
    stack = stack_pid(run)
    workers = run.workers()
    meter = CpuMeter(groups={"stack": [stack], "workers": workers}, threads_of=stack)
    pids = {"stack": stack, **{f"worker-{i}": pid for i, pid in enumerate(workers)}}
    before = meter.snapshot()
    before_sw = switches(pids)
    profiling = Profiler(profile, stack, workers) if profile else contextlib.nullcontext()
    with profiling as profiler:
        short = flood(lab, "--mode", "echo", "--connections", str(args.connections),
                      "--concurrency", "25", "--processes", "2")  # fmt: skip
        spent = meter.spent(before, meter.snapshot())
    if profiler:
        print(profiler.report(), flush=True)
    after_sw = switches(pids)
    ok = short["ok"]
    out = {"conn_per_s": float(short["conn_per_s"])}
    for key, count in after_sw.items():
        out[f"conn_wakeups_{key}"] = (count - before_sw.get(key, 0)) / ok
    out["cpu_us_stack"] = spent["stack"] * 1e6 / ok
    out["cpu_us_workers"] = spent["workers"] * 1e6 / ok
    out["cpu_us_all"] = spent["all"] * 1e6 / ok
    groups: dict[str, float] = {}
    for key, seconds in spent.items():
        if key.startswith("thread:"):
            g = thread_group(key[len("thread:") :])
            groups[g] = groups.get(g, 0.0) + seconds
    for g, seconds in groups.items():
        out[f"cpu_us_stack_{g}"] = seconds * 1e6 / ok
    seq = flood(lab, "--mode", "echo", "--connections", str(args.sequential), "--concurrency", "1")
    out["connect_p50_us"] = float(seq["connect_us"]["p50"])
    out["seq_latency_p50_us"] = float(seq["latency_us"]["p50"])
    out["seq_conn_per_s"] = float(seq["conn_per_s"])
    before_sw = switches(pids)
    rr = flood(lab, "--mode", "rr", "--requests", str(args.requests))
    after_sw = switches(pids)
    for key, count in after_sw.items():
        out[f"wakeups_{key}"] = (count - before_sw.get(key, 0)) / args.requests
    out["rr_p50_us"] = float(rr["latency_us"]["p50"])
    out["rr_p99_us"] = float(rr["latency_us"]["p99"])
    if args.seconds:
        out["gbps_1"] = iperf(lab, args.seconds)
    return out


def summarize(samples: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    keys = [k for k in samples[0] if all(k in s for s in samples)]
    return {
        k: {"median": statistics.median(s[k] for s in samples),
            "min": min(s[k] for s in samples), "max": max(s[k] for s in samples)}
        for k in keys
    }  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--connections", type=int, default=4000)
    ap.add_argument("--sequential", type=int, default=1000)
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--seconds", type=int, default=5, help="iperf3 seconds (0: no bulk run)")
    ap.add_argument("--rows", nargs="+", choices=ROWS + REFERENCES, default=list(ROWS),
                    help="tunio rows, and reference rows (plain, danted) to run before them")
    ap.add_argument("--tunio-args", default="", help="more tunio-run arguments (split on spaces)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--label", default="run")
    ap.add_argument("--profile", type=Path, default=None,
                    help="profile each short-connection flood into this directory (perf on "
                         "the stack, py-spy on the workers) and print the hot spots")  # fmt: skip
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="tunio-conn-") as tmp, ChainLab() as lab:
        lab.serve(["iperf3", "-s", "-p", str(IPERF_PORT), "--forceflush"],
                  ready=r"Server listening")  # fmt: skip
        lab.serve([sys.executable, FLOOD, "--serve", f"{SERVER_ADDRESS}:{ECHO_PORT}",
                   "--mode", "echo", "--processes", "2"])  # fmt: skip
        danted = start_dante(lab, Path(tmp), auth=False, ns=lab.gw, port=DANTE_PORT)
        env = RowEnv(Path(tmp), ECHO_PORT, DANTE_PORT, danted.process.pid, 0)
        for row in [r for r in args.rows if r in REFERENCES]:
            setup = plain if row == "plain" else danted_alone
            with setup(lab, env) as forwarder:
                assert isinstance(forwarder, Forwarder)
                if forwarder.socks5:
                    SOCKS5[:] = ["--socks5", f"{PROXY_ADDRESS}:{DANTE_PORT}"]
                probe(lab, ECHO_PORT, forwarder)
                samples = [reference(lab, args) for _ in range(args.repeat)]
                for i, s in enumerate(samples):
                    print(f"  {row} #{i}: {json.dumps(s)}", flush=True)
                results[row] = {"samples": samples, "summary": summarize(samples)}
            SOCKS5.clear()
        for row in [r for r in args.rows if r in ROWS]:
            dialer = f"socks5://{PROXY_ADDRESS}:{DANTE_PORT}" if row == "socks5" else "direct"
            extra = args.tunio_args.split() if args.tunio_args else []
            run = lab.start_tunio(["--dialer", dialer, *extra])
            try:
                probe(lab, ECHO_PORT, Target())  # type: ignore[arg-type]
                maps = Path(f"/proc/{stack_pid(run)}/maps").read_text().split()
                lib = next((m for m in maps if "_stack" in m and m.endswith(".so")), "?")
                print(f"{row}: {len(run.workers())} workers, stack from {lib}", flush=True)
                samples = []
                for i in range(args.repeat):
                    t0 = time.monotonic()
                    profile = args.profile / f"{row}-{i}" if args.profile else None
                    samples.append(once(lab, run, args, profile))
                    print(f"  {row} #{i}: {json.dumps(samples[-1])} "
                          f"({time.monotonic() - t0:.0f} s)", flush=True)  # fmt: skip
                results[row] = {"samples": samples, "summary": summarize(samples)}
            finally:
                run.stop()
            time.sleep(1.0)
    for row, r in results.items():
        print(f"== {args.label} {row}")
        for k, v in r["summary"].items():
            print(f"  {k:24s} {v['median']:10.1f}   [{v['min']:.1f} .. {v['max']:.1f}]")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"conn-{args.label}.json"
    path.write_text(json.dumps(results, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
