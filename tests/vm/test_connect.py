"""Connect semantics through tunio: the app sees what a direct connection would have shown,
over IPv4 and over IPv6."""

from __future__ import annotations

import errno
import time

import pytest
from lab.netlab import (
    PEER_PORTS,
    Lab,
    TunioProcess,
    pattern,
    recv_exact,
)

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
