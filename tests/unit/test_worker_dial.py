"""The worker's one dial path (tunio/worker/dial.py) through the TCP table: a dial that fails
at once, one cut short by a RST or by the timeout, and the stack's messages before OPEN_OK; no
ZeroMQ, no thread (tests/unit/tablerig.py)."""

from __future__ import annotations

import errno
import gc
import socket
import weakref
from collections.abc import Iterator

import pytest

from tests.unit.tablerig import Hanging, MakeRig, rig_maker
from tunio.dialers import Address
from tunio.errors import DialError
from tunio.wire import Cmd, Message
from tunio.worker.flow import State
from tunio.worker.opening import DIALINGS_KEPT


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


class Refusing:
    """A dialer that a policy makes anew for each flow; it refuses at once."""

    async def dial(self, dst: Address, src: Address) -> socket.socket:
        raise ConnectionRefusedError(errno.ECONNREFUSED, "refused")


def test_a_policy_that_makes_a_dialer_per_flow_does_not_pile_them_up(rigs: MakeRig) -> None:
    """A policy may answer a new dialer object for each flow (DirectDialer(mark=...) made in
    it): the worker's dial state for each dialer is a bounded cache, not one entry a flow kept
    with its dialer for the life of the worker."""
    made: list[weakref.ref[Refusing]] = []

    def policy(flow: object) -> Refusing:
        dialer = Refusing()
        made.append(weakref.ref(dialer))
        return dialer

    rig = rigs(Refusing(), policy=policy)
    flows = 4 * DIALINGS_KEPT
    for fid in range(1, flows + 1):
        rig.open(fid)
        assert rig.expect(Cmd.OPEN_FAIL, fid).arg == errno.ECONNREFUSED
    gc.collect()
    assert len(made) == flows
    assert sum(ref() is not None for ref in made) <= DIALINGS_KEPT
