"""Dialers end to end: tunio-run through real SOCKS5 (danted) and HTTP CONNECT (tinyproxy)
proxies in the srv namespace, chains, UDP ASSOCIATE, and a user's redirect dialer.

What the app sees through each proxy, checked below:
- danted passes the kernel's errno on as a reply code: a closed port is refused (a RST at the
  app), an unreachable host is EHOSTUNREACH (ICMP host unreachable at the app).
- tinyproxy 1.11 answers every failed connect with the same `500 Unable to connect`: the
  dialer maps it to ECONNREFUSED, so an unreachable host looks refused to the app too.
- Wrong credentials are EACCES, a refusal by policy, which the stack answers with a RST: the
  app's connect fails with ECONNREFUSED at once, and the worker logs one line naming the proxy
  and the user.
"""

from __future__ import annotations

import errno
import hashlib
import re
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from lab.netlab import (
    BLACKHOLE_ADDRESS,
    PEER_PORTS,
    SERVER_ADDRESS,
    UNREACHABLE_ADDRESS,
    Lab,
    TunioProcess,
    pattern,
    pattern_sha256,
    recv_all,
    recv_exact,
)
from lab.proxies import (
    PROXY_ADDRESS,
    UDP_ECHO_PORT,
    USER,
    Proxy,
    add_proxy_address,
    start_dante,
    start_tinyproxy,
)
from lab.watch import final_statistics

from tests.vm.conftest import REPO, start_servers

pytestmark = [pytest.mark.vm, pytest.mark.needs("danted", "tinyproxy", "openssl", "unshare")]

CLOSED_PORT = 1
UDP_MTU_PAYLOAD = 1500 - 20 - 8
BIG = 4 << 20  # bytes each way in the byte-exact transfers
PROXIES_PY = REPO / "tools" / "lab" / "proxies.py"
EXAMPLES = REPO / "examples"


@pytest.fixture(scope="module")
def proxies(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Proxy]:
    start_servers(lab)
    add_proxy_address(lab)
    workdir = tmp_path_factory.mktemp("proxies")
    lab.serve([sys.executable, str(PROXIES_PY), "udp-echo", "--listen",
               f"{SERVER_ADDRESS}:{UDP_ECHO_PORT}"])  # fmt: skip
    return {
        "socks5": start_dante(lab, workdir, auth=False),
        "socks5-auth": start_dante(lab, workdir, auth=True),
        "http": start_tinyproxy(lab, workdir, auth=False),
        "http-auth": start_tinyproxy(lab, workdir, auth=True),
    }


def url(proxies: dict[str, Proxy], name: str, **kw: str) -> str:
    return proxies[name].url(name.split("-", maxsplit=1)[0], **kw)


@pytest.fixture
def run_tunio(lab: Lab) -> Iterator[list[TunioProcess]]:
    """Started tunio-runs (append to the list); each must exit 0 at the end of the test."""
    started: list[TunioProcess] = []
    yield started
    for proc in started:
        code = proc.stop()
        assert code == 0, f"tunio-run exited {code}; log:\n{proc.log.text}"


def start(lab: Lab, started: list[TunioProcess], *dialers: str) -> TunioProcess:
    args: list[str] = []
    for spec in dialers:
        args += ["--dialer", spec]
    proc = lab.start_tunio(args)
    started.append(proc)
    return proc


def echo(lab: Lab, size: int) -> None:
    """`size` bytes out and back, without a half-close: tinyproxy ends the whole tunnel when the
    client's side ends (it carries no half-close), so EOF cannot be the end-of-upload mark."""
    data = pattern(size)
    with lab.connect(PEER_PORTS["echo"], timeout=30.0) as sock:
        sender = threading.Thread(target=sock.sendall, args=(data,), daemon=True)
        sender.start()
        got = recv_exact(sock, size)
        sender.join(30.0)
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()


def download(lab: Lab, size: int) -> None:
    with lab.connect(PEER_PORTS["source"], timeout=30.0) as sock:
        sock.sendall(f"{size}\n".encode())
        data = recv_exact(sock, size)
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == b""
    assert hashlib.sha256(data).hexdigest() == pattern_sha256(size)


def connect_errno(lab: Lab, host: str, port: int) -> int:
    started = time.monotonic()
    with pytest.raises(OSError, match=r".") as info:
        lab.connect(port, host=host, timeout=10.0).close()
    assert time.monotonic() - started < 5.0  # an answer, not a timeout
    assert info.value.errno is not None
    return info.value.errno


# ---------------------------------------------------------------- through each proxy


@pytest.mark.parametrize(
    ("name", "unreachable"),
    [
        ("socks5", errno.EHOSTUNREACH),
        ("socks5-auth", errno.EHOSTUNREACH),
        ("http", errno.ECONNREFUSED),  # tinyproxy does not say why a connect failed
        ("http-auth", errno.ECONNREFUSED),
    ],
)
def test_through_a_proxy(
    lab: Lab,
    proxies: dict[str, Proxy],
    run_tunio: list[TunioProcess],
    name: str,
    unreachable: int,
) -> None:
    tunio = start(lab, run_tunio, url(proxies, name))
    echo(lab, BIG)
    download(lab, BIG)
    assert connect_errno(lab, SERVER_ADDRESS, CLOSED_PORT) == errno.ECONNREFUSED
    assert connect_errno(lab, UNREACHABLE_ADDRESS, 80) == unreachable
    download(lab, 1000)  # and still fine after the failures
    assert tunio.running()


@pytest.mark.parametrize(
    ("name", "line"),
    [
        ("socks5-auth", rf"socks5 proxy {PROXY_ADDRESS}:\d+ refused the credentials for user "
                        rf"{USER}"),
        ("http-auth", rf"http proxy {PROXY_ADDRESS}:\d+: proxy authentication failed "
                      rf"\(user {USER}\)"),
    ],
)  # fmt: skip
def test_wrong_credentials(
    lab: Lab, proxies: dict[str, Proxy], run_tunio: list[TunioProcess], name: str, line: str
) -> None:
    tunio = start(lab, run_tunio, url(proxies, name, password="wrong"))
    # EACCES: the stack answers the SYN with a RST, a connect sees ECONNREFUSED
    assert connect_errno(lab, SERVER_ADDRESS, PEER_PORTS["echo"]) == errno.ECONNREFUSED
    logged = tunio.log.wait_for(rf"dial {SERVER_ADDRESS}:7 failed: EACCES \({line}\)", 10.0)
    assert "wrong" not in logged
    tunio.stop()
    # counted once, by the worker that had the flow
    counts = re.findall(r"dial_failures=(\{[^}]*\})", tunio.log.text)
    assert sorted(counts) == ["{'EACCES': 1}", "{}"], tunio.log.text


def test_chain_socks5_then_http(
    lab: Lab, proxies: dict[str, Proxy], run_tunio: list[TunioProcess]
) -> None:
    tunio = start(lab, run_tunio, url(proxies, "socks5-auth"), url(proxies, "http-auth"))
    echo(lab, BIG)
    download(lab, BIG)
    assert connect_errno(lab, SERVER_ADDRESS, CLOSED_PORT) == errno.ECONNREFUSED
    assert tunio.running()
    # both proxies saw the flow: dante tunnelled to tinyproxy, which reached the server
    proxies["http-auth"].log.wait_for(rf"CONNECT {SERVER_ADDRESS}:{PEER_PORTS['source']}", 5.0)


def test_a_chain_whose_way_out_loops_fails_fast_and_is_named(
    lab: Lab, proxies: dict[str, Proxy], run_tunio: list[TunioProcess]
) -> None:
    """A chain's first hop is dialled by a coroutine, not watched by the worker: with a mark
    whose connections take the main table (into the TUN), the direct dialer finds its
    connection to the first proxy leaving with the app's address, and the flow fails with
    ENETUNREACH at once, named and counted, not hop after hop until the app times out."""
    tunio = lab.start_tunio(["--dialer", url(proxies, "socks5"), "--dialer", url(proxies, "http"),
                             "--egress-mark", "0x2"])  # fmt: skip
    run_tunio.append(tunio)
    for _ in range(3):
        assert connect_errno(lab, SERVER_ADDRESS, PEER_PORTS["echo"]) == errno.ENETUNREACH
    first = proxies["socks5"]
    proxy = re.escape(f"{first.host}:{first.port}")
    tunio.log.wait_for(rf"routing loop: its connection to {SERVER_ADDRESS}:\d+ via "
                       rf"socks5://{proxy},http://\S+ left from 198\.18\.255\.1", 10.0)  # fmt: skip
    assert tunio.stop() == 0, tunio.log.text
    stats = final_statistics(tunio)
    assert stats["flows_opened"] <= 3 * (2 + 1), stats  # each cut within a hop per worker
    assert stats["pending"] == 0, stats


@pytest.mark.parametrize("scheme", ["socks5", "http"])
def test_a_proxy_that_never_answers_is_unreachable_at_once(
    lab: Lab, proxies: dict[str, Proxy], run_tunio: list[TunioProcess], scheme: str
) -> None:
    """The proxy's address is blackholed (srv drops its SYNs): the dial's timeout finds it still
    connecting to the proxy, so the app hears "no route to host" when --connect-timeout runs
    out, not silence that would leave it to its own SYN retries for two minutes."""
    tunio = lab.start_tunio(["--dialer", f"{scheme}://{BLACKHOLE_ADDRESS}:1080",
                             "--connect-timeout", "1"])  # fmt: skip
    run_tunio.append(tunio)
    started = time.monotonic()
    assert connect_errno(lab, SERVER_ADDRESS, PEER_PORTS["echo"]) == errno.EHOSTUNREACH
    assert time.monotonic() - started >= 0.9  # the answer waited for the timeout
    tunio.log.wait_for(
        rf"dial {SERVER_ADDRESS}:{PEER_PORTS['echo']} failed: EHOSTUNREACH \({scheme} proxy "
        rf"{BLACKHOLE_ADDRESS}:1080: cannot reach it: Connection timed out \(1 s\)\)",
        5.0,
    )
    # and the next connect dials afresh, with the same answer
    assert connect_errno(lab, SERVER_ADDRESS, PEER_PORTS["echo"]) == errno.EHOSTUNREACH
    assert tunio.running()


# ---------------------------------------------------------------- UDP ASSOCIATE


def udp_echo(lab: Lab, payloads: list[bytes]) -> list[bytes]:
    answers: list[bytes] = []
    with lab.open_socket(lab.app, socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((SERVER_ADDRESS, UDP_ECHO_PORT))
        sock.settimeout(3.0)
        for payload in payloads:
            for _attempt in range(3):  # UDP may drop; three tries, then it counts as lost
                sock.send(payload)
                try:
                    answers.append(sock.recv(65535))
                    break
                except TimeoutError:
                    continue
    return answers


@pytest.mark.parametrize("name", ["socks5", "socks5-auth"])
def test_udp_through_dante(
    lab: Lab, proxies: dict[str, Proxy], run_tunio: list[TunioProcess], name: str
) -> None:
    tunio = start(lab, run_tunio, url(proxies, name))
    # up to what one packet through the TUN carries; with the SOCKS5 header the relay's
    # datagrams are larger and the veth fragments them
    payloads = [pattern(n) for n in (1, 512, UDP_MTU_PAYLOAD)]
    assert udp_echo(lab, payloads) == payloads
    assert tunio.running()


# ---------------------------------------------------------------- a user's dialer


REDIRECT_MAP = f"198.18.7.7:80={SERVER_ADDRESS}:{PEER_PORTS['echo']}"


def echo_through_redirect(lab: Lab) -> None:
    data = pattern(1 << 20)
    with lab.connect(80, host="198.18.7.7", timeout=30.0) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == data
    # what the map does not name goes straight through
    with lab.connect(PEER_PORTS["echo"], timeout=30.0) as sock:
        sock.sendall(b"direct")
        assert recv_exact(sock, 6) == b"direct"


def test_redirect_example_as_a_library(
    lab: Lab, proxies: dict[str, Proxy], run_tunio: list[TunioProcess]
) -> None:
    del proxies  # for the servers it starts
    argv = [
        sys.executable, str(EXAMPLES / "redirect.py"),
        "--tun", "tun0", "--address", "198.18.255.1/24", "--route", "default",
        "--egress-mark", "0x1", "--runtime-dir", str(lab.runtime_dir), "--map", REDIRECT_MAP,
    ]  # fmt: skip
    proc = lab.popen(lab.app, argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    tunio = TunioProcess(proc, argv, lab.runtime_dir)
    run_tunio.append(tunio)
    tunio.wait_ready()
    echo_through_redirect(lab)


def test_redirect_example_as_a_dialer_spec(
    lab: Lab, proxies: dict[str, Proxy], run_tunio: list[TunioProcess]
) -> None:
    del proxies
    argv = lab.tunio_argv(["--dialer", "redirect:from_env"])
    env = {
        "PYTHONPATH": f"{REPO}:{EXAMPLES}",
        "REDIRECT_MAP": REDIRECT_MAP,  # its dialer, made bare, takes the run's --egress-mark
    }
    proc = lab.popen(
        lab.app, argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env
    )
    tunio = TunioProcess(proc, argv, lab.runtime_dir)
    run_tunio.append(tunio)
    tunio.wait_ready()
    echo_through_redirect(lab)


@pytest.mark.parametrize("name", ["direct", "socks5"])
def test_a_destination_reset_reaches_an_app_that_keeps_writing(
    lab: Lab, proxies: dict[str, Proxy], run_tunio: list[TunioProcess], name: str
) -> None:
    """The destination resets after reading a line. Through a proxy the worker may see only an
    EOF first (danted ends the tunnel), but it keeps watching the socket, so the app's later
    writes end in a reset, as they would talking to the proxy directly."""
    start(lab, run_tunio, *([] if name == "direct" else [url(proxies, name)]))
    with lab.connect(PEER_PORTS["rst"], timeout=10.0) as sock:
        sock.sendall(b"hello\n")
        assert _keep_writing(sock, 10.0) == "reset"


def _keep_writing(sock: socket.socket, seconds: float) -> str:
    """Writes until the socket fails: "reset" (ECONNRESET or EPIPE), "data" if the destination
    answered, "alive" if neither happened within `seconds`."""
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            if select.select([sock], [], [], 0.1)[0] and sock.recv(4096):  # an EOF, or data
                return "data"
            sock.sendall(b"x" * 1000)  # the app keeps writing
    except (ConnectionResetError, BrokenPipeError):
        return "reset"
    return "alive"


@pytest.mark.parametrize("name", ["direct", "socks5", "http"])
def test_a_reset_after_the_destinations_eof_reaches_the_app(
    lab: Lab, proxies: dict[str, Proxy], run_tunio: list[TunioProcess], name: str
) -> None:
    """The destination resets after reading a line. danted passes the reset on at once;
    tinyproxy ends the tunnel with an EOF, and answers the next bytes that come with a reset,
    which reaches the worker when it has nothing more to write there. The worker still watches
    that socket, so the app, which only waits after its one write, hears of the reset as a
    direct client of the proxy would: its socket reports the error (EPIPE, since an EOF came
    first), and its next send fails."""
    start(lab, run_tunio, *([] if name == "direct" else [url(proxies, name)]))
    with lab.connect(PEER_PORTS["rst"], timeout=10.0) as sock:
        sock.sendall(b"hello\n")
        try:
            eof = sock.recv(4096) == b""
        except ConnectionResetError:
            eof = False  # the reset came first (direct, danted)
        if eof:
            with select.epoll() as ep:
                ep.register(sock.fileno(), select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET)
                ep.poll(0)  # what is there already (the EOF): the next edge is news
                sock.sendall(b"one more line\n")  # taken by our kernel: the reset comes later
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if not code:
                    assert ep.poll(5.0), "no error after the EOF: the reset was lost"
                    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            assert code in (errno.EPIPE, errno.ECONNRESET), errno.errorcode.get(code, code)
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            sock.sendall(b"and another\n")
