/* libFuzzer target: DNS over TCP (csrc/dnstcp.c). The input's first byte chooses how its other
 * bytes are cut into segments; those bytes are then the app's stream (served in fake-IP mode from
 * a small map: every answer and every query for the upstream must come out whole and framed,
 * some taken before the next segment; with bit 0x40 the upstream's dial fails on the way, and
 * each query that waited for it must come back as one SERVFAIL of its id, none after it going
 * to the upstream) and, again, the upstream's stream, whose message ends must be those a
 * one-pass walk of the lengths finds. */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../csrc/dns.h"
#include "../csrc/dnsmap.h"
#include "../csrc/dnstcp.h"
#include "dns_fixture.h"

static struct tunio_dnsmap *map;
static struct tunio_dns *dns;
static uint64_t clock_ms = 1;

static void setup(void)
{
    struct tunio_dnsmap_config mc = {
        .net4 = {198, 18, 0, 0}, .len4 = 28, .net6 = {0xfd, 0, 0x74}, .len6 = 124, .hold_ms = 3};
    dns_fixture(&mc, clock_ms, &map, &dns);
}

/* Framed messages, whole, each of at least a header; an answer's QR bit set. */
static void check_frames(const uint8_t *p, size_t len, int answers)
{
    size_t off = 0;
    while (off < len) {
        if (len - off < 2)
            __builtin_trap();
        size_t n = (size_t)(p[off] << 8 | p[off + 1]);
        if (n < TUNIO_DNS_HEADER || n > len - off - 2 || (answers && !(p[off + 4] & 0x80)))
            __builtin_trap();
        off += 2 + n;
    }
}

/* The upstream's dial fails: each query waiting for it (whole, framed: none taken yet) must be
 * answered by one SERVFAIL with its id, behind the answers made before, and none left. 0, or -1
 * if the stream cannot go on (no memory). */
static int fail_dial(struct tunio_dnstcp *t)
{
    size_t qlen, alen, nq = 0;
    const uint8_t *q = tunio_dnstcp_queries(t, &qlen);
    uint16_t *ids = malloc((qlen / (2 + TUNIO_DNS_HEADER) + 1) * sizeof(*ids));
    if (!ids)
        return -1;
    for (size_t off = 0; off < qlen; off += 2 + (size_t)(q[off] << 8 | q[off + 1]))
        ids[nq++] = (uint16_t)(q[off + 2] << 8 | q[off + 3]);
    tunio_dnstcp_answers(t, &alen);
    size_t off = alen, i = 0;
    int err = tunio_dnstcp_upstream_failed(t);
    if (err != 0 && err != -ENOMEM)
        __builtin_trap();
    const uint8_t *a = tunio_dnstcp_answers(t, &alen);
    tunio_dnstcp_queries(t, &qlen);
    if (!err && (qlen != 0 || tunio_dnstcp_awaiting(t) != 0))
        __builtin_trap();
    for (; !err && off < alen; i++) {
        if (i == nq || a[off + 2] != ids[i] >> 8 || a[off + 3] != (uint8_t)ids[i] ||
            (a[off + 5] & 0xf) != TUNIO_DNS_SERVFAIL)
            __builtin_trap();
        off += 2 + (size_t)(a[off] << 8 | a[off + 1]);
    }
    if (!err && i != nq)
        __builtin_trap();
    free(ids);
    return err ? -1 : 0;
}

static size_t next_cut(uint32_t *state, size_t left)
{
    *state = *state * 1103515245u + 12345u;
    size_t n = 1 + (*state >> 16) % 97;
    return n < left ? n : left;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!map)
        setup();
    if (size < 1)
        return 0;
    uint32_t seed = data[0];
    const uint8_t *s = data + 1;
    size_t n = size - 1;
    clock_ms += 1 + (seed & 3);

    struct tunio_dnstcp *t;
    if (tunio_dnstcp_new(dns, &t) != 0)
        abort();
    uint32_t state = seed;
    int tried = 0, failed = 0, taken = 0;
    for (size_t off = 0; off < n;) {
        size_t k = next_cut(&state, n - off);
        int err = tunio_dnstcp_from_app(t, s + off, k, clock_ms);
        if (err != 0 && err != -EBADMSG && err != -ENOMEM)
            __builtin_trap();
        size_t alen, qlen;
        const uint8_t *a = tunio_dnstcp_answers(t, &alen);
        const uint8_t *q = tunio_dnstcp_queries(t, &qlen);
        check_frames(a, alen, 1);
        check_frames(q, qlen, 0);
        if (qlen > off + k) /* the queries are the app's own bytes */
            __builtin_trap();
        if (failed && qlen)
            __builtin_trap(); /* after a failed dial nothing waits for the upstream */
        if ((seed & 0x40) && !tried && ((state & 0x400) || off + k == n)) {
            tried = 1;
            if (taken) {
                /* some went to an upstream: no dial failed, nothing may change */
                if (tunio_dnstcp_upstream_failed(t) != -EALREADY)
                    __builtin_trap();
            } else if (fail_dial(t) < 0) {
                break;
            } else {
                failed = 1;
            }
            a = tunio_dnstcp_answers(t, &alen);
            q = tunio_dnstcp_queries(t, &qlen);
            check_frames(a, alen, 1);
            check_frames(q, qlen, 0);
        }
        if (state & 0x100)
            tunio_dnstcp_take_answers(t, alen);
        if (state & 0x200) {
            taken |= qlen != 0;
            tunio_dnstcp_take_queries(t, qlen);
        }
        if (err)
            break;
        off += k;
    }
    if (seed & 0x80)
        tunio_dnstcp_no_upstream(t);
    tunio_dnstcp_app_end(t);
    tunio_dnstcp_free(t);

    /* The same bytes as the upstream's stream. */
    if (tunio_dnstcp_new(dns, &t) != 0)
        abort();
    size_t walk = 0;          /* the first message end past the bytes given so far, by a walk */
    size_t pos = 0, ends = 0; /* ends: the last message end up to the bytes given so far */
    for (size_t off = 0; off < n;) {
        size_t k = next_cut(&state, n - off);
        size_t first = tunio_dnstcp_from_upstream(t, s + off, k);
        /* the first end in (off, off + k] */
        while (walk <= off && pos + 2 <= n) {
            walk = pos + 2 + (size_t)(s[pos] << 8 | s[pos + 1]);
            pos = walk;
        }
        size_t want = walk > off && walk <= off + k && walk <= n ? walk - off : 0;
        if (first != want)
            __builtin_trap();
        /* whole exactly when off + k is a message end */
        while (ends + 2 <= off + k && ends + 2 + (size_t)(s[ends] << 8 | s[ends + 1]) <= off + k)
            ends += 2 + (size_t)(s[ends] << 8 | s[ends + 1]);
        if (tunio_dnstcp_upstream_whole(t) != (ends == off + k))
            __builtin_trap();
        off += k;
    }
    tunio_dnstcp_free(t);
    return 0;
}
