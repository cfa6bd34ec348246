"""tools/flood.py end to end on loopback: server and client as subprocesses, byte-exact checks."""

from __future__ import annotations

import errno
import json
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from flood_common import handshake_age

FLOOD = Path(__file__).resolve().parents[2] / "tools" / "flood.py"
CHUNK = 256 * 1024  # the stream's chunk size: sizes around it cross chunk boundaries
STARTUP = 10.0  # seconds a server may take to say it listens
RUN_BOUND = 60.0  # seconds any client run may take


def _payload_bytes(mode: str, total: int) -> tuple[int, int]:
    """(bytes_sent, bytes_received) a byte-exact run of `mode` must report."""
    return {"echo": (total, total), "sink": (total, 0), "source": (0, total)}[mode]


@contextmanager
def flood_server(mode: str, *extra: str, host: str = "127.0.0.1") -> Iterator[str]:
    """A flood server on HOST:0; yields its `HOST:PORT`, then stops it with SIGTERM."""
    proc = subprocess.Popen(
        [sys.executable, str(FLOOD), "--serve", f"{host}:0" if ":" not in host else f"[{host}]:0",
         "--mode", mode, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], STARTUP)
        assert ready, "server did not say it listens"
        line = proc.stdout.readline().decode()
        assert line.startswith("listening "), (line, proc.stderr.read() if proc.stderr else b"")
        yield line.split()[1]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
    assert proc.returncode == 0, err.decode()


def run_client(addr: str, *args: str, timeout: float = RUN_BOUND) -> tuple[int, dict[str, Any]]:
    """Run the client with --json; its exit code and its JSON summary."""
    done = subprocess.run(
        [sys.executable, str(FLOOD), "--connect", addr, "--json", "--timeout", "30", *args],
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    assert done.stderr == b"", done.stderr.decode()
    lines = done.stdout.decode().splitlines()
    assert len(lines) == 1, lines
    return done.returncode, json.loads(lines[0])


def assert_exact(summary: dict[str, Any], mode: str, connections: int, nbytes: int) -> None:
    assert summary["mode"] == mode
    assert summary["connections"] == connections
    assert summary["ok"] == connections
    assert summary["failed"] == 0
    assert summary["errors"] == {}
    sent, received = _payload_bytes(mode, connections * nbytes)
    assert summary["bytes_sent"] == sent
    assert summary["bytes_received"] == received
    assert summary["bytes_per_connection"] == nbytes
    assert summary["seconds"] > 0
    assert summary["conn_per_s"] > 0
    lat = summary["latency_us"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]


@pytest.mark.parametrize("mode", ["echo", "sink", "source"])
@pytest.mark.parametrize(("connections", "concurrency", "nbytes"),
                         [(50, 10, 100), (3, 2, 2 * CHUNK + 12345), (4, 4, 0)])
def test_modes_are_byte_exact(mode: str, connections: int, concurrency: int,
                              nbytes: int) -> None:
    with flood_server(mode) as addr:
        rc, summary = run_client(addr, "--mode", mode, "--connections", str(connections),
                                 "--concurrency", str(concurrency), "--bytes", str(nbytes))
    assert rc == 0, summary
    assert_exact(summary, mode, connections, nbytes)


def test_processes_on_both_sides_merge() -> None:
    with flood_server("echo", "--processes", "2") as addr:
        rc, summary = run_client(addr, "--connections", "301", "--concurrency", "20",
                                 "--bytes", "1000", "--processes", "2")
    assert rc == 0, summary
    assert_exact(summary, "echo", 301, 1000)
    assert summary["processes"] == 2
    assert summary["concurrency"] == 20


def test_handshake_is_timed_by_the_kernel_not_by_the_client() -> None:
    """handshake_age reads the SYN-ACK's age from TCP_INFO: a connect noticed late still
    dates the handshake when it happened, and a loopback handshake needs no SYN again."""
    with socket.socket() as listener, socket.socket() as client:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        client.connect(listener.getsockname())
        noticed = time.monotonic() + 0.3
        while time.monotonic() < noticed:  # a client loop busy elsewhere
            select.select([], [], [], noticed - time.monotonic())
        age_ms, retransmits = handshake_age(client)
    assert 250 <= age_ms <= 2000
    assert retransmits == 0


def test_connect_figures_in_the_summary() -> None:
    with flood_server("echo") as addr:
        rc, summary = run_client(addr, "--connections", "20", "--concurrency", "5")
    assert rc == 0, summary
    assert summary["syn_retransmits"] == 0
    hs, seen = summary["handshake_us"], summary["connect_us"]
    assert 0 <= hs["p50"] <= hs["p99"] <= hs["max"] <= seen["max"]


def test_duration_bounds_the_opening_not_the_finishing() -> None:
    """With --duration the client opens connections for that long, lets the open ones end, and
    counts only the ones it opened: all byte-exact, none a timeout."""
    with flood_server("echo") as addr:
        started = time.monotonic()
        rc, summary = run_client(addr, "--connections", "1000000", "--concurrency", "20",
                                 "--bytes", "20000", "--duration", "1.0")
        took = time.monotonic() - started
    assert rc == 0, summary
    assert 20 < summary["connections"] < 1000000
    assert summary["ok"] == summary["connections"]
    assert summary["failed"] == 0
    assert summary["bytes_sent"] == summary["bytes_received"] == 20000 * summary["ok"]
    assert 1.0 <= took < 20.0


def test_ipv6_loopback() -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    with flood_server("source", host="::1") as addr:
        assert addr.startswith("[::1]:")
        rc, summary = run_client(addr, "--mode", "source", "--connections", "5",
                                 "--bytes", "777")
    assert rc == 0, summary
    assert_exact(summary, "source", 5, 777)


def test_closed_port_counts_econnrefused() -> None:
    # A bound socket that does not listen: its port refuses, and no one else can take it.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        rc, summary = run_client(f"127.0.0.1:{port}", "--connections", "20",
                                 "--concurrency", "5")
    assert rc == 1
    assert summary["ok"] == 0
    assert summary["failed"] == 20
    assert summary["errors"] == {"ECONNREFUSED": 20}
    assert summary["bytes_received"] == 0


@pytest.mark.parametrize("mode", ["echo", "sink", "source"])
@pytest.mark.parametrize(("nbytes", "corrupt_at"), [(5000, 4321), (CHUNK + 100, CHUNK + 7)])
def test_corruption_is_detected(mode: str, nbytes: int, corrupt_at: int) -> None:
    with flood_server(mode, "--corrupt-at", str(corrupt_at)) as addr:
        rc, summary = run_client(addr, "--mode", mode, "--connections", "6",
                                 "--concurrency", "3", "--bytes", str(nbytes))
    assert rc == 1
    assert summary["ok"] == 0
    assert summary["failed"] == 6
    assert summary["errors"] == {"verify": 6}


def test_corruption_past_the_end_is_harmless() -> None:
    with flood_server("echo", "--corrupt-at", "100") as addr:
        rc, summary = run_client(addr, "--connections", "4", "--bytes", "100")
    assert rc == 0, summary
    assert_exact(summary, "echo", 4, 100)


def test_silent_server_times_out() -> None:
    # A listener that never accepts: the kernel completes the handshakes, nothing answers.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        addr = f"127.0.0.1:{silent.getsockname()[1]}"
        start = time.monotonic()
        done = subprocess.run(
            [sys.executable, str(FLOOD), "--connect", addr, "--json", "--timeout", "1",
             "--connections", "7", "--concurrency", "3"],
            capture_output=True, timeout=RUN_BOUND, check=False,
        )
        elapsed = time.monotonic() - start
    summary = json.loads(done.stdout)
    assert done.returncode == 1
    assert summary["failed"] == 7
    assert summary["errors"] == {"timeout": 7}
    assert elapsed < 15


def test_server_stops_after_duration() -> None:
    proc = subprocess.Popen(
        [sys.executable, str(FLOOD), "--serve", "127.0.0.1:0", "--duration", "0.5",
         "--processes", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err.decode()
    assert out.decode().startswith("listening 127.0.0.1:")


def test_human_output_and_bad_arguments() -> None:
    with flood_server("echo") as addr:
        done = subprocess.run(
            [sys.executable, str(FLOOD), "--connect", addr, "--connections", "3"],
            capture_output=True, timeout=RUN_BOUND, check=False,
        )
    assert done.returncode == 0, done.stderr.decode()
    assert b"3 ok / 0 failed of 3" in done.stdout
    bad = subprocess.run(
        [sys.executable, str(FLOOD), "--connect", "127.0.0.1"],
        capture_output=True, timeout=RUN_BOUND, check=False,
    )
    assert bad.returncode == 2
    assert b"HOST:PORT" in bad.stderr


def test_no_stray_processes_after_sigterm() -> None:
    with flood_server("sink", "--processes", "3") as addr:
        rc, summary = run_client(addr, "--mode", "sink", "--connections", "10",
                                 "--bytes", "10K", "--processes", "3")
    assert rc == 0, summary
    assert_exact(summary, "sink", 10, 10 * 1024)
    # Every server process is gone: none still listens on the port.
    port = int(addr.rsplit(":", 1)[1])
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) == errno.ECONNREFUSED


# ---- UDP modes ---------------------------------------------------------------------------


def assert_udp_exact(summary: dict[str, Any], sessions: int, datagrams: int, size: int) -> None:
    total = sessions * datagrams
    assert summary["mode"] == "udp-echo"
    assert summary["connections"] == sessions
    assert summary["ok"] == sessions
    assert summary["failed"] == 0
    assert summary["errors"] == {}
    assert summary["datagrams_sent"] == total
    assert summary["datagrams_received"] == total
    assert summary["lost"] == 0
    assert summary["reordered"] == 0
    assert summary["duplicated"] == 0
    assert summary["bytes_sent"] == summary["bytes_received"] == total * size
    assert summary["datagrams_per_s"] > 0
    lat = summary["latency_us"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]


@pytest.mark.parametrize(("sessions", "datagrams", "size"), [(4, 500, 1400), (1, 50, 20),
                                                               (2, 20, 65507)])
def test_udp_echo_at_a_moderate_rate_is_exact(sessions: int, datagrams: int, size: int) -> None:
    with flood_server("udp-echo") as addr:
        rc, summary = run_client(addr, "--mode", "udp-echo", "--connections", str(sessions),
                                 "--datagrams", str(datagrams), "--size", str(size),
                                 "--rate", "5000")
    assert rc == 0, summary
    assert_udp_exact(summary, sessions, datagrams, size)
    assert summary["rate"] == 5000


def test_udp_echo_processes_and_ipv6() -> None:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    with flood_server("udp-echo", "--processes", "2", host="::1") as addr:
        rc, summary = run_client(addr, "--mode", "udp-echo", "--connections", "5",
                                 "--datagrams", "200", "--size", "512", "--rate", "4000",
                                 "--processes", "2")
    assert rc == 0, summary
    assert_udp_exact(summary, 5, 200, 512)
    assert summary["processes"] == 2


def test_udp_burst_reports_loss_consistently() -> None:
    with flood_server("udp-echo") as addr:
        _, summary = run_client(addr, "--mode", "udp-echo", "--connections", "4",
                                "--datagrams", "5000", "--size", "1400", "--rate", "0",
                                "--linger", "0.5")
    # loss is what a burst measures: not asserted, but it must add up
    assert summary["datagrams_sent"] == 20000
    assert summary["duplicated"] == 0
    assert summary["errors"] == {}
    assert summary["datagrams_received"] + summary["lost"] == 20000
    assert summary["loss_ratio"] == round(summary["lost"] / 20000, 6)


def test_udp_echo_to_a_closed_port_counts_econnrefused() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as held:
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
    rc, summary = run_client(f"127.0.0.1:{port}", "--mode", "udp-echo", "--connections", "3",
                             "--datagrams", "10", "--rate", "1000", "--linger", "0.2")
    assert rc == 1
    assert summary["ok"] == 0
    assert summary["failed"] == 3
    assert summary["datagrams_received"] == 0
    assert summary["lost"] == 30
    assert set(summary["errors"]) == {"ECONNREFUSED"}


class TinyResolver:
    """A loopback DNS responder on a thread: A records for `name`, NXDOMAIN for the rest."""

    def __init__(self, name: bytes = b"\x07example\x04test\x00", *, silent: bool = False) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.addr = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.name = name
        self.silent = silent
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + RUN_BOUND
        while not self.stop and time.monotonic() < deadline:
            try:
                data, peer = self.sock.recvfrom(512)
            except TimeoutError:
                continue
            if self.silent:
                continue
            qid, _flags = struct.unpack_from(">HH", data)
            question = data[12:]
            known = question[: len(self.name)].lower() == self.name
            flags = 0x8180 if known else 0x8183  # QR RD RA, NOERROR or NXDOMAIN
            answer = b""
            if known:  # a pointer to the question's name, A IN, TTL 60, 192.0.2.1
                answer = struct.pack(">HHHIH4s", 0xC00C, 1, 1, 60, 4, bytes([192, 0, 2, 1]))
            head = struct.pack(">HHHHHH", qid, flags, 1, 1 if known else 0, 0, 0)
            self.sock.sendto(head + question + answer, peer)

    def close(self) -> None:
        self.stop = True
        self.thread.join(RUN_BOUND)
        self.sock.close()


@contextmanager
def tiny_resolver(**kw: Any) -> Iterator[TinyResolver]:
    resolver = TinyResolver(**kw)
    try:
        yield resolver
    finally:
        resolver.close()


def test_dns_mode_counts_answers_and_rcodes() -> None:
    with tiny_resolver() as resolver:
        rc, summary = run_client(resolver.addr, "--mode", "dns", "--name", "Example.test",
                                 "--connections", "500", "--concurrency", "8", "--rate", "0")
        assert rc == 0, summary
        assert summary["mode"] == "dns"
        assert summary["ok"] == 500
        assert summary["failed"] == 0
        assert summary["lost"] == 0
        assert summary["datagrams_sent"] == summary["datagrams_received"] == 500
        assert summary["queries_per_s"] > 0
        assert summary["latency_us"]["p50"] > 0
        rc, summary = run_client(resolver.addr, "--mode", "dns", "--name", "other.test",
                                 "--connections", "20", "--concurrency", "4")
    assert rc == 1
    assert summary["errors"] == {"NXDOMAIN": 20}


def test_dns_mode_losses_and_refusals() -> None:
    with tiny_resolver(silent=True) as resolver:
        start = time.monotonic()
        rc, summary = run_client(resolver.addr, "--mode", "dns", "--connections", "6",
                                 "--concurrency", "3", "--query-timeout", "0.3")
        assert time.monotonic() - start < 15
    assert rc == 1
    assert summary["lost"] == 6
    assert summary["errors"] == {"timeout": 6}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as held:
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
    rc, summary = run_client(f"127.0.0.1:{port}", "--mode", "dns", "--connections", "4",
                             "--concurrency", "2")
    assert rc == 1
    assert summary["errors"] == {"ECONNREFUSED": 4}


@pytest.mark.parametrize("argv", [
    ["--connect", "127.0.0.1:9", "--mode", "udp-echo", "--size", "5"],
    ["--connect", "127.0.0.1:9", "--mode", "dns", "--name", "a..b"],
    ["--serve", "127.0.0.1:0", "--mode", "dns"],
])
def test_udp_modes_reject_bad_arguments(argv: list[str]) -> None:
    bad = subprocess.run([sys.executable, str(FLOOD), *argv], capture_output=True,
                         timeout=RUN_BOUND, check=False)
    assert bad.returncode == 2, bad


def test_rr_counts_exchanges_and_latency() -> None:
    with flood_server("echo") as addr:
        code, summary = run_client(addr, "--mode", "rr", "--requests", "200", "--bytes", "100")
    assert code == 0, summary
    assert summary["mode"] == "rr"
    assert summary["failed"] == 0
    assert summary["bytes_sent"] == summary["bytes_received"] == 200 * 100
    lat = summary["latency_us"]
    assert 0 < lat["p50"] <= lat["p99"] <= lat["max"]


def test_rr_detects_a_corrupted_echo() -> None:
    with flood_server("echo", "--corrupt-at", "150") as addr:
        code, summary = run_client(addr, "--mode", "rr", "--requests", "5", "--bytes", "100")
    assert code == 1
    # the second exchange comes back wrong; the connection is not trusted after that
    assert summary["failed"] >= 1
    assert "verify" in summary["errors"], summary["errors"]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--timeout", "nan"], "argument --timeout: must be above 0 and at most 86400 s: nan"),
        (["--timeout", "inf"], "argument --timeout: must be above 0"),
        (["--duration", "-1"], "argument --duration: must be above 0"),
        (["--rate", "nan"], "argument --rate: must be a finite number, 0 or more"),
        (["--max-mbps", "0"], "argument --max-mbps: must be a finite number above 0"),
    ],
)
def test_a_bound_that_would_not_bound_is_refused(args: list[str], words: str) -> None:
    """Every run stops by itself: a time bound of NaN or infinity is an error, not a run."""
    argv = [sys.executable, str(FLOOD), "--connect", "127.0.0.1:9", *args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=RUN_BOUND, check=False)
    assert proc.returncode == 2
    assert words in proc.stderr
