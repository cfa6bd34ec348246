"""How a worker tells that its own connection was routed into the TUN again
(tunio.dialers.routing, tunio.worker.loops): the connection left with the address of the app it
is for."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Iterator

import pytest

from tests.unit.tablerig import MakeRig, rig_maker
from tunio.dialers import Address, DirectDialer, Socks5Dialer
from tunio.dialers.routing import RoutingLoop, left_as_the_app
from tunio.wire import Cmd


def test_a_socket_with_the_apps_address_left_as_the_app() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect(("127.0.0.1", 9))  # (a UDP connect sends nothing)
        assert left_as_the_app(sock, "127.0.0.1")
        assert not left_as_the_app(sock, "127.0.0.2")


def test_two_spellings_of_one_ipv6_address_are_the_same_app() -> None:
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
        sock.connect(("::1", 9))
        assert left_as_the_app(sock, "0:0:0:0:0:0:0:1")
        assert left_as_the_app(sock, "::1")
        assert not left_as_the_app(sock, "::2")
        assert not left_as_the_app(sock, "127.0.0.1")


def test_what_has_no_address_to_tell_by_is_not_a_loop() -> None:
    a, b = socket.socketpair()
    with a, b:
        assert not left_as_the_app(a, "127.0.0.1")  # AF_UNIX: no host, no port
    assert not left_as_the_app(object(), "127.0.0.1")  # a dialer's own kind of session
    closed = socket.socket()
    closed.close()
    assert not left_as_the_app(closed, "0.0.0.0")  # getsockname fails: EBADF


# ---- a loop found by a dial's coroutine (the direct dialer's check) --------------------------


def _listener() -> socket.socket:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    return server


def test_a_direct_dial_leaving_with_the_apps_address_is_a_routing_loop() -> None:
    with _listener() as server:
        dst = Address("127.0.0.1", server.getsockname()[1])
        with pytest.raises(RoutingLoop) as info:
            asyncio.run(DirectDialer().dial(dst, Address("127.0.0.1", 40000)))
        assert info.value.errno == errno.ENETUNREACH
        assert info.value.to == dst
        assert "a routing loop" in str(info.value)
        # from another app's address it is a connection like any other
        sock = asyncio.run(DirectDialer().dial(dst, Address("198.18.255.9", 40000)))
        with sock:
            assert sock.getpeername() == ("127.0.0.1", dst.port)


def test_a_proxy_dialer_keeps_a_loop_a_loop() -> None:
    """The proxy names itself in the error and the worker still tells the loop by its kind."""
    with _listener() as server:
        port = server.getsockname()[1]
        dialer = Socks5Dialer("127.0.0.1", port)
        with pytest.raises(RoutingLoop) as info:
            asyncio.run(dialer.dial(Address("192.0.2.1", 80), Address("127.0.0.1", 40000)))
        assert info.value.errno == errno.ENETUNREACH
        assert info.value.to == Address("127.0.0.1", port)
        assert str(info.value).startswith(f"[Errno {errno.ENETUNREACH}] socks5 proxy 127.0.0.1:")


class Loops:
    """A dialer whose every dial finds its connection routed into the TUN again."""

    def __init__(self) -> None:
        self.dials = 0

    async def dial(self, dst: Address, src: Address) -> socket.socket:
        self.dials += 1
        raise RoutingLoop(Address(dst.host, 1080), f"{dst}: a routing loop")


@pytest.fixture
def rigs() -> Iterator[MakeRig]:
    with rig_maker() as make:
        yield make


def test_a_loop_a_dial_found_is_counted_said_and_its_next_hop_refused(
    rigs: MakeRig, caplog: pytest.LogCaptureFixture
) -> None:
    dialer = Loops()
    rig = rigs(dialer)
    with caplog.at_level(logging.ERROR, "tunio.worker"):
        rig.open(5)
        assert rig.expect(Cmd.OPEN_FAIL, 5).arg == errno.ENETUNREACH
        # the hop on its way back (from the app's address, to where the connection went) is
        # refused as it arrives, without a dial
        rig.open(6, port=1080)
        assert rig.expect(Cmd.OPEN_FAIL, 6).arg == errno.ENETUNREACH
    assert dialer.dials == 1
    assert rig.stats.routing_loops == 2
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(said) == 1, said
    assert "routing loop: its connection to 127.0.0.1:9 via " in said[0]
    assert rig.table.flows == {}
