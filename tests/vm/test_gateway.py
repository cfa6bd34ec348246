"""tunio-run as a host's gateway, in a lab whose app namespace routes like a host with one
uplink (a veth, strict reverse-path filtering, no rule or table for tunio): the bypass set up
for you and taken back, --dry-run changing nothing, --exclude, --cleanup after a kill -9, and a
configuration file end to end."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest
from lab.netlab import (
    PEER_PORTS,
    SERVER_ADDRESS,
    SERVER_ADDRESS6,
    SRV_ADDRESS,
    TUN_NAME,
    Lab,
    LineReader,
    pattern,
    recv_exact,
)

from tests.vm.conftest import start_servers
from tunio import bypass

MESSAGE = pattern(4096)
EXIT_TIMEOUT = 30.0


@pytest.fixture
def host_lab() -> Iterator[Lab]:
    with Lab(uplink=True) as the_lab:
        yield the_lab
    assert not the_lab.strays, the_lab.strays


@pytest.fixture
def host_servers(host_lab: Lab) -> dict[str, LineReader]:
    return start_servers(host_lab)


def network_state(lab: Lab) -> dict[str, str]:
    """Everything a run may change in the app namespace: links, addresses, routes, rules."""
    return {
        what: lab.ip(lab.app, *args)
        for what, args in {
            "links": ("-o", "link", "show"),
            "addr4": ("-4", "-o", "addr", "show"),
            "addr6": ("-6", "-o", "addr", "show"),
            "routes4": ("-4", "route", "show", "table", "all"),
            "routes6": ("-6", "route", "show", "table", "all"),
            "rules4": ("-4", "rule", "show"),
            "rules6": ("-6", "rule", "show"),
        }.items()
    }


def _echo(lab: Lab, host: str = SERVER_ADDRESS) -> None:
    with lab.connect(PEER_PORTS["echo"], host) as sock:
        sock.sendall(MESSAGE)
        assert recv_exact(sock, len(MESSAGE)) == MESSAGE


def _tunio_cli(lab: Lab, *args: str) -> tuple[int, str, str]:
    argv = [sys.executable, "-m", "tunio.cli", *args]
    proc = lab.popen(lab.app, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=EXIT_TIMEOUT)
    return proc.returncode, out, err


def test_auto_bypass_makes_the_way_out_and_takes_it_back(
    host_lab: Lab, host_servers: dict[str, LineReader]
) -> None:
    del host_servers
    lab = host_lab
    before = network_state(lab)
    assert "fwmark" not in before["rules4"] + before["rules6"]
    tunio = lab.start_tunio()
    # the apps' flows go into the TUN; the workers' own leave by the veth through our table
    assert f"dev {TUN_NAME}" in lab.ip(lab.app, "route", "get", SERVER_ADDRESS)
    _echo(lab)
    _echo(lab, SERVER_ADDRESS6)
    rules4 = lab.ip(lab.app, "-4", "rule", "show")
    table = str(bypass.TABLE_FIRST)
    assert f"fwmark {bypass.MARK:#x} lookup {table}" in rules4
    assert f"from 198.19.0.1 lookup {table}" in rules4  # strict rp_filter on the uplink
    assert f"fwmark {bypass.MARK:#x} lookup {table}" in lab.ip(lab.app, "-6", "rule", "show")
    assert f"default via {SRV_ADDRESS} dev {lab.veth_app}" in lab.ip(
        lab.app, "route", "show", "table", table
    )
    assert tunio.stop() == 0, tunio.log.text
    assert network_state(lab) == before


def test_dry_run_prints_every_change_and_makes_none(
    host_lab: Lab, host_servers: dict[str, LineReader]
) -> None:
    del host_servers
    lab = host_lab
    before = network_state(lab)
    argv = lab.tunio_argv(["--exclude", "198.18.0.10/32", "--dry-run"])
    proc = lab.popen(lab.app, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=EXIT_TIMEOUT)
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("tunio-run would make ")
    shown = "\n".join(lines)
    for words in (
        f"create TUN device {TUN_NAME}",
        f"ip addr add 198.18.255.1/24 dev {TUN_NAME}",
        f"ip -6 addr add fd00:18:255::1/64 dev {TUN_NAME} nodad",
        f"ip link set dev {TUN_NAME} up",
        f"ip -4 route add 198.18.0.10/32 via {SRV_ADDRESS} dev {lab.veth_app}",
        f"ip -4 route add default via {SRV_ADDRESS} dev {lab.veth_app} table {bypass.TABLE_FIRST}",
        f"ip -4 rule add fwmark {bypass.MARK:#x} lookup {bypass.TABLE_FIRST}",
        f"ip -4 rule add from 198.19.0.1 lookup {bypass.TABLE_FIRST}",
        f"ip -4 route add 0.0.0.0/1 dev {TUN_NAME}",
        f"ip -6 route add 8000::/1 dev {TUN_NAME}",
    ):
        assert words in shown, shown
    assert len(lines) - 1 == int(lines[0].split()[3])  # as many changes as it says
    assert network_state(lab) == before
    assert not lab.runtime_dir.exists()


def test_exclude_keeps_a_network_out_of_the_tun(
    host_lab: Lab, host_servers: dict[str, LineReader]
) -> None:
    del host_servers
    lab = host_lab
    before = network_state(lab)
    tunio = lab.start_tunio(["--exclude", f"{SERVER_ADDRESS}/32"])
    assert f"dev {lab.veth_app}" in lab.ip(lab.app, "route", "get", SERVER_ADDRESS)
    assert f"dev {TUN_NAME}" in lab.ip(lab.app, "route", "get", "198.18.0.11")
    _echo(lab)  # straight over the veth
    _echo(lab, SERVER_ADDRESS6)  # through the TUN
    assert tunio.stop() == 0, tunio.log.text
    assert network_state(lab) == before


def test_cleanup_after_kill_removes_what_the_run_left(
    host_lab: Lab, host_servers: dict[str, LineReader]
) -> None:
    del host_servers
    lab = host_lab
    before = network_state(lab)
    tunio = lab.start_tunio(["--exclude", f"{SERVER_ADDRESS}/32"])
    _echo(lab)
    children = [os.pidfd_open(pid) for pid in tunio.children()]
    os.kill(tunio.pid, signal.SIGKILL)
    tunio.proc.wait(EXIT_TIMEOUT)
    for fd in children:
        assert select.select([fd], [], [], 10.0)[0], "a child outlived tunio-run"
        os.close(fd)
    left = network_state(lab)
    assert f"lookup {bypass.TABLE_FIRST}" in left["rules4"]  # rules outlive the device
    assert TUN_NAME not in left["links"]
    code, out, err = _tunio_cli(
        lab, "--cleanup", "--tun", TUN_NAME, "--runtime-dir", str(lab.runtime_dir)
    )
    assert code == 0, err
    removed = out.splitlines()
    assert f"removed: bypass rule fwmark {bypass.MARK:#x} lookup {bypass.TABLE_FIRST} " in (
        "\n".join(removed)
    )
    assert any(line.startswith("removed: route 198.18.0.10/32 kept out") for line in removed)
    assert f"removed: runtime directory {lab.runtime_dir}" in removed
    assert any(line.startswith("removed: lock file ") for line in removed)
    assert network_state(lab) == before
    assert not lab.runtime_dir.exists()
    # a second cleanup finds nothing
    code, out, _ = _tunio_cli(
        lab, "--cleanup", "--tun", TUN_NAME, "--runtime-dir", str(lab.runtime_dir)
    )
    assert (code, out.strip()) == (
        0,
        f"nothing left by a run on {TUN_NAME} in {lab.runtime_dir} to remove "
        "(a run with another --runtime-dir or --config: give it here too)",
    )


def test_cleanup_refuses_while_a_run_holds_the_device(
    host_lab: Lab, host_servers: dict[str, LineReader]
) -> None:
    del host_servers
    lab = host_lab
    tunio = lab.start_tunio()
    code, out, err = _tunio_cli(lab, "--cleanup", "--tun", TUN_NAME)
    assert code == 1
    assert f"another tunio-run (pid {tunio.pid}) already runs on TUN device {TUN_NAME}" in err
    assert out == ""
    _echo(lab)
    assert tunio.stop() == 0, tunio.log.text


def test_a_config_file_end_to_end(host_lab: Lab, host_servers: dict[str, LineReader]) -> None:
    del host_servers
    lab = host_lab
    before = network_state(lab)
    lab.runtime_dir.mkdir(mode=0o700)
    conf = lab.runtime_dir / "tunio.toml"
    conf.write_text(f"""
tun = "{TUN_NAME}"
address = ["198.18.255.1/24", "fd00:18:255::1/64"]
route = ["0.0.0.0/1", "128.0.0.0/1", "::/1", "8000::/1"]
auto_bypass = true
queues = 1
workers = 1
runtime_dir = "{lab.runtime_dir / 'run'}"
log_format = "json"
""")
    argv = [sys.executable, "-m", "tunio.cli", "--config", str(conf), "--workers", "2"]
    proc = lab.popen(lab.app, argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    log = LineReader(proc.stderr, "tunio-run")
    ready = log.wait_for(r'"message": "tunio ready', 30.0)
    assert '"process": "tunio-run"' in ready
    assert "workers=2" in ready  # the flag overrode the file
    _echo(lab)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(EXIT_TIMEOUT) == 0, log.text
    log.join(5.0)
    assert all(line.startswith("{") for line in log.lines), log.text  # every process: JSON
    assert network_state(lab) == before
