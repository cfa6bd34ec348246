"""UDP and DNS through tunio, end to end: app namespace -> TUN -> stack -> worker -> server.

Servers in the srv namespace: tools/flood.py's udp-echo on UDP 198.18.0.10:7000 and
[fd00:18::10]:7000, the TCP test peers, and dnsmasq (a real DNS server) on 198.18.0.10:53 and
[fd00:18::10]:53 with a few static records. The UDP servers are bound to the server addresses,
not to a wildcard: a wildcard-bound UDP socket would answer from whatever address the route
picks (the srv veth's), and the app's connected socket would rightly ignore that.

About garbage: the stack takes packets from the kernel's TUN device, whose UDP checksums the
kernel computed (or left for offload), so it does not verify them: a well-formed packet with a
wrong checksum is forwarded like any other. The garbage test therefore sends structurally broken
packets (short headers, lengths that lie) on the live session's own 4-tuple, where they must be
dropped without touching it, and wrong-checksum and odd-address packets only on other 4-tuples,
where they may be forwarded or dropped: either way the live flows must not notice.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import random
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from lab.netlab import (
    APP_ADDRESS,
    DNS_PORT,
    PEER_PORTS,
    SERVER_ADDRESS,
    SERVER_ADDRESS6,
    TUN_ADDRESS,
    TUN_NAME,
    UDP_ECHO_PORT,
    Lab,
    LineReader,
    TunioProcess,
    dnsmasq_argv,
    pattern,
    recv_exact,
)
from lab.netns import netns_socket
from lab.tuntap import ETH_P_IP, ETH_P_IPV6

from tests.vm.conftest import CONNECT_TIMEOUT, FLOOD, Family
from tunio.testing.packets import UDP, ipv4, udp

APP_IP = str(ipaddress.IPv4Interface(TUN_ADDRESS).ip)
MTU_PAYLOAD = 1500 - 20 - 8  # the largest datagram one 1500-byte IPv4 packet carries
REPLY_TIMEOUT = 5.0
IP_RECVERR = getattr(socket, "IP_RECVERR", 11)

# dnsmasq's records (all names under the reserved .test TLD, addresses from documentation ranges)
RECORDS = {
    ("a.tunio.test", "A"): ["198.51.100.7"],
    ("h.tunio.test", "A"): ["198.51.100.8"],
    ("h.tunio.test", "AAAA"): ["2001:db8::8"],
    ("tunio.test", "MX"): ["10 mail.tunio.test."],
    ("t.tunio.test", "TXT"): ['"hello tunio"'],
    ("_sip._udp.tunio.test", "SRV"): ["1 2 5060 sip.tunio.test."],
}

pytestmark = pytest.mark.needs("dnsmasq", "dig", "ss")


# ---- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def udp_echo(lab: Lab) -> LineReader:
    """The UDP echo server on SERVER_ADDRESS and on SERVER_ADDRESS6 (the IPv4 one's log)."""
    lab.serve([sys.executable, str(FLOOD), "--serve", f"[{SERVER_ADDRESS6}]:{UDP_ECHO_PORT}",
               "--mode", "udp-echo"])
    return lab.serve([sys.executable, str(FLOOD), "--serve", f"{SERVER_ADDRESS}:{UDP_ECHO_PORT}",
                      "--mode", "udp-echo"])


DNS_RECORDS = (
    "--address=/a.tunio.test/198.51.100.7",
    "--host-record=h.tunio.test,198.51.100.8,2001:db8::8",
    "--txt-record=t.tunio.test,hello tunio",
    "--mx-host=tunio.test,mail.tunio.test,10",
    "--srv-host=_sip._udp.tunio.test,sip.tunio.test,5060,1,2",
)


@pytest.fixture(scope="module")
def dns(lab: Lab) -> LineReader:
    log = lab.serve(dnsmasq_argv(*DNS_RECORDS), ready=r"started")
    lab.wait_for_dns("a.tunio.test")
    return log


def flood(lab: Lab, *args: str, timeout: float = 120.0) -> tuple[int, dict[str, Any]]:
    """tools/flood.py as a client in the app namespace; (exit code, its JSON summary)."""
    proc = lab.popen(lab.app, [sys.executable, str(FLOOD), "--json", *args],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=timeout)
    assert out.strip(), f"flood printed nothing; stderr: {err}"
    return proc.returncode, json.loads(out)


def udp_flood(lab: Lab, sessions: int, datagrams: int, size: int, rate: float,
              linger: float = 2.0, server: str = SERVER_ADDRESS) -> tuple[int, dict[str, Any]]:
    host = f"[{server}]" if ":" in server else server
    return flood(lab, "--connect", f"{host}:{UDP_ECHO_PORT}", "--mode", "udp-echo",
                 "--connections", str(sessions), "--datagrams", str(datagrams),
                 "--size", str(size), "--rate", str(rate), "--linger", str(linger),
                 "--timeout", "90")


@pytest.fixture
def app_udp(lab: Lab) -> Iterator[socket.socket]:
    """A UDP socket in the app namespace connected to the udp-echo server, as an app's."""
    sock = lab.open_socket(type=socket.SOCK_DGRAM)
    sock.settimeout(REPLY_TIMEOUT)
    sock.connect((SERVER_ADDRESS, UDP_ECHO_PORT))
    yield sock
    sock.close()


def echo_exact(sock: socket.socket, payloads: list[bytes]) -> None:
    """Send each payload and get exactly it back, one at a time."""
    for data in payloads:
        sock.send(data)
        assert sock.recv(65535) == data


# ---- datagrams ---------------------------------------------------------------------------


def test_10000_datagrams_echo_without_loss_or_reordering(
    lab: Lab, tunio: TunioProcess, udp_echo: LineReader, family: Family
) -> None:
    del tunio, udp_echo
    rc, summary = udp_flood(lab, sessions=4, datagrams=2500, size=512, rate=2000,
                            server=family.server)
    assert summary["datagrams_sent"] == 10000
    assert summary["lost"] == 0, summary
    assert summary["reordered"] == 0, summary
    assert summary["duplicated"] == 0, summary
    assert summary["errors"] == {}, summary
    assert summary["datagrams_received"] == 10000
    assert rc == 0
    print(f"udp echo ({family.name}) 10,000 x 512 B at 2,000/s: "
          f"latency {summary['latency_us']}")


def test_a_burst_reports_its_loss(lab: Lab, tunio: TunioProcess, udp_echo: LineReader) -> None:
    del tunio, udp_echo
    _, summary = udp_flood(lab, sessions=4, datagrams=5000, size=1400, rate=0, linger=1.0)
    # loss under a burst is allowed (credit drops, full buffers); it is measured, not asserted
    print(f"burst: {summary['datagrams_sent']} sent, {summary['datagrams_received']} received, "
          f"{summary['lost']} lost ({summary['loss_ratio']:.2%}), {summary['reordered']} "
          f"reordered, {summary['datagrams_per_s']:.0f} datagrams/s")
    assert summary["datagrams_sent"] == 20000
    assert summary["duplicated"] == 0
    assert "verify" not in summary["errors"]
    assert summary["datagrams_received"] + summary["lost"] == 20000
    assert summary["datagrams_received"] > 0


@pytest.mark.parametrize("size", [1400, MTU_PAYLOAD])
def test_large_datagrams_are_byte_exact(
    lab: Lab, tunio: TunioProcess, udp_echo: LineReader, app_udp: socket.socket, size: int
) -> None:
    del tunio, udp_echo
    echo_exact(app_udp, [pattern(size), bytes(reversed(pattern(size)))])
    rc, summary = udp_flood(lab, sessions=2, datagrams=250, size=size, rate=1000)
    assert rc == 0, summary
    assert summary["bytes_received"] == 500 * size


@pytest.mark.parametrize("size", [MTU_PAYLOAD + 1, 4000, 30000, 65507 - 40])
def test_datagrams_larger_than_the_mtu_are_reassembled(
    lab: Lab, tunio: TunioProcess, udp_echo: LineReader, family: Family, size: int
) -> None:
    """The app's kernel sends them as fragments; the stack reassembles them, the worker sends
    each whole, and the echo comes back whole (largest: what fits an IPv6 packet too)."""
    del tunio, udp_echo
    with lab.open_socket(family=family.af, type=socket.SOCK_DGRAM) as sock:
        sock.settimeout(REPLY_TIMEOUT)
        sock.connect((family.server, UDP_ECHO_PORT))
        echo_exact(sock, [pattern(size), bytes(reversed(pattern(size)))])


def test_small_and_empty_datagrams(
    tunio: TunioProcess, udp_echo: LineReader, app_udp: socket.socket
) -> None:
    del tunio, udp_echo
    echo_exact(app_udp, [b"x", b"", b"\0" * 7, b"y" * 8])


def test_closed_port_gives_econnrefused_on_a_connected_socket(
    lab: Lab, tunio: TunioProcess, family: Family
) -> None:
    del tunio
    with lab.open_socket(family=family.af, type=socket.SOCK_DGRAM) as sock:
        sock.settimeout(REPLY_TIMEOUT)
        sock.connect((family.server, 7999))  # nothing listens there
        sock.send(b"anyone?")
        with pytest.raises(ConnectionRefusedError):
            sock.recv(100)


def test_unreachable_destination_gives_an_icmp_error(lab: Lab, tunio: TunioProcess) -> None:
    """198.18.9.1 is unreachable for the workers: the app learns it as a direct socket would.

    Linux reports ICMP host unreachable to a UDP socket only with IP_RECVERR (it is not a
    "hard" error like port unreachable), so the app asks for it.
    """
    del tunio
    with lab.open_socket(type=socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
        sock.settimeout(REPLY_TIMEOUT)
        sock.connect(("198.18.9.1", 9))
        sock.send(b"hello?")
        with pytest.raises(OSError, match="No route to host") as info:
            sock.recv(100)
    assert info.value.errno == errno.EHOSTUNREACH, info.value


# ---- garbage -----------------------------------------------------------------------------


def udp_raw(sport: int, dport: int, payload: bytes, *, length: int | None = None,
            csum: int = 0) -> bytes:
    """A UDP header + payload whose length and checksum fields are whatever we say."""
    ulen = 8 + len(payload) if length is None else length
    return struct.pack("!HHHH", sport, dport, ulen & 0xFFFF, csum) + payload


def ipv6_udp(segment: bytes, *, payload_length: int | None = None) -> bytes:
    plen = len(segment) if payload_length is None else payload_length
    src = ipaddress.IPv6Address("fd00::1").packed
    dst = ipaddress.IPv6Address("fd00::10").packed
    return struct.pack("!IHBB", 6 << 28, plen & 0xFFFF, UDP, 64) + src + dst + segment


def garbage(live_port: int, rng: random.Random) -> list[tuple[int, bytes]]:
    """(ethertype, packet) pairs: broken on the live 4-tuple, odd but valid elsewhere."""
    s, d, port = APP_IP, SERVER_ADDRESS, UDP_ECHO_PORT
    live = [
        ipv4(s, d, UDP, b"\0" * 4),  # shorter than a UDP header
        ipv4(s, d, UDP, struct.pack("!HH", live_port, port)),  # half a header
        ipv4(s, d, UDP, udp_raw(live_port, port, b"x" * 20, length=4)),  # length below 8
        ipv4(s, d, UDP, udp_raw(live_port, port, b"x" * 20, length=900)),  # claims more
        ipv4(s, d, UDP, udp_raw(live_port, port, b"", length=0xFFFF)),
    ]
    elsewhere = [
        udp(s, 41000, d, port, b"good packet, other session")[:-1] + b"!",  # bad checksum
        ipv4(s, d, UDP, udp_raw(41001, port, b"zero checksum")),  # no checksum: valid in IPv4
        udp(s, 41002, d, 0, b"to port 0"),
        udp(s, 0, d, 9, b"from port 0"),
        udp(s, 41003, "224.0.0.1", 9, b"multicast"),
        udp(s, 41004, "255.255.255.255", 9, b"broadcast"),
        udp(s, 41005, APP_IP, 9, b"to the TUN's own address"),
        udp(s, 41006, "198.18.255.7", 9, b"into the NAT pool"),
        udp("10.9.9.9", 41007, d, 9, b"a source that is not ours"),
        ipv6_udp(udp_raw(41008, 9, b"v6")),
        ipv6_udp(udp_raw(41009, 9, b"v6"), payload_length=400),  # claims more than there is
        ipv6_udp(b"\0\0"),  # IPv6 with a 2-byte UDP header
    ]
    packets = [(ETH_P_IP, p) for p in live + elsewhere[:9]]
    packets += [(ETH_P_IPV6, p) for p in elsewhere[9:]]
    for _ in range(200):  # random bytes behind a valid IPv4 header that says UDP
        packets.append((ETH_P_IP, ipv4(s, d, UDP, rng.randbytes(rng.randint(0, 1400)))))
    return packets


def test_garbage_udp_leaves_live_flows_untouched(
    lab: Lab, tunio: TunioProcess, udp_echo: LineReader, servers: dict[str, LineReader],
    app_udp: socket.socket,
) -> None:
    del udp_echo, servers
    rng = random.Random(20261125)
    live_port = app_udp.getsockname()[1]
    seq = 0

    def udp_round(n: int) -> None:
        nonlocal seq
        payloads = [struct.pack(">I", seq + i) + pattern(300 + i) for i in range(n)]
        echo_exact(app_udp, payloads)
        seq += n

    probe = pattern(100_000)
    with (
        netns_socket(lab.app, socket.AF_PACKET, socket.SOCK_RAW, 0) as raw,
        lab.connect(PEER_PORTS["echo"], timeout=30.0) as tcp_flow,
    ):
        udp_round(20)
        for _ in range(3):
            for ethertype, pkt in garbage(live_port, rng):
                raw.sendto(pkt, (TUN_NAME, ethertype))
            udp_round(50)
            tcp_flow.sendall(probe)
            assert recv_exact(tcp_flow, len(probe)) == probe
    assert tunio.running(), tunio.log.text


# ---- DNS ---------------------------------------------------------------------------------


def dig(lab: Lab, name: str, qtype: str, *extra: str,
        server: str = SERVER_ADDRESS) -> list[str]:
    out = lab.run(lab.app, ["dig", f"@{server}", name, qtype, "+short", "+time=3",
                            "+tries=2", *extra], timeout=30)
    return sorted(line for line in out.splitlines() if line.strip())


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_dig_through_tunio(
    lab: Lab, tunio: TunioProcess, dns: LineReader, transport: str
) -> None:
    del tunio, dns
    extra = ["+tcp"] if transport == "tcp" else ["+notcp"]
    for (name, qtype), expected in RECORDS.items():
        assert dig(lab, name, qtype, *extra) == expected, (name, qtype, transport)
    assert dig(lab, "missing.tunio.test", "A", *extra) == []


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_dig_over_ipv6_through_tunio(
    lab: Lab, tunio: TunioProcess, dns: LineReader, transport: str
) -> None:
    """The same resolver asked over IPv6 (dig @fd00:18::10): A and AAAA records both."""
    del tunio, dns
    extra = ["+tcp"] if transport == "tcp" else ["+notcp"]
    for qtype, expected in (("A", ["198.51.100.8"]), ("AAAA", ["2001:db8::8"])):
        got = dig(lab, "h.tunio.test", qtype, *extra, server=SERVER_ADDRESS6)
        assert got == expected, (qtype, transport)
    assert dig(lab, "a.tunio.test", "A", *extra, server=SERVER_ADDRESS6) == ["198.51.100.7"]
    assert dig(lab, "missing.tunio.test", "AAAA", *extra, server=SERVER_ADDRESS6) == []


GETADDRINFO = """
import socket, sys
family = {"4": socket.AF_INET, "6": socket.AF_INET6}[sys.argv[2]]
infos = socket.getaddrinfo(sys.argv[1], 80, family, socket.SOCK_STREAM)
print(" ".join(sorted({info[4][0] for info in infos})))
"""


@pytest.mark.parametrize("options", ["", "options use-vc\n"], ids=["udp", "tcp"])
def test_getaddrinfo_through_tunio(
    lab: Lab, tunio: TunioProcess, dns: LineReader, options: str
) -> None:
    del tunio, dns
    conf = f"nameserver {SERVER_ADDRESS}\noptions timeout:3 attempts:2\n{options}"
    with lab.etc_file(lab.app, "resolv.conf", conf):
        for family, expected in (("4", "198.51.100.8"), ("6", "2001:db8::8")):
            out = lab.run(lab.app, [sys.executable, "-c", GETADDRINFO, "h.tunio.test", family],
                          timeout=30)
            assert out.strip() == expected


def test_dns_queries_under_load(lab: Lab, tunio: TunioProcess, dns: LineReader) -> None:
    del tunio, dns
    _, summary = flood(lab, "--connect", f"{SERVER_ADDRESS}:{DNS_PORT}", "--mode", "dns",
                        "--name", "a.tunio.test", "--connections", "2000",
                        "--concurrency", "16", "--rate", "0", "--timeout", "60")
    print(f"dns: {summary['queries_per_s']:.0f} queries/s, latency {summary['latency_us']}, "
          f"lost {summary['lost']}")
    assert summary["ok"] + summary["lost"] == 2000
    assert set(summary["errors"]) <= {"timeout"}
    # a lost query is a dropped datagram (allowed under load); most must be answered
    assert summary["ok"] >= 1900, summary


# ---- idle timeout ------------------------------------------------------------------------


def worker_sockets_to(lab: Lab, port: int) -> list[str]:
    """The workers' UDP sockets (on the veth's address) connected to SERVER_ADDRESS:port."""
    out = lab.run(lab.app, ["ss", "-Huan", "src", APP_ADDRESS, "dst", f"{SERVER_ADDRESS}:{port}"],
                  timeout=10)
    return [line for line in out.splitlines() if line.strip()]


def test_an_idle_session_expires(fresh_lab: Lab) -> None:
    lab = fresh_lab
    tunio = lab.start_tunio(["--connect-timeout", str(CONNECT_TIMEOUT), "--udp-timeout", "1"])
    port = 7500
    with (
        lab.open_socket(lab.srv, type=socket.SOCK_DGRAM) as server,
        lab.open_socket(type=socket.SOCK_DGRAM) as app,
    ):
        server.bind((SERVER_ADDRESS, port))
        server.settimeout(REPLY_TIMEOUT)
        app.settimeout(REPLY_TIMEOUT)
        app.connect((SERVER_ADDRESS, port))
        app.send(b"first")
        data, worker_addr = server.recvfrom(100)
        assert data == b"first"
        server.sendto(b"reply", worker_addr)
        assert app.recv(100) == b"reply"
        assert len(worker_sockets_to(lab, port)) == 1
        # idle: within a few timeouts the stack ends the session and the worker's socket goes
        deadline = time.monotonic() + 10
        while worker_sockets_to(lab, port):
            assert time.monotonic() < deadline, "the idle session was not expired"
            time.sleep(0.2)  # polling a socket table: there is no event to wait on
        # a reply sent to the session's old address no longer reaches the app
        server.sendto(b"too late", worker_addr)
        app.settimeout(1.0)
        with pytest.raises(TimeoutError):
            app.recv(100)
        # and the app's next datagram opens a new session that works
        app.settimeout(REPLY_TIMEOUT)
        app.send(b"again")
        data, new_addr = server.recvfrom(100)
        assert data == b"again"
        server.sendto(b"back", new_addr)
        assert app.recv(100) == b"back"
    assert tunio.stop() == 0, tunio.log.text
