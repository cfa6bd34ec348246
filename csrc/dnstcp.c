/* DNS over TCP (dnstcp.h): the app's stream cut into messages and served by dns.c, the
 * upstream's followed from length to length. */
#include "dnstcp.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "dns.h"

/* A byte buffer: bytes [off, len) are waiting, the rest free. */
struct bytes {
    uint8_t *data;
    size_t off, len, cap;
};

struct tunio_dnstcp {
    struct tunio_dns *dns;
    /* the app's message being read: its length prefix, then its bytes in `msg` */
    uint8_t prefix[2];
    size_t have_prefix; /* 0..2 */
    uint8_t *msg;
    size_t msg_len, msg_have, msg_cap;
    /* the upstream's stream: prefix bytes seen of the current message (0..1), bytes of it left */
    size_t up_prefix;
    uint8_t up_first;
    size_t up_left;
    size_t awaiting; /* queries framed for the upstream, less the messages it sent */
    int no_upstream;
    int queries_taken; /* some query bytes went to the upstream */
    struct bytes answers, queries;
};

static uint16_t get16(const uint8_t *p)
{
    return (uint16_t)(p[0] << 8 | p[1]);
}

/* Appends `n` bytes behind their 2-byte length. */
static int put_framed(struct bytes *b, const uint8_t *p, size_t n)
{
    if (b->off == b->len)
        b->off = b->len = 0;
    if (b->cap - b->len < n + 2) {
        if (b->off) {
            memmove(b->data, b->data + b->off, b->len - b->off);
            b->len -= b->off;
            b->off = 0;
        }
        if (b->cap - b->len < n + 2) {
            size_t cap = b->cap ? b->cap : 1024;
            while (cap - b->len < n + 2)
                cap *= 2;
            uint8_t *d = realloc(b->data, cap);
            if (!d)
                return -ENOMEM;
            b->data = d;
            b->cap = cap;
        }
    }
    b->data[b->len] = (uint8_t)(n >> 8);
    b->data[b->len + 1] = (uint8_t)n;
    memcpy(b->data + b->len + 2, p, n);
    b->len += n + 2;
    return 0;
}

static const uint8_t *view(const struct bytes *b, size_t *len)
{
    *len = b->len - b->off;
    return b->data ? b->data + b->off : b->data;
}

static void take(struct bytes *b, size_t n)
{
    b->off += n < b->len - b->off ? n : b->len - b->off;
    if (b->off == b->len)
        b->off = b->len = 0;
}

int tunio_dnstcp_new(struct tunio_dns *dns, struct tunio_dnstcp **out)
{
    *out = NULL;
    if (!dns)
        return -EINVAL;
    struct tunio_dnstcp *t = calloc(1, sizeof(*t));
    if (!t)
        return -ENOMEM;
    t->dns = dns;
    *out = t;
    return 0;
}

void tunio_dnstcp_free(struct tunio_dnstcp *t)
{
    if (!t)
        return;
    free(t->msg);
    free(t->answers.data);
    free(t->queries.data);
    free(t);
}

/* SERVFAIL for a query the upstream cannot answer, framed into the answers, as the UDP path would
 * answer it: its id and question (a message of another opcode: its id alone). */
static int servfail(struct tunio_dnstcp *t, const uint8_t *m, size_t len)
{
    uint8_t answer[TUNIO_DNS_ANSWER_MAX];
    struct tunio_dns_question q;
    int parsed = tunio_dns_parse(m, len, &q) == TUNIO_DNS_QUERY;
    size_t n =
        tunio_dns_error(m, len, parsed ? &q : NULL, TUNIO_DNS_SERVFAIL, answer, sizeof(answer));
    return n ? put_framed(&t->answers, answer, n) : -EBADMSG;
}

/* One whole message of the app's: answered, framed for the upstream, or the stream's end. */
static int serve(struct tunio_dnstcp *t, const uint8_t *m, size_t len, uint64_t now)
{
    uint8_t answer[TUNIO_DNS_ANSWER_MAX];
    size_t n;
    switch (tunio_dns_message(t->dns, m, len, now, answer, sizeof(answer), &n)) {
    case TUNIO_DNS_REPLY:
        return put_framed(&t->answers, answer, n);
    case TUNIO_DNS_FORWARD:
        if (!t->no_upstream) {
            t->awaiting++;
            return put_framed(&t->queries, m, len);
        }
        return servfail(t, m, len);
    default:
        return -EBADMSG; /* what a datagram would get no answer for: nothing to say here */
    }
}

int tunio_dnstcp_from_app(struct tunio_dnstcp *t, const uint8_t *p, size_t n, uint64_t now)
{
    size_t i = 0;
    while (i < n) {
        if (t->have_prefix < 2) {
            t->prefix[t->have_prefix++] = p[i++];
            if (t->have_prefix < 2)
                continue;
            t->msg_len = get16(t->prefix);
            t->msg_have = 0;
            if (t->msg_len == 0) {
                /* Nothing a datagram could be: counted as tunio_dns_message counts it. */
                tunio_dns_note_malformed(t->dns);
                return -EBADMSG;
            }
        }
        size_t left = t->msg_len - t->msg_have;
        size_t k = n - i < left ? n - i : left;
        if (k == 0)
            break; /* the prefix was the last of these bytes: the message comes with the next */
        const uint8_t *whole = NULL;
        if (t->msg_have == 0 && k == left) {
            whole = p + i; /* all of it in these bytes: served from them, no copy */
        } else {
            /* Grown with the bytes that came, not to the length the prefix claims: a sender
             * that announces 64 KiB and sends two bytes holds 512 of them, not 64 KiB. */
            size_t need = t->msg_have + k;
            if (t->msg_cap < need) {
                size_t cap = t->msg_cap ? t->msg_cap : 512;
                while (cap < need)
                    cap *= 2;
                if (cap > t->msg_len)
                    cap = t->msg_len;
                uint8_t *m = realloc(t->msg, cap);
                if (!m)
                    return -ENOMEM;
                t->msg = m;
                t->msg_cap = cap;
            }
            memcpy(t->msg + t->msg_have, p + i, k);
            if (k == left)
                whole = t->msg;
        }
        t->msg_have += k;
        i += k;
        if (whole) {
            t->have_prefix = 0;
            int err = serve(t, whole, t->msg_len, now);
            if (err)
                return err;
        }
    }
    if (t->have_prefix == 0 && t->msg_cap > 4096) {
        free(t->msg); /* a large message's buffer is not kept between messages */
        t->msg = NULL;
        t->msg_cap = 0;
    }
    return 0;
}

int tunio_dnstcp_app_end(struct tunio_dnstcp *t)
{
    if (t->have_prefix == 0)
        return 0;
    t->have_prefix = 0;
    tunio_dns_note_malformed(t->dns);
    return 1;
}

/* A message of the upstream's ended at offset `at`: one query fewer waits for it. */
static size_t ended(struct tunio_dnstcp *t, size_t first, size_t at)
{
    if (t->awaiting)
        t->awaiting--;
    return first ? first : at;
}

size_t tunio_dnstcp_from_upstream(struct tunio_dnstcp *t, const uint8_t *p, size_t n)
{
    size_t first = 0, i = 0;
    while (i < n) {
        if (t->up_left == 0) {
            /* the length prefix, perhaps split between two calls */
            if (t->up_prefix == 0) {
                t->up_first = p[i++];
                t->up_prefix = 1;
                continue;
            }
            t->up_left = (size_t)(t->up_first << 8 | p[i++]);
            t->up_prefix = 0;
            if (t->up_left == 0)
                first = ended(t, first, i); /* an empty message: whole at once */
            continue;
        }
        size_t k = n - i < t->up_left ? n - i : t->up_left;
        i += k;
        t->up_left -= k;
        if (t->up_left == 0)
            first = ended(t, first, i);
    }
    return first;
}

size_t tunio_dnstcp_awaiting(const struct tunio_dnstcp *t)
{
    return t->awaiting;
}

int tunio_dnstcp_upstream_whole(const struct tunio_dnstcp *t)
{
    return t->up_left == 0 && t->up_prefix == 0;
}

void tunio_dnstcp_no_upstream(struct tunio_dnstcp *t)
{
    t->no_upstream = 1;
}

int tunio_dnstcp_upstream_failed(struct tunio_dnstcp *t)
{
    if (t->queries_taken)
        return -EALREADY;
    /* The queries are whole framed messages from the start (none was taken), each of at most
     * TUNIO_DNSTCP_MESSAGE_MAX bytes: their SERVFAILs, no longer than they are, go into the
     * answers in the order the app sent them. */
    size_t len;
    const uint8_t *q = view(&t->queries, &len);
    for (size_t off = 0, n; off + 2 <= len && (n = get16(q + off)) <= len - off - 2; off += 2 + n) {
        int err = servfail(t, q + off + 2, n);
        if (err)
            return err; /* -ENOMEM: the stream cannot go on (the caller resets it) */
    }
    take(&t->queries, len);
    t->awaiting = 0;
    t->no_upstream = 1;
    return 0;
}

const uint8_t *tunio_dnstcp_answers(const struct tunio_dnstcp *t, size_t *len)
{
    return view(&t->answers, len);
}

void tunio_dnstcp_take_answers(struct tunio_dnstcp *t, size_t n)
{
    take(&t->answers, n);
}

const uint8_t *tunio_dnstcp_queries(const struct tunio_dnstcp *t, size_t *len)
{
    return view(&t->queries, len);
}

void tunio_dnstcp_take_queries(struct tunio_dnstcp *t, size_t n)
{
    if (n)
        t->queries_taken = 1;
    take(&t->queries, n);
}
