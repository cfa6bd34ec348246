"""One TCP flow of the worker: its `State` and what it holds (tunio.worker.tcp runs the table),
and what the flow tables are given: `Send` for their messages and `ErrorSink` for the stack's
protocol errors.

A flow's life, in the messages and events that move it on:

    DIALING --dial done: OPEN_OK--> OPEN
    OPEN --FIN from the stack--> STACK_FIN --destination EOF: FIN--> CLOSED (or CLOSING)
    OPEN --destination EOF: FIN--> DEST_FIN --FIN from the stack--> CLOSED (or CLOSING)
    CLOSING --the last of the stack's bytes written, SHUT_WR--> CLOSED

and from any state to CLOSED at once: a RST either way (a failed dial answers OPEN_FAIL), a
protocol error (RST EPROTO), or a socket error (RST with its errno). CLOSING is the time the
destination needs to take what the stack sent before its FIN.
"""

from __future__ import annotations

import enum
import socket
from collections import deque
from collections.abc import Callable
from typing import Protocol

from tunio import wire
from tunio.dialers.base import Address, Dialer
from tunio.worker.credit import Credit
from tunio.worker.dial import Dial

#: how a flow table sends a message to the stack (the link's `send`)
Send = Callable[[list[wire.Payload]], None]
#: where a flow table reports a message from the stack that breaks the protocol
ErrorSink = Callable[[wire.ProtocolError], None]


class State(enum.Enum):
    """Where a TCP flow is. We read from the destination in OPEN and STACK_FIN (we have not said
    FIN); the stack may send DATA in OPEN and DEST_FIN (it has not said FIN)."""

    DIALING = "dialing"  # OPEN came; the dial is in flight, no OPEN_OK yet
    OPEN = "open"  # OPEN_OK sent: bytes flow both ways
    STACK_FIN = "stack-fin"  # the stack said FIN: its bytes are written out, then SHUT_WR
    DEST_FIN = "dest-fin"  # the destination's EOF came and we said FIN; the stack still sends
    CLOSING = "closing"  # both said FIN; the last of the stack's bytes are still being written
    CLOSED = "closed"  # out of the table: both FINs done, a RST either way, or a failed dial


class Flow(Credit):
    """One TCP flow: the stack's side is the flow id, ours is the outbound socket.

    In STACK_FIN the write side is shut down as soon as the queue is empty, so an empty queue
    there means SHUT_WR is done."""

    __slots__ = ("dial", "dst", "fd", "fid", "head_written", "hup", "queue", "readable", "sock",
                 "src", "state", "tries", "via")  # fmt: skip

    def __init__(self, fid: int, credit: int, window: int, dst: Address) -> None:
        super().__init__(credit, window)
        self.fid = fid
        self.dst = dst
        self.state = State.DIALING
        self.dial: Dial[Flow, socket.socket] | None = None
        self.sock: socket.socket | None = None  # once connected
        self.fd = -1  # in the epoll from the start of a task-less dial, else from OPEN_OK
        self.readable = False  # an input edge came and the socket was not read empty since
        self.hup = False  # the destination's EOF (or an error) is waiting behind any data
        self.queue: deque[wire.Payload] = deque()  # stack's bytes not yet accepted by the socket
        self.head_written = 0  # bytes of the first DATA in the queue written already
        self.src: Address = dst  # the app (set by the opener)
        self.tries: list[Dialer] = []  # dialers still to try if the dial in flight fails
        self.via = ""  # the label of the dialer carrying it


class OtherFlows(Protocol):
    """Who else has flow ids from the stack's counter (the datagram sessions): CREDIT and RST
    for an id that is not a TCP flow go there."""

    def on_credit(self, fid: int, amount: int) -> None: ...

    def on_rst(self, fid: int) -> None: ...


class NoOthers:
    """No one else: late credit is ignored, and a RST is never answered."""

    def on_credit(self, fid: int, amount: int) -> None:
        pass  # late credit for a flow that has ended

    def on_rst(self, fid: int) -> None:
        pass  # never answer a RST with a RST
