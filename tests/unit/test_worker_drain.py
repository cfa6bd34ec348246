"""The link's drain gives the event loop back after DRAIN_TIME, however many messages wait: a
batch of bulk DATA must not hold back the heartbeat (the stack takes a worker that is silent for
heartbeat x liveness for dead and resets all its flows). Driven by hand: a fake loop whose clock
the DATA handler advances, and a fake socket with the messages queued."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import zmq

from tunio import wire
from tunio.wire import Cmd
from tunio.worker import link as link_mod
from tunio.worker.link import DRAIN_BUDGET, DRAIN_TIME, Handlers, Link
from tunio.worker.stats import WorkerStats

PER_MESSAGE = 0.01  # seconds each DATA costs the worker here


class FakeLoop:
    def __init__(self) -> None:
        self.now = 0.0
        self.soon: list[Callable[[], None]] = []

    def time(self) -> float:
        return self.now

    def call_soon(self, callback: Callable[[], None], *args: Any) -> None:
        self.soon.append(callback)


class FakeSocket:
    def __init__(self, messages: list[list[zmq.Frame]]) -> None:
        self.messages = deque(messages)

    def recv_multipart(self, flags: int = 0, copy: bool = True) -> list[zmq.Frame]:
        if not self.messages:
            raise zmq.Again
        return self.messages.popleft()

    def getsockopt(self, option: int) -> int:
        return zmq.POLLIN if self.messages else 0


class NotDone:
    def done(self) -> bool:
        return False


def _link(loop: FakeLoop, messages: int, cost: float = PER_MESSAGE) -> tuple[Link, list[int]]:
    handled: list[int] = []

    def data(fid: int, payload: wire.Payload, credit: int) -> None:
        handled.append(fid)
        loop.now += cost

    def nothing(*args: Any) -> None:
        return None

    link = Link(loop, "ipc:///nonexistent", name="t", stats=WorkerStats())  # type: ignore[arg-type]
    frames = [[zmq.Frame(wire.header(Cmd.DATA, 7, 0)), zmq.Frame(b"x" * 100)]
              for _ in range(messages)]  # fmt: skip
    link._zsock = FakeSocket(frames)  # type: ignore[assignment]
    link._done = NotDone()  # type: ignore[assignment]
    link._handlers = Handlers(
        data=data, credit=nothing, fin=nothing, rst=nothing, open=nothing, dgram=nothing,
        data_fin=nothing, credit_fin=nothing, flush=nothing, drop=nothing, count=lambda: 1,
    )  # fmt: skip
    return link, handled


def test_a_drain_stops_after_drain_time_and_goes_on_later() -> None:
    loop = FakeLoop()
    link, handled = _link(loop, DRAIN_BUDGET)
    link._drain()
    # the clock passed DRAIN_TIME after about DRAIN_TIME / PER_MESSAGE messages, not 512
    assert len(handled) <= round(DRAIN_TIME / PER_MESSAGE) + 1
    assert loop.soon == [link._drain]  # the rest waits for the next turn, after the timers
    while loop.soon:
        loop.soon.pop()()
    assert len(handled) == DRAIN_BUDGET  # nothing lost, order kept
    assert link_mod.DRAIN_TIME < 1.0  # well inside one heartbeat interval


def test_a_cheap_batch_still_drains_in_one_turn() -> None:
    loop = FakeLoop()
    link, handled = _link(loop, 100, cost=0.0)
    link._drain()
    assert len(handled) == 100
    assert loop.soon == []  # the socket is empty: nothing to come back for
