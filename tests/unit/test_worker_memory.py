"""What a worker's flow holds, and when a worker gives freed memory back.

A DATA from the stack partly written to a slow destination keeps all of its buffer, so its credit
goes back only once the whole of it is written: a stalled destination holds one window in the
worker, not one window plus the written part of the DATA at the head of its queue. The worker
stops reading a destination whose credit is spent. After a while without flows the freed heap
goes back to the system (tunio.process.IdleTrim)."""

from __future__ import annotations

import contextlib
import os
import select
import socket
from collections.abc import Iterator

import pytest

from tests.unit.tablerig import DEADLINE, WINDOW, MakeRig, data_of, rig_maker
from tunio.dialers import DirectDialer
from tunio.process import IdleTrim, give_back_freed_memory
from tunio.wire import Cmd, Message

SMALL_BUFFER = 4096  # the kernel doubles it, and keeps a few KiB at least


@pytest.fixture
def rigs() -> Iterator[MakeRig]:
    with rig_maker() as make:
        yield make


def test_credit_for_stack_data_comes_back_once_all_of_it_is_written(rigs: MakeRig) -> None:
    with socket.socket() as listener:
        # small buffers on both ends: the table's first write takes a part of the DATA only
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(DEADLINE)
        rig = rigs(DirectDialer())
        rig.open(1, listener.getsockname()[1])
        rig.until(lambda: bool(rig.sent), "the connect")
        peer, _ = listener.accept()
    with peer:
        assert rig.take() == [Message(Cmd.OPEN_OK, 1, WINDOW)]
        flow = rig.table.flows[1]
        assert flow.sock is not None
        flow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
        payload = os.urandom(WINDOW)
        rig.table.on_data(1, payload)  # the whole window in one DATA
        got = bytearray()
        peer.setblocking(False)

        def read_until(size: int) -> None:
            def enough() -> bool:
                if select.select([peer], [], [], 0)[0]:
                    got.extend(peer.recv(size - len(got)))
                return len(got) >= size

            rig.until(enough, f"{size} bytes at the destination")

        read_until(WINDOW // 2)  # past a quarter window written...
        assert flow.queue, "the destination took all of it at once: the test proves nothing"
        rig.table.flush()
        # ...but not all of the DATA: byte by byte, credit for the half would be due now
        assert rig.take() == []
        read_until(WINDOW)
        rig.table.flush()
        assert bytes(got) == payload
        assert rig.take() == [Message(Cmd.CREDIT, 1, WINDOW)]
        assert rig.stats.bytes_to_destination == WINDOW


def test_no_credit_no_reading_from_the_destination(rigs: MakeRig) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(DEADLINE)
        rig = rigs(DirectDialer())
        rig.open(1, listener.getsockname()[1])
        rig.until(lambda: bool(rig.sent), "the connect")
        peer, _ = listener.accept()
    with peer:
        rig.take()
        flow = rig.table.flows[1]
        flow.credit = 3000
        peer.setblocking(False)
        pushed = 0
        with contextlib.suppress(BlockingIOError):  # the destination fills its socket
            while True:
                pushed += peer.send(bytes(65536))
        rig.until(lambda: len(data_of(rig.sent)) == 3000, "the credit's worth of DATA")
        rig.settle()
        assert len(data_of(rig.take())) == 3000  # and not a byte more is read
        assert flow.credit == 0
        assert rig.stats.bytes_to_stack == 3000
        assert pushed > 3000


def test_idle_trim_waits_for_a_spell_without_flows_and_trims_once() -> None:
    calls: list[float] = []

    def count() -> bool:
        calls.append(1)
        return True

    trim = IdleTrim(10.0, now=0.0, trim=count)
    assert not trim.tick(5.0, flows=0)
    assert trim.tick(10.0, flows=0)  # 10 s without flows since the start
    assert not trim.tick(20.0, flows=0)  # once per idle spell
    assert not trim.tick(21.0, flows=3)  # flows came: re-armed
    assert not trim.tick(30.0, flows=0)  # 9 s since the last tick with flows
    assert trim.tick(31.0, flows=0)
    assert (trim.trims, len(calls)) == (2, 2)


def test_idle_trim_without_malloc_trim_counts_nothing() -> None:
    trim = IdleTrim(1.0, now=0.0, trim=lambda: False)
    assert not trim.tick(2.0, flows=0)
    assert trim.trims == 0


def test_freed_memory_goes_back_on_glibc() -> None:
    assert give_back_freed_memory() is True
