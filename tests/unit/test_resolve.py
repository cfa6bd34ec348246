"""The workers' stub resolver and happy eyeballs (tunio.dialers.resolve), and the direct dialer
on a name: against a DNS server of the test's own on loopback (UDP, answers from a table)."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import socket
import struct
import threading
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tunio import reload, wayout
from tunio.config import Options
from tunio.dialers import Address, DirectDialer
from tunio.dialers.resolve import (
    ATTEMPT_DELAY,
    RESOLUTION_DELAY,
    TYPE_A,
    TYPE_AAAA,
    Resolver,
    first_nameserver,
    happy_eyeballs,
    interleave,
)
from tunio.errors import DialError
from tunio.rules import Rule, RuleTable


class LoopbackDns:
    """A UDP DNS server on 127.0.0.1: `records[(name, qtype)]` are its answers, NXDOMAIN for the
    rest; `asked` lists the (name, qtype) of every query it got; queries of a type in `mute`
    go unanswered (a resolver, or a middlebox, that drops AAAA)."""

    def __init__(self, records: dict[tuple[str, int], list[str]]) -> None:
        self.records = records
        self.mute: set[int] = set()
        self.asked: list[tuple[str, int]] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                msg, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            off, labels = 12, []
            while msg[off]:
                labels.append(msg[off + 1 : off + 1 + msg[off]].decode())
                off += 1 + msg[off]
            qtype = struct.unpack_from(">H", msg, off + 1)[0]
            name = ".".join(labels)
            self.asked.append((name, qtype))
            if qtype in self.mute:
                continue
            found = self.records.get((name.lower(), qtype))
            known = any(k[0] == name.lower() for k in self.records)
            rcode = 3 if found is None and not known else 0
            answers = b""
            for ip in found or []:
                data = socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip)
                answers += struct.pack(">HHHIH", 0xC00C, qtype, 1, 30, len(data)) + data
            head = struct.pack(">HHHHHH", struct.unpack_from(">H", msg)[0], 0x8180 | rcode, 1,
                               len(found or []), 0, 0)  # fmt: skip
            self.sock.sendto(head + msg[12 : off + 5] + answers, peer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def dns() -> Iterator[LoopbackDns]:
    server = LoopbackDns({})
    yield server
    server.close()


T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_resolve_asks_a_and_aaaa_and_keeps_answers_for_their_ttl(dns: LoopbackDns) -> None:
    dns.records.update({("www.tunio.test", TYPE_A): ["192.0.2.1", "192.0.2.2"],
                        ("www.tunio.test", TYPE_AAAA): ["2001:db8::1"]})  # fmt: skip
    resolver = Resolver("127.0.0.1", dns.port)
    assert run(resolver.resolve("WWW.tunio.test")) == (["2001:db8::1"], ["192.0.2.1", "192.0.2.2"])
    assert sorted(dns.asked) == [("WWW.tunio.test", TYPE_A), ("WWW.tunio.test", TYPE_AAAA)]
    run(resolver.resolve("www.tunio.test"))  # cached (30 s TTL): nothing asked
    assert len(dns.asked) == 2
    assert resolver.queries == 2


def test_an_unanswered_aaaa_costs_the_resolution_delay_not_the_timeout(dns: LoopbackDns) -> None:
    """RFC 8305 §3: the A answer waits RESOLUTION_DELAY for the AAAA one, then goes alone."""
    dns.records[("www.tunio.test", TYPE_A)] = ["192.0.2.1"]
    dns.mute.add(TYPE_AAAA)
    resolver = Resolver("127.0.0.1", dns.port, timeout=2.0, tries=2)

    async def twice() -> tuple[float, tuple[list[str], list[str]], tuple[list[str], list[str]]]:
        started = time.monotonic()
        first = await resolver.resolve("www.tunio.test")
        took = time.monotonic() - started
        return took, first, await resolver.resolve("www.tunio.test")

    took, first, again = run(twice())
    assert first == ([], ["192.0.2.1"]) == again
    assert RESOLUTION_DELAY <= took < 1.0  # far below one AAAA timeout (2 s)
    # the AAAA lookup was left to finish alone, not asked again by the second connect
    assert dns.asked.count(("www.tunio.test", TYPE_AAAA)) == 1


def test_connects_to_one_name_at_once_share_one_query_and_one_cancel_leaves_the_rest(
    dns: LoopbackDns,
) -> None:
    dns.records[("www.tunio.test", TYPE_A)] = ["192.0.2.1"]
    dns.records[("www.tunio.test", TYPE_AAAA)] = ["2001:db8::1"]
    resolver = Resolver("127.0.0.1", dns.port)

    async def many() -> list[tuple[list[str], list[str]]]:
        first = asyncio.ensure_future(resolver.resolve("www.tunio.test"))
        rest = [asyncio.ensure_future(resolver.resolve("WWW.tunio.test")) for _ in range(20)]
        await asyncio.sleep(0)  # every resolve has started its wait (one loop turn, no timer)
        first.cancel()  # one flow's dial timeout: the shared lookups go on for the others
        return await asyncio.gather(*rest)

    assert run(many()) == [(["2001:db8::1"], ["192.0.2.1"])] * 20
    assert sorted(dns.asked) == [("www.tunio.test", TYPE_A), ("www.tunio.test", TYPE_AAAA)]


def test_an_empty_first_answer_waits_for_the_other_family(dns: LoopbackDns) -> None:
    """AAAA comes back with nothing (the name is IPv4-only): the A answer is waited for whole."""
    dns.records[("v4.tunio.test", TYPE_A)] = ["192.0.2.7"]
    resolver = Resolver("127.0.0.1", dns.port)
    assert run(resolver.resolve("v4.tunio.test", delay=0.0)) == ([], ["192.0.2.7"])


def test_a_name_that_does_not_resolve_is_ehostunreach(dns: LoopbackDns) -> None:
    dialer = DirectDialer(resolver=Resolver("127.0.0.1", dns.port))
    with pytest.raises(DialError) as info:
        run(dialer.dial(Address("nowhere.tunio.test", 80), Address("10.0.0.1", 1)))
    assert info.value.errno == errno.EHOSTUNREACH
    assert ("nowhere.tunio.test", TYPE_A) in dns.asked


def test_a_resolver_that_never_answers_is_ehostunreach() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as mute:
        mute.bind(("127.0.0.1", 0))  # bound, never read: every query goes unanswered
        resolver = Resolver("127.0.0.1", mute.getsockname()[1], timeout=0.2, tries=2)
        started = time.monotonic()
        with pytest.raises(DialError) as info:
            run(resolver.resolve("www.tunio.test"))
    assert info.value.errno == errno.EHOSTUNREACH
    assert time.monotonic() - started < 2.0  # two tries of 0.2 s, both families at once


def test_direct_dials_a_name_over_the_family_that_answers(dns: LoopbackDns) -> None:
    """The AAAA points at a closed port (::1 refuses at once): the IPv4 attempt starts at once
    after that failure, without waiting out the attempt delay, and wins."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        dns.records.update({("he.tunio.test", TYPE_A): ["127.0.0.1"],
                            ("he.tunio.test", TYPE_AAAA): ["::1"]})  # fmt: skip
        dialer = DirectDialer(resolver=Resolver("127.0.0.1", dns.port))
        # from an app of this host (127.0.0.2: the TUN's own address in a real run, never
        # the connection's source): the name's loopback answers are its own loopback
        sock = run(dialer.dial(Address("he.tunio.test", port), Address("127.0.0.2", 1)))
        with sock:
            assert sock.getpeername() == ("127.0.0.1", port)


def test_a_name_answering_this_hosts_own_addresses_is_refused_for_another_hosts_flow(
    dns: LoopbackDns,
) -> None:
    """A DNS-rebinding name (127.0.0.1, ::1) for a flow from a guest behind the gateway: the
    gateway's loopback is not the guest's, so the dial is ECONNREFUSED, TCP and UDP alike, and
    nothing reaches this host's listener."""
    with socket.socket() as srv, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        srv.setblocking(False)
        port = srv.getsockname()[1]
        udp.bind(("127.0.0.1", port))
        dns.records.update({("rebind.tunio.test", TYPE_A): ["127.0.0.1"],
                            ("rebind.tunio.test", TYPE_AAAA): ["::1"]})  # fmt: skip
        dialer = DirectDialer(resolver=Resolver("127.0.0.1", dns.port))
        guest = Address("192.0.2.77", 40000)  # no address of this host
        for dial in (dialer.dial, dialer.dial_udp):
            with pytest.raises(DialError) as info:
                run(dial(Address("rebind.tunio.test", port), guest))
            assert info.value.errno == errno.ECONNREFUSED
            assert "rebind.tunio.test: the name answers " in str(info.value)
            assert "; the flow is from 192.0.2.77, another host: refused" in str(info.value)
        with pytest.raises(BlockingIOError):
            srv.accept()


def test_happy_eyeballs_starts_the_next_attempt_after_the_delay_and_aborts_the_loser() -> None:
    cancelled: list[str] = []
    gate: dict[str, float] = {}

    async def connect(ip: str) -> socket.socket:
        gate[ip] = time.monotonic()
        if ip == "2001:db8::1":  # a family that never answers
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.append(ip)
                raise
        return socket.socket()

    async def race() -> tuple[socket.socket, float]:
        start = time.monotonic()
        sock = await happy_eyeballs(interleave(["2001:db8::1"], ["192.0.2.1"]), connect, 0.1)
        return sock, time.monotonic() - start

    sock, took = run(race())
    sock.close()
    assert cancelled == ["2001:db8::1"]
    assert 0.09 <= gate["192.0.2.1"] - gate["2001:db8::1"] < 1.0
    assert took < 1.0
    assert ATTEMPT_DELAY == 0.25  # RFC 8305's recommended Connection Attempt Delay


def test_happy_eyeballs_gives_the_last_error_when_none_connects() -> None:
    async def connect(ip: str) -> socket.socket:
        raise DialError(errno.ECONNREFUSED if ":" in ip else errno.ENETUNREACH, ip)

    with pytest.raises(DialError) as info:
        run(happy_eyeballs(["2001:db8::1", "192.0.2.1"], connect, 5.0))
    assert info.value.errno == errno.ENETUNREACH  # the second failed last; no 5 s wait


def test_interleave_alternates_families_ipv6_first() -> None:
    assert interleave(["a6", "b6", "c6"], ["a4"]) == ["a6", "a4", "b6", "c6"]


def test_first_nameserver(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("# x\nsearch lan\nnameserver fe80::1%eth0\nnameserver 10.0.0.53\n")
    assert first_nameserver(conf) == "fe80::1"
    conf.write_text("search lan\n")
    assert first_nameserver(conf) is None



def _resolver_of(dialer: object) -> Resolver | None:
    assert isinstance(dialer, DirectDialer)
    return dialer.resolver


def test_the_run_gives_its_direct_dialers_the_upstream_resolver() -> None:
    """tunio.wayout (at start and at each reload) gives every direct dialer of the run, its own
    and the rules', a resolver of --dns-upstream with the egress mark; none without --dns."""
    opts = Options(dns="fake-ip", dns_upstream="192.0.2.53:5353", egress_mark=7,
                   egress_interface="eth9")  # fmt: skip
    dialer = wayout.load_dialer(opts)
    names = _resolver_of(dialer)
    assert names is not None
    assert (names.server, names.port, names.mark, names.interface) == (
        "192.0.2.53", 5353, 7, "eth9"
    )  # fmt: skip
    v6 = _resolver_of(wayout.load_dialer(Options(dns="hijack", dns_upstream="2001:db8::53")))
    assert v6 is not None
    assert (v6.server, v6.port) == ("2001:db8::53", 53)
    assert _resolver_of(wayout.load_dialer(Options())) is None
    assert _resolver_of(wayout.load_dialer(Options(dns="off", dns_upstream="192.0.2.53"))) is None
    ruled = dataclasses.replace(opts, rules=(Rule(action=("direct",)),), dialers={"d2": "direct"})
    table = wayout.load_policy(ruled, dialer)
    assert isinstance(table, RuleTable)
    for name in ("direct", "d2"):
        made = _resolver_of(table.dialers[name])
        assert made is not None
        assert (made.server, made.port, made.mark) == ("192.0.2.53", 5353, 7)


def test_a_reload_cannot_change_the_dns_settings() -> None:
    """The stack answers and forwards by the --dns settings it was started with: a reload that
    changes one is refused whole (tunio.reload), live changes beside it included."""
    old = Options(dns="fake-ip", dns_upstream="192.0.2.53")
    changes: list[dict[str, Any]] = [
        {"dns": "hijack"}, {"dns_upstream": "192.0.2.54"}, {"dns_ttl": 60}, {"dns_hold": 1.0},
        {"dns_address": ("198.18.0.3",)},
    ]  # fmt: skip
    for change in changes:
        found = reload.compare(old, dataclasses.replace(old, connect_timeout=3.0, **change))
        assert found.fixed == tuple(change), change
        assert found.live == ("connect_timeout",)
