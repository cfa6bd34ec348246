/* Defaults and limits that the C stack and the Python side share: the one place they are written.
 * tunio/_build.py hands every #define here to cffi, and tunio/defaults.py reads them from the
 * built module, so Python's option defaults and checks can never drift from what the stack does.
 * Plain integer literals only: cffi takes each value from the compiler. */
#ifndef TUNIO_DEFAULTS_H
#define TUNIO_DEFAULTS_H

/* Credit window per flow and direction, bytes (protocol.md: OPEN's and OPEN_OK's arg). */
#define TUNIO_DEFAULT_WINDOW 1048576
/* DATA bytes a worker may have sent to it and not yet credited back, all its flows together: past
 * it the stack reads no more from those apps until credit comes. Every message to a worker queues
 * behind what it has not handled yet, a new flow's OPEN too: this bounds how long a dial waits in
 * that queue (and what the queue holds), where the windows alone let 5,000 flows queue gigabytes.
 * Sixteen full windows, so a few fast flows still reach their own window's speed. */
#define TUNIO_DEFAULT_WORKER_BACKLOG 16777216
/* Bytes read from a socket per DATA, on both sides: half the default window, two in flight. */
#define TUNIO_READ_CHUNK 524288
/* A held SYN waits this long for its dial's outcome, ms (more than the default dial timeout). */
#define TUNIO_DEFAULT_PENDING_MS 15000
/* A NAT slot stays reserved this long after its flow ends, ms (the listener's TIME_WAIT). */
#define TUNIO_DEFAULT_RESERVE_MS 60000
/* Heartbeat interval, ms; a peer silent for TUNIO_LIVENESS intervals is dead. */
#define TUNIO_DEFAULT_HEARTBEAT_MS 1000
#define TUNIO_LIVENESS 3
/* A UDP session idle this long is ended, ms. */
#define TUNIO_DEFAULT_UDP_TIMEOUT_MS 60000
/* DGRAMs a side may have in flight per datagram session (protocol.md). */
#define TUNIO_UDP_CREDIT 256
/* Bytes of DGRAMs the stack may have in flight to one datagram session's worker, not yet credited
 * back: past it the session's datagrams are dropped (counted), though one always goes when none
 * is in flight. The credit alone lets 256 reassembled 64 KiB datagrams, 16 MiB, queue for one
 * session; this is sixteen of those, and 256 datagrams of the TUN's 1,500-byte MTU still fit, so
 * only large datagrams ever meet it. The workers' own bound is --worker-backlog. */
#define TUNIO_UDP_SESSION_BYTES 1048576
/* What a DGRAM costs in the worker's queue beyond its payload frame (address block and datagram),
 * bytes, counted with it against the bounds above: its header frame, ZeroMQ's two message slots
 * and the payload's content record, rounded up. Without it a flood of tiny datagrams would hold
 * several times the bound. */
#define TUNIO_UDP_DGRAM_OVERHEAD 256
/* After this long without flows (TCP flows and UDP sessions), ms, the stack and each worker give
 * their freed heap back to the system, once until flows come back (malloc_trim). */
#define TUNIO_DEFAULT_TRIM_IDLE_MS 10000
/* fake-ip: a DNS-over-TCP connection of the stack's with no query unanswered and no byte either
 * way this long is closed, ms. RFC 7766 §6.2.3 has servers close idle connections, after at least
 * a few seconds: a stub that reuses its connection for a burst of lookups keeps it, one that
 * opened it and went quiet does not hold a flow for good. */
#define TUNIO_DEFAULT_DNS_TCP_IDLE_MS 10000
/* NAT pool addresses taken from the top of each TUN prefix. */
#define TUNIO_DEFAULT_POOL 16
/* Flows (TCP and UDP) at once, and new TCP flows whose dial runs (their SYN held): past these
 * a new flow is refused. Enough for a busy gateway, bounded for a small machine. */
#define TUNIO_DEFAULT_MAX_FLOWS 65536
#define TUNIO_DEFAULT_MAX_PENDING 8192
/* The TUN readers' nice value (reader.c): ahead of the workers and the apps, as packet
 * processing is in the kernel. */
#define TUNIO_READER_NICE -10
/* Packets each TUN queue holds for its reader (the device's txqueuelen): past it the kernel drops.
 * Thousands of flows keep tens of thousands of segments in flight; a drop costs the flow a
 * retransmit, a lost SYN-ACK a second, where a longer queue costs a few milliseconds. */
#define TUNIO_DEFAULT_TXQUEUELEN 50000
/* Messages the stack holds for one worker that has not read them yet. Credit bounds what flows
 * send (--window, --worker-backlog); this bounds the rest (answers to a worker's own messages,
 * such as the RST for each DATA of an unknown flow), so that a worker that sends but never reads
 * cannot grow the stack's memory: past it the worker is taken for lost and its flows reset. A
 * live worker reads this many in well under a second. */
#define TUNIO_LINK_QUEUE_MAX 262144
/* TUN queues (one reader thread each) and workers the stack can hold. */
#define TUNIO_MAX_QUEUES 64
#define TUNIO_MAX_WORKERS 256

#endif
