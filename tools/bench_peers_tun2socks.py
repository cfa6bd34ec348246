"""xjasonlyu/tun2socks as a peer in `make bench-peers`: its process and its routes.

PyPI's `tun2socks` (the `bench` extra) is tun2socks 2.7 (a Go program on gVisor's TCP/IP stack)
built as a Python extension whose one call, `startFromArgs(device, interface, log level, proxy,
REST API)`, runs the forwarder and never returns: the row runs it in a process of its own in the
app namespace and ends it with SIGKILL (it does not stop on SIGTERM while that call runs).

That call takes no MTU: the device gets tun2socks' default, 1500, which its users get too.
Nor a routing mark: its outbound connections are bound to the app's veth (the `interface`
argument, SO_BINDTODEVICE), and a rule sends what is bound to the veth to the lab's egress
table (100), where tunio's and sing-box's marked connections go. tun2socks makes the device
but sets neither its address nor its state: the row does both, as its users' scripts do.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from bench_peers_forwarder import forwarder_process, route_into_tun
from lab.chain import ChainLab
from lab.netlab import EGRESS_TABLE, TUN_ADDRESS, TUN_NAME, LabError

RULE_PREF = "50"  # before the lab's fwmark rule (its table's own number, 100) and main


def missing() -> str | None:
    """None if the tun2socks module imports here, else why not."""
    try:
        import tun2socks  # noqa: F401, PLC0415 - optional: the `bench` extra brings it
    except ImportError as exc:
        return f"PyPI's tun2socks (the bench extra) is not installed: {exc}"
    return None


def version() -> str:
    import tun2socks  # noqa: PLC0415 - optional: the `bench` extra brings it

    return f"tun2socks {tun2socks.__version__} (PyPI's build of xjasonlyu/tun2socks)"


def _argv(interface: str, proxy: str) -> list[str]:
    call = (f"import tun2socks; tun2socks.startFromArgs({f'tun://{TUN_NAME}'!r}, "
            f"{interface!r}, 'warn', {proxy!r}, '')")  # fmt: skip
    return [sys.executable, "-c", call]


def _device_exists(lab: ChainLab) -> bool:
    try:
        lab.ip(lab.app, "-o", "link", "show", "dev", TUN_NAME)
    except LabError:
        return False
    return True


@contextlib.contextmanager
def running(lab: ChainLab, proxy: str) -> Iterator[int]:
    """tun2socks with `proxy` (socks5://HOST:PORT or direct://) in the app namespace, the app's
    traffic routed into its TUN; yields its pid. Killed (its TUN gone with it) at the end."""
    argv = _argv(lab.veth_app, proxy)
    rule = ["oif", lab.veth_app, "lookup", str(EGRESS_TABLE), "pref", RULE_PREF]
    with forwarder_process(lab, argv, "tun2socks", lambda: _device_exists(lab),
                           kill=True) as proc:  # fmt: skip
        lab.ip(lab.app, "addr", "add", TUN_ADDRESS, "dev", TUN_NAME)
        lab.ip(lab.app, "link", "set", TUN_NAME, "up")
        lab.ip(lab.app, "rule", "add", *rule)
        try:
            route_into_tun(lab)
            yield proc.pid
        finally:
            lab.ip(lab.app, "rule", "del", *rule)
