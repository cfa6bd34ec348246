"""A fake stack (a ROUTER the test drives) and a worker run in a thread: how the worker's tests
see the worker from the stack's side."""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import zmq

from tunio import wire
from tunio.wire import AddressBlock, Cmd, Message

DEADLINE = 10.0
SKIP = frozenset({Cmd.HEARTBEAT})
WINDOW = 64 * 1024


class FakeStack:
    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.bind(endpoint)
        self.identity: bytes | None = None
        self.skipped: list[Message] = []
        self.received: list[Message] = []  # every message as it came (DATA_FIN, CREDIT_FIN)
        self._unfolded: deque[Message] = deque()

    def close(self) -> None:
        self.router.close()
        self.ctx.term()

    def recv(self, timeout: float = DEADLINE) -> Message:
        """The next message, a folded one (DATA_FIN, CREDIT_FIN) as the plain ones it stands
        for (tunio.wire.unfold); `received` keeps them as they came."""
        if self._unfolded:
            return self._unfolded.popleft()
        if not self.router.poll(int(timeout * 1000)):
            raise AssertionError(f"no message from the worker within {timeout}s")
        frames = self.router.recv_multipart()
        self.identity = frames[0]
        msg = wire.decode(frames[1:])
        self.received.append(msg)
        self._unfolded.extend(wire.unfold(msg))
        return self._unfolded.popleft()

    def expect(
        self, cmd: Cmd, flow: int | None = None, *, skip: frozenset[Cmd] = SKIP,
        timeout: float = DEADLINE,
    ) -> Message:
        """The next message that is not in `skip` must be `cmd` (on `flow`)."""
        deadline = time.monotonic() + timeout
        while True:
            msg = self.recv(max(0.0, deadline - time.monotonic()))
            if msg.cmd in skip:
                self.skipped.append(msg)
                continue
            assert msg.cmd is cmd, f"expected {cmd.name}, got {msg}"
            if flow is not None:
                assert msg.flow == flow, f"expected flow {flow}, got {msg}"
            return msg

    def send(self, cmd: Cmd, flow: int = 0, arg: int = 0, payload: bytes | None = None) -> None:
        self.send_raw(wire.encode(Message(cmd, flow, arg, payload)))

    def send_raw(self, frames: list[Any]) -> None:
        assert self.identity is not None, "the worker has not spoken yet"
        self.router.send_multipart([self.identity, *frames])

    def handshake(self, worker: RunningWorker) -> Message:
        hello = self.expect(Cmd.HELLO)
        self.send(Cmd.HELLO, payload=b"fake-stack")
        assert worker.ready.wait(DEADLINE), "ready() was not called"
        return hello

    def open(self, flow: int, port: int, *, window: int = WINDOW, host: str = "127.0.0.1",
             proto: int = wire.IPPROTO_TCP) -> None:
        dst = ipaddress.ip_address(host)
        src = ipaddress.ip_address("198.18.255.9" if dst.version == 4 else "fd00::9")
        block = AddressBlock(proto, dst.version, src, 40000 + flow % 20000, dst, port)
        self.send(Cmd.OPEN, flow, window, block.pack())

    def assert_freed(self, flow: int) -> None:
        """DATA for a flow the worker no longer has is answered by RST with arg 0."""
        self.send(Cmd.DATA, flow, 0, b"?")
        rst = self.expect(Cmd.RST, flow, skip=SKIP | {Cmd.CREDIT})
        assert rst.arg == 0, f"flow {flow} still exists: {rst}"


class RunningWorker:
    """A worker's run in a thread; `target(ready)` is what runs."""

    def __init__(self, target: Callable[[Callable[[], None]], int]) -> None:
        self.ready = threading.Event()
        self.code: int | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(target,), daemon=True)
        self.thread.start()

    def _run(self, target: Callable[[Callable[[], None]], int]) -> None:
        try:
            self.code = target(self.ready.set)
        except BaseException as exc:
            self.error = exc

    def join(self, timeout: float = DEADLINE) -> int | None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the worker did not stop"
        assert self.error is None, f"the worker raised {self.error!r}"
        return self.code
