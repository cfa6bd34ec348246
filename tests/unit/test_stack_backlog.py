"""A worker's backlog in the C stack: the DATA bytes it was sent and has not credited back, all
its flows together. Past --worker-backlog the stack reads no more from those apps (the bytes wait
in the kernel's socket buffers), so whatever is sent to the worker next, a new flow's OPEN too,
queues behind a bounded amount; flows that waited read again, first come first, as credit comes
back or a flow ends."""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tunio import wire
from tunio.testing.stackrig import Rig, stack_rig

WINDOW = 1024 * 1024
BACKLOG = 64 * 1024
ALLOWANCE = 16384  # what a flow may have unanswered past the bound (FLOW_ALLOWANCE, flows.c)
A_BYTES = 100_000  # past the backlog in one go
B_BYTES = 40_000  # past the allowance


@contextmanager
def _app(rig: Rig, sport: int, dport: int) -> Iterator[tuple[socket.socket, int]]:
    """An app connected through the stack, its flow open with a full window: (socket, flow)."""
    msg = rig.open(sport, dport)
    rig.send(wire.Cmd.OPEN_OK, msg.flow, WINDOW)
    syn = rig.read()  # the released SYN: completed here as the app
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as app:
        app.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        app.bind((syn.src, syn.sport))
        app.settimeout(10)
        app.connect(("127.0.0.1", rig.stack.listen_port))
        yield app, msg.flow


def _data_of(rig: Rig, flow: int, nbytes: int) -> bytes:
    got = bytearray()
    while len(got) < nbytes:
        msg = rig.recv()
        assert (msg.cmd, msg.flow) == (wire.Cmd.DATA, flow), msg
        assert msg.payload is not None
        got += msg.payload
    return bytes(got)


def _a_full_then_b_waits(rig: Rig, a: socket.socket, fa: int, b: socket.socket, fb: int
                         ) -> bytes:  # fmt: skip
    """A fills the backlog; B then sends its allowance and waits: the rest B must get later."""
    a.sendall(b"a" * A_BYTES)
    assert _data_of(rig, fa, A_BYTES) == b"a" * A_BYTES
    assert rig.stack.stats()["backlog_bytes"] == A_BYTES
    b.sendall(b"b" * B_BYTES)
    assert _data_of(rig, fb, ALLOWANCE) == b"b" * ALLOWANCE  # exactly: then it waits
    rig.wait_stat("backlog_waits", 1)  # B's input was seen, and the rest left in its socket
    assert rig.worker.poll(0) == 0  # no more DATA of B's went out
    assert rig.stack.stats()["backlog_bytes"] == A_BYTES + ALLOWANCE
    return b"b" * (B_BYTES - ALLOWANCE)


def test_past_the_backlog_a_flow_waits_until_credit_comes(tmp_path: Path) -> None:
    with stack_rig(tmp_path, window=WINDOW, worker_backlog=BACKLOG) as rig, \
            _app(rig, 40200, 95) as (a, fa), _app(rig, 40201, 96) as (b, fb):  # fmt: skip
        expected = _a_full_then_b_waits(rig, a, fa, b, fb)
        rig.send(wire.Cmd.CREDIT, fa, A_BYTES)  # A's bytes were written on: the backlog empties
        assert _data_of(rig, fb, len(expected)) == expected
        assert rig.stack.stats()["backlog_bytes"] == B_BYTES


def test_a_flow_that_ends_gives_its_backlog_to_the_waiting(tmp_path: Path) -> None:
    with stack_rig(tmp_path, window=WINDOW, worker_backlog=BACKLOG) as rig, \
            _app(rig, 40202, 97) as (a, fa), _app(rig, 40203, 98) as (b, fb):  # fmt: skip
        expected = _a_full_then_b_waits(rig, a, fa, b, fb)
        rig.send(wire.Cmd.RST, fa, 104)  # A ends without crediting its bytes
        assert _data_of(rig, fb, len(expected)) == expected
        stats = rig.stack.stats()
        assert (stats["backlog_bytes"], stats["flows_active"]) == (B_BYTES, 1)


def test_flows_whose_destinations_take_nothing_stop_no_other_flow(tmp_path: Path) -> None:
    """A and B hold the backlog and more (their destinations take nothing: no credit comes
    back). C still gets every byte through, an allowance at a time, as its own bytes are
    credited; and B, reset by its app while it waits, ends at once."""
    with stack_rig(tmp_path, window=WINDOW, worker_backlog=BACKLOG) as rig, \
            _app(rig, 40204, 99) as (a, fa), _app(rig, 40205, 100) as (b, fb), \
            _app(rig, 40206, 101) as (c, fc):  # fmt: skip
        _a_full_then_b_waits(rig, a, fa, b, fb)
        payload = bytes(range(256)) * 400  # 102,400 bytes: six allowances and more
        c.sendall(payload)
        got = bytearray()
        while len(got) < len(payload):
            msg = rig.recv()
            assert (msg.cmd, msg.flow) == (wire.Cmd.DATA, fc), msg
            assert msg.payload is not None
            assert len(msg.payload) <= ALLOWANCE
            got += msg.payload
            rig.send(wire.Cmd.CREDIT, fc, len(msg.payload))  # C's destination takes them
        assert bytes(got) == payload
        b.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        b.close()  # a reset, while B waits with input unread
        reset = rig.recv()
        assert (reset.cmd, reset.flow, reset.arg) == (wire.Cmd.RST, fb, errno.ECONNRESET)
        stats = rig.stack.stats()
        assert (stats["flows_active"], stats["backlog_bytes"]) == (2, A_BYTES)
