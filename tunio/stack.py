"""The C stack behind a typed façade, and the entry point of the stack process.

The C loop runs inside ``Stack.run()``; cffi releases the GIL for the whole call, so the packet
path never waits on Python. ``Stack.stop()`` writes the eventfd the loop watches.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tunio import defaults
from tunio.errors import StackError, TunError, check

log = logging.getLogger("tunio.stack")

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
#: seconds between two reports of the stack's counters to the supervisor
REPORT_INTERVAL = 1.0


def _lib() -> tuple[Any, Any]:
    try:
        from tunio._stack import ffi, lib  # noqa: PLC0415  (built extension, loaded on first use)
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise StackError(
            errno.ENOENT,
            "the C stack extension tunio._stack is not built: run `pip install -e .` "
            f"(needs libzmq3-dev and pkg-config) ({exc})",
        ) from exc
    return ffi, lib


Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


@dataclass(frozen=True)
class StackConfig:
    """What the stack needs: the TUN queue fds, the TUN's addresses (at most one IPv4 and one
    IPv6, each with its prefix) and the endpoint to bind."""

    tun_fds: tuple[int, ...]
    addresses: tuple[Interface, ...]
    endpoint: str
    window: int = defaults.WINDOW
    pending_timeout: float = defaults.PENDING_TIMEOUT
    log_level: str = defaults.LOG_LEVEL
    listen_port: int = 0
    pool_size: int = 0  # 0: the stack's default (TUNIO_DEFAULT_POOL)
    reserve_timeout: float = defaults.RESERVE_TIMEOUT
    heartbeat_interval: float = defaults.HEARTBEAT
    udp_timeout: float = defaults.UDP_TIMEOUT
    # The TUN queues were opened with offloads (virtio-net headers): must match open_tun().
    offload: bool = False
    # CURVE on the endpoint (tcp://): the stack's Z85 secret key and the worker keys let in.
    curve_secret: str | None = None
    curve_clients: tuple[str, ...] = ()


def open_tun(name: str, queues: int, offload: bool = False) -> list[int]:
    """Opens `queues` queues of the multi-queue TUN device `name`, creating it if absent.

    With `offload`, the queues carry virtio-net headers and the kernel hands over TCP segments
    of up to 64 KB with checksums left to complete (TSO): far fewer packets to handle."""
    ffi, lib = _lib()
    fds = ffi.new("int[]", queues)
    rc = lib.tunio_tun_open(name.encode(), queues, int(offload), fds)
    check(rc, TunError, f"cannot open TUN device {name}", "tun", name=name, queues=queues)
    return [int(fds[i]) for i in range(queues)]


class Stack:
    """One C stack: binds on construction, forwards in run(), stops on stop()."""

    def __init__(self, config: StackConfig) -> None:
        ffi, lib = _lib()
        self._ffi, self._lib = ffi, lib
        self.config = config
        cfg = ffi.new("struct tunio_config *")
        fds = ffi.new("int[]", list(config.tun_fds))
        endpoint = ffi.new("char[]", config.endpoint.encode())
        cfg.tun_fds = fds
        cfg.n_tun_fds = len(config.tun_fds)
        for i, iface in enumerate(config.addresses):
            px = cfg.prefixes[i]
            for j, b in enumerate(iface.ip.packed):
                px.address[j] = b
            px.version = iface.version
            px.prefix_len = iface.network.prefixlen
        cfg.n_prefixes = len(config.addresses)
        cfg.listen_port = config.listen_port
        cfg.pool_count = config.pool_size
        cfg.endpoint = endpoint
        cfg.window = config.window
        cfg.pending_ms = int(config.pending_timeout * 1000)
        cfg.reserve_ms = int(config.reserve_timeout * 1000)
        cfg.heartbeat_ms = int(config.heartbeat_interval * 1000)
        cfg.log_level = _LEVELS.get(config.log_level.lower(), 20)
        cfg.udp_timeout_ms = int(config.udp_timeout * 1000)
        cfg.vnet = int(config.offload)
        curve_secret = curve_clients = ffi.NULL
        if config.curve_secret is not None:
            curve_secret = ffi.new("char[]", config.curve_secret.encode())
            curve_clients = ffi.new("char[]", " ".join(config.curve_clients).encode())
        cfg.curve_secret = curve_secret
        cfg.curve_clients = curve_clients
        out = ffi.new("struct tunio_stack **")
        rc = lib.tunio_stack_new(cfg, out)
        shown = ", ".join(str(a.ip) for a in config.addresses)
        check(rc, StackError, "cannot start the stack", "stack", addresses=shown)
        self._s: Any = out[0]
        self._lock = threading.Lock()

    @property
    def listen_port(self) -> int:
        """The listener's port for the first address's family."""
        return self.listen_port_of(self.config.addresses[0].version)

    def listen_port_of(self, version: int) -> int:
        port = int(self._lib.tunio_stack_listen_port(self._s, version))
        return check(port, StackError, "listen port")

    def run(self) -> None:
        check(self._lib.tunio_stack_run(self._s), StackError, "stack loop")

    def stop(self) -> None:
        with self._lock:
            if self._s is not None:
                self._lib.tunio_stack_stop(self._s)

    def stats(self) -> dict[str, int]:
        st = self._ffi.new("struct tunio_stats *")
        with self._lock:
            if self._s is None:
                return {}
            self._lib.tunio_stack_stats(self._s, st)
        return {name: int(getattr(st, name)) for name, _ in self._ffi.typeof(st[0]).fields}

    def close(self) -> None:
        with self._lock:
            s, self._s = self._s, None
        if s is not None:
            self._lib.tunio_stack_free(s)


class _StatusQueue(Protocol):
    def put(self, item: tuple[str, Any]) -> None: ...


def _ipc_path(endpoint: str) -> Path | None:
    return Path(endpoint[len("ipc://") :]) if endpoint.startswith("ipc://") else None


def stack_main(config: StackConfig, status: _StatusQueue) -> None:
    """Entry point of the stack process: runs until SIGTERM or SIGINT."""
    # Signals are handled by the main thread while the C loop runs in another one.
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        stack = Stack(config)
    except (StackError, TunError) as exc:
        status.put(("stack-error", exc.strerror or str(exc)))
        return
    ipc = _ipc_path(config.endpoint)
    if ipc is not None:
        # The flows' bytes pass through this socket: no other user may connect to it.
        ipc.chmod(0o600)
    failure: list[BaseException] = []

    def loop() -> None:
        try:
            stack.run()
        except BaseException as exc:  # reported to the supervisor below
            failure.append(exc)
        finally:
            stop.set()

    thread = threading.Thread(target=loop, name="tunio-stack-loop")
    thread.start()
    status.put(("stack-ready", os.getpid()))
    log.debug("stack listening on port %d", stack.listen_port)
    while not stop.wait(REPORT_INTERVAL):
        status.put(("stats", stack.stats()))  # the supervisor's metrics
    stack.stop()
    thread.join()
    log.info("stack statistics: %s", stack.stats())
    stack.close()
    if ipc is not None:
        ipc.unlink(missing_ok=True)
    if failure:
        error = failure[0]
        status.put(("stack-error", getattr(error, "strerror", None) or str(error)))
