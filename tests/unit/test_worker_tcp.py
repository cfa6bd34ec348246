"""The TCP flow table on its own (tunio/worker/tcp.py and opening.py): no ZeroMQ, no thread.

Flows are dialled both ways the worker dials (a coroutine dialer in a task, and the direct
dialer's start_connect to a loopback listener); the test is the stack (it calls the table's
handlers and reads the messages it sent from a list) and the destination (the other end of the
connection). See tests/unit/tablerig.py.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator

import pytest
from lab.netlab import recv_exact

from tests.unit.tablerig import (
    DEADLINE,
    WINDOW,
    MakeRig,
    PairDialer,
    Rig,
    data_of,
    rig_maker,
    state_of,
)
from tunio.dialers import Address, DirectDialer, StartConnect
from tunio.wire import Cmd, Message
from tunio.worker.flow import State

LINGER_ABORT = struct.pack("ii", 1, 0)


@pytest.fixture
def rigs() -> Iterator[MakeRig]:
    with rig_maker() as make:
        yield make


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        srv.settimeout(DEADLINE)
        yield srv


Opened = tuple[Rig, socket.socket]


@pytest.fixture(params=["task", "start_connect"])
def opened(request: pytest.FixtureRequest, rigs: MakeRig,
           listener: socket.socket) -> Iterator[Opened]:  # fmt: skip
    """Flow 1, open: dialled by a task (a coroutine dialer) or by start_connect (direct, to a
    loopback listener); the peer is the destination's end."""
    if request.param == "task":
        dialer = PairDialer()
        assert not isinstance(dialer, StartConnect)
        rig = rigs(dialer)
        rig.open(1)
        assert rig.sent == []  # nothing before the dial has run
        rig.step()  # the dial task runs: it needs no I/O of the loop's
        peer = dialer.peers[0]
    else:
        rig = rigs(DirectDialer())
        rig.open(1, listener.getsockname()[1])
        rig.until(lambda: bool(rig.sent), "the connect")
        peer, _ = listener.accept()
        peer.settimeout(DEADLINE)
    assert rig.take() == [Message(Cmd.OPEN_OK, 1, WINDOW)]
    assert rig.table.flows[1].state is State.OPEN
    with peer:
        yield rig, peer


# ---- opening -----------------------------------------------------------------------------


def test_open_dials_and_answers_open_ok(opened: Opened) -> None:
    rig, _ = opened
    assert rig.stats.opens == rig.stats.open_ok == 1
    assert rig.errors == []


def test_a_refused_dial_is_open_fail_econnrefused(rigs: MakeRig) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))  # bound, never listening: connect is refused
        rig = rigs(DirectDialer())
        rig.open(3, held.getsockname()[1])
        assert rig.expect(Cmd.OPEN_FAIL, 3).arg == errno.ECONNREFUSED
    assert 3 not in rig.table.flows
    assert rig.stats.dial_failures == {"ECONNREFUSED": 1}


def test_a_refused_dial_by_a_task_is_open_fail_econnrefused(rigs: MakeRig) -> None:
    class Refused:
        async def dial(self, dst: Address, src: Address) -> socket.socket:
            return await DirectDialer().dial(dst, src)  # through the loop's own selector

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        rig = rigs(Refused())
        rig.open(3, held.getsockname()[1])
        assert rig.expect(Cmd.OPEN_FAIL, 3).arg == errno.ECONNREFUSED
    assert 3 not in rig.table.flows


@pytest.mark.parametrize("keepalive", [(7, 3, 2), None])
def test_a_flows_connection_gets_the_runs_keepalive(
    rigs: MakeRig, listener: socket.socket, keepalive: tuple[int, int, int] | None
) -> None:
    """--tcp-keepalive on the destination's side: a destination that vanished is found."""
    rig = rigs(DirectDialer(), keepalive=keepalive)
    rig.open(1, listener.getsockname()[1])
    rig.until(lambda: bool(rig.sent), "the connect")
    assert rig.take() == [Message(Cmd.OPEN_OK, 1, WINDOW)]
    sock = rig.table.flows[1].sock
    assert sock is not None
    on = sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
    if keepalive is None:
        assert on == 0
        return
    assert on == 1
    assert (sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT)) == keepalive  # fmt: skip


# ---- data both ways, under credit --------------------------------------------------------


def test_data_from_the_stack_reaches_the_destination(opened: Opened) -> None:
    rig, peer = opened
    payload = os.urandom(3000)
    rig.table.on_data(1, payload)
    rig.table.on_data(1, memoryview(b"tail"))
    assert recv_exact(peer, 3004) == payload + b"tail"
    assert rig.stats.bytes_to_destination == 3004
    rig.table.flush()
    assert rig.take() == []  # under a quarter window: credit held back for the next DATA


def test_destination_bytes_become_data_within_the_credit(opened: Opened) -> None:
    rig, peer = opened
    flow = rig.table.flows[1]
    flow.credit = 1000  # as if OPEN had given us 1000 bytes
    sent = os.urandom(5000)
    peer.sendall(sent)
    rig.until(lambda: len(data_of(rig.sent)) == 1000, "a window of DATA")
    rig.settle()
    assert len(data_of(rig.sent)) == 1000  # still: nothing beyond the credit
    assert flow.credit == 0
    rig.table.on_credit(1, 1500)  # input is known to wait: read at once, up to the credit
    assert len(data_of(rig.sent)) == 2500
    rig.settle()
    assert len(data_of(rig.sent)) == 2500
    rig.table.on_credit(1, WINDOW)
    rig.until(lambda: len(data_of(rig.sent)) == 5000, "the rest")
    assert data_of(rig.take()) == sent
    assert rig.stats.bytes_to_stack == 5000


def test_credit_is_carried_on_data_or_sent_at_a_quarter_window(opened: Opened) -> None:
    rig, peer = opened
    rig.table.on_data(1, b"request")
    assert recv_exact(peer, 7) == b"request"
    rig.table.flush()
    assert rig.take() == []  # held back...
    peer.sendall(b"response")
    msg = rig.expect(Cmd.DATA, 1)
    assert (msg.arg, msg.payload) == (7, b"response")  # ...and carried on the DATA
    quarter = WINDOW // 4
    rig.table.on_data(1, bytes(quarter))
    assert recv_exact(peer, quarter) == bytes(quarter)
    rig.table.flush()  # the end of a batch of messages
    assert rig.take() == [Message(Cmd.CREDIT, 1, quarter)]


def test_data_beyond_the_window_resets_the_flow(rigs: MakeRig) -> None:
    dialer = PairDialer()
    rig = rigs(dialer, window=8192)
    rig.open(1)
    rig.step()
    assert rig.take() == [Message(Cmd.OPEN_OK, 1, 8192)]
    with dialer.peers[0]:
        for _ in range(4):  # 8 KiB written on, its credit not yet returned (no flush)
            rig.table.on_data(1, bytes(2048))
        rig.table.on_data(1, b"x")
        assert rig.take() == [Message(Cmd.RST, 1, errno.EPROTO)]
        assert [e.rule for e in rig.errors] == ["flow"]


def test_data_with_carried_credit_resumes_reading(opened: Opened) -> None:
    rig, peer = opened
    flow = rig.table.flows[1]
    flow.credit = 0
    peer.sendall(b"waiting")
    rig.settle()
    assert rig.sent == []
    rig.table.on_data(1, b"q", credit=100)  # DATA's arg: credit, as if a CREDIT came first
    assert data_of(rig.take()) == b"waiting"
    assert recv_exact(peer, 1) == b"q"


# ---- half-close --------------------------------------------------------------------------


def test_fin_from_the_destination_then_from_the_stack(opened: Opened) -> None:
    rig, peer = opened
    flow = rig.table.flows[1]
    peer.sendall(b"bye")
    peer.shutdown(socket.SHUT_WR)
    rig.until(lambda: any(m.cmd is Cmd.FIN for m in rig.sent), "FIN")
    assert rig.take() == [Message(Cmd.DATA, 1, 0, b"bye"), Message(Cmd.FIN, 1, 0)]
    assert state_of(flow) is State.DEST_FIN
    rig.table.on_data(1, b"still flowing")  # the other way is open
    assert recv_exact(peer, 13) == b"still flowing"
    rig.table.on_fin(1)
    assert peer.recv(1) == b""  # shutdown(SHUT_WR) towards the destination
    # after our FIN no DATA can carry credit: it comes before the flow is gone
    assert rig.take() == [Message(Cmd.CREDIT, 1, 13)]
    assert state_of(flow) is State.CLOSED
    assert rig.table.flows == {}


def test_bytes_and_eof_together_are_one_data_fin(opened: Opened) -> None:
    rig, peer = opened
    rig.raw.clear()
    rig.table.on_data(1, b"request")
    assert recv_exact(peer, 7) == b"request"
    peer.sendall(b"response")
    peer.shutdown(socket.SHUT_WR)  # behind the bytes: both are there when the worker looks
    rig.until(lambda: any(m.cmd is Cmd.FIN for m in rig.sent), "FIN")
    # one message: the bytes, the credit for the request held back on them, and the FIN
    assert rig.raw == [Message(Cmd.DATA_FIN, 1, 7, b"response")]


def test_eof_with_credit_held_back_is_one_credit_fin(opened: Opened) -> None:
    rig, peer = opened
    rig.table.on_data(1, b"request")
    assert recv_exact(peer, 7) == b"request"
    rig.raw.clear()
    peer.shutdown(socket.SHUT_WR)
    rig.until(lambda: any(m.cmd is Cmd.FIN for m in rig.sent), "FIN")
    assert rig.raw == [Message(Cmd.CREDIT_FIN, 1, 7)]
    assert rig.take() == [Message(Cmd.CREDIT, 1, 7), Message(Cmd.FIN, 1, 0)]


def test_data_fin_and_credit_fin_from_the_stack(opened: Opened) -> None:
    rig, peer = opened
    rig.table.on_data_fin(1, b"last", 0)
    assert recv_exact(peer, 4) == b"last"
    assert peer.recv(1) == b""  # its FIN: shut down towards the destination after the bytes
    assert rig.table.flows[1].state is State.STACK_FIN
    rig.table.on_credit_fin(1, 5)  # a second FIN: a protocol error, the flow stays
    assert [e.rule for e in rig.errors] == ["flow"]


def test_fin_from_the_stack_then_from_the_destination(opened: Opened) -> None:
    rig, peer = opened
    flow = rig.table.flows[1]
    rig.table.on_data(1, b"request")
    rig.table.on_fin(1)
    assert state_of(flow) is State.STACK_FIN
    assert recv_exact(peer, 7) == b"request"
    assert peer.recv(1) == b""  # the write side is shut down: EOF at the destination
    peer.sendall(b"after-eof")  # the other way still flows
    msg = rig.expect(Cmd.DATA, 1)
    assert (msg.payload, msg.arg) == (b"after-eof", 7)
    rig.table.on_data(1, b"late")  # DATA after FIN breaks the protocol
    assert rig.take() == [Message(Cmd.RST, 1, errno.EPROTO)]
    assert rig.table.flows == {}


def test_both_fins_end_the_flow_without_a_reset(opened: Opened) -> None:
    rig, peer = opened
    flow = rig.table.flows[1]
    rig.table.on_fin(1)
    assert peer.recv(1) == b""
    peer.shutdown(socket.SHUT_WR)
    assert rig.expect(Cmd.FIN, 1).arg == 0
    assert state_of(flow) is State.CLOSED
    assert rig.table.flows == {}
    assert rig.stats.resets_sent == 0
    assert peer.recv(1) == b""  # an orderly close: EOF, not a reset


def test_a_second_fin_is_a_protocol_error_only(opened: Opened) -> None:
    rig, peer = opened
    rig.table.on_fin(1)
    rig.table.on_fin(1)
    assert [e.rule for e in rig.errors] == ["flow"]
    assert rig.take() == []
    assert rig.table.flows[1].state is State.STACK_FIN
    assert peer.recv(1) == b""


# ---- resets ------------------------------------------------------------------------------


def test_rst_from_the_stack_resets_the_destination(opened: Opened) -> None:
    rig, peer = opened
    rig.table.on_rst(1)
    with pytest.raises(ConnectionResetError) as info:
        peer.recv(1)
    assert info.value.errno == errno.ECONNRESET
    assert rig.take() == []  # a RST is never answered
    assert rig.table.flows == {}
    assert rig.stats.resets_received == 1


def test_a_reset_by_the_destination_becomes_rst(opened: Opened) -> None:
    rig, peer = opened
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ABORT)
    peer.close()
    assert rig.expect(Cmd.RST, 1).arg == errno.ECONNRESET
    assert rig.table.flows == {}
    assert rig.stats.resets_sent == 1


def test_a_reset_after_the_destinations_eof_becomes_rst(opened: Opened) -> None:
    """The destination ends its side, then resets: nothing is read or written on the socket any
    more (DEST_FIN), but it is still watched, so the reset goes on to the stack."""
    rig, peer = opened
    peer.shutdown(socket.SHUT_WR)
    assert rig.expect(Cmd.FIN, 1).arg == 0
    assert state_of(rig.table.flows[1]) is State.DEST_FIN
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ABORT)
    peer.close()
    # after our EOF the kernel names a reset EPIPE (tcp_reset in CLOSE_WAIT)
    assert rig.expect(Cmd.RST, 1).arg in (errno.EPIPE, errno.ECONNRESET)
    assert rig.table.flows == {}
    assert rig.stats.resets_sent == 1


def test_unknown_flows_get_rst_for_data_only(rigs: MakeRig) -> None:
    rig = rigs(PairDialer())
    rig.table.on_credit(21, 100)  # late: ignored
    rig.table.on_fin(22)  # late: ignored
    rig.table.on_rst(23)  # never answered
    rig.table.on_data(24, b"x")
    assert rig.take() == [Message(Cmd.RST, 24, 0)]


def test_credit_and_rst_for_other_ids_go_to_the_other_table(rigs: MakeRig) -> None:
    seen: list[tuple[str, int, int]] = []

    class Others:
        def on_credit(self, fid: int, amount: int) -> None:
            seen.append(("credit", fid, amount))

        def on_rst(self, fid: int) -> None:
            seen.append(("rst", fid, 0))

    rig = rigs(PairDialer())
    rig.table.others = Others()
    rig.table.on_credit(30, 5)
    rig.table.on_rst(30)
    rig.table.on_data(31, b"x", credit=9)  # carried credit is a CREDIT, for whoever has 31
    assert seen == [("credit", 30, 5), ("rst", 30, 0), ("credit", 31, 9)]
    assert rig.take() == [Message(Cmd.RST, 31, 0)]


# ---- policy: the dialer a flow takes, failover, refusals -----------------------------------


class Refusing:
    """A coroutine dialer whose every dial is refused."""

    def __init__(self) -> None:
        self.dials = 0

    async def dial(self, dst: Address, src: Address) -> socket.socket:
        self.dials += 1
        raise ConnectionRefusedError(errno.ECONNREFUSED, "refused by the test")


def test_a_failed_dial_moves_on_to_the_next_dialer(rigs: MakeRig) -> None:
    refusing, working = Refusing(), PairDialer()
    rig = rigs(DirectDialer(), policy=lambda flow: [refusing, working])
    rig.open(1)
    rig.until(lambda: bool(rig.sent), "the answer")
    # one clean OPEN_OK: the failed first dial never reached the stack
    assert rig.take() == [Message(Cmd.OPEN_OK, 1, WINDOW)]
    assert (refusing.dials, len(working.peers)) == (1, 1)
    assert rig.stats.failovers == 1
    assert rig.stats.open_fail == 0
    labels = rig.stats.dialers
    assert [d.failures for d in labels.values() if d.failures] == [{"ECONNREFUSED": 1}]
    assert sum(d.seconds.count for d in labels.values()) == 1
    rig.table.on_data(1, b"through the second")
    assert recv_exact(working.peers[0], 18) == b"through the second"


def test_when_every_dialer_fails_the_app_sees_the_last_failure(
    rigs: MakeRig, listener: socket.socket
) -> None:
    first, second = Refusing(), Refusing()
    rig = rigs(DirectDialer(), policy=lambda flow: [first, second])
    rig.open(1)
    rig.until(lambda: bool(rig.sent), "the answer")
    assert rig.take() == [Message(Cmd.OPEN_FAIL, 1, errno.ECONNREFUSED)]
    assert (first.dials, second.dials) == (1, 1)
    assert rig.stats.failovers == 1
    assert rig.table.flows == {}


def test_a_refusal_by_policy_is_open_fail_with_its_errno(rigs: MakeRig) -> None:
    from tunio.policy import Reject  # noqa: PLC0415

    seen: list[object] = []

    def policy(flow: object) -> Reject:
        seen.append(flow)
        return Reject(errno.EHOSTUNREACH)

    rig = rigs(PairDialer(), policy=policy)
    rig.open(7, 443)
    assert rig.take() == [Message(Cmd.OPEN_FAIL, 7, errno.EHOSTUNREACH)]
    assert rig.stats.refused_by_policy == 1
    [flow] = seen
    assert repr(flow) == "Flow(tcp 198.18.255.9:40007 -> 127.0.0.1:443)"


def test_the_policy_sees_the_flow_and_picks_its_dialer(rigs: MakeRig) -> None:
    default, chosen = PairDialer(), PairDialer()
    rig = rigs(default, policy=lambda flow: chosen if flow.dst.port == 8443 else None)
    rig.open(1, 8443)
    rig.open(2, 80)
    rig.until(lambda: len(rig.sent) == 2, "two answers")
    assert {m.cmd for m in rig.take()} == {Cmd.OPEN_OK}
    assert (len(chosen.peers), len(default.peers)) == (1, 1)
