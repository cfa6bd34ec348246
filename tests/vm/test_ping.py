"""ICMP echo (ping) through tunio, IPv4 and IPv6: app namespace -> TUN -> stack -> worker, which
pings the destination for real from a ping socket (the lab allows them in the app namespace),
and the destination's reply comes back the same way.

So an answer means the destination answered: an unreachable destination gets the ICMP error a
router would send, and a silent one gets silence.
"""

from __future__ import annotations

import os
import re
import select
import socket
import struct
import subprocess
import time

import pytest
from lab.netlab import Lab, TunioProcess

from tests.vm.conftest import Family

PING_TIMEOUT = 30.0  # for a whole ping run (each reply waits at most -W 2 s)
REPLY_TIMEOUT = 5.0
ICMP_ECHO_REPLY = {socket.AF_INET: 0, socket.AF_INET6: 129}
ICMP_ECHO_REQUEST = {socket.AF_INET: 8, socket.AF_INET6: 128}
ICMP_PROTO = {socket.AF_INET: socket.IPPROTO_ICMP, socket.AF_INET6: socket.IPPROTO_ICMPV6}

pytestmark = pytest.mark.needs("ping")


def ping(lab: Lab, host: str, *options: str) -> tuple[int, str]:
    """iputils ping from the app namespace, as a user would run it; (exit code, its output)."""
    proc = lab.popen(lab.app, ["ping", *options, host], stdout=subprocess.PIPE,
                     stderr=subprocess.STDOUT, text=True)  # fmt: skip
    out, _ = proc.communicate(timeout=PING_TIMEOUT)
    return proc.returncode, str(out)


def statistics(out: str) -> tuple[int, int]:
    """(transmitted, received) from ping's summary line."""
    found = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    assert found, out
    return int(found[1]), int(found[2])


def proc_net_address(host: str) -> str:
    """`host` as /proc/net/{icmp,icmp6,raw,raw6} print it (32-bit words in host order)."""
    af = socket.AF_INET6 if ":" in host else socket.AF_INET
    packed = socket.inet_pton(af, host)
    return "".join(packed[i : i + 4][::-1].hex() for i in range(0, len(packed), 4)).upper()


def worker_sockets_to(lab: Lab, host: str) -> dict[str, int]:
    """How many ping sockets and raw sockets of the app namespace are connected to `host`."""
    v6 = ":" in host
    remote = f"{proc_net_address(host)}:0000"
    counts = {}
    for kind in ("icmp", "raw"):
        table = lab.run(lab.app, ["cat", f"/proc/net/{kind}{'6' if v6 else ''}"])
        counts[kind] = sum(1 for line in table.splitlines()[1:] if line.split()[2] == remote)
    return counts


def test_ping_gets_every_reply(lab: Lab, tunio: TunioProcess, family: Family) -> None:
    code, out = ping(lab, family.server, "-c", "3", "-W", "2", "-i", "0.2")
    assert code == 0, out
    assert statistics(out) == (3, 3), out
    assert " 0% packet loss" in out, out
    # each reply is the destination's, for the app's sequence numbers
    seqs = re.findall(rf"bytes from {re.escape(family.server)}: icmp_seq=(\d+)", out)
    assert seqs == ["1", "2", "3"], out
    # a worker pinged with a ping socket (the lab allows them), still open until the session
    # expires; no raw socket was needed
    sockets = worker_sockets_to(lab, family.server)
    assert sockets["icmp"] >= 1, sockets
    assert sockets["raw"] == 0, sockets
    assert tunio.running()


def test_ping_to_an_unreachable_host_gets_an_error(
    lab: Lab, tunio: TunioProcess, family: Family
) -> None:
    # The workers have no route to it: their ping socket's connect fails with EHOSTUNREACH and
    # the stack answers the app's echo with ICMP (ICMPv6) destination unreachable.
    code, out = ping(lab, family.unreachable, "-c", "2", "-W", "2", "-i", "0.2")
    assert code != 0, out
    assert statistics(out)[1] == 0, out
    assert re.search(r"Destination (Host Unreachable|unreachable)", out), out
    assert "bytes from" not in out, out
    assert tunio.running()


#: addresses the workers route to srv, which has no route for them and answers with ICMP
ROUTER_REFUSES = {socket.AF_INET: ("198.18.7.1", "198.18.7.0/24"),
                  socket.AF_INET6: ("fd00:18:7::1", "fd00:18:7::/48")}  # fmt: skip


def test_a_routers_unreachable_reaches_the_app(
    lab: Lab, tunio: TunioProcess, family: Family
) -> None:
    # The workers' route is fine; srv, the next hop, has none and answers the worker's echo
    # with ICMP unreachable (IPv6: no route). The worker's ping socket hears of it (RECVERR)
    # and the app gets the error for its own echo, as a direct ping would.
    host, prefix = ROUTER_REFUSES[family.af]
    v6 = ["-6"] if family.af == socket.AF_INET6 else []
    lab.ip(lab.srv, *v6, "route", "add", "unreachable", prefix)
    try:
        code, out = ping(lab, host, "-c", "2", "-W", "2", "-i", "0.5")
    finally:
        lab.ip(lab.srv, *v6, "route", "del", "unreachable", prefix)
    assert code != 0, out
    assert statistics(out)[1] == 0, out
    # IPv4: host unreachable; IPv6: no route, which Linux reports as ENETUNREACH
    assert re.search(r"Destination (Host|Net) Unreachable|Destination unreachable", out), out
    assert "bytes from" not in out, out
    assert tunio.running()


def test_ping_to_a_silent_host_stays_silent(
    lab: Lab, tunio: TunioProcess, family: Family
) -> None:
    # The srv namespace drops it: no reply and no error, as with a direct ping.
    code, out = ping(lab, family.blackhole, "-c", "1", "-W", "1")
    assert code == 1, out
    assert statistics(out) == (1, 0), out
    assert "nreachable" not in out, out
    assert tunio.running()


def _wait_readable(sock: socket.socket, deadline: float) -> None:
    left = deadline - time.monotonic()
    ready, _, _ = select.select([sock], [], [], max(0.0, left))
    assert ready, "no echo reply in time"


def test_echo_replies_are_byte_exact_with_the_apps_identifier(
    lab: Lab, tunio: TunioProcess, family: Family
) -> None:
    """A ping socket in the app namespace sends echoes of several sizes: each reply carries the
    app's own identifier (the worker's kernel chose another one for its own socket), the
    sequence number it answers, and exactly the data sent."""
    af = family.af
    with lab.open_socket(family=af, type=socket.SOCK_DGRAM, proto=ICMP_PROTO[af]) as sock:
        ident = 0x7475
        sock.bind(("::" if af == socket.AF_INET6 else "0.0.0.0", ident))  # picks the identifier
        sock.connect((family.server, 0))
        for seq, size in enumerate([0, 1, 56, 512, 1400], start=1):
            data = os.urandom(size)
            sock.send(struct.pack("!BBHHH", ICMP_ECHO_REQUEST[af], 0, 0, 0, seq) + data)
            deadline = time.monotonic() + REPLY_TIMEOUT
            _wait_readable(sock, deadline)
            reply = sock.recv(65535)
            kind, icmp_code, _csum, got_ident, got_seq = struct.unpack_from("!BBHHH", reply)
            assert (kind, icmp_code) == (ICMP_ECHO_REPLY[af], 0)
            assert (got_ident, got_seq) == (ident, seq)
            assert reply[8:] == data
    assert tunio.running()
