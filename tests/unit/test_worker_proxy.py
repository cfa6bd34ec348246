"""Proxy handshakes in the worker's TCP table, without a task: SOCKS5 and HTTP CONNECT dialled
through `start_handshake`, the connect and the handshake driven from the table's epoll
(tests/unit/tablerig.py), against scripted proxies in a thread that answer only once they hold
the whole request (so a handshake in more than one round trip would hang here)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import struct
import threading
from collections.abc import Callable, Iterator

import pytest
from lab.netlab import recv_exact

from tests.unit.tablerig import MakeRig, Rig, rig_maker
from tunio.dialers import DirectDialer, FunctionDialer, HttpDialer, Socks5Dialer
from tunio.dialers.base import Dialer
from tunio.wire import Cmd
from tunio.worker.dial import Connecting
from tunio.worker.flow import State

BOUND = bytes([1, 10, 0, 0, 1]) + struct.pack("!H", 4321)
Script = Callable[[socket.socket], None]


@pytest.fixture
def rigs() -> Iterator[MakeRig]:
    with rig_maker() as make:
        yield make


class Proxy:
    """A listener on loopback whose one connection `script` serves, in a thread."""

    def __init__(self, script: Script) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._serve, args=(script,), daemon=True)
        self.thread.start()

    def _serve(self, script: Script) -> None:
        try:
            conn, _ = self.listener.accept()
            with conn:
                conn.settimeout(10.0)
                script(conn)
        except BaseException as exc:
            self.errors.append(exc)

    def close(self) -> None:
        self.thread.join(10.0)
        self.listener.close()
        if self.errors:
            raise self.errors[0]


def socks5_request(auth: bytes = b"") -> bytes:
    method = 2 if auth else 0
    return bytes([5, 1, method]) + auth + bytes([5, 1, 0, 1, 127, 0, 0, 1, 0, 9])


def opened(rig: Rig, fid: int = 1) -> None:
    rig.open(fid)
    dial = rig.table.flows[fid].dial
    assert isinstance(dial, Connecting)  # no task: the table's epoll carries it
    assert dial.handshake is not None


def no_tasks(rig: Rig) -> bool:
    return not asyncio.all_tasks(rig.loop)


def test_socks5_connect_in_one_round_trip_keeps_the_bytes_behind_it(rigs: MakeRig) -> None:
    def script(conn: socket.socket) -> None:
        assert recv_exact(conn, 13) == socks5_request()  # all of it before any answer
        conn.sendall(b"\x05\x00" + b"\x05\x00\x00" + BOUND + b"early")
        assert recv_exact(conn, 4) == b"ping"
        conn.sendall(b"pong")

    proxy = Proxy(script)
    rig = rigs(Socks5Dialer("127.0.0.1", proxy.port))
    opened(rig)
    assert rig.expect(Cmd.OPEN_OK, 1).arg > 0
    assert no_tasks(rig)
    assert rig.expect(Cmd.DATA, 1).payload == b"early"
    rig.table.on_data(1, b"ping")
    assert rig.expect(Cmd.DATA, 1).payload == b"pong"
    proxy.close()


def test_socks5_credentials_go_with_the_greeting(rigs: MakeRig) -> None:
    auth = b"\x01\x04user\x06secret"

    def script(conn: socket.socket) -> None:
        assert recv_exact(conn, 13 + len(auth)) == socks5_request(auth)
        conn.sendall(b"\x05\x02\x01\x00\x05\x00\x00" + BOUND)

    proxy = Proxy(script)
    rig = rigs(Socks5Dialer("127.0.0.1", proxy.port, username="user", password="secret"))
    opened(rig)
    rig.expect(Cmd.OPEN_OK, 1)
    rig.expect(Cmd.FIN, 1)  # the proxy closed behind its answer: the destination's EOF
    assert rig.table.flows[1].state is State.DEST_FIN
    proxy.close()


@pytest.mark.parametrize(
    ("answer", "code"),
    [
        (b"\x05\x00\x05\x05\x00" + BOUND, errno.ECONNREFUSED),
        (b"\x05\x00\x05\x04\x00" + BOUND, errno.EHOSTUNREACH),
        (b"\x05\xff", errno.EACCES),
        (b"\x05\x02\x01\x01", errno.EACCES),
        (b"\x04\x00", errno.EPROTO),
        (b"\x05\x00\x05", errno.ECONNRESET),  # closed in the middle of the reply
    ],
)
def test_socks5_failures_are_the_apps_errno(rigs: MakeRig, answer: bytes, code: int) -> None:
    def script(conn: socket.socket) -> None:
        conn.recv(1024)
        conn.sendall(answer)

    proxy = Proxy(script)
    creds = {"username": "u", "password": "p"} if answer[1] == 2 else {}
    rig = rigs(Socks5Dialer("127.0.0.1", proxy.port, **creds))  # type: ignore[arg-type]
    opened(rig)
    assert rig.expect(Cmd.OPEN_FAIL, 1).arg == code
    assert rig.table.flows == {}
    proxy.close()


def test_a_reply_in_pieces_is_put_together(rigs: MakeRig) -> None:
    def script(conn: socket.socket) -> None:
        recv_exact(conn, 13)
        for piece in (b"\x05", b"\x00\x05\x00", b"\x00\x01\x0a", b"\x00\x00\x01\x10\xe1x"):
            conn.sendall(piece)
            threading.Event().wait(0.02)

    proxy = Proxy(script)
    rig = rigs(Socks5Dialer("127.0.0.1", proxy.port))
    opened(rig)
    rig.expect(Cmd.OPEN_OK, 1)
    assert rig.expect(Cmd.DATA, 1).payload == b"x"
    proxy.close()


def test_http_connect_without_a_task(rigs: MakeRig) -> None:
    def script(conn: socket.socket) -> None:
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            head += conn.recv(1024)
        assert head.startswith(b"CONNECT 127.0.0.1:9 HTTP/1.1\r\n")
        conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\nhello")

    proxy = Proxy(script)
    rig = rigs(HttpDialer("127.0.0.1", proxy.port))
    opened(rig)
    rig.expect(Cmd.OPEN_OK, 1)
    assert no_tasks(rig)
    assert rig.expect(Cmd.DATA, 1).payload == b"hello"
    proxy.close()


def test_http_refusal_waits_for_its_page_to_say_why(rigs: MakeRig) -> None:
    page = b"<p>(113) No route to host</p>"

    def script(conn: socket.socket) -> None:
        conn.recv(1024)
        conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: %d\r\n\r\n" % len(page))
        threading.Event().wait(0.05)  # the page comes behind its head
        conn.sendall(page)

    proxy = Proxy(script)
    rig = rigs(HttpDialer("127.0.0.1", proxy.port))
    opened(rig)
    assert rig.expect(Cmd.OPEN_FAIL, 1).arg == errno.EHOSTUNREACH
    proxy.close()


def test_proxy_down_is_refused(rigs: MakeRig) -> None:
    with socket.create_server(("127.0.0.1", 0)) as gone:
        port = gone.getsockname()[1]
    rig = rigs(Socks5Dialer("127.0.0.1", port))
    rig.open(1)
    assert rig.expect(Cmd.OPEN_FAIL, 1).arg == errno.ECONNREFUSED


@contextlib.contextmanager
def deaf_port() -> Iterator[int]:
    """A loopback port whose SYNs are dropped, as a blackholed proxy's would be: its listener
    (backlog 0) never accepts, and one connection fills its queue."""
    with socket.create_server(("127.0.0.1", 0), backlog=0) as listener:
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):
            yield port


def through(how: str, port: int) -> Dialer:
    if how == "task":  # a chain's first hop is dialled in a task (tunio.dialers.proxy)
        return Socks5Dialer("127.0.0.1", port, via=FunctionDialer(DirectDialer().dial))
    return Socks5Dialer("127.0.0.1", port)


@pytest.mark.parametrize("how", ["epoll", "task"])
def test_a_proxy_that_never_answers_the_connect_is_unreachable(
    rigs: MakeRig, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tunio.worker")
    with deaf_port() as port:
        rig = rigs(through(how, port), connect_timeout=0.2)
        rig.open(1)
        assert isinstance(rig.table.flows[1].dial, Connecting) == (how == "epoll")
        assert rig.expect(Cmd.OPEN_FAIL, 1).arg == errno.EHOSTUNREACH
        rig.step()
        assert no_tasks(rig)
    why = {
        "epoll": f"socks5 proxy 127.0.0.1:{port}: cannot reach it: Connection timed out (0.2 s)",
        "task": "no connection to the proxy within 0.2 s",
    }[how]
    assert why in caplog.text


def test_a_destination_that_never_answers_stays_silent(rigs: MakeRig) -> None:
    """A direct dial's timeout is the destination's silence (ETIMEDOUT: the stack answers
    nothing), and so is a proxy that took the connection but not yet the request's answer."""
    with deaf_port() as port:
        rig = rigs(DirectDialer(), connect_timeout=0.2)
        rig.open(1, port=port)
        assert rig.expect(Cmd.OPEN_FAIL, 1).arg == errno.ETIMEDOUT

    def script(conn: socket.socket) -> None:
        recv_exact(conn, 13)
        assert conn.recv(1) == b""  # no answer: the dial gives up and closes

    for how in ("epoll", "task"):
        proxy = Proxy(script)
        rig = rigs(through(how, proxy.port), connect_timeout=0.3)
        rig.open(2)
        assert rig.expect(Cmd.OPEN_FAIL, 2).arg == errno.ETIMEDOUT
        rig.step()  # the cancelled task closes its proxy connection
        proxy.close()
        assert no_tasks(rig)


def test_rst_while_handshaking_resets_the_proxy_connection(rigs: MakeRig) -> None:
    seen: list[bytes] = []

    def script(conn: socket.socket) -> None:
        recv_exact(conn, 13)
        try:
            seen.append(conn.recv(1))  # no answer from us: the dial is reset meanwhile
        except ConnectionResetError:
            seen.append(b"reset")

    proxy = Proxy(script)
    rig = rigs(Socks5Dialer("127.0.0.1", proxy.port))
    opened(rig)
    dial = rig.table.flows[1].dial
    assert isinstance(dial, Connecting)
    rig.until(lambda: dial.handshaking, "the request sent")
    rig.table.on_rst(1)
    proxy.close()
    assert seen == [b"reset"]
    assert rig.take() == []
