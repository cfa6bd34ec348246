"""The worker's datagram sessions: UDP, and ICMP echo (ping), which is a session like UDP's.

The first DGRAM of a flow id opens one (through the dialer's `dial_udp`, or `dial_ping` for an
ICMP echo session), replies go back as DGRAMs, and credit is counted in datagrams; a datagram
either side has no credit for is dropped and counted, as a full queue drops UDP anywhere.

Like the TCP table, this one sends through the `send` function it is given and reports what the
stack got wrong to `error`. A session's descriptor is watched by the event loop (`add_reader`):
level-triggered, so a session is read until `recv()` returns None or its turn is over.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Container
from typing import cast

from tunio import defaults, wire
from tunio.dialers import label
from tunio.dialers.base import Address, DatagramDialer, DatagramSession, Dialer, PingDialer
from tunio.dialers.routing import left_as_the_app
from tunio.errors import is_errno
from tunio.logs import EverySecond
from tunio.owner import OwnerLookup
from tunio.policy import Flow as PolicyFlow
from tunio.policy import Owner, Policy, Reject, decide
from tunio.wire import Cmd
from tunio.worker.credit import DatagramCredit
from tunio.worker.dial import Dial, Dialing
from tunio.worker.flow import ErrorSink, Send
from tunio.worker.loops import RoutingLoops
from tunio.worker.names import Names
from tunio.worker.stats import WorkerStats, errname

log = logging.getLogger("tunio.worker")

#: DGRAMs a side may send on a UDP session before it gets CREDIT (docs/protocol.md)
UDP_WINDOW = defaults.UDP_CREDIT
#: datagrams read from one UDP session per wake-up before other sockets get their turn
UDP_BUDGET = 64
#: IP protocols a DGRAM session may carry: UDP, and ICMP / ICMPv6 echo (docs/protocol.md)
_DGRAM_PROTOS = frozenset({wire.IPPROTO_UDP, 1, 58})

OpenSession = Callable[[Address, Address], Awaitable[DatagramSession]]


class UdpSession(DatagramCredit):
    """One UDP session: the stack's flow id and the dialer's DatagramSession."""

    __slots__ = ("address", "closed", "dial", "dialer", "dst", "fd", "fid", "named", "pending",
                 "ping", "reply_block", "session", "src", "tries", "version")  # fmt: skip

    def __init__(self, fid: int, block: wire.AddressBlock, name: str | None = None) -> None:
        super().__init__(UDP_WINDOW)
        self.fid = fid
        self.address = Address(str(block.dst), block.dst_port)  # the IP the app sent to
        # to a fake-IP address: the name the stack said (NAME) is what the dialer gets, and
        # every reply is said to come from the fake address the app knows
        self.named = name is not None
        self.dst = Address(name, block.dst_port) if name is not None else self.address
        self.version = block.version
        # replies normally come from the destination: their address block is made once
        self.reply_block = wire.AddressBlock(
            block.proto, block.version, block.dst, block.dst_port, block.src, block.src_port
        ).pack()
        self.session: DatagramSession | None = None
        self.fd = -1
        self.dial: Dial[UdpSession, DatagramSession] | None = None
        self.pending: deque[wire.Payload] = deque()  # datagrams that came while dialing
        self.closed = False
        self.src = Address(str(block.src), block.src_port)  # the app
        self.ping = block.proto != wire.IPPROTO_UDP  # an ICMP echo session
        self.tries: list[Dialer] = []  # dialers still to try if the dial in flight fails
        self.dialer: Dialer | None = None  # the one dialing now

    def block_from(self, src: Address) -> bytes:
        """The address block of a reply that came from `src` (to the app)."""
        if self.named or src is self.dst or src == self.dst:
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


def _close_session(session: DatagramSession) -> None:
    session.close()


class DatagramTable:
    """The datagram sessions by flow id. `tcp_flows` holds the ids of the TCP flows (the same
    counter numbers both): a DGRAM on one of those is the stack's error."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        dialer: Dialer,
        *,
        send: Send,
        error: ErrorSink,
        stats: WorkerStats,
        tcp_flows: Container[int] = (),
        connect_timeout: float = defaults.CONNECT_TIMEOUT,
        name: str = "",
        policy: Policy | None = None,
        owners: OwnerLookup | None = None,
        names: Names | None = None,
    ) -> None:
        """`policy` picks the dialer of each new session as it does for TCP flows (a list is
        tried in order until one opens the session); `owners` looks up the app behind it."""
        self.sessions: dict[int, UdpSession] = {}
        self._names = names
        self.stats = stats
        self._loop = loop
        self._send = send
        self._error = error
        self._tcp_flows = tcp_flows
        self._default = dialer
        self._name = name
        self._policy = policy
        self._owners = owners
        # one line a second under a flood of refused sessions, not one a session
        self.refusals = EverySecond(log, logging.INFO, "refused udp sessions")
        # a user's session that fails the same way for every datagram: a traceback a second
        self.faults = EverySecond(log, logging.ERROR, "udp sessions ended by their own failure")
        self._dialing: Dialing[UdpSession, DatagramSession] = Dialing(
            loop, connect_timeout, self._dialed, what="udp dial", discard=_close_session
        )
        self._credit_due: dict[int, UdpSession] = {}
        self.loops = RoutingLoops(stats, name)

    def __len__(self) -> int:
        return len(self.sessions)

    def drop_all(self) -> None:
        for udp in list(self.sessions.values()):
            self._free(udp)

    # ---- the stack's messages --------------------------------------------------------------

    def on_dgram(self, fid: int, payload: wire.Payload) -> None:
        udp = self.sessions.get(fid)
        if udp is None:
            self._open(fid, payload)
            return
        if not udp.accept():
            self.stats.datagrams_dropped_window += 1
            return
        data = memoryview(payload)[wire.ADDRESS.size :]
        session = udp.session
        if session is None:
            udp.pending.append(data)  # at most UDP_WINDOW: the credit in flight bounds it
            return
        self._forward(udp, session, data)

    def on_credit(self, fid: int, amount: int) -> None:
        udp = self.sessions.get(fid)
        if udp is not None:
            udp.grant(amount)
        # else late credit for a session that has ended

    def on_rst(self, fid: int) -> None:
        udp = self.sessions.get(fid)
        if udp is not None:
            self.stats.resets_received += 1
            self._free(udp)

    def flush(self) -> None:
        """Sends the credit due: one CREDIT per session for the datagrams handled since."""
        if not self._credit_due:
            return
        due = self._credit_due
        self._credit_due = {}
        for fid, udp in due.items():
            if not udp.closed:
                amount = udp.release()
                if amount:
                    self._send([wire.header(Cmd.CREDIT, fid, amount)])

    # ---- opening a session -----------------------------------------------------------------

    def _open(self, fid: int, payload: wire.Payload) -> None:
        if fid in self._tcp_flows:
            self._error(wire.RemoteProtocolError("flow", f"DGRAM on TCP flow {fid}"))
            return
        try:
            block = wire.AddressBlock.unpack(payload)
        except wire.ProtocolError as exc:
            self._error(exc)
            self._refuse(fid, None, errno.EINVAL)
            return
        if block.proto not in _DGRAM_PROTOS:
            why = f"DGRAM of IP protocol {block.proto}"
            self._error(wire.RemoteProtocolError("address", why))
            self._refuse(fid, None, errno.EPROTONOSUPPORT)
            return
        name = self._names.take(fid) if self._names is not None else None
        udp = UdpSession(fid, block, name)
        tries: list[Dialer] | Reject = [self._default]
        if self._policy is not None:
            lookup = self._owner_of if self._owners is not None and not udp.ping else None
            info = PolicyFlow(udp.src, udp.dst, "icmp" if udp.ping else "udp", worker=self._name,
                              address=udp.address, lookup=lookup)  # fmt: skip
            tries = decide(self._policy, info, self._default)
        if isinstance(tries, Reject):
            self.stats.refused_by_policy += 1
            self._refuse(fid, udp.dst, tries.errno)
            return
        # ICMP echo (proto 1/58) is a session like UDP's, opened by a dialer's dial_ping; the
        # dialers that cannot carry this kind are passed over
        udp.tries = [d for d in tries if isinstance(d, PingDialer if udp.ping else DatagramDialer)]
        if not udp.tries:
            self._refuse(fid, udp.dst, errno.EPROTONOSUPPORT)
            return
        self.stats.udp_opens += 1
        self.sessions[fid] = udp
        udp.accept()
        udp.pending.append(memoryview(payload)[wire.ADDRESS.size :])
        self._dial_next(udp)

    def _owner_of(self, info: PolicyFlow) -> Owner | None:
        assert self._owners is not None
        return self._owners.owner(info.protocol, info.src, info.address)

    def _dial_next(self, udp: UdpSession) -> None:
        dialer = udp.dialer = udp.tries.pop(0)
        opener: OpenSession = (
            cast(PingDialer, dialer).dial_ping if udp.ping
            else cast(DatagramDialer, dialer).dial_udp
        )  # fmt: skip
        udp.dial = self._dialing.task(udp, opener, udp.dst, udp.src)

    def _refuse(self, fid: int, dst: Address | None, code: int) -> None:
        self.stats.udp_open_fail += 1
        self.stats.resets_sent += 1
        name = errname(code)
        self.refusals.log(name, "udp session %d: to %s refused: %s", fid, dst, name)
        self._send([wire.header(Cmd.RST, fid, code)])

    def _dialed(self, udp: UdpSession, session: DatagramSession | None, code: int,
                _why: str) -> None:  # fmt: skip
        udp.dial = None
        if session is not None and self._looped(udp, session):
            session, code = None, errno.ENETUNREACH
        if session is None:
            if self.sessions.get(udp.fid) is udp:
                if udp.tries:  # a policy's list: the next dialer
                    self.stats.failovers += 1
                    self._dial_next(udp)
                    return
                self._free(udp)
                self._refuse(udp.fid, udp.dst, code)
            return
        if udp.closed or self.sessions.get(udp.fid) is not udp:
            session.close()  # reset while dialing
            return
        try:
            fd = session.fileno()
            self._loop.add_reader(fd, self._readable, udp)
        except (AttributeError, TypeError, ValueError, OSError) as exc:
            # a user's dialer answered what is not a session with a file descriptor
            log.error("udp session %d: to %s: the dialer answered %r, which cannot be "
                      "relayed: %s", udp.fid, udp.dst, session, exc)  # fmt: skip
            with contextlib.suppress(Exception):
                session.close()
            self._free(udp)
            self._refuse(udp.fid, udp.dst, errno.ECONNABORTED)
            return
        udp.session = session
        udp.fd = fd
        pending = udp.pending
        while pending and not udp.closed:
            self._forward(udp, session, pending.popleft())
        if udp.closed:
            return
        # this ran from the dial, not from the stack's messages: the credit for the queue must
        # not wait for the next of those
        self.flush()

    def _looped(self, udp: UdpSession, session: DatagramSession) -> bool:
        """Whether `session` was routed into the TUN again (tunio.worker.loops): closed then,
        before any datagram of it could circle through the TUN for good."""
        try:
            sock = getattr(session, "sock", None)
        except Exception:  # (a dialer's own session type, whose attribute raised)
            return False
        if not left_as_the_app(sock, udp.src.host):
            return False
        what = "ping session" if udp.ping else "udp session"
        self.loops.found(what, udp.dst, label(udp.dialer) if udp.dialer else "?", udp.src.host)
        with contextlib.suppress(Exception):
            session.close()
        return True

    # ---- datagrams -------------------------------------------------------------------------

    def _forward(self, udp: UdpSession, session: DatagramSession, data: wire.Payload) -> None:
        try:
            sent = session.send(data)
        except OSError as exc:
            self._failed(udp, exc)
            return
        except Exception as exc:  # a user's session: its bug ends its session only
            self._session_failed(udp, "send", exc)
            return
        if sent:
            self.stats.datagrams_to_destination += 1
        else:
            self.stats.datagrams_dropped_send += 1
        udp.done()
        self._credit_due[udp.fid] = udp

    def _readable(self, udp: UdpSession) -> None:
        session = udp.session
        assert session is not None
        for _ in range(UDP_BUDGET):
            try:
                got = session.recv()
                if got is None:
                    return
                data, src = got
                message = udp.block_from(src) + data
            except OSError as exc:
                self._failed(udp, exc)
                return
            except Exception as exc:
                # a user's session that raises, or answers what is not (bytes, Address): its
                # descriptor stays readable, so a reader left in place would fail on every turn
                # of the loop while the session goes silent
                self._session_failed(udp, "recv", exc)
                return
            if not udp.spend():
                self.stats.datagrams_dropped_credit += 1
                continue
            self.stats.datagrams_to_stack += 1
            self._send([wire.header(Cmd.DGRAM, udp.fid, 0), message])

    def fault(self, fid: int) -> bool:
        """Code handling session `fid` failed: it ends (RST ECONNABORTED to the stack, which
        answers the app with an ICMP error). False if there is no such session."""
        udp = self.sessions.get(fid)
        if udp is None:
            return False
        self._failed(udp, OSError(errno.ECONNABORTED, "a fault handling it"))
        return True

    def _session_failed(self, udp: UdpSession, call: str, exc: Exception) -> None:
        """The dialer's session raised what is not an OSError in `call`: a bug of its own,
        logged (a traceback a second at most), and the session ends with ECONNABORTED."""
        self.faults.log(type(exc).__name__, "udp session %d: to %s: the session's %s() failed "
                        "(%r); it ends with ECONNABORTED", udp.fid, udp.dst, call, exc,
                        exc_info=exc)  # fmt: skip
        self._failed(udp, OSError(errno.ECONNABORTED, f"the session's {call}() failed"))

    def _failed(self, udp: UdpSession, exc: OSError) -> None:
        code = exc.errno if is_errno(exc.errno) else errno.EIO  # a user's session may say -1
        log.debug("udp session %d: %s: %s", udp.fid, udp.dst, errname(code))
        self._free(udp)  # first: whoever hears the RST finds the session gone
        self.stats.resets_sent += 1
        self._send([wire.header(Cmd.RST, udp.fid, code)])

    def _free(self, udp: UdpSession) -> None:
        if self.sessions.get(udp.fid) is udp:
            del self.sessions[udp.fid]
        self._credit_due.pop(udp.fid, None)
        udp.closed = True
        udp.pending.clear()
        if udp.dial is not None:
            udp.dial.cancel()
            udp.dial = None
        session = udp.session
        if session is not None:
            udp.session = None
            if udp.fd >= 0:
                self._loop.remove_reader(udp.fd)
                udp.fd = -1
            session.close()
