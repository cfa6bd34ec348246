"""The measuring parts of `make bench`: CPU accounting from /proc, and the round-trip floor."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

from bench_cost import (
    CpuMeter,
    machine_busy_s,
    per_unit,
    process_cpu_s,
    thread_cpu_s,
    tree_cpu_s,
)
from bench_floor import unix_rtt, zmq_rtt

from tunio.process import keep_freed_memory, set_process_name

BURN_S = 0.2  # CPU-seconds to burn for a measurable difference (ticks are 10 ms)


def set_thread_name(name: str) -> None:
    """Names the calling thread (as the stack names its readers)."""
    Path(f"/proc/self/task/{threading.get_native_id()}/comm").write_text(name)


def _burn(seconds: float) -> None:
    """Spend `seconds` of this thread's CPU time (bounded by 20 s of wall time)."""
    start, deadline = time.thread_time(), time.monotonic() + 20
    while time.thread_time() - start < seconds and time.monotonic() < deadline:
        sum(range(10_000))


def test_process_cpu_grows_with_work() -> None:
    before = process_cpu_s(os.getpid())
    _burn(BURN_S)
    spent = process_cpu_s(os.getpid()) - before
    assert BURN_S * 0.8 <= spent <= BURN_S + 2


def test_machine_busy_grows_at_least_as_much() -> None:
    before = machine_busy_s()
    _burn(BURN_S)
    assert machine_busy_s() - before >= BURN_S * 0.8


def test_gone_process_counts_zero() -> None:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    assert process_cpu_s(pid) == 0.0


def test_name_with_parentheses_and_spaces() -> None:
    # /proc/PID/stat puts the name in parentheses: the fields are found after the last one
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        set_process_name("a) b (c")
        _burn(BURN_S)
        os.write(ready_w, b"x")
        os.read(done_r, 1)  # hold still until the parent has looked
        os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"x"
        assert Path(f"/proc/{pid}/comm").read_text().strip() == "a) b (c"
        assert process_cpu_s(pid) >= BURN_S * 0.8
    finally:
        os.write(done_w, b"x")
        os.waitpid(pid, 0)
        for fd in (ready_r, ready_w, done_r, done_w):
            os.close(fd)


def test_meter_splits_the_machine_into_groups_and_other() -> None:
    meter = CpuMeter({"me": [os.getpid()]})
    before = meter.snapshot()
    _burn(BURN_S)
    spent = meter.spent(before, meter.snapshot())
    assert set(spent) == {"all", "me", "other"}
    assert spent["me"] >= BURN_S * 0.8
    assert spent["other"] == pytest.approx(spent["all"] - spent["me"])


BURNER = (
    "import sys, time\n"
    "start = time.process_time()\n"
    "while time.process_time() - start < float(sys.argv[1]) and time.monotonic() < {bound}:\n"
    "    sum(range(10_000))\n"
    "print('burnt', flush=True)\n"
    "sys.stdin.read()\n"  # then waits until the test closes its stdin
)


def _burner(seconds: float) -> subprocess.Popen[str]:
    code = BURNER.format(bound=time.monotonic() + 20)
    return subprocess.Popen([sys.executable, "-c", code, str(seconds)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


def test_a_tree_counts_living_and_reaped_descendants() -> None:
    """A process tree's figure has its living children's CPU, and keeps a child's once the
    child has ended and been waited for (as danted's helpers come and go)."""
    meter = CpuMeter(trees={"tree": os.getpid()})
    before = meter.snapshot()
    child = _burner(BURN_S)
    assert child.stdout is not None
    try:
        assert child.stdout.readline() == "burnt\n"
        alive = tree_cpu_s(os.getpid()) - before.groups["tree"]
        assert alive >= BURN_S * 0.8
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(20)
        child.stdout.close()
    spent = meter.spent(before, meter.snapshot())
    assert set(spent) == {"all", "tree", "other"}
    assert spent["tree"] >= BURN_S * 0.8  # the ended child, in our cutime


def test_threads_are_counted_by_name() -> None:
    done, release = threading.Event(), threading.Event()

    def named() -> None:
        set_thread_name("bench-burner")
        _burn(BURN_S)
        done.set()
        release.wait(30)  # alive until it has been counted

    meter = CpuMeter(threads_of=os.getpid())
    before = meter.snapshot()
    thread = threading.Thread(target=named)
    thread.start()
    assert done.wait(30)
    spent = meter.spent(before, meter.snapshot())
    release.set()
    thread.join()
    assert spent["thread:bench-burner"] >= BURN_S * 0.8
    assert thread_cpu_s(os.getpid())  # the main thread at least


def test_per_unit_scales_and_names() -> None:
    spent = {"all": 2.0, "stack": 0.5}
    assert per_unit(spent, 1000, 1e6, "us") == {"us_all": 2000.0, "us_stack": 500.0}
    assert per_unit(spent, 0, 1e6, "us") == {}


@pytest.mark.parametrize("measure", [unix_rtt, zmq_rtt], ids=["unix", "zeromq"])
def test_round_trip_floor(measure: object) -> None:
    assert callable(measure)
    result = measure(200)
    assert 0 < result["p50"] <= result["p99"]
    assert result["mean"] > 0


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_keep_freed_memory_takes_on_glibc() -> None:
    assert keep_freed_memory() is True
