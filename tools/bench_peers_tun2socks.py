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
import subprocess
import sys
import time
from collections.abc import Iterator

from lab.chain import ChainLab
from lab.netlab import EGRESS_TABLE, TUN_ADDRESS, TUN_NAME, LabError, LineReader

# The app's routes into the TUN (as for sing-box: every address, without a default route).
APP_ROUTES = ("0.0.0.0/1", "128.0.0.0/1")
RULE_PREF = "50"  # before the lab's fwmark rule (its table's own number, 100) and main
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
POLL = 0.05  # seconds between looks for the device: tun2socks says nothing at "warn" level


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
    proc = lab.popen(lab.app, _argv(lab.veth_app, proxy), stdout=subprocess.PIPE,
                     stderr=subprocess.STDOUT, text=True)  # fmt: skip
    assert proc.stdout is not None
    log = LineReader(proc.stdout, "tun2socks")
    rule = ["oif", lab.veth_app, "lookup", str(EGRESS_TABLE), "pref", RULE_PREF]
    ruled = False
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not _device_exists(lab):
            if proc.poll() is not None or time.monotonic() > deadline:
                log.join(2.0)
                state = f"exited with {proc.returncode}" if proc.poll() is not None else "no TUN"
                msg = f"tun2socks did not start ({state}); its log:\n{log.text}"
                raise LabError(msg)
            time.sleep(POLL)  # the device appearing is no event we can wait on
        lab.ip(lab.app, "addr", "add", TUN_ADDRESS, "dev", TUN_NAME)
        lab.ip(lab.app, "link", "set", TUN_NAME, "up")
        lab.ip(lab.app, "rule", "add", *rule)
        ruled = True
        for route in APP_ROUTES:
            lab.ip(lab.app, "route", "add", route, "dev", TUN_NAME)
        yield proc.pid
    except BaseException:
        if log.lines:
            print("tun2socks' log:\n" + "\n".join(log.lines[-20:]), flush=True)
        raise
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(STOP_TIMEOUT)
        log.join(2.0)
        if ruled:
            lab.ip(lab.app, "rule", "del", *rule)
