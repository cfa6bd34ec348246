"""Connect semantics through tunio: the app sees what a direct connection would have shown,
over IPv4 and over IPv6."""

from __future__ import annotations

import errno
import socket
import time

import pytest
from lab.netlab import (
    PEER_PORTS,
    SERVER_ADDRESS,
    SERVER_ADDRESS6,
    UDP_ECHO_PORT,
    Lab,
    TunioProcess,
    pattern,
    recv_exact,
)
from lab.watch import final_statistics

from tests.vm.conftest import Family

CLOSED_PORT = 1  # nothing listens there in the srv namespace
APP_CONNECT_TIMEOUT = 6.0  # longer than tunio's --connect-timeout (2 s in the shared lab)


def test_closed_port_is_refused(lab: Lab, tunio: TunioProcess, family: Family) -> None:
    started = time.monotonic()
    with pytest.raises(ConnectionRefusedError) as info:
        lab.connect(CLOSED_PORT, family.server, timeout=10.0)
    assert info.value.errno == errno.ECONNREFUSED
    assert time.monotonic() - started < 5.0  # refused at once, not after a timeout
    assert tunio.running()


def test_unreachable_host_is_reported(lab: Lab, tunio: TunioProcess, family: Family) -> None:
    # 198.18.9.0/24 (fd00:18:9::/48) is `unreachable` in the workers' table: their dial fails
    # with EHOSTUNREACH, which the stack answers with ICMP (ICMPv6) unreachable.
    started = time.monotonic()
    with pytest.raises(OSError, match=r".") as info:
        lab.connect(80, host=family.unreachable, timeout=10.0)
    assert info.value.errno == errno.EHOSTUNREACH
    assert time.monotonic() - started < 5.0
    assert tunio.running()


def test_dial_timeout_leaves_the_app_to_time_out(
    lab: Lab, tunio: TunioProcess, family: Family
) -> None:
    # The srv namespace blackholes 198.18.3.0/24 (and fd00:18:3::/48): the worker's dial
    # times out after tunio's --connect-timeout and the stack stays silent, so the app's own
    # timeout fires. A RST (ConnectionRefusedError) or an ICMP error would be a wrong answer.
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        lab.connect(80, host=family.blackhole, timeout=APP_CONNECT_TIMEOUT)
    assert time.monotonic() - started >= APP_CONNECT_TIMEOUT - 0.5
    assert tunio.running()


def test_connections_work_after_failed_ones(lab: Lab, tunio: TunioProcess, family: Family) -> None:
    for _ in range(3):
        with pytest.raises(ConnectionRefusedError):
            lab.connect(CLOSED_PORT, family.server, timeout=10.0)
    data = pattern(4096)
    with lab.connect(PEER_PORTS["echo"], family.server) as sock:
        sock.sendall(data)
        assert recv_exact(sock, len(data)) == data
    assert tunio.running()


LOOP_MARK = "0x2"  # a mark without a rule: the workers' connections take the main table, into
# the TUN (the lab's rule and table are for 0x1)


def test_a_routing_loop_fails_fast_and_is_named(fresh_lab: Lab) -> None:
    lab = fresh_lab
    # A way out that does not keep the workers' connections out of the TUN: each dial would
    # come back as a new flow, until the stack's share for the destination ran out and the app
    # timed out (the connect timeout is 10 s here).
    tunio = lab.start_tunio(["--egress-mark", LOOP_MARK])
    for server in (SERVER_ADDRESS, SERVER_ADDRESS6):
        for _ in range(3):
            started = time.monotonic()
            with pytest.raises(OSError, match=r".") as info:
                lab.connect(PEER_PORTS["echo"], server, timeout=20.0)
            assert info.value.errno == errno.ENETUNREACH, (server, info.value)
            assert time.monotonic() - started < 5.0, server
    tunio.log.wait_for(r"routing loop: its connection to 198\.18\.0\.10:\d+ via direct left "
                       r"from 198\.18\.255\.1", 10.0)  # fmt: skip
    tunio.log.wait_for(r"routing loop: its connection to \[?fd00:18::10\]?:\d+ via direct left "
                       r"from fd00:18:255::1", 10.0)  # fmt: skip
    # One datagram into a loop was a new session each hop, for good: now its first session is
    # closed before anything of it leaves.
    with lab.open_socket(type=socket.SOCK_DGRAM) as udp:
        udp.connect((SERVER_ADDRESS, UDP_ECHO_PORT))
        udp.send(b"once")
        tunio.log.wait_for(r"routing loop: its udp session to 198\.18\.0\.10:\d+ via direct",
                           10.0)  # fmt: skip
    assert tunio.stop() == 0, tunio.log.text
    stats = final_statistics(tunio)
    # Each connection's loop is cut within a hop per worker and one more: no flood of held
    # SYNs (without the cut, 2,048 flows for the first connection alone).
    assert stats["flows_opened"] <= 6 * (2 + 1), stats
    assert stats["pending"] == 0, stats
    assert stats["udp_sessions_opened"] == 1, stats
