"""tunio-run's supervisor: set up the TUN device, start the stack and the workers, restart what
dies, and undo everything it set up when it stops."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import ipaddress
import logging
import os
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from tunio import defaults, tundev
from tunio.errors import ConfigError, TunError, TunioError
from tunio.logs import LEVELS
from tunio.runtime import SOCKET_NAME, RuntimeDir, default_path

if TYPE_CHECKING:
    from tunio.dialers import Dialer
    from tunio.keys import StackKeys, WorkerKeys
    from tunio.stack import StackConfig

log = logging.getLogger("tunio.supervisor")

STARTUP_DEADLINE = 10.0  # seconds for the stack, then for all workers, to say they are ready
STOP_DEADLINE = 5.0  # seconds for children to exit after being asked, before SIGKILL
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 10.0
STABLE_AFTER = 5.0  # a child that lived this long is restarted at once
MAX_MARK = 0xFFFFFFFF
IFNAMSIZ = 16
SUN_PATH_MAX = 107  # sockaddr_un path bytes, without the terminating NUL


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) or 1


@dataclass(frozen=True)
class Options:
    """Every option of tunio-run; the library takes a Dialer object where the CLI takes a spec."""

    tun: str = defaults.TUN
    # One IPv4 and/or one IPv6 address with its prefix (a string, or a tuple of them).
    address: str | tuple[str, ...] = defaults.ADDRESS
    mtu: int = defaults.MTU
    queues: int = field(default_factory=_cpu_count)
    workers: int = field(default_factory=_cpu_count)
    dialer: Dialer | str | tuple[str, ...] = "direct"  # a tuple is a chain, first hop first
    egress_mark: int | None = None
    egress_interface: str | None = None
    endpoint: str | None = None  # None: ipc://<runtime dir>/stack.sock
    runtime_dir: str | None = None  # None: runtime.default_path(tun)
    routes: tuple[str, ...] = ()
    connect_timeout: float = defaults.CONNECT_TIMEOUT
    udp_timeout: float = defaults.UDP_TIMEOUT
    offload: bool = True  # TSO and checksum offload on the TUN (virtio-net headers)
    # CURVE keys for a tcp:// endpoint; None: <runtime dir>/keys, made anew for each run.
    keys: str | None = None
    window: int = defaults.WINDOW
    txqueuelen: int = defaults.TXQUEUELEN
    log_level: str = defaults.LOG_LEVEL


@dataclass(frozen=True)
class Plan:
    """Options checked and parsed: what the supervisor will set up."""

    addresses: tuple[Interface, ...]  # IPv4 first, then IPv6
    routes: tuple[str, ...]  # "default" (IPv4), "::/0" (IPv6) or a network in CIDR form
    runtime_dir: Path
    endpoint: str | None


# ---------------------------------------------------------------- validation (pure functions)

Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


def parse_address(text: str) -> Interface:
    """The TUN's address with its prefix; it needs spare addresses in the prefix for NAT."""
    try:
        iface = ipaddress.ip_interface(text)
    except ValueError:
        raise ConfigError(
            f"--address {text!r} is not an address with a prefix length (e.g. 198.18.0.1/24)"
        ) from None
    if isinstance(iface, ipaddress.IPv6Interface):
        if iface.network.prefixlen > 126:
            raise ConfigError(
                f"--address {text}: give a prefix of /126 or wider (e.g. /64): the stack uses "
                "other addresses of the prefix for address translation"
            )
        if iface.ip == iface.network.network_address:
            raise ConfigError(f"--address {text}: the prefix's first address cannot be used")
        return iface
    if "/" not in text or iface.network.prefixlen > 30:
        raise ConfigError(
            f"--address {text}: give a prefix of /30 or wider (e.g. /24): the stack uses the "
            "other addresses of the prefix for address translation"
        )
    if iface.ip in (iface.network.network_address, iface.network.broadcast_address):
        raise ConfigError(f"--address {text}: the network and broadcast addresses cannot be used")
    return iface


def parse_route(text: str) -> str:
    """'default' (every family the TUN has an address of) or a CIDR network routed into the TUN."""
    if text == "default":
        return text
    try:
        network = ipaddress.ip_network(text)
    except ValueError:
        loose: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
        with contextlib.suppress(ValueError):
            loose = ipaddress.ip_network(text, strict=False)
        hint = f": did you mean {loose}?" if loose is not None else " (e.g. 10.0.0.0/8 or default)"
        raise ConfigError(f"--route {text!r} is not a network in CIDR form{hint}") from None
    if network.prefixlen == 0:
        return "default" if network.version == 4 else "::/0"
    return str(network)


def parse_addresses(spec: str | tuple[str, ...]) -> tuple[Interface, ...]:
    """At most one IPv4 and one IPv6 address, IPv4 first."""
    texts = (spec,) if isinstance(spec, str) else spec
    if not texts:
        raise ConfigError("--address is required (e.g. 198.18.0.1/24, and/or fd00:18::1/64)")
    parsed = [parse_address(t) for t in texts]
    for version in (4, 6):
        if sum(a.version == version for a in parsed) > 1:
            raise ConfigError(f"--address: give at most one IPv{version} address")
    return tuple(sorted(parsed, key=lambda a: a.version))


def expand_routes(routes: tuple[str, ...], addresses: tuple[Interface, ...]) -> tuple[str, ...]:
    """'default' means the default route of every family the TUN carries; a route of a family
    the TUN has no address of could never be answered."""
    versions = {a.version for a in addresses}
    out: list[str] = []
    for route in routes:
        if route == "default":
            out += [r for r, v in (("default", 4), ("::/0", 6)) if v in versions]
        elif tundev.route_version(route) not in versions:
            raise ConfigError(
                f"--route {route}: the TUN has no IPv{tundev.route_version(route)} address "
                "(add one with --address)"
            )
        else:
            out.append(route)
    return tuple(dict.fromkeys(out))


def check_ifname(name: str, option: str) -> None:
    """The kernel's rules for an interface name (dev_valid_name)."""
    if (
        not name
        or len(name) >= IFNAMSIZ
        or name in (".", "..")
        or any(c in "/:" or c.isspace() for c in name)
    ):
        raise ConfigError(
            f"{option} {name!r} is not a valid interface name (1-15 characters, no '/', ':' "
            "or spaces)"
        )


def validate(options: Options, sys_net: str = tundev.SYS_NET) -> Plan:
    """Check every option; ConfigError naming the first one that is wrong."""
    check_ifname(options.tun, "--tun")
    addresses = parse_addresses(options.address)
    routes = expand_routes(tuple(parse_route(route) for route in options.routes), addresses)
    if not 68 <= options.mtu <= 65535:
        raise ConfigError(f"--mtu {options.mtu} is out of range: use 68..65535")
    if not 1 <= options.queues <= defaults.MAX_QUEUES:
        raise ConfigError(
            f"--queues {options.queues} is out of range: use 1..{defaults.MAX_QUEUES}"
        )
    if not 0 <= options.workers <= defaults.MAX_WORKERS:
        raise ConfigError(
            f"--workers {options.workers} is out of range: use 0..{defaults.MAX_WORKERS} "
            "(0: remote workers only)"
        )
    if options.egress_mark is not None and not 0 < options.egress_mark <= MAX_MARK:
        raise ConfigError(
            f"--egress-mark {options.egress_mark:#x} is out of range: use 1..{MAX_MARK:#x}"
        )
    if options.egress_interface is not None:
        check_ifname(options.egress_interface, "--egress-interface")
        if options.egress_interface == options.tun:
            raise ConfigError(
                f"--egress-interface {options.egress_interface} is the TUN device itself: the "
                "workers' traffic would loop back into it"
            )
        if not tundev.link_exists(options.egress_interface, sys_net):
            raise ConfigError(
                f"--egress-interface {options.egress_interface}: no such network interface"
            )
    if not options.connect_timeout > 0:
        raise ConfigError(f"--connect-timeout {options.connect_timeout:g} must be above 0")
    if not options.udp_timeout > 0:
        raise ConfigError(f"--udp-timeout {options.udp_timeout:g} must be above 0")
    if not 1024 <= options.window <= 1 << 30:
        raise ConfigError(f"--window {options.window} is out of range: use 1024..{1 << 30}")
    if not 1 <= options.txqueuelen <= 1 << 20:
        raise ConfigError(f"--txqueuelen {options.txqueuelen} is out of range: use 1..{1 << 20}")
    if options.log_level not in LEVELS:
        raise ConfigError(f"--log-level {options.log_level!r}: use one of {', '.join(LEVELS)}")
    if options.endpoint is not None and not options.endpoint.startswith(("ipc://", "tcp://")):
        raise ConfigError(f"--endpoint {options.endpoint!r}: use ipc://PATH or tcp://HOST:PORT")
    runtime_dir = Path(options.runtime_dir or default_path(options.tun)).absolute()
    if options.endpoint is None and len(os.fsencode(runtime_dir / SOCKET_NAME)) > SUN_PATH_MAX:
        raise ConfigError(
            f"--runtime-dir {runtime_dir} is too long for a unix socket path "
            f"({SUN_PATH_MAX} bytes at most with /{SOCKET_NAME}): pick a shorter one"
        )
    return Plan(
        addresses=addresses, routes=routes, runtime_dir=runtime_dir, endpoint=options.endpoint
    )


def next_backoff(previous: float, lifetime: float) -> float:
    """Seconds to wait before restarting a child that lived `lifetime` seconds.

    A child that ran for a while is restarted at once; one that keeps dying soon after its
    start waits 0.5 s, then twice as long each time, up to 10 s.
    """
    if lifetime >= STABLE_AFTER:
        return 0.0
    if previous <= 0:
        return BACKOFF_FIRST
    return min(previous * 2, BACKOFF_MAX)


def describe(exc: BaseException) -> str:
    """An exception as one line, without the "[Errno N]" prefix."""
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror if exc.filename is None else f"{exc.strerror}: {exc.filename}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


# ---------------------------------------------------------------- child processes

PR_SET_NAME = 15  # prctl(2)


def raise_fd_limit() -> None:
    """Each flow holds a descriptor in the stack and one in a worker: take the hard limit, so a
    default soft limit of 1,024 does not cap the flows far below what the host allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# mallopt(3) parameters (glibc)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
KEEP_FREED = 32 * 1024 * 1024  # freed heap kept for reuse, per process
LARGE_BLOCK = 4 * 1024 * 1024  # below this, blocks come from the heap, not from mmap


def keep_freed_memory() -> bool:
    """Keep freed heap for reuse instead of giving it back to the kernel at once.

    The data path allocates a block per message of up to half a window (the stack's reads of
    the app, the workers' ZeroMQ receives). With glibc's defaults such blocks are mapped fresh
    and unmapped again, and every 4 KiB page of them costs a page fault and a clearing: about a
    sixth of a page per byte forwarded. Returns False where mallopt is missing (not glibc)."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, LARGE_BLOCK)) and bool(
        mallopt(M_TRIM_THRESHOLD, KEEP_FREED)
    )


def set_process_name(name: str) -> None:
    """Names the process in `ps`, `top` and /proc/PID/comm, so operators (and tests) can tell the
    stack from the workers: forked children otherwise all show tunio-run's command line."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)


def _child_reset(close_fds: Iterable[int], name: str) -> None:
    """In a forked child: drop the supervisor's signal handlers and the fds it has no use for."""
    set_process_name(name)
    keep_freed_memory()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for fd in close_fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def stack_entry(config: StackConfig, status: Any, close_fds: tuple[int, ...]) -> None:
    """Process target of the stack: tunio.stack.stack_main with a clean signal state."""
    _child_reset(close_fds, "tunio-stack")
    from tunio.stack import stack_main  # noqa: PLC0415 - the cffi extension loads where it runs

    stack_main(config, status)


def worker_entry(
    *,
    endpoint: str,
    dialer: Dialer,
    name: str,
    window: int,
    connect_timeout: float,
    status: Any,
    close_fds: tuple[int, ...],
    keys: WorkerKeys | None = None,
) -> None:
    """Process target of a local worker: serve flows until the stack says BYE."""
    _child_reset(close_fds, f"tunio-{name}")
    from tunio.worker import run_worker  # noqa: PLC0415 - only workers need zmq

    code = run_worker(
        endpoint,
        dialer,
        name=name,
        window=window,
        connect_timeout=connect_timeout,
        ready=lambda: status.put(("worker-ready", name)),
        keys=keys,
    )
    sys.exit(code)


@dataclass
class _Child:
    name: str  # "stack" or "worker-<i>"
    process: Any = None  # a multiprocess Process while one runs
    started: float = 0.0
    ready: bool = False
    backoff: float = 0.0
    restart_at: float | None = None


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"code {code}"


class _Stopped(Exception):
    """A stop was asked for while starting up."""


# ---------------------------------------------------------------- the supervisor


class Supervisor:
    """Runs tunio: `Supervisor(options).run()` blocks and returns the exit code.

    `stop()` may be called from any thread (or a signal: run() handles SIGINT and SIGTERM when
    it runs in the main thread). `ready` is set once everything forwards.
    """

    def __init__(
        self,
        options: Options,
        *,
        startup_deadline: float = STARTUP_DEADLINE,
        stop_deadline: float = STOP_DEADLINE,
        proc: str = tundev.PROC,
        sys_net: str = tundev.SYS_NET,
        tun_path: str = tundev.TUN_PATH,
    ) -> None:
        self.options = options
        self.ready = threading.Event()
        self._startup_deadline = startup_deadline
        self._stop_deadline = stop_deadline
        self._proc = proc
        self._sys_net = sys_net
        self._tun_path = tun_path
        self._pid = os.getpid()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wake_lock = threading.Lock()
        self._stop_reason: str | None = None
        self._ctx: Any = None
        self._status: Any = None
        self._stack = _Child("stack")
        self._workers: list[_Child] = []
        self._fds: list[int] = []
        self._stack_config: StackConfig | None = None
        self._dialer: Any = None
        self._endpoint = ""
        self._keys: StackKeys | None = None
        self._socket: Path | None = None  # the ipc socket file in our runtime directory
        self._stack_error: str | None = None

    # ---- public

    def stop(self, reason: str = "stop requested") -> None:
        """Ask run() to stop everything and return; safe from any thread and signal handlers."""
        if self._stop_reason is None:
            self._stop_reason = reason
        with self._wake_lock:
            if self._wake_w >= 0:
                with contextlib.suppress(BlockingIOError):
                    os.write(self._wake_w, b"\0")

    def run(self) -> int:
        """Start, supervise until stopped, undo everything; 0, or 2 (config) / 1 (runtime)."""
        raise_fd_limit()  # inherited by the stack and the workers
        try:
            with self._signals(), contextlib.ExitStack() as undo:
                try:
                    self._start(undo)
                except _Stopped:
                    log.info("stopping during start-up (%s)", self._stop_reason)
                    return 0
                except ConfigError as exc:
                    log.error("%s", describe(exc))
                    return 2
                except (TunioError, OSError) as exc:
                    log.error("%s", describe(exc))
                    return 1
                self._supervise()
                log.info("stopping (%s)", self._stop_reason)
            log.info("tunio stopped")
            return 0
        finally:
            with self._wake_lock:
                os.close(self._wake_r)
                os.close(self._wake_w)
                self._wake_r = self._wake_w = -1

    # ---- signals

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # a library caller in another thread stops us with stop()
            return
        signals = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in signals}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if os.getpid() != self._pid:
            # A child between fork and its own set-up: die as the default action would.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.stop(f"received {signal.Signals(signum).name}")

    def _check_stop(self) -> None:
        if self._stop_reason is not None:
            raise _Stopped

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 512):
                pass

    # ---- start-up

    def _start(self, undo: contextlib.ExitStack) -> None:
        opts = self.options
        plan = validate(opts, self._sys_net)
        self._dialer = self._load_dialer()
        rundir = RuntimeDir(plan.runtime_dir, opts.tun)
        undo.callback(self._undo, "runtime directory", rundir.release)
        rundir.acquire()
        self._endpoint = plan.endpoint or rundir.endpoint
        if self._endpoint.startswith("tcp://"):
            # Workers on other hosts: CURVE, and only workers holding our worker key get in.
            from tunio.keys import load_or_create  # noqa: PLC0415

            keys_path = Path(opts.keys) if opts.keys else plan.runtime_dir / "keys"
            self._keys = load_or_create(keys_path)
            log.info("workers on other hosts need %s.worker (tunio-worker --keys)", keys_path)
        self._socket = rundir.socket_path if plan.endpoint is None else None

        tundev.check_tun_device(self._tun_path)
        existed = tundev.link_exists(opts.tun, self._sys_net)
        if existed:
            tundev.check_existing_link(opts.tun, self._sys_net)
        held = [tundev.check_address_free(opts.tun, address) for address in plan.addresses]
        uplink = opts.egress_interface or self._default_interface()
        self._check_stop()

        self._fds = self._open_tun(opts.tun, opts.queues, opts.offload)
        undo.callback(self._close_tun, existed)
        for address, has_address in zip(plan.addresses, held, strict=True):
            if has_address:
                continue
            tundev.add_address(opts.tun, address)
            if existed:  # a device we created takes its address with it
                undo.callback(self._undo, "address", tundev.del_address, opts.tun, address)
        tundev.set_mtu(opts.tun, opts.mtu)
        tundev.set_txqueuelen(opts.tun, opts.txqueuelen)
        tundev.set_up(opts.tun)
        for route in plan.routes:
            tundev.add_route(opts.tun, route)
            undo.callback(self._undo, f"route {route}", tundev.del_route, opts.tun, route)
        self._warn_egress(plan, uplink)
        self._check_stop()

        import multiprocess  # noqa: PLC0415 - import cost only for a real run

        self._ctx = multiprocess.get_context("fork")
        self._status = self._ctx.Queue()
        undo.callback(self._status.close)
        undo.callback(self._stop_children)
        from tunio.stack import StackConfig  # noqa: PLC0415 - the cffi extension is heavy

        self._stack_config = StackConfig(
            tun_fds=tuple(self._fds),
            addresses=plan.addresses,
            endpoint=self._endpoint,
            window=opts.window,
            # A held SYN must outlive the worker's own connect timeout.
            pending_timeout=max(defaults.PENDING_TIMEOUT, opts.connect_timeout + 5.0),
            log_level=opts.log_level,
            udp_timeout=opts.udp_timeout,
            offload=opts.offload,
            curve_secret=self._keys.secret if self._keys else None,
            curve_clients=(self._keys.worker.public,) if self._keys else (),
        )
        self._spawn_stack()
        self._await_ready([self._stack], "the stack")
        self._workers = [_Child(f"worker-{i}") for i in range(opts.workers)]
        for child in self._workers:
            self._spawn_worker(child)
        self._await_ready(self._workers, "the workers")
        log.info(
            "tunio ready: tun=%s address=%s queues=%d workers=%d endpoint=%s",
            opts.tun,
            ",".join(str(a) for a in plan.addresses),
            opts.queues,
            opts.workers,
            self._endpoint,
        )
        self.ready.set()

    def _load_dialer(self) -> Any:
        spec = self.options.dialer
        if not isinstance(spec, (str, tuple)):
            return spec
        from tunio.dialers import load_dialer  # noqa: PLC0415 - user code may be slow to import

        return load_dialer(
            spec,
            egress_mark=self.options.egress_mark,
            egress_interface=self.options.egress_interface,
        )

    def _default_interface(self) -> str | None:
        try:
            return tundev.default_route_interface()
        except TunError as exc:
            log.debug("no default route interface: %s", describe(exc))
            return None

    def _open_tun(self, name: str, queues: int, offload: bool) -> list[int]:
        from tunio.stack import open_tun  # noqa: PLC0415

        try:
            return list(open_tun(name, queues, offload=offload))
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.EACCES):
                raise TunError(
                    exc.errno,
                    f"cannot open TUN device {name}: needs CAP_NET_ADMIN: run as root or grant "
                    "the capability",
                ) from exc
            if exc.errno in (errno.EBUSY, errno.EINVAL):
                raise TunError(
                    exc.errno,
                    f"cannot attach {queues} queue(s) to TUN device {name} ({describe(exc)}): an "
                    "existing device must be a multi-queue TUN device that no other program "
                    f"holds; delete it (ip link del {name}) or pick another --tun",
                ) from exc
            raise

    def _close_tun(self, existed: bool) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        # A device we created goes with its last fd unless something made it persistent.
        if not existed and tundev.link_exists(self.options.tun, self._sys_net):
            self._undo("device", tundev.delete_link, self.options.tun)

    def _warn_egress(self, plan: Plan, uplink: str | None) -> None:
        opts = self.options
        if plan.routes and uplink is not None and uplink != opts.tun:
            line = tundev.rp_filter_warning(uplink, opts.tun, self._proc)
            if line is not None:
                log.warning("%s", line)
        direct = opts.dialer == "direct" or type(self._dialer).__name__ == "DirectDialer"
        if (
            "default" in plan.routes
            and direct
            and opts.egress_mark is None
            and opts.egress_interface is None
        ):
            log.warning(
                "--route default with the direct dialer and neither --egress-mark nor "
                "--egress-interface: the workers' own connections will be routed into %s and "
                "loop",
                opts.tun,
            )

    # ---- children

    def _inherited_fds(self) -> tuple[int, ...]:
        return (self._wake_r, self._wake_w)

    def _spawn_stack(self) -> None:
        child = self._stack
        child.process = self._ctx.Process(
            target=stack_entry,
            args=(self._stack_config, self._status, self._inherited_fds()),
            name="tunio-stack",
        )
        self._launch(child)

    def _spawn_worker(self, child: _Child) -> None:
        index = child.name.rsplit("-", 1)[1]
        child.process = self._ctx.Process(
            target=worker_entry,
            kwargs={
                "endpoint": self._endpoint,
                "dialer": self._dialer,
                "name": child.name,
                "window": self.options.window,
                "connect_timeout": self.options.connect_timeout,
                "keys": self._keys.worker if self._keys else None,
                "status": self._status,
                # Workers have no use for the TUN queues: they must not keep the device alive.
                "close_fds": (*self._inherited_fds(), *self._fds),
            },
            name=f"tunio-worker-{index}",
        )
        self._launch(child)

    def _launch(self, child: _Child) -> None:
        child.ready = False
        child.restart_at = None
        child.started = time.monotonic()
        child.process.start()
        log.debug("started %s (pid %d)", child.name, child.process.pid)

    def _children(self) -> list[_Child]:
        return [self._stack, *self._workers]

    def _wait(self, timeout: float | None) -> None:
        """Sleep until a signal/stop(), a status message, a child's exit or the timeout."""
        from multiprocess.connection import wait  # noqa: PLC0415

        handles = [self._wake_r, self._status._reader]  # the queue's pipe: readable = a message
        handles += [c.process.sentinel for c in self._children() if c.process is not None]
        wait(handles, timeout)
        self._drain_wake()
        self._drain_status()

    def _drain_status(self) -> None:
        while self._status._reader.poll():
            message = self._status.get(timeout=1.0)
            kind, value = message[0], message[1]
            if kind == "stack-ready":
                self._stack.ready = True
                if self.ready.is_set():
                    log.info("stack restarted (pid %s)", value)
                    self._rejoin_workers()
            elif kind == "stack-error":
                self._stack_error = str(value)
                log.error("stack: %s", value)
            elif kind == "worker-ready":
                for child in self._workers:
                    if child.name == value and not child.ready:
                        child.ready = True
                        if self.ready.is_set():
                            pid = child.process.pid if child.process is not None else "?"
                            log.info("%s restarted (pid %s)", child.name, pid)
            else:
                log.warning("unexpected status message %r", message)

    def _rejoin_workers(self) -> None:
        """A new stack does not know the running workers: they would only say HELLO again once
        its silence has lasted three heartbeats, and new flows are refused until then. Restart
        them now; supervision brings them back at once."""
        running = [c for c in self._workers if c.process is not None and c.process.exitcode is None]
        if running:
            log.info("restarting %d worker(s) so they join the new stack", len(running))
        for child in running:
            child.process.terminate()

    def _await_ready(self, children: list[_Child], what: str) -> None:
        end = time.monotonic() + self._startup_deadline
        while not all(child.ready for child in children):
            remaining = end - time.monotonic()
            if remaining <= 0:
                late = ", ".join(c.name for c in children if not c.ready)
                raise TunioError(
                    f"{what} did not start within {self._startup_deadline:g} s ({late} not ready)"
                )
            self._wait(remaining)
            self._check_stop()
            if self._stack_error is not None:
                raise TunioError(f"the stack did not start: {self._stack_error}")
            for child in children:
                if not child.ready and child.process.exitcode is not None:
                    raise TunioError(
                        f"{child.name} exited with {_exit_text(child.process.exitcode)} "
                        "before it was ready"
                    )

    # ---- supervision

    def _supervise(self) -> None:
        while self._stop_reason is None:
            due = [c.restart_at for c in self._children() if c.restart_at is not None]
            timeout = max(0.0, min(due) - time.monotonic()) if due else None
            self._wait(timeout)
            if self._stop_reason is not None:
                return
            now = time.monotonic()
            for child in self._children():
                if child.process is not None and child.process.exitcode is not None:
                    self._reap(child, now)
                if child.restart_at is not None and child.restart_at <= now:
                    if child is self._stack:
                        self._stack_error = None
                        if self._socket is not None:  # a killed stack leaves its socket file
                            with contextlib.suppress(FileNotFoundError):
                                self._socket.unlink()
                        self._spawn_stack()
                    else:
                        self._spawn_worker(child)

    def _reap(self, child: _Child, now: float) -> None:
        lifetime = now - child.started
        code = child.process.exitcode
        child.process.close()
        child.process = None
        child.ready = False
        child.backoff = next_backoff(child.backoff, lifetime)
        child.restart_at = now + child.backoff
        lost = " (its flows are lost: their segments now get a RST)" if child is self._stack else ""
        log.warning(
            "%s exited with %s after %.1f s%s; restarting in %.1f s",
            child.name,
            _exit_text(code),
            lifetime,
            lost,
            child.backoff,
        )

    # ---- shutdown

    def _stop_children(self) -> None:
        """SIGTERM the stack (its BYE stops the workers), then make sure everyone is gone."""
        stack = self._stack.process
        if stack is not None and stack.exitcode is None:
            stack.terminate()
        end = time.monotonic() + self._stop_deadline
        workers = [c.process for c in self._workers if c.process is not None]
        for process in workers:
            process.join(max(0.0, end - time.monotonic()))
        stuck = [p for p in workers if p.exitcode is None]
        for process in stuck:  # the BYE did not reach them: ask them directly
            process.terminate()
        for process in stuck:
            process.join(max(0.0, min(1.0, self._stop_deadline)))
        if stack is not None:
            stack.join(max(0.0, end - time.monotonic()))
        for process in [*workers, *([stack] if stack is not None else [])]:
            if process.exitcode is None:
                log.warning("%s did not stop: killing it", process.name)
                process.kill()
                process.join()
            process.close()
        for child in self._children():
            child.process = None

    def _undo(self, what: str, action: Callable[..., object], *args: object) -> None:
        """One step of the teardown: a failure is logged and the other steps still run."""
        try:
            action(*args)
        except (TunioError, OSError) as exc:
            log.warning("could not remove the %s: %s", what, describe(exc))
