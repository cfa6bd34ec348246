/* The fake-IP map: name <-> fake address, for the stack's DNS (dns.c) and the flows and sessions
 * that use its addresses (flows.c, udp.c).
 *
 * One entry per pool address: entry i is the i-th usable address of the IPv4 pool and the i-th of
 * the IPv6 pool, so one name has one address of each family. The entries, a chained hash by name
 * and an LRU list live in a region of memory that may be shared (the supervisor's memfd, after
 * the NAT tables): every stack of a run answers a name with the same address, also after a
 * restart (the map is adopted, tunio_dnsmap_attach). Bounded by the pool's size; when every
 * address is taken, the least recently used one whose name no flow uses and that was not answered
 * within hold_ms (the TTL plus a margin) is given to the new name.
 *
 * Shared by the TUN reader threads (answers) and the loop thread (flows): every call takes the
 * map's lock, which is this process's (only one stack maps the region at a time). */
#ifndef TUNIO_DNSMAP_H
#define TUNIO_DNSMAP_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#define TUNIO_DNSMAP_NAME_MAX 253   /* a name's text, dotted, without the final dot */
#define TUNIO_DNSMAP_MAX (1u << 20) /* entries at most, whatever the pools' sizes */
#define TUNIO_DNSMAP_SCAN 64u       /* entries the recycler looks at from the LRU end */

struct tunio_dnsmap_config {
    /* IPv4 pool: the network (4 bytes) and its prefix length; usable addresses are the host
     * addresses but the first and last, minus the hole [hole_lo, hole_hi) of host offsets (the
     * TUN's own IPv4 prefix when it lies inside the pool). prefix 0: no IPv4 pool. */
    uint8_t net4[4];
    uint8_t len4;
    uint32_t hole_lo, hole_hi;
    /* IPv6 pool: the network (16 bytes) and its prefix length (96..126); offsets in the low 32
     * bits. prefix 0: no IPv6 pool. */
    uint8_t net6[16];
    uint8_t len6;
    uint32_t hold_ms; /* an answered address keeps its name at least this long after the answer */
};

struct tunio_dnsmap;

struct tunio_dnsmap_counters {
    atomic_ullong recycled; /* addresses given to a new name */
    atomic_ullong full;     /* names refused: every address was held (flows, or within hold_ms) */
};

/* Entries the pools give (0: the configuration has no usable pool). */
uint32_t tunio_dnsmap_capacity(const struct tunio_dnsmap_config *cfg);
/* Bytes of the region the map needs (0 without a pool). */
size_t tunio_dnsmap_region_size(const struct tunio_dnsmap_config *cfg);
/* Maps the map onto `region` (zeroed, or one a previous stack of the same configuration left:
 * adopted, its hash and LRU rebuilt from the entries, its flow counts cleared, as no flow outlives
 * its stack; an entry a flow held is kept for hold_ms from `now`). */
int tunio_dnsmap_attach(void *region, size_t len, const struct tunio_dnsmap_config *cfg,
                        uint64_t now, struct tunio_dnsmap **out);
void tunio_dnsmap_free(struct tunio_dnsmap *m); /* the region is left as it is */

/* The address index for `name` (lower case, `len` bytes), taken or recycled if the name has none;
 * the entry is marked answered now. 0, or -ENOSPC when every address is held. */
int tunio_dnsmap_resolve(struct tunio_dnsmap *m, const char *name, size_t len, uint64_t now,
                         uint32_t *index);
/* The address of entry `index` in the family `version` (4: 4 bytes, 6: 16). -EAFNOSUPPORT without
 * that family's pool. */
int tunio_dnsmap_address(const struct tunio_dnsmap *m, uint32_t index, int version,
                         uint8_t out[16]);
/* Whether `addr` is a pool address of family `version` (1, *index set) or not (0). */
int tunio_dnsmap_lookup(const struct tunio_dnsmap *m, int version, const uint8_t addr[16],
                        uint32_t *index);
/* A flow or session begins to the pool address `index`: its name is copied into `name` (a NUL
 * after it) and the entry is held until tunio_dnsmap_release. The name's length, or -ENOENT if no
 * name has that address (the flow is then refused). */
int tunio_dnsmap_acquire(struct tunio_dnsmap *m, uint32_t index, uint64_t now, char *name,
                         size_t cap);
void tunio_dnsmap_release(struct tunio_dnsmap *m, uint32_t index, uint64_t now);
/* The name of entry `index`, as acquire gives it, without holding it (for a flow that holds it
 * already). Its length, or -ENOENT. */
int tunio_dnsmap_name(struct tunio_dnsmap *m, uint32_t index, char *name, size_t cap);
/* Names mapped now, and the counters. */
uint32_t tunio_dnsmap_entries(struct tunio_dnsmap *m);
const struct tunio_dnsmap_counters *tunio_dnsmap_counters(const struct tunio_dnsmap *m);

#endif
