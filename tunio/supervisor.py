"""tunio-run's supervisor: set up the TUN device, start the stack and the workers, restart what
dies, and undo everything it set up when it stops.

What the options are and how they are checked is tunio.config; the children's entry points are
tunio.children; process housekeeping is tunio.process. This module only supervises.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from tunio import bypass, defaults, devicelock, netplan, sdnotify, tundev
from tunio.children import StatusChannel, stack_entry, worker_entry
from tunio.config import Options, Plan, explain, validate
from tunio.errors import ConfigError, TunError, TunioError, describe
from tunio.netplan import Change
from tunio.process import raise_fd_limit
from tunio.runtime import RuntimeDir

if TYPE_CHECKING:
    from tunio.dialers import Dialer
    from tunio.keys import StackKeys
    from tunio.metrics import MetricsServer
    from tunio.policy import Policy
    from tunio.stack import StackConfig

__all__ = ["Supervisor", "next_backoff"]

log = logging.getLogger("tunio.supervisor")

STARTUP_DEADLINE = 10.0  # seconds for the stack, then for all workers, to say they are ready
STOP_DEADLINE = 5.0  # seconds for children to exit after being asked, before SIGKILL
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 10.0
STABLE_AFTER = 5.0  # a child that lived this long is restarted at once


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


@dataclass
class _Child:
    name: str  # "stack" or "worker-<i>"
    process: Any = None  # a multiprocess Process while one runs
    started: float = 0.0
    ready: bool = False
    backoff: float = 0.0
    restart_at: float | None = None
    status: StatusChannel | None = None  # while a process runs


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"code {code}"


class _Stopped(Exception):
    """A stop was asked for while starting up."""


# ---------------------------------------------------------------- the supervisor


def _dns_fields(plan: Plan) -> dict[str, Any]:
    """StackConfig's DNS fields for the plan's --dns."""
    dns = plan.dns
    if dns is None:
        return {}
    return {"dns_mode": dns.mode, "dns_pools": dns.pools, "dns_addresses": dns.addresses,
            "dns_upstream": dns.upstream, "dns_ttl": dns.ttl, "dns_hold": dns.hold}  # fmt: skip


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
        lock_dir: Path | None = None,
    ) -> None:
        self.options = options
        self.ready = threading.Event()
        # the latest counters of each child ("stack", "worker-0", ...), as they report them
        self.stats: dict[str, dict[str, Any]] = {}
        self.restarts: dict[str, int] = {}  # how often each child was started again
        self._startup_deadline = startup_deadline
        self._stop_deadline = stop_deadline
        self._proc = proc
        self._sys_net = sys_net
        self._tun_path = tun_path
        self._lock_dir = lock_dir if lock_dir is not None else devicelock.default_directory()
        # held while we run; every child closes them
        self._locks: list[devicelock.DeviceLock | RuntimeDir] = []
        self._metrics: MetricsServer | None = None
        self._pid = os.getpid()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wake_lock = threading.Lock()
        self._stop_reason: str | None = None
        self._ctx: Any = None
        self._stack = _Child("stack")
        self._workers: list[_Child] = []
        self._fds: list[int] = []
        self._nat_region = -1  # the memfd holding the NAT tables, for every stack of the run
        self._stack_config: StackConfig | None = None
        self._dialer: Any = None
        self._policy: Policy | None = None
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
                    log.error("%s", explain(exc, self.options))
                    return 2
                except (TunioError, OSError) as exc:
                    log.error("%s", describe(exc))
                    return 1
                self._supervise()
                log.info("stopping (%s)", self._stop_reason)
                sdnotify.notify("STOPPING=1", f"STATUS=stopping ({self._stop_reason})")
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

    def plan_changes(self) -> list[Change]:
        """What a run would change on this host, in order, changing nothing (--dry-run)."""
        plan = validate(self.options, self._sys_net)
        existed, held = self._device_state(plan)
        return self._changes(plan, existed, held)

    def _device_state(self, plan: Plan) -> tuple[bool, list[bool]]:
        """Whether the device exists (and is one we can use), and which addresses it holds."""
        opts = self.options
        tundev.check_tun_device(self._tun_path)
        existed = tundev.link_exists(opts.tun, self._sys_net)
        if existed:
            tundev.check_existing_link(opts.tun, self._sys_net)
        held = [tundev.check_address_free(opts.tun, address) for address in plan.addresses]
        return existed, held

    def _changes(self, plan: Plan, existed: bool, held: list[bool]) -> list[Change]:
        """Every change of the run, computed from what the host has before any is made."""
        opts = self.options
        changes = netplan.device_changes(opts, plan, existed, held)
        changes += netplan.exclude_changes(opts.tun, plan.excludes)
        if opts.auto_bypass:
            changes += bypass.plan(opts.tun, self._egress_mark() or bypass.MARK, self._proc)
        changes += netplan.route_changes(opts.tun, plan.routes)
        return changes

    def _egress_mark(self) -> int | None:
        """The workers' mark: the one given, or the bypass's own."""
        if self.options.egress_mark is None and self.options.auto_bypass:
            return bypass.MARK
        return self.options.egress_mark

    def _apply(self, changes: list[Change], journal: netplan.Journal,
               undo: contextlib.ExitStack) -> None:  # fmt: skip
        """Makes each change (the device's own was made by opening its queues), notes it in the
        journal, and registers its undo: at exit they are taken back in reverse order."""
        for change in changes:
            if change.do:
                tundev.run(*change.do)
            journal.add(change)
            if change.do and change.undo:
                undo.callback(self._undo, change.what, tundev.run, *change.undo)
            log.debug("made: %s", change.what)

    def _start(self, undo: contextlib.ExitStack) -> None:
        opts = self.options
        plan = validate(opts, self._sys_net)
        self._dialer = self._load_dialer()
        self._policy = self._load_policy()
        device = devicelock.DeviceLock(self._lock_dir, opts.tun)
        undo.callback(self._undo, "device lock", device.release)
        device.acquire()
        rundir = RuntimeDir(plan.runtime_dir, opts.tun)
        undo.callback(self._undo, "runtime directory", rundir.release)
        rundir.acquire()
        self._locks = [device, rundir]
        if opts.metrics is not None:
            self._serve_metrics(opts.metrics, undo)
        self._endpoint = plan.endpoint or rundir.endpoint
        if self._endpoint.startswith("tcp://"):
            self._keys = self._load_keys(plan, undo)
        self._socket = rundir.socket_path if plan.endpoint is None else None

        existed, held = self._device_state(plan)
        uplink = opts.egress_interface or self._default_interface()
        changes = self._changes(plan, existed, held)
        journal = netplan.Journal(plan.runtime_dir)
        undo.callback(journal.remove)  # after every change is taken back
        self._check_stop()

        from tunio.stack import open_tun  # noqa: PLC0415 - the cffi extension is heavy

        self._fds = open_tun(opts.tun, opts.queues, offload=opts.offload)
        undo.callback(self._close_tun, existed)
        self._apply(changes, journal, undo)
        self._warn_egress(plan, uplink)
        self._check_stop()

        import multiprocess  # noqa: PLC0415 - import cost only for a real run

        self._ctx = multiprocess.get_context("fork")
        undo.callback(self._stop_children)
        from tunio.stack import StackConfig, create_nat_region  # noqa: PLC0415 - heavy

        config = StackConfig(
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
            max_flows=opts.max_flows,
            max_pending=opts.max_pending,
            log_json=opts.log_format == "json",
            **_dns_fields(plan),
        )
        # The NAT tables live in memory of ours, so that a stack that dies leaves them to the
        # next one: it adopts the old flows and their apps get a RST, not a hang (the TUN queues
        # stay open here meanwhile, holding what the dying stack's sockets sent).
        self._nat_region = create_nat_region(config)
        undo.callback(self._close_nat_region)
        self._stack_config = dataclasses.replace(config, nat_region_fd=self._nat_region)
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
        sdnotify.notify("READY=1", f"STATUS=forwarding on {opts.tun}", f"MAINPID={os.getpid()}")

    def _serve_metrics(self, where: str, undo: contextlib.ExitStack) -> None:
        """The Prometheus endpoint, from the children's latest reports."""
        from tunio import metrics  # noqa: PLC0415 - only a run with --metrics needs it
        from tunio.config import parse_host_port  # noqa: PLC0415

        host, port = parse_host_port(where, "--metrics")

        def page() -> str:
            drops = metrics.tun_drops(self._sys_net, self.options.tun)
            return metrics.render(dict(self.stats), dict(self.restarts), drops)

        try:
            server = metrics.MetricsServer(host, port, page)
        except OSError as exc:
            raise TunioError(f"--metrics {where}: {exc.strerror}") from exc
        self._metrics = server
        undo.callback(server.stop)
        server.start()
        log.info("metrics on http://%s/metrics", where)

    def _load_keys(self, plan: Plan, undo: contextlib.ExitStack) -> StackKeys:
        """Workers on other hosts: CURVE, and only workers holding our worker key get in. Keys
        of --keys are the user's; without it a pair is made for this run only, in the runtime
        directory, and removed at exit (a pair a killed run left there is replaced)."""
        from tunio.keys import key_files, load_or_create  # noqa: PLC0415

        if self.options.keys:
            path = Path(self.options.keys)
        else:
            path = plan.runtime_dir / "keys"
            for stale in key_files(path):
                stale.unlink(missing_ok=True)
            for made in key_files(path):
                undo.callback(made.unlink, missing_ok=True)
        keys = load_or_create(path)
        log.info("workers on other hosts need %s.worker (tunio-worker --keys)", path)
        return keys

    def _load_dialer(self) -> Any:
        spec = self.options.dialer
        if not isinstance(spec, (str, tuple)):
            return spec
        from tunio.dialers import load_dialer  # noqa: PLC0415 - user code may be slow to import

        return load_dialer(
            spec,
            egress_mark=self._egress_mark(),
            egress_interface=self.options.egress_interface,
            resolver=self._resolver(),
        )

    def _resolver(self) -> Any:
        """The direct dialers' resolver of names (fake-IP flows): --dns-upstream, asked from
        sockets with the egress mark and interface; None (the host's first nameserver) without
        --dns."""
        plan = validate(self.options, self._sys_net)
        if plan.dns is None:
            return None
        from tunio.dialers.resolve import Resolver  # noqa: PLC0415

        host, port = plan.dns.upstream
        return Resolver(str(host), port, mark=self._egress_mark(),
                        interface=self.options.egress_interface)  # fmt: skip

    def _load_policy(self) -> Policy | None:
        """The per-flow policy of the workers: --policy's, or the rules' (their dialers loaded
        here once, so a bad spec is an error now, not in each worker)."""
        opts = self.options
        from tunio import policy as policies  # noqa: PLC0415 - user code may be slow to import

        if isinstance(opts.policy, str):
            return policies.load_policy(opts.policy)
        if opts.policy is not None:
            return policies.as_policy(opts.policy)
        if not opts.rules:
            return None
        from tunio.dialers import DirectDialer, load_dialer  # noqa: PLC0415
        from tunio.rules import RuleTable  # noqa: PLC0415

        mark, interface = self._egress_mark(), opts.egress_interface
        named: dict[str, Dialer] = {
            "default": self._dialer,
            "direct": DirectDialer(mark=mark, interface=interface, resolver=self._resolver()),
        }
        for name, spec in opts.dialers.items():
            made = spec if not isinstance(spec, (str, tuple)) else load_dialer(
                spec, egress_mark=mark, egress_interface=interface, resolver=self._resolver()
            )  # fmt: skip
            named[name] = made
        return RuleTable(opts.rules, named)

    def _default_interface(self) -> str | None:
        try:
            return tundev.default_route_interface()
        except TunError as exc:
            log.debug("no default route interface: %s", describe(exc))
            return None

    def _close_nat_region(self) -> None:
        fd, self._nat_region = self._nat_region, -1
        if fd >= 0:
            os.close(fd)

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
        if opts.auto_bypass:
            return  # the bypass made the workers' way out, reverse path included
        if plan.routes and uplink is not None and uplink != opts.tun:
            line = tundev.rp_filter_warning(uplink, opts.tun, self._proc)
            if line is not None:
                log.warning("%s", line)
        from tunio.dialers import DirectDialer  # noqa: PLC0415 - dialers load with user code

        direct = isinstance(self._dialer, DirectDialer)
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
        """What a child must close: our wake-up pipe and our locks (a child that kept a lock
        would hold the device after tunio-run is gone)."""
        held = [lock.fileno() for lock in self._locks]
        if self._metrics is not None:
            held.append(self._metrics.fileno())  # a child must not keep our port open
        return (self._wake_r, self._wake_w, *(fd for fd in held if fd is not None))

    def _spawn_stack(self) -> None:
        child = self._stack
        child.status = StatusChannel(self._ctx)
        child.process = self._ctx.Process(
            target=stack_entry,
            args=(self._stack_config, child.status, self._inherited_fds(), self._pid),
            name="tunio-stack",
        )
        self._launch(child)

    def _spawn_worker(self, child: _Child) -> None:
        index = child.name.rsplit("-", 1)[1]
        child.status = StatusChannel(self._ctx)
        child.process = self._ctx.Process(
            target=worker_entry,
            kwargs={
                "endpoint": self._endpoint,
                "dialer": self._dialer,
                "name": child.name,
                "window": self.options.window,
                "connect_timeout": self.options.connect_timeout,
                "keys": self._keys.worker if self._keys else None,
                "status": child.status,
                # Workers have no use for the TUN queues (they must not keep the device alive)
                # nor for the NAT region.
                "close_fds": (*self._inherited_fds(), *self._fds, self._nat_region),
                "parent": self._pid,
                "policy": self._policy,
            },
            name=f"tunio-worker-{index}",
        )
        self._launch(child)

    def _launch(self, child: _Child) -> None:
        child.ready = False
        child.restart_at = None
        child.started = time.monotonic()
        child.process.start()
        assert child.status is not None
        child.status.started()
        log.debug("started %s (pid %d)", child.name, child.process.pid)

    def _children(self) -> list[_Child]:
        return [self._stack, *self._workers]

    def _wait(self, timeout: float | None) -> None:
        """Sleep until a signal/stop(), a status message, a child's exit or the timeout."""
        from multiprocess.connection import wait  # noqa: PLC0415

        handles: list[Any] = [self._wake_r]
        for child in self._children():
            if child.status is not None:
                handles.append(child.status.reader)
            if child.process is not None:
                handles.append(child.process.sentinel)
        wait(handles, timeout)
        self._drain_wake()
        for child in self._children():
            if child.status is not None:
                for message in child.status.received():
                    self._on_status(child, message)

    def _on_status(self, child: _Child, message: tuple[str, Any]) -> None:
        """A message on `child`'s status channel: it is ready, or it could not start."""
        kind, value = message[0], message[1]
        if kind == "stats":
            self.stats[child.name] = value  # the latest counters, for the metrics
            return
        if kind == "stack-error" and child is self._stack:
            self._stack_error = str(value)
            log.error("stack: %s", value)
        elif kind not in ("stack-ready", "worker-ready"):
            log.warning("unexpected status message %r from %s", message, child.name)
        elif not child.ready:
            child.ready = True
            if not self.ready.is_set():
                return
            pid = child.process.pid if child.process is not None else "?"
            log.info("%s restarted (pid %s)", child.name, pid)
            if child is self._stack:
                self._rejoin_workers()

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
        self._close_status(child)
        child.process.close()
        child.process = None
        child.ready = False
        child.backoff = next_backoff(child.backoff, lifetime)
        child.restart_at = now + child.backoff
        self.restarts[child.name] = self.restarts.get(child.name, 0) + 1
        self.stats.pop(child.name, None)  # its counters start again with its next process
        lost = ""
        if child is self._stack:
            lost = " (the next one takes its flows over: their apps get a RST)"
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
            self._close_status(child)

    def _close_status(self, child: _Child) -> None:
        """Reads what `child` said last (an error it exited with), then closes its channel."""
        if child.status is not None:
            for message in child.status.received():
                if message[0] == "stack-error":  # a readiness that came too late means nothing
                    self._on_status(child, message)
            child.status.close()
            child.status = None

    def _undo(self, what: str, action: Callable[..., object], *args: object) -> None:
        """One step of the teardown: a failure is logged and the other steps still run."""
        try:
            action(*args)
        except (TunioError, OSError) as exc:
            log.warning("could not remove the %s: %s", what, describe(exc))
