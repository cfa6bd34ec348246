"""Dialers: the direct dialer on loopback, and load_dialer's specifications."""

from __future__ import annotations

import asyncio
import errno
import os
import re
import select
import socket
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tunio import wayout
from tunio.config import Options
from tunio.dialers import (
    Address,
    Dialer,
    DirectDialer,
    FunctionDialer,
    Socks5Dialer,
    StartConnect,
    load_dialer,
    toward_proxy,
)
from tunio.dialers.base import connecting_to_proxy
from tunio.dialers.direct import SO_MARK, use_run_egress
from tunio.errors import ConfigError, DialError

SRC = Address("198.18.255.7", 40000)


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.fixture(params=["127.0.0.1", "::1"])
def listener(request: pytest.FixtureRequest) -> Iterator[socket.socket]:
    host = request.param
    if host == "::1" and not has_ipv6_loopback():
        pytest.skip("no IPv6 loopback")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as srv:
        srv.bind((host, 0))
        srv.listen()
        yield srv


def closed_port(host: str = "127.0.0.1") -> tuple[socket.socket, int]:
    """A bound port nobody listens on (kept bound so no one else takes it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((host, 0))
    return sock, sock.getsockname()[1]


def dial(dialer: Dialer, dst: Address) -> socket.socket:
    return asyncio.run(dialer.dial(dst, SRC))


def test_direct_connects_ipv4_and_ipv6(listener: socket.socket) -> None:
    host, port = listener.getsockname()[:2]
    sock = dial(DirectDialer(), Address(host, port))
    with sock:
        peer, _ = listener.accept()
        with peer:
            assert sock.getblocking() is False
            assert sock.getpeername()[:2] == (host, port)
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
            sock.sendall(b"ping")
            assert peer.recv(4) == b"ping"


def test_direct_refused_keeps_the_kernel_errno() -> None:
    held, port = closed_port()
    with held, pytest.raises(DialError) as info:
        dial(DirectDialer(), Address("127.0.0.1", port))
    assert info.value.errno == errno.ECONNREFUSED


def test_direct_resolves_names_through_its_resolver_only() -> None:
    """A name (a fake-IP flow) is resolved by the dialer's resolver, never by the host's own
    (getaddrinfo would find localhost): one that does not answer leaves the dial unreachable."""
    from tunio.dialers.resolve import Resolver  # noqa: PLC0415

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as mute:
        mute.bind(("127.0.0.1", 0))
        resolver = Resolver("127.0.0.1", mute.getsockname()[1], timeout=0.1, tries=1)
        with pytest.raises(DialError) as info:
            dial(DirectDialer(resolver=resolver), Address("localhost", 80))
    assert info.value.errno == errno.EHOSTUNREACH


@pytest.mark.skipif(os.geteuid() != 0, reason="SO_MARK and SO_BINDTODEVICE need root")
def test_direct_sets_mark_and_interface() -> None:
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        dialer = DirectDialer(mark=0x1234, interface="lo", nodelay=True)
        with dial(dialer, Address(*srv.getsockname())) as sock:
            assert sock.getsockopt(socket.SOL_SOCKET, SO_MARK) == 0x1234
            bound = sock.getsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, 16)
            assert bound.rstrip(b"\0") == b"lo"
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="SO_MARK and SO_BINDTODEVICE need root")
def test_a_bare_direct_dialer_takes_the_runs_egress() -> None:
    """In a worker (use_run_egress) a DirectDialer made with neither a mark nor an interface
    gets the run's, a proxy dialer's own too; one given either keeps what it was given (mark=0:
    none)."""
    cases = [
        (DirectDialer(), 0x77, b"lo"),
        (Socks5Dialer("127.0.0.1", 1080).via, 0x77, b"lo"),
        (DirectDialer(mark=5), 5, b""),
        (DirectDialer(mark=0), 0, b""),
        (DirectDialer(interface="lo"), 0, b"lo"),
    ]
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        try:
            use_run_egress(0x77, "lo")
            for dialer, mark, interface in cases:
                with dial(dialer, Address(*srv.getsockname())) as sock:
                    assert sock.getsockopt(socket.SOL_SOCKET, SO_MARK) == mark, dialer
                    bound = sock.getsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, 16)
                    assert bound.rstrip(b"\0") == interface, dialer
        finally:
            use_run_egress(None, None)
        with dial(DirectDialer(), Address(*srv.getsockname())) as sock:  # outside a run
            assert sock.getsockopt(socket.SOL_SOCKET, SO_MARK) == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="SO_BINDTODEVICE needs root")
@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"mark": "0x1"}, "DirectDialer(mark='0x1'): give a firewall mark, an integer "
                          "0..0xffffffff (0: no mark)"),
        ({"mark": 1 << 32}, "DirectDialer(mark=4294967296): give a firewall mark"),
        ({"mark": -1}, "DirectDialer(mark=-1): give a firewall mark"),
        ({"interface": 3}, "DirectDialer(interface=3): give an interface name"),
    ],
)
def test_direct_with_a_wrong_mark_or_interface_is_a_config_error(
    settings: dict[str, Any], words: str
) -> None:
    """Said where the program makes it, not by a TypeError from setsockopt in every dial."""
    with pytest.raises(ConfigError, match=f"^{re.escape(words)}"):
        DirectDialer(**settings)


def test_direct_unknown_interface_is_enodev() -> None:
    with pytest.raises(DialError) as info:
        dial(DirectDialer(interface="tunio-none0"), Address("127.0.0.1", 9))
    assert info.value.errno == errno.ENODEV


def test_only_direct_starts_a_connect_without_a_coroutine() -> None:
    assert isinstance(DirectDialer(), StartConnect)
    assert not isinstance(FunctionDialer(DirectDialer().dial), StartConnect)
    assert not isinstance(Socks5Dialer.from_url("socks5://127.0.0.1:1080"), StartConnect)


def wait_writable(sock: socket.socket) -> int:
    """SO_ERROR once a started connect is done (writable), bounded by a few seconds."""
    _, writable, _ = select.select([], [sock], [], 5.0)
    assert writable, "the connect did not finish"
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)


def test_direct_start_connect_connects(listener: socket.socket) -> None:
    host, port = listener.getsockname()[:2]
    with DirectDialer().start_connect(Address(host, port), SRC) as sock:
        assert sock.getblocking() is False
        assert wait_writable(sock) == 0
        peer, _ = listener.accept()
        with peer:
            sock.sendall(b"ping")
            assert peer.recv(4) == b"ping"


def test_direct_start_connect_refused_is_so_error() -> None:
    held, port = closed_port()
    with held, DirectDialer().start_connect(Address("127.0.0.1", port), SRC) as sock:
        assert wait_writable(sock) == errno.ECONNREFUSED


def test_direct_start_connect_rejects_names_at_once() -> None:
    with pytest.raises(DialError) as info:
        DirectDialer().start_connect(Address("localhost", 80), SRC)
    assert info.value.errno == errno.EINVAL


@pytest.fixture
def unanswered() -> Iterator[Address]:
    """A loopback address whose SYNs are dropped: a listener with a full accept queue."""
    with socket.socket() as srv, socket.socket() as first:
        srv.bind(("127.0.0.1", 0))
        srv.listen(0)
        first.connect(srv.getsockname())  # fills the queue; nothing ever accepts it
        yield Address(*srv.getsockname())


def test_direct_dial_cut_short_closes_its_socket(unanswered: Address) -> None:
    async def main() -> None:
        with pytest.raises((asyncio.TimeoutError, TimeoutError)):
            await asyncio.wait_for(DirectDialer().dial(unanswered, SRC), 0.2)

    before = len(os.listdir("/proc/self/fd"))
    asyncio.run(main())
    assert len(os.listdir("/proc/self/fd")) == before


# ---- load_dialer -------------------------------------------------------------------------


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    name = f"tunio_test_dialers_{uuid.uuid4().hex}"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            """
            import socket

            class Mine:
                async def dial(self, dst, src):
                    raise ConnectionRefusedError(111, "mine")

            instance = Mine()

            def factory():
                return Mine()

            def bad_factory():
                return 42

            async def function(dst, src):
                raise ConnectionRefusedError(111, "function")

            class Nested:
                inner = Mine()

            not_a_dialer = 42
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_load_direct_with_egress_settings() -> None:
    dialer = load_dialer("direct", egress_mark=1, egress_interface="eth9")
    assert isinstance(dialer, DirectDialer)
    assert (dialer.mark, dialer.interface) == (1, "eth9")


@pytest.mark.parametrize("attr", ["instance", "factory", "Mine", "Nested.inner"])
def test_load_user_dialer_objects(user_module: str, attr: str) -> None:
    dialer = load_dialer(f"{user_module}:{attr}")
    assert type(dialer).__name__ == "Mine"
    assert isinstance(dialer, Dialer)


def test_load_user_function_is_wrapped(user_module: str) -> None:
    dialer = load_dialer(f"{user_module}:function")
    assert isinstance(dialer, FunctionDialer)
    with pytest.raises(ConnectionRefusedError) as info:
        dial(dialer, Address("127.0.0.1", 1))
    assert info.value.errno == errno.ECONNREFUSED


def test_load_passes_dialer_objects_through() -> None:
    dialer = DirectDialer()
    assert load_dialer(dialer) is dialer


@pytest.mark.parametrize(
    "spec",
    [
        "socks4://127.0.0.1:1080",
        "nonsense",
        ":attr",
        "module:",
        "tunio_no_such_module_xyz:dialer",
        "{mod}:missing",
        "{mod}:not_a_dialer",
        "{mod}:bad_factory",
    ],
)
def test_load_rejects_with_config_error(user_module: str, spec: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_dialer(spec.format(mod=user_module))
    message = str(info.value)
    assert "\n" not in message
    assert spec.format(mod=user_module) in message


async def _an_async_dial(dst: Address, src: Address) -> socket.socket:
    raise AssertionError("not used")


@pytest.mark.parametrize(
    ("given", "words"),
    [
        (object(), "has no dial method: give an object with `async def dial(dst, src)`"),
        (5, "dialer 5 has no dial method"),
        (DirectDialer, "is a class: give an instance of it"),
        (_an_async_dial, "is a function: give tunio.dialers.FunctionDialer(it)"),
    ],
)
def test_options_with_what_is_no_dialer_are_a_config_error(given: object, words: str) -> None:
    """A library's Options(dialer=...) or Options(dialers={...}) holding what cannot dial is
    refused at the start, as a spec that names no dialer is, not by a traceback in every worker
    for every flow."""
    wrong: Any = given  # what the annotations do not allow, as a caller may still give it
    for options in (Options(dialer=wrong), Options(dialers={"office": wrong})):
        with pytest.raises(ConfigError, match=re.escape(words)):
            wayout.load_policy(options, wayout.load_dialer(options))


def test_options_dialer_objects_and_lists_become_dialers() -> None:
    """A dialer object passes as it is; a list is a chain, as a tuple is."""
    mine = DirectDialer()
    assert wayout.load_dialer(Options(dialer=mine)) is mine
    chain: Any = ["direct"]
    assert isinstance(wayout.load_dialer(Options(dialer=chain)), DirectDialer)


def test_options_rules_of_the_wrong_kind_are_a_config_error() -> None:
    wrong: Any = ("uid 1000 -> office",)
    options = Options(rules=wrong)
    with pytest.raises(ConfigError, match=r"^rules\[0\]: 'uid 1000 -> office' is a str, not a "):
        wayout.load_policy(options, wayout.load_dialer(options))


def test_toward_proxy_holds_through_a_chains_inner_hops() -> None:
    seen: list[bool] = []

    async def dial() -> None:
        task = asyncio.current_task()
        assert task is not None
        seen.append(connecting_to_proxy(task))
        with toward_proxy():  # the first proxy, reached through...
            with toward_proxy():  # ...the second
                seen.append(connecting_to_proxy(task))
            seen.append(connecting_to_proxy(task))  # still on the way to the first
        seen.append(connecting_to_proxy(task))

    asyncio.run(dial())
    assert seen == [False, True, True, False]
    with toward_proxy():  # outside a task: nothing to mark, and no error
        pass
