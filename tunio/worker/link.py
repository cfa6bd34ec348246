"""The worker's link to the stack: one DEALER socket and the session on it.

The DEALER is a plain pyzmq socket whose ZMQ_FD the event loop watches. The link says HELLO and
HEARTBEAT, applies the liveness rule (a stack silent for `liveness` heartbeats is dead: every
flow is dropped and HELLO said again), says or hears BYE, and holds messages in its outbox while
ZeroMQ's queue is full. It drains the socket in batches, decodes each message with tunio.wire
(`decode_flow` for the data path, `decode` for the rest) and hands it to the flow tables through
`Handlers`. The flow tables send through `send` and report protocol errors to `protocol_error`;
they never see the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import zmq

from tunio import defaults, wire
from tunio.keys import WorkerKeys
from tunio.logs import EverySecond
from tunio.wire import Cmd
from tunio.worker.handshake import HandshakeWatch
from tunio.worker.stats import WorkerStats, errname

log = logging.getLogger("tunio.worker")

#: ZeroMQ high-water marks in messages: credits bound memory, these are only a safety net
HWM = 1_000_000
#: messages handled per wake-up before other sockets get their turn
DRAIN_BUDGET = 512
#: seconds one wake-up may spend on messages before timers (the heartbeat among them) and the
#: flows' sockets get their turn: 512 DATA messages of up to half a window each took 3.8 s on a
#: loaded 2-core machine, more than heartbeat x liveness, and the stack took the worker for dead
DRAIN_TIME = 0.05
#: how long a final BYE may take to leave when we stop on a signal
BYE_LINGER_MS = 1000
#: libzmq's context option ZMQ_ZERO_COPY_RECV (declared in zmq.h only with its draft API)
ZERO_COPY_RECV = 10

_HEARTBEAT = wire.header(Cmd.HEARTBEAT, 0, 0)
_DATA, _CREDIT, _FIN = int(Cmd.DATA), int(Cmd.CREDIT), int(Cmd.FIN)
_DATA_FIN, _OPEN = int(Cmd.DATA_FIN), int(Cmd.OPEN)


@dataclass(frozen=True)
class Timing:
    heartbeat: float = defaults.HEARTBEAT  # seconds between HEARTBEATs
    liveness: int = defaults.LIVENESS  # heartbeats of silence after which the stack is dead


@dataclass(frozen=True)
class Handlers:
    """Where the link hands the stack's messages: the flow tables' own methods."""

    data: Callable[[int, wire.Payload, int], None]  # (flow, payload, carried credit)
    credit: Callable[[int, int], None]  # (flow, amount)
    fin: Callable[[int], None]
    data_fin: Callable[[int, wire.Payload, int], None]  # DATA then FIN: (flow, payload, credit)
    credit_fin: Callable[[int, int], None]  # CREDIT then FIN: (flow, amount)
    rst: Callable[[int], None]
    open: Callable[[int, int, wire.Payload], None]  # (flow, window, address block)
    dgram: Callable[[int, wire.Payload], None]
    flush: Callable[[], None]  # a batch of messages is done: send the credit due
    drop: Callable[[], None]  # the stack is gone: end every flow
    count: Callable[[], int]  # flows and sessions open, for the log
    # NAME: a fake-IP flow's destination name, before its OPEN or first DGRAM (flow, name)
    name: Callable[[int, wire.Payload], None] | None = None
    # handling a message for this flow raised: end it (flow, the message was its OPEN)
    failed: Callable[[int, bool], None] | None = None


class Link:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        endpoint: str,
        *,
        name: str,
        stats: WorkerStats,
        capacity: int = 0,
        timing: Timing | None = None,
        keys: WorkerKeys | None = None,
        ready: Callable[[], None] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.name = name
        self.stats = stats
        # a handler's fault that repeats for every message: a traceback a second, not a message
        self.faults = EverySecond(log, logging.ERROR, "messages whose handling failed")
        self.capacity = capacity
        self.timing = timing or Timing()
        self.keys = keys  # CURVE keys for a tcp:// stack
        self.ready = ready
        self._loop = loop
        self._handlers: Handlers | None = None
        self.draining = False  # DRAIN said: no new flows, and we leave once ours are done
        self._outbox: deque[list[wire.Payload]] = deque()
        self._connected = False
        self._ready_called = False
        self._draining = False
        self._drain_scheduled = False
        self._sent = False  # a message went out since _drain last looked (see _drain)
        self._last_heard = 0.0
        self._last_hello = 0.0
        self._unanswered = 0  # HELLOs sent again since the stack last answered one
        self._done: asyncio.Future[bool] | None = None
        self._leave_at_once: str | None = None  # leave() came before serve()
        self._zsock: zmq.Socket[bytes] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._handshakes: HandshakeWatch | None = None
        #: why the link gave up without a BYE (the stack refused our key), for the exit status
        self.failure: str | None = None

    # ---- lifecycle -------------------------------------------------------------------------

    async def serve(self, handlers: Handlers) -> None:
        """Connect, say HELLO and serve until BYE (from either side) or leave()."""
        loop = self._loop
        self._handlers = handlers
        self._done = loop.create_future()
        ctx = zmq.Context()
        # Every message in a buffer of its own size: by default one under 8 KiB is a view into
        # the connection's receive buffer and keeps all of it (~18 KiB) alive while a slow
        # destination leaves it queued. A libzmq without the option keeps its default.
        with contextlib.suppress(zmq.ZMQError):
            ctx.set(ZERO_COPY_RECV, 0)
        # ZeroMQ's I/O thread as SCHED_BATCH, as the stack's: woken by each send, it no longer
        # preempts this loop on a busy CPU, which goes on with its batch (csrc/link.c says more)
        with contextlib.suppress(zmq.ZMQError, AttributeError):
            ctx.set(zmq.THREAD_SCHED_POLICY, os.SCHED_BATCH)
        zsock: zmq.Socket[bytes] = ctx.socket(zmq.DEALER)
        zsock.setsockopt(zmq.LINGER, 0)
        zsock.setsockopt(zmq.IPV6, 1)  # tcp://[fd00::1]:5555 connects (ZeroMQ's default: IPv4 only)
        zsock.setsockopt(zmq.SNDHWM, HWM)
        zsock.setsockopt(zmq.RCVHWM, HWM)
        if self.keys is not None:  # a tcp:// stack: CURVE, and the stack checks our key
            zsock.curve_serverkey = self.keys.stack_public.encode()
            zsock.curve_publickey = self.keys.public.encode()
            zsock.curve_secretkey = self.keys.secret.encode()
        self._zsock = zsock
        zfd = cast(int, zsock.getsockopt(zmq.FD))
        said_bye = False
        watch = self._handshakes = HandshakeWatch(loop, zsock, self._refused)
        try:
            zsock.connect(self.endpoint)
            loop.add_reader(zfd, self._drain)
            self._last_heard = loop.time()
            self._send_hello()
            self._timer = loop.call_later(self.timing.heartbeat, self._tick)
            self._drain()
            if self._leave_at_once is not None:  # leave() came before the loop could take it
                self.leave(self._leave_at_once)
            said_bye = await self._done
        finally:
            if self._timer is not None:
                self._timer.cancel()
            watch.close()
            loop.remove_reader(zfd)
            handlers.drop()
            if said_bye:
                self._flush_outbox()
            zsock.close(linger=BYE_LINGER_MS if said_bye else 0)
            ctx.term()
            self._zsock = None

    def leave(self, why: str) -> None:
        """We stop: tell the stack (it resets our flows), then end serve()."""
        if self._done is None:
            self._leave_at_once = why
            return
        if self._done.done():
            return
        log.info("worker %s leaving: %s", self.name, why)
        self.send([wire.header(Cmd.BYE, 0, 0)])
        self._done.set_result(True)

    def _refused(self, status: int) -> None:
        """The stack's ZAP handler refused our key; ZeroMQ will not connect again."""
        self.failure = (
            f"the stack at {self.endpoint} refused this worker's key (ZAP status {status}): the "
            "--keys file is not one of that stack's worker keys (give the FILE.worker that its "
            "tunio-run wrote next to its --keys FILE)"
        )
        log.error("worker %s: %s", self.name, self.failure)
        assert self._done is not None
        if not self._done.done():
            self._done.set_result(False)

    def drain(self) -> None:
        """Ask the stack for no new flows (DRAIN): this worker finishes its flows, then goes."""
        if not self.draining:
            log.info("worker %s drains: no new flows, leaving when %d end", self.name,
                     self._handlers.count() if self._handlers is not None else 0)  # fmt: skip
        self.draining = True
        if self._zsock is not None:
            self.send([wire.header(Cmd.DRAIN, 0, 0)])

    def _send_hello(self) -> None:
        # at most 64 bytes of UTF-8, cut on a character boundary
        name = self.name.encode()[: wire.MAX_NAME].decode(errors="ignore").encode()
        self._last_hello = self._loop.time()
        # flags: we take NAME (a fake-IP flow's name before its OPEN or first DGRAM)
        self.send([wire.header(Cmd.HELLO, 0, self.capacity, wire.FEATURE_NAMES), name])

    def _tick(self) -> None:
        assert self._handlers is not None
        now = self._loop.time()
        limit = self.timing.heartbeat * self.timing.liveness
        if self._connected:
            if now - self._last_heard > limit:
                log.warning(
                    "stack silent for %.1fs: dropping %d flows, saying HELLO again",
                    now - self._last_heard,
                    self._handlers.count(),
                )
                self._connected = False
                self._handlers.drop()
                self._outbox.clear()  # what is queued belongs to flows that are gone
                self._send_hello()
            else:
                self.send([_HEARTBEAT])
        elif now - self._last_hello >= limit:
            self._unanswered += 1
            # Said at the 1st, 2nd, 4th, 8th... HELLO left unanswered: a remote worker started
            # before its stack (or pointed at the wrong one) says so without flooding the log.
            if self._unanswered & (self._unanswered - 1) == 0:
                failed = self._handshakes.failed if self._handshakes is not None else 0
                why = "" if not failed else (
                    f", {failed} handshakes cut off by the other end: the stack's public key in "
                    "the --keys file may not be that stack's, or the endpoint not a tunio stack's"
                )  # fmt: skip
                log.warning(
                    "worker %s: no stack answers at %s (%d HELLOs unanswered%s): still trying",
                    self.name, self.endpoint, self._unanswered, why,
                )  # fmt: skip
            self._send_hello()
        if self._outbox:
            self._flush_outbox()
        self._timer = self._loop.call_later(self.timing.heartbeat, self._tick)

    # ---- sending ---------------------------------------------------------------------------

    def send(self, frames: list[wire.Payload]) -> None:
        """Sends one message to the stack (or holds it, in order, while ZeroMQ's queue is full)."""
        assert self._zsock is not None
        if self._outbox:
            self._outbox.append(frames)  # keep order behind what is already waiting
        else:
            zsock = self._zsock
            try:
                # (one or two frames, sent by hand: send_multipart costs twice as much)
                if len(frames) == 1:
                    zsock.send(frames[0], zmq.NOBLOCK)
                elif len(frames) == 2:
                    zsock.send(frames[0], zmq.NOBLOCK | zmq.SNDMORE)
                    zsock.send(frames[1], zmq.NOBLOCK, copy=False)  # the DEALER's queue took
                    # the first frame, so it takes the rest of the message
                else:
                    zsock.send_multipart(frames, zmq.NOBLOCK, copy=False)
            except zmq.Again:
                log.warning("send queue full: holding messages until the stack reads")
                self._outbox.append(frames)
            self._sent = True
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

    def protocol_error(self, exc: wire.ProtocolError) -> None:
        """Counts a message from the stack that breaks the protocol (the flow tables call it)."""
        self.stats.protocol_errors += 1
        count = self.stats.protocol_errors
        if count & (count - 1) == 0:  # 1, 2, 4, 8...: visible without flooding the log
            log.warning("protocol error from the stack (%d so far): %s", count, exc)

    # ---- receiving -------------------------------------------------------------------------

    def _drain(self) -> None:  # noqa: PLR0915 - the data path: one loop, no call per message
        self._drain_scheduled = False
        if self._draining or self._zsock is None:
            return
        assert self._done is not None
        assert self._handlers is not None
        zsock, done, handlers = self._zsock, self._done, self._handlers
        # The data path (DATA, CREDIT, FIN), well-formed: decoded by wire.decode_flow without
        # building a Message and handed on here; the rest takes wire.decode in _handle.
        decode_flow = wire.decode_flow
        on_data, on_credit, on_fin = handlers.data, handlers.credit, handlers.fin
        on_data_fin, on_credit_fin, on_open = handlers.data_fin, handlers.credit_fin, handlers.open
        self._draining = True
        heard = False
        try:
            budget, deadline = DRAIN_BUDGET, self._loop.time() + DRAIN_TIME
            while not done.done():
                if self._outbox:
                    self._flush_outbox()
                try:
                    frames = zsock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    # The receive that found nothing has processed every pending command, so
                    # ZMQ_FD fires for the next message, unless a send (the credit flush)
                    # consumes that signal: only then look again.
                    self._sent = False
                    handlers.flush()
                    if self._sent and cast(int, zsock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                        continue
                    break
                heard = True
                try:
                    count = len(frames)
                    payload = frames[1].buffer if count == 2 else None
                    fields = decode_flow(frames[0].buffer, payload) if count <= 2 else None
                    if fields is None:
                        self._handle(frames)
                    else:
                        code, fid, arg = fields
                        if code == _DATA:
                            assert payload is not None
                            on_data(fid, payload, arg)
                        elif code == _CREDIT:
                            on_credit(fid, arg)
                        elif code == _FIN:
                            on_fin(fid)
                        elif code == _DATA_FIN:
                            assert payload is not None
                            on_data_fin(fid, payload, arg)
                        elif code == _OPEN:
                            assert payload is not None
                            on_open(fid, arg, payload)
                        else:
                            on_credit_fin(fid, arg)
                except Exception as exc:
                    # a bug in one handler must not leave the rest of the queue unread, nor its
                    # flow hanging
                    self._handler_failed(frames, exc)
                budget -= 1
                if budget == 0 or self._loop.time() >= deadline:
                    handlers.flush()
                    self._drain_scheduled = True
                    self._loop.call_soon(self._drain)
                    break
        finally:
            self._draining = False
            if heard:
                self._last_heard = self._loop.time()

    def _handler_failed(self, frames: list[zmq.Frame], exc: Exception) -> None:
        """Handling a message raised: logged (a traceback a second at most), and the flow it was
        for is ended (`Handlers.failed`), so that its app sees a reset, not a flow that hangs."""
        self.faults.log(type(exc).__name__, "worker %s: handling a message failed (%r); its "
                        "flow is ended", self.name, exc, exc_info=exc)  # fmt: skip
        handlers = self._handlers
        if handlers is None or handlers.failed is None:
            return
        try:
            msg = wire.decode(frames)
        except wire.ProtocolError:
            return  # (said already)
        if msg.flow:
            try:
                handlers.failed(msg.flow, msg.cmd is Cmd.OPEN)
            except Exception:
                log.exception("worker %s: ending flow %d after a failure failed", self.name,
                              msg.flow)  # fmt: skip

    def _handle(self, frames: list[zmq.Frame]) -> None:
        """Any message but a well-formed DATA, CREDIT or FIN."""
        handlers = self._handlers
        assert handlers is not None
        try:
            msg = wire.decode(frames)
        except wire.VersionError as exc:
            self.protocol_error(exc)
            self.send([wire.header(Cmd.BYE, 0, errno.EPROTONOSUPPORT)])
            return
        except wire.ProtocolError as exc:
            self.protocol_error(exc)
            return
        cmd, fid, payload = msg.cmd, msg.flow, msg.payload
        if cmd is Cmd.DGRAM:
            assert payload is not None
            handlers.dgram(fid, payload)
        elif cmd is Cmd.OPEN:
            assert payload is not None
            handlers.open(fid, msg.arg, payload)
        elif cmd is Cmd.RST:
            handlers.rst(fid)
        elif cmd is Cmd.DATA:  # (decode_flow takes every well-formed one)
            assert payload is not None
            handlers.data(fid, payload, msg.arg)
        elif cmd is Cmd.CREDIT:
            handlers.credit(fid, msg.arg)
        elif cmd is Cmd.FIN:
            handlers.fin(fid)
        elif cmd is Cmd.DATA_FIN:
            assert payload is not None
            handlers.data_fin(fid, payload, msg.arg)
        elif cmd is Cmd.CREDIT_FIN:
            handlers.credit_fin(fid, msg.arg)
        elif cmd is Cmd.NAME:
            assert payload is not None
            if handlers.name is not None:
                handlers.name(fid, payload)
        elif cmd is Cmd.HEARTBEAT:
            pass
        elif cmd is Cmd.HELLO:
            self._on_hello(msg)
        elif cmd is Cmd.BYE:
            log.info(
                "stack said BYE (%s): closing %d flows", errname(msg.arg), handlers.count()
            )
            assert self._done is not None
            if not self._done.done():
                self._done.set_result(False)
        else:  # OPEN_OK, OPEN_FAIL only travel towards the stack
            self.protocol_error(wire.RemoteProtocolError("direction", f"{cmd.name} to a worker"))

    def _on_hello(self, msg: wire.Message) -> None:
        stack = bytes(msg.payload or b"").decode(errors="replace")
        stack = "".join(c if c.isprintable() else "?" for c in stack)  # it goes into a log line
        log.info("worker %s: stack %s answered HELLO", self.name, stack)
        self._connected = True
        self._unanswered = 0
        self.stats.sessions += 1
        if self.draining:  # a new stack: it must hear it again
            self.send([wire.header(Cmd.DRAIN, 0, 0)])
        if not self._ready_called:
            self._ready_called = True
            if self.ready is not None:
                try:
                    self.ready()
                except Exception:
                    log.exception("ready callback failed")
