/* NAT table: entries in one array (untouched pages cost no memory), a chained hash from the app's
 * tuple, and a direct reverse map from the (pool address, port) slot. All three and the table's
 * bookkeeping live in a region (indices only, no pointers), so that the next stack can adopt the
 * table of one that died; the held SYNs, the lock and the admission state are process-local. */
#include "nat.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

#define NAT_MAGIC 0x54414e4f494e5554ull /* "TUNIONAT" */
#define NAT_LAYOUT 1u                   /* bumped whenever the layout below changes */
#define NAT_ALIGN 4096u

enum entry_state {
    ENTRY_FREE = 0,
    ENTRY_PENDING, /* SYN held, waiting for the worker's dial */
    ENTRY_OPEN,    /* SYN released: translating */
    ENTRY_SILENT,  /* dial timed out: SYN retransmits are dropped, as a black hole would */
    ENTRY_CLOSED,  /* flow over: still translating stragglers, slot reserved */
};

/* In the region: fixed size, no pointers. */
struct tunio_nat_entry {
    uint8_t src[16];
    uint8_t dst[16];
    uint16_t sport;
    uint16_t dport;
    uint16_t port;      /* fake source port p */
    uint8_t pool_index; /* fake source address F */
    uint8_t state;
    uint8_t hashed; /* on a forward hash chain */
    uint8_t reserved[3];
    uint32_t flow_id;
    uint32_t hnext;   /* 1-based next on the hash chain, or next free */
    uint64_t last_ms; /* CLOCK_MONOTONIC: the same clock in every process of the machine */
};

/* In the region, one per family. */
struct nat_table_header {
    uint64_t hash; /* of the table's layout (tunio_nat_config but ports and timeouts); 0: unused */
    uint16_t listen_port;
    uint16_t reserved;
    uint32_t capacity;  /* entries the table can hold (= slots) */
    uint32_t used;      /* high-water mark of entries handed out */
    uint32_t free_head; /* 1-based index of a free entry, 0 = none */
    uint32_t live;      /* entries not free */
    uint32_t cursor;    /* round-robin position in the slot space */
    uint32_t bucket_mask;
    uint32_t reserved2;
    uint64_t entries_off; /* from the region's start */
    uint64_t buckets_off;
    uint64_t slots_off;
};

struct nat_region_header {
    uint64_t magic;
    uint64_t layout; /* NAT_LAYOUT and the sizes of the structures above */
    uint64_t size;   /* bytes the region was laid out for */
    atomic_uint next_flow_id;
    uint32_t reserved;
    struct nat_table_header tables[2];
};

/* The longest SYN held: what one write into the TUN carries, and its held length's type. */
#define HELD_SYN_MAX 65535u

/* Process-local, per entry. */
struct tunio_nat_held {
    uint8_t *syn; /* the app's first SYN, as read */
    uint16_t len;
};

/* ---- admission ---- */

int tunio_nat_take_flow(struct tunio_nat_limits *l)
{
    if (!l)
        return 0;
    unsigned n = atomic_fetch_add(&l->flows, 1);
    if (l->max_flows && n >= l->max_flows) {
        atomic_fetch_sub(&l->flows, 1);
        atomic_fetch_add_explicit(&l->refused_max_flows, 1, memory_order_relaxed);
        return -ENOSPC;
    }
    return 0;
}

void tunio_nat_put_flow(struct tunio_nat_limits *l)
{
    if (l)
        atomic_fetch_sub(&l->flows, 1);
}

static uint32_t dst_bucket(const uint8_t dst[16])
{
    uint32_t h = 2166136261u;
    for (int i = 0; i < 16; i++)
        h = (h ^ dst[i]) * 16777619u;
    return (h ^ h >> 16) & (TUNIO_NAT_DST_BUCKETS - 1);
}

/* A new held SYN: 0; -ENOSPC past a limit, or -EAGAIN past its destination's share (counted by
 * reason). Under the table's lock. */
static int take_pending(struct tunio_nat *nat, const uint8_t dst[16])
{
    struct tunio_nat_limits *l = nat->limits;
    if (!l)
        return 0;
    uint32_t b = dst_bucket(dst);
    uint32_t share = l->max_pending / 4 ? l->max_pending / 4 : 1;
    if (l->max_pending && nat->dst_pending[b] >= share) {
        atomic_fetch_add_explicit(&l->deferred_pending_share, 1, memory_order_relaxed);
        return -EAGAIN;
    }
    unsigned n = atomic_fetch_add(&l->pending, 1);
    if (l->max_pending && n >= l->max_pending) {
        atomic_fetch_sub(&l->pending, 1);
        atomic_fetch_add_explicit(&l->refused_max_pending, 1, memory_order_relaxed);
        return -ENOSPC;
    }
    if (tunio_nat_take_flow(l) < 0) {
        atomic_fetch_sub(&l->pending, 1);
        return -ENOSPC;
    }
    unsigned peak = atomic_load(&l->pending_peak);
    while (n + 1 > peak && !atomic_compare_exchange_weak(&l->pending_peak, &peak, n + 1))
        ;
    nat->dst_pending[b]++;
    return 0;
}

/* Every change of an entry's state goes through here, so the budget follows it: a flow counts
 * while PENDING or OPEN, a held SYN while PENDING. */
static void set_state(struct tunio_nat *nat, struct tunio_nat_entry *e, uint8_t state)
{
    struct tunio_nat_limits *l = nat->limits;
    uint8_t old = e->state;
    e->state = state;
    if (!l || old == state)
        return;
    if (old == ENTRY_PENDING) {
        atomic_fetch_sub(&l->pending, 1);
        uint32_t b = dst_bucket(e->dst);
        if (nat->dst_pending[b])
            nat->dst_pending[b]--;
    }
    int was_flow = old == ENTRY_PENDING || old == ENTRY_OPEN;
    int is_flow = state == ENTRY_PENDING || state == ENTRY_OPEN;
    if (was_flow && !is_flow)
        tunio_nat_put_flow(l);
}

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

/* ---- the region's layout ---- */

struct table_layout {
    uint32_t capacity;
    uint32_t buckets;
    size_t entries_size, buckets_size, slots_size;
};

static size_t align_up(size_t n)
{
    return (n + NAT_ALIGN - 1) / NAT_ALIGN * NAT_ALIGN;
}

static int config_ok(const struct tunio_nat_config *cfg)
{
    return (cfg->version == 4 || cfg->version == 6) && cfg->pool_count > 0 &&
           cfg->pool_count <= TUNIO_NAT_POOL_MAX;
}

static void layout_of(const struct tunio_nat_config *cfg, struct table_layout *t)
{
    t->capacity = cfg->pool_count * TUNIO_NAT_PORTS;
    uint32_t nb = 1;
    while (nb < t->capacity / 4)
        nb <<= 1;
    t->buckets = nb;
    t->entries_size = align_up((size_t)t->capacity * sizeof(struct tunio_nat_entry));
    t->buckets_size = align_up((size_t)nb * sizeof(uint32_t));
    t->slots_size = align_up((size_t)cfg->pool_count * 65536u * sizeof(uint32_t));
}

static uint64_t fnv64(uint64_t h, const void *data, size_t n)
{
    const uint8_t *p = data;
    for (size_t i = 0; i < n; i++)
        h = (h ^ p[i]) * 1099511628211ull;
    return h;
}

/* What makes two tables the same: the family, the addresses, the pool, the entry layout. */
static uint64_t config_hash(const struct tunio_nat_config *cfg)
{
    uint64_t h = 14695981039346656037ull;
    uint32_t layout[3] = {NAT_LAYOUT, (uint32_t)sizeof(struct tunio_nat_entry), cfg->pool_count};
    h = fnv64(h, layout, sizeof(layout));
    h = fnv64(h, &cfg->version, 1);
    h = fnv64(h, cfg->listen_addr, 16);
    h = fnv64(h, cfg->pool_base, 16);
    return h ? h : 1;
}

static uint64_t region_layout(void)
{
    return (uint64_t)NAT_LAYOUT << 48 | (uint64_t)sizeof(struct nat_region_header) << 24 |
           sizeof(struct tunio_nat_entry);
}

size_t tunio_nat_region_size_of(const struct tunio_nat_config cfg[2])
{
    size_t n = align_up(sizeof(struct nat_region_header));
    for (int i = 0; i < 2; i++) {
        if (!config_ok(&cfg[i]))
            continue;
        struct table_layout t;
        layout_of(&cfg[i], &t);
        n += t.entries_size + t.buckets_size + t.slots_size;
    }
    return n;
}

static int region_ours(const struct nat_region_header *h, size_t len)
{
    return len >= sizeof(*h) && h->magic == NAT_MAGIC && h->layout == region_layout() &&
           h->size == len;
}

void tunio_nat_region_ports(const void *region, size_t len, const struct tunio_nat_config cfg[2],
                            uint16_t ports[2])
{
    const struct nat_region_header *h = region;
    for (int i = 0; i < 2; i++) {
        ports[i] = 0;
        if (region_ours(h, len) && config_ok(&cfg[i]) && h->tables[i].hash == config_hash(&cfg[i]))
            ports[i] = h->tables[i].listen_port;
    }
}

atomic_uint *tunio_nat_region_ids(void *region)
{
    return &((struct nat_region_header *)region)->next_flow_id;
}

static struct tunio_nat_entry *entry_at(struct tunio_nat *nat, uint32_t idx1)
{
    return idx1 ? &nat->entries[idx1 - 1] : NULL;
}

static uint32_t *bucket_of(struct tunio_nat *nat, const struct tunio_nat_entry *e)
{
    return &nat->buckets[tuple_hash(e->src, e->sport, e->dst, e->dport) & nat->hdr->bucket_mask];
}

static uint32_t slot_of(const struct tunio_nat_entry *e)
{
    return (uint32_t)e->pool_index * 65536u + e->port;
}

static void push_free(struct tunio_nat *nat, uint32_t idx)
{
    struct tunio_nat_entry *e = entry_at(nat, idx);
    memset(e, 0, sizeof(*e));
    e->hnext = nat->hdr->free_head;
    nat->hdr->free_head = idx;
}

/* A table the previous stack left: rebuilt from its entries alone, so that one killed half-way
 * through an update leaves nothing inconsistent behind (a torn entry is dropped). */
static void adopt(struct tunio_nat *nat, uint64_t now)
{
    struct nat_table_header *h = nat->hdr;
    if (h->used > h->capacity)
        h->used = h->capacity;
    memset(nat->buckets, 0, (size_t)(h->bucket_mask + 1) * sizeof(uint32_t));
    h->free_head = 0;
    h->live = 0;
    uint32_t dropped = 0;
    /* Backwards, so that the free list hands out low indices first. */
    for (uint32_t i = h->used; i >= 1; i--) {
        struct tunio_nat_entry *e = entry_at(nat, i);
        int sane = e->state > ENTRY_FREE && e->state <= ENTRY_CLOSED &&
                   e->pool_index < nat->cfg.pool_count && e->port >= TUNIO_NAT_PORT_MIN;
        if (e->state == ENTRY_PENDING) {
            /* Its SYN was the dead process's: the app's retransmit opens a fresh flow. */
            if (nat->slots[slot_of(e)] == i)
                nat->slots[slot_of(e)] = 0;
            push_free(nat, i);
            dropped++;
            continue;
        }
        if (!sane) {
            if (e->state != ENTRY_FREE)
                dropped++;
            push_free(nat, i);
            continue;
        }
        if (e->state == ENTRY_OPEN) {
            /* Its socket died with the old stack (a RST towards the app, which the readers
             * translate): the slot stays reserved as for any flow that ended. */
            e->state = ENTRY_CLOSED;
            e->last_ms = now;
        }
        nat->slots[slot_of(e)] = i;
        if (e->hashed) {
            uint32_t *b = bucket_of(nat, e);
            e->hnext = *b;
            *b = i;
        } else {
            e->hnext = 0;
        }
        h->live++;
        nat->adopted++;
    }
    if (dropped)
        tunio_log(TUNIO_LOG_DEBUG, "IPv%d: %u held or torn NAT entries dropped on adoption",
                  nat->cfg.version, dropped);
}

static void init_table(struct tunio_nat *nat, void *region, const struct table_layout *t,
                       int reused)
{
    struct nat_table_header *h = nat->hdr;
    if (reused) {
        /* A table of another layout or port was here: wipe what it used. */
        memset(nat->entries, 0, t->entries_size);
        memset(nat->buckets, 0, t->buckets_size);
        memset(nat->slots, 0, t->slots_size);
    }
    (void)region;
    h->hash = config_hash(&nat->cfg);
    h->listen_port = nat->cfg.listen_port;
    h->capacity = t->capacity;
    h->used = h->free_head = h->live = h->cursor = 0;
    h->bucket_mask = t->buckets - 1;
}

int tunio_nat_attach(void *region, size_t len, const struct tunio_nat_config cfg[2],
                     struct tunio_nat *nat[2], struct tunio_nat_limits *limits, uint64_t now)
{
    if (len < tunio_nat_region_size_of(cfg) || !region)
        return -EINVAL;
    for (int i = 0; i < 2; i++)
        if ((cfg[i].version && !config_ok(&cfg[i])) || (cfg[i].version != 0) != (nat[i] != NULL) ||
            (cfg[i].version && cfg[i].version != (i ? 6 : 4)))
            return -EINVAL;
    struct nat_region_header *rh = region;
    int ours = region_ours(rh, len);
    if (!ours) {
        /* A new region is all zero; anything else that is not ours is wiped. */
        if (rh->magic != 0)
            memset(region, 0, len);
        rh->magic = NAT_MAGIC;
        rh->layout = region_layout();
        rh->size = len;
        atomic_store(&rh->next_flow_id, 1);
    }
    size_t off = align_up(sizeof(struct nat_region_header));
    int err = 0;
    for (int i = 0; i < 2; i++) {
        if (!nat[i])
            continue;
        struct tunio_nat *n = nat[i];
        memset(n, 0, sizeof(*n));
        n->cfg = cfg[i];
        n->limits = limits;
        n->next_flow_id = &rh->next_flow_id;
        n->low_off = cfg[i].version == 4 ? 0 : 12;
        n->pool_low = low32(cfg[i].pool_base + n->low_off);
        struct table_layout t;
        layout_of(&cfg[i], &t);
        struct nat_table_header *h = &rh->tables[i];
        n->hdr = h;
        n->entries = (struct tunio_nat_entry *)((uint8_t *)region + off);
        n->buckets = (uint32_t *)((uint8_t *)region + off + t.entries_size);
        n->slots = (uint32_t *)((uint8_t *)region + off + t.entries_size + t.buckets_size);
        int same = ours && h->hash == config_hash(&cfg[i]) &&
                   h->listen_port == cfg[i].listen_port && h->capacity == t.capacity &&
                   h->bucket_mask == t.buckets - 1;
        if (same)
            adopt(n, now);
        else
            init_table(n, region, &t, ours && h->hash != 0);
        h->entries_off = off;
        h->buckets_off = off + t.entries_size;
        h->slots_off = off + t.entries_size + t.buckets_size;
        off += t.entries_size + t.buckets_size + t.slots_size;
        /* calloc of large sizes maps zero pages: memory is spent only on entries actually held. */
        n->held = calloc(t.capacity, sizeof(*n->held));
        if (!n->held) {
            err = -ENOMEM;
            break;
        }
        err = -pthread_mutex_init(&n->lock, NULL);
        if (err) {
            free(n->held);
            n->held = NULL;
            break;
        }
    }
    if (err)
        for (int i = 0; i < 2; i++)
            if (nat[i])
                tunio_nat_fini(nat[i]);
    return err;
}

void tunio_nat_fini(struct tunio_nat *nat)
{
    if (!nat->held)
        return;
    for (uint32_t i = 0; i < nat->hdr->used; i++)
        free(nat->held[i].syn);
    free(nat->held);
    pthread_mutex_destroy(&nat->lock);
    memset(nat, 0, sizeof(*nat));
}

static void drop_held(struct tunio_nat *nat, uint32_t idx)
{
    struct tunio_nat_held *hd = &nat->held[idx - 1];
    free(hd->syn);
    hd->syn = NULL;
    hd->len = 0;
}

static uint32_t find_forward(struct tunio_nat *nat, const struct tunio_pkt *p)
{
    uint32_t idx =
        nat->buckets[tuple_hash(p->src, p->sport, p->dst, p->dport) & nat->hdr->bucket_mask];
    for (uint32_t hops = 0; idx && hops <= nat->hdr->used; hops++) {
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

static void release_entry(struct tunio_nat *nat, uint32_t idx)
{
    struct tunio_nat_entry *e = entry_at(nat, idx);
    unhash(nat, idx);
    if (nat->slots[slot_of(e)] == idx)
        nat->slots[slot_of(e)] = 0;
    drop_held(nat, idx);
    set_state(nat, e, ENTRY_FREE);
    push_free(nat, idx);
    nat->hdr->live--;
}

/* Round-robin over the slot space, so a just-freed port is the last to be used again. */
static int take_slot(struct tunio_nat *nat, uint8_t *pool_index, uint16_t *port)
{
    struct nat_table_header *h = nat->hdr;
    for (uint32_t tries = 0; tries < h->capacity; tries++) {
        uint32_t i = h->cursor++ % h->capacity;
        uint32_t pi = i % nat->cfg.pool_count;
        uint32_t pt = TUNIO_NAT_PORT_MIN + i / nat->cfg.pool_count;
        uint32_t idx = nat->slots[pi * 65536u + pt];
        if (!idx || entry_at(nat, idx)->state == ENTRY_FREE) {
            *pool_index = (uint8_t)pi;
            *port = (uint16_t)pt;
            return 0;
        }
    }
    return -ENOSPC;
}

/* 0 with nothing taken, -ENOSPC or -EAGAIN past an admission limit (take_pending; nothing
 * counted as table_full). */
static int new_entry(struct tunio_nat *nat, const struct tunio_pkt *p, uint64_t now, uint32_t *out)
{
    struct nat_table_header *h = nat->hdr;
    *out = 0;
    uint8_t pool_index;
    uint16_t port;
    if (take_slot(nat, &pool_index, &port) < 0)
        return 0;
    uint32_t idx;
    if (h->free_head)
        idx = h->free_head;
    else if (h->used < h->capacity)
        idx = h->used + 1;
    else
        return 0;
    uint8_t *held = malloc(p->len);
    if (!held)
        return 0;
    int err = take_pending(nat, p->dst);
    if (err < 0) {
        free(held);
        return err;
    }
    if (h->free_head)
        h->free_head = entry_at(nat, idx)->hnext;
    else
        h->used++;
    struct tunio_nat_entry *e = entry_at(nat, idx);
    memset(e, 0, sizeof(*e));
    memcpy(e->src, p->src, 16);
    memcpy(e->dst, p->dst, 16);
    e->sport = p->sport;
    e->dport = p->dport;
    e->pool_index = pool_index;
    e->port = port;
    e->last_ms = now;
    e->flow_id = tunio_nat_next_id(nat->next_flow_id);
    memcpy(held, p->buf, p->len);
    nat->held[idx - 1].syn = held;
    nat->held[idx - 1].len = (uint16_t)p->len;
    uint32_t *b = bucket_of(nat, e);
    e->hnext = *b;
    *b = idx;
    e->hashed = 1;
    nat->slots[slot_of(e)] = idx;
    e->state = ENTRY_PENDING; /* counted by take_pending */
    h->live++;
    *out = idx;
    return 0;
}

/* The entry in a slot, if it really is that slot's (a region adopted from a killed stack may hold
 * a stale slot: it is then free). */
static struct tunio_nat_entry *entry_in_slot(struct tunio_nat *nat, uint32_t slot, uint32_t *idx)
{
    uint32_t i = nat->slots[slot];
    struct tunio_nat_entry *e = i && i <= nat->hdr->used ? entry_at(nat, i) : NULL;
    if (!e || e->state == ENTRY_FREE || slot_of(e) != slot)
        return NULL;
    if (idx)
        *idx = i;
    return e;
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

int tunio_nat_owns(const struct tunio_nat *nat, const uint8_t addr[16])
{
    uint8_t index;
    return !memcmp(addr, nat->cfg.listen_addr, 16) || in_pool(nat, addr, &index);
}

static enum tunio_nat_verdict from_listener(struct tunio_nat *nat, struct tunio_pkt *p,
                                            uint64_t now, uint8_t pool_index)
{
    struct tunio_nat_entry *e = entry_in_slot(nat, (uint32_t)pool_index * 65536u + p->dport, NULL);
    if (!e || e->state == ENTRY_PENDING || e->state == ENTRY_SILENT) {
        atomic_fetch_add_explicit(&nat->n.drop_unknown, 1, memory_order_relaxed);
        return TUNIO_NAT_DROP;
    }
    e->last_ms = now;
    tunio_pkt_rewrite(p, e->dst, e->dport, e->src, e->sport);
    atomic_fetch_add_explicit(&nat->n.translated_out, 1, memory_order_relaxed);
    if (p->tcp_flags & TUNIO_TCP_RST)
        atomic_fetch_add_explicit(&nat->n.rst_to_app, 1, memory_order_relaxed);
    return TUNIO_NAT_FORWARD;
}

static enum tunio_nat_verdict answer_unknown(struct tunio_nat *nat, const struct tunio_pkt *p,
                                             uint8_t *reply, size_t cap, size_t *reply_len,
                                             atomic_ullong *counter)
{
    *reply_len = tunio_pkt_build_rst(p, reply, cap);
    if (!*reply_len) {
        atomic_fetch_add_explicit(&nat->n.drop_unknown, 1, memory_order_relaxed);
        return TUNIO_NAT_DROP;
    }
    if (counter)
        atomic_fetch_add_explicit(counter, 1, memory_order_relaxed);
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
        /* A SYN no TUN write can carry back (a reassembled IPv6 datagram can be 65,575 bytes)
         * could not be released after its dial: refused now, not held in vain. */
        if (!syn || nat->refuse_new || p->len > HELD_SYN_MAX)
            return answer_unknown(nat, p, reply, cap, reply_len, &nat->n.rst_sent);
        int err = new_entry(nat, p, now, &idx);
        if (err == -EAGAIN) {
            /* Its destination holds its share of --max-pending: the SYN goes unanswered, as a
             * server with a full SYN queue leaves it, and the app's next one may get in. A
             * burst of connects to one busy server waits a second; a host that never answers
             * cannot take every pending place. */
            return TUNIO_NAT_DROP;
        }
        if (err < 0) {
            /* Past --max-flows or --max-pending: refused as a busy server refuses, at once
             * and before any worker hears of it (counted by reason in take_pending). */
            return answer_unknown(nat, p, reply, cap, reply_len, NULL);
        }
        if (!idx) {
            atomic_fetch_add_explicit(&nat->n.table_full, 1, memory_order_relaxed);
            return answer_unknown(nat, p, reply, cap, reply_len, &nat->n.rst_sent);
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
    if (idx == 0 || idx > nat->hdr->used)
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
    struct tunio_nat_held *hd = e ? &nat->held[idx - 1] : NULL;
    if (e && e->state == ENTRY_PENDING && hd->syn && hd->len <= cap) {
        struct tunio_pkt p;
        memcpy(out, hd->syn, hd->len);
        if (tunio_pkt_parse(&p, out, hd->len) == TUNIO_PKT_OK) {
            to_listener(nat, e, &p);
            *len = p.len;
            err = 0;
        }
        drop_held(nat, idx);
        set_state(nat, e, ENTRY_OPEN);
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
        struct tunio_nat_held *hd = &nat->held[idx - 1];
        rc = 0;
        if (err == ETIMEDOUT) {
            drop_held(nat, idx);
            set_state(nat, e, ENTRY_SILENT);
            e->last_ms = now;
        } else {
            if (hd->syn && tunio_pkt_parse(&p, hd->syn, hd->len) == TUNIO_PKT_OK) {
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

int tunio_nat_describe(struct tunio_nat *nat, uint32_t idx, uint32_t flow_id,
                       struct tunio_nat_open *out)
{
    int rc = -ENOENT;
    pthread_mutex_lock(&nat->lock);
    struct tunio_nat_entry *e = checked(nat, idx, flow_id);
    if (e && e->state == ENTRY_PENDING) {
        memset(out, 0, sizeof(*out));
        out->flow_id = flow_id;
        out->entry = idx;
        out->proto = TUNIO_IPPROTO_TCP;
        out->version = nat->cfg.version;
        out->sport = e->sport;
        out->dport = e->dport;
        memcpy(out->src, e->src, 16);
        memcpy(out->dst, e->dst, 16);
        rc = 0;
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
        uint32_t i;
        struct tunio_nat_entry *e = entry_in_slot(nat, (uint32_t)pool_index * 65536u + port, &i);
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
            set_state(nat, e, ENTRY_CLOSED);
            e->last_ms = now;
        }
    }
    pthread_mutex_unlock(&nat->lock);
}

size_t tunio_nat_sweep(struct tunio_nat *nat, uint64_t now, uint32_t *expired, size_t cap)
{
    size_t n = 0;
    pthread_mutex_lock(&nat->lock);
    for (uint32_t i = 1; i <= nat->hdr->used; i++) {
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
                drop_held(nat, i);
                set_state(nat, e, ENTRY_SILENT);
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

void tunio_nat_refuse_new(struct tunio_nat *nat)
{
    pthread_mutex_lock(&nat->lock);
    nat->refuse_new = 1;
    pthread_mutex_unlock(&nat->lock);
}

size_t tunio_nat_held(struct tunio_nat *nat, uint32_t *entries, uint32_t *ids, size_t cap)
{
    size_t n = 0;
    pthread_mutex_lock(&nat->lock);
    for (uint32_t i = 1; i <= nat->hdr->used && n < cap; i++) {
        struct tunio_nat_entry *e = entry_at(nat, i);
        if (e->state == ENTRY_PENDING) {
            entries[n] = i;
            ids[n++] = e->flow_id;
        }
    }
    pthread_mutex_unlock(&nat->lock);
    return n;
}

uint32_t tunio_nat_live(struct tunio_nat *nat)
{
    pthread_mutex_lock(&nat->lock);
    uint32_t n = nat->hdr->live;
    pthread_mutex_unlock(&nat->lock);
    return n;
}
