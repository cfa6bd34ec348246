"""flood's dns mode: DNS queries over UDP to a real resolver, dnsperf-style.

`concurrency` UDP sockets (each its own source port, so its own UDP session through tunio), each
with at most one query outstanding; a query not answered within `query_timeout` counts as lost.
An answer counts as ok when its id, flags and question match the query, its rcode is NOERROR and
it holds at least one answer record; other rcodes are counted by name (NXDOMAIN, SERVFAIL, ...).
"""

from __future__ import annotations

import random
import select
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from flood_common import error_name
from flood_udp import Pacer, big_buffers, percentiles

DNS_HEADER = struct.Struct(">HHHHHH")  # id, flags, qdcount, ancount, nscount, arcount
QTYPES = {"A": 1, "NS": 2, "CNAME": 5, "MX": 15, "TXT": 16, "AAAA": 28, "SRV": 33}
RCODES = {1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}
_FLAG_QR = 0x8000
_FLAG_RD = 0x0100
_FLAG_TC = 0x0200
_RECV_SIZE = 4096


def question(name: str, qtype: str) -> bytes:
    """The question section for `name` (class IN); ValueError for a name DNS cannot carry."""
    out = bytearray()
    for label in name.rstrip(".").split("."):
        raw = label.encode("idna")
        if not 0 < len(raw) < 64:
            raise ValueError(f"bad DNS name {name!r}")
        out += bytes([len(raw)]) + raw
    out += b"\0" + struct.pack(">HH", QTYPES[qtype], 1)
    if len(out) > 259:
        raise ValueError(f"DNS name too long: {name!r}")
    return bytes(out)


def query(qid: int, q: bytes) -> bytes:
    return DNS_HEADER.pack(qid, _FLAG_RD, 1, 0, 0, 0) + q


def check_answer(data: bytes, qid: int, q: bytes) -> str | None:
    """None if `data` is not the answer to query `qid` (ignored); "" if ok, else what is wrong."""
    if len(data) < DNS_HEADER.size:
        return None
    rid, flags, qd, an, _ns, _ar = DNS_HEADER.unpack_from(data)
    if rid != qid or not flags & _FLAG_QR:
        return None
    if qd != 1 or data[DNS_HEADER.size : DNS_HEADER.size + len(q)].lower() != q.lower():
        return "verify"
    if flags & _FLAG_TC:
        return "truncated"
    rcode = flags & 0xF
    if rcode:
        return RCODES.get(rcode, f"rcode{rcode}")
    return "" if an else "noanswer"


@dataclass(frozen=True)
class DnsPlan:
    family: int
    addr: tuple[str, int]
    name: str
    qtype: str
    queries: int
    concurrency: int
    rate: float  # queries/s; 0 = as fast as answers allow
    query_timeout: float
    deadline: float


@dataclass
class _Slot:
    sock: socket.socket
    qid: int = -1  # the outstanding query's id, -1 when idle
    sent_ns: int = 0


@dataclass
class DnsOutcome:
    ok: int = 0
    failed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    sent: int = 0
    received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    lost: int = 0
    latencies_ns: list[int] = field(default_factory=list)
    start: float = 0.0
    end: float = 0.0

    def fail(self, name: str) -> None:
        self.failed += 1
        self.errors[name] = self.errors.get(name, 0) + 1


def run_dns(plan: DnsPlan) -> DnsOutcome:
    out = DnsOutcome()
    q = question(plan.name, plan.qtype)
    rng = random.Random()
    out.start = time.monotonic()
    pacer = Pacer(plan.rate, out.start)
    issued = 0
    slots: dict[int, _Slot] = {}
    with select.epoll() as ep:
        for _ in range(min(plan.concurrency, plan.queries)):
            sock = socket.socket(plan.family, socket.SOCK_DGRAM)
            sock.setblocking(False)
            big_buffers(sock)
            sock.connect(plan.addr)
            slots[sock.fileno()] = _Slot(sock)
            ep.register(sock.fileno(), select.EPOLLIN)
        idle = list(slots.values())
        while True:
            now = time.monotonic()
            allowed = pacer.allowed(now, plan.queries)
            while idle and issued < allowed:
                _issue(idle.pop(), q, rng, out, idle)
                issued += 1
            busy = [s for s in slots.values() if s.qid >= 0]
            if issued >= plan.queries and not busy:
                break
            if now >= plan.deadline:
                for _ in busy:
                    out.fail("timeout")
                    out.lost += 1
                out.failed += plan.queries - issued
                out.errors["timeout"] = out.errors.get("timeout", 0) + plan.queries - issued
                break
            wait = _expire(plan, busy, out, idle)
            if idle and issued < plan.queries:
                wait = min(wait, max(0.0, pacer.next_at(issued) - now))
            for fd, _ in ep.poll(min(wait, 0.1)):
                _receive(slots[fd], q, out, idle)
        out.end = time.monotonic()
        for s in slots.values():
            s.sock.close()
    return out


def _issue(slot: _Slot, q: bytes, rng: random.Random, out: DnsOutcome,
           idle: list[_Slot]) -> None:  # fmt: skip
    """One query on an idle slot (a failed send leaves the slot idle, counted)."""
    slot.qid = rng.getrandbits(16)
    msg = query(slot.qid, q)
    slot.sent_ns = time.monotonic_ns()
    try:
        slot.sock.send(msg)
    except OSError as exc:
        out.fail(error_name(exc))
        slot.qid = -1
        idle.append(slot)
        return
    out.sent += 1
    out.bytes_sent += len(msg)


def _expire(plan: DnsPlan, busy: list[_Slot], out: DnsOutcome, idle: list[_Slot]) -> float:
    """Queries that waited too long are lost (their slot goes on with a new id); returns how
    long the oldest one left may still wait, in seconds."""
    now_ns = time.monotonic_ns()
    limit_ns = int(plan.query_timeout * 1e9)
    for s in busy:
        if now_ns - s.sent_ns >= limit_ns:
            out.fail("timeout")
            out.lost += 1
            s.qid = -1
            idle.append(s)
    oldest = min((s.sent_ns for s in busy if s.qid >= 0), default=now_ns)
    return max(0.0, (oldest + limit_ns - now_ns) / 1e9)


def _receive(slot: _Slot, q: bytes, out: DnsOutcome, idle: list[_Slot]) -> None:
    while True:
        try:
            data = slot.sock.recv(_RECV_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:  # ECONNREFUSED: nothing listens on the resolver's port
            if slot.qid >= 0:
                out.fail(error_name(exc))
                slot.qid = -1
                idle.append(slot)
            continue
        out.received += 1
        out.bytes_received += len(data)
        if slot.qid < 0:
            continue  # a late answer to a query that timed out
        verdict = check_answer(data, slot.qid, q)
        if verdict is None:
            continue
        if verdict:
            out.fail(verdict)
        else:
            out.ok += 1
            out.latencies_ns.append(time.monotonic_ns() - slot.sent_ns)
        slot.qid = -1
        idle.append(slot)


def summary(plan: DnsPlan, out: DnsOutcome) -> dict[str, Any]:
    seconds = out.end - out.start
    per_s = 1 / seconds if seconds > 0 else 0.0
    return {
        "mode": "dns",
        "connections": plan.queries,
        "ok": out.ok,
        "failed": out.failed,
        "errors": dict(sorted(out.errors.items())),
        "bytes_sent": out.bytes_sent,
        "bytes_received": out.bytes_received,
        "seconds": round(seconds, 6),
        "conn_per_s": round(out.ok * per_s, 1),
        "throughput_bps": round((out.bytes_sent + out.bytes_received) * 8 * per_s),
        "latency_us": percentiles(out.latencies_ns),
        "datagrams_sent": out.sent,
        "datagrams_received": out.received,
        "lost": out.lost,
        "reordered": 0,
        "datagrams_per_s": round(out.received * per_s, 1),
        "queries_per_s": round(out.ok * per_s, 1),
        "name": plan.name,
        "qtype": plan.qtype,
        "concurrency": plan.concurrency,
        "rate": plan.rate,
    }
