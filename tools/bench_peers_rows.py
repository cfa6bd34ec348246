"""The rows of `make bench-peers`: how each path from the app to the servers is set up.

Every row carries the same clients' traffic from the app namespace to the same servers in srv,
across the gateway namespace gw where the one danted of the run listens (tools/lab/chain.py):

  plain veth         a host route to the server over the veth, no TUN: the kernel forwards.
  danted alone       a host route to danted, no TUN: the clients speak SOCKS5 to danted.
  sing-box ...       a tun inbound (system or gvisor stack) with a socks outbound to danted,
                     or a direct outbound marked 0x1 (tools/bench_peers_singbox.py).
  tun2socks ...      xjasonlyu/tun2socks 2.7 (gVisor), PyPI's build: socks5 to danted, or
                     direct, bound to the veth (tools/bench_peers_tun2socks.py).
  hev-socks5-tunnel  not available here: neither Debian nor PyPI has it.
  tunio ...          tunio-run with 2 workers, --dialer socks5://danted or direct (the lab's
                     tunio_argv: --route default, --egress-mark 0x1).

A row's set-up yields a `Forwarder`: whose processes do the forwarding (their trees are what
its CPU and memory figures count) and whether the clients must speak SOCKS5 themselves.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import bench_peers_singbox as singbox
import bench_peers_tun2socks as t2s
from flood_socks import SocksError
from flood_socks import connect as socks_connect
from lab.chain import GW_ADDRESS, PROXY_ADDRESS, ChainLab
from lab.netlab import SERVER_ADDRESS, TUN_NAME, LabError, recv_all

PROBE_TIMEOUT = 15.0
GONE_TIMEOUT = 10.0
POLL = 0.1  # seconds between tries while a path comes up or a device goes away
PROBE = b"bench-peers probe"

REFERENCE, PEER, TUNIO = "reference", "peer", "tunio"
SOCKS, DIRECT = "socks", "direct"
HEV_MISSING = (
    "not available here: hev-socks5-tunnel is in neither Debian's nor PyPI's packages, and "
    "nothing else may be fetched on this machine"
)


@dataclass(frozen=True)
class Forwarder:
    root: int | None  # the forwarder's first process: CPU and RSS count its tree
    proxy: int | None = None  # danted's, when the forwarder goes through it
    socks5: tuple[str, int] | None = None  # the clients speak SOCKS5 to this themselves


@dataclass(frozen=True)
class RowEnv:
    """What a row's set-up needs from the run: its own ports, danted, where files go."""

    workdir: Path
    echo_port: int  # the flood echo server for this row (own port: no TIME_WAIT of others)
    dante_port: int  # this row's port on the shared danted
    danted: int  # danted's first process
    peer_mtu: int


Setup = Callable[[ChainLab, RowEnv], AbstractContextManager[Forwarder]]


@dataclass(frozen=True)
class Row:
    key: str  # for --rows
    name: str
    kind: str  # REFERENCE, PEER or TUNIO
    outbound: str  # SOCKS or DIRECT: which peers a tunio row is compared with
    setup: Setup | None
    unavailable: str = ""  # why the row cannot run here, printed in its place
    needs: str = ""  # a program not every machine has (its row is skipped without it)


@contextlib.contextmanager
def _host_route(lab: ChainLab, address: str) -> Iterator[None]:
    route = [f"{address}/32", "via", GW_ADDRESS, "dev", lab.veth_app, "onlink"]
    lab.ip(lab.app, "route", "add", *route)
    try:
        yield
    finally:
        lab.ip(lab.app, "route", "del", *route)


@contextlib.contextmanager
def plain(lab: ChainLab, _env: RowEnv) -> Iterator[Forwarder]:
    with _host_route(lab, SERVER_ADDRESS):
        yield Forwarder(root=None)


@contextlib.contextmanager
def danted_alone(lab: ChainLab, env: RowEnv) -> Iterator[Forwarder]:
    with _host_route(lab, PROXY_ADDRESS):
        yield Forwarder(root=env.danted, socks5=(PROXY_ADDRESS, env.dante_port))


def sing_box(stack: str, outbound: str) -> Setup:
    @contextlib.contextmanager
    def setup(lab: ChainLab, env: RowEnv) -> Iterator[Forwarder]:
        socks = (PROXY_ADDRESS, env.dante_port) if outbound == SOCKS else None
        conf = singbox.config(stack, socks, env.peer_mtu)
        with singbox.running(lab, env.workdir, conf) as pid:
            yield Forwarder(root=pid, proxy=env.danted if socks else None)
        _wait_device_gone(lab)

    return setup


def tun2socks(outbound: str) -> Setup:
    @contextlib.contextmanager
    def setup(lab: ChainLab, env: RowEnv) -> Iterator[Forwarder]:
        proxy = f"socks5://{PROXY_ADDRESS}:{env.dante_port}" if outbound == SOCKS else "direct://"
        with t2s.running(lab, proxy) as pid:
            yield Forwarder(root=pid, proxy=env.danted if outbound == SOCKS else None)
        _wait_device_gone(lab)

    return setup


def tunio(outbound: str) -> Setup:
    @contextlib.contextmanager
    def setup(lab: ChainLab, env: RowEnv) -> Iterator[Forwarder]:
        dialer = f"socks5://{PROXY_ADDRESS}:{env.dante_port}" if outbound == SOCKS else "direct"
        run = lab.start_tunio(["--workers", "2", "--dialer", dialer])
        try:
            yield Forwarder(root=run.pid, proxy=env.danted if outbound == SOCKS else None)
        finally:
            run.stop()
        _wait_device_gone(lab)

    return setup


def all_rows() -> list[Row]:
    rows = [
        Row("plain", "plain veth", REFERENCE, "", plain),
        Row("danted", "danted alone (SOCKS5 client)", REFERENCE, SOCKS, danted_alone),
    ]
    for stack in singbox.STACKS:
        rows.append(Row(f"singbox-{stack}-socks", f"sing-box {stack} -> danted", PEER, SOCKS,
                        sing_box(stack, SOCKS), needs="sing-box"))  # fmt: skip
        rows.append(Row(f"singbox-{stack}-direct", f"sing-box {stack} direct", PEER, DIRECT,
                        sing_box(stack, DIRECT), needs="sing-box"))  # fmt: skip
    rows += [
        Row("tun2socks-socks", "tun2socks gvisor -> danted", PEER, SOCKS, tun2socks(SOCKS),
            needs="tun2socks"),
        Row("tun2socks-direct", "tun2socks gvisor direct", PEER, DIRECT, tun2socks(DIRECT),
            needs="tun2socks"),
        Row("hev", "hev-socks5-tunnel -> danted", PEER, SOCKS, None, HEV_MISSING),
        Row("tunio-socks5", "tunio socks5:// -> danted", TUNIO, SOCKS, tunio(SOCKS)),
        Row("tunio-direct", "tunio direct", TUNIO, DIRECT, tunio(DIRECT)),
    ]
    return rows


def _wait_device_gone(lab: ChainLab) -> None:
    """Until the row's TUN has gone with its forwarder: the next row makes one of that name."""
    deadline = time.monotonic() + GONE_TIMEOUT
    while TUN_NAME in lab.ip(lab.app, "-o", "link", "show"):
        if time.monotonic() > deadline:
            msg = f"{TUN_NAME} still exists {GONE_TIMEOUT:.0f} s after its forwarder stopped"
            raise LabError(msg)
        time.sleep(POLL)  # the device going away is no event we can wait on


def _echo_once(lab: ChainLab, port: int, socks5: tuple[str, int] | None) -> None:
    with lab.open_socket(lab.app) as sock:
        sock.settimeout(2.0)
        sock.connect(socks5 or (SERVER_ADDRESS, port))
        if socks5:
            socks_connect(sock, (SERVER_ADDRESS, port))
        sock.sendall(PROBE)
        sock.shutdown(socket.SHUT_WR)
        if recv_all(sock) != PROBE:
            msg = "the echo came back wrong"
            raise LabError(msg)


def probe(lab: ChainLab, port: int, forwarder: Forwarder) -> None:
    """Until one echo exchange goes through the row's path (as its clients will use it)."""
    deadline = time.monotonic() + PROBE_TIMEOUT
    while True:
        try:
            _echo_once(lab, port, forwarder.socks5)
        except (OSError, SocksError, LabError) as exc:
            if time.monotonic() > deadline:
                msg = f"no echo through the path within {PROBE_TIMEOUT:.0f} s: {exc}"
                raise LabError(msg) from None
            time.sleep(POLL)  # a forwarder that has just started: try again
        else:
            return
