"""The worker's one dial path (tunio/worker/dial.py) through the TCP table: a dial that fails
at once, one cut short by a RST or by the timeout, and the stack's messages before OPEN_OK; no
ZeroMQ, no thread (tests/unit/tablerig.py)."""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator

import pytest

from tests.unit.tablerig import Hanging, MakeRig, rig_maker
from tunio.dialers import Address
from tunio.errors import DialError
from tunio.wire import Cmd, Message
from tunio.worker.flow import State


@pytest.fixture
def rigs() -> Iterator[MakeRig]:
    with rig_maker() as make:
        yield make


def test_a_connect_that_fails_at_once_answers_at_once(rigs: MakeRig) -> None:
    class Unreachable:
        async def dial(self, dst: Address, src: Address) -> socket.socket:
            raise AssertionError("start_connect is the way")

        def start_connect(self, dst: Address, src: Address) -> socket.socket:
            raise DialError(errno.EHOSTUNREACH, "no route")

    rig = rigs(Unreachable())
    rig.open(4)
    assert rig.take() == [Message(Cmd.OPEN_FAIL, 4, errno.EHOSTUNREACH)]  # without a pass
    assert rig.table.flows == {}


def test_rst_while_dialing_cancels_the_dial(rigs: MakeRig) -> None:
    dialer = Hanging()
    rig = rigs(dialer)
    rig.open(5)
    rig.step()
    assert dialer.started
    assert rig.table.flows[5].state is State.DIALING
    rig.table.on_rst(5)
    rig.step()
    assert dialer.cancelled
    assert rig.table.flows == {}
    assert rig.take() == []  # neither OPEN_OK nor OPEN_FAIL, and no RST for a RST


def test_a_dial_that_takes_too_long_is_open_fail_etimedout(rigs: MakeRig) -> None:
    dialer = Hanging()
    rig = rigs(dialer, connect_timeout=0.05)
    rig.open(6)
    assert rig.expect(Cmd.OPEN_FAIL, 6).arg == errno.ETIMEDOUT
    rig.step()
    assert dialer.cancelled
    assert rig.table.flows == {}


def test_data_or_fin_before_open_ok_resets_the_flow(rigs: MakeRig) -> None:
    rig = rigs(Hanging())
    rig.open(7)
    rig.open(8)
    rig.table.on_data(7, b"early")
    rig.table.on_fin(8)
    assert rig.take() == [Message(Cmd.RST, 7, errno.EPROTO), Message(Cmd.RST, 8, errno.EPROTO)]
    assert [e.rule for e in rig.errors] == ["flow", "flow"]
