"""The metrics page: Prometheus text from the children's reports, and the endpoint serving it."""

from __future__ import annotations

import http.client
import re
import socket
import time
import urllib.error
import urllib.request

import pytest

from tunio.config import parse_host_port
from tunio.defaults import DIAL_BUCKETS
from tunio.errors import ConfigError
from tunio.metrics import CONTENT_TYPE, MetricsServer, render
from tunio.worker.stats import WorkerStats

_SAMPLE = re.compile(r'^([a-z_]+)(\{[^}]*\})? (-?[0-9.e+]+|\+Inf)$')


def _samples(text: str) -> dict[str, float]:
    """Every sample line as "name{labels}" -> value; every line is a comment or a sample."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("# "):
            assert line.startswith(("# HELP ", "# TYPE ")), line
            continue
        match = _SAMPLE.match(line)
        assert match, f"not a sample: {line!r}"
        out[match[1] + (match[2] or "")] = float(match[3])
    return out


def _worker() -> dict[str, object]:
    stats = WorkerStats()
    stats.opens = 3
    stats.bytes_to_destination = 1234
    stats.datagrams_to_destination = 17
    stats.dialed("direct", 0.0004)
    stats.dialed("direct", 0.003)
    stats.attempt_failed("direct", 111)
    stats.dialed('socks5://"odd"', 0.2)
    return {**stats.snapshot(), "flows_active": 2}


def test_the_page_adds_up_the_reports() -> None:
    stack = {"flows_active": 5, "flows_opened": 40, "udp_sessions": 1, "bytes_to_workers": 99,
             "refused_max_pending": 7, "workers": 2, "nat_entries": 12}  # fmt: skip
    page = render({"stack": stack, "worker-0": _worker()}, {"worker-1": 2}, {"tx": 3, "rx": 0})
    got = _samples(page)
    assert got['tunio_flows_active{kind="tcp"}'] == 5
    assert got['tunio_flows_active{kind="datagram"}'] == 1
    assert got['tunio_flows_total{kind="tcp"}'] == 40
    assert got['tunio_transferred_bytes_total{direction="to_destination"}'] == 99
    assert got['tunio_refused_flows_total{reason="max_pending"}'] == 7
    assert got['tunio_workers{state="alive"}'] == 2
    assert got["tunio_nat_entries"] == 12
    assert got['tunio_worker_flows{worker="worker-0"}'] == 2
    assert got['tunio_worker_bytes_total{worker="worker-0"}'] == 1234
    assert got['tunio_worker_datagrams_sent_total{worker="worker-0"}'] == 17
    assert got['tunio_restarts_total{process="worker-1"}'] == 2
    assert got['tunio_tun_dropped_packets_total{direction="tx"}'] == 3
    base = 'dialer="direct",worker="worker-0"'
    assert got[f'tunio_dial_duration_seconds_bucket{{{base},le="0.0005"}}'] == 1
    assert got[f'tunio_dial_duration_seconds_bucket{{{base},le="0.005"}}'] == 2  # cumulative
    assert got[f'tunio_dial_duration_seconds_bucket{{{base},le="+Inf"}}'] == 2
    assert got[f"tunio_dial_duration_seconds_count{{{base}}}"] == 2
    assert got[f"tunio_dial_duration_seconds_sum{{{base}}}"] == pytest.approx(0.0034)
    refused = 'dialer="direct",errno="ECONNREFUSED",worker="worker-0"'
    assert got[f"tunio_dial_errors_total{{{refused}}}"] == 1
    # a label value is escaped, not cut
    odd = 'dialer="socks5://\\"odd\\"",worker="worker-0"'
    assert got[f"tunio_dial_duration_seconds_count{{{odd}}}"] == 1
    # each family is typed once, counters end in _total
    types = re.findall(r"^# TYPE (\S+) (\S+)$", page, re.M)
    assert len(types) == len({name for name, _ in types})
    assert all(name.endswith("_total") for name, kind in types if kind == "counter")


def test_a_page_before_any_report_has_the_families_and_no_samples() -> None:
    got = _samples(render({}, {}, {}))
    assert got == {}


def test_histogram_buckets_are_the_defaults() -> None:
    page = render({"worker-0": _worker()}, {}, {})
    les = re.findall(r'tunio_dial_duration_seconds_bucket\{dialer="direct",worker="worker-0",'
                     r'le="([^"]+)"\}', page)  # fmt: skip
    assert les == [f"{b:g}" for b in DIAL_BUCKETS] + ["+Inf"]


def test_the_server_answers_get_metrics() -> None:
    server = MetricsServer("127.0.0.1", 0, lambda: "tunio_up 1\n")
    server.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as r:
            assert r.status == 200
            assert r.headers["Content-Type"] == CONTENT_TYPE
            assert r.read() == b"tunio_up 1\n"
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/nope", timeout=5)
        assert caught.value.code == 404
    finally:
        server.stop()


def recv_all(sock: socket.socket) -> bytes:
    got = bytearray()
    while chunk := sock.recv(4096):
        got += chunk
    return bytes(got)


def test_a_silent_client_is_dropped() -> None:
    server = MetricsServer("127.0.0.1", 0, lambda: "tunio_up 1\n", idle_timeout=0.2)
    server.start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as silent:
            assert silent.recv(1) == b""  # closed by the server, unanswered; not a timeout here
    finally:
        server.stop()


def test_past_max_clients_a_connection_is_closed_and_a_freed_slot_serves_again() -> None:
    server = MetricsServer("127.0.0.1", 0, lambda: "tunio_up 1\n", idle_timeout=30.0,
                           max_clients=2)  # fmt: skip
    server.start()
    url = f"http://127.0.0.1:{server.port}/metrics"
    try:
        idle = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(2)]
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as third:
            # the two before it hold both slots: a 503 and the close
            assert recv_all(third).startswith(b"HTTP/1.0 503 Service Unavailable\r\n")
        assert server.refused == 1
        idle[0].close()  # its thread reads EOF and gives its slot back
        deadline = time.monotonic() + 5
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    assert r.read() == b"tunio_up 1\n"
                break
            except (urllib.error.URLError, ConnectionError, http.client.RemoteDisconnected):
                assert time.monotonic() < deadline, "the freed slot never served"
        idle[1].close()
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:9184", ("127.0.0.1", 9184)), ("[::1]:9184", ("::1", 9184)),
     ("0.0.0.0:1", ("0.0.0.0", 1))],
)
def test_host_port(text: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(text, "--metrics") == expected


@pytest.mark.parametrize("text", ["9184", "localhost:9184", "127.0.0.1:0", "127.0.0.1:x", "::1:9"])
def test_bad_host_port(text: str) -> None:
    with pytest.raises(ConfigError, match="--metrics"):
        parse_host_port(text, "--metrics")
