"""tunio-run's supervisor: start the stack and the workers, restart what dies, reload, and
stop everything when asked.

What the options are and how they are checked is tunio.config; what a run sets up on the host
(and takes back) is tunio.host; the dialer and policy of the workers are tunio.wayout; the
children's entry points are tunio.children; process housekeeping is tunio.process; what a
reload may change is tunio.reload. This module only supervises.
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

from tunio import defaults, sdnotify, tundev, wayout
from tunio.children import StatusChannel, stack_entry, worker_entry
from tunio.config import Options, explain, parse_keepalive, pending_limit, validate
from tunio.errors import ConfigError, TunioError, describe
from tunio.host import Host
from tunio.netplan import Change
from tunio.process import raise_fd_limit

if TYPE_CHECKING:
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
#: seconds between two lines about one child's crash loop (its backoff at BACKOFF_MAX)
CRASH_LOOP_REPEAT = 60.0


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
    generation: int = 1  # workers: which reload made it (1: the start)
    retiring: bool = False  # workers: an older generation's, finishing its flows; not restarted
    drain_by: float | None = None  # retiring: its flows are reset if they last past this
    kill_at: float | None = None  # retiring and sent SIGTERM: killed if it still runs then
    rejoining: bool = False  # ended by us for a new stack: restarted at once, no backoff
    loop_said: float | None = None  # in a crash loop: when a line last said so
    starts: int = 0  # processes started under this name
    loop_exits: int = 0  # exits since that line
    # The last sign of life of its process (None: not watched, before it is ready, see _hung):
    # its being ready, a worker's report (its loop sends one a second), the stack's report that
    # its loop's ticks moved.
    alive_at: float | None = None
    ticks: int | None = None  # the stack's loop ticks at its last report


def _generations_drain(children: list[_Child]) -> str:
    """'generation 1 drains', 'generations 1, 2 drain' ('no generation drains': none runs)."""
    gens = sorted({c.generation for c in children})
    if not gens:
        return "no generation drains"
    if len(gens) == 1:
        return f"generation {gens[0]} drains"
    return f"generations {', '.join(map(str, gens))} drain"


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"code {code}"


class _Stopped(Exception):
    """A stop was asked for while starting up."""


# ---------------------------------------------------------------- the supervisor


class Supervisor:
    """Runs tunio: `Supervisor(options).run()` blocks and returns the exit code (once: a
    later run takes a new Supervisor).

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
        reload: Callable[[], Options] | None = None,
        exiting: bool = False,
    ) -> None:
        """`reload`, if given, makes the options a reload (SIGHUP) puts in force: the CLI's
        reads its configuration file and flags again. Without it, `reload_with(options)`.
        `exiting`: the process ends when run() returns (tunio-run), so the signals stay ignored
        after the stop instead of getting their previous handlers back."""
        if not isinstance(options, Options):  # tunio.run({...}) is an easy mistake to make
            raise ConfigError(f"Supervisor takes a tunio.Options, not a {type(options).__name__}: "
                              "tunio.Options(tun=..., address=..., routes=(...))")  # fmt: skip
        self.options = options
        self.ready = threading.Event()
        # the latest counters of each child ("stack", "worker-0", ...), as they report them
        self.stats: dict[str, dict[str, Any]] = {}
        self.restarts: dict[str, int] = {}  # how often each child was started again
        self._startup_deadline = startup_deadline
        self._stop_deadline = stop_deadline
        self._sys_net = sys_net
        # what the run sets up on the host (device, routes, locks, runtime directory)
        self._host = Host(options, proc=proc, sys_net=sys_net, tun_path=tun_path,
                          lock_dir=lock_dir)  # fmt: skip
        self._metrics: MetricsServer | None = None
        self._pid = os.getpid()
        # the wake-up pipe, made by run(): a Supervisor made only to plan (--dry-run), or never
        # run, holds no descriptor
        self._wake_r = self._wake_w = -1
        # Reentrant: _wake runs in signal handlers too, which interrupt the main thread, which may
        # hold the lock itself at that moment (a plain Lock would deadlock there).
        self._wake_lock = threading.RLock()
        self._stop_reason: str | None = None
        self._reloader = reload
        self._exiting = exiting
        self._reload_pending: Options | bool = False  # True: ask the reloader
        self._signalled = False  # a signal handler wrote its wake-up byte, not yet read
        self._generation = 1
        self._retiring: list[_Child] = []  # older generations' workers, draining
        self._draining_next: list[_Child] = []  # to drain once the new generation is ready
        self._late_at: float | None = None  # a new generation not up by then is reported
        self._ctx: Any = None
        self._stack = _Child("stack")
        self._workers: list[_Child] = []
        self._nat_region = -1  # the memfd holding the NAT tables, for every stack of the run
        self._stack_config: StackConfig | None = None
        self._dialer: Any = None
        self._policy: Policy | None = None
        self._stack_error: str | None = None
        self._failure: str | None = None  # why the run ends in failure (exit status 1)
        self._ran = False  # run() was called: a Supervisor runs once

    # ---- public

    def stop(self, reason: str = "stop requested") -> None:
        """Ask run() to stop everything and return; safe from any thread and signal handlers."""
        if self._stop_reason is None:
            self._stop_reason = reason
        self._wake()

    def _wake(self) -> None:
        with self._wake_lock:
            if self._wake_w >= 0:
                with contextlib.suppress(OSError):  # full (it wakes all the same), or closing
                    os.write(self._wake_w, b"\0")

    def reload(self) -> None:
        """Reread the configuration (as SIGHUP does); safe from any thread and signal handlers."""
        if self._reload_pending is False:
            self._reload_pending = True
        self._wake()

    def reload_with(self, options: Options) -> None:
        """Put `options` in force as a reload does: the live settings change for new flows,
        anything else refuses the whole reload. Safe from any thread."""
        if not isinstance(options, Options):  # it would be taken as "read the file again"
            raise ConfigError(f"reload_with takes a tunio.Options, not a "
                              f"{type(options).__name__}")  # fmt: skip
        self._reload_pending = options
        self._wake()

    def run(self) -> int:
        """Start, supervise until stopped, undo everything; 0, or 2 (config) / 1 (runtime).

        Once per Supervisor: a run's stop request and the state of its children stay with it
        when it ends, so a second run would stop at once."""
        if self._ran:
            raise TunioError("Supervisor.run() was called again: a Supervisor runs once; make a "
                             "new Supervisor(options) for another run")  # fmt: skip
        self._ran = True
        with self._wake_lock:
            self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
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
            return 1 if self._failure is not None else 0
        finally:
            with self._wake_lock:  # no _wake writes to a descriptor after it is closed
                wake_r, wake_w = self._wake_r, self._wake_w
                self._wake_r = self._wake_w = -1
                os.close(wake_r)
                os.close(wake_w)

    # ---- signals

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # a library caller in another thread stops us with stop()
            return
        signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in signals}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                # A service manager may ask twice (systemd's stop, then a user's kill): once
                # everything is undone, a second SIGTERM during the interpreter's exit must not
                # turn the clean exit into death by signal (-15 instead of 0).
                signal.signal(sig, signal.SIG_IGN if self._exiting else handler)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if os.getpid() != self._pid:
            # A child between fork and its own set-up: die as the default action would.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        # A storm of signals nests handlers (each one interrupts the one before at its next
        # bytecode), so this one only notes the signal and writes one wake-up byte: no lock, no
        # call that could nest deep enough to overflow the stack.
        if signum == signal.SIGHUP:
            if self._reload_pending is False:
                self._reload_pending = True
        elif self._stop_reason is None:
            self._stop_reason = f"received {signal.Signals(signum).name}"
        if not self._signalled:
            self._signalled = True
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"\0")

    def _check_stop(self) -> None:
        if self._stop_reason is not None:
            raise _Stopped

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 512):
                pass
        # after the read, which may have taken a byte a handler wrote while it ran: the next
        # signal writes again (one that lands between the two leaves a byte: a spare wake-up)
        self._signalled = False

    # ---- start-up

    def plan_changes(self) -> list[Change]:
        """What a run would change on this host, in order, changing nothing (--dry-run)."""
        return self._host.plan_changes()

    def _start(self, undo: contextlib.ExitStack) -> None:
        opts = self.options
        plan = validate(opts, self._sys_net)
        self._dialer = wayout.load_dialer(opts)
        self._policy = wayout.load_policy(opts, self._dialer)
        host = self._host
        host.set_up(plan, undo, self._check_stop)
        if opts.metrics is not None:
            self._serve_metrics(opts.metrics, undo)
        host.warn_egress(plan, self._dialer)
        if not plan.routes:  # Options' default: a run that would forward nothing, unsaid
            log.warning("no --route: nothing is routed into %s, so only what the host itself "
                        "routes there is forwarded (give routes, e.g. routes=(\"default\",))",
                        opts.tun)  # fmt: skip

        import multiprocess  # noqa: PLC0415 - import cost only for a real run

        self._ctx = multiprocess.get_context("fork")
        undo.callback(self._stop_children)
        from tunio.stack import StackConfig, create_nat_region  # noqa: PLC0415 - heavy

        keys = host.keys
        config = StackConfig(
            tun_fds=tuple(host.fds),
            addresses=plan.addresses,
            endpoint=host.endpoint,
            window=opts.window,
            worker_backlog=opts.worker_backlog,
            # A held SYN must outlive the worker's own connect timeout.
            pending_timeout=max(defaults.PENDING_TIMEOUT, opts.connect_timeout + 5.0),
            log_level=opts.log_level,
            udp_timeout=opts.udp_timeout,
            keepalive=parse_keepalive(opts.tcp_keepalive),
            offload=opts.offload,
            curve_secret=keys.secret if keys else None,
            curve_clients=(keys.worker.public,) if keys else (),
            max_flows=opts.max_flows,
            max_pending=pending_limit(opts),
            log_json=opts.log_format == "json",
            **(plan.dns.stack_fields() if plan.dns is not None else {}),
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
            host.endpoint,
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

    def _close_nat_region(self) -> None:
        fd, self._nat_region = self._nat_region, -1
        if fd >= 0:
            os.close(fd)

    # ---- children

    def _inherited_fds(self) -> tuple[int, ...]:
        """What a child must close: our wake-up pipe and our locks (a child that kept a lock
        would hold the device after tunio-run is gone)."""
        held = [lock.fileno() for lock in self._host.locks]
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
        assert self._stack_config is not None  # (set up before any child starts)
        child.status = StatusChannel(self._ctx)
        child.process = self._ctx.Process(
            target=worker_entry,
            kwargs={
                "endpoint": self._host.endpoint,
                "dialer": self._dialer,
                "name": child.name,
                "window": self.options.window,
                "connect_timeout": self.options.connect_timeout,
                "keepalive": self._stack_config.keepalive,  # parsed once, the stack's own
                "keys": self._host.keys.worker if self._host.keys else None,
                "status": child.status,
                # Workers have no use for the TUN queues (they must not keep the device alive)
                # nor for the NAT region.
                "close_fds": (*self._inherited_fds(), *self._host.fds, self._nat_region),
                "parent": self._pid,
                "policy": self._policy,
                "egress": wayout.run_egress(self.options),
            },
            name=f"tunio-{child.name}",
        )
        self._launch(child)

    def _launch(self, child: _Child) -> None:
        child.ready = False
        child.restart_at = None
        child.alive_at = child.ticks = None
        child.started = time.monotonic()
        child.starts += 1
        child.process.start()
        assert child.status is not None
        child.status.started()
        log.debug("started %s (pid %d)", child.name, child.process.pid)

    def _children(self) -> list[_Child]:
        # the generation that waits for the next one to be up still serves, and is watched
        return [self._stack, *self._workers, *self._draining_next, *self._retiring]

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
            stack = child is self._stack and isinstance(value, dict)
            ticks = value.get("loop_ticks") if stack else None
            if child is not self._stack or ticks != child.ticks:
                child.alive_at, child.ticks = time.monotonic(), ticks
            return
        if kind == "stack-error" and child is self._stack:
            self._stack_error = str(value)
            log.error("stack: %s", value)
        elif kind == "tun-gone" and child is self._stack:
            self._host.device_lost = True
        elif kind not in ("stack-ready", "worker-ready"):
            log.warning("unexpected status message %r from %s", message, child.name)
        elif not child.ready:
            child.ready = True
            child.alive_at = time.monotonic()  # watched from now on (see _hung)
            if not self.ready.is_set():
                return
            pid = child.process.pid if child.process is not None else "?"
            if child in self._draining_next:  # a superseded generation's, late
                log.info("%s of generation %d started (pid %s); it drains once generation %d "
                         "is up", child.name, child.generation, pid, self._generation)  # fmt: skip
                return
            if child.generation == self._generation and self._draining_next:
                log.info("%s of generation %d started (pid %s)", child.name, child.generation, pid)
                self._drain_old_generation()
                return
            if child is not self._stack and child.starts == 1:
                # a new generation's first process, with nothing left to drain (after 0 workers)
                log.info("%s of generation %d started (pid %s)", child.name, child.generation, pid)
                return
            # (in a crash loop the loop's own line a minute says it: no line a start)
            level = logging.DEBUG if child.loop_said is not None else logging.INFO
            log.log(level, "%s restarted (pid %s)", child.name, pid)
            if child is self._stack:
                self._rejoin_workers()

    # ---- reload

    def _reload(self) -> None:
        """Reread the configuration: live changes start a new generation of workers, which
        takes every new flow once it is up, while the old one finishes its flows; anything else
        refuses the reload, in one line, and the settings in force stay."""
        pending, self._reload_pending = self._reload_pending, False
        sdnotify.notify("RELOADING=1", "STATUS=reloading")
        try:
            new = self._reloaded(pending)
            if new is not None:
                self._start_generation(new)
        finally:
            sdnotify.notify("READY=1", f"STATUS=forwarding on {self.options.tun}")

    def _reloaded(self, pending: Options | bool) -> Options | None:
        """The options to put in force, or None (refused, or nothing changed)."""
        from tunio import reload  # noqa: PLC0415

        old = self.options
        try:
            if isinstance(pending, Options):
                new = pending
            else:
                new = self._reloader() if self._reloader is not None else old
        except (ConfigError, TunioError, OSError) as exc:  # the file: unreadable, a bad key
            log.error("reload refused: %s; the settings in force stay", describe(exc))
            return None
        try:
            validate(new, self._sys_net)
        except ConfigError as exc:  # a bad value: named at its line
            log.error("reload refused: %s; the settings in force stay", explain(exc, new))
            return None
        changes = reload.compare(old, new)
        if changes.fixed:
            log.error("reload refused: %s cannot change while tunio-run runs (restart it); the "
                      "settings in force stay", changes.describe_fixed(old, new))  # fmt: skip
            return None
        if not changes.live:
            log.info("reload: nothing to change")
            return None
        return new  # (what changed is said once its dialer and policy are made)

    def _start_generation(self, new: Options) -> None:
        """Workers of a new generation with `new`'s dialer and policy; the running ones drain
        once all the new ones are up (until then they still take new flows: none is refused)."""
        previous = (self.options, self._dialer, self._policy)
        self.options = new
        try:
            self._dialer = wayout.load_dialer(new)
            self._policy = wayout.load_policy(new, self._dialer)
        except (ConfigError, TunioError, OSError) as exc:
            self.options, self._dialer, self._policy = previous
            log.error("reload refused: %s; the settings in force stay", describe(exc))
            return
        except Exception as exc:  # user code (a dialer's or a policy's factory) that raises
            self.options, self._dialer, self._policy = previous
            log.error("reload refused: making the dialer or the policy failed: %r; the settings "
                      "in force stay", exc, exc_info=exc)  # fmt: skip
            return
        from tunio import reload  # noqa: PLC0415

        log.info("reload: %s changed", ", ".join(reload.compare(previous[0], new).live))
        self._generation += 1
        gen = self._generation
        # A reload before the last one's generation is up: that generation (it may have taken
        # flows already, worker by worker) waits with the older one, and both drain once this
        # one is up; none is left running unwatched.
        self._draining_next += [c for c in self._workers if c.process is not None]
        self._workers = [_Child(f"worker-g{gen}-{i}", generation=gen) for i in range(new.workers)]
        self._late_at = time.monotonic() + self._startup_deadline
        for child in self._workers:
            self._spawn_worker(child)
        log.info("reload: generation %d (%d workers) starts; %s once it is up", gen,
                 len(self._workers), _generations_drain(self._draining_next))  # fmt: skip
        if not self._workers:
            self._drain_old_generation()

    def _drain_old_generation(self) -> None:
        """Once every worker of the new generation is up: the old one drains (SIGUSR1: it says
        DRAIN, finishes its flows and exits), for at most --drain-timeout."""
        if not all(c.ready for c in self._workers):
            return
        old, self._draining_next = self._draining_next, []
        deadline = time.monotonic() + self.options.drain_timeout
        for child in old:
            if child.process is None:
                continue  # dead and waiting for its restart: it is not wanted any more
            child.retiring = True
            child.drain_by = deadline
            child.restart_at = None
            self._retiring.append(child)
            if child.process.exitcode is None:
                os.kill(child.process.pid, signal.SIGUSR1)
        if old:
            log.info("%s: %d workers finish their flows (at most %g s)",
                     _generations_drain(old), len(old), self.options.drain_timeout)  # fmt: skip

    def _report_late_generation(self, now: float) -> None:
        """A reload's generation not up within the start-up deadline is said once: until it
        is, the running generation keeps every flow and the reload has changed nothing."""
        if self._late_at is None or now < self._late_at:
            return
        self._late_at = None
        late = [c.name for c in self._workers if not c.ready]
        if self._draining_next and late:
            older = sorted({c.generation for c in self._draining_next})
            log.warning("generation %d is not up after %g s (%s not ready): the workers of "
                        "generation %s keep every flow until it is", self._generation,
                        self._startup_deadline, ", ".join(late),
                        ", ".join(map(str, older)))  # fmt: skip

    def _end_drain(self, child: _Child, now: float) -> None:
        """A retiring worker past its time: its flows are reset (SIGTERM: it says BYE)."""
        running = child.process is not None and child.process.exitcode is None
        if child.kill_at is not None and now >= child.kill_at:
            child.kill_at = None
            if running:  # it ignored the SIGTERM: it must not run on with its flows
                log.warning("%s did not stop within %g s of SIGTERM: killing it", child.name,
                            self._stop_deadline)  # fmt: skip
                child.process.kill()
            return
        if child.drain_by is None or now < child.drain_by:
            return
        child.drain_by = None
        if running:
            log.warning("%s did not finish its flows within --drain-timeout: they are reset",
                        child.name)  # fmt: skip
            child.process.terminate()
            child.kill_at = now + self._stop_deadline

    def _rejoin_workers(self) -> None:
        """A new stack does not know the running workers: they would only say HELLO again once
        its silence has lasted three heartbeats, and new flows are refused until then. Restart
        them now; supervision brings them back at once."""
        running = [c for c in self._workers if c.process is not None and c.process.exitcode is None]
        if running:
            log.info("restarting %d worker(s) so they join the new stack", len(running))
        # a draining one's flows went with the stack; one waiting to drain is not restarted
        for child in [*running, *self._draining_next, *self._retiring]:
            if child.process is not None and child.process.exitcode is None:
                child.rejoining = True
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
            due += [c.drain_by for c in self._retiring if c.drain_by is not None]
            due += [c.kill_at for c in self._retiring if c.kill_at is not None]
            if self._late_at is not None and self._draining_next:
                due.append(self._late_at)
            hang = self.options.hang_timeout
            if hang > 0:
                due += [c.alive_at + hang for c in self._children()
                        if c.alive_at is not None and not c.retiring]  # fmt: skip
            timeout = max(0.0, min(due) - time.monotonic()) if due else None
            self._wait(timeout)
            if self._stop_reason is not None:
                return
            if self._reload_pending is not False:
                self._reload()
            now = time.monotonic()
            self._report_late_generation(now)
            for child in self._children():
                if child.process is not None and child.process.exitcode is not None:
                    self._reap(child, now)
                elif child.process is not None:
                    self._hung(child, now)
                if child.retiring:
                    self._end_drain(child, now)
                    continue
                if child.restart_at is not None and child.restart_at <= now:
                    if child is self._stack:
                        self._stack_error = None
                        socket_file = self._host.socket
                        if socket_file is not None:  # a killed stack leaves its socket file
                            with contextlib.suppress(FileNotFoundError):
                                socket_file.unlink()
                        self._spawn_stack()
                    else:
                        self._spawn_worker(child)

    def _hung(self, child: _Child, now: float) -> None:
        """Kills `child` if it showed no sign of life for --hang-timeout (a stack whose loop
        is stuck, a worker held by code that blocks, a process stopped): alive but useless,
        it would hold its share of the flows for good; killed, it is restarted as after a
        crash (a new stack takes the flows over, a worker's flows the stack has reset)."""
        hang = self.options.hang_timeout
        if hang <= 0 or child.alive_at is None or child.retiring or now - child.alive_at < hang:
            return
        silent = now - child.alive_at
        child.alive_at = None  # (one kill; its next process is watched once it is ready)
        what = "its loop has not turned" if child is self._stack else "its loop sent no report"
        log.error("%s showed no sign of life for %.1f s (%s: hung, or the process is stopped): "
                  "killing it (--hang-timeout %g)", child.name, silent, what, hang)  # fmt: skip
        with contextlib.suppress(OSError, ValueError, AttributeError):
            child.process.kill()

    def _reap(self, child: _Child, now: float) -> None:
        lifetime = now - child.started
        code = child.process.exitcode
        if child is self._stack and self._host.device_lost:
            # Deleted under the run: a new stack would fail on the same dead queues for good.
            # The run ends in failure, so that a service manager starts it again, device and all.
            self._close_status(child)
            child.process.close()
            child.process = None
            self._failure = (f"the TUN device {self.options.tun} is gone (deleted while the run "
                             "used it): stopping; a new run makes it again")  # fmt: skip
            log.error("%s", self._failure)
            self.stop(f"the TUN device {self.options.tun} is gone")
            return
        self._close_status(child)
        child.process.close()
        child.process = None
        child.ready = False
        if child in self._draining_next:  # its generation is being replaced: not restarted
            self._draining_next.remove(child)
            self.stats.pop(child.name, None)
            log.warning("%s (generation %d) exited with %s while generation %d starts; not "
                        "restarted", child.name, child.generation, _exit_text(code),
                        self._generation)  # fmt: skip
            return
        if child.retiring:
            self._retiring.remove(child)
            self.stats.pop(child.name, None)
            log.info("%s (generation %d) has ended: %s", child.name, child.generation,
                     "its flows are done" if code == 0 else _exit_text(code))  # fmt: skip
            return
        if child.rejoining:  # we ended it for a new stack: back at once, not as a crash
            child.rejoining = False
            child.restart_at = now
            self.stats.pop(child.name, None)
            log.info("%s restarts to join the new stack", child.name)
            return
        child.backoff = next_backoff(child.backoff, lifetime)
        child.restart_at = now + child.backoff
        self.restarts[child.name] = self.restarts.get(child.name, 0) + 1
        self.stats.pop(child.name, None)  # its counters start again with its next process
        lost = ""
        if child is self._stack:
            lost = " (the next one takes its flows over: their apps get a RST)"
        if child.backoff < BACKOFF_MAX:
            child.loop_said = None
        elif child.loop_said is not None and now - child.loop_said < CRASH_LOOP_REPEAT:
            child.loop_exits += 1  # a crash loop is a line a minute, not a line an exit
            log.debug("%s exited with %s after %.1f s", child.name, _exit_text(code), lifetime)
            return
        else:
            log.warning("%s is in a crash loop: %d more exits in the last %g s, the last with %s "
                        "after %.1f s%s; restarting every %.1f s (a line a minute while it lasts)",
                        child.name, child.loop_exits, CRASH_LOOP_REPEAT, _exit_text(code),
                        lifetime, lost, child.backoff)  # fmt: skip
            child.loop_said, child.loop_exits = now, 0
            return
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
        workers = [c.process for c in self._children()[1:] if c.process is not None]
        for process in workers:
            process.join(max(0.0, end - time.monotonic()))
        stuck = [p for p in workers if p.exitcode is None]
        for process in stuck:  # the BYE did not reach them: ask them directly
            process.terminate()
        asked = time.monotonic() + max(0.0, min(1.0, self._stop_deadline))  # one second for all
        for process in stuck:
            process.join(max(0.0, asked - time.monotonic()))
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
