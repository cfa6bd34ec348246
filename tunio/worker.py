"""A worker process: takes flows from the stack over one DEALER socket and dials them.

One asyncio event loop carries everything: the DEALER (a plain pyzmq socket whose ZMQ_FD is
watched by the loop) and every flow's outbound socket. Flow control is the protocol's credit
scheme: we read from a destination only while the stack has given us credit, and we return credit
to the stack only for bytes the destination has accepted, so memory per flow is bounded by the
window in both directions.

UDP sessions ride the same loop: the first DGRAM of a flow id opens one (through the dialer's
`dial_udp`, or `dial_ping` for an ICMP echo session), replies go back as DGRAMs, and credit is
counted in datagrams; a datagram either side has no credit for is dropped and counted, as a full
queue drops UDP anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import select
import signal
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import islice
from typing import cast

import zmq

from tunio import defaults, ports, wire
from tunio.dialers.base import Address, DatagramDialer, DatagramSession, Dialer, PingDialer
from tunio.keys import WorkerKeys
from tunio.wire import Cmd

log = logging.getLogger("tunio.worker")

#: largest read from a destination in one go (one DATA message)
CHUNK = defaults.READ_CHUNK
#: ZeroMQ high-water marks in messages: credits bound memory, these are only a safety net
HWM = 1_000_000
#: messages handled per wake-up before other sockets get their turn
DRAIN_BUDGET = 512
#: buffers handed to one sendmsg() when a destination has a backlog
IOV_MAX = 64
#: how long a final BYE may take to leave when we stop on a signal
BYE_LINGER_MS = 1000
#: DGRAMs a side may send on a UDP session before it gets CREDIT (docs/protocol.md)
UDP_WINDOW = defaults.UDP_CREDIT
#: datagrams read from one UDP session per wake-up before other sockets get their turn
UDP_BUDGET = 64
#: reads from one destination per wake-up before the other flows get their turn
READ_BUDGET = 4
#: socket events taken from the flows' epoll per wake-up
EVENT_BUDGET = 512
#: seconds between two warnings that the local ports are used up (see tunio.ports)
PORT_WARNING_INTERVAL = 60.0
_LINGER_ABORT = struct.pack("ii", 1, 0)
# Flow sockets sit in the worker's own epoll, edge-triggered, registered once for everything:
# no epoll_ctl per message, and readiness is tracked in the Flow (`readable`).
_FLOW_EVENTS = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
_IN_EVENTS = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_OUT_EVENTS = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR
_HUP_EVENTS = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_HEADER = wire.HEADER
_DATA, _CREDIT, _FIN = int(Cmd.DATA), int(Cmd.CREDIT), int(Cmd.FIN)

_HEARTBEAT = wire.header(Cmd.HEARTBEAT, 0, 0)
#: IP protocols a DGRAM session may carry: UDP, and ICMP / ICMPv6 echo (docs/protocol.md)
_DGRAM_PROTOS = frozenset({wire.IPPROTO_UDP, 1, 58})


@dataclass(frozen=True)
class Timing:
    heartbeat: float = defaults.HEARTBEAT  # seconds between HEARTBEATs
    liveness: int = defaults.LIVENESS  # heartbeats of silence after which the stack is dead


@dataclass
class WorkerStats:
    opens: int = 0
    open_ok: int = 0
    open_fail: int = 0
    bytes_to_stack: int = 0
    bytes_to_destination: int = 0
    resets_sent: int = 0
    resets_received: int = 0
    protocol_errors: int = 0
    sessions: int = 0
    dial_failures: dict[str, int] = field(default_factory=dict)  # failed dials by errno name
    udp_opens: int = 0  # UDP sessions opened (first DGRAM of a flow id)
    udp_open_fail: int = 0
    datagrams_to_stack: int = 0
    datagrams_to_destination: int = 0
    # datagrams dropped: replies without credit from the stack, DGRAMs beyond our window (or
    # beyond the queue while dialing), and datagrams the destination socket would not take
    datagrams_dropped_credit: int = 0
    datagrams_dropped_window: int = 0
    datagrams_dropped_send: int = 0


def _errname(code: int) -> str:
    return errno.errorcode.get(code, str(code))


class Flow:
    """One TCP flow: the stack's side is the flow id, ours is the outbound socket."""

    __slots__ = (
        "closed",
        "connecting",
        "credit",
        "dial",
        "dst",
        "fd",
        "fid",
        "fin_in",
        "fin_out",
        "hup",
        "queue",
        "queued",
        "readable",
        "shut",
        "sock",
        "timer",
        "uncredited",
    )

    def __init__(self, fid: int, credit: int, dst: Address) -> None:
        self.fid = fid
        self.dst = dst
        self.sock: socket.socket | None = None
        self.fd = -1
        self.dial: asyncio.Task[None] | None = None
        self.connecting: socket.socket | None = None  # dialed without a task, not yet connected
        self.timer: asyncio.TimerHandle | None = None  # that dial's timeout
        self.credit = credit  # bytes we may still send to the stack
        self.readable = False  # an input edge came and the socket was not read empty since
        self.hup = False  # the destination's EOF (or an error) is waiting behind any data
        self.queue: deque[wire.Payload] = deque()  # stack's bytes not yet accepted by the socket
        self.queued = 0
        self.uncredited = 0  # bytes written to the destination, not yet returned (CREDIT, DATA)
        self.fin_in = False  # the stack said FIN
        self.fin_out = False  # the destination said EOF and we sent FIN
        self.shut = False  # shutdown(SHUT_WR) done
        self.closed = False


class UdpSession:
    """One UDP session: the stack's flow id and the dialer's DatagramSession."""

    __slots__ = (
        "closed",
        "credit",
        "dial",
        "dst",
        "fd",
        "fid",
        "inflight",
        "pending",
        "reply_block",
        "session",
        "uncredited",
        "version",
    )

    def __init__(self, fid: int, block: wire.AddressBlock) -> None:
        self.fid = fid
        self.dst = Address(str(block.dst), block.dst_port)
        self.version = block.version
        # replies normally come from the destination: their address block is made once
        self.reply_block = wire.AddressBlock(
            block.proto, block.version, block.dst, block.dst_port, block.src, block.src_port
        ).pack()
        self.session: DatagramSession | None = None
        self.fd = -1
        self.dial: asyncio.Task[None] | None = None
        self.pending: deque[wire.Payload] = deque()  # datagrams that came while dialing
        self.credit = UDP_WINDOW  # replies we may still send to the stack
        self.inflight = 0  # DGRAMs from the stack not yet returned as CREDIT
        self.uncredited = 0  # of those, the ones we are done with (sent on or dropped)
        self.closed = False

    def block_from(self, src: Address) -> bytes:
        """The address block of a reply that came from `src` (to the app)."""
        if src is self.dst or src == self.dst:
            return self.reply_block
        try:
            ip = ipaddress.ip_address(src.host)
        except ValueError:
            return self.reply_block  # a relay named no address: say it came from the destination
        if ip.version != self.version:
            return self.reply_block
        app = wire.AddressBlock.unpack(self.reply_block)
        return wire.AddressBlock(
            app.proto, self.version, ip, src.port, app.dst, app.dst_port
        ).pack()


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
    ) -> None:
        self.endpoint = endpoint
        self.keys: WorkerKeys | None = None  # CURVE keys for a tcp:// stack
        self.dialer = dialer
        self.name = name
        self.capacity = capacity
        self.window = window
        self.connect_timeout = connect_timeout
        self.ready = ready
        self.timing = timing or Timing()
        self.stats = WorkerStats()
        self.flows: dict[int, Flow] = {}
        self.udp: dict[int, UdpSession] = {}
        self._udp_dialer: DatagramDialer | None = (
            dialer if isinstance(dialer, DatagramDialer) else None
        )
        self._ping_dialer: PingDialer | None = dialer if isinstance(dialer, PingDialer) else None
        self._next_port_warning = 0.0  # see _open_failed
        self._credit_due: dict[int, Flow] = {}  # flows holding a quarter window of credit
        # Credit below this is held back and carried on the flow's next DATA (its arg), while
        # the flow can still carry it (we have not sent FIN): a request/response exchange then
        # costs one message each way, not two. The stack is never stalled by it: with nothing
        # queued here, what we hold is under a quarter of the window, so it has three quarters
        # left to send.
        self._credit_due_at = max(1, window // 4)
        self._udp_credit_due: dict[int, UdpSession] = {}
        self._outbox: deque[list[wire.Payload]] = deque()
        self._connected = False
        self._ready_called = False
        self._draining = False
        self._drain_scheduled = False
        self._last_heard = 0.0
        self._last_hello = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: asyncio.Future[bool] | None = None
        self._zsock: zmq.Socket[bytes] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._stop_requested = False
        self._epoll: select.epoll | None = None  # every TCP flow's socket, edge-triggered
        self._by_fd: dict[int, Flow] = {}  # what is in it
        self._more: dict[int, Flow] = {}  # flows with input and credit left after their turn
        self._more_scheduled = False
        # a dialer that can start a connect without a task (see _on_open)
        self._start_connect: Callable[[Address, Address], socket.socket] | None = getattr(
            dialer, "start_connect", None
        )

    # ---- lifecycle -------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until the stack says BYE, a signal arrives or stop() is called; return 0."""
        return asyncio.run(self._main())

    def stop(self) -> None:
        """Say BYE and stop; callable from any thread, also before run() has got going."""
        self._stop_requested = True
        loop = self._loop
        if loop is not None and not loop.is_closed():
            # the loop may close in between: then there is nothing left to stop
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._leave, "stop requested")

    async def _main(self) -> int:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._done = loop.create_future()
        ctx = zmq.Context()
        zsock: zmq.Socket[bytes] = ctx.socket(zmq.DEALER)
        zsock.setsockopt(zmq.LINGER, 0)
        zsock.setsockopt(zmq.SNDHWM, HWM)
        zsock.setsockopt(zmq.RCVHWM, HWM)
        if self.keys is not None:  # a tcp:// stack: CURVE, and the stack checks our key
            zsock.curve_serverkey = self.keys.stack_public.encode()
            zsock.curve_publickey = self.keys.public.encode()
            zsock.curve_secretkey = self.keys.secret.encode()
        self._zsock = zsock
        zfd = cast(int, zsock.getsockopt(zmq.FD))
        signals = self._install_signals(loop)
        said_bye = False
        epoll = self._epoll = select.epoll()
        try:
            loop.add_reader(epoll.fileno(), self._on_events)
            zsock.connect(self.endpoint)
            loop.add_reader(zfd, self._drain)
            self._last_heard = loop.time()
            self._send_hello()
            self._timer = loop.call_later(self.timing.heartbeat, self._tick)
            self._drain()
            if self._stop_requested:  # stop() came before the loop could take it
                self._leave("stop requested")
            said_bye = await self._done
        finally:
            if self._timer is not None:
                self._timer.cancel()
            for sig in signals:
                loop.remove_signal_handler(sig)
            loop.remove_reader(zfd)
            self._drop_all()
            loop.remove_reader(epoll.fileno())
            epoll.close()
            self._epoll = None
            if said_bye:
                self._flush_outbox()
            zsock.close(linger=BYE_LINGER_MS if said_bye else 0)
            ctx.term()
            self._zsock = None
        log.info("worker %s stopped: %s", self.name, self.stats)
        return 0

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> list[int]:
        # Signal handlers can only be installed from the main thread; a worker run in a thread
        # (tests, embedding) is stopped with stop() instead.
        if threading.current_thread() is not threading.main_thread():
            return []
        sigs = [signal.SIGTERM, signal.SIGINT]
        for sig in sigs:
            loop.add_signal_handler(sig, self._leave, sig.name)
        return list(sigs)

    def _leave(self, why: str) -> None:
        """We stop: tell the stack (it resets our flows), then end run()."""
        if self._done is None or self._done.done():
            return
        log.info("worker %s leaving: %s", self.name, why)
        self._send([wire.header(Cmd.BYE, 0, 0)])
        self._done.set_result(True)

    def _send_hello(self) -> None:
        assert self._loop is not None
        # at most 64 bytes of UTF-8, cut on a character boundary
        name = self.name.encode()[: wire.MAX_NAME].decode(errors="ignore").encode()
        self._last_hello = self._loop.time()
        self._send([wire.header(Cmd.HELLO, 0, self.capacity), name])

    def _tick(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        limit = self.timing.heartbeat * self.timing.liveness
        if self._connected:
            if now - self._last_heard > limit:
                log.warning(
                    "stack silent for %.1fs: dropping %d flows, saying HELLO again",
                    now - self._last_heard,
                    len(self.flows) + len(self.udp),
                )
                self._connected = False
                self._drop_all()
                self._outbox.clear()  # what is queued belongs to flows that are gone
                self._send_hello()
            else:
                self._send([_HEARTBEAT])
        elif now - self._last_hello >= limit:
            self._send_hello()
        if self._outbox:
            self._flush_outbox()
        self._timer = self._loop.call_later(self.timing.heartbeat, self._tick)

    # ---- the DEALER ------------------------------------------------------------------------

    def _send(self, frames: list[wire.Payload]) -> None:
        assert self._zsock is not None
        assert self._loop is not None
        if self._outbox:
            self._outbox.append(frames)  # keep order behind what is already waiting
        else:
            try:
                self._zsock.send_multipart(frames, zmq.NOBLOCK, copy=False)
            except zmq.Again:
                log.warning("send queue full: holding messages until the stack reads")
                self._outbox.append(frames)
        # ZMQ_FD is edge-triggered and any call on the socket may consume its edge, so look
        # for input again before the loop sleeps.
        if not self._draining and not self._drain_scheduled:
            self._drain_scheduled = True
            self._loop.call_soon(self._drain)

    def _flush_outbox(self) -> None:
        assert self._zsock is not None
        box = self._outbox
        while box:
            try:
                self._zsock.send_multipart(box[0], zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            box.popleft()

    def _drain(self) -> None:
        self._drain_scheduled = False
        if self._draining or self._zsock is None:
            return
        assert self._loop is not None
        assert self._done is not None
        zsock = self._zsock
        self._draining = True
        heard = False
        try:
            budget = DRAIN_BUDGET
            while not self._done.done():
                if self._outbox:
                    self._flush_outbox()
                try:
                    frames = zsock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    self._send_credits()
                    if cast(int, zsock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                        continue
                    break
                heard = True
                try:
                    self._handle(frames)
                except Exception:
                    # a bug in one handler must not leave the rest of the queue unread
                    log.exception("worker %s: handling a message failed", self.name)
                budget -= 1
                if budget == 0:
                    self._send_credits()
                    self._drain_scheduled = True
                    self._loop.call_soon(self._drain)
                    break
        finally:
            self._draining = False
            if heard:
                self._last_heard = self._loop.time()

    def _handle(self, frames: list[zmq.Frame]) -> None:
        # The data path (DATA, CREDIT, FIN) well-formed: parsed here without building a Message;
        # anything else, malformed ones included, takes wire.decode and its checks.
        head = frames[0].buffer
        if len(head) == _HEADER.size:
            version, code, _reserved, fid, arg = _HEADER.unpack_from(head)
            if version == wire.VERSION and fid:
                if len(frames) == 2:
                    if code == _DATA:
                        payload = frames[1].buffer
                        if len(payload):
                            self._on_data(fid, payload, arg)
                            return
                elif code == _CREDIT:
                    self._on_credit(fid, arg)
                    return
                elif code == _FIN:
                    self._on_fin(fid)
                    return
        try:
            msg = wire.decode(frames)
        except wire.VersionError as exc:
            self._protocol_error(exc)
            self._send([wire.header(Cmd.BYE, 0, errno.EPROTONOSUPPORT)])
            return
        except wire.ProtocolError as exc:
            self._protocol_error(exc)
            return
        cmd = msg.cmd
        if cmd is Cmd.DGRAM:
            assert msg.payload is not None
            self._on_dgram(msg.flow, msg.payload)
        elif cmd is Cmd.DATA:
            assert msg.payload is not None
            self._on_data(msg.flow, msg.payload, msg.arg)
        elif cmd is Cmd.CREDIT:
            self._on_credit(msg.flow, msg.arg)
        elif cmd is Cmd.OPEN:
            self._on_open(msg)
        elif cmd is Cmd.FIN:
            self._on_fin(msg.flow)
        elif cmd is Cmd.RST:
            self._on_rst(msg.flow)
        elif cmd is Cmd.HEARTBEAT:
            pass
        elif cmd is Cmd.HELLO:
            self._on_hello(msg)
        elif cmd is Cmd.BYE:
            log.info(
                "stack said BYE (%s): closing %d flows",
                _errname(msg.arg),
                len(self.flows) + len(self.udp),
            )
            assert self._done is not None
            if not self._done.done():
                self._done.set_result(False)
        else:  # OPEN_OK, OPEN_FAIL only travel towards the stack
            self._protocol_error(wire.RemoteProtocolError("direction", f"{cmd.name} to a worker"))

    def _protocol_error(self, exc: wire.ProtocolError) -> None:
        self.stats.protocol_errors += 1
        count = self.stats.protocol_errors
        if count & (count - 1) == 0:  # 1, 2, 4, 8...: visible without flooding the log
            log.warning("protocol error from the stack (%d so far): %s", count, exc)

    def _on_hello(self, msg: wire.Message) -> None:
        stack = bytes(msg.payload or b"").decode(errors="replace")
        log.info("worker %s: stack %s answered HELLO", self.name, stack)
        self._connected = True
        self.stats.sessions += 1
        if not self._ready_called:
            self._ready_called = True
            if self.ready is not None:
                try:
                    self.ready()
                except Exception:
                    log.exception("ready callback failed")

    # ---- opening a flow --------------------------------------------------------------------

    def _on_open(self, msg: wire.Message) -> None:
        assert self._loop is not None
        assert msg.payload is not None
        fid = msg.flow
        self.stats.opens += 1
        if fid == 0 or fid in self.flows:
            self._protocol_error(wire.RemoteProtocolError("flow", f"OPEN of flow {fid} in use"))
            return
        try:
            block = wire.AddressBlock.unpack(msg.payload)
        except wire.ProtocolError as exc:
            self._protocol_error(exc)
            self._open_failed(fid, None, errno.EINVAL)
            return
        dst = Address(str(block.dst), block.dst_port)
        if block.proto != wire.IPPROTO_TCP:
            self._open_failed(fid, dst, errno.EPROTONOSUPPORT)
            return
        if self.capacity and len(self.flows) >= self.capacity:
            self._open_failed(fid, dst, errno.EAGAIN)
            return
        flow = Flow(fid, msg.arg, dst)
        self.flows[fid] = flow
        src = Address(str(block.src), block.src_port)
        if self._start_connect is not None:
            self._dial_nowait(flow, src, self._start_connect)
        else:
            flow.dial = self._loop.create_task(self._dial(flow, src))

    def _dial_nowait(
        self, flow: Flow, src: Address, start: Callable[[Address, Address], socket.socket]
    ) -> None:
        """Dial without a task: the connect in flight waits in our epoll like any flow socket,
        and its timeout is one timer (a dial is most of what a short connection costs)."""
        assert self._loop is not None
        assert self._epoll is not None
        try:
            sock = start(flow.dst, src)
        except OSError as exc:
            del self.flows[flow.fid]
            flow.closed = True
            self._open_failed(flow.fid, flow.dst, exc.errno or errno.ECONNABORTED,
                              exc.strerror or "")  # fmt: skip
            return
        flow.connecting = sock
        flow.fd = sock.fileno()
        self._by_fd[flow.fd] = flow
        self._epoll.register(flow.fd, _FLOW_EVENTS)
        flow.timer = self._loop.call_later(self.connect_timeout, self._dial_timeout, flow)

    def _dial_timeout(self, flow: Flow) -> None:
        flow.timer = None
        if flow.connecting is not None and not flow.closed:
            self._dial_ended(flow, errno.ETIMEDOUT,
                             f"no connection within {self.connect_timeout:g} s")  # fmt: skip

    def _dial_ended(self, flow: Flow, code: int, why: str = "") -> None:
        """A task-less dial failed: forget the socket, answer OPEN_FAIL."""
        sock = flow.connecting
        assert sock is not None
        self._unregister(flow)
        flow.connecting = None
        sock.close()
        if flow.timer is not None:
            flow.timer.cancel()
            flow.timer = None
        if self.flows.get(flow.fid) is flow:
            del self.flows[flow.fid]
        flow.closed = True
        self._open_failed(flow.fid, flow.dst, code, why)

    def _connect_done(self, flow: Flow) -> None:
        """A task-less dial's socket became writable: connected, or failed."""
        sock = flow.connecting
        assert sock is not None
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self._dial_ended(flow, code, os.strerror(code))
            return
        flow.connecting = None
        if flow.timer is not None:
            flow.timer.cancel()
            flow.timer = None
        self._dialed(flow, sock)

    def _unregister(self, flow: Flow) -> None:
        if flow.fd >= 0 and self._by_fd.get(flow.fd) is flow:
            del self._by_fd[flow.fd]
            if self._epoll is not None:
                with contextlib.suppress(OSError):
                    self._epoll.unregister(flow.fd)
        self._more.pop(flow.fid, None)

    def _dial_failure(self, exc: Exception, what: str) -> tuple[int, str]:
        """The errno the app sees for a failed dial (TCP or datagram), and the dialer's own
        words (which proxy, which credentials) for the log line."""
        if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
            return errno.ETIMEDOUT, f"no connection within {self.connect_timeout:g} s"
        if isinstance(exc, OSError):
            if exc.errno is None:
                log.warning("%s: %r has no errno; answering ECONNABORTED", what, exc)
            return exc.errno or errno.ECONNABORTED, exc.strerror or ""
        log.error("%s failed unexpectedly; answering ECONNABORTED", what, exc_info=exc)
        return errno.ECONNABORTED, ""

    async def _dial(self, flow: Flow, src: Address) -> None:
        try:
            sock = await asyncio.wait_for(
                self.dialer.dial(flow.dst, src), self.connect_timeout
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # every failure becomes an errno for the app
            code, why = self._dial_failure(exc, f"dial {flow.dst}")
        else:
            self._dialed(flow, sock)
            return
        flow.dial = None
        if self.flows.get(flow.fid) is flow:
            del self.flows[flow.fid]
            flow.closed = True
            self._open_failed(flow.fid, flow.dst, code, why)

    def _open_failed(self, fid: int, dst: Address | None, code: int, why: str = "") -> None:
        self.stats.open_fail += 1
        name = _errname(code)
        self.stats.dial_failures[name] = self.stats.dial_failures.get(name, 0) + 1
        log.info("flow %d: dial %s failed: %s%s", fid, dst, name, f" ({why})" if why else "")
        if code == errno.EADDRNOTAVAIL:
            now = time.monotonic()
            if now >= self._next_port_warning:  # once a minute at most: it comes in floods
                self._next_port_warning = now + PORT_WARNING_INTERVAL
                log.warning("worker %s: %s", self.name, ports.no_port_hint())
        self._send([wire.header(Cmd.OPEN_FAIL, fid, code)])

    def _dialed(self, flow: Flow, sock: socket.socket) -> None:
        flow.dial = None
        if flow.closed or self.flows.get(flow.fid) is not flow:
            # reset while the dial finished: the destination must see the reset too
            _abort(sock)
            return
        sock.setblocking(False)
        flow.sock = sock
        if flow.fd < 0:  # dialed by a task: not in our epoll yet
            assert self._epoll is not None
            flow.fd = sock.fileno()
            self._by_fd[flow.fd] = flow
            # registering reports what is already there (input that came with the connect)
            self._epoll.register(flow.fd, _FLOW_EVENTS)
        self.stats.open_ok += 1
        self._send([wire.header(Cmd.OPEN_OK, flow.fid, self.window)])
        if flow.credit > 0:
            self._start_reading(flow)

    # ---- flow sockets ----------------------------------------------------------------------

    def _on_events(self) -> None:
        assert self._epoll is not None
        by_fd = self._by_fd
        for fd, ev in self._epoll.poll(0, EVENT_BUDGET):
            flow = by_fd.get(fd)
            if flow is None:
                continue
            if flow.connecting is not None:
                if not ev & _OUT_EVENTS:
                    continue
                self._connect_done(flow)
                if flow.sock is None:
                    continue
            if ev & _IN_EVENTS:
                flow.readable = True
                if ev & _HUP_EVENTS:
                    flow.hup = True
                if flow.credit > 0 and not flow.fin_out:
                    self._on_readable(flow)
            if ev & _OUT_EVENTS and flow.queue and not flow.closed:
                self._on_writable(flow)
        self._send_credits()

    # ---- destination -> stack --------------------------------------------------------------

    def _start_reading(self, flow: Flow) -> None:
        # edge-triggered: read now only if input is known to be waiting; else its edge will come
        if flow.readable and flow.sock is not None and not flow.fin_out:
            self._on_readable(flow)

    def _stop_reading(self, flow: Flow) -> None:
        self._more.pop(flow.fid, None)

    def _on_readable(self, flow: Flow) -> None:
        sock = flow.sock
        assert sock is not None
        for _ in range(READ_BUDGET):
            want = min(flow.credit, CHUNK)
            try:
                data = sock.recv(want)
            except (BlockingIOError, InterruptedError):
                flow.readable = False
                return
            except OSError as exc:
                self._destination_failed(flow, exc)
                return
            if not data:
                flow.readable = False
                self._stop_reading(flow)
                flow.fin_out = True
                self._return_credit(flow)  # no DATA will carry it now
                self._send([wire.header(Cmd.FIN, flow.fid, 0)])
                self._maybe_finish(flow)
                return
            size = len(data)
            flow.credit -= size
            self.stats.bytes_to_stack += size
            self._send([wire.header(Cmd.DATA, flow.fid, flow.uncredited), data])
            flow.uncredited = 0  # carried along
            if size < want and not flow.hup:
                # a short read emptied the socket; whatever comes later brings a new edge (an
                # EOF already waiting brought none of its own: `hup` keeps us reading to it)
                flow.readable = False
                return
            if flow.credit <= 0:
                return  # still readable: CREDIT resumes it
        # input left after this flow's turn: the other sockets go first
        self._more[flow.fid] = flow
        if not self._more_scheduled:
            assert self._loop is not None
            self._more_scheduled = True
            self._loop.call_soon(self._read_more)

    def _read_more(self) -> None:
        self._more_scheduled = False
        more, self._more = self._more, {}
        for flow in more.values():
            if not flow.closed and flow.credit > 0:
                self._start_reading(flow)

    def _on_credit(self, fid: int, amount: int) -> None:
        flow = self.flows.get(fid)
        if flow is None:
            udp = self.udp.get(fid)
            if udp is not None:
                udp.credit += amount
            return  # else late credit for a flow that has ended
        flow.credit += amount
        if flow.sock is not None and not flow.fin_out and flow.credit > 0:
            self._start_reading(flow)

    # ---- stack -> destination --------------------------------------------------------------

    def _on_data(self, fid: int, payload: wire.Payload, credit: int = 0) -> None:
        if credit:  # credit the stack carried along (DATA's arg)
            self._on_credit(fid, credit)
        flow = self.flows.get(fid)
        if flow is None:
            self.stats.resets_sent += 1
            self._send([wire.header(Cmd.RST, fid, 0)])
            return
        sock = flow.sock
        if sock is None or flow.fin_in:
            why = "DATA before OPEN_OK" if sock is None else "DATA after FIN"
            self._flow_protocol_error(flow, why)
            return
        size = len(payload)
        if flow.queued + flow.uncredited + size > self.window:
            self._flow_protocol_error(flow, "DATA beyond the credit window")
            return
        if flow.queue:
            flow.queue.append(payload)
            flow.queued += size
            return
        try:
            sent = sock.send(payload)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._destination_failed(flow, exc)
            return
        if sent:
            self._written(flow, sent)
        if sent < size:
            flow.queue.append(memoryview(payload)[sent:])
            flow.queued += size - sent
            self._start_writing(flow)

    def _written(self, flow: Flow, size: int) -> None:
        flow.uncredited += size
        self.stats.bytes_to_destination += size
        if flow.uncredited >= self._credit_due_at or flow.fin_out:
            self._credit_due[flow.fid] = flow

    def _send_credits(self) -> None:
        # Credit due is batched per wake-up: one CREDIT per flow for everything written since.
        if self._udp_credit_due:
            self._send_udp_credits()
        if not self._credit_due:
            return
        due = self._credit_due
        self._credit_due = {}
        for flow in due.values():
            if not flow.closed:
                self._return_credit(flow)

    def _return_credit(self, flow: Flow) -> None:
        """Sends the credit held back for `flow` now, as CREDIT."""
        if flow.uncredited:
            self._send([wire.header(Cmd.CREDIT, flow.fid, flow.uncredited)])
            flow.uncredited = 0

    def _start_writing(self, flow: Flow) -> None:
        """Nothing to do: a send that fell short leaves the socket waiting for room, and the
        room brings an output edge (_on_events writes the queue then)."""

    def _stop_writing(self, flow: Flow) -> None:
        """Nothing to do: output edges for an empty queue are ignored."""

    def _on_writable(self, flow: Flow) -> None:
        assert flow.sock is not None
        queue = flow.queue
        while queue:
            try:
                if len(queue) == 1:
                    sent = flow.sock.send(queue[0])
                else:
                    sent = flow.sock.sendmsg(list(islice(queue, IOV_MAX)))
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._destination_failed(flow, exc)
                return
            self._written(flow, sent)
            flow.queued -= sent
            while sent:
                head = queue[0]
                if sent < len(head):
                    queue[0] = memoryview(head)[sent:]
                    break
                sent -= len(head)
                queue.popleft()
            else:
                continue
            break  # the socket took less than offered: it is full
        if not queue:
            self._stop_writing(flow)
            if flow.fin_in:
                self._shutdown_write(flow)
        self._send_credits()

    def _on_fin(self, fid: int) -> None:
        flow = self.flows.get(fid)
        if flow is None:
            return  # late FIN for a flow that has ended
        if flow.sock is None:
            self._flow_protocol_error(flow, "FIN before OPEN_OK")
            return
        if flow.fin_in:
            self._protocol_error(wire.RemoteProtocolError("flow", f"second FIN on flow {fid}"))
            return
        flow.fin_in = True
        if not flow.queue:
            self._shutdown_write(flow)

    def _shutdown_write(self, flow: Flow) -> None:
        assert flow.sock is not None
        try:
            flow.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self._destination_failed(flow, exc)
            return
        flow.shut = True
        self._maybe_finish(flow)

    # ---- ending a flow ---------------------------------------------------------------------

    def _on_rst(self, fid: int) -> None:
        flow = self.flows.get(fid)
        if flow is None:
            udp = self.udp.get(fid)
            if udp is not None:
                self.stats.resets_received += 1
                self._udp_free(udp)
            return  # never answer a RST with a RST
        self.stats.resets_received += 1
        self._free(flow, abortive=True)

    def _destination_failed(self, flow: Flow, exc: OSError) -> None:
        code = exc.errno or errno.ECONNRESET
        log.debug("flow %d: %s: %s", flow.fid, flow.dst, _errname(code))
        self._reset(flow, code)

    def _flow_protocol_error(self, flow: Flow, why: str) -> None:
        self._protocol_error(wire.RemoteProtocolError("flow", f"flow {flow.fid}: {why}"))
        self._reset(flow, errno.EPROTO)

    def _reset(self, flow: Flow, code: int) -> None:
        self.stats.resets_sent += 1
        self._send([wire.header(Cmd.RST, flow.fid, code)])
        self._free(flow, abortive=True)

    def _maybe_finish(self, flow: Flow) -> None:
        if flow.fin_in and flow.fin_out and flow.shut:
            # the stack learns that all it sent was written only from the credit: send it now,
            # not at the end of this wake-up, when the flow is gone
            self._return_credit(flow)
            self._free(flow, abortive=False)

    def _free(self, flow: Flow, *, abortive: bool) -> None:
        if self.flows.get(flow.fid) is flow:
            del self.flows[flow.fid]
        self._credit_due.pop(flow.fid, None)
        flow.closed = True
        if flow.dial is not None:
            flow.dial.cancel()
            flow.dial = None
        if flow.timer is not None:
            flow.timer.cancel()
            flow.timer = None
        self._unregister(flow)  # before the close: the fd number may be reused at once
        if flow.connecting is not None:
            _abort(flow.connecting)  # reset while dialing: the destination sees a reset
            flow.connecting = None
        sock = flow.sock
        if sock is not None:
            flow.sock = None
            if abortive:
                _abort(sock)
            else:
                sock.close()
        flow.queue.clear()
        flow.queued = 0

    def _drop_all(self) -> None:
        for flow in list(self.flows.values()):
            self._free(flow, abortive=True)
        for udp in list(self.udp.values()):
            self._udp_free(udp)

    # ---- UDP sessions ----------------------------------------------------------------------

    def _on_dgram(self, fid: int, payload: wire.Payload) -> None:
        udp = self.udp.get(fid)
        if udp is None:
            self._udp_open(fid, payload)
            return
        if udp.inflight >= UDP_WINDOW:
            # beyond the window the stack was given: not ours to credit, so not counted in flight
            self.stats.datagrams_dropped_window += 1
            return
        udp.inflight += 1
        data = memoryview(payload)[wire.ADDRESS.size :]
        session = udp.session
        if session is None:
            udp.pending.append(data)  # at most UDP_WINDOW: inflight bounds it
            return
        self._udp_send(udp, session, data)

    def _udp_open(self, fid: int, payload: wire.Payload) -> None:
        assert self._loop is not None
        if fid in self.flows:
            self._protocol_error(wire.RemoteProtocolError("flow", f"DGRAM on TCP flow {fid}"))
            return
        try:
            block = wire.AddressBlock.unpack(payload)
        except wire.ProtocolError as exc:
            self._protocol_error(exc)
            self._udp_refuse(fid, None, errno.EINVAL)
            return
        if block.proto not in _DGRAM_PROTOS:
            why = f"DGRAM of IP protocol {block.proto}"
            self._protocol_error(wire.RemoteProtocolError("address", why))
            self._udp_refuse(fid, None, errno.EPROTONOSUPPORT)
            return
        udp = UdpSession(fid, block)
        # ICMP echo (proto 1/58) is a session like UDP's, opened by the dialer's dial_ping
        dialer: DatagramDialer | PingDialer | None = (
            self._udp_dialer if block.proto == wire.IPPROTO_UDP else self._ping_dialer
        )
        if dialer is None:
            self._udp_refuse(fid, udp.dst, errno.EPROTONOSUPPORT)
            return
        self.stats.udp_opens += 1
        self.udp[fid] = udp
        udp.inflight = 1
        udp.pending.append(memoryview(payload)[wire.ADDRESS.size :])
        src = Address(str(block.src), block.src_port)
        udp.dial = self._loop.create_task(self._udp_dial(dialer, udp, src))

    def _udp_refuse(self, fid: int, dst: Address | None, code: int) -> None:
        self.stats.udp_open_fail += 1
        self.stats.resets_sent += 1
        log.info("udp session %d: to %s refused: %s", fid, dst, _errname(code))
        self._send([wire.header(Cmd.RST, fid, code)])

    async def _udp_dial(
        self, dialer: DatagramDialer | PingDialer, udp: UdpSession, src: Address
    ) -> None:
        # the reply block's first byte is the session's IP protocol
        opening = (
            dialer.dial_udp(udp.dst, src)
            if isinstance(dialer, DatagramDialer) and udp.reply_block[0] == wire.IPPROTO_UDP
            else cast(PingDialer, dialer).dial_ping(udp.dst, src)
        )
        try:
            session = await asyncio.wait_for(opening, self.connect_timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # every failure becomes an errno for the app
            code, _ = self._dial_failure(exc, f"udp dial {udp.dst}")
        else:
            self._udp_dialed(udp, session)
            return
        udp.dial = None
        if self.udp.get(udp.fid) is udp:
            self._udp_free(udp)
            self._udp_refuse(udp.fid, udp.dst, code)

    def _udp_dialed(self, udp: UdpSession, session: DatagramSession) -> None:
        assert self._loop is not None
        udp.dial = None
        if udp.closed or self.udp.get(udp.fid) is not udp:
            session.close()  # reset while dialing
            return
        udp.session = session
        udp.fd = session.fileno()
        pending = udp.pending
        while pending and not udp.closed:
            self._udp_send(udp, session, pending.popleft())
        if udp.closed:
            return
        self._loop.add_reader(udp.fd, self._udp_readable, udp)
        # this ran as a task, not from the DEALER: the credit for the queue must not wait
        self._send_udp_credits()

    def _udp_send(self, udp: UdpSession, session: DatagramSession, data: wire.Payload) -> None:
        try:
            sent = session.send(data)
        except OSError as exc:
            self._udp_failed(udp, exc)
            return
        if sent:
            self.stats.datagrams_to_destination += 1
        else:
            self.stats.datagrams_dropped_send += 1
        # credit goes back for a dropped datagram too: the stack's window counts DGRAMs sent
        udp.uncredited += 1
        self._udp_credit_due[udp.fid] = udp

    def _send_udp_credits(self) -> None:
        due = self._udp_credit_due
        self._udp_credit_due = {}
        for fid, udp in due.items():
            if udp.uncredited and not udp.closed:
                self._send([wire.header(Cmd.CREDIT, fid, udp.uncredited)])
                udp.inflight -= udp.uncredited
                udp.uncredited = 0

    def _udp_readable(self, udp: UdpSession) -> None:
        session = udp.session
        assert session is not None
        for _ in range(UDP_BUDGET):
            try:
                got = session.recv()
            except OSError as exc:
                self._udp_failed(udp, exc)
                return
            if got is None:
                return
            data, src = got
            if udp.credit <= 0:
                self.stats.datagrams_dropped_credit += 1
                continue
            udp.credit -= 1
            self.stats.datagrams_to_stack += 1
            self._send([wire.header(Cmd.DGRAM, udp.fid, 0), udp.block_from(src) + data])

    def _udp_failed(self, udp: UdpSession, exc: OSError) -> None:
        code = exc.errno or errno.EIO
        log.debug("udp session %d: %s: %s", udp.fid, udp.dst, _errname(code))
        self._udp_free(udp)  # first: whoever hears the RST finds the session gone
        self.stats.resets_sent += 1
        self._send([wire.header(Cmd.RST, udp.fid, code)])

    def _udp_free(self, udp: UdpSession) -> None:
        if self.udp.get(udp.fid) is udp:
            del self.udp[udp.fid]
        self._udp_credit_due.pop(udp.fid, None)
        udp.closed = True
        udp.pending.clear()
        if udp.dial is not None:
            udp.dial.cancel()
            udp.dial = None
        session = udp.session
        if session is not None:
            udp.session = None
            if udp.fd >= 0:
                assert self._loop is not None
                self._loop.remove_reader(udp.fd)
                udp.fd = -1
            session.close()


def _abort(sock: socket.socket) -> None:
    """Close so that the peer sees a reset (SO_LINGER 0), not an orderly end."""
    # a socket that is already dead may refuse the option; closing is all that is left then
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
    sock.close()


def run_worker(
    endpoint: str,
    dialer: Dialer,
    *,
    name: str,
    capacity: int = 0,
    window: int = defaults.WINDOW,
    connect_timeout: float = defaults.CONNECT_TIMEOUT,
    ready: Callable[[], None] | None = None,
    keys: WorkerKeys | None = None,
) -> int:
    """Serve the stack at `endpoint` until it says BYE or SIGTERM/SIGINT arrives; return 0.

    `keys`: CURVE keys for a tcp:// endpoint (tunio.keys)."""
    worker = Worker(
        endpoint,
        dialer,
        name=name,
        capacity=capacity,
        window=window,
        connect_timeout=connect_timeout,
        ready=ready,
    )
    worker.keys = keys
    return worker.run()
