/* The NAT table that bounces app flows into the kernel's own TCP.
 *
 * An app packet S:s -> D:d read from the TUN is rewritten to F:p -> A:L, where A:L is the stack's
 * listener and F:p a (pool address, port) slot that names the flow; the listener's replies
 * A:L -> F:p are rewritten back to D:d -> S:s. A new flow's SYN is held until a worker has dialled
 * D:d, so the app sees the real outcome of the connect.
 *
 * Shared by the TUN reader threads and the loop thread: every call takes the table's lock. */
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
    uint8_t version;         /* 4 or 6: one table per address family */
    uint8_t listen_addr[16]; /* A */
    uint16_t listen_port;    /* L */
    uint8_t pool_base[16];   /* first pool address; the pool is pool_count consecutive ones */
    unsigned pool_count;
    uint32_t pending_ms; /* a held SYN whose dial has no answer after this is dropped */
    uint32_t reserve_ms; /* a slot stays unused this long after its flow ended (TIME_WAIT) */
    uint32_t silent_ms;  /* a flow whose dial timed out keeps dropping SYNs this long */
};

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
    atomic_ullong syn_held;
    atomic_ullong rst_sent;      /* RST for packets of unknown flows */
    atomic_ullong drop_reserved; /* app traffic to A or to the pool */
    atomic_ullong drop_unknown;  /* listener packets for no slot, retransmitted held SYNs */
    atomic_ullong table_full;
};

struct tunio_nat_entry;

struct tunio_nat {
    pthread_mutex_t lock;
    struct tunio_nat_config cfg;
    size_t low_off;    /* where the address's low 32 bits are: 0 for IPv4, 12 for IPv6 */
    uint32_t pool_low; /* low 32 bits of the first pool address, host order */
    struct tunio_nat_entry *entries;
    uint32_t capacity;  /* entries the table can hold (= slots) */
    uint32_t used;      /* high-water mark of entries handed out */
    uint32_t free_head; /* 1-based index of a free entry, 0 = none */
    uint32_t live;      /* entries not free */
    uint32_t *buckets;  /* forward hash: app tuple -> 1-based entry index */
    uint32_t bucket_mask;
    uint32_t *slots;           /* reverse map: (pool index, port) -> 1-based entry index */
    uint32_t cursor;           /* round-robin position in the slot space */
    atomic_uint *next_flow_id; /* shared by every table and by UDP: one id space per stack */
    struct tunio_nat_counters n;
};

int tunio_nat_init(struct tunio_nat *nat, const struct tunio_nat_config *cfg,
                   atomic_uint *next_flow_id);
/* A fresh flow id (never 0) from the shared counter. */
uint32_t tunio_nat_next_id(atomic_uint *counter);
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
/* Accept path: which flow does the listener's peer F:p belong to? */
int tunio_nat_lookup_slot(struct tunio_nat *nat, const uint8_t addr[16], uint16_t port,
                          uint32_t *entry, uint32_t *flow_id);
/* The flow ended: keep translating its last segments, reserve the slot for reserve_ms. */
void tunio_nat_close(struct tunio_nat *nat, uint32_t entry, uint32_t flow_id, uint64_t now);
/* Expires entries. Held SYNs that waited past pending_ms become silent; their flow ids are written
 * to `expired` (up to cap) so the loop can drop those flows. Returns the number written. */
size_t tunio_nat_sweep(struct tunio_nat *nat, uint64_t now, uint32_t *expired, size_t cap);
uint32_t tunio_nat_live(struct tunio_nat *nat);
/* The ICMP (version 4) or ICMPv6 unreachable code that makes Linux report `err` to the app, or -1
 * when there is none (a TCP refusal is a RST, not ICMP). */
int tunio_nat_icmp_code(int version, int err);

#endif
