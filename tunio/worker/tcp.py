"""The worker's TCP flows: the table of flows by id, each in an explicit `State`
(tunio.worker.flow), with its outbound socket and the relay between that socket and the stack
under credit.

Flow control is the protocol's credit scheme (counted by tunio.worker.credit): we read from a
destination only while the stack has given us credit, and we return credit to the stack only for
bytes the destination has accepted, so memory per flow is bounded by the window in both
directions.

The table sends its messages through the `send` function it is given and reports what the stack
got wrong to `error`; it knows nothing of the link to the stack, so a test can drive it with a
socketpair and a list. Its sockets are in its own epoll (`fileno()`): whoever runs the table calls
`on_events()` when that is readable.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import select
import socket
from itertools import islice

from tunio import defaults, wire
from tunio.dialers.base import Address
from tunio.logs import EverySecond
from tunio.wire import Cmd
from tunio.worker.dial import Connecting, abort
from tunio.worker.flow import ErrorSink, Flow, NoOthers, OtherFlows, Send, State
from tunio.worker.stats import WorkerStats, errname

log = logging.getLogger("tunio.worker")

#: largest read from a destination in one go (one DATA message)
CHUNK = defaults.READ_CHUNK
#: buffers handed to one sendmsg() when a destination has a backlog
IOV_MAX = 64
#: reads from one destination per wake-up before the other flows get their turn
READ_BUDGET = 4
#: socket events taken from the flows' epoll per wake-up
EVENT_BUDGET = 512

# Flow sockets sit in the table's own epoll, edge-triggered, registered once for everything (a
# connect in flight included): no epoll_ctl per message, and readiness is tracked in the Flow
# (`readable`).
_FLOW_EVENTS = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
_IN_EVENTS = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_OUT_EVENTS = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR
_HUP_EVENTS = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR

def _set_keepalive(sock: socket.socket, keepalive: defaults.Keepalive | None) -> None:
    if keepalive is None:
        return
    idle, interval, count = keepalive
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)

# plain names for the data path: a global is found faster than an attribute of the class
_DIALING, _OPEN, _STACK_FIN = State.DIALING, State.OPEN, State.STACK_FIN
_DEST_FIN, _CLOSING, _CLOSED = State.DEST_FIN, State.CLOSING, State.CLOSED


class TcpTable:
    """The TCP flows by id, driven by the stack's messages (`on_data`, `on_fin`, ...) and by
    their sockets' readiness (`on_events`). Flows come in through tunio.worker.opening (OPEN,
    the dial), which hands each back connected or failed."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        send: Send,
        error: ErrorSink,
        stats: WorkerStats,
        window: int = defaults.WINDOW,
        keepalive: defaults.Keepalive | None = defaults.TCP_KEEPALIVE_PROBES,
    ) -> None:
        """`keepalive`: TCP keepalive on each flow's connection toward its destination (or
        proxy), so that one that vanished without a word (a host switched off, a NAT on the way
        that forgot the connection) is found and its flow reset, instead of holding the flow,
        its app's connection and its slot forever; None: off."""
        self.flows: dict[int, Flow] = {}
        self._keepalive = keepalive
        self.others: OtherFlows = NoOthers()
        self.stats = stats
        self._loop = loop
        self._send = send
        self._error = error
        self._window = window  # the stack's window towards us (OPEN_OK's arg)
        self._epoll = select.epoll()  # every flow's socket, edge-triggered
        self._by_fd: dict[int, Flow] = {}  # what is in it
        self._credit_due: dict[int, Flow] = {}  # flows holding a quarter window of credit
        # one line a second if a fault repeats for every flow, not one a flow
        self.failures = EverySecond(log, logging.ERROR, "flows reset by a failure")
        self._more: dict[int, Flow] = {}  # flows with input and credit left after their turn
        self._more_scheduled = False

    def __len__(self) -> int:
        return len(self.flows)

    def fileno(self) -> int:
        """The epoll of the flows' sockets: readable when `on_events()` has work."""
        return self._epoll.fileno()

    def close(self) -> None:
        """Ends every flow (abortively) and closes the epoll."""
        self.drop_all()
        self._epoll.close()

    def drop_all(self) -> None:
        for flow in list(self.flows.values()):
            self._free(flow, abortive=True)

    # ---- flows opened by tunio.worker.opening ----------------------------------------------

    def add(self, fid: int, credit: int, dst: Address) -> Flow:
        """A new flow, DIALING; `credit` is the window the stack gave us (OPEN's arg)."""
        flow = Flow(fid, credit, self._window, dst)
        self.flows[fid] = flow
        return flow

    def watch(self, flow: Flow, sock: socket.socket) -> None:
        """A task-less dial's socket: into the epoll now, where it stays once connected."""
        flow.fd = sock.fileno()
        self._by_fd[flow.fd] = flow
        self._epoll.register(flow.fd, _FLOW_EVENTS)

    def connected(self, flow: Flow, sock: socket.socket) -> None:
        """`flow`'s dial is done: OPEN_OK, and the relay starts."""
        if sock.getblocking():  # (a dialer's own socket; ours are non-blocking from the start)
            sock.setblocking(False)
        # The app's own stack already decided how to segment its writes: a relay that held
        # small writes back again (Nagle) would stall a write-write-read exchange for the
        # destination's delayed ACK, 40 ms. A dialer's socket that is not TCP keeps its own.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _set_keepalive(sock, self._keepalive)
        flow.sock = sock
        if flow.fd < 0:  # dialed by a task: not in our epoll yet
            flow.fd = sock.fileno()
            self._by_fd[flow.fd] = flow
            # registering reports what is already there (input that came with the connect)
            self._epoll.register(flow.fd, _FLOW_EVENTS)
        flow.state = _OPEN
        self.stats.open_ok += 1
        self._send([wire.header(Cmd.OPEN_OK, flow.fid, flow.window)])
        if flow.credit > 0:
            self._start_reading(flow)

    def redial(self, flow: Flow) -> None:
        """`flow`'s dial failed and another is tried: the failed one's socket leaves the epoll
        (a task-less dial closes it after this), the flow stays DIALING."""
        self._unregister(flow)
        flow.fd = -1

    def dial_failed(self, flow: Flow) -> None:
        """`flow`'s dial failed: the flow is gone (the caller answers OPEN_FAIL, and a task-less
        dial closes its socket after this)."""
        self._unregister(flow)
        self._forget(flow)

    # ---- flow sockets ----------------------------------------------------------------------

    def on_events(self) -> None:
        """Handles what the flows' sockets have to say (call when `fileno()` is readable)."""
        by_fd = self._by_fd
        for fd, ev in self._epoll.poll(0, EVENT_BUDGET):
            flow = by_fd.get(fd)
            if flow is None:
                continue
            # Edge-triggered: an event not handled now is never reported again, so a failure
            # in one flow (a dialer's odd socket, a bug) must not cost the rest of the batch.
            try:
                self._on_event(flow, ev)
            except Exception as exc:
                self._event_failed(flow, exc)
        self.flush()

    def _on_event(self, flow: Flow, ev: int) -> None:
        """What `flow`'s socket reported (`ev`, epoll's bits): a dial's progress, input, room
        for output, an error."""
        state = flow.state
        if state is _DIALING:
            dial = flow.dial
            assert isinstance(dial, Connecting)
            if not dial.handshaking:
                if not ev & _OUT_EVENTS:
                    return
                dial.connect_done()  # a proxy's handshake starts here
                if not dial.handshaking or not ev & _IN_EVENTS or flow.dial is not dial:
                    state = flow.state
                    if state is not _OPEN:
                        return
            if dial.handshaking:
                if not ev & _IN_EVENTS:
                    return
                dial.readable()
                state = flow.state
                if state is not _OPEN:
                    return
                hs = dial.handshake
                assert hs is not None
                if not hs.leftover and not ev & _HUP_EVENTS:
                    return  # the proxy's answer was all that came: nothing to relay yet
        if ev & select.EPOLLERR and self._failed(flow):
            return
        if ev & _IN_EVENTS:
            flow.readable = True
            if ev & _HUP_EVENTS:
                flow.hup = True
            if flow.credit > 0 and (state is _OPEN or state is _STACK_FIN):
                self._on_readable(flow)
        if ev & _OUT_EVENTS and flow.queue and flow.state is not _CLOSED:
            self._on_writable(flow)

    def _event_failed(self, flow: Flow, exc: Exception) -> None:
        """Handling `flow`'s events raised: the flow ends (see `fault`)."""
        self.failures.log(type(exc).__name__, "flow %d: %s: handling its socket failed (%r); "
                          "the flow is reset", flow.fid, flow.dst, exc, exc_info=exc)  # fmt: skip
        if self.flows.get(flow.fid) is flow:  # (else it ended before the failure)
            self.fault(flow.fid)

    def fault(self, fid: int) -> bool:
        """Code handling flow `fid` failed: the flow ends (OPEN_FAIL if it was still dialing,
        else RST) with ECONNABORTED, and the app sees a reset instead of a flow that hangs.
        False if there is no such flow."""
        flow = self.flows.get(fid)
        if flow is None:
            return False
        if flow.state is _DIALING:
            self._free(flow, abortive=True)
            self.stats.open_failed(errno.ECONNABORTED)
            self._send([wire.header(Cmd.OPEN_FAIL, flow.fid, errno.ECONNABORTED)])
        else:
            self._reset(flow, errno.ECONNABORTED)
        return True

    def _failed(self, flow: Flow) -> bool:
        """An error on the socket: the flow is reset (True). The socket stays watched after
        the destination's EOF, when nothing is read or written there any more: a reset that
        comes then (a proxy that ended the tunnel answering the app's next bytes) must reach
        the app as a reset too, not stay an EOF."""
        assert flow.sock is not None
        code = flow.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if not code:
            return False
        self._destination_failed(flow, OSError(code, errname(code)))
        return True

    def _unregister(self, flow: Flow, *, closing: bool = False) -> None:
        """Out of the table's view; `closing`: its socket is closed right after, which takes it
        out of the epoll too (one epoll_ctl less per flow)."""
        if flow.fd >= 0 and self._by_fd.get(flow.fd) is flow:
            del self._by_fd[flow.fd]
            if not closing:
                with contextlib.suppress(OSError, ValueError):  # ValueError: the epoll is closed
                    self._epoll.unregister(flow.fd)
        self._more.pop(flow.fid, None)

    # ---- destination -> stack --------------------------------------------------------------

    def _start_reading(self, flow: Flow) -> None:
        # edge-triggered: read now only if input is known to be waiting; else its edge will come
        state = flow.state
        if flow.readable and (state is _OPEN or state is _STACK_FIN):
            self._on_readable(flow)

    def _on_readable(self, flow: Flow) -> None:  # noqa: PLR0911 - each return ends a read loop
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
                self._on_eof(flow)
                return
            size = len(data)
            if size < want and flow.hup:
                # the EOF (or an error) waits behind these bytes: read on, and an EOF goes
                # with them in one message (DATA_FIN)
                try:
                    rest = sock.recv(want - size)
                except (BlockingIOError, InterruptedError):
                    rest = None
                except OSError as exc:
                    self._destination_failed(flow, exc)
                    return
                if rest == b"":
                    self.stats.bytes_to_stack += size
                    self._send([wire.header(Cmd.DATA_FIN, flow.fid, flow.sent(size)), data])
                    self._on_eof(flow, said=True)
                    return
                if rest:
                    data += rest
                    size = len(data)
            self.stats.bytes_to_stack += size
            self._send([wire.header(Cmd.DATA, flow.fid, flow.sent(size)), data])
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
            self._more_scheduled = True
            self._loop.call_soon(self._read_more)

    def _on_eof(self, flow: Flow, *, said: bool = False) -> None:
        """The destination's EOF: FIN to the stack (`said`: it went with the last DATA, as
        DATA_FIN), with the credit held back (no DATA will carry it now) as CREDIT_FIN."""
        flow.readable = False
        self._more.pop(flow.fid, None)
        held = flow.fin_sent()
        if not said:
            if held:
                self._send([wire.header(Cmd.CREDIT_FIN, flow.fid, held)])
            else:
                self._send([wire.header(Cmd.FIN, flow.fid, 0)])
        if flow.state is _OPEN:
            flow.state = _DEST_FIN
        elif flow.queue:  # STACK_FIN, with the stack's last bytes still to write
            flow.state = _CLOSING
        else:  # STACK_FIN, written and shut down: done both ways
            self._finish(flow)

    def _read_more(self) -> None:
        self._more_scheduled = False
        more, self._more = self._more, {}
        for flow in more.values():
            if flow.credit > 0:
                try:
                    self._start_reading(flow)
                except Exception as exc:  # as in on_events: the other flows still get their turn
                    self._event_failed(flow, exc)

    def on_credit(self, fid: int, amount: int) -> None:
        flow = self.flows.get(fid)
        if flow is None:
            self.others.on_credit(fid, amount)  # a datagram session's, or late
            return
        flow.grant(amount)
        state = flow.state
        if (state is _OPEN or state is _STACK_FIN) and flow.credit > 0:
            self._start_reading(flow)

    # ---- stack -> destination --------------------------------------------------------------

    def on_data_fin(self, fid: int, payload: wire.Payload, credit: int = 0) -> None:
        """DATA_FIN: the stack's last bytes and its FIN in one message."""
        self.on_data(fid, payload, credit)
        flow = self.flows.get(fid)
        if flow is not None:
            self.on_fin(fid)

    def on_credit_fin(self, fid: int, amount: int) -> None:
        """CREDIT_FIN: credit, then the stack's FIN."""
        if amount:
            self.on_credit(fid, amount)
        self.on_fin(fid)

    def on_data(self, fid: int, payload: wire.Payload, credit: int = 0) -> None:
        if credit:  # credit the stack carried along (DATA's arg), as if a CREDIT came first
            self.on_credit(fid, credit)
        flow = self.flows.get(fid)
        if flow is None:
            self.stats.resets_sent += 1
            self._send([wire.header(Cmd.RST, fid, 0)])
            return
        state = flow.state
        if state is not _OPEN and state is not _DEST_FIN:
            why = "DATA before OPEN_OK" if state is _DIALING else "DATA after FIN"
            self._flow_protocol_error(flow, why)
            return
        size = len(payload)
        if not flow.accept(size):
            self._flow_protocol_error(flow, "DATA beyond the credit window")
            return
        if flow.queue:
            flow.queue.append(payload)
            return
        sock = flow.sock
        assert sock is not None
        try:
            sent = sock.send(payload)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._destination_failed(flow, exc)
            return
        self.stats.bytes_to_destination += sent
        if sent < size:
            # the socket is full: its room comes as an output edge, and on_events writes the
            # queue then
            flow.head_written = sent
            flow.queue.append(memoryview(payload)[sent:])
        else:
            self._written(flow, size)

    def _written(self, flow: Flow, size: int) -> None:
        """A DATA of `size` bytes is written whole. Its credit goes back only now: a DATA partly
        written holds all of its buffer, and credit for the written part would let the stack
        send that much again on top of it (two windows held for a stalled destination)."""
        if flow.written(size):
            self._credit_due[flow.fid] = flow

    def flush(self) -> None:
        """Sends the credit due. It is batched per wake-up: one CREDIT per flow for everything
        written since."""
        if not self._credit_due:
            return
        due = self._credit_due
        self._credit_due = {}
        for flow in due.values():
            if flow.state is not _CLOSED:
                self._return_credit(flow)

    def _return_credit(self, flow: Flow) -> None:
        """Sends the credit held back for `flow` now, as CREDIT."""
        amount = flow.release()
        if amount:
            self._send([wire.header(Cmd.CREDIT, flow.fid, amount)])

    def _on_writable(self, flow: Flow) -> None:
        sock = flow.sock
        assert sock is not None
        queue = flow.queue
        while queue:
            try:
                if len(queue) == 1:
                    sent = sock.send(queue[0])
                else:
                    sent = sock.sendmsg(list(islice(queue, IOV_MAX)))
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._destination_failed(flow, exc)
                return
            self.stats.bytes_to_destination += sent
            while sent:
                head = queue[0]
                if sent < len(head):
                    queue[0] = memoryview(head)[sent:]
                    flow.head_written += sent
                    break
                sent -= len(head)
                queue.popleft()
                self._written(flow, flow.head_written + len(head))
                flow.head_written = 0
            else:
                continue
            break  # the socket took less than offered: it is full
        if not queue and (flow.state is _STACK_FIN or flow.state is _CLOSING):
            self._shutdown_write(flow)
        self.flush()

    def on_fin(self, fid: int) -> None:
        flow = self.flows.get(fid)
        if flow is None:
            return  # late FIN for a flow that has ended
        state = flow.state
        if state is _DIALING:
            self._flow_protocol_error(flow, "FIN before OPEN_OK")
            return
        if state is _STACK_FIN or state is _CLOSING:
            self._error(wire.RemoteProtocolError("flow", f"second FIN on flow {fid}"))
            return
        flow.state = _STACK_FIN if state is _OPEN else _CLOSING
        if not flow.queue:
            self._shutdown_write(flow)

    def _shutdown_write(self, flow: Flow) -> None:
        assert flow.sock is not None
        try:
            flow.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self._destination_failed(flow, exc)
            return
        if flow.state is _CLOSING:
            self._finish(flow)

    # ---- ending a flow ---------------------------------------------------------------------

    def on_rst(self, fid: int) -> None:
        flow = self.flows.get(fid)
        if flow is None:
            self.others.on_rst(fid)
            return  # never answer a RST with a RST
        self.stats.resets_received += 1
        self._free(flow, abortive=True)

    def _destination_failed(self, flow: Flow, exc: OSError) -> None:
        code = exc.errno or errno.ECONNRESET
        log.debug("flow %d: %s: %s", flow.fid, flow.dst, errname(code))
        self._reset(flow, code)

    def _flow_protocol_error(self, flow: Flow, why: str) -> None:
        self._error(wire.RemoteProtocolError("flow", f"flow {flow.fid}: {why}"))
        self._reset(flow, errno.EPROTO)

    def _reset(self, flow: Flow, code: int) -> None:
        self.stats.resets_sent += 1
        self._send([wire.header(Cmd.RST, flow.fid, code)])
        self._free(flow, abortive=True)

    def _finish(self, flow: Flow) -> None:
        # the stack learns that all it sent was written only from the credit: send it now, not
        # at the end of this wake-up, when the flow is gone
        self._return_credit(flow)
        self._free(flow, abortive=False)

    def _forget(self, flow: Flow) -> None:
        if self.flows.get(flow.fid) is flow:
            del self.flows[flow.fid]
        self._credit_due.pop(flow.fid, None)
        flow.state = _CLOSED

    def _free(self, flow: Flow, *, abortive: bool) -> None:
        self._forget(flow)
        # out of _by_fd before the close, for the fd number may be reused at once; the close
        # takes it out of the epoll (a socket is never shared with another descriptor)
        self._unregister(flow, closing=True)
        dial = flow.dial
        if dial is not None:
            flow.dial = None
            dial.cancel()  # a connect in flight is reset: the destination sees a reset
        sock = flow.sock
        if sock is not None:
            flow.sock = None
            if abortive:
                abort(sock)
            else:
                sock.close()
        flow.queue.clear()
