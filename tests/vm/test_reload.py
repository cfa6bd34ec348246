"""SIGHUP under load: a changed dialer takes every new flow while the flows of the old one keep
moving, byte-exact, until they end; a change that needs a restart is refused in one line."""

from __future__ import annotations

import re
import signal
import socket
from pathlib import Path

import pytest
from lab.netlab import PEER_PORTS, SERVER_ADDRESS, Lab, LineReader, pattern, recv_exact
from lab.proxies import PROXY_ADDRESS, add_proxy_address, start_tinyproxy

pytestmark = [pytest.mark.vm, pytest.mark.needs("tinyproxy")]

FLOWS = 200
CHUNK = pattern(64 * 1024)
RELOAD_DEADLINE = 30.0


def _echo(sock: socket.socket) -> None:
    sock.sendall(CHUNK)
    assert recv_exact(sock, len(CHUNK)) == CHUNK


def _connects(log: LineReader) -> int:
    return sum(f"CONNECT {SERVER_ADDRESS}:{PEER_PORTS['echo']}" in line for line in log.lines)


def test_reload_under_moving_flows(
    fresh_lab: Lab, fresh_servers: dict[str, LineReader], tmp_path: Path
) -> None:
    del fresh_servers
    lab = fresh_lab
    add_proxy_address(lab)
    proxy = start_tinyproxy(lab, tmp_path / "proxy", auth=False)
    conf = tmp_path / "tunio.toml"
    conf.write_text('dialer = "direct"\n')
    tunio = lab.start_tunio(["--config", str(conf)])
    flows = [lab.connect(PEER_PORTS["echo"], timeout=30.0) for _ in range(FLOWS)]
    try:
        for sock in flows:
            _echo(sock)
        start = len(tunio.log.lines)
        # the new dialer: the proxy; a reload rereads the same file
        conf.write_text(f'dialer = "http://{PROXY_ADDRESS}:{proxy.port}"\n')
        tunio.proc.send_signal(signal.SIGHUP)
        tunio.log.wait_for(r"reload: dialer changed", RELOAD_DEADLINE, start)
        tunio.log.wait_for(r"generation 1 drains: 2 workers", RELOAD_DEADLINE, start)
        # the old flows still move, every byte, through the old generation
        for _ in range(3):
            for sock in flows:
                _echo(sock)
        # new flows take the new dialer
        before = _connects(proxy.log)
        for _ in range(5):
            with lab.connect(PEER_PORTS["echo"], timeout=30.0) as sock:
                _echo(sock)
        proxy.log.wait_for(rf"CONNECT {re.escape(SERVER_ADDRESS)}", 10.0)
        assert _connects(proxy.log) == before + 5
    finally:
        for sock in flows:
            sock.close()
    # with its flows done, the old generation goes (well within --drain-timeout)
    tunio.log.wait_for(r"worker-0 \(generation 1\) has ended: its flows are done", 30.0, start)
    tunio.log.wait_for(r"worker-1 \(generation 1\) has ended: its flows are done", 30.0, start)
    lost = [line for line in tunio.log.lines[start:] if " lost " in line or "ECONNRESET" in line]
    assert not lost, lost  # the drained workers left: no worker lost, no flow reset

    # a change that needs a restart is refused as a whole, and nothing else changes
    conf.write_text('dialer = "direct"\nmtu = 9000\n')
    start = len(tunio.log.lines)
    tunio.proc.send_signal(signal.SIGHUP)
    refused = tunio.log.wait_for(r"reload refused:", RELOAD_DEADLINE, start)
    assert "--mtu (1500 -> 9000) cannot change while tunio-run runs" in refused
    assert "mtu 1500" in lab.ip(lab.app, "link", "show", "tun0")
    before = _connects(proxy.log)
    with lab.connect(PEER_PORTS["echo"], timeout=30.0) as sock:
        _echo(sock)
    proxy.log.wait_for(rf"CONNECT {re.escape(SERVER_ADDRESS)}", 10.0)
    assert _connects(proxy.log) == before + 1  # still the proxy: the reload changed nothing
    assert tunio.stop() == 0, tunio.log.text
