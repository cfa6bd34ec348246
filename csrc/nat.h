/* The NAT table that bounces app flows into the kernel's own TCP.
 *
 * An app packet S:s -> D:d read from the TUN is rewritten to F:p -> A:L, where A:L is the stack's
 * listener and F:p a (pool address, port) slot that names the flow; the listener's replies
 * A:L -> F:p are rewritten back to D:d -> S:s. A new flow's SYN is held until a worker has dialled
 * D:d, so the app sees the real outcome of the connect.
 *
 * Shared by the TUN reader threads and the loop thread: every call takes the table's lock. The
 * table itself lives in a region of memory that may be shared (the supervisor's memfd): a stack
 * killed without warning leaves it to the next one, which adopts its flows (tunio_nat_attach). */
#ifndef TUNIO_NAT_H
#define TUNIO_NAT_H

#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "packet.h"

#define TUNIO_NAT_POOL_MAX 64
#define TUNIO_NAT_PORT_MIN 1024u
#define TUNIO_NAT_PORTS (65536u - TUNIO_NAT_PORT_MIN)

struct tunio_nat_config {
    uint8_t version;         /* 4 or 6: one table per address family; 0: a family not carried */
    uint8_t listen_addr[16]; /* A */
    uint16_t listen_port;    /* L */
    uint8_t pool_base[16];   /* first pool address; the pool is pool_count consecutive ones */
    unsigned pool_count;
    uint32_t pending_ms; /* a held SYN whose dial has no answer after this is dropped */
    uint32_t reserve_ms; /* a slot stays unused this long after its flow ended (TIME_WAIT) */
    uint32_t silent_ms;  /* a flow whose dial timed out keeps dropping SYNs this long */
};

/* Admission: one budget per stack, shared by both tables and the UDP sessions (udp.c). A TCP flow
 * counts from its SYN (held: pending) until it is closed; past a limit a new flow is refused at
 * once. The counters are atomic: the readers and the loop thread take and give back; statistics
 * read them from any thread. */
struct tunio_nat_limits {
    uint32_t max_flows;   /* TCP flows + UDP sessions at once; 0: no limit */
    uint32_t max_pending; /* held SYNs at once; 0: no limit. One destination address holds at
                             most a quarter of them (at least 1), so a host that never answers
                             cannot take them all */
    atomic_uint flows;
    atomic_uint pending;
    atomic_uint pending_peak;
    atomic_ullong refused_max_flows;
    atomic_ullong refused_max_pending;
    atomic_ullong deferred_pending_share;
};

/* Takes one flow of the budget: 0, or -ENOSPC (counted as refused_max_flows) past max_flows. */
int tunio_nat_take_flow(struct tunio_nat_limits *l);
void tunio_nat_put_flow(struct tunio_nat_limits *l);

/* What the reader does with a packet after tunio_nat_translate. */
enum tunio_nat_verdict {
    TUNIO_NAT_DROP = 0, /* counted, nothing written */
    TUNIO_NAT_FORWARD,  /* rewritten in place: write `out_len` bytes of the buffer back */
    TUNIO_NAT_REPLY,    /* answer built in `reply`: write it */
    TUNIO_NAT_OPEN,     /* a new flow: SYN held, `open` describes it for a worker */
};

/* A new flow, from the reader thread to the loop thread. */
struct tunio_nat_open {
    uint32_t flow_id;
    uint32_t entry;
    uint8_t proto;
    uint8_t version;
    uint16_t sport;
    uint16_t dport;
    uint8_t src[16];
    uint8_t dst[16];
};

struct tunio_nat_counters {
    atomic_ullong translated_in;  /* app -> listener */
    atomic_ullong translated_out; /* listener -> app */
    atomic_ullong rst_to_app;     /* of those, RSTs: how a stop knows its resets went out */
    atomic_ullong syn_held;
    atomic_ullong rst_sent;      /* RST for packets of unknown flows (and SYNs while stopping) */
    atomic_ullong drop_reserved; /* app traffic to A or to the pool */
    atomic_ullong drop_unknown;  /* listener packets for no slot, retransmitted held SYNs */
    atomic_ullong table_full;
};

struct tunio_nat_entry;
struct nat_table_header;
struct tunio_nat_held;

#define TUNIO_NAT_DST_BUCKETS 1024u /* held SYNs per destination address, hashed */

/* One address family's table. Its entries, hash buckets, slot map and bookkeeping live in the
 * region it was attached to (tunio_nat_attach), as indices: a region may outlive the process, and
 * the next stack adopts it. The lock, the held SYNs and the admission state are this process's. */
struct tunio_nat {
    pthread_mutex_t lock;
    struct tunio_nat_config cfg;
    size_t low_off;               /* where the address's low 32 bits are: 0 for IPv4, 12 for IPv6 */
    uint32_t pool_low;            /* low 32 bits of the first pool address, host order */
    struct nat_table_header *hdr; /* in the region: capacity, used, free list, live, cursor */
    struct tunio_nat_entry *entries; /* in the region */
    uint32_t *buckets;           /* in the region: forward hash, app tuple -> 1-based entry index */
    uint32_t *slots;             /* in the region: (pool index, port) -> 1-based entry index */
    struct tunio_nat_held *held; /* per entry: the app's first SYN while held (process-local) */
    atomic_uint *next_flow_id;   /* in the region: one id space per stack, UDP included */
    struct tunio_nat_limits *limits;
    /* a share of --max-pending (up to 2^24 / 4) per bucket: wider than 16 bits */
    uint32_t dst_pending[TUNIO_NAT_DST_BUCKETS];
    int refuse_new;   /* the stack stops: a new flow's SYN gets a RST */
    uint32_t adopted; /* entries this table took over from a region's previous stack */
    struct tunio_nat_counters n;
};

/* ---- the region ----
 * Layout: a header (magic, layout hash, the flow-id counter, one table header per family: its
 * config's hash, its listener port, its bookkeeping and the offsets of its arrays), then for each
 * family carried its entries, its hash buckets and its slot map. The region is either all zero
 * (a new memfd, a calloc'd block) or one that tunio_nat_attach wrote. Only one process may have it
 * attached at a time. */

/* Bytes a region needs for the tables of cfg[0] (IPv4) and cfg[1] (IPv6); a config of version 0
 * is a family not carried. Listen ports and timeouts do not change it. */
size_t tunio_nat_region_size_of(const struct tunio_nat_config cfg[2]);
/* The listener port the table for cfg[i] was made with, if the region holds one of the same layout
 * (else 0): a new stack binds its listener there, so the old flows' packets still reach it. */
void tunio_nat_region_ports(const void *region, size_t len, const struct tunio_nat_config cfg[2],
                            uint16_t ports[2]);
/* Attaches nat[i] (NULL where cfg[i].version is 0) to the region. A table of the same layout and
 * listener port is adopted: PENDING entries are released (their SYN was the dead process's; the
 * app's retransmit opens a fresh flow), OPEN entries become CLOSED as of `now` (still translating,
 * slot reserved for reserve_ms), the hash, the slot map and the free list are rebuilt from the
 * entries. Any other table is initialised. */
int tunio_nat_attach(void *region, size_t len, const struct tunio_nat_config cfg[2],
                     struct tunio_nat *nat[2], struct tunio_nat_limits *limits, uint64_t now);
/* The region's flow-id counter (after attach). */
atomic_uint *tunio_nat_region_ids(void *region);
/* A fresh flow id (never 0) from the shared counter. */
uint32_t tunio_nat_next_id(atomic_uint *counter);
/* Frees what is this process's; the region is left as it is. */
void tunio_nat_fini(struct tunio_nat *nat);

/* Reader path: classifies and rewrites one packet read from the TUN (parsed ok, TCP, of the
 * table's address family). */
enum tunio_nat_verdict tunio_nat_translate(struct tunio_nat *nat, struct tunio_pkt *p, uint64_t now,
                                           uint8_t *reply, size_t reply_cap, size_t *reply_len,
                                           struct tunio_nat_open *open);

/* The worker dialled: rewrite the held SYN into `out` for injection. -ENOENT if the flow is gone. */
int tunio_nat_release(struct tunio_nat *nat, uint32_t entry, uint32_t flow_id, uint64_t now,
                      uint8_t *out, size_t cap, size_t *len);
/* The dial failed with `err`: build the answer a direct connect would have got (RST, ICMP, or
 * nothing for ETIMEDOUT; *len = 0 then) and retire the entry. */
int tunio_nat_reject(struct tunio_nat *nat, uint32_t entry, uint32_t flow_id, int err, uint64_t now,
                     uint8_t *out, size_t cap, size_t *len);
/* A held flow's tuple, to open it again on another worker: -ENOENT unless it is still held. */
int tunio_nat_describe(struct tunio_nat *nat, uint32_t entry, uint32_t flow_id,
                       struct tunio_nat_open *out);
/* 1 if `addr` is the table's own: the listener's address A or one of its pool's F. */
int tunio_nat_owns(const struct tunio_nat *nat, const uint8_t addr[16]);
/* Accept path: which flow does the listener's peer F:p belong to? */
int tunio_nat_lookup_slot(struct tunio_nat *nat, const uint8_t addr[16], uint16_t port,
                          uint32_t *entry, uint32_t *flow_id);
/* The flow ended: keep translating its last segments, reserve the slot for reserve_ms. */
void tunio_nat_close(struct tunio_nat *nat, uint32_t entry, uint32_t flow_id, uint64_t now);
/* Expires entries. Held SYNs that waited past pending_ms become silent; their flow ids are written
 * to `expired` (up to cap) so the loop can drop those flows. Returns the number written. */
size_t tunio_nat_sweep(struct tunio_nat *nat, uint64_t now, uint32_t *expired, size_t cap);
/* From now on a SYN of a new flow is answered with a RST (the stack stops). */
void tunio_nat_refuse_new(struct tunio_nat *nat);
/* Up to `cap` held flows (entry and flow id), to answer them all when the stack stops. */
size_t tunio_nat_held(struct tunio_nat *nat, uint32_t *entries, uint32_t *ids, size_t cap);
uint32_t tunio_nat_live(struct tunio_nat *nat);
/* The ICMP (version 4) or ICMPv6 unreachable code that makes Linux report `err` to the app, or -1
 * when there is none (a TCP refusal is a RST, not ICMP). */
int tunio_nat_icmp_code(int version, int err);

#endif
