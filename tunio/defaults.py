"""Every default and limit of tunio's options, in one place.

What the C stack also knows (the window, timeouts, protocol limits, how many queues and workers
it holds) is read from the stack's own header, csrc/defaults.h, through the built extension: the
two sides cannot disagree. The rest are the Python side's own.
"""

from __future__ import annotations

from tunio._stack import lib

# ---- shared with the C stack (csrc/defaults.h)
WINDOW: int = lib.TUNIO_DEFAULT_WINDOW  # credit window per flow and direction, bytes
READ_CHUNK: int = lib.TUNIO_READ_CHUNK  # bytes read from a socket per DATA
PENDING_TIMEOUT: float = lib.TUNIO_DEFAULT_PENDING_MS / 1000  # a held SYN's wait for its dial, s
RESERVE_TIMEOUT: float = lib.TUNIO_DEFAULT_RESERVE_MS / 1000  # a NAT slot's rest after its flow, s
HEARTBEAT: float = lib.TUNIO_DEFAULT_HEARTBEAT_MS / 1000  # seconds between heartbeats
LIVENESS: int = lib.TUNIO_LIVENESS  # heartbeats of silence after which a peer is dead
UDP_TIMEOUT: float = lib.TUNIO_DEFAULT_UDP_TIMEOUT_MS / 1000  # an idle UDP session's end, s
UDP_CREDIT: int = lib.TUNIO_UDP_CREDIT  # DGRAMs in flight per session and direction
MAX_FLOWS: int = lib.TUNIO_DEFAULT_MAX_FLOWS  # TCP flows and UDP sessions at once
MAX_PENDING: int = lib.TUNIO_DEFAULT_MAX_PENDING  # TCP flows whose dial runs, at once
TRIM_IDLE: float = lib.TUNIO_DEFAULT_TRIM_IDLE_MS / 1000  # no flows this long: heap trimmed, s
DNS_TCP_IDLE: float = lib.TUNIO_DEFAULT_DNS_TCP_IDLE_MS / 1000  # an idle DNS-over-TCP's end, s
MAX_QUEUES: int = lib.TUNIO_MAX_QUEUES  # TUN queues the stack reads
MAX_WORKERS: int = lib.TUNIO_MAX_WORKERS  # workers the stack holds at once

# ---- the Python side's own
TUN = "tunio0"
ADDRESS = "198.18.0.1/24"
MTU = 1500
WORKER_BACKLOG: int = lib.TUNIO_DEFAULT_WORKER_BACKLOG  # DATA bytes a worker may leave uncredited
TXQUEUELEN: int = lib.TUNIO_DEFAULT_TXQUEUELEN  # packets a TUN queue holds for its reader
CONNECT_TIMEOUT = 10.0  # a worker gives up dialing after this, s
# TCP keepalive of both ends of a flow (the app's side in the stack, the destination's in the
# worker), "IDLE,INTERVAL,COUNT" seconds/probes: a peer that vanished without a word is found
# within IDLE + INTERVAL x COUNT (4 minutes) and its flow reset.
Keepalive = tuple[int, int, int]  # (idle s, interval s, probes), as --tcp-keepalive gives it
TCP_KEEPALIVE_PROBES: Keepalive = (120, 30, 4)
TCP_KEEPALIVE = ",".join(str(n) for n in TCP_KEEPALIVE_PROBES)
DRAIN_TIMEOUT = 300.0  # after a reload, the old workers' flows may run this long, s
# A stack or worker that shows no sign of life this long (s) is taken for hung and killed (its
# restart is the crash path's): several times the stack's own liveness for a worker, so that
# the stack has reset a hung worker's flows long before.
HANG_TIMEOUT = 10.0
LOG_LEVEL = "info"
LOG_FORMAT = "text"
# fake-IP DNS (--dns fake-ip): the pools, the TTL of its answers, how long past the TTL an
# answered address keeps its name
DNS_POOL = "198.18.0.0/15"
DNS_POOL6 = "fd00:7475:6e69:6f00::/96"  # a /96 of a ULA: 2^32 addresses, as many as IPv4 has
DNS_TTL = 10  # seconds
DNS_HOLD = 10.0  # seconds

#: upper bounds of the dial-time histogram of the metrics, seconds (a local dial takes ~100 µs, a
#: proxy's ~1 ms, a far one ~100 ms; the last buckets catch dials that wait for their timeout)
DIAL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0)  # fmt: skip
