"""Where the CPU of a run goes: perf on the stack process, py-spy on each worker.

`make bench-conn BENCH_CONN_ARGS="--profile DIR"` wraps its short-connection flood in a
Profiler: `perf record` samples the stack process with call graphs (every thread: the loop,
the readers, ZeroMQ's I/O thread), `py-spy record` samples each worker's Python stacks
without stopping it (`--nonblocking`, which leaves out its C frames: a line's time includes
the C it calls, the kernel's work for a syscall among it). When the flood ends both are
stopped with SIGINT, which makes them write their files, and the report names the hottest
symbols per stack thread and the hottest Python functions of the workers, as shares of the
samples taken, so that a figure of bench-conn's (µs per connection of the loop thread, of the
workers) can be split by step. A worker's samples include its idle time, in the selector.
"""

from __future__ import annotations

import collections
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import TracebackType

TOP = 15


class Profiler:
    def __init__(self, out: Path, stack: int, workers: list[int]) -> None:
        self.out = out
        self.stack = stack
        self.workers = workers
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Profiler:
        self.out.mkdir(parents=True, exist_ok=True)
        if shutil.which("perf"):
            self.procs.append(subprocess.Popen(
                ["perf", "record", "-q", "-F", "1999", "-g", "-p", str(self.stack),
                 "-o", str(self.out / "stack.perf")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if Path(spy).exists():
            for i, pid in enumerate(self.workers):
                self.procs.append(subprocess.Popen(
                    [spy, "record", "--nonblocking", "-r", "499", "-f", "raw",
                     "-p", str(pid), "-o", str(self.out / f"worker-{i}.folded")],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        for p in self.procs:
            p.send_signal(signal.SIGINT)
        for p in self.procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def report(self) -> str:
        lines: list[str] = []
        perf = self.out / "stack.perf"
        if perf.exists():
            out = subprocess.run(
                ["perf", "report", "-i", str(perf), "--stdio", "--no-children",
                 "--sort", "comm,dso,sym", "-g", "none", "--percent-limit", "0.5"],
                capture_output=True, text=True, check=False).stdout  # fmt: skip
            lines.append("stack process (perf, self time by thread, library, symbol):")
            rows = [ln for ln in out.splitlines() if ln.strip() and not ln.startswith("#")]
            lines += ["  " + " ".join(r.split()) for r in rows[: TOP * 2]]
        for folded in sorted(self.out.glob("worker-*.folded")):
            lines.append(f"{folded.stem} (py-spy, self samples by function):")
            lines += ["  " + r for r in hottest(folded)]
        return "\n".join(lines)


def hottest(folded: Path) -> list[str]:
    """The TOP functions of a folded-stack file ("a;b;c N" per line), as shares of its samples:
    by self time (the leaf frame: where the time is spent) and by inclusive time (every frame
    on the stack: which step it is spent in), the frames under which nearly everything runs
    (the process's entry, the event loop) left out."""
    leaves: collections.Counter[str] = collections.Counter()
    within: collections.Counter[str] = collections.Counter()
    total = 0
    for line in folded.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        leaves[frames[-1]] += int(count)
        for frame in set(frames):
            within[frame] += int(count)
        total += int(count)
    if not total:
        return []
    out = ["self:"]
    out += [f"  {100.0 * n / total:5.1f}%  {f}" for f, n in leaves.most_common(TOP)]
    out.append("inclusive:")
    steps = [(f, n) for f, n in within.most_common() if n < 0.9 * total]
    out += [f"  {100.0 * n / total:5.1f}%  {f}" for f, n in steps[:TOP]]
    return out
