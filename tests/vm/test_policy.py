"""Per-flow policy end to end, with real proxies: rules by CIDR and by the app's user, each flow
landing on the right dialer, and failover from a refusing proxy to a working one that the app
never sees."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from lab.netlab import PEER_PORTS, SERVER_ADDRESS, SERVER_ADDRESS6, Lab, TunioProcess, pattern
from lab.proxies import PROXY_ADDRESS, Proxy, add_proxy_address, start_dante, start_tinyproxy

from tests.vm.conftest import start_servers

pytestmark = [pytest.mark.vm, pytest.mark.needs("danted", "tinyproxy", "setpriv")]

USERS = (4201, 4202)  # two users of the app namespace; no account needed (setpriv)
CLOSED_PROXY_PORT = 1099  # nothing listens there: a proxy that refuses
# An app: connects to the echo server, checks the echo, prints "ok"
CLIENT = f"""
import socket, sys
data = {pattern(4096)!r}
with socket.create_connection((sys.argv[1], {PEER_PORTS["echo"]}), timeout=10) as sock:
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        got += sock.recv(65536)
print("ok" if got == data else "wrong")
"""


@pytest.fixture(scope="module")
def proxies(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Proxy]:
    start_servers(lab)
    add_proxy_address(lab)
    workdir = tmp_path_factory.mktemp("proxies")
    return {"socks5": start_dante(lab, workdir, auth=False),
            "http": start_tinyproxy(lab, workdir, auth=False)}  # fmt: skip


def _config(tmp_path: Path, proxies: dict[str, Proxy], rules: str) -> Path:
    path = tmp_path / "tunio.toml"
    path.write_text(f"""
[dialers]
socks = "socks5://{PROXY_ADDRESS}:{proxies['socks5'].port}"
http = "http://{PROXY_ADDRESS}:{proxies['http'].port}"
refusing = "socks5://{PROXY_ADDRESS}:{CLOSED_PROXY_PORT}"
{rules}
""")
    return path


def _app(lab: Lab, host: str, uid: int | None = None) -> None:
    argv = [sys.executable, "-c", CLIENT, host]
    if uid is not None:
        argv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv]
    out = lab.run(lab.app, argv, timeout=30)
    assert out.strip() == "ok", out


def _connects_seen(proxy: Proxy) -> int:
    """CONNECTs to the echo server that tinyproxy logged."""
    rx = re.compile(rf"CONNECT {re.escape(SERVER_ADDRESS)}:{PEER_PORTS['echo']}\b")
    return sum(bool(rx.search(line)) for line in proxy.log.lines)


def test_rules_by_user_land_each_flow_on_its_dialer(
    lab: Lab, proxies: dict[str, Proxy], tmp_path: Path
) -> None:
    conf = _config(tmp_path, proxies, f"""
[[rule]]
uid = [{USERS[0]}]
action = "http"
""")
    tunio = lab.start_tunio(["--config", str(conf)])
    try:
        before = _connects_seen(proxies["http"])
        _app(lab, SERVER_ADDRESS, USERS[0])  # through tinyproxy
        proxies["http"].log.wait_for(rf"CONNECT {re.escape(SERVER_ADDRESS)}", 10.0)
        assert _connects_seen(proxies["http"]) == before + 1
        _app(lab, SERVER_ADDRESS, USERS[1])  # no rule: direct
        _app(lab, SERVER_ADDRESS)  # root: direct
        assert _connects_seen(proxies["http"]) == before + 1
    finally:
        assert tunio.stop() == 0, tunio.log.text


def test_rules_by_cidr_and_failover_the_app_never_sees(
    lab: Lab, proxies: dict[str, Proxy], tmp_path: Path
) -> None:
    conf = _config(tmp_path, proxies, f"""
[[rule]]
cidr = ["{SERVER_ADDRESS}/32"]
action = ["refusing", "http"]

[[rule]]
cidr = ["{SERVER_ADDRESS6}/128"]
action = "reject"
errno = "EHOSTUNREACH"
""")
    tunio = lab.start_tunio(["--config", str(conf)])
    try:
        before = _connects_seen(proxies["http"])
        for _ in range(3):
            _app(lab, SERVER_ADDRESS)  # refused by the first proxy, carried by the second
        proxies["http"].log.wait_for(rf"CONNECT {re.escape(SERVER_ADDRESS)}", 10.0)
        assert _connects_seen(proxies["http"]) == before + 3
        with pytest.raises(OSError, match="No route to host") as refused:  # as the rule says
            lab.connect(PEER_PORTS["echo"], SERVER_ADDRESS6, timeout=10.0).close()
        assert refused.value.errno == errno.EHOSTUNREACH
    finally:
        code = tunio.stop()
    assert code == 0, tunio.log.text
    failovers = [int(m) for m in re.findall(r"failovers=(\d+)", tunio.log.text)]
    assert sum(failovers) == 3, tunio.log.text  # one failed first dial each, counted
    refused_lines = [m for m in re.findall(r"refused_by_policy=(\d+)", tunio.log.text)]
    assert sum(map(int, refused_lines)) == 1


def test_a_policys_bare_dialers_take_the_runs_egress(
    lab: Lab, proxies: dict[str, Proxy], tmp_path: Path
) -> None:
    """A policy of the user's returns dialers it made without a mark: `DirectDialer()` and an
    HttpDialer (whose connection to the proxy is a bare DirectDialer too). In the workers they
    take the run's --egress-mark, so both leave past the TUN; unmarked, they would loop back
    into it and no app would get through."""
    (tmp_path / "bare_policy.py").write_text(f"""
from tunio.dialers import DirectDialer, HttpDialer
direct = DirectDialer()
proxy = HttpDialer({PROXY_ADDRESS!r}, {proxies["http"].port})
def choose(flow):
    return proxy if flow.uid == {USERS[0]} else direct
""")
    argv = lab.tunio_argv(["--policy", "bare_policy:choose"])
    env = {"PYTHONPATH": f"{lab.env()['PYTHONPATH']}{os.pathsep}{tmp_path}"}
    proc = lab.popen(lab.app, argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                     text=True, env=env)  # fmt: skip
    tunio = TunioProcess(proc, argv, lab.runtime_dir)
    try:
        tunio.wait_ready()
        before = _connects_seen(proxies["http"])
        _app(lab, SERVER_ADDRESS, USERS[0])  # through tinyproxy
        proxies["http"].log.wait_for(rf"CONNECT {re.escape(SERVER_ADDRESS)}", 10.0)
        assert _connects_seen(proxies["http"]) == before + 1
        _app(lab, SERVER_ADDRESS)  # root: direct
        assert _connects_seen(proxies["http"]) == before + 1
    finally:
        assert tunio.stop() == 0, tunio.log.text
