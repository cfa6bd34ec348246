"""Memory: a stalled flow holds one window per direction and a small constant, and what the
flows held goes back to the system once they have ended (issue 10).

Flows whose app never reads while the destination pushes far more than the window, through a
real tunio-run: the stack's peak RSS may grow by a window a flow and FLOW_CONSTANT, the workers'
(which stop reading a destination once its credit is spent) by much less; once the flows are
reset and no flow has run for the idle trim (TUNIO_DEFAULT_TRIM_IDLE_MS), the RSS of the stack
and of each worker comes back within 20% of what it was before the load. Once over bulk writes
(tools/flood.py's source: 256 KiB writes, DATA of up to the window), once over 1,000-byte writes
(peers.py's trickle: DATA of about 1,000 bytes, hundreds of them queued per flow). And the other
way: apps that push while the destination never reads (peers.py's deaf), where the workers hold
the window. Figures go to stdout (pytest -s shows them).
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from lab.netlab import (
    FLOOD_PORTS,
    PEER_PORTS,
    SERVER_ADDRESS,
    Lab,
    TunioProcess,
    process_title,
    recv_exact,
)

from tests.vm.conftest import PEERS, start_flood_server
from tests.vm.test_metrics import scrape, total
from tunio import defaults

WINDOW = 256 * 1024  # --window: the second window showed most at a window of one DATA or two
PUSHED = 50 * 1024 * 1024  # what each destination would send: far beyond any buffer on the way
#: what a stalled flow may hold in the stack beyond its window: its own state (~1 KiB) and
#: ~150 bytes a queued DATA (its chunk and ZeroMQ's message), ~40 KiB at 1,000-byte DATA
FLOW_CONSTANT = 48 * 1024
WORKER_PER_FLOW = WINDOW // 2  # a worker holds no window of a stalled app's flow
#: a worker holding a stalled destination's window: Python's own per flow and per queued DATA
#: (the flow, its socket, a frame and a view a DATA) cost more than the stack's
WORKER_UPLOAD = WINDOW + 2 * FLOW_CONSTANT
BACK_WITHIN = 1.2  # RSS after the idle trim, against the RSS before the load
STALL_QUIET = 2.5  # s without a byte moving (the stack reports once a second): stalled
TRICKLE_PORT = 5003
DEAF_PORT = 5004
PUSH = bytes(65536)  # what an app of the upload case sends at a time
ABORT = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() resets
REQUEST = struct.Struct(">QQ")  # tools/flood_common.py: the source's (seed, length)


@dataclass
class Rss:
    now: int  # KiB
    peak: int


def rss(pid: int) -> Rss:
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return Rss(int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0]))


def processes(tunio: TunioProcess) -> tuple[int, list[int]]:
    """The stack's pid and the workers'."""
    [stack] = [p for p in tunio.children() if "tunio-stack" in process_title(p)]
    workers = tunio.workers()
    assert len(workers) == 2, workers
    return stack, workers


def push(socks: list[socket.socket]) -> None:
    """Each app sends until its socket is full."""
    for sock in socks:
        with contextlib.suppress(BlockingIOError):
            while True:
                sock.send(PUSH)


def wait_stalled(
    lab: Lab, flows: int, deadline: float, feed: Callable[[], None] = lambda: None
) -> float:
    """Until no byte of the flows moves with every flow open (`feed` keeps the apps that push
    pushing): the bytes moved then."""
    last, since = -1.0, time.monotonic()
    while True:
        feed()
        samples = scrape(lab)
        moved = total(samples, "tunio_transferred_bytes_total")
        now = time.monotonic()
        if moved != last or total(samples, 'tunio_flows_active{kind="tcp"}') != flows:
            last, since = moved, now
        elif now - since >= STALL_QUIET:
            return moved
        assert now < deadline, f"the flows never stalled: {moved} bytes moved so far"
        time.sleep(0.25)  # the stack's next report is what we wait for: no event to wait on


def wait_back(pids: list[int], idle: dict[int, int], deadline: float) -> dict[int, int]:
    """Until the RSS of every process is within BACK_WITHIN of its idle RSS: the RSS then."""
    while True:
        now = {p: rss(p).now for p in pids}
        if all(now[p] <= idle[p] * BACK_WITHIN for p in pids) or time.monotonic() > deadline:
            return now
        time.sleep(0.25)  # the idle trim comes from the processes' own ticks: polled


def wait_no_flows(lab: Lab, deadline: float) -> None:
    while total(scrape(lab), "tunio_flows_active") or total(scrape(lab), "tunio_worker_flows"):
        assert time.monotonic() < deadline, "the flows did not end"
        time.sleep(0.25)  # the next report of the counters: no event to wait on


@pytest.mark.skipif("libasan" in os.environ.get("LD_PRELOAD", ""),
                    reason="under ASan (make asan) RSS measures the sanitizer's allocator")
@pytest.mark.parametrize(("source", "flows"), [("bulk", 200), ("trickle", 40), ("upload", 100)])
def test_stalled_flows_hold_a_window_and_give_it_back(
    fresh_lab: Lab, source: str, flows: int
) -> None:
    lab = fresh_lab
    if source == "bulk":
        start_flood_server(lab, "source")
        port, request = FLOOD_PORTS["source"], [REQUEST.pack(i + 1, PUSHED) for i in range(flows)]
    else:
        port = TRICKLE_PORT if source == "trickle" else DEAF_PORT
        lab.serve([sys.executable, str(PEERS), "trickle" if source == "trickle" else "deaf",
                   "--listen", f"{SERVER_ADDRESS}:{port}"])  # fmt: skip
        request = [b"%d\n" % PUSHED if source == "trickle" else b""] * flows
    tunio = lab.start_tunio(["--window", str(WINDOW), "--metrics", "127.0.0.1:9184"])
    stack, workers = processes(tunio)
    pids = [stack, *workers]
    idle = {p: rss(p).now for p in pids}
    socks = []
    try:
        for req in request:
            sock = lab.connect(port, SERVER_ADDRESS, timeout=15.0)
            socks.append(sock)
            sock.sendall(req)  # and never a read
        if source == "upload":
            for sock in socks:
                sock.setblocking(False)
        feed = (lambda: push(socks)) if source == "upload" else (lambda: None)
        moved = wait_stalled(lab, flows, time.monotonic() + 60.0, feed)
        loaded = {p: rss(p) for p in pids}
    finally:
        for sock in socks:  # the apps go with a reset: unsent bytes would wait for a deaf peer
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, ABORT)
            sock.close()
    wait_no_flows(lab, time.monotonic() + 30.0)
    back = wait_back(pids, idle, time.monotonic() + defaults.TRIM_IDLE + 20.0)
    stack_per_flow = (loaded[stack].peak - idle[stack]) * 1024 // flows
    worker_per_flow = sum(loaded[w].peak - idle[w] for w in workers) * 1024 // flows
    print(f"\n{flows} stalled flows ({source}, window {WINDOW // 1024} KiB): "
          f"{moved / flows / 2**20:.2f} MiB a flow moved before the stall; stack RSS "
          f"{idle[stack]} -> peak {loaded[stack].peak} KiB ({stack_per_flow // 1024} KiB a "
          f"flow), workers {[idle[w] for w in workers]} -> peak "
          f"{[loaded[w].peak for w in workers]} KiB ({worker_per_flow // 1024} KiB a flow); "
          f"after the idle trim: stack {back[stack]} KiB, workers "
          f"{[back[w] for w in workers]} KiB")
    # each flow took in more than the stack may hold of it: every flow really was stalled
    assert moved > flows * WINDOW
    assert stack_per_flow <= WINDOW + FLOW_CONSTANT
    # each flow is on one worker: their growth, a flow, is what one worker holds of it
    assert worker_per_flow <= (WORKER_UPLOAD if source == "upload" else WORKER_PER_FLOW)
    for p in pids:
        assert back[p] <= idle[p] * BACK_WITHIN, (process_title(p), idle[p], back[p])
    assert tunio.stop() == 0, tunio.log.text


def test_flows_to_destinations_that_take_nothing_leave_their_worker_serving(
    fresh_lab: Lab,
) -> None:
    """More stalled uploads than the worker's backlog holds (each holds a window its worker
    cannot credit back): the same worker still carries a new flow's bytes, both ways."""
    lab = fresh_lab
    lab.serve([sys.executable, str(PEERS), "deaf", "--listen", f"{SERVER_ADDRESS}:{DEAF_PORT}"])
    echo_port = PEER_PORTS["echo"]
    lab.serve([sys.executable, str(PEERS), "echo", "--listen", f"{SERVER_ADDRESS}:{echo_port}"])
    backlog = 4 * WINDOW
    tunio = lab.start_tunio(["--workers", "1", "--window", str(WINDOW), "--worker-backlog",
                             str(backlog), "--metrics", "127.0.0.1:9184"])  # fmt: skip
    flows = 2 * backlog // WINDOW  # twice what the backlog holds
    socks = []
    try:
        for _ in range(flows):
            sock = lab.connect(DEAF_PORT, SERVER_ADDRESS, timeout=15.0)
            sock.setblocking(False)
            socks.append(sock)
        wait_stalled(lab, flows, time.monotonic() + 60.0, lambda: push(socks))
        samples = scrape(lab)
        assert total(samples, "tunio_worker_backlog_bytes") >= backlog  # full, and stuck
        payload = os.urandom(256 * 1024)
        with lab.connect(echo_port, timeout=15.0) as echo:
            reader = threading.Thread(target=echo.sendall, args=(payload,))
            reader.start()
            assert recv_exact(echo, len(payload)) == payload
            reader.join()
    finally:
        for sock in socks:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, ABORT)
            sock.close()
    wait_no_flows(lab, time.monotonic() + 30.0)
    assert tunio.stop() == 0, tunio.log.text
