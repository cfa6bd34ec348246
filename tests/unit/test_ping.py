"""ICMP echo sessions (tunio/dialers/ping.py) and the worker's ping path, against 127.0.0.1 and ::1.

Each test runs in a thread that has a network namespace of its own (unshare(CLONE_NEWNET): only
`lo`, up), so it can allow or forbid ping sockets there (net.ipv4.ping_group_range, a sysctl of
the namespace) without touching the host's. Root is needed for that; without it the tests skip.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import ipaddress
import logging
import os
import select
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tunio import wire
from tunio.dialers import Address, DirectDialer, PingDialer
from tunio.dialers import ping as ping_mod
from tunio.dialers.ping import PingSession, checksum
from tunio.errors import DialError
from tunio.testing.fakestack import DEADLINE, SKIP, FakeStack, RunningWorker
from tunio.wire import AddressBlock, Cmd
from tunio.worker import Worker

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
PING_GROUP_RANGE = Path("/proc/sys/net/ipv4/ping_group_range")
EVERYONE, NOBODY = "0 2147483647", "1 0"
HOSTS = ["127.0.0.1", "::1"]
MODES = ["ping-socket", "raw"]

_libc = ctypes.CDLL(None, use_errno=True)


def _enter_private_netns(ping_sockets: bool) -> None:
    """Move the calling thread into a new network namespace with `lo` up."""
    if _libc.unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")
    # /proc/sys/net shows the namespace of the thread that opens it: this one's
    PING_GROUP_RANGE.write_text(EVERYONE if ping_sockets else NOBODY)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        flags = struct.unpack_from(
            "H", fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack("16sH", b"lo", 0)), 16
        )[0]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH", b"lo", flags | IFF_UP))


def in_private_netns(fn: Callable[[], T], *, ping_sockets: bool) -> T:
    """`fn()` run in a fresh thread inside a private network namespace; its result or error."""
    out: list[T] = []
    err: list[BaseException] = []

    def body() -> None:
        try:
            _enter_private_netns(ping_sockets)
            out.append(fn())
        except BaseException as exc:  # re-raised in the caller
            err.append(exc)

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    thread.join(DEADLINE)
    assert not thread.is_alive(), "the test body did not finish"
    if err:
        raise err[0]
    return out[0]


def _can_unshare() -> str | None:
    """Why private namespaces cannot be made here, or None if they can."""
    try:
        in_private_netns(lambda: None, ping_sockets=True)
    except OSError as exc:
        return f"needs a private network namespace (root): {exc}"
    return None


_WHY_NOT = _can_unshare()
pytestmark = pytest.mark.skipif(_WHY_NOT is not None, reason=_WHY_NOT or "")


def echo_request(host: str, ident: int, seq: int, data: bytes) -> bytes:
    """A whole ICMP echo request as the stack hands it to a worker (checksum and all)."""
    kind = 128 if ":" in host else 8
    msg = bytearray(struct.pack("!BBHHH", kind, 0, 0, ident, seq) + data)
    struct.pack_into("!H", msg, 2, checksum(msg))  # (ICMPv6's would also sum a pseudo-header)
    return bytes(msg)


def dial(host: str) -> PingSession:
    session = asyncio.run(DirectDialer().dial_ping(Address(host, 0), Address(host, 0x4242)))
    assert isinstance(session, PingSession)
    return session


def wait_reply(session: PingSession) -> bytes:
    ready, _, _ = select.select([session.fileno()], [], [], DEADLINE)
    assert ready, "no echo reply"
    got = session.recv()
    assert got is not None
    data, src = got
    assert src == Address(session.dst.host, 0)
    return data


def check_reply(host: str, session: PingSession, reply: bytes, seq: int, data: bytes) -> None:
    kind, code, _csum, ident, rseq = struct.unpack_from("!BBHHH", reply)
    assert (kind, code, rseq, reply[8:]) == (129 if ":" in host else 0, 0, seq, data)
    if session.raw:
        assert ident == session.ident  # the raw session's own identifier came back
    if ":" not in host:
        assert checksum(reply) == 0  # a whole, intact ICMP message


# ---- sessions ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("host", HOSTS)
def test_echo_round_trip_is_byte_exact(host: str, mode: str) -> None:
    def body() -> None:
        session = dial(host)
        try:
            assert session.raw == (mode == "raw")
            assert session.recv() is None  # non-blocking: nothing waits yet
            for seq, size in enumerate([0, 1, 56, 1000, 1452]):
                data = os.urandom(size)
                assert session.send(echo_request(host, 0x4242, seq, data))
                check_reply(host, session, wait_reply(session), seq, data)
        finally:
            session.close()

    in_private_netns(body, ping_sockets=mode == "ping-socket")


@pytest.mark.parametrize("host", HOSTS)
def test_only_echo_requests_are_sent(host: str) -> None:
    def body() -> None:
        session = dial(host)
        try:
            reply_type = 129 if ":" in host else 0
            assert not session.send(bytes([reply_type, 0, 0, 0, 0, 1, 0, 1]))  # a reply
            assert not session.send(echo_request(host, 1, 1, b"")[:6])  # shorter than an echo
            bad_code = bytearray(echo_request(host, 1, 1, b"x"))
            bad_code[1] = 3
            assert not session.send(bytes(bad_code))
            # nothing went out, so nothing comes back; a real echo still works after them
            assert session.send(echo_request(host, 1, 9, b"after"))
            check_reply(host, session, wait_reply(session), 9, b"after")
        finally:
            session.close()

    in_private_netns(body, ping_sockets=True)


@pytest.mark.parametrize("host", HOSTS)
def test_raw_sessions_keep_only_their_own_replies(host: str) -> None:
    """A raw socket sees every echo reply of the namespace: each session keeps its own."""

    def body() -> None:
        one, two = dial(host), dial(host)
        try:
            assert one.raw
            assert two.raw
            assert one.ident != two.ident
            assert one.send(echo_request(host, 7, 1, b"one"))
            check_reply(host, one, wait_reply(one), 1, b"one")
            assert two.send(echo_request(host, 7, 2, b"two"))
            check_reply(host, two, wait_reply(two), 2, b"two")
            # `one` saw the reply to `two` arrive and dropped it
            assert one.recv() is None
            assert two.recv() is None
        finally:
            one.close()
            two.close()
        assert one.ident not in ping_mod._raw_idents  # freed for later sessions

    in_private_netns(body, ping_sockets=False)


def test_an_unroutable_destination_fails_the_dial() -> None:
    # the private namespace has only lo: nothing routes to a documentation address
    def body() -> None:
        with pytest.raises(DialError) as info:
            dial("192.0.2.1")
        assert info.value.errno == errno.ENETUNREACH
        with pytest.raises(DialError) as info6:
            dial("2001:db8::1")
        assert info6.value.errno == errno.ENETUNREACH
        with pytest.raises(DialError) as bad:
            dial("not-an-ip")
        assert bad.value.errno == errno.EINVAL

    in_private_netns(body, ping_sockets=True)


def test_mark_is_set_on_the_session() -> None:
    def body() -> None:
        dialer = DirectDialer(mark=0x2A)
        session = asyncio.run(dialer.dial_ping(Address("127.0.0.1", 0), Address("127.0.0.1", 1)))
        try:
            assert session.sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == 0x2A
            assert session.sock.gettimeout() == 0.0
        finally:
            session.close()

    in_private_netns(body, ping_sockets=True)


def test_no_permission_at_all_fails_with_eacces_and_one_hint(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Neither a ping socket (group outside ping_group_range) nor a raw one (no CAP_NET_RAW):
    as root that cannot happen, so socket() is made to refuse as the kernel would."""

    def refuse(family: int, kind: int, proto: int) -> socket.socket:
        raise PermissionError(errno.EACCES if kind == socket.SOCK_DGRAM else errno.EPERM, "no")

    monkeypatch.setattr(ping_mod, "_open_socket", refuse)
    monkeypatch.setattr(ping_mod, "_hint_logged", False)
    caplog.set_level(logging.ERROR, logger="tunio.dialers.ping")
    for host in HOSTS * 2:
        with pytest.raises(DialError) as info:
            dial(host)
        assert info.value.errno == errno.EACCES
    hints = [r.getMessage() for r in caplog.records]
    assert len(hints) == 1, hints
    assert 'sysctl -w net.ipv4.ping_group_range="0 2147483647"' in hints[0]


# ---- through the worker ------------------------------------------------------------------

APP_V4, APP_V6 = "198.18.255.9", "fd00::9"


@pytest.fixture
def start_worker(endpoint: str, stack: FakeStack) -> Iterator[Callable[..., Worker]]:
    """A worker in a thread of its own namespace (ipc:// reaches it there: a file path)."""
    started: list[tuple[Worker, RunningWorker]] = []

    def start(dialer: Any, *, ping_sockets: bool = True) -> Worker:
        worker = Worker(endpoint, dialer, name="ping-worker")

        def target(ready: Callable[[], None]) -> int:
            _enter_private_netns(ping_sockets)
            worker.ready = ready
            return worker.run()

        running = RunningWorker(target)
        started.append((worker, running))
        stack.handshake(running)
        return worker

    yield start
    for worker, running in started:
        worker.stop()
        running.join()


def ping_block(host: str, ident: int) -> AddressBlock:
    dst = ipaddress.ip_address(host)
    v6 = dst.version == 6
    app = ipaddress.ip_address(APP_V6 if v6 else APP_V4)
    return AddressBlock(58 if v6 else 1, dst.version, app, ident, dst, 0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("host", HOSTS)
def test_worker_forwards_echoes_and_returns_replies(
    stack: FakeStack, start_worker: Callable[..., Worker], host: str, mode: str
) -> None:
    start_worker(DirectDialer(), ping_sockets=mode == "ping-socket")
    addr = ping_block(host, 0x4242)
    sent = [(seq, os.urandom(seq * 100)) for seq in range(1, 6)]
    for seq, data in sent:
        stack.send(Cmd.DGRAM, 3, 0, addr.pack() + echo_request(host, 0x4242, seq, data))
    for seq, data in sent:
        msg = stack.expect(Cmd.DGRAM, 3, skip=SKIP | {Cmd.CREDIT})
        assert msg.payload is not None
        back = AddressBlock.unpack(msg.payload)
        # the reply's block: ICMP from the destination to the app's identifier
        assert (back.proto, back.src, back.dst, back.dst_port) == (
            addr.proto, addr.dst, addr.src, 0x4242,
        )  # fmt: skip
        icmp = bytes(msg.payload)[wire.ADDRESS.size :]
        kind, code, _, _, rseq = struct.unpack_from("!BBHHH", icmp)
        assert (kind, code, rseq, icmp[8:]) == (129 if ":" in host else 0, 0, seq, data)


class UdpOnly:
    """A dialer that carries UDP but not ping."""

    async def dial(self, dst: Address, src: Address) -> socket.socket:
        raise DialError(errno.ECONNREFUSED, "tcp not wanted here")

    async def dial_udp(self, dst: Address, src: Address) -> Any:
        raise DialError(errno.ECONNREFUSED, "udp not wanted here")


def test_a_dialer_without_dial_ping_refuses_pings(
    stack: FakeStack, start_worker: Callable[..., Worker]
) -> None:
    assert isinstance(DirectDialer(), PingDialer)
    assert not isinstance(UdpOnly(), PingDialer)
    start_worker(UdpOnly())
    stack.send(
        Cmd.DGRAM, 4, 0, ping_block("127.0.0.1", 1).pack() + echo_request("127.0.0.1", 1, 1, b"")
    )
    assert stack.expect(Cmd.RST, 4, skip=SKIP).arg == errno.EPROTONOSUPPORT


def test_a_refused_ping_resets_the_session(
    stack: FakeStack, start_worker: Callable[..., Worker], monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(family: int, kind: int, proto: int) -> socket.socket:
        raise PermissionError(errno.EACCES, "no")

    monkeypatch.setattr(ping_mod, "_open_socket", refuse)
    start_worker(DirectDialer())
    stack.send(Cmd.DGRAM, 5, 0, ping_block("::1", 1).pack() + echo_request("::1", 1, 1, b""))
    assert stack.expect(Cmd.RST, 5, skip=SKIP).arg == errno.EACCES
