"""tunio-run and tunio-worker command lines: parsing, and one-line errors with exit code 2."""

from __future__ import annotations

import errno
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tunio import cli, config, defaults, supervisor
from tunio.policy import Reject


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse rejects the value itself
        code = int(exc.code or 0)
    return code, _error_line(capsys)


@pytest.fixture
def rundir(tmp_path: Path) -> list[str]:
    return ["--runtime-dir", str(tmp_path / "rt")]


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--address", "300.1.2.3/24"], "--address '300.1.2.3/24' is not an address"),
        (["--address", "fd00::1/127"], "give a prefix of /126 or wider"),
        (["--address", "fd00::1/64", "--address", "fd01::1/64"], "at most one IPv6 address"),
        # no packet to these ever enters a TUN: the stack drops them as martians
        (["--address", "127.1.0.1/24"], "--address 127.1.0.1/24: a loopback address is never"),
        (["--address", "::1/64"], "--address ::1/64: a loopback address is never routed"),
        (["--address", "224.0.0.1/24"], "a multicast address is never routed into a TUN"),
        (["--address", "0.1.2.3/24"], "an address of 0.0.0.0/8 is never routed"),
        (["--address", "::ffff:198.18.0.1/96"], "an IPv4-mapped address is never routed"),
        (["--dns-address", "127.0.0.53"], "--dns-address 127.0.0.53: a loopback address"),
        (["--dns-address", "ff02::fb"], "--dns-address ff02::fb: a multicast address"),
        (["--dns-address", "255.255.255.255"], "the limited broadcast address is never"),
        (["--dns-address", "::"], "--dns-address ::: the unspecified address is never"),
        (["--tcp-keepalive", "0,30,4"], "--tcp-keepalive '0,30,4': give IDLE,INTERVAL,COUNT"),
        (["--tcp-keepalive", "60"], "--tcp-keepalive '60': give IDLE,INTERVAL,COUNT"),
        (["--tcp-keepalive", "60,30,128"], "probes 1..127), or off"),
        (["--tcp-keepalive", "a,b,c"], "--tcp-keepalive 'a,b,c': give IDLE,INTERVAL,COUNT"),
        (["--route", "fd00::/8"], "the TUN has no IPv6 address"),
        (["--route", "10.1.2.3/8"], "did you mean 10.0.0.0/8"),
        (["--dialer", "nonsense"], "nonsense"),
        (["--egress-mark", "0x100000000"], "--egress-mark 0x100000000 is out of range"),
        (["--egress-mark", "mark"], "argument --egress-mark: 'mark' is not a number"),
        (["--mtu", "big"], "argument --mtu: invalid int value: 'big'"),
        (["--egress-interface", "nosuchif0"], "nosuchif0: no such network interface"),
        (["--log-level", "loud"], "argument --log-level: invalid choice: 'loud'"),
        (["--queues", "0"], "--queues 0 is out of range"),
        (["--worker-backlog", "4096"], "--worker-backlog 4096 is out of range: use --window"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--dialer", "socks5://1.2.3.4:0"], "port 0 is no proxy's port"),
        (["--dialer", "socks5://u:s%zz@1.2.3.4:1080"], "the password has a % that is not %XX"),
        (["--dialer", "socks5://u:secret@1.2.3.4:99999"], "'socks5://u:***@1.2.3.4:99999'"),
        # the DNS settings are checked with --dns off too
        (["--dns-ttl", "-1"], "--dns-ttl -1 is out of range"),
        (["--dns-hold", "nan"], "--dns-hold nan is out of range"),
        (["--dns-upstream", "1.2.3.4:70000"], "give an IP address, and a port if not 53"),
    ],
)
def test_bad_option_exits_2_with_one_line(
    argv: list[str], words: str, rundir: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, line = _run([*argv, *rundir], capsys)
    assert code == 2
    assert words in line


def test_config_errors_are_logged_as_error(
    rundir: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, line = _run(["--address", "fd00::1/127", *rundir], capsys)
    assert code == 2
    assert " ERROR tunio-run: --address fd00::1/127: give a prefix of /126 or wider" in line
    assert not (tmp_path / "rt").exists()


def test_options_reach_the_supervisor(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[config.Options] = []

    class FakeSupervisor:
        def __init__(self, options: config.Options, **_kw: object) -> None:
            seen.append(options)

        def run(self) -> int:
            return 0

    monkeypatch.setattr(supervisor, "Supervisor", FakeSupervisor)
    argv = [
        "--tun", "tun7", "--address", "198.18.255.1/24", "--mtu", "9000", "--queues", "3",
        "--workers", "0", "--dialer", "mod:attr", "--egress-mark", "0x10",
        "--egress-interface", "eth1", "--endpoint", "tcp://127.0.0.1:5555",
        "--runtime-dir", "/tmp/x", "--route", "default", "--route", "10.0.0.0/8",
        "--connect-timeout", "2.5", "--window", "65536", "--txqueuelen", "500",
        "--log-level", "debug", "--tcp-keepalive", "off",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    assert seen == [
        config.Options(
            tun="tun7",
            address="198.18.255.1/24",
            mtu=9000,
            queues=3,
            workers=0,
            dialer="mod:attr",
            egress_mark=16,
            egress_interface="eth1",
            endpoint="tcp://127.0.0.1:5555",
            runtime_dir="/tmp/x",
            routes=("default", "10.0.0.0/8"),
            connect_timeout=2.5,
            window=65536,
            txqueuelen=500,
            log_level="debug",
            tcp_keepalive="off",
        )
    ]


def test_defaults_match_the_documented_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[config.Options] = []

    def fake(options: config.Options, **_kw: object) -> _Zero:
        seen.append(options)
        return _Zero()

    monkeypatch.setattr(supervisor, "Supervisor", fake)
    assert cli.main([]) == 0
    [options] = seen
    assert options == config.Options(queues=options.queues, workers=options.workers)
    assert options.queues == options.workers >= 1
    assert (options.tun, options.address, options.mtu, options.window) == (
        "tunio0",
        "198.18.0.1/24",
        1500,
        1048576,
    )
    assert (options.txqueuelen, options.connect_timeout, options.dialer) == (50000, 10.0, "direct")


class _Zero:
    def run(self) -> int:
        return 0


def test_help_describes_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.main(["--help"])
    assert caught.value.code == 0
    out = capsys.readouterr().out
    for option in (
        "--tun", "--address", "--mtu", "--queues", "--workers", "--dialer", "--egress-mark",
        "--egress-interface", "--endpoint", "--runtime-dir", "--route", "--connect-timeout",
        "--window", "--txqueuelen", "--log-level", "--version",
    ):  # fmt: skip
        assert option in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.main(["--version"])
    assert caught.value.code == 0
    assert capsys.readouterr().out.startswith("tunio-run ")


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--dialer", "ftp://1.2.3.4:21"], "unknown dialer 'ftp://1.2.3.4:21'"),
        (["--dialer", "nosuchmodule:attr"], "cannot import 'nosuchmodule'"),
        (["--policy", "nosuchmodule:fn"], "--policy 'nosuchmodule:fn': cannot import"),
        (["--policy", "os"], "--policy 'os': give module:attr"),
    ],
)
@pytest.mark.parametrize("action", ["--dry-run", "--print-config"])
def test_dry_run_and_print_config_refuse_what_a_run_would(
    argv: list[str], words: str, action: str, rundir: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    code, line = _run([action, *argv, *rundir], capsys)
    assert code == 2
    assert words in line
    assert "tunio-run:" in line  # who says it, from the first line on


def test_a_named_dialer_of_the_file_is_checked_at_its_line(
    tmp_path: Path, rundir: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "tunio.toml"
    path.write_text('[dialers]\nok = "direct"\noffice = "socks5://10.0.0.5:99999"\n')
    code, line = _run(["--dry-run", "--config", str(path), *rundir], capsys)
    assert code == 2
    assert line.endswith(f"{path}:3: dialers.office = dialer 'socks5://10.0.0.5:99999': "
                         "Port out of range 0-65535")  # fmt: skip


# ---------------------------------------------------------------- tunio-worker


@pytest.fixture
def fake_worker(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []
    module = ModuleType("tunio.worker")

    def run_worker(endpoint: str, dialer: object, **kwargs: Any) -> int:
        calls.append({"endpoint": endpoint, "dialer": dialer, **kwargs})
        return 0

    module.run_worker = run_worker  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tunio.worker", module)
    return calls


def test_worker_runs_with_its_options(fake_worker: list[dict[str, Any]]) -> None:
    argv = [
        "--endpoint", "ipc:///tmp/s.sock", "--name", "far-1", "--egress-mark", "7",
        "--connect-timeout", "3", "--window", "4096", "--tcp-keepalive", "60,10,3",
    ]  # fmt: skip
    assert cli.worker_main(argv) == 0
    [call] = fake_worker
    assert call["keepalive"] == (60, 10, 3)
    assert call["endpoint"] == "ipc:///tmp/s.sock"
    assert call["name"] == "far-1"
    assert call["window"] == 4096
    assert call["connect_timeout"] == 3.0
    assert type(call["dialer"]).__name__ == "DirectDialer"
    assert call["policy"] is None
    assert cli.worker_main(["--endpoint", "ipc:///tmp/s.sock"]) == 0
    assert fake_worker[1]["keepalive"] == defaults.TCP_KEEPALIVE_PROBES  # tunio-run's default


def test_worker_resolves_fake_ip_names_with_its_dns_upstream(
    fake_worker: list[dict[str, Any]],
) -> None:
    argv = ["--endpoint", "ipc:///tmp/s.sock", "--dns-upstream", "127.0.0.53:5353"]
    assert cli.worker_main(argv) == 0
    [call] = fake_worker
    resolver = call["dialer"].resolver
    assert (resolver.server, resolver.port) == ("127.0.0.53", 5353)


def refuse_everything(flow: object) -> Reject:
    return Reject(errno.EACCES)


def test_worker_takes_its_policy(fake_worker: list[dict[str, Any]]) -> None:
    spec = "tests.unit.test_cli:refuse_everything"
    assert cli.worker_main(["--endpoint", "ipc:///tmp/s.sock", "--policy", spec]) == 0
    [call] = fake_worker
    assert call["policy"](None) == Reject(errno.EACCES)


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        ([], "the following arguments are required: --endpoint"),
        (["--endpoint", "udp://x"], "--endpoint 'udp://x': use ipc://PATH or tcp://HOST:PORT"),
        (["--endpoint", "ipc:///tmp/s", "--dialer", "nonsense"], "nonsense"),
        (["--endpoint", "ipc:///tmp/s", "--connect-timeout", "0"], "--connect-timeout 0"),
        (["--endpoint", "ipc:///tmp/s", "--connect-timeout", "inf"], "--connect-timeout inf is"),
        (["--endpoint", "ipc:///tmp/s", "--window", "-1"], "--window -1 is out of range"),
        (["--endpoint", "ipc:///tmp/s", "--window", "100"], "--window 100 is out of range"),
        (["--endpoint", "ipc:///tmp/s", "--policy", "nosuchmodule:x"], "nosuchmodule"),
        (["--endpoint", "ipc:///tmp/s", "--policy", "nocolon"], "give module:attr"),
        (["--endpoint", "ipc:///tmp/s", "--dns-upstream", "x"], "--dns-upstream 'x': give an IP"),
        (["--endpoint", "ipc:///tmp/s", "--tcp-keepalive", "1,1"], "--tcp-keepalive '1,1': give"),
    ],
)
def test_worker_bad_option_exits_2_with_one_line(
    argv: list[str],
    words: str,
    fake_worker: list[dict[str, Any]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    try:
        code = cli.worker_main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    assert code == 2
    assert words in _error_line(capsys)
    assert fake_worker == []


def test_user_code_that_fails_as_it_loads_is_a_one_line_error(
    tmp_path: Path, rundir: list[str], capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    (tmp_path / "raises_at_import.py").write_text("raise RuntimeError('boom at import')\n")
    (tmp_path / "failing_factory.py").write_text("def make():\n    raise ValueError('no')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code, line = _run(["--dry-run", "--dialer", "raises_at_import:d", *rundir], capsys)
    assert code == 2
    assert line.endswith("dialer 'raises_at_import:d': importing 'raises_at_import' failed: "
                         "RuntimeError('boom at import')")  # fmt: skip
    code, line = _run(["--dry-run", "--policy", "failing_factory:make", *rundir], capsys)
    assert code == 2
    assert line.endswith("--policy 'failing_factory:make': making the policy failed: "
                         "ValueError('no')")  # fmt: skip
