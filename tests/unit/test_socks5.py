"""The SOCKS5 dialer against scripted in-process proxies: every reply a real proxy rarely gives."""

from __future__ import annotations

import asyncio
import errno
import socket
import struct
from typing import Any

import pytest

from tunio.dialers import Address, HttpDialer, Socks5Dialer, load_dialer
from tunio.dialers.socks5 import REPLIES, Socks5Session, decode_address, encode_address
from tunio.errors import ConfigError, DialError
from tunio.testing.proxyfakes import Handler, read_all, run, with_server

SRC = Address("198.18.255.7", 40000)
DST = Address("192.0.2.1", 80)
BOUND_V4 = bytes([1, 10, 0, 0, 1]) + struct.pack("!H", 4321)


async def read_request(reader: asyncio.StreamReader) -> tuple[int, Address]:
    """A request's command and address, as the proxy sees them."""
    ver, cmd, _rsv, atyp = await reader.readexactly(4)
    assert ver == 5
    if atyp == 1:
        raw = await reader.readexactly(4 + 2)
    elif atyp == 4:
        raw = await reader.readexactly(16 + 2)
    else:
        size = await reader.readexactly(1)
        raw = size + await reader.readexactly(size[0] + 2)
    addr, _ = decode_address(bytes([atyp]) + raw, 0)
    return cmd, addr


def proxy(
    *,
    reply: int = 0,
    bound: bytes = BOUND_V4,
    then: bytes = b"",
    seen: list[Address] | None = None,
    auth: tuple[bytes, bytes] | None = None,
) -> Handler:
    """A SOCKS5 server: method selection (username/password if `auth`), one request answered
    with `reply`, then `then` in the same write and an echo of what follows."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ver, count = await reader.readexactly(2)
        methods = await reader.readexactly(count)
        assert ver == 5
        if auth is None:
            writer.write(b"\x05\x00")
        else:
            assert 2 in methods
            writer.write(b"\x05\x02")
            sub, ulen = await reader.readexactly(2)
            user = await reader.readexactly(ulen)
            plen = (await reader.readexactly(1))[0]
            password = await reader.readexactly(plen)
            ok = sub == 1 and (user, password) == auth
            writer.write(b"\x01\x00" if ok else b"\x01\x01")
            if not ok:
                return
        _cmd, addr = await read_request(reader)
        if seen is not None:
            seen.append(addr)
        writer.write(bytes([5, reply, 0]) + bound + then)
        await writer.drain()
        if reply == 0:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()

    return handler


def dial(
    handler: Handler, dst: Address = DST, size: int = 4, **kw: Any
) -> tuple[socket.socket, bytes]:
    async def client(port: int) -> tuple[socket.socket, bytes]:
        sock = await Socks5Dialer("127.0.0.1", port, **kw).dial(dst, SRC)
        assert sock.getblocking() is False
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(sock, b"ping")
        return sock, await read_all(sock, size)

    return run(with_server(handler, client))


def dial_error(handler: Handler, dst: Address = DST, **kw: Any) -> DialError:
    async def client(port: int) -> None:
        await Socks5Dialer("127.0.0.1", port, **kw).dial(dst, SRC)

    with pytest.raises(DialError) as info:
        run(with_server(handler, client))
    return info.value


def test_connect_keeps_the_bytes_behind_the_reply() -> None:
    # the destination's first bytes arrive in the same segment as the reply: none may be lost
    seen: list[Address] = []
    sock, data = dial(proxy(then=b"early", seen=seen), size=9)
    with sock:
        assert data == b"earlyping"
    assert seen == [DST]


@pytest.mark.parametrize(
    "bound",
    [
        bytes([4]) + socket.inet_pton(socket.AF_INET6, "2001:db8::1") + b"\x10\x00",
        bytes([3, 11]) + b"example.net" + b"\x10\x00",
    ],
    ids=["ipv6", "domain"],
)
def test_bound_address_of_every_type_is_read_exactly(bound: bytes) -> None:
    sock, data = dial(proxy(bound=bound, then=b"early"), size=9)
    with sock:
        assert data == b"earlyping"


@pytest.mark.parametrize(
    ("dst", "encoded"),
    [
        (Address("192.0.2.1", 80), b"\x01\xc0\x00\x02\x01\x00\x50"),
        (Address("2001:db8::2", 443), b"\x04" + socket.inet_pton(socket.AF_INET6, "2001:db8::2")
         + b"\x01\xbb"),
        (Address("example.org", 8080), b"\x03\x0bexample.org\x1f\x90"),
    ],
    ids=["ipv4", "ipv6", "domain"],
)  # fmt: skip
def test_destinations_of_every_type(dst: Address, encoded: bytes) -> None:
    assert encode_address(dst) == encoded
    assert decode_address(encoded, 0) == (dst, len(encoded))
    seen: list[Address] = []
    sock, _ = dial(proxy(seen=seen), dst=dst)
    sock.close()
    assert seen == [dst]


def test_username_and_password() -> None:
    sock, data = dial(proxy(auth=(b"alice", b"pa:ss")), username="alice", password="pa:ss")
    with sock:
        assert data == b"ping"


def test_wrong_credentials_are_eacces_with_a_clear_message() -> None:
    exc = dial_error(proxy(auth=(b"alice", b"right")), username="alice", password="wrong")
    assert exc.errno == errno.EACCES
    assert exc.strerror is not None
    assert "refused the credentials for user alice" in exc.strerror
    assert exc.strerror.startswith("socks5 proxy 127.0.0.1:")


def test_no_acceptable_method_is_eacces() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(3)
        writer.write(b"\x05\xff")

    exc = dial_error(handler)
    assert exc.errno == errno.EACCES
    assert "user:password@" in str(exc)


@pytest.mark.parametrize(("rep", "code"), [(r, c) for r, (c, _) in REPLIES.items()] + [(0x42,
                         errno.ECONNABORTED)])  # fmt: skip
def test_reply_codes_become_errnos(rep: int, code: int) -> None:
    exc = dial_error(proxy(reply=rep))
    assert exc.errno == code
    assert str(DST) in str(exc)


def test_reply_code_table_is_the_rfcs() -> None:
    assert {r: errno.errorcode[c] for r, (c, _) in REPLIES.items()} == {
        1: "ECONNABORTED", 2: "EACCES", 3: "ENETUNREACH", 4: "EHOSTUNREACH",
        5: "ECONNREFUSED", 6: "ETIMEDOUT", 7: "EPROTONOSUPPORT", 8: "EAFNOSUPPORT",
    }  # fmt: skip


def test_not_a_socks5_server_is_a_protocol_error() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(3)
        writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    assert dial_error(handler).errno == errno.EPROTO


def test_proxy_closing_mid_handshake_is_a_reset() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(3)
        writer.write(b"\x05\x00")
        await read_request(reader)
        writer.write(b"\x05\x00\x00\x01\x0a")  # cut inside the bound address

    exc = dial_error(handler)
    assert exc.errno == errno.ECONNRESET


def test_proxy_down_is_refused_and_named() -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        with pytest.raises(DialError) as info:
            run(Socks5Dialer("127.0.0.1", port).dial(DST, SRC))
    assert info.value.errno == errno.ECONNREFUSED
    assert f"socks5 proxy 127.0.0.1:{port}: cannot reach it" in str(info.value)


def test_a_cancelled_dial_closes_its_socket() -> None:
    accepted = asyncio.Event()
    closed = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set()
        while await reader.read(100):  # never answers the greeting
            pass
        closed.set()  # EOF: the client closed the socket it was dialing with

    async def client(port: int) -> None:
        task = asyncio.ensure_future(Socks5Dialer("127.0.0.1", port).dial(DST, SRC))
        await accepted.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(closed.wait(), 5.0)

    run(with_server(handler, client))


# ---------------------------------------------------------------- UDP ASSOCIATE


def udp_proxy(relay_port: int, requests: list[tuple[int, Address]], bound_host: bytes) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(3)
        writer.write(b"\x05\x00")
        requests.append(await read_request(reader))
        writer.write(b"\x05\x00\x00\x01" + bound_host + struct.pack("!H", relay_port))
        await writer.drain()
        await reader.read(1)  # the association lives as long as this connection

    return handler


def header(addr: Address, frag: int = 0) -> bytes:
    return b"\x00\x00" + bytes([frag]) + encode_address(addr)


async def readable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await asyncio.wait_for(ready, 5.0)
    finally:
        loop.remove_reader(fd)


@pytest.mark.parametrize("bound_host", [b"\x7f\x00\x00\x01", b"\x00\x00\x00\x00"],
                         ids=["relay-address", "unspecified"])  # fmt: skip
def test_udp_associate_through_a_fake_relay(bound_host: bytes) -> None:
    dst = Address("192.0.2.53", 53)
    requests: list[tuple[int, Address]] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as relay:
        relay.bind(("127.0.0.1", 0))
        relay.settimeout(5.0)

        async def client(port: int) -> None:
            session = await Socks5Dialer("127.0.0.1", port).dial_udp(dst, SRC)
            assert isinstance(session, Socks5Session)
            try:
                assert session.send(b"query")
                data, peer = relay.recvfrom(65536)
                assert data == header(dst) + b"query"
                assert peer == session.sock.getsockname()
                # a fragment and a runt are dropped; the answer after them comes through
                relay.sendto(header(dst, frag=1) + b"part", peer)
                relay.sendto(b"\x00\x00", peer)
                relay.sendto(header(Address("2001:db8::53", 5353)) + b"answer", peer)
                got: list[tuple[bytes, Address]] = []
                while not got:
                    await readable(session.fileno())
                    while (item := session.recv()) is not None:
                        got.append(item)
                assert got == [(b"answer", Address("2001:db8::53", 5353))]
                assert session.dropped == 2
            finally:
                session.close()

        run(with_server(udp_proxy(relay.getsockname()[1], requests, bound_host), client))
    # RFC 1928 §7: the request names the address the datagrams will come from
    [(cmd, addr)] = requests
    assert cmd == 3
    assert addr.host == "127.0.0.1"
    assert addr.port != 0


def test_udp_session_ends_when_the_proxy_closes_the_control_connection() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as relay:
        relay.bind(("127.0.0.1", 0))

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readexactly(3)
            writer.write(b"\x05\x00")
            await read_request(reader)
            writer.write(b"\x05\x00\x00\x01\x7f\x00\x00\x01" + struct.pack(
                "!H", relay.getsockname()[1]))  # fmt: skip
            # and closes at once: the association is over

        async def client(port: int) -> None:
            session = await Socks5Dialer("127.0.0.1", port).dial_udp(DST, SRC)
            try:
                await readable(session.control.fileno())
                with pytest.raises(ConnectionResetError):
                    session.recv()
            finally:
                session.close()

        run(with_server(handler, client))


def test_udp_refused_through_a_chain() -> None:
    dialer = load_dialer(["socks5://127.0.0.1:1", "socks5://127.0.0.1:2"])
    assert isinstance(dialer, Socks5Dialer)
    with pytest.raises(DialError) as info:
        run(dialer.dial_udp(DST, SRC))
    assert info.value.errno == errno.EPROTONOSUPPORT


# ---------------------------------------------------------------- URLs and chains


def test_urls() -> None:
    d = load_dialer("socks5://us%40er:p%3Ass@[2001:db8::9]:1080", egress_mark=7)
    assert isinstance(d, Socks5Dialer)
    assert (d.proxy, d.username, d.password) == (Address("2001:db8::9", 1080), "us@er", "p:ss")
    assert getattr(d.via, "mark", None) == 7
    assert "p:ss" not in repr(d)
    h = load_dialer("http://proxy.example:3128")
    assert isinstance(h, HttpDialer)
    assert h.proxy == Address("proxy.example", 3128)


@pytest.mark.parametrize(
    "spec",
    ["socks5://host", "socks5://user@host:1", "socks5://host:1/path", "socks4://host:1",
     ["socks5://a:1", "direct"], ["socks5://a:1", "mod:attr"], []],
)  # fmt: skip
def test_bad_specs_are_config_errors(spec: str | list[str]) -> None:
    with pytest.raises(ConfigError):
        load_dialer(spec)


def test_a_chain_reaches_each_proxy_through_the_one_before() -> None:
    # one fake plays both hops: a SOCKS5 proxy whose tunnel leads to an HTTP proxy
    dst = Address("192.0.2.80", 443)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(3)
        writer.write(b"\x05\x00")
        _cmd, hop = await read_request(reader)
        assert hop == Address("198.51.100.2", 3128)
        writer.write(b"\x05\x00\x00" + BOUND_V4)
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"CONNECT 192.0.2.80:443 HTTP/1.1\r\n")
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\nhello")
        await writer.drain()
        await reader.read(1)

    async def client(port: int) -> bytes:
        dialer = load_dialer([f"socks5://127.0.0.1:{port}", "http://198.51.100.2:3128"])
        with await dialer.dial(dst, SRC) as sock:
            return await read_all(sock, 5)

    assert run(with_server(handler, client)) == b"hello"


def test_repeated_dialer_options_make_a_chain() -> None:
    from tunio.cli import _dialer_spec, build_parser, build_worker_parser, options_from  # noqa: PLC0415

    chain = ["--dialer", "socks5://a:1080", "--dialer", "http://b:3128"]
    assert _dialer_spec(build_parser().parse_args(chain).dialer) == (
        "socks5://a:1080",
        "http://b:3128",
    )
    worker = build_worker_parser().parse_args(["--endpoint", "ipc:///x", *chain[:2]])
    assert _dialer_spec(worker.dialer) == "socks5://a:1080"
    # no --dialer: the flag sets nothing, and the run's dialer is the default, direct
    assert _dialer_spec(getattr(build_parser().parse_args([]), "dialer", None)) == "direct"
    assert options_from(build_parser().parse_args([])).dialer == "direct"
    dialer = load_dialer(("socks5://a:1080", "http://b:3128"), egress_mark=1)
    assert isinstance(dialer, HttpDialer)
    assert isinstance(dialer.via, Socks5Dialer)
    assert getattr(dialer.via.via, "mark", None) == 1
