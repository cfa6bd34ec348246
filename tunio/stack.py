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
from tunio.process import stop_signals

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
    worker_backlog: int = defaults.WORKER_BACKLOG  # DATA bytes a worker may leave uncredited
    pending_timeout: float = defaults.PENDING_TIMEOUT
    log_level: str = defaults.LOG_LEVEL
    listen_port: int = 0
    pool_size: int = 0  # 0: the stack's default (TUNIO_DEFAULT_POOL)
    reserve_timeout: float = defaults.RESERVE_TIMEOUT
    heartbeat_interval: float = defaults.HEARTBEAT
    udp_timeout: float = defaults.UDP_TIMEOUT
    # TCP keepalive of the flows' app side: (idle s, interval s, probes); None: off
    keepalive: defaults.Keepalive | None = None
    # The TUN queues were opened with offloads (virtio-net headers): must match open_tun().
    offload: bool = False
    # CURVE on the endpoint (tcp://): the stack's Z85 secret key and the worker keys let in.
    curve_secret: str | None = None
    curve_clients: tuple[str, ...] = ()
    # The NAT region (a memfd of nat_region_size() bytes) that outlives this stack: a stack
    # started after a killed one adopts its flows. -1: a region of the stack's own.
    nat_region_fd: int = -1
    max_flows: int = defaults.MAX_FLOWS  # TCP flows + UDP sessions at once
    max_pending: int = defaults.MAX_PENDING  # SYNs held while their dial runs
    log_json: bool = False  # the C stack's log lines as JSON objects (--log-format json)
    # DNS answered by the stack (tunio.config.DnsPlan): "" off, "fake-ip" or "hijack"
    dns_mode: str = ""
    dns_pools: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    dns_addresses: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...] = ()
    dns_upstream: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int] | None = None
    dns_ttl: int = 10
    dns_hold: float = 10.0
    trim_idle: float = defaults.TRIM_IDLE  # no flows this long: freed heap goes back, s
    # fake-ip: a DNS-over-TCP connection to the DNS address idle this long is closed, s
    dns_tcp_idle: float = defaults.DNS_TCP_IDLE


def open_tun(name: str, queues: int, offload: bool = False) -> list[int]:
    """Opens `queues` queues of the multi-queue TUN device `name`, creating it if absent.

    With `offload`, the queues carry virtio-net headers and the kernel hands over TCP segments
    of up to 64 KB with checksums left to complete (TSO): far fewer packets to handle."""
    ffi, lib = _lib()
    fds = ffi.new("int[]", queues)
    rc = lib.tunio_tun_open(name.encode(), queues, int(offload), fds)
    check(rc, TunError, f"cannot open TUN device {name}", "tun", name=name, queues=queues)
    return [int(fds[i]) for i in range(queues)]


def milliseconds(seconds: float) -> int:
    """Seconds as the C configuration's milliseconds, where 0 means the default: a positive
    time under a millisecond is one, not the default (a --udp-timeout of 0.0005 s was 60 s)."""
    return max(1, round(seconds * 1000)) if seconds > 0 else 0


class _CConfig:
    """A `struct tunio_config` for `config`, with the buffers its pointers point into."""

    def __init__(self, ffi: Any, config: StackConfig) -> None:
        cfg = ffi.new("struct tunio_config *")
        self._fds = ffi.new("int[]", list(config.tun_fds))
        self._endpoint = ffi.new("char[]", config.endpoint.encode())
        cfg.tun_fds = self._fds
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
        cfg.endpoint = self._endpoint
        cfg.window = config.window
        cfg.worker_backlog = config.worker_backlog
        cfg.pending_ms = milliseconds(config.pending_timeout)
        cfg.reserve_ms = milliseconds(config.reserve_timeout)
        cfg.heartbeat_ms = milliseconds(config.heartbeat_interval)
        cfg.log_level = _LEVELS.get(config.log_level.lower(), 20)
        cfg.udp_timeout_ms = milliseconds(config.udp_timeout)
        if config.keepalive is not None:
            cfg.keepalive_idle_s, cfg.keepalive_interval_s, cfg.keepalive_count = config.keepalive
        cfg.vnet = int(config.offload)
        self._secret = self._clients = ffi.NULL
        if config.curve_secret is not None:
            self._secret = ffi.new("char[]", config.curve_secret.encode())
            self._clients = ffi.new("char[]", " ".join(config.curve_clients).encode())
        cfg.curve_secret = self._secret
        cfg.curve_clients = self._clients
        cfg.nat_region_fd = config.nat_region_fd
        cfg.max_flows = config.max_flows
        cfg.max_pending = config.max_pending
        cfg.log_json = int(config.log_json)
        cfg.dns_mode = _DNS_MODES[config.dns_mode]
        for pool in config.dns_pools:
            _set_prefix(cfg.dns_pool[pool.version == 6], pool.network_address, pool.prefixlen)
        for ip in config.dns_addresses:
            _set_prefix(cfg.dns_address[ip.version == 6], ip, 0)
        if config.dns_upstream is not None:
            _set_prefix(cfg.dns_upstream, config.dns_upstream[0], 0)
            cfg.dns_upstream_port = config.dns_upstream[1]
        cfg.dns_ttl = config.dns_ttl
        cfg.dns_hold_ms = milliseconds(config.dns_hold)
        cfg.trim_idle_ms = milliseconds(config.trim_idle)
        cfg.dns_tcp_idle_ms = milliseconds(config.dns_tcp_idle)
        self.cfg = cfg


_DNS_MODES = {"": 0, "fake-ip": 1, "hijack": 2}


def _set_prefix(
    px: Any, ip: ipaddress.IPv4Address | ipaddress.IPv6Address, prefix_len: int
) -> None:
    for j, b in enumerate(ip.packed):
        px.address[j] = b
    px.version = ip.version
    px.prefix_len = prefix_len


def nat_region_size(config: StackConfig) -> int:
    """Bytes of the NAT region a stack of `config` maps (its prefixes and pool decide)."""
    ffi, lib = _lib()
    size = int(lib.tunio_nat_region_size(_CConfig(ffi, config).cfg))
    return check(size, StackError, "NAT region size")


def create_nat_region(config: StackConfig) -> int:
    """A new NAT region for stacks of `config`: a memfd of the size they map, all zero (untouched
    pages cost no memory). The caller keeps it open across stacks and passes it as
    `nat_region_fd`; a fork inherits it."""
    fd = os.memfd_create("tunio-nat", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, nat_region_size(config))
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass(frozen=True)
class WorkerInfo:
    """One worker as the stack sees it (a moment's view: read without the loop's lock)."""

    name: str
    alive: bool
    flows: int  # its load: TCP flows and datagram sessions
    capacity: int  # 0: no limit


class Stack:
    """One C stack: binds on construction, forwards in run(), stops on stop()."""

    def __init__(self, config: StackConfig) -> None:
        ffi, lib = _lib()
        self._ffi, self._lib = ffi, lib
        self.config = config
        c = _CConfig(ffi, config)
        out = ffi.new("struct tunio_stack **")
        rc = lib.tunio_stack_new(c.cfg, out)
        shown = ", ".join(str(a.ip) for a in config.addresses)
        check(
            rc, StackError, "cannot start the stack", "stack",
            addresses=shown, endpoint=config.endpoint,
        )
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

    def workers(self) -> list[WorkerInfo]:
        """Every worker of the stack's table, lost ones included (alive False)."""
        info = self._ffi.new("struct tunio_worker_info *")
        out: list[WorkerInfo] = []
        with self._lock:
            if self._s is None:
                return out
            while self._lib.tunio_stack_worker_info(self._s, len(out), info) == 0:
                name = self._ffi.string(info.name).decode(errors="replace")
                out.append(WorkerInfo(name, bool(info.alive), int(info.flows), int(info.capacity)))
        return out

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
    for sig in stop_signals():
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
        if isinstance(error, StackError) and error.errno == errno.ENODEV:
            status.put(("tun-gone", "every TUN queue failed"))  # (its log said so)
            return
        status.put(("stack-error", getattr(error, "strerror", None) or str(error)))
