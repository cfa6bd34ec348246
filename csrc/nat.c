/* NAT table: entries in one array (grown lazily: untouched pages cost no memory), a chained hash
 * from the app's tuple, and a direct reverse map from the (pool address, port) slot. */
#include "nat.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

enum entry_state {
    ENTRY_FREE = 0,
    ENTRY_PENDING, /* SYN held, waiting for the worker's dial */
    ENTRY_OPEN,    /* SYN released: translating */
    ENTRY_SILENT,  /* dial timed out: SYN retransmits are dropped, as a black hole would */
    ENTRY_CLOSED,  /* flow over: still translating stragglers, slot reserved */
};

struct tunio_nat_entry {
    uint8_t src[16];
    uint8_t dst[16];
    uint16_t sport;
    uint16_t dport;
    uint16_t port;      /* fake source port p */
    uint8_t pool_index; /* fake source address F */
    uint8_t state;
    uint8_t hashed; /* on a forward hash chain */
    uint32_t flow_id;
    uint32_t hnext; /* 1-based next on the hash chain, or next free */
    uint64_t last_ms;
    uint8_t *held; /* the app's first SYN, as read */
    uint16_t held_len;
};

/* The pool is consecutive in the low 32 bits of the address (bytes 0-3 of an IPv4 address as
 * stored here, bytes 12-15 of an IPv6 one). */
static uint32_t low32(const uint8_t *a)
{
    return (uint32_t)a[0] << 24 | (uint32_t)a[1] << 16 | (uint32_t)a[2] << 8 | a[3];
}

static void set_low32(uint8_t *a, uint32_t v)
{
    a[0] = (uint8_t)(v >> 24);
    a[1] = (uint8_t)(v >> 16);
    a[2] = (uint8_t)(v >> 8);
    a[3] = (uint8_t)v;
}

uint32_t tunio_nat_next_id(atomic_uint *counter)
{
    uint32_t id = atomic_fetch_add(counter, 1);
    return id ? id : atomic_fetch_add(counter, 1); /* 0 is not a flow id; the counter wrapped */
}

static uint32_t tuple_hash(const uint8_t src[16], uint16_t sport, const uint8_t dst[16],
                           uint16_t dport)
{
    /* FNV-1a over the tuple, then a final mix so low bits depend on every input byte. */
    uint32_t h = 2166136261u;
    for (int i = 0; i < 16; i++)
        h = (h ^ src[i]) * 16777619u;
    for (int i = 0; i < 16; i++)
        h = (h ^ dst[i]) * 16777619u;
    h = (h ^ sport) * 16777619u;
    h = (h ^ dport) * 16777619u;
    h ^= h >> 16;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    return h;
}

int tunio_nat_init(struct tunio_nat *nat, const struct tunio_nat_config *cfg,
                   atomic_uint *next_flow_id)
{
    memset(nat, 0, sizeof(*nat));
    if (cfg->pool_count == 0 || cfg->pool_count > TUNIO_NAT_POOL_MAX ||
        (cfg->version != 4 && cfg->version != 6))
        return -EINVAL;
    nat->cfg = *cfg;
    nat->next_flow_id = next_flow_id;
    nat->low_off = cfg->version == 4 ? 0 : 12;
    nat->pool_low = low32(cfg->pool_base + nat->low_off);
    nat->capacity = cfg->pool_count * TUNIO_NAT_PORTS;
    uint32_t nb = 1;
    while (nb < nat->capacity / 4)
        nb <<= 1;
    nat->bucket_mask = nb - 1;
    /* calloc of large sizes maps zero pages: memory is spent only on slots actually used. */
    nat->entries = calloc(nat->capacity, sizeof(*nat->entries));
    nat->buckets = calloc(nb, sizeof(*nat->buckets));
    nat->slots = calloc((size_t)cfg->pool_count * 65536u, sizeof(*nat->slots));
    int err = -ENOMEM;
    if (!nat->entries || !nat->buckets || !nat->slots)
        goto fail;
    err = -pthread_mutex_init(&nat->lock, NULL);
    if (err)
        goto fail;
    return 0;
fail:
    free(nat->entries);
    free(nat->buckets);
    free(nat->slots);
    memset(nat, 0, sizeof(*nat));
    return err;
}

void tunio_nat_fini(struct tunio_nat *nat)
{
    if (!nat->entries)
        return;
    for (uint32_t i = 0; i < nat->used; i++)
        free(nat->entries[i].held);
    free(nat->entries);
    free(nat->buckets);
    free(nat->slots);
    pthread_mutex_destroy(&nat->lock);
    memset(nat, 0, sizeof(*nat));
}

static struct tunio_nat_entry *entry_at(struct tunio_nat *nat, uint32_t idx1)
{
    return idx1 ? &nat->entries[idx1 - 1] : NULL;
}

static uint32_t *bucket_of(struct tunio_nat *nat, const struct tunio_nat_entry *e)
{
    return &nat->buckets[tuple_hash(e->src, e->sport, e->dst, e->dport) & nat->bucket_mask];
}

static uint32_t find_forward(struct tunio_nat *nat, const struct tunio_pkt *p)
{
    uint32_t idx = nat->buckets[tuple_hash(p->src, p->sport, p->dst, p->dport) & nat->bucket_mask];
    while (idx) {
        struct tunio_nat_entry *e = entry_at(nat, idx);
        if (e->sport == p->sport && e->dport == p->dport && !memcmp(e->src, p->src, 16) &&
            !memcmp(e->dst, p->dst, 16))
            return idx;
        idx = e->hnext;
    }
    return 0;
}

static void unhash(struct tunio_nat *nat, uint32_t idx)
{
    struct tunio_nat_entry *e = entry_at(nat, idx);
    if (!e->hashed)
        return;
    uint32_t *link = bucket_of(nat, e);
    while (*link && *link != idx)
        link = &entry_at(nat, *link)->hnext;
    if (*link)
        *link = e->hnext;
    e->hnext = 0;
    e->hashed = 0;
}

static uint32_t slot_of(const struct tunio_nat_entry *e)
{
    return (uint32_t)e->pool_index * 65536u + e->port;
}

static void release_entry(struct tunio_nat *nat, uint32_t idx)
{
    struct tunio_nat_entry *e = entry_at(nat, idx);
    unhash(nat, idx);
    nat->slots[slot_of(e)] = 0;
    free(e->held);
    memset(e, 0, sizeof(*e));
    e->hnext = nat->free_head;
    nat->free_head = idx;
    nat->live--;
}

/* Round-robin over the slot space, so a just-freed port is the last to be used again. */
static int take_slot(struct tunio_nat *nat, uint8_t *pool_index, uint16_t *port)
{
    for (uint32_t tries = 0; tries < nat->capacity; tries++) {
        uint32_t i = nat->cursor++ % nat->capacity;
        uint32_t pi = i % nat->cfg.pool_count;
        uint32_t pt = TUNIO_NAT_PORT_MIN + i / nat->cfg.pool_count;
        if (!nat->slots[pi * 65536u + pt]) {
            *pool_index = (uint8_t)pi;
            *port = (uint16_t)pt;
            return 0;
        }
    }
    return -ENOSPC;
}

static uint32_t new_entry(struct tunio_nat *nat, const struct tunio_pkt *p, uint64_t now)
{
    uint8_t pool_index;
    uint16_t port;
    if (take_slot(nat, &pool_index, &port) < 0)
        return 0;
    uint8_t *held = malloc(p->len);
    if (!held)
        return 0;
    uint32_t idx;
    if (nat->free_head) {
        idx = nat->free_head;
        nat->free_head = entry_at(nat, idx)->hnext;
    } else if (nat->used < nat->capacity) {
        idx = ++nat->used;
    } else {
        free(held);
        return 0;
    }
    struct tunio_nat_entry *e = entry_at(nat, idx);
    memset(e, 0, sizeof(*e));
    memcpy(e->src, p->src, 16);
    memcpy(e->dst, p->dst, 16);
    e->sport = p->sport;
    e->dport = p->dport;
    e->pool_index = pool_index;
    e->port = port;
    e->state = ENTRY_PENDING;
    e->last_ms = now;
    e->flow_id = tunio_nat_next_id(nat->next_flow_id);
    memcpy(held, p->buf, p->len);
    e->held = held;
    e->held_len = (uint16_t)p->len;
    uint32_t *b = bucket_of(nat, e);
    e->hnext = *b;
    *b = idx;
    e->hashed = 1;
    nat->slots[slot_of(e)] = idx;
    nat->live++;
    return idx;
}

static void pool_addr(const struct tunio_nat *nat, uint8_t index, uint8_t out[16])
{
    memcpy(out, nat->cfg.pool_base, 16);
    set_low32(out + nat->low_off, nat->pool_low + index);
}

static void to_listener(struct tunio_nat *nat, const struct tunio_nat_entry *e, struct tunio_pkt *p)
{
    uint8_t fake[16];
    pool_addr(nat, e->pool_index, fake);
    tunio_pkt_rewrite(p, fake, e->port, nat->cfg.listen_addr, nat->cfg.listen_port);
}

static int in_pool(const struct tunio_nat *nat, const uint8_t a[16], uint8_t *index)
{
    size_t lo = nat->low_off;
    /* Every byte but the low 32 bits must be the pool's. */
    if (memcmp(a, nat->cfg.pool_base, lo) ||
        memcmp(a + lo + 4, nat->cfg.pool_base + lo + 4, 16 - lo - 4))
        return 0;
    uint32_t off = low32(a + lo) - nat->pool_low;
    if (off >= nat->cfg.pool_count)
        return 0;
    *index = (uint8_t)off;
    return 1;
}

static enum tunio_nat_verdict from_listener(struct tunio_nat *nat, struct tunio_pkt *p,
                                            uint64_t now, uint8_t pool_index)
{
    struct tunio_nat_entry *e = entry_at(nat, nat->slots[(uint32_t)pool_index * 65536u + p->dport]);
    if (!e || e->state == ENTRY_PENDING || e->state == ENTRY_SILENT) {
        atomic_fetch_add_explicit(&nat->n.drop_unknown, 1, memory_order_relaxed);
        return TUNIO_NAT_DROP;
    }
    e->last_ms = now;
    tunio_pkt_rewrite(p, e->dst, e->dport, e->src, e->sport);
    atomic_fetch_add_explicit(&nat->n.translated_out, 1, memory_order_relaxed);
    return TUNIO_NAT_FORWARD;
}

static enum tunio_nat_verdict answer_unknown(struct tunio_nat *nat, const struct tunio_pkt *p,
                                             uint8_t *reply, size_t cap, size_t *reply_len)
{
    *reply_len = tunio_pkt_build_rst(p, reply, cap);
    if (!*reply_len) {
        atomic_fetch_add_explicit(&nat->n.drop_unknown, 1, memory_order_relaxed);
        return TUNIO_NAT_DROP;
    }
    atomic_fetch_add_explicit(&nat->n.rst_sent, 1, memory_order_relaxed);
    return TUNIO_NAT_REPLY;
}

static enum tunio_nat_verdict from_app(struct tunio_nat *nat, struct tunio_pkt *p, uint64_t now,
                                       uint8_t *reply, size_t cap, size_t *reply_len,
                                       struct tunio_nat_open *open)
{
    int syn = (p->tcp_flags & (TUNIO_TCP_SYN | TUNIO_TCP_ACK | TUNIO_TCP_RST)) == TUNIO_TCP_SYN;
    uint32_t idx = find_forward(nat, p);
    struct tunio_nat_entry *e = entry_at(nat, idx);
    if (e && syn && e->state == ENTRY_CLOSED) {
        /* The app reuses a tuple whose flow is over: a new flow. The old slot stays reserved
         * (kept in the slot map, not in the hash) until it expires. */
        unhash(nat, idx);
        e = NULL;
    }
    if (!e) {
        if (!syn)
            return answer_unknown(nat, p, reply, cap, reply_len);
        idx = new_entry(nat, p, now);
        if (!idx) {
            atomic_fetch_add_explicit(&nat->n.table_full, 1, memory_order_relaxed);
            return answer_unknown(nat, p, reply, cap, reply_len);
        }
        e = entry_at(nat, idx);
        open->flow_id = e->flow_id;
        open->entry = idx;
        open->proto = p->proto;
        open->version = p->version;
        open->sport = p->sport;
        open->dport = p->dport;
        memcpy(open->src, p->src, 16);
        memcpy(open->dst, p->dst, 16);
        atomic_fetch_add_explicit(&nat->n.syn_held, 1, memory_order_relaxed);
        return TUNIO_NAT_OPEN;
    }
    if (e->state == ENTRY_PENDING || e->state == ENTRY_SILENT) {
        /* Retransmitted SYNs while the dial is undecided (or timed out) go unanswered, exactly
         * as they would towards a slow or silent host. */
        atomic_fetch_add_explicit(&nat->n.drop_unknown, 1, memory_order_relaxed);
        return TUNIO_NAT_DROP;
    }
    e->last_ms = now;
    to_listener(nat, e, p);
    atomic_fetch_add_explicit(&nat->n.translated_in, 1, memory_order_relaxed);
    return TUNIO_NAT_FORWARD;
}

enum tunio_nat_verdict tunio_nat_translate(struct tunio_nat *nat, struct tunio_pkt *p, uint64_t now,
                                           uint8_t *reply, size_t reply_cap, size_t *reply_len,
                                           struct tunio_nat_open *open)
{
    enum tunio_nat_verdict v;
    uint8_t pool_index;
    *reply_len = 0;
    pthread_mutex_lock(&nat->lock);
    if (in_pool(nat, p->dst, &pool_index)) {
        if (p->sport == nat->cfg.listen_port && !memcmp(p->src, nat->cfg.listen_addr, 16)) {
            v = from_listener(nat, p, now, pool_index);
        } else {
            atomic_fetch_add_explicit(&nat->n.drop_reserved, 1, memory_order_relaxed);
            v = TUNIO_NAT_DROP;
        }
    } else if (!memcmp(p->dst, nat->cfg.listen_addr, 16) || in_pool(nat, p->src, &pool_index)) {
        atomic_fetch_add_explicit(&nat->n.drop_reserved, 1, memory_order_relaxed);
        v = TUNIO_NAT_DROP;
    } else {
        v = from_app(nat, p, now, reply, reply_cap, reply_len, open);
    }
    pthread_mutex_unlock(&nat->lock);
    return v;
}

static struct tunio_nat_entry *checked(struct tunio_nat *nat, uint32_t idx, uint32_t flow_id)
{
    if (idx == 0 || idx > nat->used)
        return NULL;
    struct tunio_nat_entry *e = entry_at(nat, idx);
    return e->state != ENTRY_FREE && e->flow_id == flow_id ? e : NULL;
}

int tunio_nat_release(struct tunio_nat *nat, uint32_t idx, uint32_t flow_id, uint64_t now,
                      uint8_t *out, size_t cap, size_t *len)
{
    int err = -ENOENT;
    *len = 0;
    pthread_mutex_lock(&nat->lock);
    struct tunio_nat_entry *e = checked(nat, idx, flow_id);
    if (e && e->state == ENTRY_PENDING && e->held && e->held_len <= cap) {
        struct tunio_pkt p;
        memcpy(out, e->held, e->held_len);
        if (tunio_pkt_parse(&p, out, e->held_len) == TUNIO_PKT_OK) {
            to_listener(nat, e, &p);
            *len = p.len;
            err = 0;
        }
        free(e->held);
        e->held = NULL;
        e->state = ENTRY_OPEN;
        e->last_ms = now;
    }
    pthread_mutex_unlock(&nat->lock);
    return err;
}

int tunio_nat_icmp_code(int version, int err)
{
    /* The codes a host or router sends for these errors (RFC 792 and 1812; RFC 4443), chosen so
     * that Linux maps them back to the same errno in the app. */
    switch (err) {
    case ENETUNREACH:
        return 0; /* net unreachable / no route */
    case EHOSTUNREACH:
        return version == 4 ? 1 : 3; /* host / address unreachable */
    case ECONNREFUSED:
        return version == 4 ? 3 : 4; /* port unreachable (UDP) */
    case EACCES:
    case EPERM:
        return version == 4 ? 13 : 1; /* administratively prohibited */
    default:
        return -1;
    }
}

int tunio_nat_reject(struct tunio_nat *nat, uint32_t idx, uint32_t flow_id, int err, uint64_t now,
                     uint8_t *out, size_t cap, size_t *len)
{
    int rc = -ENOENT;
    *len = 0;
    pthread_mutex_lock(&nat->lock);
    struct tunio_nat_entry *e = checked(nat, idx, flow_id);
    if (e && e->state == ENTRY_PENDING) {
        struct tunio_pkt p;
        rc = 0;
        if (err == ETIMEDOUT) {
            e->state = ENTRY_SILENT;
            e->last_ms = now;
        } else {
            if (e->held && tunio_pkt_parse(&p, e->held, e->held_len) == TUNIO_PKT_OK) {
                /* Unreachable errors become ICMP as a router would send them; a refusal, and a
                 * refusal by policy (EACCES: a proxy's rules or credentials), become a RST. */
                int code = err == ENETUNREACH || err == EHOSTUNREACH
                               ? tunio_nat_icmp_code(p.version, err)
                               : -1;
                *len = code >= 0 ? tunio_pkt_build_icmp_unreach(&p, (uint8_t)code, out, cap)
                                 : tunio_pkt_build_rst(&p, out, cap);
            }
            /* The kernel never saw this flow: the slot can be used again at once. */
            release_entry(nat, idx);
        }
    }
    pthread_mutex_unlock(&nat->lock);
    return rc;
}

int tunio_nat_lookup_slot(struct tunio_nat *nat, const uint8_t addr[16], uint16_t port,
                          uint32_t *idx, uint32_t *flow_id)
{
    int rc = -ENOENT;
    uint8_t pool_index;
    pthread_mutex_lock(&nat->lock);
    if (in_pool(nat, addr, &pool_index)) {
        uint32_t i = nat->slots[(uint32_t)pool_index * 65536u + port];
        struct tunio_nat_entry *e = entry_at(nat, i);
        if (e && e->state == ENTRY_OPEN) {
            *idx = i;
            *flow_id = e->flow_id;
            rc = 0;
        }
    }
    pthread_mutex_unlock(&nat->lock);
    return rc;
}

void tunio_nat_close(struct tunio_nat *nat, uint32_t idx, uint32_t flow_id, uint64_t now)
{
    pthread_mutex_lock(&nat->lock);
    struct tunio_nat_entry *e = checked(nat, idx, flow_id);
    if (e) {
        if (e->state == ENTRY_PENDING) {
            release_entry(nat, idx); /* never reached the kernel */
        } else if (e->state != ENTRY_SILENT) {
            e->state = ENTRY_CLOSED;
            e->last_ms = now;
        }
    }
    pthread_mutex_unlock(&nat->lock);
}

size_t tunio_nat_sweep(struct tunio_nat *nat, uint64_t now, uint32_t *expired, size_t cap)
{
    size_t n = 0;
    pthread_mutex_lock(&nat->lock);
    for (uint32_t i = 1; i <= nat->used; i++) {
        struct tunio_nat_entry *e = entry_at(nat, i);
        /* A reader stamps last_ms with the time it read before it took the lock, and the loop
         * reads `now` before it sweeps: an entry a reader touched in between is stamped after
         * `now`. It was just used; unsigned, now - last_ms would make it 2^64 ms old, and a
         * held SYN would go silent at once, a closed flow still delivering its last bytes would
         * lose its slot. */
        uint64_t age = now > e->last_ms ? now - e->last_ms : 0;
        switch (e->state) {
        case ENTRY_PENDING:
            if (age >= nat->cfg.pending_ms && n < cap) {
                expired[n++] = e->flow_id;
                free(e->held);
                e->held = NULL;
                e->state = ENTRY_SILENT;
                e->last_ms = now;
            }
            break;
        case ENTRY_SILENT:
            if (age >= nat->cfg.silent_ms)
                release_entry(nat, i);
            break;
        case ENTRY_CLOSED:
            if (age >= nat->cfg.reserve_ms)
                release_entry(nat, i);
            break;
        default:
            break;
        }
    }
    pthread_mutex_unlock(&nat->lock);
    return n;
}

uint32_t tunio_nat_live(struct tunio_nat *nat)
{
    pthread_mutex_lock(&nat->lock);
    uint32_t n = nat->live;
    pthread_mutex_unlock(&nat->lock);
    return n;
}
