"""No app left hanging, whatever happens to tunio: a stop, a killed stack, a killed worker, a
flood of new connections. Each test has its own lab; figures go to stdout (pytest -s shows them).
"""

from __future__ import annotations

import errno
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from lab.netlab import (
    BLACKHOLE_ADDRESS,
    FLOOD_PORTS,
    PEER_PORTS,
    SERVER_ADDRESS,
    SERVER_ADDRESS6,
    TUN_ADDRESS,
    TUN_NAME,
    UDP_ECHO_PORT,
    UNREACHABLE_ADDRESS,
    Lab,
    LineReader,
    TunioProcess,
    pattern,
    recv_exact,
)
from lab.watch import final_statistics, rss_kib, stack_pid, wait_workers

from tests.vm.conftest import start_flood_server

REPO = Path(__file__).resolve().parents[2]
SYNFLOOD = REPO / "tools" / "lab" / "synflood.py"
MESSAGE = pattern(1000)


def _stats(tunio: TunioProcess) -> dict[str, int]:
    try:
        return final_statistics(tunio)
    except KeyError as exc:
        pytest.fail(str(exc))


def _ends(socks: list[socket.socket], deadline: float,
          keep_moving: bool = False) -> dict[int, tuple[str, float]]:  # fmt: skip
    """Reads every socket until it is reset or sees EOF (or the deadline): fileno -> (how, when).
    With `keep_moving`, each socket sends MESSAGE again whenever its echo has come back."""
    sel = selectors.DefaultSelector()
    owed: dict[int, int] = {}
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        owed[s.fileno()] = 0
    ended: dict[int, tuple[str, float]] = {}

    def end(s: socket.socket, how: str) -> None:
        ended[s.fileno()] = (how, time.monotonic())
        sel.unregister(s)

    while len(ended) < len(socks) and time.monotonic() < deadline:
        for key, _ in sel.select(max(0.0, min(0.1, deadline - time.monotonic()))):
            obj = key.fileobj
            assert isinstance(obj, socket.socket)
            s = obj
            try:
                data = s.recv(65536)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                end(s, "reset")
                continue
            if not data:
                end(s, "eof")
                continue
            owed[s.fileno()] -= len(data)
            if keep_moving and owed[s.fileno()] <= 0:
                try:
                    owed[s.fileno()] += s.send(MESSAGE)
                except (ConnectionResetError, BrokenPipeError):
                    end(s, "reset")
                except BlockingIOError:
                    pass
    sel.close()
    return ended


# ---------------------------------------------------------------- a stop


def test_sigterm_resets_every_moving_flow_within_a_second(fresh_lab: Lab) -> None:
    flows = 500
    lab = fresh_lab
    start_flood_server(lab, "echo")
    tunio = lab.start_tunio()
    socks = [lab.connect(FLOOD_PORTS["echo"], SERVER_ADDRESS, timeout=15.0) for _ in range(flows)]
    try:
        # Every flow moves: one echo each first, then they keep echoing while the signal comes.
        for s in socks:
            s.sendall(MESSAGE)
        for s in socks:
            assert recv_exact(s, len(MESSAGE)) == MESSAGE
            s.sendall(MESSAGE)
        warm = _ends(socks, time.monotonic() + 0.3, keep_moving=True)
        assert warm == {}, "flows ended before the signal"
        tunio.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        ended = _ends(socks, signalled + 10.0, keep_moving=True)
    finally:
        for s in socks:
            s.close()
    code = tunio.stop()
    hung = flows - len(ended)
    delays = sorted(when - signalled for _, when in ended.values())
    kinds = [how for how, _ in ended.values()]
    print(f"\nSIGTERM with {flows} flows: {kinds.count('reset')} reset, {kinds.count('eof')} EOF, "
          f"{hung} hung; reset after {delays[0]:.3f}..{delays[-1]:.3f} s "
          f"(median {delays[len(delays) // 2]:.3f} s); stack: {_stats(tunio)['stop_resets']} "
          "resets waited for")
    assert hung == 0
    assert delays[-1] < 1.0, delays[-10:]
    assert kinds.count("reset") == flows  # an abortive close everywhere: never a clean EOF
    assert code == 0, tunio.log.text
    assert TUN_NAME not in lab.ip(lab.app, "link", "show")
    assert TUN_NAME not in lab.ip(lab.app, "route", "show", "table", "all")
    stats = _stats(tunio)
    assert stats["stop_resets"] >= flows
    assert stats["rst_to_apps"] >= flows


# ---------------------------------------------------------------- a killed stack


def test_killed_stack_resets_apps_that_only_receive(
    fresh_lab: Lab, fresh_servers: dict[str, LineReader]
) -> None:
    del fresh_servers
    apps = 20
    lab = fresh_lab
    tunio = lab.start_tunio()
    stack = stack_pid(tunio)
    servers = (SERVER_ADDRESS, SERVER_ADDRESS6)
    socks = [lab.connect(PEER_PORTS["echo"], servers[i % 2], timeout=15.0) for i in range(apps)]
    try:
        for s in socks:
            s.sendall(MESSAGE)
            assert recv_exact(s, len(MESSAGE)) == MESSAGE
        # From here on the apps only wait for bytes: nothing of theirs goes out.
        start = len(tunio.log.lines)
        os.kill(stack, signal.SIGKILL)
        killed = time.monotonic()
        ended = _ends(socks, killed + 10.0)
    finally:
        for s in socks:
            s.close()
    delays = sorted(when - killed for _, when in ended.values())
    kinds = [how for how, _ in ended.values()]
    print(f"\nkill -9 of the stack with {apps} receiving apps: {kinds.count('reset')} reset, "
          f"{apps - len(ended)} hung; reset after {delays[0] if delays else -1:.3f}.."
          f"{delays[-1] if delays else -1:.3f} s")
    assert kinds == ["reset"] * apps, ended
    assert delays[-1] < 5.0, delays
    tunio.log.wait_for(r"took over \d+ NAT entries of the previous stack", 10.0, start)
    # New flows work once the workers have joined the new stack.
    tunio.log.wait_for(r"worker-0 restarted", 15.0, start)
    tunio.log.wait_for(r"worker-1 restarted", 15.0, start)
    for server in servers:
        with lab.connect(PEER_PORTS["echo"], server, timeout=15.0) as sock:
            sock.sendall(MESSAGE)
            assert recv_exact(sock, len(MESSAGE)) == MESSAGE
    assert tunio.stop() == 0, tunio.log.text


# ---------------------------------------------------------------- a flood of new flows


def test_syn_flood_is_held_to_max_pending(
    fresh_lab: Lab, fresh_servers: dict[str, LineReader]
) -> None:
    del fresh_servers
    lab = fresh_lab
    limit, syns, rate = 200, 20000, 10000
    tunio = lab.start_tunio(["--max-pending", str(limit), "--connect-timeout", "3"])
    workers = wait_workers(tunio, 2)
    rss_before = {p: rss_kib(p) for p in workers}
    start = len(tunio.log.lines)
    source = TUN_ADDRESS.split("/")[0]
    flood = lab.popen(lab.app, [
        sys.executable, str(SYNFLOOD), "--source", source, "--target", f"{BLACKHOLE_ADDRESS}:80",
        "--target", f"{UNREACHABLE_ADDRESS}:80", "--count", str(syns), "--rate", str(rate),
        "--seconds", "20",
    ], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        # The flood is on once the stack reports refusals; a normal connection then still works.
        tunio.log.wait_for(r"held back \d+ new flows", 10.0, start)
        with lab.connect(PEER_PORTS["echo"], SERVER_ADDRESS, timeout=10.0) as sock:
            sock.sendall(MESSAGE)
            assert recv_exact(sock, len(MESSAGE)) == MESSAGE
        still_flooding = flood.poll() is None
        out, _ = flood.communicate(timeout=30)
    finally:
        if flood.poll() is None:
            flood.kill()
            flood.wait()
    assert flood.returncode == 0, out
    rss_after = {p: rss_kib(p) for p in workers}
    flood_lines = tunio.log.lines[start:]
    assert tunio.stop() == 0, tunio.log.text
    stats = _stats(tunio)
    held_back = stats["refused_max_pending"] + stats["deferred_pending_share"]
    refusal_lines = [line for line in flood_lines if "held back" in line]
    growth = max(rss_after[p] - rss_before[p] for p in workers)
    print(f"\nSYN flood: {out.strip()}; pending peak {stats['pending_peak']} (limit {limit}), "
          f"{stats['flows_opened']} flows opened, {held_back} SYNs held back "
          f"({stats['refused_max_pending']} refused past the limit, "
          f"{stats['deferred_pending_share']} left unanswered past a destination's share); "
          f"{len(flood_lines)} log lines during the flood ({len(refusal_lines)} about them, "
          f"{sum('dial' in x and 'failed' in x for x in flood_lines)} workers' failed dials); "
          f"worker RSS growth {growth} KiB; normal connection made while the flood ran: "
          f"{still_flooding}")
    assert still_flooding
    assert 0 < stats["pending_peak"] <= limit
    assert stats["pending"] == 0
    assert held_back >= syns // 2 - limit  # the black hole's half, but for its share
    assert len(refusal_lines) <= 2 * syns // rate + 3  # once a second at most
    # Not a line a flow: the stack's own lines are its summaries, and a worker says of the
    # dials that failed one line a second and a count (the flood's ~10,000 failed dials make a
    # few dozen lines between two workers, however long the dials take to fail).
    stack_lines = [line for line in flood_lines if "tunio-stack" in line]
    dial_lines = [x for x in flood_lines if "dial" in x and "failed" in x]
    assert len(stack_lines) <= 2 * syns // rate + 5
    assert stats["flows_opened"] > 1000  # the dials were there to be logged
    assert len(dial_lines) <= 2 * 2 * 15  # two workers, two lines a second, ~15 s at most
    assert len(flood_lines) < 100
    assert growth < 64 * 1024


def test_udp_session_past_max_flows_is_refused(fresh_lab: Lab) -> None:
    lab = fresh_lab
    lab.serve([sys.executable, str(REPO / "tools" / "flood.py"), "--serve",
               f"{SERVER_ADDRESS}:{UDP_ECHO_PORT}", "--mode", "udp-echo"])  # fmt: skip
    limit = 3
    tunio = lab.start_tunio(["--max-flows", str(limit), "--max-pending", str(limit)])
    socks = []
    try:
        for _ in range(limit + 1):
            s = lab.open_socket(type=socket.SOCK_DGRAM)
            socks.append(s)
            s.settimeout(5.0)
            s.connect((SERVER_ADDRESS, UDP_ECHO_PORT))
        for i, s in enumerate(socks[:limit]):
            s.send(b"session %d" % i)
            assert s.recv(100) == b"session %d" % i
        late = socks[limit]
        late.send(b"one too many")
        with pytest.raises(ConnectionRefusedError) as refused:
            late.recv(100)
        assert refused.value.errno == errno.ECONNREFUSED
        # The sessions that got in still work.
        socks[0].send(b"still")
        assert socks[0].recv(100) == b"still"
        # Counted, and reported from the stack's tick (once a second at most).
        tunio.log.wait_for(rf"held back 1 new flows .*: 1 refused past --max-flows {limit}", 5.0)
    finally:
        for s in socks:
            s.close()
    assert tunio.stop() == 0, tunio.log.text
    stats = _stats(tunio)
    assert stats["refused_max_flows"] == 1
    assert stats["udp_sessions_opened"] == limit


# ---------------------------------------------------------------- out of descriptors

FD_LIMIT = 200  # RLIMIT_NOFILE of the whole run: the stack holds one descriptor per flow
LIMITED = (f"import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_NOFILE, "
           f"({FD_LIMIT}, {FD_LIMIT})); sys.argv[0] = 'tunio-run'; "
           "runpy.run_module('tunio.cli', run_name='__main__')")  # fmt: skip


def test_out_of_descriptors_the_flows_past_the_limit_are_reset(
    fresh_lab: Lab, fresh_servers: dict[str, LineReader]
) -> None:
    """With more connections open than the descriptor limit lets the stack accept, each one
    past it is reset at once (its handshake is the kernel's, done before the stack could take
    it), the stack neither spins on its listener nor logs a line per attempt, and once the
    apps let go the next connection is carried again."""
    del fresh_servers
    lab = fresh_lab
    argv = [sys.executable, "-c", LIMITED, *lab.tunio_argv()[3:]]
    proc = lab.popen(lab.app, argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    tunio = TunioProcess(proc, argv, lab.runtime_dir)
    tunio.wait_ready()
    held: list[socket.socket] = []
    reset = 0
    try:
        for _ in range(FD_LIMIT + 30):
            sock = None
            try:  # the reset may come before connect() returns: the handshake was the kernel's
                sock = lab.connect(PEER_PORTS["echo"], timeout=10.0)
                sock.sendall(MESSAGE)
                assert recv_exact(sock, len(MESSAGE)) == MESSAGE
            except (ConnectionResetError, BrokenPipeError):
                if sock is not None:
                    sock.close()
                reset += 1
                continue
            held.append(sock)
        assert held, "no connection got through at all"
        assert reset >= 30, f"{len(held)} carried, {reset} reset"
        tunio.log.wait_for(r"out of file descriptors: \d+ connections reset", 5.0)
    finally:
        for sock in held:
            sock.close()
    with lab.connect(PEER_PORTS["echo"], timeout=10.0) as sock:  # carried again
        sock.sendall(MESSAGE)
        assert recv_exact(sock, len(MESSAGE)) == MESSAGE
    assert tunio.stop() == 0, tunio.log.text
    assert len(tunio.log.lines) < 100, tunio.log.lines[-5:]
    print(f"\nRLIMIT_NOFILE {FD_LIMIT}: {len(held)} connections carried, {reset} reset")


# ---------------------------------------------------------------- a killed worker


def test_held_connect_is_carried_by_another_worker(
    fresh_lab: Lab, fresh_servers: dict[str, LineReader], tmp_path: Path
) -> None:
    del fresh_servers
    lab = fresh_lab
    argv = lab.tunio_argv(["--dialer", "lab.stalldialer:from_env", "--connect-timeout", "30"])
    env = {"STALL_MARKER": str(tmp_path / "stalled"), "STALL_MARK": "0x1"}
    proc = lab.popen(lab.app, argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                     env=env)  # fmt: skip
    tunio = TunioProcess(proc, argv, lab.runtime_dir)
    tunio.wait_ready()
    wait_workers(tunio, 2)
    results: dict[int, socket.socket | OSError] = {}

    def connect(i: int) -> None:
        try:
            results[i] = lab.connect(PEER_PORTS["echo"], SERVER_ADDRESS, timeout=20.0)
        except OSError as exc:
            results[i] = exc

    held: tuple[threading.Thread, int] | None = None
    served: list[socket.socket] = []
    threads: list[threading.Thread] = []
    try:
        # Flows go to the least loaded worker: within a few connects one is held by worker-0.
        for i in range(4):
            t = threading.Thread(target=connect, args=(i,))
            threads.append(t)
            t.start()
            deadline = time.monotonic() + 5.0
            line = None
            while t.is_alive() and line is None and time.monotonic() < deadline:
                line = next((x for x in tunio.log.lines if "stall-dialer: holding" in x), None)
                time.sleep(0.01)  # polling two real events (the log, the thread) with a deadline
            if line is not None:
                held = (t, int(line.rsplit(" ", 1)[1]))
                break
            t.join(1.0)
            result = results[i]
            assert isinstance(result, socket.socket), result
            served.append(result)
        assert held is not None, tunio.log.text
        thread, pid = held
        assert pid in tunio.workers()
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        thread.join(15.0)
        took = time.monotonic() - killed
        result = results[threads.index(thread)]
        assert isinstance(result, socket.socket), f"the held connect failed: {result!r}"
        with result:
            result.sendall(MESSAGE)
            assert recv_exact(result, len(MESSAGE)) == MESSAGE
        # The log line says what was done: the killed worker's connections reset (the others
        # still echo), its held one passed on.
        line = tunio.log.wait_for(
            r"worker \S+ lost \(.*\): \d+ flows reset, 1 held flows passed to other workers, "
            r"0 UDP sessions ended",
            5.0,
        )
        reset = 0
        for s in served:
            try:
                s.sendall(MESSAGE)
                assert recv_exact(s, len(MESSAGE)) == MESSAGE
            except (ConnectionResetError, BrokenPipeError):
                reset += 1
        said = re.search(r": (\d+) flows reset", line)
        assert said is not None
        assert int(said[1]) == reset, line
    finally:
        for s in served:
            s.close()
        for t in threads:
            t.join(25.0)
    print(f"\nheld connect carried by another worker {took:.2f} s after its worker was killed")
    assert tunio.stop() == 0, tunio.log.text
    assert _stats(tunio)["flows_retried"] >= 1
