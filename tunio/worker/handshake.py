"""What ZeroMQ's handshakes with the stack told the link, which its DEALER never says.

A stack whose ZAP handler refuses this worker's CURVE key ends the connection with status 400,
and libzmq then never connects again: without this the worker would wait for good, saying only
that no stack answers. A handshake that fails without a word (the stack closes the connection:
the stack's public key in our key file is not that stack's, or the endpoint is no tunio stack's)
is retried by libzmq; counted here, it turns "no stack answers" into what to check.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import cast

import zmq
from zmq.utils.monitor import recv_monitor_message

#: the handshake events watched (ZeroMQ's socket monitor)
EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
          | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)  # fmt: skip


class HandshakeWatch:
    """Watches `zsock`'s handshakes from `loop`; `refused(status)` is called once the stack's
    ZAP handler refuses us (ZeroMQ will not try again), `failed` counts the other failures since
    the last handshake that succeeded."""

    def __init__(self, loop: asyncio.AbstractEventLoop, zsock: zmq.Socket[bytes],
                 refused: Callable[[int], None]) -> None:  # fmt: skip
        self._loop = loop
        self._refused = refused
        self.failed = 0
        self._monitor: zmq.Socket[bytes] | None = zsock.get_monitor_socket(EVENTS)
        self._zsock = zsock
        self._fd = cast(int, self._monitor.getsockopt(zmq.FD))
        loop.add_reader(self._fd, self._read)
        # A pipe nobody has read from never signals the fd of what comes into it: one read that
        # finds nothing arms it.
        self._read()

    def _read(self) -> None:
        # ZMQ_FD is edge-triggered: read every event there is
        monitor = self._monitor
        while monitor is not None:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            kind, value = event["event"], event["value"]
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.failed = 0
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self._refused(value)
            else:
                self.failed += 1
            monitor = self._monitor  # the callback may have closed us

    def close(self) -> None:
        monitor = self._monitor
        if monitor is None:
            return
        self._monitor = None
        self._loop.remove_reader(self._fd)
        with contextlib.suppress(zmq.ZMQError):
            self._zsock.disable_monitor()
        monitor.close(linger=0)
