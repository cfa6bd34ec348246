/* Datagram sessions: UDP, and ICMP echo (a worker pings for the app, keyed by the echo's
 * identifier in place of a source port). Readers queue the datagrams they read (bounded,
 * copied); the loop thread owns the session table: it picks a worker for a new (app, destination) pair, forwards DGRAMs within the
 * session's credit, builds the IP/UDP packets of the replies, turns a worker's RST(errno) into
 * the ICMP error the app would have got directly, and expires idle sessions. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common.h"
#include "stack_internal.h"

#define UDP_CREDIT_BATCH 32u  /* credit is returned in batches, and at every tick */
#define UDP_QUEUE_MAX 8192u   /* datagrams waiting for the loop; beyond this they are dropped */
#define UDP_BUCKETS 65536u

struct udp_session {
    uint32_t id;
    int worker;
    uint8_t version;
    uint8_t proto; /* UDP, ICMP or ICMPv6 */
    uint16_t last_seq; /* ICMP: the last echo's sequence number, quoted in errors */
    uint8_t src[16]; /* the app */
    uint8_t dst[16];
    uint16_t sport;
    uint16_t dport;
    uint32_t credit; /* DGRAMs we may still send to the worker */
    uint32_t owed;   /* replies written to the TUN, not yet credited back */
    uint64_t last_ms;
    struct udp_session *by_tuple;
    struct udp_session *by_id;
};

struct udp_item {
    uint8_t *data;
    size_t len;
};

int udp_init(struct tunio_stack *s)
{
    s->udp_tuple = calloc(UDP_BUCKETS, sizeof(*s->udp_tuple));
    s->udp_id = calloc(UDP_BUCKETS, sizeof(*s->udp_id));
    if (!s->udp_tuple || !s->udp_id)
        return -ENOMEM;
    return packet_queue_init(&s->udpq);
}

static uint32_t tuple_hash(const uint8_t *src, uint16_t sport, const uint8_t *dst, uint16_t dport)
{
    /* The protocol is not hashed: an echo's dport is 0, which no UDP datagram has. */
    uint32_t h = 2166136261u;
    for (int i = 0; i < 16; i++)
        h = (h ^ src[i] ^ (uint32_t)dst[i] << 8) * 16777619u;
    h = (h ^ sport ^ (uint32_t)dport << 16) * 16777619u;
    return (h ^ h >> 15) & (UDP_BUCKETS - 1);
}

static uint32_t id_bucket(uint32_t id)
{
    return (id * 2654435761u) >> 16 & (UDP_BUCKETS - 1);
}

static struct udp_session *by_id(struct tunio_stack *s, uint32_t id)
{
    struct udp_session *u = s->udp_id ? s->udp_id[id_bucket(id)] : NULL;
    while (u && u->id != id)
        u = u->by_id;
    return u;
}

static void session_free(struct tunio_stack *s, struct udp_session *u)
{
    struct udp_session **l = &s->udp_tuple[tuple_hash(u->src, u->sport, u->dst, u->dport)];
    while (*l != u)
        l = &(*l)->by_tuple;
    *l = u->by_tuple;
    l = &s->udp_id[id_bucket(u->id)];
    while (*l != u)
        l = &(*l)->by_id;
    *l = u->by_id;
    s->workers[u->worker].flows--;
    s->udp_sessions--;
    free(u);
}

void udp_fini(struct tunio_stack *s)
{
    if (s->udp_id) {
        for (uint32_t b = 0; b < UDP_BUCKETS; b++)
            while (s->udp_id[b])
                session_free(s, s->udp_id[b]);
    }
    free(s->udp_tuple);
    free(s->udp_id);
    if (s->udpq.efd > 0) {
        struct udp_item *items;
        size_t n = packet_queue_take(&s->udpq, (void **)&items);
        for (size_t i = 0; i < n; i++)
            free(items[i].data);
        free(items);
        packet_queue_fini(&s->udpq);
    }
}

/* Reader thread: copy the datagram for the loop. */
void udp_enqueue(struct tunio_stack *s, const struct tunio_pkt *p)
{
    struct udp_item it = {.data = malloc(p->len), .len = p->len};
    if (it.data)
        memcpy(it.data, p->buf, p->len); /* before the push: the loop may take it at once */
    if (!it.data || packet_queue_push(&s->udpq, &it, sizeof(it), UDP_QUEUE_MAX) < 0) {
        free(it.data);
        atomic_fetch_add_explicit(&s->c.udp_dropped, 1, memory_order_relaxed);
    }
}

static struct udp_session *session_for(struct tunio_stack *s, const struct tunio_pkt *p)
{
    uint32_t b = tuple_hash(p->src, p->sport, p->dst, p->dport);
    for (struct udp_session *u = s->udp_tuple[b]; u; u = u->by_tuple)
        if (u->sport == p->sport && u->dport == p->dport && u->proto == p->proto &&
            !memcmp(u->src, p->src, 16) && !memcmp(u->dst, p->dst, 16))
            return u;
    int w = broker_pick_worker(s);
    struct udp_session *u = w >= 0 ? calloc(1, sizeof(*u)) : NULL;
    if (!u) {
        if (w < 0)
            s->c.no_worker++;
        return NULL;
    }
    u->id = tunio_nat_next_id(&s->next_flow_id);
    u->version = p->version;
    u->proto = p->proto;
    u->worker = w;
    memcpy(u->src, p->src, 16);
    memcpy(u->dst, p->dst, 16);
    u->sport = p->sport;
    u->dport = p->dport;
    u->credit = TUNIO_UDP_CREDIT;
    u->by_tuple = s->udp_tuple[b];
    s->udp_tuple[b] = u;
    uint32_t ib = id_bucket(u->id);
    u->by_id = s->udp_id[ib];
    s->udp_id[ib] = u;
    s->workers[w].flows++;
    s->udp_sessions++;
    s->c.udp_sessions_opened++;
    return u;
}

static void forward(struct tunio_stack *s, uint8_t *pkt, size_t len)
{
    struct tunio_pkt p;
    if (tunio_pkt_parse(&p, pkt, len) != TUNIO_PKT_OK)
        return;
    struct udp_session *u = session_for(s, &p);
    if (!u || u->credit == 0) {
        /* No worker, or the worker is behind: UDP's answer to a full queue is a drop. */
        atomic_fetch_add_explicit(&s->c.udp_dropped, 1, memory_order_relaxed);
        return;
    }
    /* The address block and the datagram go out as one payload frame: build it in place. For an
     * echo the "datagram" is the whole ICMP message (type, code, checksum, id, sequence, data). */
    int udp = p.proto == TUNIO_IPPROTO_UDP;
    size_t n = udp ? p.payload_len : p.l4_len;
    uint8_t *msg = malloc(TUNIO_WIRE_ADDR_LEN + n);
    if (!msg) {
        atomic_fetch_add_explicit(&s->c.udp_dropped, 1, memory_order_relaxed);
        return;
    }
    struct tunio_wire_addr a = {.proto = p.proto, .version = p.version,
                                .sport = p.sport, .dport = p.dport};
    memcpy(a.src, p.src, 16);
    memcpy(a.dst, p.dst, 16);
    tunio_wire_encode_addr(msg, &a);
    memcpy(msg + TUNIO_WIRE_ADDR_LEN, pkt + p.l3_len + (udp ? 8 : 0), n);
    if (!udp)
        u->last_seq = (uint16_t)(pkt[p.l3_len + 6] << 8 | pkt[p.l3_len + 7]);
    if (broker_send_owned_cmd(s, u->worker, TUNIO_CMD_DGRAM, u->id, 0, msg,
                              TUNIO_WIRE_ADDR_LEN + n) == 0) {
        u->credit--;
        u->last_ms = tunio_now_ms();
        s->c.udp_to_workers++;
    }
}

void udp_drain(struct tunio_stack *s)
{
    struct udp_item *items;
    size_t n = packet_queue_take(&s->udpq, (void **)&items);
    for (size_t i = 0; i < n; i++) {
        forward(s, items[i].data, items[i].len);
        free(items[i].data);
    }
    free(items);
}

static void return_credit(struct tunio_stack *s, struct udp_session *u)
{
    if (u->owed) {
        broker_send(s, u->worker, TUNIO_CMD_CREDIT, u->id, u->owed, NULL, 0);
        u->owed = 0;
    }
}

static void tell_app(struct tunio_stack *s, const struct udp_session *u, int err)
{
    if (err == 0)
        return; /* an orderly end: nothing to tell the app */
    int code = tunio_nat_icmp_code(u->version, err);
    if (code < 0)
        code = tunio_nat_icmp_code(u->version, EACCES); /* other failures: prohibited */
    /* ICMP quotes the offending datagram's headers; a header of the session's own tuple is
     * what the app's kernel matches its socket by. */
    uint8_t orig[48], out[160];
    size_t n = u->proto == TUNIO_IPPROTO_UDP
                   ? tunio_pkt_build_udp(u->version, u->src, u->sport, u->dst, u->dport, NULL, 0,
                                         orig, sizeof(orig))
                   : tunio_pkt_build_echo(u->version, 0, u->src, u->dst, u->sport, u->last_seq,
                                          NULL, 0, orig, sizeof(orig));
    struct tunio_pkt p;
    if (!n || tunio_pkt_parse(&p, orig, n) != TUNIO_PKT_OK)
        return;
    n = tunio_pkt_build_icmp_unreach(&p, (uint8_t)code, out, sizeof(out));
    if (n)
        stack_tun_write(s, -1, out, n);
}

int udp_on_message(struct tunio_stack *s, int worker, const struct tunio_wire_header *h,
                   zmq_msg_t *payload)
{
    struct udp_session *u = by_id(s, h->flow);
    if (h->cmd != TUNIO_CMD_DGRAM && !u)
        return 0; /* not a UDP session: a TCP flow's message */
    if (!u || u->worker != worker) {
        broker_send(s, worker, TUNIO_CMD_RST, h->flow, ENOTCONN, NULL, 0);
        return 1;
    }
    switch (h->cmd) {
    case TUNIO_CMD_DGRAM: {
        struct tunio_wire_addr a;
        const uint8_t *data = zmq_msg_data(payload);
        size_t len = zmq_msg_size(payload);
        uint8_t *out = s->udp_out;
        if (tunio_wire_decode_addr(data, len, &a) < 0 || a.version != u->version) {
            s->c.protocol_errors++;
            return 1;
        }
        const uint8_t *body = data + TUNIO_WIRE_ADDR_LEN;
        size_t blen = len - TUNIO_WIRE_ADDR_LEN;
        size_t n;
        if (u->proto == TUNIO_IPPROTO_UDP) {
            n = tunio_pkt_build_udp(a.version, a.src, a.sport, a.dst, a.dport, body, blen, out,
                                    TUNIO_TUN_BUF);
        } else if (blen >= 8 && body[1] == 0 &&
                   body[0] == (u->version == 6 ? TUNIO_ICMPV6_ECHO_REPLY : TUNIO_ICMP_ECHO_REPLY)) {
            /* An echo reply: the app's own identifier goes back in (a ping socket's kernel
             * chose its own for the worker), the sequence number and data as they came. */
            uint16_t seq = (uint16_t)(body[6] << 8 | body[7]);
            n = tunio_pkt_build_echo(u->version, 1, a.src, u->src, u->sport, seq, body + 8,
                                     blen - 8, out, TUNIO_TUN_BUF);
        } else {
            n = 0; /* only echo replies answer an echo: anything else a dialer sent is dropped */
            s->c.protocol_errors++;
        }
        if (n) {
            stack_tun_write(s, -1, out, n);
            s->c.udp_from_workers++;
        } else {
            atomic_fetch_add_explicit(&s->c.udp_dropped, 1, memory_order_relaxed);
        }
        u->last_ms = tunio_now_ms();
        if (++u->owed >= UDP_CREDIT_BATCH)
            return_credit(s, u);
        break;
    }
    case TUNIO_CMD_CREDIT:
        u->credit = u->credit + h->arg > TUNIO_UDP_CREDIT ? TUNIO_UDP_CREDIT : u->credit + (uint32_t)h->arg;
        break;
    case TUNIO_CMD_RST:
        tell_app(s, u, h->arg > 4095 ? 0 : (int)h->arg);
        session_free(s, u);
        break;
    default:
        s->c.protocol_errors++;
        break;
    }
    return 1;
}

void udp_tick(struct tunio_stack *s, uint64_t now)
{
    for (uint32_t b = 0; b < UDP_BUCKETS && s->udp_sessions; b++) {
        struct udp_session *u = s->udp_id[b];
        while (u) {
            struct udp_session *next = u->by_id;
            if (now - u->last_ms >= s->cfg.udp_timeout_ms) {
                int worker = u->worker;
                uint32_t id = u->id;
                session_free(s, u); /* gone before the worker hears of it */
                broker_send(s, worker, TUNIO_CMD_RST, id, 0, NULL, 0);
            } else {
                return_credit(s, u);
            }
            u = next;
        }
    }
}

void udp_worker_lost(struct tunio_stack *s, int worker)
{
    for (uint32_t b = 0; b < UDP_BUCKETS && s->udp_sessions; b++) {
        struct udp_session *u = s->udp_id[b];
        while (u) {
            struct udp_session *next = u->by_id;
            if (u->worker == worker)
                session_free(s, u); /* the next datagram opens a session on another worker */
            u = next;
        }
    }
}
