"""A worker process: takes flows from the stack over one DEALER socket and dials them.

One asyncio event loop carries everything. The package is in layers, each knowing only those
below it:

- `link`: the DEALER, the session (HELLO, HEARTBEAT, BYE, liveness), the outbox; it decodes each
  message with tunio.wire and hands it to the flow tables; `handshake` tells it what ZeroMQ's
  handshakes with the stack said (a refused key).
- `opening`: a TCP flow's OPEN: the checks, the dial, OPEN_OK or OPEN_FAIL.
- `tcp`: the TCP flows, each in an explicit state, their sockets in an edge-triggered epoll, the
  relay under credit, FIN and RST.
- `datagram`: UDP and ICMP echo (ping) sessions, credit counted in datagrams.
- `dial`: the one dial path (`start_connect` or a task) and the dial timeout, for both tables.
- `credit`: the credit accounting both tables do, with no I/O.
- `stats`: what the worker counts.

The flow tables send through a function they are given (the link's `send`) and report the
stack's protocol errors to another; they never import the link, so they can be driven with a
socketpair and a list. `Worker` builds the link and the tables and wires them together.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

from tunio import defaults, wire
from tunio.dialers.base import Dialer
from tunio.keys import WorkerKeys
from tunio.owner import OwnerLookup
from tunio.policy import Policy
from tunio.policy import failures as policy_failures
from tunio.process import IdleTrim, stop_signals
from tunio.wire import Cmd
from tunio.worker.datagram import DatagramTable, UdpSession
from tunio.worker.dial import unexpected as dial_unexpected
from tunio.worker.flow import Flow
from tunio.worker.link import Handlers, Link, Timing
from tunio.worker.names import Names
from tunio.worker.opening import TcpOpener
from tunio.worker.stall import StallWatch
from tunio.worker.stats import WorkerStats
from tunio.worker.tcp import TcpTable

__all__ = ["Timing", "Worker", "WorkerStats", "run_worker"]

log = logging.getLogger("tunio.worker")

#: seconds between two reports of the worker's counters (and summaries of held log lines)
REPORT_INTERVAL = 1.0
#: seconds the worker's exit waits for its tasks (dials) to end once cancelled
CANCEL_GRACE = 1.0


class Worker:
    def __init__(
        self,
        endpoint: str,
        dialer: Dialer,
        *,
        name: str,
        capacity: int = 0,
        window: int = defaults.WINDOW,
        connect_timeout: float = defaults.CONNECT_TIMEOUT,
        ready: Callable[[], None] | None = None,
        timing: Timing | None = None,
        report: Callable[[dict[str, Any]], None] | None = None,
        policy: Policy | None = None,
        trim_idle: float = defaults.TRIM_IDLE,
        keepalive: defaults.Keepalive | None = defaults.TCP_KEEPALIVE_PROBES,
    ) -> None:
        """`report`, if given, gets `stats.snapshot()` every REPORT_INTERVAL seconds (the
        supervisor's metrics); `policy` picks each flow's dialer (tunio.policy), `dialer` by
        default; after `trim_idle` seconds without flows the freed heap goes back to the system
        (tunio.process.IdleTrim)."""
        self.endpoint = endpoint
        self.keys: WorkerKeys | None = None  # CURVE keys for a tcp:// stack
        self.dialer = dialer
        self.name = name
        self.capacity = capacity
        self.window = window
        self.connect_timeout = connect_timeout
        self.ready = ready
        self.report = report
        self.policy = policy
        self.timing = timing or Timing()
        self.trim_idle = trim_idle
        self.keepalive = keepalive  # of the flows' connections (tunio.worker.tcp.TcpTable)
        self.trim: IdleTrim | None = None  # once run() has started
        self.stalls = StallWatch(name, self.timing.heartbeat * self.timing.liveness)
        self.stats = WorkerStats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._link: Link | None = None
        self._tcp: TcpTable | None = None
        self._datagrams: DatagramTable | None = None
        self._stop_requested = False

    @property
    def flows(self) -> dict[int, Flow]:
        """The TCP flows by id (empty before run())."""
        return self._tcp.flows if self._tcp is not None else {}

    @property
    def udp(self) -> dict[int, UdpSession]:
        """The datagram sessions by id (empty before run())."""
        return self._datagrams.sessions if self._datagrams is not None else {}

    def run(self) -> int:
        """Serve until the stack says BYE, a signal arrives or stop() is called; return 0 (1 if
        the stack refused this worker's key)."""
        loop = asyncio.new_event_loop()
        try:
            return loop.run_until_complete(self._main())
        finally:
            self._close_loop(loop)

    def _close_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """asyncio.run's ending (cancel what is left, wait for it, close the loop), with the
        wait bounded: a dial whose dialer catches its CancelledError and carries on would hold
        the worker's exit for ever (a tunio-worker that never exits after BYE)."""
        try:
            left = asyncio.all_tasks(loop)
            for task in left:
                task.cancel()
            if left:
                done, pending = loop.run_until_complete(asyncio.wait(left, timeout=CANCEL_GRACE))
                for task in done:  # retrieved, so that none is reported as never retrieved
                    if not task.cancelled() and task.exception() is not None:
                        log.debug("worker %s: a task ended with %r at exit", self.name,
                                  task.exception())  # fmt: skip
                if pending:
                    log.warning("worker %s: %d task%s did not end when cancelled (a dialer that "
                                "catches CancelledError?); the worker exits without it",
                                self.name, len(pending),
                                "" if len(pending) == 1 else "s")  # fmt: skip
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()

    def stop(self) -> None:
        """Say BYE and stop; callable from any thread, also before run() has got going."""
        self._stop_requested = True
        loop = self._loop
        if loop is not None and not loop.is_closed():
            # the loop may close in between: then there is nothing left to stop
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._leave, "stop requested")

    def _leave(self, why: str) -> None:
        if self._link is not None:
            self._link.leave(why)

    def drain(self) -> None:
        """Take no new flows, finish the running ones, then stop (a reload's old generation;
        SIGUSR1 does it from outside). Callable from any thread."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        if self._link is not None:
            self._link.drain()

    async def _main(self) -> int:
        loop = asyncio.get_running_loop()
        self._loop = loop
        stats = self.stats
        link = Link(loop, self.endpoint, name=self.name, stats=stats, capacity=self.capacity,
                    timing=self.timing, keys=self.keys, ready=self.ready)  # fmt: skip
        tcp = TcpTable(loop, send=link.send, error=link.protocol_error, stats=stats,
                       window=self.window, keepalive=self.keepalive)  # fmt: skip
        owners = OwnerLookup() if self.policy is not None else None
        names = Names()
        opener = TcpOpener(tcp, self.dialer, loop, send=link.send, error=link.protocol_error,
                           stats=stats, capacity=self.capacity,
                           connect_timeout=self.connect_timeout, name=self.name,
                           policy=self.policy, owners=owners, names=names)  # fmt: skip
        datagrams = DatagramTable(loop, self.dialer, send=link.send, error=link.protocol_error,
                                  stats=stats, tcp_flows=tcp.flows,
                                  connect_timeout=self.connect_timeout, name=self.name,
                                  policy=self.policy, owners=owners, names=names)  # fmt: skip
        tcp.others = datagrams  # CREDIT and RST for ids that are not TCP flows
        self._link, self._tcp, self._datagrams = link, tcp, datagrams

        def flush() -> None:
            datagrams.flush()
            tcp.flush()

        def drop() -> None:
            tcp.drop_all()
            datagrams.drop_all()
            names.clear()

        def failed(fid: int, opening: bool) -> None:
            if not tcp.fault(fid) and not datagrams.fault(fid) and opening:
                link.send([wire.header(Cmd.OPEN_FAIL, fid, errno.ECONNABORTED)])  # never added

        handlers = Handlers(
            data=tcp.on_data, credit=tcp.on_credit, fin=tcp.on_fin, rst=tcp.on_rst,
            data_fin=tcp.on_data_fin, credit_fin=tcp.on_credit_fin,
            open=opener.on_open, dgram=datagrams.on_dgram, flush=flush, drop=drop,
            count=lambda: len(tcp) + len(datagrams), name=names.on_name, failed=failed,
        )  # fmt: skip
        signals = self._install_signals(loop)
        if self._stop_requested:  # stop() came before the loop could take it
            link.leave("stop requested")
        loop.add_reader(tcp.fileno(), tcp.on_events)
        timer: asyncio.TimerHandle | None = None
        self.trim = IdleTrim(self.trim_idle, loop.time())

        def every_interval() -> None:
            nonlocal timer
            stats.loop_stalls = self.stalls.stalls
            active = len(tcp) + len(datagrams)
            if link.draining and active == 0:
                link.leave("drained: every flow has ended")
            self._trim_when_idle(loop.time(), active)
            self._flush_summaries(opener)
            if self.report is not None:
                self.report({**stats.snapshot(), "flows_active": active})
            timer = loop.call_later(REPORT_INTERVAL, every_interval)

        timer = loop.call_later(REPORT_INTERVAL, every_interval)
        self.stalls.start(loop)
        try:
            await link.serve(handlers)
        finally:
            if timer is not None:
                timer.cancel()
            self.stalls.stop()
            self._tear_down(loop, opener, owners, signals)
        log.info("worker %s stopped: %s", self.name, self.stats)
        return 0 if link.failure is None else 1

    def _flush_summaries(self, opener: TcpOpener) -> None:
        """The rate-limited log lines' counts ("N more failed dials in the last 1 s")."""
        assert self._tcp is not None
        assert self._datagrams is not None
        assert self._link is not None
        opener.failures.flush()
        self._tcp.failures.flush()
        self._datagrams.refusals.flush()
        self._datagrams.faults.flush()
        self._link.faults.flush()
        dial_unexpected.flush()
        policy_failures.flush()

    def _tear_down(self, loop: asyncio.AbstractEventLoop, opener: TcpOpener,
                   owners: OwnerLookup | None, signals: list[int]) -> None:  # fmt: skip
        """What the loop leaves when it ends: the last summaries, the tables, the handlers."""
        tcp, datagrams = self._tcp, self._datagrams
        assert tcp is not None
        assert datagrams is not None
        self._flush_summaries(opener)
        if owners is not None:
            owners.close()
        for sig in signals:
            loop.remove_signal_handler(sig)
        loop.remove_reader(tcp.fileno())
        tcp.close()
        datagrams.drop_all()

    def _trim_when_idle(self, now: float, flows: int) -> None:
        if self.trim is not None and self.trim.tick(now, flows):
            log.debug("worker %s: no flows for %.0f s: freed heap given back to the system",
                      self.name, self.trim_idle)

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> list[int]:
        # Signal handlers can only be installed from the main thread; a worker run in a thread
        # (tests, embedding) is stopped with stop() instead.
        if threading.current_thread() is not threading.main_thread():
            return []
        sigs = list(stop_signals())  # an ignored SIGINT stays ignored (a supervisor's child)
        for sig in sigs:
            loop.add_signal_handler(sig, self._leave, sig.name)
        loop.add_signal_handler(signal.SIGUSR1, self._drain)  # a reload: this generation drains
        return [*sigs, signal.SIGUSR1]


def run_worker(
    endpoint: str, dialer: Dialer, *, keys: WorkerKeys | None = None, **options: Any
) -> int:
    """Serve the stack at `endpoint` until it says BYE or SIGTERM/SIGINT arrives; return 0, or
    1 if the stack refused this worker's key.

    `keys`: CURVE keys for a tcp:// endpoint (tunio.keys); `options` as Worker takes them."""
    worker = Worker(endpoint, dialer, **options)
    worker.keys = keys
    return worker.run()
