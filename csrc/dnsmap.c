/* The fake-IP map (dnsmap.h). In the region: a header, then the entries (one per pool address,
 * fixed size, indices only), then the hash buckets. Entries are handed out in order until the pool
 * is used up, then recycled from the LRU end. A region left by a killed stack is adopted: the hash
 * and the LRU list are rebuilt from the entries alone (a torn entry is dropped), so nothing half
 * written survives. */
#include "dnsmap.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

#define MAP_MAGIC 0x50414d534e44554eull /* "NUDNSMAP" */
#define MAP_LAYOUT 1u                   /* bumped whenever the layout below changes */
#define MAP_ALIGN 4096u

/* In the region: fixed size, no pointers; indices are 1-based (0 = none). */
struct dnsmap_entry {
    uint64_t last_ms; /* answered, or its last flow ended (CLOCK_MONOTONIC, as the NAT table's) */
    uint32_t hnext;   /* next on the name's hash chain */
    uint32_t prev;    /* LRU: towards the most recent */
    uint32_t next;    /* LRU: towards the least recent */
    uint32_t flows;   /* flows and sessions using the address now */
    uint32_t hash;
    uint8_t name_len; /* 0: no name (never given, or dropped on adoption) */
    uint8_t reserved[3];
    char name[256];
};

struct dnsmap_header {
    uint64_t magic;
    uint64_t layout;
    uint64_t config; /* hash of the pools: another configuration's map is wiped */
    uint64_t size;
    uint32_t capacity;
    uint32_t used; /* entries handed out so far (the rest were never used) */
    uint32_t head; /* LRU: most recently used */
    uint32_t tail; /* LRU: least recently used, recycled first */
    uint32_t bucket_mask;
    uint32_t named;
    uint64_t entries_off;
    uint64_t buckets_off;
};

struct tunio_dnsmap {
    pthread_mutex_t lock;
    struct tunio_dnsmap_config cfg;
    struct dnsmap_header *hdr;
    struct dnsmap_entry *entries;
    uint32_t *buckets;
    uint32_t span4_lo, span4_n;   /* first segment of IPv4 host offsets: [lo, lo + n) */
    uint32_t span4_lo2, span4_n2; /* second, after the hole */
    struct tunio_dnsmap_counters n;
};

static size_t align_up(size_t n)
{
    return (n + MAP_ALIGN - 1) / MAP_ALIGN * MAP_ALIGN;
}

/* The IPv4 pool's usable host offsets as two segments around the hole. */
static void spans4(const struct tunio_dnsmap_config *c, uint32_t *lo, uint32_t *n, uint32_t *lo2,
                   uint32_t *n2)
{
    *lo = *n = *lo2 = *n2 = 0;
    if (c->len4 == 0 || c->len4 > 30)
        return;
    uint64_t size = 1ull << (32 - c->len4);
    uint64_t first = 1, end = size - 1; /* the first and last addresses are left alone */
    uint64_t h0 = c->hole_lo, h1 = c->hole_hi;
    if (h1 <= h0 || h0 >= end || h1 <= first) {
        *lo = (uint32_t)first;
        *n = (uint32_t)(end - first);
        return;
    }
    if (h0 > first) {
        *lo = (uint32_t)first;
        *n = (uint32_t)(h0 - first);
    }
    if (h1 < end) {
        *lo2 = (uint32_t)h1;
        *n2 = (uint32_t)(end - h1);
    }
}

static uint32_t capacity6(const struct tunio_dnsmap_config *c)
{
    if (c->len6 < 96 || c->len6 > 126)
        return 0;
    uint64_t size = 1ull << (128 - c->len6);
    return size - 2 > TUNIO_DNSMAP_MAX ? TUNIO_DNSMAP_MAX : (uint32_t)(size - 2);
}

uint32_t tunio_dnsmap_capacity(const struct tunio_dnsmap_config *cfg)
{
    uint32_t lo, n, lo2, n2;
    spans4(cfg, &lo, &n, &lo2, &n2);
    uint64_t c4 = (uint64_t)n + n2, c6 = capacity6(cfg);
    uint64_t c = cfg->len4 ? c4 : c6;
    if (cfg->len4 && cfg->len6 && c6 < c)
        c = c6;
    return c > TUNIO_DNSMAP_MAX ? TUNIO_DNSMAP_MAX : (uint32_t)c;
}

static uint32_t buckets_for(uint32_t capacity)
{
    uint32_t nb = 1;
    while (nb < capacity)
        nb <<= 1;
    return nb;
}

size_t tunio_dnsmap_region_size(const struct tunio_dnsmap_config *cfg)
{
    uint32_t cap = tunio_dnsmap_capacity(cfg);
    if (!cap)
        return 0;
    return align_up(sizeof(struct dnsmap_header)) +
           align_up((size_t)cap * sizeof(struct dnsmap_entry)) +
           align_up((size_t)buckets_for(cap) * sizeof(uint32_t));
}

static uint64_t fnv64(uint64_t h, const void *data, size_t n)
{
    const uint8_t *p = data;
    for (size_t i = 0; i < n; i++)
        h = (h ^ p[i]) * 1099511628211ull;
    return h;
}

static uint64_t config_hash(const struct tunio_dnsmap_config *c, uint32_t capacity)
{
    uint64_t h = 14695981039346656037ull;
    uint32_t fixed[4] = {MAP_LAYOUT, (uint32_t)sizeof(struct dnsmap_entry), capacity, c->hole_lo};
    h = fnv64(h, fixed, sizeof(fixed));
    h = fnv64(h, &c->hole_hi, sizeof(c->hole_hi));
    h = fnv64(h, c->net4, 4);
    h = fnv64(h, &c->len4, 1);
    h = fnv64(h, c->net6, 16);
    h = fnv64(h, &c->len6, 1);
    return h ? h : 1;
}

static uint32_t name_hash(const char *name, size_t len)
{
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < len; i++)
        h = (h ^ (uint8_t)name[i]) * 16777619u;
    h ^= h >> 16;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    return h;
}

static struct dnsmap_entry *at(const struct tunio_dnsmap *m, uint32_t idx1)
{
    return idx1 ? &m->entries[idx1 - 1] : NULL;
}

/* ---- the LRU list ---- */

static void lru_unlink(struct tunio_dnsmap *m, uint32_t i)
{
    struct dnsmap_entry *e = at(m, i);
    if (e->prev)
        at(m, e->prev)->next = e->next;
    else if (m->hdr->head == i)
        m->hdr->head = e->next;
    if (e->next)
        at(m, e->next)->prev = e->prev;
    else if (m->hdr->tail == i)
        m->hdr->tail = e->prev;
    e->prev = e->next = 0;
}

static void lru_push_head(struct tunio_dnsmap *m, uint32_t i)
{
    struct dnsmap_entry *e = at(m, i);
    e->prev = 0;
    e->next = m->hdr->head;
    if (m->hdr->head)
        at(m, m->hdr->head)->prev = i;
    m->hdr->head = i;
    if (!m->hdr->tail)
        m->hdr->tail = i;
}

static void touch(struct tunio_dnsmap *m, uint32_t i)
{
    if (m->hdr->head != i) {
        lru_unlink(m, i);
        lru_push_head(m, i);
    }
}

/* ---- the hash ---- */

static void unhash(struct tunio_dnsmap *m, uint32_t i)
{
    struct dnsmap_entry *e = at(m, i);
    uint32_t *link = &m->buckets[e->hash & m->hdr->bucket_mask];
    for (uint32_t guard = 0; *link && guard <= m->hdr->capacity; guard++) {
        if (*link == i) {
            *link = e->hnext;
            break;
        }
        link = &at(m, *link)->hnext;
    }
    e->hnext = 0;
}

static void hash_in(struct tunio_dnsmap *m, uint32_t i)
{
    struct dnsmap_entry *e = at(m, i);
    uint32_t *b = &m->buckets[e->hash & m->hdr->bucket_mask];
    e->hnext = *b;
    *b = i;
}

static uint32_t find(struct tunio_dnsmap *m, const char *name, size_t len, uint32_t h)
{
    uint32_t i = m->buckets[h & m->hdr->bucket_mask];
    for (uint32_t guard = 0; i && guard <= m->hdr->capacity; guard++) {
        struct dnsmap_entry *e = at(m, i);
        if (e->hash == h && e->name_len == len && !memcmp(e->name, name, len))
            return i;
        i = e->hnext;
    }
    return 0;
}

/* ---- adoption ---- */

static int entry_sane(const struct dnsmap_entry *e)
{
    if (e->name_len == 0 || e->name_len > TUNIO_DNSMAP_NAME_MAX || e->name[e->name_len] != 0)
        return 0;
    for (size_t i = 0; i < e->name_len; i++) {
        char c = e->name[i];
        if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' || c == '_' || c == '.'))
            return 0;
    }
    return name_hash(e->name, e->name_len) == e->hash;
}

static const struct dnsmap_entry *sort_entries; /* qsort's context (attach is single-threaded) */

static int by_age(const void *a, const void *b)
{
    uint64_t x = sort_entries[*(const uint32_t *)a - 1].last_ms;
    uint64_t y = sort_entries[*(const uint32_t *)b - 1].last_ms;
    return x < y ? 1 : x > y ? -1 : 0; /* most recent first */
}

static int adopt(struct tunio_dnsmap *m, uint64_t now)
{
    struct dnsmap_header *h = m->hdr;
    if (h->used > h->capacity)
        h->used = h->capacity;
    uint32_t *order = malloc(((size_t)h->used + 1) * sizeof(uint32_t));
    if (!order)
        return -ENOMEM;
    memset(m->buckets, 0, ((size_t)h->bucket_mask + 1) * sizeof(uint32_t));
    h->head = h->tail = 0;
    h->named = 0;
    uint32_t dropped = 0;
    for (uint32_t i = 1; i <= h->used; i++) {
        struct dnsmap_entry *e = at(m, i);
        order[i - 1] = i;
        e->prev = e->next = e->hnext = 0;
        if (!entry_sane(e)) {
            dropped += e->name_len != 0;
            memset(e, 0, sizeof(*e)); /* recycled first: last_ms 0 */
            continue;
        }
        if (e->flows) {
            /* Its flows died with the previous stack; the apps' caches may still hold it. */
            e->flows = 0;
            if (e->last_ms < now)
                e->last_ms = now;
        }
        hash_in(m, i);
        h->named++;
    }
    sort_entries = m->entries;
    qsort(order, h->used, sizeof(uint32_t), by_age);
    sort_entries = NULL;
    for (uint32_t k = 0; k < h->used; k++) {
        /* most recent first, each appended at the tail */
        uint32_t i = order[k];
        struct dnsmap_entry *e = at(m, i);
        e->prev = h->tail;
        e->next = 0;
        if (h->tail)
            at(m, h->tail)->next = i;
        else
            h->head = i;
        h->tail = i;
    }
    free(order);
    if (dropped)
        tunio_log(TUNIO_LOG_DEBUG, "fake-IP map: %u torn entries dropped on adoption", dropped);
    return 0;
}

int tunio_dnsmap_attach(void *region, size_t len, const struct tunio_dnsmap_config *cfg,
                        uint64_t now, struct tunio_dnsmap **out)
{
    *out = NULL;
    uint32_t cap = tunio_dnsmap_capacity(cfg);
    if (!cap || !region || len < tunio_dnsmap_region_size(cfg))
        return -EINVAL;
    struct tunio_dnsmap *m = calloc(1, sizeof(*m));
    if (!m)
        return -ENOMEM;
    m->cfg = *cfg;
    spans4(cfg, &m->span4_lo, &m->span4_n, &m->span4_lo2, &m->span4_n2);
    struct dnsmap_header *h = region;
    uint32_t nb = buckets_for(cap);
    size_t entries_off = align_up(sizeof(*h));
    size_t buckets_off = entries_off + align_up((size_t)cap * sizeof(struct dnsmap_entry));
    m->hdr = h;
    m->entries = (struct dnsmap_entry *)((uint8_t *)region + entries_off);
    m->buckets = (uint32_t *)((uint8_t *)region + buckets_off);
    uint64_t want = config_hash(cfg, cap);
    int ours = h->magic == MAP_MAGIC && h->layout == MAP_LAYOUT && h->config == want &&
               h->size == len && h->capacity == cap && h->bucket_mask == nb - 1 &&
               h->entries_off == entries_off && h->buckets_off == buckets_off;
    int err = 0;
    if (ours) {
        err = adopt(m, now);
        if (!err && h->named)
            tunio_log(TUNIO_LOG_INFO, "fake-IP map: took over %u names of the previous stack",
                      h->named);
    } else {
        if (h->magic != 0)
            memset(region, 0, len); /* another configuration's, or torn: start afresh */
        h->magic = MAP_MAGIC;
        h->layout = MAP_LAYOUT;
        h->config = want;
        h->size = len;
        h->capacity = cap;
        h->bucket_mask = nb - 1;
        h->entries_off = entries_off;
        h->buckets_off = buckets_off;
    }
    if (!err)
        err = -pthread_mutex_init(&m->lock, NULL);
    if (err) {
        free(m);
        return err;
    }
    atomic_init(&m->n.recycled, 0);
    atomic_init(&m->n.full, 0);
    *out = m;
    return 0;
}

void tunio_dnsmap_free(struct tunio_dnsmap *m)
{
    if (!m)
        return;
    pthread_mutex_destroy(&m->lock);
    free(m);
}

/* An entry for a new name: a never used one, else the least recently used that no flow holds
 * and that was not answered within hold_ms. Entries held by flows are moved out of the way. */
static uint32_t take(struct tunio_dnsmap *m, uint64_t now)
{
    struct dnsmap_header *h = m->hdr;
    if (h->used < h->capacity) {
        uint32_t i = ++h->used;
        memset(at(m, i), 0, sizeof(struct dnsmap_entry));
        lru_push_head(m, i);
        return i;
    }
    for (uint32_t scanned = 0; scanned < TUNIO_DNSMAP_SCAN && h->tail; scanned++) {
        uint32_t i = h->tail;
        struct dnsmap_entry *e = at(m, i);
        if (e->flows) {
            touch(m, i); /* in use: not a candidate for a while */
            continue;
        }
        if (e->name_len && now - e->last_ms < m->cfg.hold_ms)
            return 0; /* the least recent is still held: so is every other */
        if (e->name_len) {
            unhash(m, i);
            h->named--;
            atomic_fetch_add_explicit(&m->n.recycled, 1, memory_order_relaxed);
        }
        e->name_len = 0;
        touch(m, i);
        return i;
    }
    return 0;
}

int tunio_dnsmap_resolve(struct tunio_dnsmap *m, const char *name, size_t len, uint64_t now,
                         uint32_t *index)
{
    if (len == 0 || len > TUNIO_DNSMAP_NAME_MAX)
        return -EINVAL;
    uint32_t hv = name_hash(name, len);
    pthread_mutex_lock(&m->lock);
    uint32_t i = find(m, name, len, hv);
    int rc = 0;
    if (i) {
        touch(m, i);
    } else if ((i = take(m, now))) {
        struct dnsmap_entry *e = at(m, i);
        memcpy(e->name, name, len);
        e->name[len] = 0;
        e->hash = hv;
        e->flows = 0;
        e->name_len = (uint8_t)len; /* last: an entry torn before this has no name */
        hash_in(m, i);
        m->hdr->named++;
    } else {
        atomic_fetch_add_explicit(&m->n.full, 1, memory_order_relaxed);
        rc = -ENOSPC;
    }
    if (i) {
        at(m, i)->last_ms = now;
        *index = i - 1;
    }
    pthread_mutex_unlock(&m->lock);
    return rc;
}

static void put32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static uint32_t get32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

int tunio_dnsmap_address(const struct tunio_dnsmap *m, uint32_t index, int version, uint8_t out[16])
{
    memset(out, 0, 16);
    if (index >= m->hdr->capacity)
        return -EINVAL;
    if (version == 4) {
        if (!m->cfg.len4)
            return -EAFNOSUPPORT;
        uint32_t off =
            index < m->span4_n ? m->span4_lo + index : m->span4_lo2 + (index - m->span4_n);
        put32(out, get32(m->cfg.net4) + off);
        return 0;
    }
    if (!m->cfg.len6)
        return -EAFNOSUPPORT;
    memcpy(out, m->cfg.net6, 16);
    put32(out + 12, get32(m->cfg.net6 + 12) + 1 + index);
    return 0;
}

int tunio_dnsmap_lookup(const struct tunio_dnsmap *m, int version, const uint8_t addr[16],
                        uint32_t *index)
{
    if (!m)
        return 0;
    uint32_t idx;
    if (version == 4) {
        if (!m->cfg.len4)
            return 0;
        uint32_t mask = ~0u << (32 - m->cfg.len4);
        uint32_t a = get32(addr), net = get32(m->cfg.net4);
        if ((a & mask) != (net & mask))
            return 0;
        uint32_t off = a - (net & mask);
        if (off >= m->span4_lo && off < m->span4_lo + m->span4_n)
            idx = off - m->span4_lo;
        else if (m->span4_n2 && off >= m->span4_lo2 && off < m->span4_lo2 + m->span4_n2)
            idx = m->span4_n + (off - m->span4_lo2);
        else
            return 0;
    } else {
        if (!m->cfg.len6 || memcmp(addr, m->cfg.net6, 12))
            return 0;
        uint32_t bits = 128 - m->cfg.len6; /* host bits, all in the low 32 */
        uint32_t mask = bits >= 32 ? 0 : ~0u << bits;
        uint32_t a = get32(addr + 12), net = get32(m->cfg.net6 + 12);
        if ((a & mask) != (net & mask) || a - (net & mask) == 0)
            return 0;
        idx = a - (net & mask) - 1;
    }
    if (idx >= m->hdr->capacity)
        return 0;
    *index = idx;
    return 1;
}

int tunio_dnsmap_acquire(struct tunio_dnsmap *m, uint32_t index, uint64_t now, char *name,
                         size_t cap)
{
    int rc = -ENOENT;
    pthread_mutex_lock(&m->lock);
    if (index < m->hdr->used) {
        struct dnsmap_entry *e = at(m, index + 1);
        if (e->name_len && (size_t)e->name_len < cap) {
            memcpy(name, e->name, e->name_len);
            name[e->name_len] = 0;
            e->flows++;
            e->last_ms = now;
            touch(m, index + 1);
            rc = e->name_len;
        }
    }
    pthread_mutex_unlock(&m->lock);
    return rc;
}

int tunio_dnsmap_name(struct tunio_dnsmap *m, uint32_t index, char *name, size_t cap)
{
    int rc = -ENOENT;
    pthread_mutex_lock(&m->lock);
    if (index < m->hdr->used) {
        struct dnsmap_entry *e = at(m, index + 1);
        if (e->name_len && (size_t)e->name_len < cap) {
            memcpy(name, e->name, e->name_len);
            name[e->name_len] = 0;
            rc = e->name_len;
        }
    }
    pthread_mutex_unlock(&m->lock);
    return rc;
}

void tunio_dnsmap_release(struct tunio_dnsmap *m, uint32_t index, uint64_t now)
{
    pthread_mutex_lock(&m->lock);
    if (index < m->hdr->used) {
        struct dnsmap_entry *e = at(m, index + 1);
        if (e->flows)
            e->flows--;
        e->last_ms = now; /* kept for hold_ms after its last flow, as after an answer */
        touch(m, index + 1);
    }
    pthread_mutex_unlock(&m->lock);
}

uint32_t tunio_dnsmap_entries(struct tunio_dnsmap *m)
{
    pthread_mutex_lock(&m->lock);
    uint32_t n = m->hdr->named;
    pthread_mutex_unlock(&m->lock);
    return n;
}

const struct tunio_dnsmap_counters *tunio_dnsmap_counters(const struct tunio_dnsmap *m)
{
    return &m->n;
}
