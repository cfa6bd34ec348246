"""Credit between the stack and a worker, seen from the worker's side of the protocol: the test
is the only worker of a real tunio-run, and a real app connects through the TUN.

Credit for bytes the stack wrote to the app is held back and carried on the flow's next DATA
(its arg), so a request/response exchange costs one message each way; it comes as CREDIT when
it reaches a quarter of the window, or before FIN, when no DATA can carry it any more."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
import zmq
from lab.netlab import SERVER_ADDRESS, Lab, TunioProcess, recv_exact

from tunio import wire
from tunio.wire import Cmd, Message

PORT = 4242  # nothing listens there: the test is the worker, it never dials
WINDOW = 1024 * 1024  # tunio-run's --window: the stack holds back under a quarter of it
DEADLINE = 10.0


class ProtocolWorker:
    """A DEALER speaking the worker's side of docs/protocol.md by hand."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(endpoint)
        self.received: list[Message] = []  # as they came (DATA_FIN, CREDIT_FIN folded)
        self._unfolded: list[Message] = []  # the plain messages a folded one stands for
        self.send(Cmd.HELLO, payload=b"by-hand")
        assert self.recv().cmd is Cmd.HELLO

    def send(self, cmd: Cmd, flow: int = 0, arg: int = 0, payload: bytes | None = None) -> None:
        self.sock.send_multipart(wire.encode(Message(cmd, flow, arg, payload)))

    def _next(self, until: float) -> Message | None:
        """The next message that is not a heartbeat (heartbeats are answered), or None when
        none came by the monotonic time `until`; a folded one as the plain ones it stands for
        (tunio.wire.unfold)."""
        if self._unfolded:
            return self._unfolded.pop(0)
        while (left := until - time.monotonic()) > 0:
            if not self.sock.poll(int(left * 1000)):
                continue
            msg = wire.decode([bytes(f) for f in self.sock.recv_multipart()])
            if msg.cmd is not Cmd.HEARTBEAT:
                self.received.append(msg)
                self._unfolded = wire.unfold(msg)
                return self._unfolded.pop(0)
            self.send(Cmd.HEARTBEAT)
        return None

    def recv(self) -> Message:
        msg = self._next(time.monotonic() + DEADLINE)
        assert msg is not None, "no message from the stack in time"
        return msg

    def silent(self, seconds: float) -> list[Message]:
        """Whatever non-heartbeat messages come within `seconds`."""
        until = time.monotonic() + seconds
        got = []
        while (msg := self._next(until)) is not None:
            got.append(msg)
        return got


@pytest.fixture
def only_worker(fresh_lab: Lab) -> Iterator[tuple[Lab, ProtocolWorker]]:
    tunio: TunioProcess = fresh_lab.start_tunio(["--workers", "0", "--window", str(WINDOW)])
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        yield fresh_lab, ProtocolWorker(ctx, f"ipc://{tunio.socket_path}")
    finally:
        ctx.destroy(linger=0)
        assert tunio.stop() == 0


def data_of(worker: ProtocolWorker, flow: int, n: int) -> tuple[bytes, int]:
    """`n` bytes of DATA on `flow`, and the credit their args carried."""
    got, credit = b"", 0
    while len(got) < n:
        msg = worker.recv()
        assert (msg.cmd, msg.flow) == (Cmd.DATA, flow), f"expected DATA, got {msg}"
        assert msg.payload is not None
        got += bytes(msg.payload)
        credit += msg.arg
    return got, credit


def test_credit_rides_on_data_and_comes_before_fin(
    only_worker: tuple[Lab, ProtocolWorker],
) -> None:
    lab, worker = only_worker
    conns: list[socket.socket] = []
    connecting = threading.Thread(
        target=lambda: conns.append(lab.connect(PORT, SERVER_ADDRESS, timeout=DEADLINE))
    )
    connecting.start()
    opened = worker.recv()
    assert opened.cmd is Cmd.OPEN
    flow = opened.flow
    worker.send(Cmd.OPEN_OK, flow, 8)  # the stack may send us 8 bytes before credit comes
    connecting.join(DEADLINE)
    assert conns, "the app's connect did not complete"
    with conns[0] as app:
        app.sendall(b"request-of-20-bytes!")
        assert data_of(worker, flow, 8) == (b"request-", 0)
        assert worker.silent(0.3) == []  # out of credit: the stack waits for some
        # our reply carries 8 bytes of credit: the stack may send the next 8, and carries the
        # credit for the 7 bytes of our reply it wrote to the app on them (no CREDIT message)
        worker.send(Cmd.DATA, flow, 8, b"reply-1")
        assert recv_exact(app, 7) == b"reply-1"
        assert data_of(worker, flow, 8) == (b"of-20-by", 7)
        worker.send(Cmd.CREDIT, flow, 8)  # credit by CREDIT works as before
        assert data_of(worker, flow, 4) == (b"tes!", 0)
        # the stack holds back the credit for "reply-2"; when the app ends its side no DATA can
        # carry it, so it comes as CREDIT, before FIN
        worker.send(Cmd.DATA, flow, 0, b"reply-2")
        assert recv_exact(app, 7) == b"reply-2"
        app.shutdown(socket.SHUT_WR)
        credit = worker.recv()
        assert (credit.cmd, credit.flow, credit.arg) == (Cmd.CREDIT, flow, 7)
        fin = worker.recv()
        assert (fin.cmd, fin.flow) == (Cmd.FIN, flow)
        assert worker.received[-1] == Message(Cmd.CREDIT_FIN, flow, 7)  # both in one message
        worker.send(Cmd.FIN, flow)
        assert app.recv(1) == b""


def test_data_fin_from_the_worker_is_the_bytes_then_the_end(
    only_worker: tuple[Lab, ProtocolWorker],
) -> None:
    lab, worker = only_worker
    conns: list[socket.socket] = []
    connecting = threading.Thread(
        target=lambda: conns.append(lab.connect(PORT, SERVER_ADDRESS, timeout=DEADLINE))
    )
    connecting.start()
    opened = worker.recv()
    assert opened.cmd is Cmd.OPEN
    flow = opened.flow
    worker.send(Cmd.OPEN_OK, flow, 1 << 16)
    connecting.join(DEADLINE)
    assert conns, "the app's connect did not complete"
    with conns[0] as app:
        app.settimeout(DEADLINE)
        worker.send(Cmd.DATA_FIN, flow, 0, b"all of it")
        assert recv_exact(app, 9) == b"all of it"
        assert app.recv(1) == b""  # and the FIN behind it: EOF, the other way still open
        app.sendall(b"late")
        # the worker said FIN: it sends no more DATA, so the stack returns no credit to it
        assert data_of(worker, flow, 4) == (b"late", 0)
        app.shutdown(socket.SHUT_WR)
        assert worker.recv().cmd is Cmd.FIN
        assert worker.received[-1] == Message(Cmd.FIN, flow, 0)
