"""Show tunio forwarding real TCP traffic between two network namespaces, then clean up.

    sudo python tools/demo.py        (or: sudo make demo)

Builds the test lab (an "app" namespace whose only way out is tunio's TUN device, and a "srv"
namespace holding the servers), starts tunio-run with two workers, runs the flood load generator
as the app, prints what happened and removes everything it made. Exit 0 iff every connection
was byte-exact.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from lab.netlab import (  # noqa: E402 - after the path set-up above
    FLOOD_PORTS,
    SERVER_ADDRESS,
    TUN_ADDRESS,
    TUN_NAME,
    Lab,
    LabError,
)

FLOOD = REPO / "tools" / "flood.py"

EXPLANATION = """\
What just happened
  * Two network namespaces were made: {app} (the "app") and {srv} (the servers).
    The app has no route to {server} except the TUN device {tun} ({tun_address}).
  * tunio-run opened {tun} with 2 queues. The C stack read every packet the app sent,
    translated each TCP flow into the kernel's own TCP (a listener of the stack), and
    handed the flow over ZeroMQ to one of 2 Python workers.
  * Each worker dialled {server} itself with the socket mark 0x1; a policy rule sends
    marked traffic over the veth pair to {srv}, so it never loops back into the TUN.
  * Every byte went app -> TUN -> stack -> worker -> server and back, and the flood
    client checked each connection byte for byte (echo) or by SHA-256 (sink).
  * Everything was removed again: processes, namespaces, the TUN device and its routes.
"""


def flood(lab: Lab, *args: str, timeout: float) -> dict[str, Any]:
    argv = [sys.executable, str(FLOOD), *args, "--json"]
    result: dict[str, Any] = json.loads(lab.run(lab.app, argv, timeout=timeout))
    return result


def table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    head = ("run", "ok", "failed", "sent MiB", "recv MiB", "seconds", "conn/s", "Gbit/s", "p99 ms")
    lines = [head]
    for name, r in rows:
        lines.append(
            (
                name,
                str(r["ok"]),
                str(r["failed"]),
                f"{r['bytes_sent'] / 2**20:.1f}",
                f"{r['bytes_received'] / 2**20:.1f}",
                f"{r['seconds']:.2f}",
                f"{r['conn_per_s']:.0f}",
                f"{r['throughput_bps'] / 1e9:.2f}",
                f"{r['latency_us']['p99'] / 1000:.1f}",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = [
        "  ".join(
            cell.rjust(width) if i else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        )
        for line in lines
    ]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def demo(connections: int, bulk_mib: int) -> int:
    with Lab() as lab:
        print(f"lab {lab.id}: namespaces {lab.app} and {lab.srv}", flush=True)
        for mode in ("echo", "sink"):
            lab.serve(
                [sys.executable, str(FLOOD), "--serve", f"{SERVER_ADDRESS}:{FLOOD_PORTS[mode]}",
                 "--mode", mode]
            )  # fmt: skip
        tunio = lab.start_tunio(["--workers", "2"])
        print(tunio.log.wait_for(r"\bready\b", 1.0), flush=True)

        echo = flood(
            lab,
            "--connect", f"{SERVER_ADDRESS}:{FLOOD_PORTS['echo']}", "--mode", "echo",
            "--connections", str(connections), "--concurrency", "50", "--bytes", "64K",
            "--timeout", "120",
            timeout=180,
        )  # fmt: skip
        sink = flood(
            lab,
            "--connect", f"{SERVER_ADDRESS}:{FLOOD_PORTS['sink']}", "--mode", "sink",
            "--connections", "1", "--concurrency", "1", "--bytes", f"{bulk_mib}M",
            "--timeout", "120",
            timeout=180,
        )  # fmt: skip
        code = tunio.stop()
        print()
        print(table([(f"{connections} x echo 64 KiB", echo), (f"1 x sink {bulk_mib} MiB", sink)]))
        print()
        print(
            EXPLANATION.format(
                app=lab.app,
                srv=lab.srv,
                server=SERVER_ADDRESS,
                tun=TUN_NAME,
                tun_address=TUN_ADDRESS,
            )
        )
        ok = echo["ok"] == connections and sink["ok"] == 1 and code == 0
    print("demo: OK" if ok else f"demo: FAILED (tunio-run exit {code})")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--connections", type=int, default=200, help="echo connections")
    parser.add_argument("--bulk-mib", type=int, default=64, help="size of the one sink transfer")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("demo: needs root (network namespaces, a TUN device): sudo make demo")
        return 2

    def interrupted(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupted)  # tear the lab down on SIGTERM too
    try:
        return demo(args.connections, args.bulk_mib)
    except LabError as exc:
        print(f"demo: FAILED: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("demo: interrupted; the lab was removed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
