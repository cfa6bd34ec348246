"""The worker's TCP table driven by hand, for its tests: no ZeroMQ, no thread.

The table's messages land in a list (decoded by tunio.wire) and a test calls its handlers as the
link would. The destination is a loopback TCP connection the test holds the other end of. The
table is driven by hand: its epoll is waited on with select() and a bound, then `on_events()`;
the asyncio loop (dial tasks, timers) is run one pass at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import select
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

from tunio import defaults, wire
from tunio.dialers import Address, Dialer
from tunio.wire import Cmd, Message
from tunio.worker.flow import Flow, State
from tunio.worker.opening import TcpOpener
from tunio.worker.stats import WorkerStats
from tunio.worker.tcp import TcpTable

DEADLINE = 10.0
WINDOW = 64 * 1024  # both ways unless a test says otherwise


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two ends of one loopback TCP connection: (ours, the peer's)."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        ours = socket.create_connection(srv.getsockname())
        peer, _ = srv.accept()
    peer.settimeout(DEADLINE)
    return ours, peer


class PairDialer:
    """A coroutine dialer (no start_connect): hands out one end of a fresh connection."""

    def __init__(self) -> None:
        self.peers: list[socket.socket] = []

    async def dial(self, dst: Address, src: Address) -> socket.socket:
        ours, peer = tcp_pair()
        self.peers.append(peer)
        return ours


class Rig:
    """A TcpTable and its TcpOpener, whose messages go to `sent`, and the loop they run on."""

    def __init__(self, dialer: Dialer, **options: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.sent: list[Message] = []  # folded messages as the plain ones (wire.unfold)
        self.raw: list[Message] = []  # as sent
        self.errors: list[wire.ProtocolError] = []
        self.stats = WorkerStats()
        window = options.pop("window", WINDOW)
        keepalive = options.pop("keepalive", defaults.TCP_KEEPALIVE_PROBES)
        self.table = TcpTable(self.loop, send=self._send, error=self.errors.append,
                              stats=self.stats, window=window, keepalive=keepalive)  # fmt: skip
        self.opener = TcpOpener(self.table, dialer, self.loop, send=self._send,
                                error=self.errors.append, stats=self.stats, **options)  # fmt: skip

    def _send(self, frames: list[wire.Payload]) -> None:
        msg = wire.decode(frames)
        # the payload may be a view of a buffer the table reuses: keep a copy
        msg = Message(msg.cmd, msg.flow, msg.arg,
                      None if msg.payload is None else bytes(msg.payload))  # fmt: skip
        self.raw.append(msg)
        self.sent.extend(wire.unfold(msg))

    def take(self) -> list[Message]:
        taken, self.sent = self.sent, []
        return taken

    def open(self, fid: int, port: int = 9, *, credit: int = WINDOW) -> None:
        block = wire.AddressBlock(wire.IPPROTO_TCP, 4, ipaddress.ip_address("198.18.255.9"),
                                  40000 + fid, ipaddress.ip_address("127.0.0.1"), port)  # fmt: skip
        self.opener.on_open(fid, credit, block.pack())

    def step(self) -> None:
        """One pass of the loop: the callbacks that are ready (a dial task's next step, a timer
        that is due), and a look at its selector without waiting."""
        self.loop.call_soon(self.loop.stop)
        self.loop.run_forever()

    def until(self, cond: Callable[[], bool], what: str) -> None:
        """Run the table until `cond()`: the loop one pass at a time, and the table's events
        whenever its epoll is readable (waited for with select, bounded)."""
        deadline = time.monotonic() + DEADLINE
        while True:
            self.step()
            if cond():
                return
            left = deadline - time.monotonic()
            assert left > 0, f"timed out waiting for {what}"
            # short bound: a dial task's socket is the loop's, not in this epoll
            ready, _, _ = select.select([self.table.fileno()], [], [], min(left, 0.05))
            if ready:
                self.table.on_events()
                if cond():
                    return

    def expect(self, cmd: Cmd, fid: int) -> Message:
        """Run the table until it sends a message; it must be `cmd` on `fid`."""
        self.until(lambda: bool(self.sent), f"{cmd.name} on flow {fid}")
        msg = self.sent.pop(0)
        assert (msg.cmd, msg.flow) == (cmd, fid), msg
        return msg

    def settle(self) -> None:
        """Handle whatever the table's sockets have to say right now (nothing is waited for)."""
        self.step()
        if select.select([self.table.fileno()], [], [], 0)[0]:
            self.table.on_events()

    def close(self) -> None:
        self.table.close()
        self.step()  # cancelled dial tasks finish
        self.loop.close()


class Hanging:
    """A coroutine dialer that never connects (until cancelled)."""

    def __init__(self) -> None:
        self.started = self.cancelled = False

    async def dial(self, dst: Address, src: Address) -> socket.socket:
        self.started = True
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        raise AssertionError("unreachable")


def state_of(flow: Flow) -> State:
    return flow.state  # (read afresh: the table changes it behind the test's back)


def data_of(messages: list[Message], fid: int = 1) -> bytes:
    assert all(m.cmd is Cmd.DATA and m.flow == fid for m in messages), messages
    return b"".join(m.payload or b"" for m in messages)


MakeRig = Callable[..., Rig]


@contextlib.contextmanager
def rig_maker() -> Iterator[MakeRig]:
    """Makes Rigs, `make(dialer, **options)` (options of TcpTable and TcpOpener); each is
    closed at the end."""
    made: list[Rig] = []

    def make(dialer: Dialer, **options: Any) -> Rig:
        made.append(Rig(dialer, **options))
        return made[-1]

    try:
        yield make
    finally:
        for rig in made:
            rig.close()
