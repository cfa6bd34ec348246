/* The stack's DNS (dns.h): a strict parser of the one question of a query (RFC 1035 §4.1; no
 * compression pointer can appear before the question, so none is taken), answers built from the
 * query's own bytes, and the readers' entry point. */
#include "dns.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "dnsmap.h"
#include "packet.h"

#define DNS_QR 0x8000u
#define DNS_RD 0x0100u
#define DNS_RA 0x0080u
#define DNS_OPCODE(f) (((f) >> 11) & 0xfu)

struct tunio_dns {
    struct tunio_dns_config cfg;
    struct tunio_dns_counters n;
};

static uint16_t get16(const uint8_t *p)
{
    return (uint16_t)(p[0] << 8 | p[1]);
}

static void put16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static int plain_char(uint8_t c)
{
    return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' || c == '_';
}

int tunio_dns_parse(const uint8_t *msg, size_t len, struct tunio_dns_question *q)
{
    memset(q, 0, offsetof(struct tunio_dns_question, name));
    q->name[0] = 0;
    if (len < TUNIO_DNS_HEADER)
        return TUNIO_DNS_IGNORE;
    q->id = get16(msg);
    q->flags = get16(msg + 2);
    if (q->flags & DNS_QR)
        return TUNIO_DNS_IGNORE; /* a response: never answered, so no two resolvers can loop */
    if (DNS_OPCODE(q->flags) != 0)
        return TUNIO_DNS_OTHER; /* NOTIFY, UPDATE, ...: the upstream's business */
    if (get16(msg + 4) != 1)
        return TUNIO_DNS_BAD;
    size_t off = TUNIO_DNS_HEADER, n = 0;
    int plain = 1;
    for (;;) {
        if (off >= len)
            return TUNIO_DNS_BAD;
        uint8_t l = msg[off++];
        if (l == 0)
            break;
        if (l & 0xc0)
            return TUNIO_DNS_BAD; /* a pointer (nothing before the question to point at) or an
                                     extended label type */
        if (l > len - off || n + (n ? 1 : 0) + l > TUNIO_DNSMAP_NAME_MAX)
            return TUNIO_DNS_BAD;
        if (n)
            q->name[n++] = '.';
        for (uint8_t i = 0; i < l; i++) {
            uint8_t c = msg[off + i];
            if (c >= 'A' && c <= 'Z')
                c = (uint8_t)(c - 'A' + 'a');
            plain &= plain_char(c);
            q->name[n++] = (char)c;
        }
        off += l;
    }
    q->name[n] = 0;
    if (len - off < 4)
        return TUNIO_DNS_BAD;
    q->qtype = get16(msg + off);
    q->qclass = get16(msg + off + 2);
    q->end = off + 4;
    q->name_len = n;
    q->plain = plain && n > 0;
    return TUNIO_DNS_QUERY;
}

static size_t header_of(const uint8_t *msg, uint16_t flags_in, int rcode, uint16_t qd, uint16_t an,
                        uint8_t *out)
{
    memcpy(out, msg, 2); /* the id */
    uint16_t flags =
        (uint16_t)(DNS_QR | (flags_in & 0x7800u) | (flags_in & DNS_RD) | DNS_RA | (rcode & 0xf));
    put16(out + 2, flags);
    put16(out + 4, qd);
    put16(out + 6, an);
    put16(out + 8, 0);
    put16(out + 10, 0);
    return TUNIO_DNS_HEADER;
}

size_t tunio_dns_answer(const uint8_t *msg, const struct tunio_dns_question *q, const uint8_t *addr,
                        size_t addr_len, uint32_t ttl, uint8_t *out, size_t cap)
{
    size_t rr = addr ? 12 + addr_len : 0;
    if (q->end < TUNIO_DNS_HEADER || q->end + rr > cap || (addr && addr_len != 4 && addr_len != 16))
        return 0;
    header_of(msg, q->flags, 0, 1, addr ? 1 : 0, out);
    memcpy(out + TUNIO_DNS_HEADER, msg + TUNIO_DNS_HEADER, q->end - TUNIO_DNS_HEADER);
    if (!addr)
        return q->end;
    uint8_t *r = out + q->end;
    put16(r, 0xc000u | TUNIO_DNS_HEADER); /* the name: the question's */
    put16(r + 2, q->qtype);
    put16(r + 4, TUNIO_DNS_CLASS_IN);
    put16(r + 6, (uint16_t)(ttl >> 16));
    put16(r + 8, (uint16_t)ttl);
    put16(r + 10, (uint16_t)addr_len);
    memcpy(r + 12, addr, addr_len);
    return q->end + rr;
}

size_t tunio_dns_error(const uint8_t *msg, size_t len, const struct tunio_dns_question *q,
                       int rcode, uint8_t *out, size_t cap)
{
    if (len < TUNIO_DNS_HEADER || cap < TUNIO_DNS_HEADER)
        return 0;
    int with_q = q && q->end >= TUNIO_DNS_HEADER && q->end <= len && q->end <= cap;
    header_of(msg, get16(msg + 2), rcode, with_q ? 1 : 0, 0, out);
    if (!with_q)
        return TUNIO_DNS_HEADER;
    memcpy(out + TUNIO_DNS_HEADER, msg + TUNIO_DNS_HEADER, q->end - TUNIO_DNS_HEADER);
    return q->end;
}

/* ---- the server ---- */

int tunio_dns_new(const struct tunio_dns_config *cfg, struct tunio_dns **out)
{
    *out = NULL;
    if (cfg->mode == TUNIO_DNS_FAKE_IP && !cfg->map)
        return -EINVAL;
    struct tunio_dns *d = calloc(1, sizeof(*d));
    if (!d)
        return -ENOMEM;
    d->cfg = *cfg;
    atomic_init(&d->n.answered, 0);
    atomic_init(&d->n.forwarded, 0);
    atomic_init(&d->n.malformed, 0);
    *out = d;
    return 0;
}

void tunio_dns_free(struct tunio_dns *d)
{
    free(d);
}

int tunio_dns_mode(const struct tunio_dns *d)
{
    return d ? d->cfg.mode : TUNIO_DNS_OFF;
}

static int is_dns_address(const struct tunio_dns *d, int version, const uint8_t dst[16])
{
    int v = version == 6;
    return d->cfg.has_address[v] && !memcmp(dst, d->cfg.address[v], v ? 16 : 4);
}

int tunio_dns_serves_tcp(const struct tunio_dns *d, int version, const uint8_t dst[16],
                         uint16_t dport)
{
    return d && dport == TUNIO_DNS_PORT && d->cfg.mode == TUNIO_DNS_FAKE_IP &&
           is_dns_address(d, version, dst);
}

int tunio_dns_to_upstream(const struct tunio_dns *d, int version, const uint8_t dst[16],
                          uint16_t dport)
{
    if (!d || dport != TUNIO_DNS_PORT)
        return 0;
    if (d->cfg.mode == TUNIO_DNS_HIJACK)
        return 1;
    return d->cfg.mode == TUNIO_DNS_FAKE_IP && is_dns_address(d, version, dst);
}

const struct tunio_dns_counters *tunio_dns_counters(const struct tunio_dns *d)
{
    return &d->n;
}

static void count(atomic_ullong *c)
{
    atomic_fetch_add_explicit(c, 1, memory_order_relaxed);
}

/* The answer to a parsed A/AAAA query of a plain name, from the map. */
static size_t answer_from_map(struct tunio_dns *d, const uint8_t *msg,
                              const struct tunio_dns_question *q, uint64_t now, uint8_t *out,
                              size_t cap)
{
    int version = q->qtype == TUNIO_DNS_TYPE_AAAA ? 6 : 4;
    uint32_t index;
    if (tunio_dnsmap_resolve(d->cfg.map, q->name, q->name_len, now, &index) < 0)
        return tunio_dns_error(msg, q->end, q, TUNIO_DNS_SERVFAIL, out, cap); /* pool held */
    uint8_t addr[16];
    if (!d->cfg.carries[version == 6] || tunio_dnsmap_address(d->cfg.map, index, version, addr) < 0)
        return tunio_dns_answer(msg, q, NULL, 0, d->cfg.ttl, out, cap); /* no such family here */
    return tunio_dns_answer(msg, q, addr, version == 6 ? 16 : 4, d->cfg.ttl, out, cap);
}

enum tunio_dns_verdict tunio_dns_message(struct tunio_dns *d, const uint8_t *msg, size_t len,
                                         uint64_t now, uint8_t *out, size_t cap, size_t *out_len)
{
    *out_len = 0;
    struct tunio_dns_question q;
    size_t n = 0;
    switch (tunio_dns_parse(msg, len, &q)) {
    case TUNIO_DNS_QUERY:
        if ((q.qtype == TUNIO_DNS_TYPE_A || q.qtype == TUNIO_DNS_TYPE_AAAA) &&
            q.qclass == TUNIO_DNS_CLASS_IN && q.plain) {
            n = answer_from_map(d, msg, &q, now, out, cap);
            if (n)
                count(&d->n.answered);
            break;
        }
        count(&d->n.forwarded);
        return TUNIO_DNS_FORWARD;
    case TUNIO_DNS_OTHER:
        count(&d->n.forwarded);
        return TUNIO_DNS_FORWARD;
    case TUNIO_DNS_BAD:
        count(&d->n.malformed);
        n = tunio_dns_error(msg, len, NULL, TUNIO_DNS_FORMERR, out, cap);
        break;
    default:
        count(&d->n.malformed);
        return TUNIO_DNS_DROP;
    }
    *out_len = n;
    return n ? TUNIO_DNS_REPLY : TUNIO_DNS_DROP;
}

void tunio_dns_note_malformed(struct tunio_dns *d)
{
    count(&d->n.malformed);
}

enum tunio_dns_verdict tunio_dns_serve(struct tunio_dns *d, const struct tunio_pkt *p, uint64_t now,
                                       uint8_t *out, size_t cap, size_t *out_len)
{
    *out_len = 0;
    if (!d || p->proto != TUNIO_IPPROTO_UDP || p->dport != TUNIO_DNS_PORT)
        return TUNIO_DNS_PASS;
    if (d->cfg.mode == TUNIO_DNS_HIJACK) {
        count(&d->n.forwarded);
        return TUNIO_DNS_FORWARD;
    }
    if (d->cfg.mode != TUNIO_DNS_FAKE_IP || !is_dns_address(d, p->version, p->dst))
        return TUNIO_DNS_PASS;
    uint8_t answer[TUNIO_DNS_ANSWER_MAX];
    size_t n;
    enum tunio_dns_verdict v = tunio_dns_message(d, p->buf + p->l3_len + 8, p->payload_len, now,
                                                 answer, sizeof(answer), &n);
    if (v != TUNIO_DNS_REPLY)
        return v;
    *out_len = tunio_pkt_build_udp(p->version, p->dst, TUNIO_DNS_PORT, p->src, p->sport, answer, n,
                                   out, cap);
    return *out_len ? TUNIO_DNS_REPLY : TUNIO_DNS_DROP;
}
