"""The stack's DNS end to end (--dns fake-ip and --dns hijack), with dnsmasq as the upstream in
the srv namespace (logging every query it is asked) and danted as a SOCKS5 proxy that logs the
destination each client names.

The app namespace resolves through the tunnel only: its resolv.conf names the DNS address of
the TUN (198.18.255.2), and every query the workers make themselves (forwarded ones, the direct
dialer's lookups) leaves from the app namespace's veth address, so dnsmasq's log tells which
queries came from where."""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import socket
import statistics
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from lab.netlab import (
    APP_ADDRESS,
    APP_ADDRESS6,
    EGRESS_MARK,
    PEER_PORTS,
    SERVER_ADDRESS,
    SERVER_ADDRESS6,
    SRV_ADDRESS,
    TUN_NAME,
    Lab,
    LineReader,
    TunioProcess,
    dnsmasq_argv,
    pattern,
    process_title,
    recv_exact,
)
from lab.proxies import PROXY_ADDRESS, Proxy, add_proxy_address, start_dante
from lab.tuntap import ETH_P_IP, next_tcp, tun_tap

from tests.vm.conftest import start_servers
from tunio.dialers.resolve import TYPE_A, TYPE_AAAA, parse_answer, query
from tunio.testing import packets

pytestmark = [pytest.mark.vm, pytest.mark.needs("dnsmasq", "dig", "danted")]

POOL = ipaddress.ip_network("198.18.64.0/18")  # away from every address the lab uses
POOL6 = ipaddress.ip_network("fd00:7475::/96")
DNS = "198.18.255.2"  # the second address of the lab's TUN prefix: --dns-address's default
DNS6 = "fd00:18:255::2"
FAKE_IP = ["--dns", f"fake-ip:{POOL},{POOL6}", "--dns-upstream", SERVER_ADDRESS]
RECORDS = [
    # x.tunio.test and socks.tunio.test: the echo server, both families
    *(f"--address=/{n}.tunio.test/{a}" for n in ("x", "socks", "y")
      for a in (SERVER_ADDRESS, SERVER_ADDRESS6)),
    # he.tunio.test: an AAAA that never answers (blackholed in srv), an A that does
    "--address=/he.tunio.test/198.18.0.10", "--address=/he.tunio.test/fd00:18:3::1",
    # rebind.tunio.test: this host's own loopback, as a DNS-rebinding name answers
    "--address=/rebind.tunio.test/127.0.0.1", "--address=/rebind.tunio.test/::1",
    "--mx-host=tunio.test,mail.tunio.test,10",
    "--txt-record=txt.tunio.test,tunio txt",  # (no shell: no quotes)
]  # fmt: skip
MESSAGE = pattern(4096)
# An app: resolves argv[1] by getaddrinfo (the namespace's resolv.conf), connects to the echo
# port over the first address, checks the echo; prints the address it used and "ok"
CLIENT = f"""
import socket, sys, time
data = {MESSAGE!r}
family = socket.AF_INET6 if sys.argv[2:] == ["6"] else socket.AF_INET
started = time.monotonic()
info = socket.getaddrinfo(sys.argv[1], {PEER_PORTS["echo"]}, family, socket.SOCK_STREAM)
with socket.create_connection(info[0][4][:2], timeout=10) as sock:
    took = time.monotonic() - started
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        got += sock.recv(65536)
print(info[0][4][0], "%.3f" % took, "ok" if got == data else "wrong")
"""


@pytest.fixture(scope="module")
def dns_lab() -> Iterator[Lab]:
    with Lab() as lab:
        yield lab
    assert not lab.strays, lab.strays


@pytest.fixture(scope="module")
def upstream(dns_lab: Lab) -> LineReader:
    """dnsmasq on SERVER_ADDRESS(6):53, logging each query with the address it came from."""
    start_servers(dns_lab)
    return dns_lab.serve([*dnsmasq_argv(*RECORDS), "--log-queries"], ready=r"started")


@pytest.fixture(scope="module")
def socks(dns_lab: Lab, upstream: LineReader, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[Proxy]:  # fmt: skip
    """danted, resolving names with dnsmasq (its namespace's resolv.conf), logging each
    CONNECT (with the address it connected to)."""
    del upstream
    add_proxy_address(dns_lab)
    with dns_lab.etc_file(dns_lab.srv, "resolv.conf", f"nameserver {SERVER_ADDRESS}\n"):
        yield start_dante(dns_lab, tmp_path_factory.mktemp("dante"), auth=False,
                          log="connect error")  # fmt: skip


@pytest.fixture(scope="module")
def app_resolv(dns_lab: Lab) -> Iterator[Path]:
    with dns_lab.etc_file(dns_lab.app, "resolv.conf", f"nameserver {DNS}\n") as path:
        yield path


def _app(lab: Lab, name: str, family: int = 4) -> tuple[str, float]:
    out = lab.run(lab.app, [sys.executable, "-c", CLIENT, name, str(family)], timeout=30)
    address, took, verdict = out.split()
    assert verdict == "ok", out
    return address, float(took)


def _dig(lab: Lab, *args: str) -> str:
    return lab.run(lab.app, ["dig", "+tries=1", "+time=3", *args], timeout=30)


class Client:
    """DNS queries from the app namespace over one UDP socket (or, with `mark`, over the veth
    straight to dnsmasq, as no app could)."""

    def __init__(self, lab: Lab, server: str, mark: bool = False) -> None:
        family = socket.AF_INET6 if ":" in server else socket.AF_INET
        self.sock = lab.open_socket(family=family, type=socket.SOCK_DGRAM)
        if mark:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, EGRESS_MARK)
        self.sock.settimeout(5.0)
        self.sock.connect((server, 53))
        self.qid = 0

    def ask(self, name: str, qtype: int = TYPE_A) -> tuple[int, list[str], int]:
        self.qid = (self.qid + 1) & 0xFFFF
        self.sock.send(query(name, qtype, self.qid))
        while True:
            msg = self.sock.recv(4096)
            if msg[:2] == struct.pack(">H", self.qid):
                rcode, found, ttl, _ = parse_answer(msg, self.qid, qtype)
                return rcode, found, ttl

    def close(self) -> None:
        self.sock.close()


def _stats(tunio: TunioProcess) -> dict[str, int]:
    """The stack's counters from its last statistics line (written when it stops)."""
    lines = re.findall(r"stack statistics: (\{.*\})", tunio.log.text)
    assert lines, tunio.log.text
    return {k: int(v) for k, v in re.findall(r"'(\w+)': (\d+)", lines[-1])}


def _stack_pid(tunio: TunioProcess) -> int:
    [pid] = [p for p in tunio.children() if "tunio-stack" in process_title(p)]
    return pid


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


_CONNECT = rf"tcp/connect \[: .* {re.escape(SERVER_ADDRESS)}\.{PEER_PORTS['echo']}\b"


def _connects(proxy: Proxy) -> int:
    """CONNECTs to the echo server that danted logged."""
    rx = re.compile(_CONNECT)
    return sum(bool(rx.search(line)) for line in proxy.log.lines)


def _asked(upstream: LineReader, name: str, start: int = 0) -> list[str]:
    """The sources of the A/AAAA queries for `name` that dnsmasq logged (from line `start`)."""
    rx = re.compile(rf"query\[(?:A|AAAA)\] {re.escape(name)} from (\S+)")
    return [m.group(1) for line in upstream.lines[start:] if (m := rx.search(line))]


# ---------------------------------------------------------------- fake-IP


def test_fake_ip_answers_from_the_pool_and_apps_connect_by_name(
    dns_lab: Lab, upstream: LineReader, app_resolv: Path
) -> None:
    del app_resolv
    tunio = dns_lab.start_tunio([*FAKE_IP, "--dns-ttl", "5"])
    try:
        client = Client(dns_lab, DNS)
        rcode, [a], ttl = client.ask("x.tunio.test")
        assert rcode == 0
        assert ipaddress.ip_address(a) in POOL
        assert ttl == 5
        assert client.ask("X.Tunio.Test")[1] == [a]  # one name, one address, any case
        rcode, [a6], _ = client.ask("x.tunio.test", TYPE_AAAA)
        assert ipaddress.ip_address(a6) in POOL6
        # the same index in both pools
        assert int(ipaddress.ip_address(a6)) - int(POOL6[0]) == (
            int(ipaddress.ip_address(a)) - int(POOL[0]))
        assert client.ask("y.tunio.test")[1] != [a]
        # over IPv6 too
        client6 = Client(dns_lab, DNS6)
        assert client6.ask("x.tunio.test")[1] == [a]
        client6.close()
        # dig, and getaddrinfo through the namespace's resolv.conf, then a connection by name
        assert _dig(dns_lab, f"@{DNS}", "x.tunio.test", "A", "+short").split() == [a]
        for family, want in ((4, a), (6, a6)):
            used, _ = _app(dns_lab, "x.tunio.test", family)
            assert used == want
        # no query for the name reached dnsmasq from the app namespace: A/AAAA are answered
        # here, and the direct dialer's own lookups come from the workers (the veth address)
        # only when they dial: exactly what dnsmasq saw
        sources = set(_asked(upstream, "x.tunio.test"))
        assert sources <= {APP_ADDRESS, APP_ADDRESS6}, sources
        # latency: the fake DNS against dnsmasq straight over the veth, 300 queries each
        direct = Client(dns_lab, SERVER_ADDRESS, mark=True)
        figures = {}
        for label, c in (("fake-ip", client), ("dnsmasq", direct)):
            times = []
            for _ in range(300):
                t = time.perf_counter()
                assert c.ask("x.tunio.test")[0] == 0
                times.append(time.perf_counter() - t)
            figures[label] = statistics.median(times) * 1e6
        print(f"\nA query, median of 300: fake-ip DNS {figures['fake-ip']:.0f} us, dnsmasq "
              f"directly over the veth {figures['dnsmasq']:.0f} us")
        direct.close()
        client.close()
    finally:
        assert tunio.stop() == 0, tunio.log.text
    stats = _stats(tunio)
    assert stats["dns_answered"] >= 306
    assert stats["dns_map_entries"] == 2


def test_other_types_are_forwarded_and_malformed_queries_change_nothing(
    dns_lab: Lab, upstream: LineReader, app_resolv: Path
) -> None:
    del app_resolv, upstream
    tunio = dns_lab.start_tunio(FAKE_IP)
    try:
        client = Client(dns_lab, DNS)
        _, [a], _ = client.ask("x.tunio.test")
        mx = _dig(dns_lab, f"@{DNS}", "tunio.test", "MX", "+short")
        assert mx.split() == ["10", "mail.tunio.test."]
        txt = _dig(dns_lab, f"@{DNS}", "txt.tunio.test", "TXT", "+short")
        assert txt.strip() == '"tunio txt"'
        # over TCP to the DNS address, an MX still goes to the upstream (answered by it)
        tcp = _dig(dns_lab, "+tcp", f"@{DNS}", "tunio.test", "MX", "+short")
        assert tcp.split() == ["10", "mail.tunio.test."]
        # malformed: two questions (FORMERR, same id), a pointer in the question (FORMERR), a
        # 3-byte datagram and a response (dropped)
        good = query("x.tunio.test", TYPE_A, 0x4242)
        sock = client.sock
        for bad in (good[:4] + b"\0\2" + good[6:], good[:12] + b"\xc0\x0c" + good[-4:]):
            sock.send(bad)
            reply = sock.recv(512)
            assert reply[:2] == b"\x42\x42"
            assert reply[3] & 0xF == 1  # FORMERR
        sock.send(b"\x01\x02\x03")
        sock.send(good[:2] + b"\x81\x80" + good[4:])
        assert client.ask("x.tunio.test")[1] == [a]  # the next answer is the first reply
    finally:
        assert tunio.stop() == 0, tunio.log.text
    stats = _stats(tunio)
    assert stats["dns_malformed"] == 4
    assert stats["dns_forwarded"] >= 3  # MX and TXT over UDP, MX over TCP
    assert stats["dns_map_entries"] == 1  # nothing malformed took an address


def _framed(msg: bytes) -> bytes:
    return struct.pack(">H", len(msg)) + msg


def _message(sock: socket.socket) -> bytes:
    """The next whole DNS message of a TCP stream (RFC 1035 4.2.2)."""
    (length,) = struct.unpack(">H", recv_exact(sock, 2))
    return recv_exact(sock, length)


def _closed(sock: socket.socket) -> bool:
    """Whether the peer closes (EOF) or resets the connection, rather than send anything."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_tcp_to_the_dns_address_is_answered_as_udp_pipelined_and_by_id(
    dns_lab: Lab, upstream: LineReader, app_resolv: Path
) -> None:
    """Over TCP to the DNS address, A and AAAA get the fake addresses UDP gives (and a flow to
    one carries the name), queries pipelined on one connection are each answered whole and
    matched by id, other types still reach dnsmasq, and a stream no DNS client sends is closed
    and counted. dnsmasq never sees an A or AAAA query asked over TCP."""
    del app_resolv
    seen = len(upstream.lines)
    tunio = dns_lab.start_tunio([*FAKE_IP, "--dns-ttl", "7"])
    try:
        client = Client(dns_lab, DNS)
        _, [a], ttl = client.ask("tcp.x.tunio.test")
        assert ttl == 7
        out = _dig(dns_lab, "+tcp", f"@{DNS}", "tcp.x.tunio.test", "A", "+noall", "+answer")
        [record] = out.splitlines()
        assert record.split()[1:] == ["7", "IN", "A", a]  # the same address, the same TTL
        _, [a6], _ = client.ask("tcp.x.tunio.test", TYPE_AAAA)
        out = _dig(dns_lab, "+tcp", f"@{DNS6}", "tcp.x.tunio.test", "AAAA", "+short")
        assert out.split() == [a6]
        # a connection to the fake address reaches the dialer with the name (a fake address no
        # name has is unreachable): the direct dialer resolves it and connects
        with dns_lab.connect(PEER_PORTS["echo"], a, timeout=10.0) as conn:
            conn.sendall(MESSAGE)
            assert recv_exact(conn, len(MESSAGE)) == MESSAGE
        # A, MX and AAAA back to back on one connection, the A split across two sends
        with dns_lab.connect(53, DNS, timeout=10.0) as sock:
            first = _framed(query("pipe.x.tunio.test", TYPE_A, 1))
            sock.sendall(first[:7])
            sock.sendall(first[7:] + _framed(query("tunio.test", 15, 2))
                         + _framed(query("pipe.x.tunio.test", TYPE_AAAA, 3)))  # fmt: skip
            answers = {}
            for _ in range(3):
                msg = _message(sock)
                answers[struct.unpack_from(">H", msg)[0]] = msg
            assert sorted(answers) == [1, 2, 3]
            rcode, [pa], _, _ = parse_answer(answers[1], 1, TYPE_A)
            assert rcode == 0
            assert ipaddress.ip_address(pa) in POOL
            rcode, [pa6], _, _ = parse_answer(answers[3], 3, TYPE_AAAA)
            assert rcode == 0
            assert ipaddress.ip_address(pa6) in POOL6
            assert struct.unpack_from(">H", answers[2], 6)[0] == 1  # one MX record, dnsmasq's
            assert b"\x04mail" in answers[2]
            # the connection stays up: one more, then an orderly end
            sock.sendall(_framed(query("tcp.x.tunio.test", TYPE_A, 4)))
            assert parse_answer(_message(sock), 4, TYPE_A)[1] == [a]
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(1) == b""
        assert client.ask("pipe.x.tunio.test")[1] == [pa]  # UDP agrees
        client.close()
        # a length of 0, and garbage (five bytes that are no query): closed, counted
        for bad in (b"\0\0", b"\0\5hello"):
            with dns_lab.connect(53, DNS, timeout=10.0) as sock:
                sock.sendall(bad)
                assert _closed(sock)
    finally:
        assert tunio.stop() == 0, tunio.log.text
    stats = _stats(tunio)
    assert stats["dns_malformed"] == 2
    assert stats["dns_forwarded"] == 1  # the MX
    # dnsmasq was asked the MX (by the worker, over the veth) and no A/AAAA for the names asked
    # over TCP; for tcp.x.tunio.test only the direct dialer's own lookups, from the veth
    assert not _asked(upstream, "pipe.x.tunio.test", seen), upstream.text
    assert set(_asked(upstream, "tcp.x.tunio.test", seen)) <= {APP_ADDRESS, APP_ADDRESS6}
    assert any(re.search(rf"query\[MX\] tunio\.test from {re.escape(APP_ADDRESS)}", line)
               for line in upstream.lines[seen:]), upstream.text  # fmt: skip


CLOSED_PORT = 5399  # nothing listens there in srv: a TCP connect to it is refused


def test_tcp_queries_whose_upstream_refuses_get_servfail_on_a_connection_that_stays(
    dns_lab: Lab, upstream: LineReader
) -> None:
    """The upstream's TCP port refuses the worker's dial: each query that needed it gets a
    SERVFAIL of its id (the question echoed), the A between them its answer, and the
    connection stays up for more, then ends in order."""
    del upstream
    tunio = dns_lab.start_tunio(["--dns", f"fake-ip:{POOL},{POOL6}",
                                 "--dns-upstream", f"{SERVER_ADDRESS}:{CLOSED_PORT}"])  # fmt: skip
    try:
        mx, txt = query("tunio.test", 15, 2), query("txt.tunio.test", 16, 3)
        with dns_lab.connect(53, DNS, timeout=10.0) as sock:
            sock.sendall(_framed(mx) + _framed(query("x.tunio.test", TYPE_A, 1)) + _framed(txt))
            answers = {}
            for _ in range(3):
                msg = _message(sock)
                answers[struct.unpack_from(">H", msg)[0]] = msg
            assert sorted(answers) == [1, 2, 3]
            assert parse_answer(answers[1], 1, TYPE_A)[0] == 0
            for qid, q in ((2, mx), (3, txt)):
                flags, qd, an = struct.unpack_from(">HHH", answers[qid], 2)
                assert (flags & 0x8000, flags & 0xF, qd, an) == (0x8000, 2, 1, 0)
                assert answers[qid][12:] == q[12:]
            sock.sendall(_framed(query("x.tunio.test", TYPE_A, 4)))
            assert parse_answer(_message(sock), 4, TYPE_A)[0] == 0
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(1) == b""
    finally:
        assert tunio.stop() == 0, tunio.log.text
    stats = _stats(tunio)
    assert stats["dial_failed"] == 1
    assert stats["dns_answered"] == 2


def test_socks5_gets_the_name_and_no_lookup_leaves_the_app_namespace(
    dns_lab: Lab, upstream: LineReader, socks: Proxy, app_resolv: Path
) -> None:
    del app_resolv
    url = f"socks5://{PROXY_ADDRESS}:{socks.port}"
    tunio = dns_lab.start_tunio([*FAKE_IP, "--dialer", url])
    try:
        before = _connects(socks)
        used, _ = _app(dns_lab, "socks.tunio.test")
        assert ipaddress.ip_address(used) in POOL
        socks.log.wait_for(_CONNECT, 10.0)
        assert _connects(socks) == before + 1
    finally:
        assert tunio.stop() == 0, tunio.log.text
    # danted was asked for the name: it looked it up itself (from the srv namespace), and
    # nothing in the app namespace, the workers included, asked dnsmasq for it
    sources = _asked(upstream, "socks.tunio.test")
    assert sources, upstream.text
    assert not set(sources) & {APP_ADDRESS, APP_ADDRESS6}, sources
    assert set(sources) <= {PROXY_ADDRESS, SERVER_ADDRESS, SRV_ADDRESS}, sources


def test_direct_dials_a_name_by_happy_eyeballs(
    dns_lab: Lab, upstream: LineReader, app_resolv: Path
) -> None:
    """he.tunio.test: its AAAA is blackholed (a connect there never answers), its A is the echo
    server. The worker tries IPv6 first and IPv4 250 ms later: connected well before the 5 s
    connect timeout."""
    del app_resolv
    tunio = dns_lab.start_tunio([*FAKE_IP, "--connect-timeout", "5"])
    try:
        _app(dns_lab, "x.tunio.test")  # the workers' first lookup, off the clock
        used, took = _app(dns_lab, "he.tunio.test")
        assert ipaddress.ip_address(used) in POOL
        print(f"\nhappy eyeballs: connected by name (dead AAAA, live A) in {took * 1000:.0f} ms")
        assert took < 2.0
    finally:
        assert tunio.stop() == 0, tunio.log.text
    # the workers resolved it themselves, from the veth, never through the tunnel
    assert set(_asked(upstream, "he.tunio.test")) == {APP_ADDRESS}


GUEST = "10.77.0.5"  # a container's address behind the gateway: only ever in a packet on tun0
REBIND_PORT = 47012


def test_a_name_answering_loopback_reaches_it_only_for_this_hosts_apps(
    dns_lab: Lab, upstream: LineReader, app_resolv: Path
) -> None:
    """rebind.tunio.test answers 127.0.0.1 and ::1. For an app on the gateway that is its own
    loopback: the flow reaches a listener there. For a guest behind the gateway (its SYN
    written onto tun0 from an address of another host) it would be the gateway's loopback
    instead of the guest's own: refused with a reset, and the listener never sees it."""
    del app_resolv, upstream
    tunio = dns_lab.start_tunio(FAKE_IP)
    try:
        with (
            dns_lab.open_socket() as listener,
            tun_tap(dns_lab.app, TUN_NAME) as tap,
            dns_lab.open_socket(family=socket.AF_PACKET, type=socket.SOCK_DGRAM) as inject,
        ):  # fmt: skip
            listener.bind(("127.0.0.1", REBIND_PORT))
            listener.listen(8)
            listener.settimeout(10.0)
            [fake] = Client(dns_lab, DNS).ask("rebind.tunio.test")[1]
            # this host's app: ::1 refuses (nothing listens there), 127.0.0.1 is its listener
            with dns_lab.connect(REBIND_PORT, fake) as app:
                conn, _ = listener.accept()
                with conn:
                    app.sendall(MESSAGE)
                    assert recv_exact(conn, len(MESSAGE)) == MESSAGE
            # the guest
            syn = packets.tcp(GUEST, 41234, fake, REBIND_PORT, flags=packets.SYN, seq=7000,
                              options=packets.SYN_OPTIONS)
            inject.sendto(syn, (TUN_NAME, ETH_P_IP))
            answer = next_tcp(tap, fake, GUEST, 41234)  # the stack's answer to the guest
            assert answer.flags & packets.RST, answer
            assert answer.ack == 7001, answer
            listener.setblocking(False)
            with pytest.raises(BlockingIOError):
                listener.accept()
    finally:
        assert tunio.stop() == 0, tunio.log.text
    assert "rebind.tunio.test: the name answers" in tunio.log.text, tunio.log.text
    assert f"; the flow is from {GUEST}, another host: refused" in tunio.log.text


def test_a_rule_by_domain_lands_on_its_dialer(
    dns_lab: Lab, upstream: LineReader, socks: Proxy, app_resolv: Path, tmp_path: Path
) -> None:
    del app_resolv
    conf = tmp_path / "tunio.toml"
    conf.write_text(f"""
[dialers]
socks = "socks5://{PROXY_ADDRESS}:{socks.port}"

[[rule]]
domain = ["y.tunio.test"]
action = "socks"
""")
    tunio = dns_lab.start_tunio([*FAKE_IP, "--config", str(conf)])
    try:
        before = _connects(socks)
        _app(dns_lab, "y.tunio.test")  # by the rule: through danted, by name
        socks.log.wait_for(_CONNECT, 10.0, start=len(socks.log.lines) - 1)
        assert _connects(socks) == before + 1
        _app(dns_lab, "x.tunio.test")  # no rule: direct
        assert _connects(socks) == before + 1
    finally:
        assert tunio.stop() == 0, tunio.log.text
    # danted looked the name up; the workers did for x.tunio.test only (direct)
    assert not set(_asked(upstream, "y.tunio.test")) & {APP_ADDRESS, APP_ADDRESS6}
    assert APP_ADDRESS in _asked(upstream, "x.tunio.test")


def test_a_reload_keeps_names_flowing_and_refuses_a_dns_change(
    dns_lab: Lab, upstream: LineReader, app_resolv: Path, tmp_path: Path
) -> None:
    """SIGHUP with --dns fake-ip: a flow by name opened before it keeps moving through the old
    generation, the new generation's workers take NAME and resolve with --dns-upstream as the
    first did, and a change of a --dns setting is refused whole."""
    del app_resolv
    conf = tmp_path / "tunio.toml"
    conf.write_text("connect_timeout = 10.0\n")
    seen = len(upstream.lines)  # other tests of the module ask dnsmasq for y.tunio.test too
    tunio = dns_lab.start_tunio([*FAKE_IP, "--config", str(conf)])
    try:
        client = Client(dns_lab, DNS)
        _, [a], _ = client.ask("x.tunio.test")
        with dns_lab.connect(PEER_PORTS["echo"], a, timeout=30.0) as old:
            old.sendall(MESSAGE)
            assert recv_exact(old, len(MESSAGE)) == MESSAGE
            start = len(tunio.log.lines)
            conf.write_text("connect_timeout = 9.0\n")
            tunio.proc.send_signal(signal.SIGHUP)
            tunio.log.wait_for(r"reload: connect_timeout changed", 30.0, start)
            tunio.log.wait_for(r"generation 1 drains", 30.0, start)
            for _ in range(3):  # the old flow, by name, through the old generation
                old.sendall(MESSAGE)
                assert recv_exact(old, len(MESSAGE)) == MESSAGE
            for family in (4, 6):  # new flows by name: the new generation's
                _app(dns_lab, "y.tunio.test", family)
        tunio.log.wait_for(r"\(generation 1\) has ended: its flows are done", 30.0, start)
        lost = [line for line in tunio.log.lines[start:] if " lost " in line]
        assert not lost, lost
        conf.write_text("connect_timeout = 9.0\ndns_ttl = 60\n")
        start = len(tunio.log.lines)
        tunio.proc.send_signal(signal.SIGHUP)
        refused = tunio.log.wait_for(r"reload refused:", 30.0, start)
        assert "--dns-ttl (10 -> 60) cannot change while tunio-run runs" in refused
        assert client.ask("x.tunio.test")[1:] == ([a], 10)  # the TTL in force stays
        client.close()
    finally:
        assert tunio.stop() == 0, tunio.log.text
    # the new generation resolved y.tunio.test itself, from the veth
    asked = _asked(upstream, "y.tunio.test", seen)
    assert asked
    assert set(asked) <= {APP_ADDRESS, APP_ADDRESS6}


# ---------------------------------------------------------------- hijack


def test_hijack_answers_queries_to_any_address_from_the_upstream(
    dns_lab: Lab, upstream: LineReader
) -> None:
    tunio = dns_lab.start_tunio(["--dns", "hijack", "--dns-upstream", SERVER_ADDRESS])
    try:
        # SRV_ADDRESS has no DNS server: without hijack the query goes unanswered
        for extra in ((), ("+tcp",)):
            out = _dig(dns_lab, *extra, f"@{SRV_ADDRESS}", "x.tunio.test", "A", "+short")
            assert out.split() == [SERVER_ADDRESS]
        out = _dig(dns_lab, f"@{SRV_ADDRESS}", "tunio.test", "MX", "+short")
        assert out.split() == ["10", "mail.tunio.test."]
    finally:
        assert tunio.stop() == 0, tunio.log.text
    assert _stats(tunio)["dns_forwarded"] >= 2
    assert APP_ADDRESS in _asked(upstream, "x.tunio.test")  # from the workers, over the veth


# ---------------------------------------------------------------- the map


def test_recycling_under_100k_names_keeps_live_ones_and_survives_kill_9(
    dns_lab: Lab, upstream: LineReader, app_resolv: Path
) -> None:
    """A /22 (1,022 addresses) for 100,000 names: each answered, addresses recycled, the stack's
    memory bounded; a name whose flow is open keeps its address throughout; and after a kill -9
    of the stack, the new one answers the names it knew with the same addresses."""
    del app_resolv, upstream
    small = ipaddress.ip_network("198.18.64.0/22")
    tunio = dns_lab.start_tunio(
        ["--dns", f"fake-ip:{small}", "--dns-upstream", SERVER_ADDRESS, "--dns-ttl", "0",
         "--dns-hold", "0.01"])  # fmt: skip
    try:
        client = Client(dns_lab, DNS)
        _, [held], _ = client.ask("x.tunio.test")
        conn = dns_lab.connect(PEER_PORTS["echo"], held, timeout=10.0)
        stack = _stack_pid(tunio)
        rss_before = _rss_kib(stack)
        names = 100_000
        window = 32
        sock = client.sock
        seen: set[str] = set()
        started = time.monotonic()
        sent = got = 0
        while got < names:
            while sent < names and sent - got < window:
                sock.send(query(f"n{sent}.r.tunio.test", TYPE_A, sent & 0xFFFF))
                sent += 1
            msg = sock.recv(512)
            rcode, found, _, _ = parse_answer(msg, struct.unpack_from(">H", msg)[0], TYPE_A)
            assert rcode == 0, rcode
            [address] = found
            assert ipaddress.ip_address(address) in small
            assert address != held  # its flow is open: never given to another name
            seen.add(address)
            got += 1
        took = time.monotonic() - started
        rss_after = _rss_kib(stack)
        assert client.ask("x.tunio.test")[1] == [held]
        conn.sendall(MESSAGE)
        assert recv_exact(conn, len(MESSAGE)) == MESSAGE
        conn.close()
        print(f"\n{names} names over {small} ({len(seen)} addresses used) in {took:.1f} s "
              f"({names / took:.0f}/s); stack RSS {rss_before} -> {rss_after} KiB")
        assert len(seen) > 1000
        assert rss_after - rss_before < 8 * 1024
        # kill -9: the next stack adopts the map from the region
        _, [kept], _ = client.ask("kept.tunio.test")
        start = len(tunio.log.lines)
        os.kill(stack, signal.SIGKILL)
        tunio.log.wait_for(r"fake-IP map: took over \d+ names", 15.0, start)
        tunio.log.wait_for(r"stack restarted", 15.0, start)
        assert client.ask("kept.tunio.test")[1] == [kept]
        assert client.ask("x.tunio.test")[1] == [held]
        client.close()
    finally:
        code = tunio.stop()
    assert code == 0, tunio.log.text
    stats = _stats(tunio)  # the second stack's: its map holds at most the pool
    assert 0 < stats["dns_map_entries"] <= 1022
