"""flood's UDP side: the udp-echo server, the udp-echo client, and what the UDP modes share.

Every datagram the client sends carries (nonce, session, seq, send time) in its first 20 bytes
and a slice of the shared pattern chosen by (session, seq) after them, so the client checks each
echo byte for byte and knows exactly which datagram came back: loss, reordering (a datagram older
than the newest one already seen on its session) and duplicates are counted per session.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import random
import select
import signal
import socket
import struct
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_any
from typing import Any

from flood_common import CHUNK, error_name, format_endpoint, resolve

DGRAM_HEADER = struct.Struct(">IIIQ")  # nonce, session, seq, send time (ns, CLOCK_MONOTONIC)
MAX_DATAGRAM = 65507  # the largest UDP payload over IPv4
SOCKET_BUFFER = 4 << 20  # asked for on every UDP socket: bursts wait in the kernel, not lost
SEND_BATCH = 64  # datagrams sent before the receive side gets a turn
_GRACE = 10.0  # seconds past the deadline before a silent client process is killed

# Fixed pseudo-random bytes: every datagram's body is a slice of them.
_PATTERN = random.Random(0x7475_6E69_6F).randbytes(CHUNK)


def big_buffers(sock: socket.socket) -> None:
    """Ask for large socket buffers (forced past net.core.*mem_max when we may)."""
    for force, plain in ((33, socket.SO_RCVBUF), (32, socket.SO_SNDBUF)):  # SO_*BUFFORCE
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER)


def body(session: int, seq: int, size: int) -> bytes:
    """The bytes after the header of datagram (session, seq) of `size` bytes in all."""
    n = size - DGRAM_HEADER.size
    offset = (session * 1_000_003 + seq * 7919) % (CHUNK - n)
    return _PATTERN[offset : offset + n]


def percentiles(latencies_ns: list[int]) -> dict[str, int]:
    """p50/p90/p99/max in microseconds (nearest rank; zeros when empty)."""
    lat = sorted(ns // 1000 for ns in latencies_ns)

    def pick(p: float) -> int:
        return lat[max(0, math.ceil(p / 100 * len(lat)) - 1)] if lat else 0

    return {"p50": pick(50), "p90": pick(90), "p99": pick(99), "max": lat[-1] if lat else 0}


class Pacer:
    """Paces sends at `rate` per second from `start` (0: no limit)."""

    def __init__(self, rate: float, start: float) -> None:
        self.rate = rate
        self.start = start

    def allowed(self, now: float, total: int) -> int:
        """How many sends in all may have happened by `now`."""
        if self.rate <= 0:
            return total
        return min(total, int((now - self.start) * self.rate) + 1)

    def next_at(self, done: int) -> float:
        """When send number `done` (counting from 0) is due."""
        return self.start if self.rate <= 0 else self.start + done / self.rate


# ---------------------------------------------------------------- server


def _stop_pipe() -> int:
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(w)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda _sig, _frame: None)
    return r


def _echo_loop(sock: socket.socket, stop: int, deadline: float | None) -> None:
    buf = bytearray(MAX_DATAGRAM + 1)
    view = memoryview(buf)
    with select.epoll() as ep:
        ep.register(sock.fileno(), select.EPOLLIN)
        ep.register(stop, select.EPOLLIN)
        while True:
            timeout = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
            if timeout <= 0:
                return
            for fd, _ in ep.poll(timeout):
                if fd == stop:
                    return
                for _ in range(256):  # then look at the stop pipe again
                    try:
                        n, peer = sock.recvfrom_into(buf)
                    except BlockingIOError:
                        break
                    with contextlib.suppress(BlockingIOError, ConnectionRefusedError):
                        sock.sendto(view[:n], peer)  # a full buffer drops, as UDP does


def _echo_child(sock: socket.socket) -> None:
    _echo_loop(sock, _stop_pipe(), None)


def serve_udp_echo(host: str, port: int, processes: int, *, duration: float | None) -> int:
    """Echo datagrams on HOST:PORT until SIGTERM/SIGINT or `duration`; print `listening`."""
    family, addr = resolve(host, port)
    socks: list[socket.socket] = []
    for _ in range(processes):
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        big_buffers(s)
        s.bind(addr if not socks else (addr[0], socks[0].getsockname()[1]))
        s.setblocking(False)
        socks.append(s)
    deadline = None if duration is None else time.monotonic() + duration
    stop = _stop_pipe()
    bound = format_endpoint(addr[0], socks[0].getsockname()[1])
    if processes == 1:
        print(f"listening {bound}", flush=True)
        _echo_loop(socks[0], stop, deadline)
        return 0
    ctx = multiprocessing.get_context("fork")
    children = [ctx.Process(target=_echo_child, args=(s,), daemon=True,
                            name=f"flood-udp-server-{i}") for i, s in enumerate(socks)]
    for child in children:
        child.start()
    print(f"listening {bound}", flush=True)
    timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
    wait_any([stop, *(c.sentinel for c in children)], timeout)
    for child in children:
        with contextlib.suppress(OSError):
            child.terminate()
    for child in children:
        child.join(5)
        if child.is_alive():
            child.kill()
            child.join()
    return 0


# ---------------------------------------------------------------- client


@dataclass(frozen=True)
class UdpPlan:
    family: int
    addr: tuple[str, int]
    first: int  # index of this process's first session
    sessions: int
    datagrams: int  # per session
    size: int
    rate: float  # datagrams/s for this process; 0 = as fast as possible
    linger: float  # seconds to wait for echoes after the last send
    deadline: float
    nonce: int


@dataclass
class UdpOutcome:
    ok: int = 0
    failed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    datagrams_sent: int = 0
    datagrams_received: int = 0
    lost: int = 0
    reordered: int = 0
    duplicated: int = 0
    intact: int = 0  # distinct datagrams that came back byte-exact
    latencies_ns: list[int] = field(default_factory=list)
    start: float = 0.0
    end: float = 0.0
    last_received: float = 0.0

    def error(self, name: str, count: int = 1) -> None:
        self.errors[name] = self.errors.get(name, 0) + count


class _Session:
    __slots__ = ("bad", "index", "newest", "seen", "sent", "sock")

    def __init__(self, sock: socket.socket, index: int, count: int) -> None:
        self.sock = sock
        self.index = index
        self.sent = 0
        self.seen = bytearray(count)  # 1 where that seq came back intact
        self.newest = -1
        self.bad = False  # reordered, duplicated, corrupted or an error


def _receive(plan: UdpPlan, s: _Session, out: UdpOutcome, buf: bytearray) -> None:
    view = memoryview(buf)
    while True:
        try:
            n = s.sock.recv_into(buf)
        except BlockingIOError:
            return
        except OSError as exc:  # ECONNREFUSED from an ICMP error, ...
            out.error(error_name(exc))
            s.bad = True
            continue
        now = time.monotonic_ns()
        out.datagrams_received += 1
        out.last_received = now / 1e9
        if n < DGRAM_HEADER.size:
            out.error("verify")
            s.bad = True
            continue
        nonce, session, seq, sent_ns = DGRAM_HEADER.unpack_from(buf)
        if (nonce != plan.nonce or session != s.index or seq >= plan.datagrams
                or n != plan.size or view[DGRAM_HEADER.size : n] != body(session, seq, n)):
            out.error("verify")
            s.bad = True
            continue
        if s.seen[seq]:
            out.duplicated += 1
            s.bad = True
            continue
        s.seen[seq] = 1
        out.intact += 1
        if seq < s.newest:
            out.reordered += 1
            s.bad = True
        else:
            s.newest = seq
        out.latencies_ns.append(now - sent_ns)


def _open_sessions(plan: UdpPlan, out: UdpOutcome, ep: select.epoll,
                   sessions: list[_Session]) -> dict[int, _Session]:  # fmt: skip
    """The plan's connected UDP sockets, in `sessions` and in `ep`; by descriptor."""
    by_fd: dict[int, _Session] = {}
    for i in range(plan.sessions):
        sock = socket.socket(plan.family, socket.SOCK_DGRAM)
        sock.setblocking(False)
        big_buffers(sock)
        try:
            sock.connect(plan.addr)
        except OSError as exc:
            out.error(error_name(exc))
            sock.close()
            continue
        s = _Session(sock, plan.first + i, plan.datagrams)
        sessions.append(s)
        by_fd[sock.fileno()] = s
        ep.register(sock.fileno(), select.EPOLLIN)
    return by_fd


def _count_sessions(plan: UdpPlan, out: UdpOutcome, sessions: list[_Session]) -> None:
    """Each session ok (every echo back, once, in order) or failed; closes their sockets."""
    for s in sessions:
        missing = plan.datagrams - s.seen.count(1)
        out.lost += missing
        if missing or s.bad:
            out.failed += 1
        else:
            out.ok += 1
        s.sock.close()


def run_udp_client(plan: UdpPlan) -> UdpOutcome:
    """Send every session's datagrams (paced), collect the echoes, count what came back."""
    out = UdpOutcome()
    sessions: list[_Session] = []
    buf = bytearray(MAX_DATAGRAM + 1)
    out.start = time.monotonic()
    total = plan.sessions * plan.datagrams
    pacer = Pacer(plan.rate, out.start)
    with select.epoll() as ep:
        by_fd = _open_sessions(plan, out, ep, sessions)
        total = len(sessions) * plan.datagrams
        done = 0  # send attempts made
        last_send = out.start
        received_target = total
        while True:
            now = time.monotonic()
            allowed = pacer.allowed(now, total)
            batch = 0
            while done < allowed and batch < SEND_BATCH:
                s = sessions[done % len(sessions)]
                seq = done // len(sessions)
                head = DGRAM_HEADER.pack(plan.nonce, s.index, seq, time.monotonic_ns())
                try:
                    s.sock.send(head + body(s.index, seq, plan.size))
                except BlockingIOError:
                    break  # the send buffer is full: let the receive side run, then retry
                except OSError as exc:
                    out.error(error_name(exc))
                    s.bad = True
                    received_target -= 1
                else:
                    out.datagrams_sent += 1
                done += 1
                batch += 1
                last_send = time.monotonic()
            if done >= total and (out.intact >= received_target or now >= last_send + plan.linger):
                break
            if now >= plan.deadline:
                break
            if done < total:
                wait = 0.0 if batch else max(0.0, min(pacer.next_at(done) - now, 0.05))
            else:
                wait = max(0.0, min(last_send + plan.linger, plan.deadline) - now)
            for fd, _ in ep.poll(wait):
                _receive(plan, by_fd[fd], out, buf)
        # the run ends with its last datagram: not with the wait for echoes that never came
        out.end = max(last_send, out.last_received)
        _count_sessions(plan, out, sessions)
    out.failed += plan.sessions - len(sessions)
    out.lost += (plan.sessions - len(sessions)) * plan.datagrams
    return out


def _child(plan: UdpPlan, conn: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn.send(run_udp_client(plan))
    conn.close()


def run_udp_echo(family: int, addr: tuple[str, int], *, sessions: int, datagrams: int,
                 size: int, rate: float, processes: int, timeout: float,
                 linger: float) -> dict[str, Any]:
    """The whole udp-echo run over `processes` processes; its JSON summary."""
    deadline = time.monotonic() + timeout
    nonce = random.getrandbits(32)
    plans: list[UdpPlan] = []
    first = 0
    for i in range(processes):
        count = sessions // processes + (i < sessions % processes)
        if count:
            share = rate * count / sessions if rate > 0 else 0.0
            plans.append(UdpPlan(family, addr, first, count, datagrams, size, share, linger,
                                 deadline, nonce))
        first += count
    parts = [run_udp_client(plans[0])] if len(plans) == 1 else _run_forked(plans, deadline)
    return _summary(parts, sessions=sessions, datagrams=datagrams, size=size, rate=rate,
                    processes=processes)


def _run_forked(plans: list[UdpPlan], deadline: float) -> list[UdpOutcome]:
    ctx = multiprocessing.get_context("fork")
    readers: dict[Connection, tuple[UdpPlan, Any]] = {}
    for i, plan in enumerate(plans):
        reader, writer = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(plan, writer), daemon=True,
                           name=f"flood-udp-client-{i}")
        proc.start()
        writer.close()
        readers[reader] = (plan, proc)
    parts: list[UdpOutcome] = []
    while readers and time.monotonic() < deadline + _GRACE:
        for ready in wait_any(list(readers), timeout=0.2):
            if not isinstance(ready, Connection) or ready not in readers:
                continue
            plan, proc = readers.pop(ready)
            try:
                parts.append(ready.recv())
            except EOFError:
                parts.append(_lost(plan, "client-died"))
            proc.join()
    for plan, proc in readers.values():
        proc.kill()
        proc.join()
        parts.append(_lost(plan, "timeout"))
    return parts


def _lost(plan: UdpPlan, why: str) -> UdpOutcome:
    now = time.monotonic()
    out = UdpOutcome(failed=plan.sessions, lost=plan.sessions * plan.datagrams, start=now,
                     end=now)
    out.error(why, plan.sessions)
    return out


def _summary(parts: list[UdpOutcome], *, sessions: int, datagrams: int, size: int,
             rate: float, processes: int) -> dict[str, Any]:
    total = UdpOutcome()
    for p in parts:
        total.ok += p.ok
        total.failed += p.failed
        for name, count in p.errors.items():
            total.error(name, count)
        total.datagrams_sent += p.datagrams_sent
        total.datagrams_received += p.datagrams_received
        total.lost += p.lost
        total.reordered += p.reordered
        total.duplicated += p.duplicated
        total.latencies_ns.extend(p.latencies_ns)
    seconds = max(p.end for p in parts) - min(p.start for p in parts) if parts else 0.0
    per_s = 1 / seconds if seconds > 0 else 0.0
    bytes_sent = total.datagrams_sent * size
    bytes_received = total.datagrams_received * size
    return {
        "mode": "udp-echo",
        "connections": sessions,
        "ok": total.ok,
        "failed": total.failed,
        "errors": dict(sorted(total.errors.items())),
        "bytes_sent": bytes_sent,
        "bytes_received": bytes_received,
        "seconds": round(seconds, 6),
        "conn_per_s": round(total.ok * per_s, 1),
        "throughput_bps": round((bytes_sent + bytes_received) * 8 * per_s),
        "latency_us": percentiles(total.latencies_ns),
        "datagrams_sent": total.datagrams_sent,
        "datagrams_received": total.datagrams_received,
        "lost": total.lost,
        "reordered": total.reordered,
        "duplicated": total.duplicated,
        "datagrams_per_s": round(total.datagrams_received * per_s, 1),
        "loss_ratio": round(total.lost / total.datagrams_sent, 6) if total.datagrams_sent else 0.0,
        "datagrams_per_session": datagrams,
        "datagram_size": size,
        "rate": rate,
        "processes": processes,
    }


def human(summary: dict[str, Any]) -> str:
    """The UDP modes' summary for a person."""
    lat = summary["latency_us"]
    errors = ", ".join(f"{k}={v}" for k, v in summary["errors"].items()) or "none"
    rows = [
        ("mode", summary["mode"]),
        ("sessions" if summary["mode"] == "udp-echo" else "queries",
         f"{summary['ok']} ok / {summary['failed']} failed of {summary['connections']}"),
        ("errors", errors),
        ("datagrams", f"{summary['datagrams_sent']} sent, {summary['datagrams_received']} "
                      f"received, {summary['lost']} lost, {summary['reordered']} reordered"),
        ("time", f"{summary['seconds']:.3f} s"),
        ("rate", f"{summary['datagrams_per_s']:.1f} datagrams/s received"),
        ("latency", f"p50 {lat['p50']} us, p90 {lat['p90']} us, p99 {lat['p99']} us, "
                    f"max {lat['max']} us"),
    ]
    return "\n".join(f"{name:<12} {value}" for name, value in rows)
