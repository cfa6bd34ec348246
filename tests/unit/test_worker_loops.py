"""How a worker tells that its own connection was routed into the TUN again
(tunio.worker.loops): the connection left with the address of the app it is for."""

from __future__ import annotations

import socket

from tunio.worker.loops import left_as_the_app


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
