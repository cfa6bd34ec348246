"""The HTTP CONNECT dialer against scripted in-process proxies."""

from __future__ import annotations

import asyncio
import base64
import errno
import socket
from typing import Any

import pytest

from tunio.dialers import Address, HttpDialer
from tunio.dialers.http import errno_for
from tunio.errors import DialError
from tunio.testing.proxyfakes import Handler, read_all, run, with_server

SRC = Address("198.18.255.7", 40000)
DST = Address("192.0.2.1", 443)

TINYPROXY_500 = (
    b"HTTP/1.1 500 Unable to connect\r\nServer: tinyproxy/1.11.1\r\nContent-Type: text/html\r\n"
    b"Connection: close\r\n\r\n<html><head><title>500 Unable to connect</title></head><body>"
    b"<h1>Unable to connect</h1><p>Tinyproxy was unable to connect to the remote web server."
    b"</p></body></html>\n"
)


def answering(*chunks: bytes, heads: list[bytes] | None = None, echo: bool = True) -> Handler:
    """A proxy that reads the CONNECT head, writes `chunks` (one write each), then echoes."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if heads is not None:
            heads.append(head)
        for chunk in chunks:
            writer.write(chunk)
            await writer.drain()
        while echo and (data := await reader.read(65536)):
            writer.write(data)
            await writer.drain()

    return handler


def dial(handler: Handler, dst: Address = DST, size: int = 9, **kw: Any) -> bytes:
    async def client(port: int) -> bytes:
        sock = await HttpDialer("127.0.0.1", port, **kw).dial(dst, SRC)
        with sock:
            assert sock.getblocking() is False
            await asyncio.get_running_loop().sock_sendall(sock, b"ping")
            return await read_all(sock, size)

    return run(with_server(handler, client))


def dial_error(handler: Handler, **kw: Any) -> DialError:
    async def client(port: int) -> None:
        await HttpDialer("127.0.0.1", port, **kw).dial(DST, SRC)

    with pytest.raises(DialError) as info:
        run(with_server(handler, client))
    return info.value


def test_request_and_the_bytes_behind_the_answer() -> None:
    heads: list[bytes] = []
    got = dial(answering(b"HTTP/1.1 200 Connection established\r\n\r\nearly", heads=heads))
    assert got == b"earlyping"
    assert heads == [b"CONNECT 192.0.2.1:443 HTTP/1.1\r\nHost: 192.0.2.1:443\r\n\r\n"]


def test_answer_split_anywhere_across_writes() -> None:
    answer = b"HTTP/1.0 200 OK\r\nProxy-Agent: x\r\n\r\nearly"
    for cut in range(1, len(answer)):
        got = dial(answering(answer[:cut], answer[cut:]))
        assert got == b"earlyping", cut


def test_basic_auth_and_ipv6_destination() -> None:
    heads: list[bytes] = []
    got = dial(
        answering(b"HTTP/1.1 200 OK\r\n\r\n", heads=heads),
        dst=Address("2001:db8::1", 80),
        size=4,
        username="alice",
        password="pa:ss",
    )
    assert got == b"ping"
    token = base64.b64encode(b"alice:pa:ss").decode()
    assert heads == [
        b"CONNECT [2001:db8::1]:80 HTTP/1.1\r\nHost: [2001:db8::1]:80\r\n"
        + f"Proxy-Authorization: Basic {token}\r\n\r\n".encode()
    ]


@pytest.mark.parametrize("status", [b"407 Proxy Authentication Required", b"401 Unauthorized"])
def test_failed_authentication_is_eacces_and_says_so(status: bytes) -> None:
    exc = dial_error(
        answering(b"HTTP/1.0 " + status + b"\r\nContent-Length: 0\r\n\r\n", echo=False),
        username="alice",
        password="wrong",
    )
    assert exc.errno == errno.EACCES
    assert "proxy authentication failed (user alice)" in str(exc)


@pytest.mark.parametrize(
    ("answer", "code"),
    [
        (TINYPROXY_500, errno.ECONNREFUSED),
        (b"HTTP/1.1 403 Forbidden\r\n\r\n", errno.EACCES),
        (b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 52\r\n\r\n"
         b"<p>The system returned: (111) Connection refused</p>", errno.ECONNREFUSED),
        (b"HTTP/1.1 503 Service Unavailable\r\n\r\n(113) No route to host", errno.EHOSTUNREACH),
        (b"HTTP/1.1 503 Service Unavailable\r\n\r\nNetwork is unreachable", errno.ENETUNREACH),
        (b"HTTP/1.1 500 Oops\r\n\r\nConnection timed out", errno.ETIMEDOUT),
        (b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n", errno.ECONNREFUSED),
        (b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n", errno.EHOSTUNREACH),
        (b"HTTP/1.1 504 Gateway Timeout\r\nContent-Length: 0\r\n\r\n", errno.ETIMEDOUT),
        (b"HTTP/1.1 418 I'm a teapot\r\nContent-Length: 0\r\n\r\n", errno.ECONNABORTED),
        (b"SSH-2.0-OpenSSH\r\n\r\n", errno.EPROTO),
    ],
    ids=["tinyproxy-500", "403", "squid-refused", "no-route", "net-unreachable", "timed-out",
         "502", "503", "504", "418", "not-http"],
)  # fmt: skip
def test_status_codes_and_texts_become_errnos(answer: bytes, code: int) -> None:
    exc = dial_error(answering(answer, echo=False))
    assert exc.errno == code, exc


def test_errno_for_prefers_words_to_the_status() -> None:
    assert errno_for(502, b"No route to host") == errno.EHOSTUNREACH
    assert errno_for(407, b"Connection refused") == errno.EACCES


def test_closed_before_answering_is_a_reset() -> None:
    exc = dial_error(answering(b"HTTP/1.1 200", echo=False))
    assert exc.errno == errno.ECONNRESET


def test_endless_head_is_a_protocol_error() -> None:
    exc = dial_error(answering(b"HTTP/1.1 200 OK\r\n" + b"X-Pad: y\r\n" * 3000, echo=False))
    assert exc.errno == errno.EPROTO


def test_error_page_without_length_does_not_hang() -> None:
    # the proxy neither says how long its page is nor closes: the dial still ends promptly
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 503 Service Unavailable\r\n\r\nNo route")
        await writer.drain()
        await reader.read(1)

    loop_time: list[float] = []

    async def client(port: int) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            await HttpDialer("127.0.0.1", port).dial(DST, SRC)
        finally:
            loop_time.append(loop.time() - start)

    with pytest.raises(DialError) as info:
        run(with_server(handler, client))
    assert info.value.errno == errno.EHOSTUNREACH
    assert loop_time[0] < 5.0


def test_proxy_down_is_refused() -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        with pytest.raises(DialError) as info:
            run(HttpDialer("127.0.0.1", port).dial(DST, SRC))
    assert info.value.errno == errno.ECONNREFUSED
