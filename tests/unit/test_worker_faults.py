"""A worker under faults in code it does not own: a dialer or a policy that raises, calls
sys.exit(), or answers what is not a connection. Each costs the flow it hit (a clean OPEN_FAIL or
RST with an errno), never the other flows or the worker. See tests/unit/tablerig.py."""

from __future__ import annotations

import errno
import logging
import select
import socket
import sys
from collections.abc import Iterator

import pytest

from tests.unit.tablerig import DEADLINE, MakeRig, PairDialer, Rig, rig_maker
from tunio.dialers import Address, DirectDialer, FunctionDialer
from tunio.policy import Flow, Reject, decide
from tunio.wire import Cmd, Message
from tunio.worker.dial import Connecting


@pytest.fixture
def rigs() -> Iterator[MakeRig]:
    with rig_maker() as make:
        yield make


class _Faulty(socket.socket):
    """A dialer's socket with a fault in it: reading raises what no socket raises."""

    def recv(self, *args: object) -> bytes:
        raise RuntimeError("a fault in the dialer's socket")


class FaultyFirst(PairDialer):
    """Hands out connections; the first one's socket is faulty."""

    async def dial(self, dst: Address, src: Address) -> socket.socket:
        sock = await super().dial(dst, src)
        if len(self.peers) == 1:
            return _Faulty(fileno=sock.detach())
        return sock


def test_a_fault_in_one_flow_resets_it_and_spares_the_rest_of_the_batch(
    rigs: MakeRig, caplog: pytest.LogCaptureFixture
) -> None:
    dialer = FaultyFirst()
    rig = rigs(dialer)
    rig.open(1)
    rig.open(2)
    rig.until(lambda: len(rig.sent) == 2, "both dials")
    assert rig.take() == [Message(Cmd.OPEN_OK, 1, rig.table.flows[1].window),
                          Message(Cmd.OPEN_OK, 2, rig.table.flows[2].window)]  # fmt: skip
    rig.settle()  # the sockets' first edges (writable), before the bytes come
    socks = [sock for fid in (1, 2) if (sock := rig.table.flows[fid].sock) is not None]
    for peer in dialer.peers:
        peer.sendall(b"hello")
    ready: set[object] = set()
    while len(ready) < 2:  # both readable, so that one wake-up of the table sees both
        got, _, _ = select.select(socks, [], [], DEADLINE)
        assert got, "the bytes never came"
        ready.update(got)
    with caplog.at_level(logging.ERROR, "tunio.worker"):
        rig.table.on_events()  # the faulty flow first (its bytes came first): raises within
    sent = rig.take()
    assert Message(Cmd.RST, 1, errno.ECONNABORTED) in sent
    assert [m.payload for m in sent if m.cmd is Cmd.DATA and m.flow == 2] == [b"hello"]
    assert list(rig.table.flows) == [2]
    assert rig.stats.resets_sent == 1
    faults = [r for r in caplog.records if "handling its socket failed" in r.getMessage()]
    assert len(faults) == 1
    assert faults[0].exc_info is not None  # the traceback, for whoever fixes the dialer
    with pytest.raises(ConnectionResetError):  # the destination sees a reset, not an EOF
        dialer.peers[0].recv(1)


def test_a_fault_while_dialing_is_open_fail_econnaborted(
    rigs: MakeRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: Connecting[object]) -> None:
        raise RuntimeError("a fault in the dial")

    monkeypatch.setattr(Connecting, "connect_done", broken)
    with socket.create_server(("127.0.0.1", 0)) as srv:
        rig = rigs(DirectDialer())
        rig.open(4, srv.getsockname()[1])
        assert rig.expect(Cmd.OPEN_FAIL, 4).arg == errno.ECONNABORTED
    assert rig.table.flows == {}
    assert rig.stats.dial_failures == {"ECONNABORTED": 1}


class Answers:
    """A coroutine dialer that answers `answer` (whatever it is) for every dial."""

    def __init__(self, answer: object) -> None:
        self.answer = answer

    async def dial(self, dst: Address, src: Address) -> object:
        return self.answer


def _closed_socket() -> socket.socket:
    sock = socket.socket()
    sock.close()
    return sock


@pytest.mark.parametrize(
    "answer", [None, "a string", _closed_socket(), "udp"],
    ids=["none", "not-a-socket", "closed", "a-udp-socket"],
)
def test_a_dialer_answering_no_connection_is_open_fail_econnaborted(
    rigs: MakeRig, answer: object, caplog: pytest.LogCaptureFixture
) -> None:
    if answer == "udp":  # (made here: the worker closes what it was handed)
        answer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    _flows_fail_with_one_line(rigs(Answers(answer)), caplog)


class Unconnected:
    """A dialer that answers a stream socket of its own making that is connected to nothing:
    a listening one, or one never connected (its connect forgotten)."""

    def __init__(self, listening: bool) -> None:
        self.listening = listening
        self.made: list[socket.socket] = []

    async def dial(self, dst: Address, src: Address) -> socket.socket:
        sock = socket.socket()
        self.made.append(sock)
        if self.listening:
            sock.bind(("127.0.0.1", 0))
            sock.listen()
        return sock


@pytest.mark.parametrize("listening", [True, False], ids=["listening", "never-connected"])
def test_a_dialer_answering_an_unconnected_socket_is_open_fail_econnaborted(
    rigs: MakeRig, listening: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Not a reset with no word of why: the flows fail with one line that says the socket is
    not connected, and the sockets are closed."""
    dialer = Unconnected(listening)
    _flows_fail_with_one_line(rigs(dialer), caplog)
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert "not connected" in said[0], said
    assert [sock.fileno() for sock in dialer.made] == [-1, -1]


def _flows_fail_with_one_line(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    """Two flows through a dialer that answers what cannot carry them: each an OPEN_FAIL
    ECONNABORTED (not 0: the app sees a reset), none left, and the dialer's bug said once."""
    with caplog.at_level(logging.ERROR, "tunio.worker"):
        for fid in (5, 6):
            rig.open(fid)
            assert rig.expect(Cmd.OPEN_FAIL, fid).arg == errno.ECONNABORTED
    assert rig.table.flows == {}
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(said) == 1, said  # once: not once a flow
    assert "its flows fail with ECONNABORTED" in said[0]


class StartsWith:
    """A dialer whose start_connect answers `answer` (whatever it is) for every dial."""

    def __init__(self, answer: object) -> None:
        self.answer = answer

    async def dial(self, dst: Address, src: Address) -> socket.socket:
        raise AssertionError("start_connect is the way")

    def start_connect(self, dst: Address, src: Address) -> object:
        return self.answer


@pytest.mark.parametrize(
    "answer", [None, 7, _closed_socket()], ids=["none", "not-a-socket", "closed"]
)
def test_a_start_connect_answering_no_socket_is_open_fail_econnaborted(
    rigs: MakeRig, answer: object, caplog: pytest.LogCaptureFixture
) -> None:
    """start_connect's answer is checked as dial's is: a clean OPEN_FAIL and one line for the
    dialer's bug, not a traceback from inside the table for every flow."""
    _flows_fail_with_one_line(rigs(StartsWith(answer)), caplog)


class SyncDial:
    """A dialer written with `def dial`, where the protocol has `async def dial`."""

    def __init__(self) -> None:
        self.made: list[socket.socket] = []

    def dial(self, dst: Address, src: Address) -> socket.socket:
        self.made.append(socket.socket())
        return self.made[-1]


def test_a_dial_that_is_not_async_is_open_fail_econnaborted_with_what_to_change(
    rigs: MakeRig, caplog: pytest.LogCaptureFixture
) -> None:
    """A dial that answers a socket at once, not an awaitable, fails its flows with a line
    that says to write it `async def`, once; the socket it made is closed, not left to the
    garbage collector, and the flows fail cleanly."""
    dialer = SyncDial()
    rig = rigs(dialer)
    with caplog.at_level(logging.ERROR, "tunio.worker"):
        for fid in (5, 6):
            rig.open(fid)
            assert rig.expect(Cmd.OPEN_FAIL, fid).arg == errno.ECONNABORTED
    assert rig.table.flows == {}
    assert [sock.fileno() for sock in dialer.made] == [-1, -1]
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(said) == 1, said
    assert "not an awaitable: write it `async def dial(dst, src)`" in said[0]


def test_a_function_dialer_around_a_function_that_is_not_async_says_so_once(
    rigs: MakeRig, caplog: pytest.LogCaptureFixture
) -> None:
    """FunctionDialer(f) with a `def f`: the flows fail with ECONNABORTED and one line with what
    to change (not a TypeError's traceback a second), and the sockets f made are closed."""
    made: list[socket.socket] = []

    def sync(dst: Address, src: Address) -> socket.socket:
        made.append(socket.socket())
        return made[-1]

    _flows_fail_with_one_line(rigs(FunctionDialer(sync)), caplog)  # type: ignore[arg-type]
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert "not an awaitable: write it `async def`" in said[0], said
    assert [sock.fileno() for sock in made] == [-1, -1]


def test_a_wrong_answer_moves_on_to_the_next_dialer(rigs: MakeRig) -> None:
    good = PairDialer()
    rig = rigs(good, policy=lambda flow: [Answers("nonsense"), good])
    rig.open(6)
    assert rig.expect(Cmd.OPEN_OK, 6)
    assert rig.stats.failovers == 1
    assert len(good.peers) == 1


class Exits:
    async def dial(self, dst: Address, src: Address) -> socket.socket:
        sys.exit("a dialer that ends its process")


def test_a_dialer_calling_sys_exit_fails_its_flow_only(rigs: MakeRig) -> None:
    rig = rigs(Exits())
    rig.open(7)
    assert rig.expect(Cmd.OPEN_FAIL, 7).arg == errno.ECONNABORTED
    rig.open(8)  # the table (and its loop) still serve
    assert rig.expect(Cmd.OPEN_FAIL, 8).arg == errno.ECONNABORTED


# ---- policies ----------------------------------------------------------------------------


def _flow() -> Flow:
    return Flow(Address("198.18.255.9", 40000), Address("127.0.0.1", 80), "tcp")


@pytest.mark.parametrize(
    "answer", ["direct", 42, [DirectDialer(), "direct"], (object(),)],
    ids=["string", "number", "list-with-a-string", "tuple-of-object"],
)  # fmt: skip
def test_a_policy_answering_what_is_not_a_dialer_refuses_the_flow(answer: object) -> None:
    decision = decide(lambda f: answer, _flow(), DirectDialer())  # type: ignore[arg-type,return-value]
    assert isinstance(decision, Reject)
    assert decision.errno == errno.ECONNREFUSED
    assert "not a dialer" in decision.reason


def test_a_wrong_policy_answer_is_logged_once_a_kind(caplog: pytest.LogCaptureFixture) -> None:
    class Odd:
        pass

    with caplog.at_level(logging.ERROR, "tunio.policy"):
        for _ in range(5):
            assert isinstance(decide(lambda f: Odd(), _flow(), DirectDialer()), Reject)  # type: ignore[arg-type,return-value]
    assert sum("Odd" in r.getMessage() for r in caplog.records) == 1


def test_a_policy_answering_a_dialer_class_refuses_the_flow_and_says_so() -> None:
    """DirectDialer where DirectDialer() was meant: a class has a dial function too, which
    used to be called unbound (a TypeError traceback for each flow) instead of refused."""
    answer: object = [DirectDialer]
    decision = decide(lambda f: answer, _flow(), DirectDialer())  # type: ignore[arg-type,return-value]
    assert decision == Reject(errno.ECONNREFUSED, "the policy answered the class DirectDialer, "
                              "not a dialer: return one")  # fmt: skip


def test_a_policy_calling_sys_exit_refuses_the_flow() -> None:
    def exits(flow: Flow) -> None:
        sys.exit(3)

    assert decide(exits, _flow(), DirectDialer()) == Reject(errno.ECONNREFUSED, "the policy failed")


def test_a_refusal_by_a_wrong_policy_reaches_the_app(rigs: MakeRig) -> None:
    rig = rigs(PairDialer(), policy=lambda flow: "direct")
    rig.open(9)
    assert rig.expect(Cmd.OPEN_FAIL, 9).arg == errno.ECONNREFUSED
    assert rig.stats.refused_by_policy == 1


class Raises:
    async def dial(self, dst: Address, src: Address) -> socket.socket:
        raise ValueError("a dialer's bug")


def test_a_dialer_failing_for_every_flow_logs_one_traceback_a_second(
    rigs: MakeRig, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tunio.logs import EverySecond  # noqa: PLC0415
    from tunio.worker import dial  # noqa: PLC0415

    fresh = EverySecond(dial.log, logging.ERROR, "dials that failed unexpectedly", 60.0)
    monkeypatch.setattr(dial, "unexpected", fresh)
    rig = rigs(Raises())
    with caplog.at_level(logging.ERROR, "tunio.worker"):
        for fid in range(1, 6):
            rig.open(fid)
            assert rig.expect(Cmd.OPEN_FAIL, fid).arg == errno.ECONNABORTED
        fresh.flush()
    lines = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.exc_info is not None for r in lines] == [True, False]  # one traceback, one count
    assert lines[1].getMessage().startswith("4 more dials that failed unexpectedly in the last")


def test_a_name_the_stack_would_never_send_is_not_taken() -> None:
    """NAME is what the fake-IP map holds (letters, digits, -, _, dots): anything else (a
    newline that would forge a line of the worker's log) is dropped, and its flow dials the
    address it came with."""
    from tunio.worker.names import Names  # noqa: PLC0415

    names = Names()
    names.on_name(1, b"example.test")
    names.on_name(2, b"x\n2026-01-01 00:00:00 CRITICAL forged")
    names.on_name(3, b"")
    assert (names.take(1), names.take(2), names.take(3)) == ("example.test", None, None)
