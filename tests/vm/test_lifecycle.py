"""tunio-run's processes: a worker that dies, and a clean stop. Each test has its own lab."""

from __future__ import annotations

import errno
import os
import signal
import socket
import time

import pytest
from lab.netlab import (
    PEER_PORTS,
    SERVER_ADDRESS,
    SERVER_ADDRESS6,
    TUN_NAME,
    Lab,
    LineReader,
    TunioProcess,
    alive,
    leftover_processes,
    pattern,
    process_title,
    recv_exact,
)
from lab.watch import stack_pid

FLOWS = 8  # with two workers and least-loaded placement, each worker holds some
# flows go to the workers in turn: pairs of each family give each worker flows of both
SERVERS = (SERVER_ADDRESS, SERVER_ADDRESS6)


def _server(i: int) -> str:
    return SERVERS[(i // 2) % 2]
RESET_DEADLINE = 15.0  # liveness is 3 s of silence; leave room for a loaded machine
MESSAGE = pattern(1000)


def _echo_once(sock: socket.socket) -> None:
    sock.sendall(MESSAGE)
    assert recv_exact(sock, len(MESSAGE)) == MESSAGE


def _outcome(sock: socket.socket) -> str:
    """'ok' if the flow still echoes, 'reset' if it was reset; anything else is a failure."""
    try:
        _echo_once(sock)
    except ConnectionResetError as exc:
        return "reset" if exc.errno == errno.ECONNRESET else f"errno {exc.errno}"
    return "ok"


def _worker_pids(tunio: TunioProcess, count: int, timeout: float) -> list[int]:
    """Wait until tunio-run has `count` worker processes; their pids."""
    deadline = time.monotonic() + timeout
    while True:
        workers = tunio.workers()
        if len(workers) == count:
            return workers
        if time.monotonic() > deadline:
            titles = {p: process_title(p) for p in tunio.children()}
            pytest.fail(f"expected {count} tunio-worker-* processes, found {workers}: {titles}")
        time.sleep(0.1)  # polling /proc: there is no event for "a process was started"


def test_killed_worker_resets_its_flows_and_others_carry_on(
    fresh_lab: Lab, fresh_servers: dict[str, LineReader]
) -> None:
    del fresh_servers
    tunio = fresh_lab.start_tunio()
    victim = _worker_pids(tunio, 2, 10.0)[0]
    flows = [
        fresh_lab.connect(PEER_PORTS["echo"], _server(i), timeout=RESET_DEADLINE)
        for i in range(FLOWS)
    ]
    try:
        for sock in flows:
            _echo_once(sock)  # every flow is established through some worker
        os.kill(victim, signal.SIGKILL)
        outcomes = [_outcome(sock) for sock in flows]
    finally:
        for sock in flows:
            sock.close()
    # The dead worker's flows were reset (a RST: not an EOF, not a hang); the rest still work.
    assert set(outcomes) <= {"ok", "reset"}, outcomes
    assert outcomes.count("reset") >= 1, outcomes
    assert outcomes.count("ok") >= 1, outcomes
    assert tunio.running(), tunio.log.text
    # New flows are served (by the surviving worker or the restarted one) ...
    for i in range(FLOWS):
        with fresh_lab.connect(PEER_PORTS["echo"], _server(i), timeout=RESET_DEADLINE) as sock:
            _echo_once(sock)
    # ... and the dead worker was replaced.
    assert victim not in _worker_pids(tunio, 2, 20.0)
    assert tunio.stop() == 0, tunio.log.text


def _served_by_the_new_stack(lab: Lab, tunio: TunioProcess, start: int) -> None:
    """New flows of both families are served once the workers, restarted, have joined the stack
    that replaced the old one (log lines from `start` on); then a clean stop."""
    tunio.log.wait_for(r"worker-1 restarted", RESET_DEADLINE, start)
    tunio.log.wait_for(r"worker-0 restarted", RESET_DEADLINE, start)
    for server in SERVERS:
        with lab.connect(PEER_PORTS["echo"], server, timeout=RESET_DEADLINE) as sock:
            _echo_once(sock)
    assert tunio.stop() == 0, tunio.log.text


def test_killed_stack_is_restarted_and_old_flows_are_reset(
    fresh_lab: Lab, fresh_servers: dict[str, LineReader]
) -> None:
    del fresh_servers
    tunio = fresh_lab.start_tunio()
    stack = stack_pid(tunio)
    old = fresh_lab.connect(PEER_PORTS["echo"], SERVER_ADDRESS, timeout=RESET_DEADLINE)
    try:
        _echo_once(old)
        start = len(tunio.log.lines)
        os.kill(stack, signal.SIGKILL)
        tunio.log.wait_for(r"stack restarted", RESET_DEADLINE, start)
        tunio.log.wait_for(r"restarting 2 worker\(s\) so they join the new stack",
                           RESET_DEADLINE, start)
        # The new stack has no NAT state for the old flow: its next segment gets a RST.
        assert _outcome(old) == "reset"
    finally:
        old.close()
    _worker_pids(tunio, 2, RESET_DEADLINE)
    _served_by_the_new_stack(fresh_lab, tunio, start)


def test_sigterm_stops_everything_and_cleans_up(
    fresh_lab: Lab, fresh_servers: dict[str, LineReader]
) -> None:
    del fresh_servers
    lab = fresh_lab
    rules_before = lab.ip(lab.app, "rule", "show")
    tunio = lab.start_tunio()
    for server in SERVERS:
        with lab.connect(PEER_PORTS["echo"], server) as sock:
            _echo_once(sock)
    children = tunio.children()
    assert children, "tunio-run has no child processes"
    assert TUN_NAME in lab.ip(lab.app, "link", "show")
    assert tunio.socket_path.exists()

    assert tunio.stop() == 0, tunio.log.text

    assert [p for p in children if alive(p)] == []
    ours = {p.pid for p in lab.processes if p.poll() is None}  # the test servers
    assert set(leftover_processes([lab.id])) - ours == set()
    assert TUN_NAME not in lab.ip(lab.app, "link", "show")
    assert TUN_NAME not in lab.ip(lab.app, "route", "show", "table", "all")
    assert TUN_NAME not in lab.ip(lab.app, "-6", "route", "show", "table", "all")
    assert lab.ip(lab.app, "rule", "show") == rules_before
    assert not tunio.socket_path.exists()
    assert not tunio.runtime_dir.exists()


HANG = 2.0  # --hang-timeout of the hung-process tests, s


def test_a_stopped_stack_is_killed_and_its_successor_serves(
    fresh_lab: Lab, fresh_servers: dict[str, LineReader]
) -> None:
    """A stack that no longer runs (SIGSTOP here; a stuck loop alike) but does not die: every
    flow stood still for good, and nothing was restarted."""
    del fresh_servers
    tunio = fresh_lab.start_tunio(["--hang-timeout", f"{HANG:g}"])
    stack = stack_pid(tunio)
    start = len(tunio.log.lines)
    os.kill(stack, signal.SIGSTOP)
    try:
        tunio.log.wait_for(r"stack showed no sign of life for \d+\.\d s \(its loop has not "
                           r"turned", HANG + RESET_DEADLINE, start)  # fmt: skip
        tunio.log.wait_for(r"stack exited with signal SIGKILL", RESET_DEADLINE, start)
    finally:
        if alive(stack):
            os.kill(stack, signal.SIGKILL)
    _served_by_the_new_stack(fresh_lab, tunio, start)


def test_a_stopped_worker_is_killed_and_started_again(
    fresh_lab: Lab, fresh_servers: dict[str, LineReader]
) -> None:
    del fresh_servers
    tunio = fresh_lab.start_tunio(["--hang-timeout", f"{HANG:g}"])
    workers = _worker_pids(tunio, 2, RESET_DEADLINE)
    start = len(tunio.log.lines)
    os.kill(workers[0], signal.SIGSTOP)
    try:
        tunio.log.wait_for(r"worker-\d showed no sign of life for \d+\.\d s \(its loop sent no "
                           r"report", HANG + RESET_DEADLINE, start)  # fmt: skip
        tunio.log.wait_for(r"worker-\d restarted", RESET_DEADLINE, start)
    finally:
        if alive(workers[0]):
            os.kill(workers[0], signal.SIGKILL)
    now = _worker_pids(tunio, 2, RESET_DEADLINE)
    assert workers[0] not in now, (workers, now)
    assert workers[1] in now, (workers, now)  # the other one was left alone
    for i in range(4):  # both workers carry flows again
        with fresh_lab.connect(PEER_PORTS["echo"], _server(i), timeout=RESET_DEADLINE) as sock:
            _echo_once(sock)
    assert tunio.stop() == 0, tunio.log.text


def test_a_deleted_device_ends_the_run_in_failure(
    fresh_lab: Lab, fresh_servers: dict[str, LineReader]
) -> None:
    """The TUN deleted under the run: a stack that ran on (or a new one on the same dead queues)
    would forward nothing for good; the run ends with status 1, so that a service manager
    starts it again, and says why."""
    del fresh_servers
    tunio = fresh_lab.start_tunio()
    with fresh_lab.connect(PEER_PORTS["echo"], SERVER_ADDRESS) as sock:
        _echo_once(sock)
    start = len(tunio.log.lines)
    fresh_lab.ip(fresh_lab.app, "link", "del", TUN_NAME)
    try:
        code = tunio.proc.wait(RESET_DEADLINE)
    finally:
        tunio.stop()  # (at once if it has exited)
    assert code == 1, tunio.log.text
    tunio.log.wait_for(r"every TUN queue failed \(2\): the device is gone", 1.0, start)
    tunio.log.wait_for(rf"the TUN device {TUN_NAME} is gone \(deleted while the run used it\)",
                       1.0, start)  # fmt: skip
    # its routes went with the device: nothing is left for --cleanup
    assert not any("could not remove" in line or "left in" in line
                   for line in tunio.log.lines[start:]), tunio.log.text  # fmt: skip
    assert not tunio.children()
