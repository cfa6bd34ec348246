/* Fragment reassembly (see reasm.h). Each slot keeps the first fragment's header in front of a
 * 64 KiB payload area, so the finished datagram is one contiguous packet, and a bitmap of the
 * 8-byte blocks received, which finds overlaps and tells when nothing is missing. */
#include "reasm.h"

#include <stdlib.h>
#include <string.h>

#include "checksum.h"

/* The kept header (at most 256 bytes: an IPv4 header, or IPv6 and the extensions before the
 * fragment header), and room before it. */
#define HEAD_MAX (256u + TUNIO_REASM_ROOM)
#define PAYLOAD_MAX 65535u /* fragment offsets are 13 bits of 8-byte blocks */
#define BLOCKS (PAYLOAD_MAX / 8u + 1u)
#define IPV6_HLEN 40u

struct slot {
    int used;
    uint8_t version;
    uint8_t proto; /* IPv4 protocol; for IPv6 the fragment header's next header */
    uint8_t src[16], dst[16];
    uint32_t id;
    uint64_t expires_ms;
    size_t have;     /* payload bytes received */
    size_t total;    /* payload length, once the last fragment came (0 before) */
    size_t head_len; /* header bytes kept from the first fragment (0 until it came) */
    size_t next_at;  /* IPv6: where, in the kept header, the next-header byte to fix is */
    uint8_t *buf;    /* HEAD_MAX + PAYLOAD_MAX bytes; allocated on first use, then kept */
    uint8_t seen[BLOCKS / 8u];
};

struct tunio_reasm {
    struct slot slot[TUNIO_REASM_SLOTS];
    unsigned discarded;
};

static void put16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

struct tunio_reasm *tunio_reasm_new(void)
{
    return calloc(1, sizeof(struct tunio_reasm));
}

void tunio_reasm_free(struct tunio_reasm *r)
{
    if (!r)
        return;
    for (size_t i = 0; i < TUNIO_REASM_SLOTS; i++)
        free(r->slot[i].buf);
    free(r);
}

unsigned tunio_reasm_take_discarded(struct tunio_reasm *r)
{
    unsigned n = r->discarded;
    r->discarded = 0;
    return n;
}

static void release(struct slot *s)
{
    s->used = 0;
    s->have = s->total = s->head_len = 0;
    memset(s->seen, 0, sizeof(s->seen));
}

/* Addresses are compared whole: the parser zero-fills the rest of an IPv4 one. */
static int same(const struct slot *s, const struct tunio_pkt *f)
{
    return s->used && s->version == f->version && s->proto == f->proto && s->id == f->frag_id &&
           memcmp(s->src, f->src, 16) == 0 && memcmp(s->dst, f->dst, 16) == 0;
}

/* The slot for `f`'s datagram: its own, or a new one (expired ones freed first, and the oldest
 * pushed out if none is left). NULL only if memory runs out. */
static struct slot *slot_for(struct tunio_reasm *r, const struct tunio_pkt *f, uint64_t now)
{
    struct slot *free_slot = NULL, *oldest = NULL;
    for (size_t i = 0; i < TUNIO_REASM_SLOTS; i++) {
        struct slot *s = &r->slot[i];
        if (s->used && now >= s->expires_ms) {
            release(s);
            r->discarded++;
        }
        if (same(s, f))
            return s;
        if (!s->used && !free_slot)
            free_slot = s;
        if (s->used && (!oldest || s->expires_ms < oldest->expires_ms))
            oldest = s;
    }
    struct slot *s = free_slot;
    if (!s) {
        s = oldest; /* a table full of incomplete datagrams: the oldest is the least likely */
        release(s);
        r->discarded++;
    }
    if (!s->buf && !(s->buf = malloc(HEAD_MAX + PAYLOAD_MAX)))
        return NULL;
    s->used = 1;
    s->version = f->version;
    s->proto = f->proto;
    s->id = f->frag_id;
    memcpy(s->src, f->src, 16);
    memcpy(s->dst, f->dst, 16);
    s->expires_ms = now + TUNIO_REASM_TIMEOUT_MS;
    return s;
}

/* Marks the 8-byte blocks of [offset, offset + len); 0, or -1 if any was already there. */
static int mark(struct slot *s, size_t offset, size_t len)
{
    size_t first = offset / 8u, last = (offset + len - 1) / 8u;
    for (size_t b = first; b <= last; b++)
        if (s->seen[b / 8u] & (1u << (b % 8u)))
            return -1;
    for (size_t b = first; b <= last; b++)
        s->seen[b / 8u] |= (uint8_t)(1u << (b % 8u));
    return 0;
}

/* Whether any block at or past `end` bytes was received. */
static int seen_from(const struct slot *s, size_t end)
{
    for (size_t b = (end + 7u) / 8u; b < BLOCKS; b++)
        if (s->seen[b / 8u] & (1u << (b % 8u)))
            return 1;
    return 0;
}

static int discard(struct slot *s)
{
    release(s);
    return TUNIO_REASM_DISCARDED;
}

int tunio_reasm_add(struct tunio_reasm *r, const struct tunio_pkt *f, uint64_t now_ms,
                    uint8_t **out, size_t *out_len)
{
    size_t data_len = f->len - f->frag_data;
    /* Every fragment but the last carries a multiple of 8 bytes, and none is empty; the kept
     * header must fit in front of the payload area. */
    if (data_len == 0 || (f->frag_more && data_len % 8u) ||
        f->frag_offset + data_len > PAYLOAD_MAX || f->l3_len > HEAD_MAX - TUNIO_REASM_ROOM)
        return TUNIO_REASM_DISCARDED;
    struct slot *s = slot_for(r, f, now_ms);
    if (!s)
        return TUNIO_REASM_DISCARDED;
    size_t end = f->frag_offset + data_len;
    if (!f->frag_more) {
        if ((s->total && s->total != end) || seen_from(s, end))
            return discard(s); /* two different ends, or data past the end */
        s->total = end;
    } else if (s->total && end > s->total) {
        return discard(s);
    }
    if (mark(s, f->frag_offset, data_len) < 0)
        return discard(s); /* overlap (or a duplicate): RFC 5722 */
    memcpy(s->buf + HEAD_MAX + f->frag_offset, f->buf + f->frag_data, data_len);
    s->have += data_len;
    if (f->frag_offset == 0) {
        memcpy(s->buf + HEAD_MAX - f->l3_len, f->buf, f->l3_len);
        s->head_len = f->l3_len;
        s->next_at = f->frag_next_at;
    }
    if (!s->total || s->have != s->total || !s->head_len)
        return TUNIO_REASM_HELD;
    /* Complete: make the kept header describe the whole datagram. */
    uint8_t *head = s->buf + HEAD_MAX - s->head_len;
    size_t whole = s->head_len + s->total;
    if (s->version == 4) {
        if (whole > PAYLOAD_MAX)
            return discard(s);
        put16(head + 2, (uint16_t)whole);
        put16(head + 6, 0); /* no more fragments, offset 0 */
        put16(head + 10, 0);
        put16(head + 10, tunio_csum_finish(tunio_csum_add(0, head, s->head_len)));
    } else {
        if (whole - IPV6_HLEN > PAYLOAD_MAX)
            return discard(s);
        put16(head + 4, (uint16_t)(whole - IPV6_HLEN));
        head[s->next_at] = s->proto; /* the fragment header is gone */
    }
    *out = head;
    *out_len = whole;
    release(s);
    return TUNIO_REASM_DONE;
}
