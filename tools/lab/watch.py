"""What a test reads off a running tunio: its processes' memory, the stack's counters, a link's.

Kept apart from the lab that builds the namespaces: these only look, they change nothing.
"""

from __future__ import annotations

import ast
import json
import subprocess
import threading
import time
from pathlib import Path
from types import TracebackType

from lab.netlab import TunioProcess, process_title

STATS_MARK = "stack statistics: {"  # the line the stack logs when it stops (tunio.stack)


def rss_kib(pid: int) -> int:
    """The process's resident set, KiB; 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_parts_kib(pid: int) -> dict[str, int]:
    """The resident set by kind, KiB: "anon" (the heap and stacks), "file" (mapped files, the
    code) and "shmem" (shared memory: the stack's NAT region and DNS map, tables of a fixed size
    whose touched pages stay resident); empty once the process is gone."""
    parts: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            for key, name in (("RssAnon:", "anon"), ("RssFile:", "file"), ("RssShmem:", "shmem")):
                if line.startswith(key):
                    parts[name] = int(line.split()[1])
    except OSError:
        pass
    return parts


def private_rss_kib(pid: int) -> int:
    """RSS without shared memory: what a process's own allocations hold."""
    parts = rss_parts_kib(pid)
    return parts.get("anon", 0) + parts.get("file", 0)


def stack_pid(tunio: TunioProcess) -> int:
    [pid] = [p for p in tunio.children() if "tunio-stack" in process_title(p)]
    return pid


def wait_workers(tunio: TunioProcess, count: int, timeout: float = 20.0) -> list[int]:
    """The worker pids once `count` of them run; AssertionError past `timeout`."""
    deadline = time.monotonic() + timeout
    while len(workers := tunio.workers()) != count:
        assert time.monotonic() < deadline, f"{count} workers expected, found {workers}"
        time.sleep(0.05)  # polling /proc: there is no event for "a process was started"
    return workers


def final_statistics(tunio: TunioProcess) -> dict[str, int]:
    """The counters of the stack's last statistics line (logged when it stops), or KeyError."""
    for line in reversed(tunio.log.lines):
        if STATS_MARK in line:
            found: dict[str, int] = ast.literal_eval(line[line.index("{") :])
            return found
    raise KeyError(f"no statistics line in the log:\n{tunio.log.text}")


def link_counters(netns: str, dev: str) -> dict[str, int]:
    """The device's packet counters (`ip -s link`): rx/tx packets and drops."""
    out = subprocess.run(["ip", "-n", netns, "-s", "-j", "link", "show", dev],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    stats = json.loads(out)[0]["stats64"]
    return {
        "rx_packets": stats["rx"]["packets"],
        "rx_dropped": stats["rx"]["dropped"],
        "tx_packets": stats["tx"]["packets"],
        "tx_dropped": stats["tx"]["dropped"],
    }


class RssPeaks:
    """Samples the RSS of some processes every `every` seconds on a thread: the peak of each.

    A sample is a look, not a wait: the peaks are as fine as `every`, which is what a figure of
    peak memory needs (a flow's buffers live for seconds)."""

    def __init__(self, pids: list[int], every: float = 0.25) -> None:
        self.peak = {p: rss_kib(p) for p in pids}
        self._every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-peaks", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            for pid in self.peak:
                self.peak[pid] = max(self.peak[pid], rss_kib(pid))

    def __enter__(self) -> RssPeaks:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        self._stop.set()
        self._thread.join()
