"""The lab itself, before any tunio runs: topology, isolation, cleanup, netns sockets."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from lab.netlab import (
    APP_ADDRESS,
    APP_ADDRESS6,
    BLACKHOLE_ADDRESS,
    BLACKHOLE_ADDRESS6,
    EGRESS_MARK,
    FLOOD_PORTS,
    PEER_PORTS,
    SERVER_ADDRESS,
    SERVER_ADDRESS6,
    SRV_ADDRESS,
    SRV_ADDRESS6,
    UNREACHABLE_ADDRESS,
    UNREACHABLE_ADDRESS6,
    Lab,
    LabError,
    LineReader,
    lab_namespaces,
    leftover_processes,
    pattern,
    pattern_sha256,
    recv_all,
)
from lab.netns import netns_path, netns_socket, run_in_netns

SIOCGSKNS = 0x894C  # ioctl: a new fd for the network namespace a socket belongs to


def _netns_inode_of_socket(sock: socket.socket) -> int:
    fd = fcntl.ioctl(sock.fileno(), SIOCGSKNS)
    try:
        return os.fstat(fd).st_ino
    finally:
        os.close(fd)


def _thread_netns_inode() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


def _host_sysctl(name: str) -> str:
    return Path("/proc/sys", *name.split(".")).read_text().strip()


def test_marked_traffic_reaches_the_server_over_the_veth(lab: Lab, flood_echo: LineReader) -> None:
    del flood_echo
    with lab.connect(FLOOD_PORTS["echo"], mark=EGRESS_MARK) as sock:
        assert sock.getsockname()[0] == APP_ADDRESS  # left by the veth, not a TUN
        payload = pattern(100_000)
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == payload


def test_peers_answer_over_the_veth(lab: Lab, servers: dict[str, LineReader]) -> None:
    del servers
    data = pattern(300_000)
    with lab.connect(PEER_PORTS["sink-hash"], mark=EGRESS_MARK) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock).decode() == f"{pattern_sha256(len(data))} {len(data)}\n"
    with lab.connect(PEER_PORTS["source"], mark=EGRESS_MARK) as sock:
        sock.sendall(b"123457\n")
        assert recv_all(sock) == pattern(123457)


@pytest.mark.parametrize("dst", [SERVER_ADDRESS, SRV_ADDRESS, BLACKHOLE_ADDRESS])
def test_unmarked_traffic_has_no_route_before_tunio(lab: Lab, dst: str) -> None:
    # The main table has no default route until tunio-run adds one into the TUN, and the veth
    # address has no prefix route: the app cannot reach anything, not even the srv veth.
    with pytest.raises(OSError, match=r".") as info:
        lab.connect(9, host=dst, timeout=5.0)
    assert info.value.errno == errno.ENETUNREACH


def test_marked_traffic_to_the_unreachable_net_fails_at_once(lab: Lab) -> None:
    with pytest.raises(OSError, match=r".") as info:
        lab.connect(80, host=UNREACHABLE_ADDRESS, mark=EGRESS_MARK, timeout=5.0)
    assert info.value.errno == errno.EHOSTUNREACH


def test_blackholed_destination_stays_silent(lab: Lab) -> None:
    # Silence (a timeout), never a refusal: what the dial-timeout test relies on.
    with pytest.raises(TimeoutError):
        lab.connect(80, host=BLACKHOLE_ADDRESS, mark=EGRESS_MARK, timeout=1.5)


def test_sysctls_change_inside_the_namespaces_only(lab: Lab) -> None:
    def ns_sysctl(ns: str, name: str) -> str:
        return lab.run(ns, ["sysctl", "-n", name]).strip()

    assert ns_sysctl(lab.app, "net.ipv4.conf.all.rp_filter") == "0"
    assert ns_sysctl(lab.app, f"net.ipv4.conf.{lab.veth_app}.rp_filter") == "0"
    assert ns_sysctl(lab.srv, "net.ipv4.ip_forward") == "1"
    with Lab() as other:
        # A second lab changes nothing in the first one, nor in the host.
        assert other.id != lab.id
        assert ns_sysctl(lab.srv, "net.ipv4.ip_forward") == "1"
    host_forward = _host_sysctl("net.ipv4.ip_forward")
    with Lab():
        assert _host_sysctl("net.ipv4.ip_forward") == host_forward


def test_topology_is_as_documented(lab: Lab) -> None:
    rules = lab.ip(lab.app, "rule", "show")
    assert f"100:\tfrom all fwmark {EGRESS_MARK:#x} lookup 100" in rules
    table = lab.ip(lab.app, "route", "show", "table", "100")
    assert "unreachable default" in table
    assert "unreachable 198.18.9.0/24" in table
    assert f"198.18.0.0/16 via {SRV_ADDRESS} dev {lab.veth_app}" in table
    assert lab.ip(lab.app, "route", "show").strip() == ""  # nothing bypasses the TUN
    assert "noprefixroute" in lab.ip(lab.app, "addr", "show", "dev", lab.veth_app)
    srv_routes = lab.ip(lab.srv, "route", "show")
    assert f"default via {APP_ADDRESS}" in srv_routes
    assert "blackhole 198.18.3.0/24" in srv_routes
    assert f"{SERVER_ADDRESS}/32" in lab.ip(lab.srv, "addr", "show", "dev", "lo")
    # Only lo and our veth end live in each namespace; the host never sees the veth.
    host_links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True)
    assert lab.veth_app not in host_links.stdout


def test_popen_runs_in_the_namespace_with_the_lab_marker(lab: Lab) -> None:
    out = lab.run(lab.app, ["ip", "-o", "-4", "addr", "show"])
    assert APP_ADDRESS in out
    assert SERVER_ADDRESS not in out
    code = "import sys; print('up', flush=True); sys.stdin.read()"
    proc = lab.popen(
        lab.srv, [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    try:
        assert proc.stdout.readline() == b"up\n"  # past exec: its environment is final
        assert proc.pid in leftover_processes([lab.id])
    finally:
        proc.stdin.close()
        assert proc.wait(10) == 0
        proc.stdout.close()


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_lab_is_removed_when_the_body_raises(error: type[BaseException]) -> None:
    with pytest.raises(error), Lab() as lab:  # noqa: PT012 - the body is what raises
        names = (lab.app, lab.srv)
        sleeper = lab.popen(lab.srv, ["sleep", "600"])
        assert set(names) <= set(lab_namespaces())
        raise error
    assert not set(names) & set(lab_namespaces())
    assert sleeper.poll() is not None
    assert leftover_processes([lab.id]) == {}
    assert not os.path.exists(netns_path(lab.app))


def test_closed_lab_starts_nothing() -> None:
    with Lab() as lab:
        pass
    with pytest.raises(LabError):
        lab.popen(lab.app, ["true"])


def test_netns_socket_lives_in_the_namespace(lab: Lab) -> None:
    before = _thread_netns_inode()
    sock = netns_socket(lab.app)
    try:
        assert _netns_inode_of_socket(sock) == os.stat(netns_path(lab.app)).st_ino
        assert _thread_netns_inode() == before  # the calling thread did not move
        sock.bind((APP_ADDRESS, 0))  # an address that exists only in the app namespace
    finally:
        sock.close()
    with socket.socket() as host_sock, pytest.raises(OSError, match=r".") as info:
        host_sock.bind((APP_ADDRESS, 0))
    assert info.value.errno == errno.EADDRNOTAVAIL


def test_run_in_netns_returns_and_raises(lab: Lab) -> None:
    srv_inode = os.stat(netns_path(lab.srv)).st_ino
    assert run_in_netns(lab.srv, _thread_netns_inode) == srv_inode
    assert _thread_netns_inode() != srv_inode

    def fail() -> None:
        raise ValueError("from inside")

    with pytest.raises(ValueError, match="from inside"):
        run_in_netns(lab.srv, fail)
    with pytest.raises(FileNotFoundError):
        run_in_netns("tunio-app-nosuchlab", _thread_netns_inode)


def test_netns_sockets_from_many_threads(lab: Lab) -> None:
    inodes: list[int] = []
    lock = threading.Lock()

    def make() -> None:
        for ns in (lab.app, lab.srv):
            with netns_socket(ns) as sock:
                ino = _netns_inode_of_socket(sock)
            with lock:
                inodes.append(ino)

    threads = [threading.Thread(target=make) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    app_ino = os.stat(netns_path(lab.app)).st_ino
    srv_ino = os.stat(netns_path(lab.srv)).st_ino
    assert sorted(inodes) == sorted([app_ino, srv_ino] * 8)


def test_ipv6_twin_of_the_topology(lab: Lab, servers: dict[str, LineReader]) -> None:
    """The IPv6 set-up mirrors the IPv4 one: marked traffic leaves over the veth, unmarked
    traffic has no route before tunio, the unreachable and blackholed nets behave."""
    del servers  # they listen on [::], so on SERVER_ADDRESS6 too
    table = lab.ip(lab.app, "-6", "route", "show", "table", "100")
    assert "unreachable default" in table
    assert "unreachable fd00:18:9::/48" in table
    assert f"fd00:18::/32 via {SRV_ADDRESS6} dev {lab.veth_app}" in table
    assert f"100:\tfrom all fwmark {EGRESS_MARK:#x} lookup 100" in lab.ip(lab.app, "-6", "rule")
    assert "blackhole fd00:18:3::/48" in lab.ip(lab.srv, "-6", "route", "show")
    assert f"{SERVER_ADDRESS6}/128" in lab.ip(lab.srv, "-6", "addr", "show", "dev", "lo")
    veth = lab.ip(lab.app, "-6", "addr", "show", "dev", lab.veth_app)
    assert "noprefixroute" in veth
    assert "tentative" not in veth  # no duplicate address detection to wait for
    with lab.connect(PEER_PORTS["source"], SERVER_ADDRESS6, mark=EGRESS_MARK) as sock:
        assert sock.getsockname()[0] == APP_ADDRESS6
        sock.sendall(b"4321\n")
        assert recv_all(sock) == pattern(4321)
    with pytest.raises(OSError, match=r".") as unmarked:
        lab.connect(PEER_PORTS["echo"], SERVER_ADDRESS6, timeout=5.0)
    assert unmarked.value.errno == errno.ENETUNREACH
    with pytest.raises(OSError, match=r".") as unreachable:
        lab.connect(80, UNREACHABLE_ADDRESS6, mark=EGRESS_MARK, timeout=5.0)
    assert unreachable.value.errno == errno.EHOSTUNREACH
    with pytest.raises(TimeoutError):
        lab.connect(80, BLACKHOLE_ADDRESS6, mark=EGRESS_MARK, timeout=1.0)
