"""The supervisor without privileges: fake stack, fake workers, a fake `ip` on PATH."""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import os
import select
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

import tunio
from tests.unit.supervisorworld import (
    REPO,
    TUN,
    LogWatch,
    World,
    _assert_dead,
    _bootstrap,
    _options,
    _read_until,
    _start,
    _supervisor,
)
from tunio import defaults, runtime, tundev
from tunio.config import (
    Options,
    expand_routes,
    parse_address,
    parse_addresses,
    parse_route,
    pending_limit,
    validate,
)
from tunio.errors import ConfigError, TunError, TunioError
from tunio.rules import Rule
from tunio.runtime import RuntimeDir
from tunio.supervisor import BACKOFF_MAX, Supervisor, next_backoff

# a test that fails before its own stop() leaves no supervisor running (supervisorworld.py)
pytestmark = pytest.mark.usefixtures("stop_left_supervisors")


def test_backoff_doubles_up_to_ten_seconds_while_dying_young() -> None:
    delays = []
    delay = 0.0
    for _ in range(8):
        delay = next_backoff(delay, lifetime=0.1)
        delays.append(delay)
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, BACKOFF_MAX, BACKOFF_MAX, BACKOFF_MAX]


def test_backoff_resets_after_a_long_life() -> None:
    assert next_backoff(8.0, lifetime=5.0) == 0.0
    assert next_backoff(0.0, lifetime=4.99) == 0.5


def test_address_parsing() -> None:
    assert parse_address("198.18.255.1/24") == ipaddress.IPv4Interface("198.18.255.1/24")
    for bad, words in [
        ("198.18.0.1", "prefix"),
        ("198.18.0.1/32", "prefix"),
        ("198.18.0.0/24", "network and broadcast"),
        ("nope", "not an address"),
        ("fd00::1/127", "/126 or wider"),
        ("fd00::/64", "first address"),
    ]:
        with pytest.raises(ConfigError, match=words):
            parse_address(bad)


def test_route_parsing() -> None:
    assert parse_route("default") == "default"
    assert parse_route("0.0.0.0/0") == "default"
    assert parse_route("10.0.0.0/8") == "10.0.0.0/8"
    with pytest.raises(ConfigError, match=r"did you mean 10\.0\.0\.0/8"):
        parse_route("10.0.0.1/8")
    assert parse_route("::/0") == "::/0"
    assert parse_route("fd00:99::/32") == "fd00:99::/32"


def test_addresses_and_default_routes_per_family() -> None:
    v4v6 = parse_addresses(("fd00:18::1/64", "198.18.255.1/24"))
    assert [a.version for a in v4v6] == [4, 6]
    assert expand_routes(("default",), v4v6) == ("default", "::/0")
    v6 = parse_addresses("fd00:18::1/64")
    assert expand_routes(("default", "fd00:99::/32"), v6) == ("::/0", "fd00:99::/32")
    with pytest.raises(ConfigError, match="no IPv4 address"):
        expand_routes(("10.0.0.0/8",), v6)
    with pytest.raises(ConfigError, match="at most one IPv4"):
        parse_addresses(("198.18.0.1/24", "198.19.0.1/24"))


def test_validate_names_the_bad_option(tmp_path: Path) -> None:
    good = Options(runtime_dir=str(tmp_path / "rt"), queues=1, workers=1)
    validate(good, sys_net=str(tmp_path))
    cases: list[tuple[dict[str, Any], str]] = [
        ({"tun": "a/b"}, "--tun"),
        ({"tun": "x" * 16}, "--tun"),
        ({"mtu": 10}, "--mtu"),
        ({"queues": 0}, "--queues"),
        ({"queues": 65}, "--queues 65 is out of range: use 1..64"),
        ({"queues": 100}, "--queues 100 is out of range: use 1..64"),
        ({"workers": -1}, "--workers"),
        ({"workers": 257}, "--workers 257 is out of range: use 0..256"),
        ({"workers": 300}, "--workers 300 is out of range: use 0..256"),
        ({"egress_mark": 0}, "--egress-mark"),
        ({"egress_mark": 1 << 32}, "--egress-mark"),
        ({"egress_interface": "eth9"}, "no such network interface"),
        ({"egress_interface": "tunio0"}, "TUN device itself"),
        ({"connect_timeout": 0.0}, "--connect-timeout"),
        # each is a 32-bit count of milliseconds in the stack's configuration: no overflow later
        ({"connect_timeout": float("inf")}, "--connect-timeout inf is out of range"),
        ({"connect_timeout": float("nan")}, "--connect-timeout nan is out of range"),
        ({"connect_timeout": 5e6}, "--connect-timeout 5e[+]06 is out of range: use above 0 up"),
        ({"udp_timeout": 1e300}, "--udp-timeout 1e[+]300 is out of range"),
        ({"drain_timeout": -1.0}, "--drain-timeout -1 is out of range"),
        ({"hang_timeout": -1.0}, "--hang-timeout -1 is out of range"),
        ({"hang_timeout": float("nan")}, "--hang-timeout nan is out of range"),
        ({"endpoint": "http://x"}, "--endpoint"),
        ({"runtime_dir": "/" + "d" * 120}, "too long"),
        ({"max_flows": 50, "max_pending": 60}, "--max-pending 60 is above --max-flows 50"),
    ]
    for change, words in cases:
        options = dataclasses.replace(good, **change)
        with pytest.raises(ConfigError, match=words):
            validate(options, sys_net=str(tmp_path))
    # --max-flows alone, below the default --max-pending: the default is capped, no error
    validate(dataclasses.replace(good, max_flows=50), sys_net=str(tmp_path))
    assert pending_limit(dataclasses.replace(good, max_flows=50)) == 50
    # ...but the default's own value, given, is given: above --max-flows it is a mistake too
    with pytest.raises(ConfigError, match=f"--max-pending {defaults.MAX_PENDING} is above"):
        validate(dataclasses.replace(good, max_flows=50, max_pending=defaults.MAX_PENDING),
                 sys_net=str(tmp_path))  # fmt: skip
    assert pending_limit(dataclasses.replace(good, max_flows=50, max_pending=20)) == 20


def test_validate_names_a_setting_of_the_wrong_kind(tmp_path: Path) -> None:
    """A library's Options may hold anything: a value of the wrong kind is a ConfigError that
    names the setting and what it takes, never a TypeError from inside a check or a start that
    reads "default" as the routes "d", "e", ... or "false" as true."""
    good = Options(runtime_dir=str(tmp_path / "rt"), queues=1, workers=1)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"workers": "4"}, "--workers: workers='4' is of type str: give an integer"),
        ({"workers": 2.5}, "--workers: workers=2.5 is of type float: give an integer"),
        ({"window": 65536.5}, "--window: window=65536.5 is of type float: give an integer"),
        ({"txqueuelen": True}, "--txqueuelen: txqueuelen=True is of type bool: give an integer"),
        ({"connect_timeout": "5"}, "--connect-timeout: connect_timeout='5' is of type str: give "
                                   "a number"),
        ({"connect_timeout": None}, "--connect-timeout: connect_timeout=None is of type "
                                    "NoneType: give a number"),
        ({"egress_mark": "0x1"}, "--egress-mark: egress_mark='0x1' is of type str: give an "
                                 "integer"),
        ({"auto_bypass": "false"}, "--auto-bypass: auto_bypass='false' is of type str: give "
                                   "True or False"),
        ({"offload": 0}, "--no-offload: offload=0 is of type int: give True or False"),
        ({"tun": 1}, "--tun: tun=1 is of type int: give a string"),
        ({"metrics": 9184}, "--metrics: metrics=9184 is of type int: give a string"),
        ({"routes": "default"}, "--route: routes='default' is one string: give a tuple, "
                                "routes=('default',)"),
        ({"routes": ("default", 5)}, "--route: routes=('default', 5) holds 5, which is of "
                                     "type int: give a string"),
        ({"exclude": "10.0.0.0/8"}, "--exclude: exclude='10.0.0.0/8' is one string: give a "
                                   "tuple, exclude=('10.0.0.0/8',)"),
        ({"address": 5}, "--address: address=5 is of type int: give a string or a tuple of them"),
        ({"dialers": [("office", "direct")]}, "dialers=[('office', 'direct')] is of type list: "
                                              "give a mapping of names to dialers, e.g. "
                                              "{'office': 'socks5://10.0.0.5:1080'}"),
        ({"rules": Rule()}, "rules=Rule(domains=(), networks=(), ports=(), uids=frozenset(), "
                            "pr is of type Rule: give a tuple of tunio.rules.Rule"),
    ]  # fmt: skip
    for change, words in cases:
        with pytest.raises(ConfigError) as caught:
            validate(dataclasses.replace(good, **change), sys_net=str(tmp_path))
        assert str(caught.value) == words
    # what the annotations allow passes: a list for a tuple, a Path for a path, unset values
    allowed: dict[str, Any] = {"routes": ["default"], "address": ["198.18.0.1/24"],
                               "runtime_dir": tmp_path / "rt", "egress_mark": None}  # fmt: skip
    validate(dataclasses.replace(good, **allowed), sys_net=str(tmp_path))


# ---------------------------------------------------------------- runtime directory


def test_runtime_dir_is_private_locked_and_removed(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / TUN
    first = RuntimeDir(path, TUN)
    first.acquire()
    assert (path.stat().st_mode & 0o777) == 0o700
    assert first.endpoint == f"ipc://{path}/stack.sock"
    assert (path / "tunio.pid").read_text() == f"{os.getpid()}\n"

    second = RuntimeDir(path, TUN)
    with pytest.raises(TunioError, match=rf"another tunio-run \(pid {os.getpid()}\) already runs"):
        second.acquire()
    second.release()  # must not remove what the first one holds
    assert (path / "tunio.pid").exists()

    (path / "stack.sock").touch()
    first.release()
    assert not (tmp_path / "a").exists()


def test_runtime_dir_refuses_foreign_or_open_directories(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    with pytest.raises(ConfigError, match="must be private"):
        RuntimeDir(shared, TUN).acquire()
    assert oct(shared.stat().st_mode & 0o777) == oct(0o755)  # never tightened

    mine = tmp_path / "mine"
    mine.mkdir(mode=0o700)
    real_uid = os.geteuid()
    monkeypatch.setattr(os, "geteuid", lambda: real_uid + 1)
    with pytest.raises(ConfigError, match=f"belongs to uid {real_uid}"):
        RuntimeDir(mine, TUN).acquire()


def test_stale_socket_is_removed_and_old_directory_reused(tmp_path: Path) -> None:
    path = tmp_path / TUN
    path.mkdir(mode=0o700)
    (path / "stack.sock").touch()
    rundir = RuntimeDir(path, TUN)
    rundir.acquire()
    assert not (path / "stack.sock").exists()
    rundir.release()
    assert not path.exists()


# ---------------------------------------------------------------- tundev


def test_rp_filter_detection(tmp_path: Path) -> None:
    conf = tmp_path / "sys/net/ipv4/conf"
    for name, value in (("all", 0), ("eth0", 1), ("eth1", 2)):
        (conf / name).mkdir(parents=True)
        (conf / name / "rp_filter").write_text(f"{value}\n")
    line = tundev.rp_filter_warning("eth0", TUN, proc=str(tmp_path))
    assert line is not None
    assert "strict on eth0" in line
    assert "\n" not in line
    assert tundev.rp_filter_warning("eth1", TUN, proc=str(tmp_path)) is None
    (conf / "all" / "rp_filter").write_text("1\n")
    assert tundev.rp_filter("eth1", proc=str(tmp_path)) == 2  # the larger value applies
    assert tundev.rp_filter("lo", proc=str(tmp_path)) == 1
    assert tundev.rp_filter("lo", proc=str(tmp_path / "none")) is None


def test_ip_failure_is_one_line_with_errno(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_IP_FAIL", f"-4 route add default dev {TUN}")
    with pytest.raises(TunError) as caught:
        tundev.run("-4", "route", "add", "default", "dev", TUN)
    assert caught.value.errno == errno.EEXIST
    assert caught.value.strerror == (
        f"`ip -4 route add default dev {TUN}` failed: RTNETLINK answers: File exists"
    )


def test_address_in_use_on_another_interface(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "FAKE_IP_ADDRS",
        "1: lo    inet 127.0.0.1/8 scope host lo\\\n"
        "7: veth9@if6    inet 198.18.255.1/24 scope global veth9",
    )
    address = ipaddress.IPv4Interface("198.18.255.1/24")
    with pytest.raises(ConfigError, match="already in use on veth9"):
        tundev.check_address_free(TUN, address)
    assert tundev.check_address_free("veth9", address) is True
    assert tundev.check_address_free(TUN, ipaddress.IPv4Interface("10.9.0.1/24")) is False


def test_existing_link_must_be_multiqueue_tun(tmp_path: Path) -> None:
    for name, flags in (("mq", "0x1101"), ("single", "0x1001"), ("tap", "0x1102")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "tun_flags").write_text(flags + "\n")
    (tmp_path / "eth0").mkdir()
    tundev.check_existing_link("mq", str(tmp_path))
    with pytest.raises(ConfigError, match="without multi-queue"):
        tundev.check_existing_link("single", str(tmp_path))
    with pytest.raises(ConfigError, match="TAP"):
        tundev.check_existing_link("tap", str(tmp_path))
    with pytest.raises(ConfigError, match="not a TUN device"):
        tundev.check_existing_link("eth0", str(tmp_path))


def test_missing_dev_net_tun(tmp_path: Path) -> None:
    with pytest.raises(TunError, match=r"modprobe tun") as caught:
        tundev.check_tun_device(str(tmp_path / "tun"))
    assert caught.value.errno == errno.ENOENT


# ---------------------------------------------------------------- the supervisor with fakes


def test_run_ready_restart_and_clean_stop(world: World, logwatch: LogWatch) -> None:
    (world.sys_net / "veth9").mkdir()
    world.set_rp_filter("all", 0)
    world.set_rp_filter("veth9", 1)
    options = _options(
        world, egress_mark=None, egress_interface="veth9", routes=("default", "10.0.0.0/8")
    )
    running = _start(_supervisor(world, options))
    assert running.supervisor.ready.wait(15)
    ready = logwatch.wait_for(lambda m: m.startswith("tunio ready:"))
    assert ready == (
        f"tunio ready: tun={TUN} address=198.18.255.1/24 queues=2 workers=2 "
        f"endpoint=ipc://{world.runtime}/stack.sock"
    )
    [rp_warning] = [m for m in logwatch.messages("WARNING") if "rp_filter" in m]
    assert "rp_filter is strict on veth9" in rp_warning
    assert world.ip_calls() == [
        "-o -4 addr show",
        f"addr add 198.18.255.1/24 dev {TUN}",
        f"link set dev {TUN} mtu 1500",
        f"link set dev {TUN} txqueuelen 50000",
        f"link set dev {TUN} up",
        f"-4 route add default dev {TUN}",
        f"-4 route add 10.0.0.0/8 dev {TUN}",
    ]
    assert world.runtime.stat().st_mode & 0o777 == 0o700

    # A worker dies: it comes back (its first death is after a short life: 0.5 s back-off).
    first = world.pids("worker-0")
    os.kill(first[0], signal.SIGKILL)
    logwatch.wait_for(lambda m: m.startswith("worker-0 exited with signal SIGKILL"))
    logwatch.wait_for(lambda m: m.startswith("worker-0 restarted"))
    assert len(world.pids("worker-0")) == 2

    assert running.stop() == 0
    calls = world.ip_calls()
    assert calls[-2:] == [f"-4 route del 10.0.0.0/8 dev {TUN}", f"-4 route del default dev {TUN}"]
    assert not world.runtime.exists()
    assert world.open_queue_files() == []
    _assert_dead(world.pids("stack") + world.pids("worker-0") + world.pids("worker-1"))
    assert "tunio stopped" in logwatch.messages()
    assert not any(c.startswith("link del") for c in calls)


def test_existing_device_is_kept_and_our_address_removed(world: World, logwatch: LogWatch) -> None:
    (world.sys_net / TUN).mkdir()
    (world.sys_net / TUN / "tun_flags").write_text("0x1101\n")
    running = _start(_supervisor(world, _options(world, workers=1, routes=())))
    assert running.supervisor.ready.wait(15)
    assert running.stop() == 0
    # no routes (the default of Options) is said, since such a run forwards only what others
    # route into the device
    assert [m for m in logwatch.messages("WARNING") if m.startswith("no --route")] == [
        f"no --route: nothing is routed into {TUN}, so only what the host itself routes there "
        'is forwarded (give routes, e.g. routes=("default",))'
    ]
    calls = world.ip_calls()
    assert f"addr add 198.18.255.1/24 dev {TUN}" in calls
    assert calls[-1] == f"addr del 198.18.255.1/24 dev {TUN}"
    assert not any(c.startswith("link del") for c in calls)


def test_default_runtime_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    host = tmp_path / "host-ns"
    host.touch()
    same = {"netns": str(host), "host_netns": str(host), "named": str(tmp_path / "none")}
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert runtime.default_path("tun0", **same) == Path("/run/tunio/tun0")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert runtime.default_path("tun0", **same) == Path("/run/user/1000/tunio/tun0")


def test_default_runtime_dir_of_another_namespace(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # /run is shared by every network namespace, and a device name is not: tun0 in another
    # namespace takes a directory named after that namespace
    host, other = tmp_path / "host-ns", tmp_path / "other-ns"
    named = tmp_path / "netns"
    named.mkdir()
    for path in (host, other, named / "a-lab"):
        path.touch()
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    ino = other.stat().st_ino
    unnamed = str(named)
    assert runtime.default_path("tun0", str(other), str(host), unnamed) == Path(
        f"/run/tunio/net{ino}/tun0"
    )
    # the host's namespace out of sight (process 1 is not ours to look at): the plain path
    hidden = str(tmp_path / "missing")
    assert runtime.default_path("tun0", str(other), hidden, unnamed) == Path("/run/tunio/tun0")
    # a namespace `ip netns` named is known by its name, seen or not
    os.link(other, named / "b-lab")
    for host_ns in (str(host), hidden):
        assert runtime.default_path("tun0", str(other), host_ns, unnamed) == Path(
            "/run/tunio/netns-b-lab/tun0"
        )


def test_dead_stack_is_restarted(world: World, logwatch: LogWatch) -> None:
    running = _start(_supervisor(world, _options(world, workers=1)))
    assert running.supervisor.ready.wait(15)
    (world.sys_net / TUN).mkdir()  # as if something made the device persistent
    [stack] = world.pids("stack")
    os.kill(stack, signal.SIGKILL)
    logwatch.wait_for(lambda m: m.startswith("stack exited with signal SIGKILL"))
    logwatch.wait_for(lambda m: m.startswith("stack restarted"))
    assert len(world.pids("stack")) == 2
    # the worker is restarted with it, so it joins the new stack at once; a worker that saw the
    # old stack's socket close first and ended on its own is restarted as any ended worker is
    logwatch.wait_for(lambda m: m.startswith(
        ("restarting 1 worker(s) so they join the new stack", "worker-0 exited")))  # fmt: skip
    logwatch.wait_for(lambda m: m.startswith("worker-0 restarted"))
    assert len(world.pids("worker-0")) == 2
    assert running.stop() == 0
    assert world.ip_calls()[-1] == f"link del dev {TUN}"  # we created it: it goes
    assert not world.runtime.exists()
    _assert_dead(world.pids("stack") + world.pids("worker-0"))


def test_loop_warning_for_default_route_without_egress(world: World, logwatch: LogWatch) -> None:
    running = _start(_supervisor(world, _options(world, egress_mark=None, workers=1)))
    assert running.supervisor.ready.wait(15)
    assert running.stop() == 0
    [loop] = [m for m in logwatch.messages("WARNING") if "loop" in m]
    assert "--route default with the direct dialer" in loop


def test_loop_warning_for_the_halves_without_egress(world: World, logwatch: LogWatch) -> None:
    options = _options(world, egress_mark=None, workers=1, routes=("0.0.0.0/1", "128.0.0.0/1"))
    running = _start(_supervisor(world, options))
    assert running.supervisor.ready.wait(15)
    assert running.stop() == 0
    [loop] = [m for m in logwatch.messages("WARNING") if "loop" in m]
    assert loop.startswith(
        "--route 0.0.0.0/1 --route 128.0.0.0/1 with the direct dialer and neither --egress-mark"
    )


@pytest.mark.parametrize(("reuse", "said"), [(2, True), (1, False)])
def test_a_proxy_dialer_hears_what_the_port_range_allows(
    world: World, logwatch: LogWatch, reuse: int, said: bool
) -> None:
    ipv4 = world.proc / "sys/net/ipv4"
    ipv4.mkdir(parents=True, exist_ok=True)
    (ipv4 / "ip_local_port_range").write_text("32768\t60999\n")
    (ipv4 / "tcp_tw_reuse").write_text(f"{reuse}\n")
    opts = _options(world, workers=1, dialer="socks5://127.0.0.1:1080")
    running = _start(_supervisor(world, opts))
    assert running.supervisor.ready.wait(15)
    assert running.stop() == 0
    notes = [m for m in logwatch.messages("INFO") if "every dial goes to one proxy" in m]
    if said:
        assert len(notes) == 1
        assert "tcp_tw_reuse=2" in notes[0]
        assert "about 470 new connections a second" in notes[0]
    else:
        assert notes == []


@pytest.mark.parametrize(
    ("env", "options", "code", "words"),
    [
        (
            {"FAKE_IP_FAIL": f"-4 route add 10.0.0.0/8 dev {TUN}"},
            {"routes": ("default", "10.0.0.0/8")},
            1,
            "RTNETLINK answers: File exists (the host has a route to 10.0.0.0/8 of its own: "
            "remove it, or route another prefix)",
        ),
        (
            {"FAKE_IP_FAIL": f"-4 route add default dev {TUN}"},
            {"routes": ("default",)},
            1,
            "RTNETLINK answers: File exists (the host has a default route of its own: give "
            "--route 0.0.0.0/1 --route 128.0.0.0/1 instead, which win over it and leave it in "
            "place)",
        ),
        ({"FAKE_TUN_ERRNO": str(errno.EPERM)}, {}, 1, "needs CAP_NET_ADMIN"),
        ({"FAKE_TUN_ERRNO": str(errno.EBUSY)}, {}, 1, "multi-queue TUN device"),
        ({"FAKE_STACK_ERROR": "cannot bind 198.18.255.1:1"}, {}, 1, "cannot bind 198.18.255.1:1"),
        (
            {"FAKE_WORKER_FAIL": "worker-1"},
            {},
            1,
            "worker-1 exited with code 3 before it was ready",
        ),
        (
            {"FAKE_IP_ADDRS": "3: eth0    inet 198.18.255.1/16 scope global eth0"},
            {},
            2,
            "already in use on eth0",
        ),
        ({}, {"dialer": "no_such_module_xyz:dialer"}, 2, "no_such_module_xyz"),
    ],
)
def test_failed_start_leaves_nothing_behind(
    world: World,
    logwatch: LogWatch,
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str],
    options: dict[str, object],
    code: int,
    words: str,
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    supervisor = _supervisor(world, _options(world, **options))
    assert supervisor.run() == code
    [error] = logwatch.messages("ERROR")[-1:]
    assert words in error
    assert "\n" not in error
    assert not supervisor.ready.is_set()
    assert not world.runtime.exists()
    assert not (world.root / "run").exists()
    assert world.open_queue_files() == []
    added = [c.split(" add ", 1)[1] for c in world.ip_calls() if c.startswith("-4 route add")]
    removed = [c.split(" del ", 1)[1] for c in world.ip_calls() if c.startswith("-4 route del")]
    failed = env.get("FAKE_IP_FAIL", "").split(" add ", 1)[-1]
    assert sorted(removed) == sorted(r for r in added if r != failed)
    _assert_dead(world.pids("stack") + world.pids("worker-0") + world.pids("worker-1"))


def test_stop_before_ready_is_a_clean_exit(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    supervisor = _supervisor(world, _options(world))
    supervisor.stop()
    assert supervisor.run() == 0
    assert not world.runtime.exists()


def test_a_supervisor_takes_options_only() -> None:
    """tunio.run({"tun": "tun0"}) is a ConfigError saying what to give, not an AttributeError
    from deep inside."""
    with pytest.raises(ConfigError, match=r"^Supervisor takes a tunio.Options, not a dict: "):
        tunio.run({"tun": "tun0"})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^reload_with takes a tunio.Options, not a dict"):
        Supervisor(Options()).reload_with({"workers": 4})  # type: ignore[arg-type]


def test_a_supervisor_runs_once(world: World) -> None:
    """A second run() of one Supervisor is an error that says what to do, not an EBADF from
    its closed wake-up pipe after a run that stopped at once; a new Supervisor runs again.
    One made and not run (to plan a --dry-run, say) holds no descriptor."""
    fds = len(os.listdir("/proc/self/fd"))
    supervisor = _supervisor(world, _options(world))
    assert len(os.listdir("/proc/self/fd")) == fds
    supervisor.stop()
    assert supervisor.run() == 0
    with pytest.raises(TunioError, match=r"a Supervisor runs once; make a new "
                       r"Supervisor\(options\) for another run"):  # fmt: skip
        supervisor.run()
    supervisor.stop()  # after its run, a stop is harmless
    again = _supervisor(world, _options(world))
    again.stop()
    assert again.run() == 0
    assert len(os.listdir("/proc/self/fd")) == fds


# ---------------------------------------------------------------- tunio-run as a process


def test_tunio_run_process_stops_cleanly_on_sigterm(world: World) -> None:
    env = {**os.environ, **world.env(), "PYTHONPATH": str(REPO)}
    argv = _bootstrap(world)
    proc = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE)
    try:
        seen = _read_until(proc, b"tunio ready:", timeout=20)
        ready_line = next(line for line in seen.splitlines() if b"tunio ready:" in line)
        assert b" INFO tunio-run: tunio ready: tun=tunit0 address=198.18.255.1/24 queues=2" in (
            ready_line
        )
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, rest.decode()
    assert b"received SIGTERM" in rest
    assert b"tunio stopped" in rest
    assert b"ERROR" not in seen + rest
    assert world.ip_calls()[-1] == f"-4 route del default dev {TUN}"
    assert not world.runtime.exists()
    _assert_dead(world.pids("stack") + world.pids("worker-0") + world.pids("worker-1"))


@pytest.mark.parametrize("exiting", [False, True])
def test_signals_after_the_stop(world: World, exiting: bool) -> None:
    """A library caller gets its handlers back; tunio-run (exiting) keeps ignoring a second
    SIGTERM, which would otherwise kill the interpreter's exit and turn 0 into -15."""
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    mine = {sig: signal.signal(sig, signal.SIG_DFL) for sig in sigs}
    try:
        supervisor = Supervisor(_options(world), exiting=exiting, lock_dir=world.locks)
        with supervisor._signals():
            assert {signal.getsignal(sig) for sig in sigs} == {supervisor._on_signal}
        want = signal.SIG_IGN if exiting else signal.SIG_DFL
        assert [signal.getsignal(sig) for sig in sigs] == [want] * 3
    finally:
        for sig, handler in mine.items():
            signal.signal(sig, handler)


def test_children_go_with_a_killed_tunio_run(world: World) -> None:
    """kill -9 of tunio-run: the stack and the workers get SIGTERM from the kernel (their parent
    died) and exit; none runs on under init, holding the device and its lock."""
    env = {**os.environ, **world.env(), "PYTHONPATH": str(REPO)}
    argv = _bootstrap(world)
    proc = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE)
    pidfds: list[int] = []
    try:
        _read_until(proc, b"tunio ready:", timeout=20)
        children = world.pids("stack") + world.pids("worker-0") + world.pids("worker-1")
        assert len(children) == 3
        pidfds = [os.pidfd_open(pid) for pid in children]
        proc.kill()
        proc.wait(10)
        for pid, fd in zip(children, pidfds, strict=True):
            ended, _, _ = select.select([fd], [], [], 10.0)  # a pidfd reads when its process ends
            assert ended, f"child {pid} outlived the killed tunio-run"
    finally:
        for fd in pidfds:
            os.close(fd)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_systemd_hears_ready_and_stopping(
    world: World, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(15)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        running = _start(_supervisor(world, _options(world, workers=1)))
        ready = sock.recv(1024).decode().split("\n")
        assert running.supervisor.ready.is_set()  # READY=1 is said only once it forwards
        assert ready[0] == "READY=1"
        assert f"STATUS=forwarding on {TUN}" in ready
        assert running.stop() == 0
        stopping = sock.recv(1024).decode().split("\n")
        assert stopping[0] == "STOPPING=1"


def test_reload_starts_a_new_generation_and_drains_the_old(
    world: World, logwatch: LogWatch
) -> None:
    options = _options(world, workers=2)
    running = _start(_supervisor(world, options))
    assert running.supervisor.ready.wait(15)
    first = world.pids("worker-0") + world.pids("worker-1")
    old = [os.pidfd_open(pid) for pid in first]
    try:
        # a live change (the dial timeout): a new generation, the old one drains and goes
        running.supervisor.reload_with(dataclasses.replace(options, connect_timeout=3.0))
        logwatch.wait_for(lambda m: m.startswith("reload: connect_timeout changed"))
        logwatch.wait_for(lambda m: m.startswith("generation 1 drains: 2 workers"))
        for fd in old:
            assert select.select([fd], [], [], 10.0)[0], "an old worker did not end"
        logwatch.wait_for(lambda m: m.startswith("worker-1 (generation 1) has ended"))
        assert len(world.pids("worker-g2-0")) == len(world.pids("worker-g2-1")) == 1
        assert not any(m.startswith("worker-0 restarted") for m in logwatch.messages())
        # a change that needs a restart: refused, in one line, and nothing else happens
        running.supervisor.reload_with(dataclasses.replace(options, mtu=9000,
                                                           connect_timeout=3.0))  # fmt: skip
        refused = logwatch.wait_for(lambda m: m.startswith("reload refused:"))
        assert refused == ("reload refused: --mtu (1500 -> 9000) cannot change while tunio-run "
                           "runs (restart it); the settings in force stay")  # fmt: skip
        running.supervisor.reload_with(dataclasses.replace(options, connect_timeout=3.0))
        logwatch.wait_for(lambda m: m == "reload: nothing to change")
        assert len(world.pids("worker-g2-0")) == 1  # no third generation
        assert running.supervisor.options.connect_timeout == 3.0
    finally:
        for fd in old:
            os.close(fd)
    assert running.stop() == 0
    _assert_dead(world.pids("stack") + world.pids("worker-g2-0") + world.pids("worker-g2-1"))


def test_a_reload_before_the_last_generation_is_up_drains_both(
    world: World, logwatch: LogWatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two reloads in a row, the second before the first's workers are up: the generation that
    never got up is superseded, and once the third is up the first and the second both drain;
    none is left running unwatched. A worker of the first that dies meanwhile is not restarted
    (its generation is on its way out), and never with the new settings."""
    os.mkfifo(world.state / "gate")
    monkeypatch.setenv("FAKE_WORKER_HOLD", "worker-g2-0,worker-g2-1")
    options = _options(world, workers=2)
    running = _start(_supervisor(world, options))
    assert running.supervisor.ready.wait(15)
    gen1 = world.pids("worker-0") + world.pids("worker-1")
    fds = [os.pidfd_open(pid) for pid in gen1]
    try:
        running.supervisor.reload_with(dataclasses.replace(options, connect_timeout=3.0))
        logwatch.wait_for(lambda m: m.startswith("reload: generation 2 (2 workers) starts"))
        # generation 2 is held short of ready; generation 1 still serves, and is watched
        os.kill(gen1[0], signal.SIGKILL)
        logwatch.wait_for(lambda m: m.startswith(
            "worker-0 (generation 1) exited with signal SIGKILL while generation 2 starts; "
            "not restarted"))  # fmt: skip
        running.supervisor.reload_with(dataclasses.replace(options, connect_timeout=4.0))
        drains = logwatch.wait_for(lambda m: m.startswith("generations 1, 2 drain"))
        assert drains.startswith("generations 1, 2 drain: 3 workers finish their flows")
        for fd in fds:
            assert select.select([fd], [], [], 10.0)[0], "a worker of generation 1 did not end"
        ended = ("worker-g2-0 (generation 2) has ended", "worker-g2-1 (generation 2) has ended")
        logwatch.wait_for(lambda m: m.startswith(ended[0]))
        logwatch.wait_for(lambda m: m.startswith(ended[1]))
        assert len(world.pids("worker-0")) == 1  # never restarted
        assert len(world.pids("worker-g3-0")) == len(world.pids("worker-g3-1")) == 1
        assert running.supervisor.options.connect_timeout == 4.0
    finally:
        for fd in fds:
            os.close(fd)
    assert running.stop() == 0
    _assert_dead(world.pids("stack") + world.pids("worker-g2-0") + world.pids("worker-g2-1")
                 + world.pids("worker-g3-0") + world.pids("worker-g3-1"))  # fmt: skip
