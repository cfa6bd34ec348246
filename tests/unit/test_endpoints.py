"""The workers' endpoint is checked before ZeroMQ sees it: ZeroMQ takes a port above 65535
modulo 65536 and calls a host that is no address "No such device"."""

from __future__ import annotations

import errno
import ipaddress
import socket

import pytest

from tunio.endpoints import check_endpoint
from tunio.errors import ConfigError, StackError
from tunio.stack import Stack, StackConfig


@pytest.mark.parametrize(
    "endpoint",
    [
        "ipc:///run/tunio/tunio0/stack.sock",
        "tcp://192.0.2.1:5555",
        "tcp://*:5555",
        "tcp://[::1]:1",
        "tcp://[fd00::1]:65535",
        "tcp://eth0:5555",
        "tcp://gw.example:5555",
    ],
)
def test_good_endpoints_pass(endpoint: str) -> None:
    assert check_endpoint(endpoint) == endpoint


@pytest.mark.parametrize(
    ("endpoint", "words"),
    [
        ("udp://x:1", "use ipc://PATH or tcp://HOST:PORT"),
        ("ipc://", "give a path after ipc://"),
        ("ipc:///" + "d" * 120, "too long for a unix socket (107 bytes at most)"),
        ("tcp://127.0.0.1", "use tcp://HOST:PORT"),
        ("tcp://:5555", "use tcp://HOST:PORT"),
        ("tcp://127.0.0.1:99999", "the port must be a number in 1..65535"),
        ("tcp://127.0.0.1:0", "the port must be a number in 1..65535"),
        ("tcp://127.0.0.1:*", "the port must be a number in 1..65535"),
        ("tcp://127.0.0.1:-1", "the port must be a number in 1..65535"),
        (
            "tcp://127.0.0.1:\u0665\u0665",  # Arabic-Indic digits: isdigit() but no port
            "the port must be a number in 1..65535",
        ),
        ("tcp://300.1.1.1:5", "300.1.1.1 is no IPv4 address"),
        ("tcp://1.2.3:5", "1.2.3 is no IPv4 address"),
        ("tcp://::1:5555", "put an IPv6 address in brackets"),
        ("tcp://[fd00::zz]:5555", "[fd00::zz] is no IPv6 address"),
        ("tcp://a b:5555", "'a b' is no address, interface or host name"),
    ],
)
def test_bad_endpoints_name_the_fault(endpoint: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_endpoint(endpoint, "--endpoint")
    assert str(info.value).startswith(f"--endpoint {endpoint!r}: ")
    assert words in str(info.value)


def test_a_stack_that_cannot_bind_names_its_endpoint() -> None:
    """An endpoint that reaches the stack unchecked (the library takes it as given) fails at the
    bind with ZeroMQ's ENODEV, and the error says which endpoint. (A bad IPv6 literal: ZeroMQ
    tries no name lookup for it.)"""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        config = StackConfig(
            tun_fds=(b.fileno(),), addresses=(ipaddress.IPv4Interface("127.0.0.1/8"),),
            endpoint="tcp://[fd00::zz]:5555", log_level="critical",
        )  # fmt: skip
        with pytest.raises(StackError) as info:
            Stack(config)
        assert info.value.errno == errno.ENODEV
        assert "tcp://[fd00::zz]:5555: its host is no address or interface of this host" in str(
            info.value
        )
    finally:
        a.close()
        b.close()
