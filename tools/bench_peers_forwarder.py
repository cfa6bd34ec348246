"""A peer forwarder's process in `make bench-peers`: started in the app namespace, waited for
until its TUN is ready, the app's traffic routed into that TUN, and stopped at the end.

sing-box (tools/bench_peers_singbox.py) and tun2socks (tools/bench_peers_tun2socks.py) differ
only in their command, in what "ready" means and in how they stop; the rest is here.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Callable, Iterator

from lab.chain import ChainLab
from lab.netlab import TUN_NAME, LabError, LineReader

# The app's routes into the TUN: every address, without being a default route. sing-box
# watches the namespace's default route and, when it changes (as `default dev tun0` would just
# after it started), resets every connection it carries.
APP_ROUTES = ("0.0.0.0/1", "128.0.0.0/1")
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
POLL = 0.05  # seconds between looks for the device: the peers say nothing at "warn" level


def route_into_tun(lab: ChainLab) -> None:
    for route in APP_ROUTES:
        lab.ip(lab.app, "route", "add", route, "dev", TUN_NAME)


@contextlib.contextmanager
def forwarder_process(lab: ChainLab, argv: list[str], name: str, ready: Callable[[], bool], *,
                      kill: bool = False) -> Iterator[subprocess.Popen[str]]:  # fmt: skip
    """`argv` running in the app namespace, yielded once `ready()` (polled) says its TUN is
    there; its last log lines printed if the block fails. Stopped at the end with SIGTERM, then
    SIGKILL if it lingers, or at once with SIGKILL if `kill` (a peer that ignores SIGTERM)."""
    proc = lab.popen(lab.app, argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    log = LineReader(proc.stdout, name)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                log.join(2.0)
                state = f"exited with {proc.returncode}" if proc.poll() is not None else "no TUN"
                msg = f"{name} did not start ({state}); its log:\n{log.text}"
                raise LabError(msg)
            time.sleep(POLL)  # the device appearing is no event we can wait on
        yield proc
    except BaseException:
        if log.lines:
            print(f"{name}'s log:\n" + "\n".join(log.lines[-20:]), flush=True)
        raise
    finally:
        if proc.poll() is None and kill:
            proc.kill()
        elif proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT)
        log.join(2.0)
