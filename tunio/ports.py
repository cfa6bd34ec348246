"""Why a worker has no local port left for a new connection, in words an operator can act on.

When apps close first, the worker is the side that closes first toward the destination, so its
network namespace collects the TIME_WAIT sockets of every short connection tunio carries. At a
few thousand connections per second they fill the ephemeral port range: connect() first gets
slow (the kernel searches the range for a free port), then fails with EADDRNOTAVAIL. The fix is
host policy, so the worker says which knobs and what they are set to.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

PROC = Path("/proc")
#: how long Linux keeps a closed connection's port in TIME_WAIT (TCP_TIMEWAIT_LEN, not tunable)
TIME_WAIT_SECONDS = 60


def port_range(proc: Path = PROC) -> tuple[int, int] | None:
    """net.ipv4.ip_local_port_range (which IPv6 shares), or None if unreadable."""
    with contextlib.suppress(OSError, ValueError):
        low, high = (proc / "sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    return None


def tw_reuse(proc: Path = PROC) -> int | None:
    """net.ipv4.tcp_tw_reuse: 0 off, 1 on, 2 loopback only (the kernel's default)."""
    with contextlib.suppress(OSError, ValueError):
        return int((proc / "sys/net/ipv4/tcp_tw_reuse").read_text())
    return None


def time_wait_sockets(proc: Path = PROC) -> int | None:
    """TCP sockets in TIME_WAIT in this network namespace, both families (/proc/net/sockstat:
    "TCP: inuse 5 orphan 0 tw 3 alloc 7 mem 1")."""
    with contextlib.suppress(OSError):
        for line in (proc / "net/sockstat").read_text().splitlines():
            if line.startswith("TCP:"):
                fields = line.split()[1:]
                counts = dict(zip(fields[::2], fields[1::2], strict=False))
                with contextlib.suppress(KeyError, ValueError):
                    return int(counts["tw"])
    return None


def no_port_hint(proc: Path = PROC) -> str:
    """One log line: what filled the ports and which settings to change."""
    parts = ["no local port free for a new outgoing connection (EADDRNOTAVAIL)"]
    tw = time_wait_sockets(proc)
    if tw is not None:
        parts.append(f"{tw} sockets in TIME_WAIT")
    span = port_range(proc)
    if span is not None:
        parts.append(f"net.ipv4.ip_local_port_range {span[0]}-{span[1]} "
                     f"({span[1] - span[0] + 1} ports)")  # fmt: skip
    reuse = tw_reuse(proc)
    if reuse is not None:
        parts.append(f"net.ipv4.tcp_tw_reuse={reuse}")
    advice = ("set net.ipv4.tcp_tw_reuse=1 or widen net.ipv4.ip_local_port_range "
              "in the workers' network namespace")  # fmt: skip
    return "; ".join(parts) + ": " + advice


def one_proxy_note(proc: Path = PROC) -> str | None:
    """One log line for a run whose every dial goes to one proxy (one address and port), or
    None when TIME_WAIT reuse is on or the settings are unreadable: without reuse, a port stays
    unusable towards that proxy for TIME_WAIT_SECONDS after each connection, which caps the new
    connections a second the port range sustains, and slows connect() well before the cap."""
    reuse, span = tw_reuse(proc), port_range(proc)
    if reuse is None or reuse == 1 or span is None:
        return None
    count = span[1] - span[0] + 1
    return (f"every dial goes to one proxy: with net.ipv4.tcp_tw_reuse={reuse}, each of the "
            f"{count} ports of net.ipv4.ip_local_port_range waits {TIME_WAIT_SECONDS} s in "
            f"TIME_WAIT after a connection, about {count // TIME_WAIT_SECONDS} new connections a "
            "second for good (connect() slows down before); set net.ipv4.tcp_tw_reuse=1 in the "
            "workers' network namespace for more")  # fmt: skip
