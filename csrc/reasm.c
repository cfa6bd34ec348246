/* Fragment reassembly (see reasm.h). Each slot keeps the first fragment's header in front of a
 * 64 KiB payload area, so the finished datagram is one contiguous packet, and a bitmap of the
 * 8-byte blocks received, which finds overlaps and tells when nothing is missing. */
#include "reasm.h"

#include <stdlib.h>
#include <string.h>

#include "checksum.h"

#define HEAD_MAX (256u + TUNIO_REASM_ROOM) /* the kept header (at most 256 bytes: an IPv4 header,
                                            * or IPv6 and the extensions before the fragment
                                            * header), and room before it */
#define PAYLOAD_MAX 65535u       /* fragment offsets are 13 bits of 8-byte blocks */
#define BLOCKS (PAYLOAD_MAX / 8u + 1u)
#define IPV6_HLEN 40u
#define IPPROTO_FRAGMENT 44u

struct slot {
    int used;
    uint8_t version;
    uint8_t proto; /* IPv4 protocol; for IPv6 the fragment header's next header */
    uint8_t src[16], dst[16];
    uint32_t id;
    uint64_t expires_ms;
    size_t have;        /* payload bytes received */
    size_t total;       /* payload length, once the last fragment came (0 before) */
    size_t head_len;    /* header bytes kept from the first fragment (0 until it came) */
    size_t next_at;     /* IPv6: where, in the kept header, the next-header byte to fix is */
    uint8_t *buf;       /* HEAD_MAX + PAYLOAD_MAX bytes; allocated on first use, then kept */
    uint8_t seen[BLOCKS / 8u];
};

struct tunio_reasm {
    struct slot slot[TUNIO_REASM_SLOTS];
    unsigned discarded;
};

/* What one fragment says about itself. */
struct frag {
    uint8_t version, proto;
    const uint8_t *src, *dst;
    uint32_t id;
    size_t offset;         /* of its payload in the datagram's payload */
    int more;              /* more fragments follow */
    const uint8_t *data;   /* its payload */
    size_t data_len;
    size_t head_len;       /* the header a reassembled packet keeps (from offset 0) */
    size_t next_at;        /* IPv6: the next-header byte that names the fragment header */
};

static uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static uint32_t get32(const uint8_t *p) { return (uint32_t)get16(p) << 16 | get16(p + 2); }
static void put16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static int parse_v4(const uint8_t *pkt, size_t len, struct frag *f)
{
    if (len < 20)
        return -1;
    size_t hl = (size_t)(pkt[0] & 0x0f) * 4u;
    size_t total = get16(pkt + 2);
    if (hl < 20 || total < hl || total > len)
        return -1;
    uint16_t fo = get16(pkt + 6);
    f->version = 4;
    f->proto = pkt[9];
    f->src = pkt + 12;
    f->dst = pkt + 16;
    f->id = get16(pkt + 4);
    f->offset = (size_t)(fo & 0x1fff) * 8u;
    f->more = (fo & 0x2000) != 0;
    f->data = pkt + hl;
    f->data_len = total - hl;
    f->head_len = hl;
    f->next_at = 0;
    return 0;
}

static int parse_v6(const uint8_t *pkt, size_t len, struct frag *f)
{
    if (len < IPV6_HLEN)
        return -1;
    size_t total = IPV6_HLEN + get16(pkt + 4);
    if (total > len)
        return -1;
    size_t next_at = 6, off = IPV6_HLEN;
    uint8_t next = pkt[6];
    /* Hop-by-hop, routing and destination options may come before the fragment header. */
    for (int hops = 0; next != IPPROTO_FRAGMENT; hops++) {
        if ((next != 0 && next != 43 && next != 60) || hops == 8 || off + 8 > total)
            return -1;
        size_t ext = 8u + (size_t)pkt[off + 1] * 8u;
        if (off + ext > total)
            return -1;
        next_at = off;
        next = pkt[off];
        off += ext;
    }
    if (off + 8 > total || off > HEAD_MAX - TUNIO_REASM_ROOM)
        return -1;
    uint16_t fo = get16(pkt + off + 2);
    f->version = 6;
    f->proto = pkt[off];
    f->src = pkt + 8;
    f->dst = pkt + 24;
    f->id = get32(pkt + off + 4);
    f->offset = (size_t)(fo & 0xfff8);
    f->more = fo & 1;
    f->data = pkt + off + 8;
    f->data_len = total - off - 8;
    f->head_len = off;
    f->next_at = next_at;
    return 0;
}

struct tunio_reasm *tunio_reasm_new(void) { return calloc(1, sizeof(struct tunio_reasm)); }

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

static int same(const struct slot *s, const struct frag *f)
{
    size_t alen = f->version == 4 ? 4 : 16;
    return s->used && s->version == f->version && s->proto == f->proto && s->id == f->id &&
           memcmp(s->src, f->src, alen) == 0 && memcmp(s->dst, f->dst, alen) == 0;
}

/* The slot for `f`'s datagram: its own, or a new one (expired ones freed first, and the oldest
 * pushed out if none is left). NULL only if memory runs out. */
static struct slot *slot_for(struct tunio_reasm *r, const struct frag *f, uint64_t now)
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
    size_t alen = f->version == 4 ? 4 : 16;
    s->used = 1;
    s->version = f->version;
    s->proto = f->proto;
    s->id = f->id;
    memcpy(s->src, f->src, alen);
    memcpy(s->dst, f->dst, alen);
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
    if (s)
        release(s);
    return TUNIO_REASM_DISCARDED;
}

int tunio_reasm_add(struct tunio_reasm *r, const uint8_t *pkt, size_t len, uint64_t now_ms,
                    uint8_t **out, size_t *out_len)
{
    struct frag f;
    if (len < 1 || ((pkt[0] >> 4) == 4 ? parse_v4(pkt, len, &f) : (pkt[0] >> 4) == 6
                                                                        ? parse_v6(pkt, len, &f)
                                                                        : -1) < 0)
        return TUNIO_REASM_DISCARDED;
    /* Every fragment but the last carries a multiple of 8 bytes, and none is empty. */
    if (f.data_len == 0 || (f.more && f.data_len % 8u) || f.offset + f.data_len > PAYLOAD_MAX)
        return TUNIO_REASM_DISCARDED;
    struct slot *s = slot_for(r, &f, now_ms);
    if (!s)
        return TUNIO_REASM_DISCARDED;
    size_t end = f.offset + f.data_len;
    if (!f.more) {
        if ((s->total && s->total != end) || seen_from(s, end))
            return discard(s); /* two different ends, or data past the end */
        s->total = end;
    } else if (s->total && end > s->total) {
        return discard(s);
    }
    if (mark(s, f.offset, f.data_len) < 0)
        return discard(s); /* overlap (or a duplicate): RFC 5722 */
    memcpy(s->buf + HEAD_MAX + f.offset, f.data, f.data_len);
    s->have += f.data_len;
    if (f.offset == 0) {
        memcpy(s->buf + HEAD_MAX - f.head_len, pkt, f.head_len);
        s->head_len = f.head_len;
        s->next_at = f.next_at;
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
