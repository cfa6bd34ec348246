"""OPEN of a TCP flow: the checks, the dial, and the answer (OPEN_OK or OPEN_FAIL).

What happens between the stack's OPEN and the worker's answer is here, apart from the relay that
follows (tunio.worker.tcp): a flow is added to the table DIALING, dialled through
tunio.worker.dial, and handed back to the table connected (which says OPEN_OK) or dropped with
OPEN_FAIL and the errno the app should see.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time

from tunio import defaults, ports, wire
from tunio.dialers import label
from tunio.dialers.base import Address, Dialer
from tunio.dialers.routing import RoutingLoop, left_as_the_app
from tunio.logs import EverySecond
from tunio.owner import OwnerLookup
from tunio.policy import Flow as PolicyFlow
from tunio.policy import Owner, Policy, Reject, decide
from tunio.wire import Cmd
from tunio.worker.dial import Connecting, TcpDialing, abort, open_socket
from tunio.worker.flow import ErrorSink, Flow, Send, State
from tunio.worker.loops import RoutingLoops
from tunio.worker.names import Names
from tunio.worker.stats import WorkerStats
from tunio.worker.tcp import TcpTable

log = logging.getLogger("tunio.worker")

#: seconds between two warnings that the local ports are used up (see tunio.ports)
PORT_WARNING_INTERVAL = 60.0
#: dialers whose dial state (TcpDialing, label) is kept for their next flows; past it the
#: oldest is let go (a policy may make a new dialer object for every flow)
DIALINGS_KEPT = 64


def _wrong_answer(sock: object, dialled: bool) -> str | None:
    """What is wrong with a dialer's answer for the relay, if anything. A socket from a dial
    (`dialled`: not a connect the worker watched to its end) must be connected too: a
    listening socket, or one whose connect the dialer did not await, would fail the flow with
    a reset and no word of why."""
    if not open_socket(sock):
        return f"the dialer answered {sock!r:.80}, not an open stream socket"
    if dialled:
        try:
            sock.getpeername()
        except OSError:
            return f"the dialer answered {sock!r:.80}, not connected"
    return None


class TcpOpener:
    """Takes OPENs for `table`: `capacity` flows at most (0: no limit), each dialled within
    `connect_timeout` through what `policy` picks for it (tunio.policy), `dialer` by default.

    A policy's list of dialers is tried in order: a failed dial moves on to the next before the
    stack is answered, so the app sees one clean connect, or only the last failure. `owners`
    looks up the app behind a flow, for the policies that ask (Flow.uid, .pid, .process)."""

    def __init__(
        self,
        table: TcpTable,
        dialer: Dialer,
        loop: asyncio.AbstractEventLoop,
        *,
        send: Send,
        error: ErrorSink,
        stats: WorkerStats,
        capacity: int = 0,
        connect_timeout: float = defaults.CONNECT_TIMEOUT,
        name: str = "",
        policy: Policy | None = None,
        owners: OwnerLookup | None = None,
        names: Names | None = None,
    ) -> None:
        self.table = table
        self._names = names
        self.stats = stats
        self._send = send
        self._error = error
        self._capacity = capacity
        self._name = name
        self._loop = loop
        self._timeout = connect_timeout
        self._default = dialer
        self._policy = policy
        self._owners = owners
        self._lookup = self._owner_of if owners is not None else None
        # one TcpDialing (and label) per dialer a flow may take, made on its first flow
        self._dialings: dict[int, tuple[Dialer, TcpDialing[Flow], str]] = {}
        self._next_port_warning = 0.0  # see _open_failed
        self.loops = RoutingLoops(stats, name)
        # one line a second under a flood of failing dials, not one a flow
        self.failures = EverySecond(log, logging.INFO, "failed dials")
        self._wrong_answers: set[tuple[str, type]] = set()  # (dialer, kind) logged

    def on_open(self, fid: int, credit: int, payload: wire.Payload) -> None:
        """OPEN: `credit` is the window the stack gives us, `payload` the address block."""
        self.stats.opens += 1
        flows = self.table.flows
        if fid == 0 or fid in flows:
            self._error(wire.RemoteProtocolError("flow", f"OPEN of flow {fid} in use"))
            return
        try:
            proto, src_host, src_port, dst_host, dst_port = wire.unpack_endpoints(payload)
        except wire.ProtocolError as exc:
            self._error(exc)
            self._open_failed(fid, None, errno.EINVAL)
            return
        address = Address(dst_host, dst_port)  # the IP the app connected to
        if self.loops.held(src_host, dst_host):
            self._open_failed(fid, address, errno.ENETUNREACH, "a routing loop")
            return
        # A flow to a fake-IP address: the stack said its name first (NAME); the dialer gets it
        name = self._names.take(fid) if self._names is not None else None
        dst = Address(name, dst_port) if name is not None else address
        if proto != wire.IPPROTO_TCP:
            self._open_failed(fid, dst, errno.EPROTONOSUPPORT)
            return
        if self._capacity and len(flows) >= self._capacity:
            self._open_failed(fid, dst, errno.EAGAIN)
            return
        src = Address(src_host, src_port)
        if self._policy is None:
            tries: list[Dialer] | Reject = [self._default]
        else:
            info = PolicyFlow(src, dst, "tcp", worker=self._name, address=address,
                              lookup=self._lookup)  # fmt: skip
            tries = decide(self._policy, info, self._default)
        if isinstance(tries, Reject):
            self.stats.refused_by_policy += 1
            self._open_failed(fid, dst, tries.errno, tries.reason)
            return
        flow = self.table.add(fid, credit, dst)
        flow.src = src
        flow.tries = tries
        self._dial_next(flow)

    def _looped(self, flow: Flow, pending: Connecting[Flow]) -> None:
        """`flow`'s connect goes into the TUN again: failed as unreachable (a dialer list goes on
        to its next), and the destination remembered for a second, so that the hop already on
        its way back (its SYN left with the connect) is refused as it arrives, not dialed: the
        loop unwinds at once, each hop's dial failing the same way, and the app sees "network
        unreachable", as with no route out."""
        self.loops.hold(flow.src.host, flow.dst.host)
        self.loops.found("connection", flow.dst, flow.via, flow.src.host)
        pending.fail(errno.ENETUNREACH, "a routing loop: the connection went into the TUN again")

    def _dial_looped(self, flow: Flow, looping: RoutingLoop) -> None:
        """A dial's coroutine found its connection going into the TUN again (the direct
        dialer's check, tunio.dialers.routing: a name's dial, a proxy's or a chain's first
        hop): counted and said as `_looped` does, and the hop on its way back (to where that
        connection was to go) refused as it arrives."""
        self.loops.hold(flow.src.host, looping.to.host)
        self.loops.found("connection", flow.dst, flow.via, flow.src.host)

    def _owner_of(self, info: PolicyFlow) -> Owner | None:
        assert self._owners is not None
        return self._owners.owner(info.protocol, info.src, info.address)

    def _dialing_for(self, dialer: Dialer) -> tuple[TcpDialing[Flow], str]:
        made = self._dialings.get(id(dialer))
        if made is None or made[0] is not dialer:
            dialings = self._dialings
            if len(dialings) >= DIALINGS_KEPT:  # the oldest goes; its dials in flight keep theirs
                del dialings[next(iter(dialings))]
            dialing = TcpDialing(dialer, self._loop, self._timeout, self._dialed, self.table.watch)
            dialing.looped = self._dial_looped
            made = dialings[id(dialer)] = (dialer, dialing, label(dialer))
        return made[1], made[2]

    def _dial_next(self, flow: Flow) -> None:
        dialing, via = self._dialing_for(flow.tries.pop(0))
        flow.via = via
        pending = dialing.dial(flow, flow.dst, flow.src)
        if pending is not None:  # else it ended at once, and _dialed has moved the flow on
            flow.dial = pending
            if type(pending) is Connecting and left_as_the_app(pending.sock, flow.src.host):
                self._looped(flow, pending)

    def _dialed(self, flow: Flow, sock: socket.socket | None, code: int, why: str) -> None:
        """How every dial ends: connected (`sock`), or failed with errno `code`."""
        pending = flow.dial
        started = pending.started if pending is not None else None
        flow.dial = None
        if flow.state is not State.DIALING or self.table.flows.get(flow.fid) is not flow:
            if sock is not None:
                abort(sock)  # reset while the dial finished: the destination must see it too
            return
        wrong = None if sock is None else _wrong_answer(sock, type(pending) is not Connecting)
        if wrong is not None:
            code, why = errno.ECONNABORTED, wrong
            if isinstance(sock, socket.socket):
                abort(sock)  # (the dialer handed it over: ours to close)
            said = (flow.via, type(sock))
            if said not in self._wrong_answers:  # a dialer's bug: once, not once a flow
                self._wrong_answers.add(said)
                log.error("dial %s via %s: %s: its flows fail with ECONNABORTED", flow.dst,
                          flow.via, why)  # fmt: skip
            sock = None
        if sock is None:
            name = self.stats.attempt_failed(flow.via, code)
            if flow.tries:
                self.stats.failovers += 1
                log.debug("flow %d: dial %s via %s failed: %s%s; trying the next dialer",
                          flow.fid, flow.dst, flow.via, name,
                          f" ({why})" if why else "")  # fmt: skip
                self.table.redial(flow)
                self._dial_next(flow)
                return
            self.table.dial_failed(flow)
            self._open_failed(flow.fid, flow.dst, code, why)
            return
        if started is not None:
            self.stats.dialed(flow.via, self._loop.time() - started)
        try:
            self.table.connected(flow, sock)
        except (OSError, ValueError) as exc:  # not a socket that epoll takes (a file's fd)
            if flow.state is not State.DIALING:
                raise  # the flow was open: the relay's own failure, not the dialer's answer
            abort(sock)
            self._bad_answer(flow, errno.ECONNABORTED, f"its socket cannot be relayed: {exc}")

    def _bad_answer(self, flow: Flow, code: int, why: str) -> None:
        """The dialer answered what cannot carry the flow: a failure, like a refused dial."""
        log.error("flow %d: dial %s via %s: %s", flow.fid, flow.dst, flow.via, why)
        self.table.dial_failed(flow)
        self._open_failed(flow.fid, flow.dst, code, why)

    def _open_failed(self, fid: int, dst: Address | None, code: int, why: str = "") -> None:
        name = self.stats.open_failed(code)
        self.failures.log(name, "flow %d: dial %s failed: %s%s", fid, dst, name,
                          f" ({why})" if why else "")  # fmt: skip
        if code == errno.EADDRNOTAVAIL:
            now = time.monotonic()
            if now >= self._next_port_warning:  # once a minute at most: it comes in floods
                self._next_port_warning = now + PORT_WARNING_INTERVAL
                log.warning("worker %s: %s", self._name, ports.no_port_hint())
        self._send([wire.header(Cmd.OPEN_FAIL, fid, code)])
