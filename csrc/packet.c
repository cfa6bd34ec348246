/* IPv4 packet parsing and building. Every read is bounds-checked against the length read from the
 * device: a malformed packet is reported, never trusted. */
#include "packet.h"

#include <string.h>

#include "checksum.h"

#define IPV4_MIN_HLEN 20u
#define IPV6_HLEN 40u
#define TCP_MIN_HLEN 20u
#define UDP_HLEN 8u
#define ICMP_ECHO_HLEN 8u
#define ICMP_QUOTE_MAX 64u /* payload bytes quoted after the IP header in an ICMP error */

static uint16_t get16(const uint8_t *p)
{
    return (uint16_t)(p[0] << 8 | p[1]);
}
static uint32_t get32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static void put16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}
static void put32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

const char *tunio_pkt_status_name(int status)
{
    switch (status) {
    case TUNIO_PKT_OK:
        return "ok";
    case TUNIO_PKT_TRUNCATED:
        return "truncated";
    case TUNIO_PKT_BAD_HEADER:
        return "bad-header";
    case TUNIO_PKT_FRAGMENT:
        return "fragment";
    case TUNIO_PKT_UNSUPPORTED:
        return "unsupported";
    default:
        return "unknown";
    }
}

static int parse_tcp(struct tunio_pkt *p, const uint8_t *l4)
{
    if (p->l4_len < TCP_MIN_HLEN)
        return TUNIO_PKT_TRUNCATED;
    size_t hlen = (size_t)(l4[12] >> 4) * 4u;
    if (hlen < TCP_MIN_HLEN)
        return TUNIO_PKT_BAD_HEADER;
    if (hlen > p->l4_len)
        return TUNIO_PKT_TRUNCATED;
    p->sport = get16(l4);
    p->dport = get16(l4 + 2);
    p->seq = get32(l4 + 4);
    p->ack = get32(l4 + 8);
    p->tcp_flags = l4[13];
    p->tcp_hlen = hlen;
    p->payload_len = p->l4_len - hlen;
    return TUNIO_PKT_OK;
}

static int parse_udp(struct tunio_pkt *p, const uint8_t *l4)
{
    if (p->l4_len < UDP_HLEN)
        return TUNIO_PKT_TRUNCATED;
    size_t ulen = get16(l4 + 4);
    if (ulen < UDP_HLEN || ulen > p->l4_len)
        return TUNIO_PKT_BAD_HEADER;
    p->sport = get16(l4);
    p->dport = get16(l4 + 2);
    p->payload_len = ulen - UDP_HLEN;
    return TUNIO_PKT_OK;
}

/* ICMP echo requests are carried (a worker pings for the app); their identifier stands in for
 * the source port, so they key sessions like UDP. Other ICMP messages are not ours to carry. */
static int parse_icmp(struct tunio_pkt *p, const uint8_t *l4)
{
    if (p->l4_len < ICMP_ECHO_HLEN)
        return TUNIO_PKT_TRUNCATED;
    uint8_t echo = p->proto == TUNIO_IPPROTO_ICMP ? TUNIO_ICMP_ECHO : TUNIO_ICMPV6_ECHO;
    if (l4[0] != echo || l4[1] != 0)
        return TUNIO_PKT_UNSUPPORTED;
    p->sport = get16(l4 + 4);
    p->dport = 0;
    p->payload_len = p->l4_len;
    return TUNIO_PKT_OK;
}

static int parse_l4(struct tunio_pkt *p)
{
    switch (p->proto) {
    case TUNIO_IPPROTO_TCP:
        return parse_tcp(p, p->buf + p->l3_len);
    case TUNIO_IPPROTO_UDP:
        return parse_udp(p, p->buf + p->l3_len);
    case TUNIO_IPPROTO_ICMP:
        return p->version == 4 ? parse_icmp(p, p->buf + p->l3_len) : TUNIO_PKT_UNSUPPORTED;
    case TUNIO_IPPROTO_ICMPV6:
        return p->version == 6 ? parse_icmp(p, p->buf + p->l3_len) : TUNIO_PKT_UNSUPPORTED;
    default:
        return TUNIO_PKT_UNSUPPORTED;
    }
}

/* IPv6: the fixed header, then the extension headers a packet may carry before its transport
 * header. Hop-by-hop, routing and destination options are skipped; a fragment header means a
 * fragment, for the reassembler (reasm.c); anything else is not ours to carry. */
static int parse_ipv6(struct tunio_pkt *p, size_t len)
{
    const uint8_t *buf = p->buf;
    if (len < IPV6_HLEN)
        return TUNIO_PKT_TRUNCATED;
    size_t total = IPV6_HLEN + get16(buf + 4);
    if (total > len)
        return TUNIO_PKT_TRUNCATED;
    uint8_t next = buf[6];
    size_t off = IPV6_HLEN, next_at = 6;
    for (int hops = 0;; hops++) {
        if (next == TUNIO_IPPROTO_TCP || next == TUNIO_IPPROTO_UDP || next == TUNIO_IPPROTO_ICMPV6)
            break;
        if (next == 44) {
            /* A fragment header cut short leaves a fragment with no payload: discarded. */
            int whole_header = off + 8 <= total;
            p->len = total;
            p->l3_len = off;
            p->proto = whole_header ? buf[off] : 0;
            memcpy(p->src, buf + 8, 16);
            memcpy(p->dst, buf + 24, 16);
            p->frag_data = whole_header ? off + 8 : total;
            if (whole_header) {
                p->frag_offset = get16(buf + off + 2) & 0xfff8u;
                p->frag_more = buf[off + 3] & 1u;
                p->frag_id = (uint32_t)get16(buf + off + 4) << 16 | get16(buf + off + 6);
            }
            p->frag_next_at = next_at;
            return TUNIO_PKT_FRAGMENT;
        }
        if ((next != 0 && next != 43 && next != 60) || hops == 8)
            return TUNIO_PKT_UNSUPPORTED; /* ESP, AH, no next header, or a header chain too long */
        if (off + 8 > total)
            return TUNIO_PKT_TRUNCATED;
        size_t ext = 8u + (size_t)buf[off + 1] * 8u;
        if (off + ext > total)
            return TUNIO_PKT_TRUNCATED;
        next_at = off;
        next = buf[off];
        off += ext;
    }
    p->len = total;
    p->l3_len = off;
    p->l4_len = total - off;
    p->proto = next;
    memcpy(p->src, buf + 8, 16);
    memcpy(p->dst, buf + 24, 16);
    return parse_l4(p);
}

int tunio_pkt_parse(struct tunio_pkt *p, uint8_t *buf, size_t len)
{
    memset(p, 0, sizeof(*p));
    p->buf = buf;
    if (len < 1)
        return TUNIO_PKT_TRUNCATED;
    p->version = buf[0] >> 4;
    if (p->version == 6)
        return parse_ipv6(p, len);
    if (p->version != 4)
        return TUNIO_PKT_BAD_HEADER;
    if (len < IPV4_MIN_HLEN)
        return TUNIO_PKT_TRUNCATED;
    size_t hlen = (size_t)(buf[0] & 0x0f) * 4u;
    size_t total = get16(buf + 2);
    if (hlen < IPV4_MIN_HLEN || total < hlen)
        return TUNIO_PKT_BAD_HEADER;
    if (hlen > len || total > len)
        return TUNIO_PKT_TRUNCATED;
    uint16_t frag = get16(buf + 6);
    p->len = total;
    p->l3_len = hlen;
    p->l4_len = total - hlen;
    p->proto = buf[9];
    memcpy(p->src, buf + 12, 4);
    memcpy(p->dst, buf + 16, 4);
    if (frag & 0x3fff) { /* MF set or a non-zero offset */
        p->frag_data = hlen;
        p->frag_offset = (size_t)(frag & 0x1fff) * 8u;
        p->frag_more = (frag & 0x2000) != 0;
        p->frag_id = get16(buf + 4);
        return TUNIO_PKT_FRAGMENT;
    }
    return parse_l4(p);
}

static size_t l4_csum_offset(const struct tunio_pkt *p)
{
    return p->l3_len + (p->proto == TUNIO_IPPROTO_TCP ? 16u : 6u);
}

void tunio_pkt_rewrite(struct tunio_pkt *p, const uint8_t src[16], uint16_t sport,
                       const uint8_t dst[16], uint16_t dport)
{
    uint8_t *ip = p->buf;
    uint8_t *l4 = ip + p->l3_len;
    uint8_t *l4csum = ip + l4_csum_offset(p);
    /* An IPv4 UDP checksum of 0 means "none" and stays so. */
    int fix_l4 = !(p->proto == TUNIO_IPPROTO_UDP && l4csum[0] == 0 && l4csum[1] == 0);
    size_t alen = p->version == 4 ? 4u : 16u;
    size_t aoff = p->version == 4 ? 12u : 8u; /* source, then destination, in both versions */
    /* The words that change, old and new: both addresses, then both ports. */
    uint8_t old[36], new_[36];
    memcpy(old, ip + aoff, 2 * alen);
    memcpy(new_, src, alen);
    memcpy(new_ + alen, dst, alen);
    memcpy(old + 2 * alen, l4, 4);
    put16(new_ + 2 * alen, sport);
    put16(new_ + 2 * alen + 2, dport);
    if (p->version == 4)
        tunio_csum_replace(ip + 10, old, new_, 8);
    if (fix_l4 && p->partial_csum) {
        /* The field holds the pseudo-header's sum, not complemented, and the ports are summed
         * later with the rest of the segment: only the addresses change it. */
        l4csum[0] = (uint8_t)~l4csum[0];
        l4csum[1] = (uint8_t)~l4csum[1];
        tunio_csum_replace(l4csum, old, new_, 2 * alen);
        l4csum[0] = (uint8_t)~l4csum[0];
        l4csum[1] = (uint8_t)~l4csum[1];
    } else if (fix_l4) {
        tunio_csum_replace(l4csum, old, new_, 2 * alen + 4);
        if (p->proto == TUNIO_IPPROTO_UDP && l4csum[0] == 0 && l4csum[1] == 0)
            l4csum[0] = l4csum[1] = 0xff; /* a computed 0 is sent as all ones in UDP */
    }
    memcpy(ip + aoff, src, alen);
    memcpy(ip + aoff + alen, dst, alen);
    put16(l4, sport);
    put16(l4 + 2, dport);
    memcpy(p->src, src, 16);
    memcpy(p->dst, dst, 16);
    p->sport = sport;
    p->dport = dport;
}

int tunio_pkt_complete_csum(struct tunio_pkt *p, size_t start, size_t offset)
{
    if (start < p->l3_len || start >= p->len || offset + 2 > p->len - start)
        return -1;
    uint8_t *field = p->buf + start + offset;
    uint16_t c = tunio_csum_finish(tunio_csum_add(0, p->buf + start, p->len - start));
    field[0] = (uint8_t)(c >> 8);
    field[1] = (uint8_t)c;
    p->partial_csum = 0;
    return 0;
}

static void build_ipv4(uint8_t *out, size_t total, uint8_t proto, const uint8_t src[16],
                       const uint8_t dst[16])
{
    memset(out, 0, IPV4_MIN_HLEN);
    out[0] = 0x45;
    put16(out + 2, (uint16_t)total);
    put16(out + 6, 0x4000); /* DF */
    out[8] = 64;
    out[9] = proto;
    memcpy(out + 12, src, 4);
    memcpy(out + 16, dst, 4);
    put16(out + 10, tunio_csum_finish(tunio_csum_add(0, out, IPV4_MIN_HLEN)));
}

static void build_ipv6(uint8_t *out, size_t payload_len, uint8_t proto, const uint8_t src[16],
                       const uint8_t dst[16])
{
    memset(out, 0, IPV6_HLEN);
    out[0] = 0x60;
    put16(out + 4, (uint16_t)payload_len);
    out[6] = proto;
    out[7] = 64;
    memcpy(out + 8, src, 16);
    memcpy(out + 24, dst, 16);
}

/* Writes an IP header of `version` for `l4len` transport bytes; returns the header length. */
static size_t build_ip(int version, uint8_t *out, size_t l4len, uint8_t proto,
                       const uint8_t src[16], const uint8_t dst[16])
{
    if (version == 6) {
        build_ipv6(out, l4len, proto, src, dst);
        return IPV6_HLEN;
    }
    build_ipv4(out, IPV4_MIN_HLEN + l4len, proto, src, dst);
    return IPV4_MIN_HLEN;
}

/* The pseudo-header's sum (RFC 793 / RFC 8200 8.1), for a packet whose IP header is at `ip`. */
static uint32_t pseudo_sum(const uint8_t *ip, uint8_t proto, size_t l4len)
{
    uint8_t ph[40];
    size_t n;
    if (ip[0] >> 4 == 6) {
        memcpy(ph, ip + 8, 32);
        put32(ph + 32, (uint32_t)l4len);
        ph[36] = ph[37] = ph[38] = 0;
        ph[39] = proto;
        n = 40;
    } else {
        memcpy(ph, ip + 12, 8);
        ph[8] = 0;
        ph[9] = proto;
        put16(ph + 10, (uint16_t)l4len);
        n = 12;
    }
    return tunio_csum_add(0, ph, n);
}

size_t tunio_pkt_build_rst(const struct tunio_pkt *p, uint8_t *out, size_t cap)
{
    const size_t total = (p->version == 6 ? IPV6_HLEN : IPV4_MIN_HLEN) + TCP_MIN_HLEN;
    if (p->proto != TUNIO_IPPROTO_TCP || (p->tcp_flags & TUNIO_TCP_RST) || cap < total)
        return 0;
    uint8_t *th = out + build_ip(p->version, out, TCP_MIN_HLEN, TUNIO_IPPROTO_TCP, p->dst, p->src);
    memset(th, 0, TCP_MIN_HLEN);
    put16(th, p->dport);
    put16(th + 2, p->sport);
    if (p->tcp_flags & TUNIO_TCP_ACK) {
        /* RFC 9293 3.10.7.1: <SEQ=SEG.ACK><CTL=RST> */
        put32(th + 4, p->ack);
        th[13] = TUNIO_TCP_RST;
    } else {
        /* <SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>; SYN and FIN count in SEG.LEN */
        uint32_t seglen = (uint32_t)p->payload_len + !!(p->tcp_flags & TUNIO_TCP_SYN) +
                          !!(p->tcp_flags & TUNIO_TCP_FIN);
        put32(th + 8, p->seq + seglen);
        th[13] = TUNIO_TCP_RST | TUNIO_TCP_ACK;
    }
    th[12] = (TCP_MIN_HLEN / 4) << 4;
    uint32_t sum = pseudo_sum(out, TUNIO_IPPROTO_TCP, TCP_MIN_HLEN);
    put16(th + 16, tunio_csum_finish(tunio_csum_add(sum, th, TCP_MIN_HLEN)));
    return total;
}

size_t tunio_pkt_build_udp(int version, const uint8_t src[16], uint16_t sport,
                           const uint8_t dst[16], uint16_t dport, const uint8_t *payload,
                           size_t len, uint8_t *out, size_t cap)
{
    size_t hlen = version == 6 ? IPV6_HLEN : IPV4_MIN_HLEN;
    size_t total = hlen + UDP_HLEN + len;
    if (UDP_HLEN + len > 0xffff || (version == 4 && total > 0xffff) || cap < total)
        return 0;
    uint8_t *uh = out + build_ip(version, out, UDP_HLEN + len, TUNIO_IPPROTO_UDP, src, dst);
    put16(uh, sport);
    put16(uh + 2, dport);
    put16(uh + 4, (uint16_t)(UDP_HLEN + len));
    put16(uh + 6, 0);
    if (len)
        memcpy(uh + UDP_HLEN, payload, len);
    uint32_t sum = pseudo_sum(out, TUNIO_IPPROTO_UDP, UDP_HLEN + len);
    uint16_t c = tunio_csum_finish(tunio_csum_add(sum, uh, UDP_HLEN + len));
    put16(uh + 6, c ? c : 0xffff); /* 0 means "no checksum" (and is not allowed over IPv6) */
    return total;
}

size_t tunio_pkt_build_echo(int version, int reply, const uint8_t src[16], const uint8_t dst[16],
                            uint16_t id, uint16_t seq, const uint8_t *data, size_t len,
                            uint8_t *out, size_t cap)
{
    size_t hlen = version == 6 ? IPV6_HLEN : IPV4_MIN_HLEN;
    size_t total = hlen + ICMP_ECHO_HLEN + len;
    if (total > 0xffff || cap < total)
        return 0;
    uint8_t proto = version == 6 ? TUNIO_IPPROTO_ICMPV6 : TUNIO_IPPROTO_ICMP;
    uint8_t *ic = out + build_ip(version, out, ICMP_ECHO_HLEN + len, proto, src, dst);
    if (version == 6)
        ic[0] = reply ? TUNIO_ICMPV6_ECHO_REPLY : TUNIO_ICMPV6_ECHO;
    else
        ic[0] = reply ? TUNIO_ICMP_ECHO_REPLY : TUNIO_ICMP_ECHO;
    ic[1] = 0;
    put16(ic + 2, 0);
    put16(ic + 4, id);
    put16(ic + 6, seq);
    if (len)
        memcpy(ic + ICMP_ECHO_HLEN, data, len);
    uint32_t sum = version == 6 ? pseudo_sum(out, proto, ICMP_ECHO_HLEN + len) : 0;
    put16(ic + 2, tunio_csum_finish(tunio_csum_add(sum, ic, ICMP_ECHO_HLEN + len)));
    return total;
}

size_t tunio_pkt_build_icmp_unreach(const struct tunio_pkt *p, uint8_t code, uint8_t *out,
                                    size_t cap)
{
    int v6 = p->version == 6;
    size_t quote = p->l3_len + (p->l4_len < ICMP_QUOTE_MAX ? p->l4_len : ICMP_QUOTE_MAX);
    size_t head = (v6 ? IPV6_HLEN : IPV4_MIN_HLEN) + 8u;
    /* Long IPv4 options or IPv6 extension headers: quote what fits, as routers do, within the
     * most an error may carry (576 bytes for IPv4, RFC 1812 4.3.2.3; 1280 for IPv6, RFC 4443
     * 2.4), rather than answer nothing and leave the app to its timeout. */
    size_t limit = v6 ? TUNIO_ICMP_ERROR_MAX : 576u;
    if (limit > cap)
        limit = cap;
    if (limit < head + 8u)
        return 0;
    if (head + quote > limit)
        quote = limit - head;
    size_t total = head + quote;
    uint8_t proto = v6 ? TUNIO_IPPROTO_ICMPV6 : TUNIO_IPPROTO_ICMP;
    uint8_t *ic = out + build_ip(p->version, out, 8u + quote, proto, p->dst, p->src);
    memset(ic, 0, 8);
    ic[0] = v6 ? 1 : 3; /* destination unreachable */
    ic[1] = code;
    memcpy(ic + 8, p->buf, quote);
    /* ICMPv6 sums the pseudo-header too (RFC 4443 2.3); ICMPv4 does not. */
    uint32_t sum = v6 ? pseudo_sum(out, proto, 8u + quote) : 0;
    put16(ic + 2, tunio_csum_finish(tunio_csum_add(sum, ic, 8u + quote)));
    return total;
}

int tunio_pkt_verify_checksums(const struct tunio_pkt *p)
{
    if (p->version == 4 && tunio_csum_finish(tunio_csum_add(0, p->buf, p->l3_len)) != 0)
        return -1;
    if (p->proto != TUNIO_IPPROTO_TCP && p->proto != TUNIO_IPPROTO_UDP)
        return 0;
    const uint8_t *l4 = p->buf + p->l3_len;
    if (p->proto == TUNIO_IPPROTO_UDP && l4[6] == 0 && l4[7] == 0)
        return p->version == 4 ? 0 : -1;
    uint32_t sum = pseudo_sum(p->buf, p->proto, p->l4_len);
    return tunio_csum_finish(tunio_csum_add(sum, l4, p->l4_len)) == 0 ? 0 : -1;
}

int tunio_pkt_dst_martian(const struct tunio_pkt *p)
{
    const uint8_t *a = p->dst;
    if (p->version == 4)
        return a[0] == 0 || a[0] == 127 || (a[0] & 0xf0) == 224 ||
               (a[0] == 255 && a[1] == 255 && a[2] == 255 && a[3] == 255);
    static const uint8_t zero[16], mapped[12] = {[10] = 0xff, [11] = 0xff};
    if (a[0] == 0xff || !memcmp(a, mapped, sizeof(mapped)))
        return 1;
    return !memcmp(a, zero, 15) && a[15] <= 1; /* :: and ::1 */
}
