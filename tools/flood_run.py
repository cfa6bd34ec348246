"""Spread a flood client run over processes, show progress, and merge what they measured."""

from __future__ import annotations

import math
import multiprocessing
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_any
from typing import Any

from flood_client import Outcome, Plan, run_client
from flood_common import die_with_parent, format_endpoint

_GRACE = 10.0  # seconds past the deadline before a silent client process is killed


@dataclass(frozen=True)
class Job:
    family: int
    addr: tuple[str, int]
    mode: str
    nbytes: int
    connections: int
    concurrency: int  # per process
    processes: int
    timeout: float
    # A SOCKS5 proxy (no authentication) that every connection goes through to `addr`:
    # `family` is then the proxy's.
    proxy: tuple[str, int] | None = None
    # Seconds during which new connections are opened (at most `connections` of them); those
    # open then run to their end. None: exactly `connections`, unopened ones count as timeouts.
    duration: float | None = None
    # What the client sends, in all its processes, at most (Mbit/s; None: as fast as it can):
    # connections then last longer and as many stay open, without the machine at full load.
    max_mbps: float | None = None


def _percentile(ordered: list[int], p: float) -> int:
    """Nearest-rank percentile of a sorted list (0 when empty)."""
    if not ordered:
        return 0
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def merge(job: Job, parts: list[Outcome]) -> dict[str, Any]:
    """The JSON summary of a run from the outcomes of its processes."""
    total = Outcome()
    for part in parts:
        total.ok += part.ok
        total.failed += part.failed
        for name, count in part.errors.items():
            total.errors[name] = total.errors.get(name, 0) + count
        total.bytes_sent += part.bytes_sent
        total.bytes_received += part.bytes_received
        total.latencies_us.extend(part.latencies_us)
        total.connect_ns.extend(part.connect_ns)
        total.handshake_ns.extend(part.handshake_ns)
        total.syn_retransmits += part.syn_retransmits
    seconds = max(p.end for p in parts) - min(p.start for p in parts) if parts else 0.0
    lat = sorted(ns // 1000 for ns in total.latencies_us)
    connect = sorted(ns // 1000 for ns in total.connect_ns)
    handshake = sorted(ns // 1000 for ns in total.handshake_ns)
    rate = 1 / seconds if seconds > 0 else 0.0
    return {
        "mode": job.mode,
        "connections": job.connections if job.duration is None else total.ok + total.failed,
        "ok": total.ok,
        "failed": total.failed,
        "errors": dict(sorted(total.errors.items())),
        "bytes_sent": total.bytes_sent,
        "bytes_received": total.bytes_received,
        "seconds": round(seconds, 6),
        "conn_per_s": round(total.ok * rate, 1),
        "throughput_bps": round((total.bytes_sent + total.bytes_received) * 8 * rate),
        "latency_us": {
            "p50": _percentile(lat, 50),
            "p90": _percentile(lat, 90),
            "p99": _percentile(lat, 99),
            "max": lat[-1] if lat else 0,
        },
        # connect() to an established connection as the client's loop saw it (its own lag
        # included), for the connections that ended ok
        "connect_us": {
            "p50": _percentile(connect, 50),
            "p99": _percentile(connect, 99),
            "max": connect[-1] if connect else 0,
        },
        # connect() to the SYN-ACK as the kernel got it (TCP_INFO), the same connections
        "handshake_us": {
            "p50": _percentile(handshake, 50),
            "p99": _percentile(handshake, 99),
            "max": handshake[-1] if handshake else 0,
        },
        "syn_retransmits": total.syn_retransmits,
        "processes": job.processes,
        "concurrency": job.concurrency,
        "bytes_per_connection": job.nbytes,
        "socks5": format_endpoint(*job.proxy) if job.proxy else None,
    }


def _plans(job: Job) -> list[Plan]:
    start = time.monotonic()  # CLOCK_MONOTONIC: the same in every process
    deadline = start + job.timeout
    open_until = None if job.duration is None else start + job.duration
    nonce = random.getrandbits(31)
    rate = None if job.max_mbps is None else job.max_mbps * 1e6 / 8 / job.processes
    plans, first = [], 0
    for i in range(job.processes):
        count = job.connections // job.processes + (i < job.connections % job.processes)
        if count:
            plans.append(Plan(job.family, job.addr, job.mode, job.nbytes, first, count,
                              job.concurrency, deadline, nonce, job.proxy, open_until, rate))
        first += count
    return plans


class _Progress:
    """A one-line progress bar on stderr, only when stderr is a terminal."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.enabled = sys.stderr.isatty()

    def show(self, done: int) -> None:
        if self.enabled and self.total:
            width = 40
            filled = width * done // self.total
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total}")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.total:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _child(plan: Plan, slot: int, done: Any, conn: Connection, parent: int) -> None:
    die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # ^C is the parent's to handle

    def report(n: int) -> None:
        done[slot] = n

    conn.send(run_client(plan, report))
    conn.close()


def run(job: Job) -> dict[str, Any]:
    """Run the whole job and return its JSON summary."""
    plans = _plans(job)
    progress = _Progress(job.connections)
    if len(plans) <= 1:
        report: Callable[[int], None] = progress.show
        inline = [run_client(p, report) for p in plans]
        progress.close()
        return merge(job, inline)
    ctx = multiprocessing.get_context("fork")
    done = ctx.RawArray("q", len(plans))
    readers: dict[Connection, tuple[int, Any]] = {}
    for slot, plan in enumerate(plans):
        reader, writer = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(plan, slot, done, writer, os.getpid()), daemon=True,
                           name=f"flood-client-{slot}")
        proc.start()
        writer.close()
        readers[reader] = (slot, proc)
    parts: list[Outcome] = []
    give_up = plans[0].deadline + _GRACE
    while readers and time.monotonic() < give_up:
        for ready in wait_any(list(readers), timeout=0.2):
            if not isinstance(ready, Connection) or ready not in readers:
                continue
            slot, proc = readers.pop(ready)
            try:
                parts.append(ready.recv())
            except EOFError:  # the process died without an answer
                lost = Outcome(start=time.monotonic(), end=time.monotonic())
                lost.fail("client-died", plans[slot].count)
                parts.append(lost)
            proc.join()
        progress.show(sum(done))
    for slot, proc in readers.values():
        proc.kill()
        proc.join()
        lost = Outcome(start=time.monotonic(), end=time.monotonic())
        lost.fail("timeout", plans[slot].count)
        parts.append(lost)
    progress.close()
    return merge(job, parts)
