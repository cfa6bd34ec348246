"""CPU time spent during a benchmark run, for the whole machine and for given processes.

Throughput on a small machine is CPU-bound on every path, so the ratio tunio/plain is close to
the ratio of CPU each path spends per byte or per connection. Measuring that cost, and which
process spends it, is the profile behind every figure `make bench` prints: it shows how much
is the stack, how much the workers, and how much the kernel work both paths share.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from lab.netlab import descendants

_TICK = os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """CPU-seconds all CPUs have spent not idle since boot (/proc/stat: every field but idle
    and iowait; guest time is already inside user time)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    ticks = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) / _TICK


def _stat_cpu_s(stat: str) -> float:
    # the command name may hold spaces and parentheses: the fields start after the last ')'
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime (fields 14 and 15)


def process_cpu_s(pid: int) -> float:
    """CPU-seconds of `pid` and all its threads, user + system (0 if it is gone)."""
    try:
        return _stat_cpu_s(Path(f"/proc/{pid}/stat").read_text())
    except OSError:
        return 0.0


def _reaped_cpu_s(pid: int) -> float:
    """CPU-seconds of the children `pid` has waited for (cutime + cstime; 0 if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[13]) + int(fields[14])) / _TICK  # fields 16 and 17


def tree_cpu_s(root: int) -> float:
    """CPU-seconds of `root` and its living descendants, with what the children they reaped
    had spent: a process that forks and reaps helpers (danted does) is measured whole, and a
    helper that ends between two snapshots still counts, in its parent's figure."""
    return sum(process_cpu_s(pid) + _reaped_cpu_s(pid) for pid in [root, *descendants(root)])


def thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU-seconds of each thread of `pid`, by thread name (threads of one name are summed);
    empty if the process is gone."""
    out: dict[str, float] = {}
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return out
    for task in tasks:
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue  # the thread ended meanwhile
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        out[name] = out.get(name, 0.0) + _stat_cpu_s(stat)
    return out


@dataclass(frozen=True)
class Snapshot:
    machine: float
    groups: dict[str, float]
    threads: dict[str, float]


class CpuMeter:
    """Snapshots of CPU time for named groups of processes, e.g. {"stack": [pid],
    "workers": [pid, pid]}; `spent` gives CPU-seconds per group between two snapshots, with
    "all" for the whole machine and "other" for what no group spent (the traffic generators,
    the servers, and kernel work done in interrupt context). With `threads_of`, also each
    thread of that process by name, as "thread:<name>": which thread of the stack would be the
    first to fill a core. `trees` names groups by their first process instead: the process and
    whatever descends from it at each snapshot (`tree_cpu_s`)."""

    def __init__(
        self,
        groups: Mapping[str, Iterable[int]] | None = None,
        threads_of: int | None = None,
        trees: Mapping[str, int] | None = None,
    ) -> None:
        self.groups = {name: list(pids) for name, pids in (groups or {}).items()}
        self.threads_of = threads_of
        self.trees = dict(trees or {})

    def snapshot(self) -> Snapshot:
        per_group = {
            name: sum(process_cpu_s(pid) for pid in pids) for name, pids in self.groups.items()
        }
        per_group.update({name: tree_cpu_s(root) for name, root in self.trees.items()})
        threads = thread_cpu_s(self.threads_of) if self.threads_of is not None else {}
        return Snapshot(machine_busy_s(), per_group, threads)

    def spent(self, before: Snapshot, after: Snapshot) -> dict[str, float]:
        out = {"all": after.machine - before.machine}
        for name in [*self.groups, *self.trees]:
            out[name] = after.groups[name] - before.groups[name]
        out["other"] = out["all"] - sum(out[name] for name in [*self.groups, *self.trees])
        for name, seconds in after.threads.items():
            out[f"thread:{name}"] = max(0.0, seconds - before.threads.get(name, 0.0))
        return out


def per_unit(
    spent: Mapping[str, float], units: float, scale: float, prefix: str
) -> dict[str, float]:
    """CPU per unit of work, e.g. µs per connection (scale 1e6) or s per GB (scale 1):
    {"<prefix>_all": ..., "<prefix>_stack": ...}."""
    if units <= 0:
        return {}
    return {f"{prefix}_{name}": seconds * scale / units for name, seconds in spent.items()}
