"""Benchmarks tunio against its peers on one path, in one run: `make bench-peers`.

The lab is app -> gw -> srv (tools/lab/chain.py): the clients run in app, iperf3 and the flood
echo servers in srv, one danted in gw that every row going through a SOCKS5 proxy shares. The
rows (tools/bench_peers_rows.py) are the plain veth, danted alone, sing-box (system and gvisor
stacks; socks outbound to danted, or direct), xjasonlyu/tun2socks (the same two),
hev-socks5-tunnel where it exists, and tunio with
2 workers (socks5:// to danted, or direct), one after the other with the same clients
(tools/bench_peers_measure.py). Each figure is the median of --repeat runs. Prints a table with
tunio's ratios to the best peer and to plain (tools/bench_peers_table.py) and writes JSON and
text to --out. About 2 minutes a row with the defaults, 15 in all; a row that fails is reported
as such, the others still run, and the exit status is then 1.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import bench_peers_singbox as singbox  # noqa: E402
import bench_peers_tun2socks as t2s  # noqa: E402
from bench_peers_measure import FLOOD, IPERF_PORT, Clients, Load, measure_row  # noqa: E402
from bench_peers_rows import Row, RowEnv, all_rows, probe  # noqa: E402
from bench_peers_table import best_peers, cost_table, ratios, table  # noqa: E402
from bench_report import write_report  # noqa: E402
from lab.chain import ChainLab  # noqa: E402
from lab.netlab import SERVER_ADDRESS  # noqa: E402
from lab.proxies import start_dante  # noqa: E402

from tunio import defaults as tunio_defaults  # noqa: E402

ECHO_BASE_PORT = 7300  # one flood echo server per row
DANTE_BASE_PORT = 1080  # one danted port per row


def _parser() -> argparse.ArgumentParser:
    keys = [r.key for r in all_rows()]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-t", "--seconds", type=int, default=8, help="seconds per iperf3 run")
    ap.add_argument("--repeat", type=int, default=3, help="runs per figure (the median is kept)")
    ap.add_argument("--connections", type=int, default=4000, help="short connections per run")
    ap.add_argument("--requests", type=int, default=5000, help="rr exchanges per run")
    ap.add_argument("--peer-mtu", type=int, default=singbox.DEFAULT_MTU,
                    help="MTU of the peers' TUN (default: sing-box's own default, 9000); "
                         "tunio keeps its own default")  # fmt: skip
    ap.add_argument("--rows", nargs="+", choices=keys, default=keys, metavar="ROW",
                    help=f"rows to run, of: {' '.join(keys)}")  # fmt: skip
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    return ap


def _run_row(lab: ChainLab, row: Row, env: RowEnv, load: Load, repeat: int) -> dict[str, float]:
    assert row.setup is not None
    with row.setup(lab, env) as forwarder:
        probe(lab, env.echo_port, forwarder)
        clients = Clients(lab, env.echo_port, forwarder, env.workdir)
        return measure_row(clients, forwarder, load, repeat)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    rows = [r for r in all_rows() if r.key in args.rows]
    load = Load(args.seconds, args.connections, args.requests)
    started = time.time()
    results: dict[str, dict[str, float]] = {}
    missing: dict[str, str] = {}
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="tunio-peers-") as tmp:
        workdir = Path(tmp)
        why_not_singbox = singbox.put_on_path(workdir / "bin")
        why_not = {"sing-box": why_not_singbox} if why_not_singbox else {}
        sing_box = "" if why_not_singbox else singbox.version()
        why_not_t2s = t2s.missing()
        if why_not_t2s:
            why_not["tun2socks"] = why_not_t2s
        tun2socks = why_not_t2s or t2s.version()
        with ChainLab() as lab:
            print(f"lab {lab.id}: {lab.app} -> {lab.gw} -> {lab.srv}", flush=True)
            lab.serve(["iperf3", "-s", "-p", str(IPERF_PORT), "--forceflush"],
                      ready=r"Server listening")  # fmt: skip
            ports = {row.key: i for i, row in enumerate(rows)}
            for i in ports.values():
                echo = f"{SERVER_ADDRESS}:{ECHO_BASE_PORT + i}"
                lab.serve([sys.executable, FLOOD, "--serve", echo, "--mode", "echo",
                           "--processes", "2"])  # fmt: skip
            more = [DANTE_BASE_PORT + i for i in ports.values() if i]
            danted = start_dante(lab, workdir, auth=False, ns=lab.gw, port=DANTE_BASE_PORT,
                                 more_ports=more)  # fmt: skip
            for row in rows:
                if row.unavailable or row.needs in why_not:
                    why = row.unavailable or f"not available here: {why_not[row.needs]}"
                    missing[row.name] = why
                    print(f"{row.name}: {missing[row.name]}", flush=True)
                    continue
                i = ports[row.key]
                env = RowEnv(workdir, ECHO_BASE_PORT + i, DANTE_BASE_PORT + i,
                             danted.process.pid, args.peer_mtu)  # fmt: skip
                print(f"{row.name} ...", flush=True)
                try:
                    results[row.name] = _run_row(lab, row, env, load, args.repeat)
                except Exception as exc:  # one broken row must not hide the others' figures
                    traceback.print_exc()
                    missing[row.name] = f"FAILED: {str(exc).splitlines()[0][:200]}"
                    failed.append(row.name)
    notes = [
        f"bulk: iperf3 -t {args.seconds}, 1 and 8 flows, up and down (-R), Gbit/s; "
        "danted alone: iperf3 under proxychains4",
        f"conn/s: flood.py {args.connections} x 100 B, 50 at once; rr: {args.requests} x 100 B "
        "echoes on one connection, µs; danted alone: flood.py --socks5",
        "RSS/peak/PSS MB: the forwarder's processes, summed, after the row's traffic; "
        "CPU: µs per short connection (machine, forwarder)",
        f"median of {args.repeat}; ratios: tunio / reference, per metric",
        f"TUN MTU: sing-box {args.peer_mtu}, tun2socks 1500 (its Python API sets no MTU), "
        f"tunio its default ({tunio_defaults.MTU}, with TSO: "
        "up to 64 KB segments); "
        f"{sing_box or 'sing-box: ' + str(why_not_singbox)}; {tun2socks}",
    ]
    text = "\n".join([
        table(rows, results, missing), "", best_peers(rows, results), "",
        cost_table(rows, results), "", *notes,
    ])  # fmt: skip
    print(text)
    stem = write_report(args, "bench-peers", started, text, results=results, missing=missing,
                        ratios=ratios(rows, results), sing_box=sing_box)  # fmt: skip
    print(f"\nwrote {stem.with_suffix('.json')} and {stem.with_suffix('.txt')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
