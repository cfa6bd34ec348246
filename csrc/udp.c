/* Datagram sessions: UDP, and ICMP echo (a worker pings for the app, keyed by the echo's
 * identifier in place of a source port). Readers queue the datagrams they read (bounded,
 * copied); the loop thread owns the session table: it picks a worker for a new (app,
 * destination) pair, forwards DGRAMs within the session's credit, builds the IP/UDP packets of
 * the replies, turns a worker's RST(errno) into the ICMP error the app would have got directly,
 * and expires idle sessions. What is in flight to the workers is bounded three ways: datagrams per
 * session (the credit), bytes per session, and bytes per worker, all sessions together (its
 * ROUTER queue is unbounded); past a bound a datagram is dropped and counted. */
#include "udp.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "defaults.h"
#include "dnsmap.h"
#include "link.h"
#include "nat.h"
#include "packet.h"
#include "queue.h"
#include "tun.h"
#include "tunio.h"
#include "wire.h"

#define UDP_CREDIT_BATCH 32u /* credit is returned in batches, and at every tick */
#define UDP_QUEUE_MAX 8192u  /* datagrams waiting for the loop; beyond this they are dropped */
#define UDP_BUCKETS 65536u

struct udp_session {
    uint32_t id;
    int worker;
    uint8_t version;
    uint8_t proto;     /* UDP, ICMP or ICMPv6 */
    uint16_t last_seq; /* ICMP: the last echo's sequence number, quoted in errors */
    uint8_t src[16];   /* the app */
    uint8_t dst[16];
    uint16_t sport;
    uint16_t dport;
    /* DGRAMs sent to the worker and not yet credited back (at most TUNIO_UDP_CREDIT), and their
     * cost (dgram_cost) in all. The worker credits in datagrams, in the order they came, so
     * CREDIT n answers the oldest n: their costs wait in a ring, oldest at `first`, which grows
     * with the most the session ever had in flight (most sessions, DNS among them, have one or
     * two: a ring of TUNIO_UDP_CREDIT for each would cost 1 KiB a session). */
    uint32_t inflight;
    uint32_t bytes;
    uint32_t *costs;
    uint32_t cap;
    uint32_t first;
    uint32_t owed; /* replies written to the TUN, not yet credited back */
    uint64_t last_ms;
    int upstream; /* DNS to the upstream resolver: replies come from dst */
    int fake;     /* to a fake-IP address: holds map entry fake_index */
    uint32_t fake_index;
    struct udp_session *by_tuple;
    struct udp_session *by_id;
};

struct tunio_udp {
    struct tunio_udp_config cfg;
    struct tunio_queue *queue; /* struct tunio_dgram, from the readers */
    struct udp_session **tuple;
    struct udp_session **ids;
    uint32_t sessions;
    uint8_t *out; /* where reply packets are built */
    uint64_t sessions_opened;
    uint64_t to_workers;
    uint64_t from_workers;
    uint64_t dropped;
    uint64_t no_worker;
    uint64_t protocol_errors;
    uint64_t names_sent;
    uint64_t no_name;
    uint64_t dropped_backlog; /* at a session's or a worker's byte bound (also in `dropped`) */
    uint64_t worker_bytes[TUNIO_MAX_WORKERS]; /* the costs its sessions have in flight */
};

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

static struct udp_session *by_id(struct tunio_udp *u, uint32_t id)
{
    struct udp_session *s = u->ids[id_bucket(id)];
    while (s && s->id != id)
        s = s->by_id;
    return s;
}

/* ---- bytes in flight ---- */

/* What a DGRAM of `frame` payload bytes holds in its worker's queue until credited back. */
static uint32_t dgram_cost(size_t frame)
{
    return (uint32_t)frame + TUNIO_UDP_DGRAM_OVERHEAD;
}

/* Whether the worker takes a DGRAM of `cost` now. With nothing in flight it always does: a bound
 * below one large datagram must not refuse it for good. */
static int worker_has_room(const struct tunio_udp *u, int worker, uint32_t cost)
{
    uint64_t b = u->worker_bytes[worker];
    return b == 0 || b + cost <= u->cfg.worker_backlog;
}

static int session_has_room(const struct udp_session *s, uint32_t cost)
{
    return s->inflight == 0 || s->bytes + cost <= TUNIO_UDP_SESSION_BYTES;
}

/* Room in the ring for one more (the credit check comes first: inflight < TUNIO_UDP_CREDIT). */
static int ring_reserve(struct udp_session *s)
{
    if (s->inflight < s->cap)
        return 0;
    uint32_t cap = s->cap ? s->cap * 2 : 4;
    if (cap > TUNIO_UDP_CREDIT)
        cap = TUNIO_UDP_CREDIT;
    uint32_t *costs = malloc(cap * sizeof(*costs));
    if (!costs)
        return -ENOMEM;
    for (uint32_t i = 0; i < s->inflight; i++)
        costs[i] = s->costs[(s->first + i) % s->cap];
    free(s->costs);
    s->costs = costs;
    s->cap = cap;
    s->first = 0;
    return 0;
}

static void sent(struct tunio_udp *u, struct udp_session *s, uint32_t cost)
{
    s->costs[(s->first + s->inflight) % s->cap] = cost;
    s->inflight++;
    s->bytes += cost;
    u->worker_bytes[s->worker] += cost;
}

/* CREDIT n from the worker: the oldest n DGRAMs left its queue. More than is in flight is a
 * worker's mistake, and counts for no more. */
static void credited(struct tunio_udp *u, struct udp_session *s, uint64_t n)
{
    for (; n && s->inflight; n--) {
        uint32_t cost = s->costs[s->first];
        s->first = (s->first + 1) % s->cap;
        s->inflight--;
        s->bytes -= cost;
        u->worker_bytes[s->worker] -= cost;
    }
}

/* ---- sessions ---- */

/* Every end of a session comes here (RST, expiry, its worker lost, the stack stopping): what it
 * had in flight leaves its worker's bytes, which would otherwise starve that worker for good. */
static void session_free(struct tunio_udp *u, struct udp_session *s)
{
    struct udp_session **l = &u->tuple[tuple_hash(s->src, s->sport, s->dst, s->dport)];
    while (*l != s)
        l = &(*l)->by_tuple;
    *l = s->by_tuple;
    l = &u->ids[id_bucket(s->id)];
    while (*l != s)
        l = &(*l)->by_id;
    *l = s->by_id;
    tunio_link_load(u->cfg.link, s->worker, -1);
    u->worker_bytes[s->worker] -= s->bytes;
    free(s->costs);
    tunio_nat_put_flow(u->cfg.limits);
    if (s->fake)
        tunio_dnsmap_release(u->cfg.map, s->fake_index, tunio_now_ms());
    u->sessions--;
    free(s);
}

int tunio_udp_new(const struct tunio_udp_config *cfg, struct tunio_udp **out)
{
    *out = NULL;
    struct tunio_udp *u = calloc(1, sizeof(*u));
    if (!u)
        return -ENOMEM;
    u->cfg = *cfg;
    u->tuple = calloc(UDP_BUCKETS, sizeof(*u->tuple));
    u->ids = calloc(UDP_BUCKETS, sizeof(*u->ids));
    u->out = malloc(TUNIO_TUN_BUF);
    int err = u->tuple && u->ids && u->out
                  ? tunio_queue_new(sizeof(struct tunio_dgram), UDP_QUEUE_MAX, &u->queue)
                  : -ENOMEM;
    if (err) {
        tunio_udp_free(u);
        return err;
    }
    *out = u;
    return 0;
}

void tunio_udp_free(struct tunio_udp *u)
{
    if (!u)
        return;
    if (u->ids && u->tuple) {
        for (uint32_t b = 0; b < UDP_BUCKETS; b++)
            while (u->ids[b])
                session_free(u, u->ids[b]);
    }
    free(u->tuple);
    free(u->ids);
    if (u->queue) {
        struct tunio_dgram *items;
        size_t n = tunio_queue_take(u->queue, (void **)&items);
        for (size_t i = 0; i < n; i++)
            free(items[i].data);
        free(items);
        tunio_queue_free(u->queue);
    }
    free(u->out);
    free(u);
}

struct tunio_queue *tunio_udp_queue(struct tunio_udp *u)
{
    return u->queue;
}

/* The ICMP destination unreachable (`code`) answering `p` goes into the TUN, to its app. */
static void send_unreach(struct tunio_udp *u, const struct tunio_pkt *p, int code)
{
    uint8_t out[TUNIO_ICMP_ERROR_MAX];
    size_t n = tunio_pkt_build_icmp_unreach(p, (uint8_t)code, out, sizeof(out));
    if (n)
        tunio_tun_write(u->cfg.tun, -1, out, n);
}

/* A new session past --max-flows: refused as a host without that service would refuse it, with
 * ICMP port unreachable (an echo: administratively prohibited), so a connected socket in the app
 * sees ECONNREFUSED at once. */
static void refuse(struct tunio_udp *u, const struct tunio_pkt *p)
{
    int code =
        tunio_nat_icmp_code(p->version, p->proto == TUNIO_IPPROTO_UDP ? ECONNREFUSED : EACCES);
    send_unreach(u, p, code);
}

/* A session to a fake-IP address: its name goes to the worker before its first DGRAM, and the
 * address is held while the session lives. 0, or -1 when the app is refused (no name has that
 * address any more, or the worker cannot take a name): it sees ICMP host unreachable. */
static int name_session(struct tunio_udp *u, struct udp_session *s, const struct tunio_pkt *p)
{
    uint32_t index;
    if (!tunio_dnsmap_lookup(u->cfg.map, p->version, p->dst, &index))
        return 0;
    char name[TUNIO_WIRE_DNS_NAME_MAX + 1];
    int n = tunio_dnsmap_acquire(u->cfg.map, index, tunio_now_ms(), name, sizeof(name));
    int named = n > 0 && (tunio_link_features(u->cfg.link, s->worker) & TUNIO_WIRE_FEATURE_NAMES);
    if (named &&
        tunio_link_send(u->cfg.link, s->worker, TUNIO_CMD_NAME, s->id, 0, name, (size_t)n) < 0)
        named = 0;
    if (!named) {
        if (n > 0)
            tunio_dnsmap_release(u->cfg.map, index, tunio_now_ms());
        if (u->no_name++ == 0 || tunio_log_enabled(TUNIO_LOG_DEBUG))
            tunio_log(TUNIO_LOG_WARNING, "a UDP session to a fake-IP address refused: %s",
                      n > 0 ? "its worker takes no names (protocol feature NAME)"
                            : "no name has that address now");
        return -1;
    }
    s->fake = 1;
    s->fake_index = index;
    u->names_sent++;
    return 0;
}

/* The packet's session, opened if new; NULL if it has none now. A new session whose worker has no
 * room for its first DGRAM (of `cost`) is not opened: it would send its worker a NAME, and end
 * with a RST, for each datagram it drops. */
static struct udp_session *session_for(struct tunio_udp *u, const struct tunio_pkt *p, int upstream,
                                       uint32_t cost)
{
    uint32_t b = tuple_hash(p->src, p->sport, p->dst, p->dport);
    for (struct udp_session *s = u->tuple[b]; s; s = s->by_tuple)
        if (s->sport == p->sport && s->dport == p->dport && s->proto == p->proto &&
            !memcmp(s->src, p->src, 16) && !memcmp(s->dst, p->dst, 16))
            return s;
    int w = tunio_link_pick(u->cfg.link);
    if (w < 0) {
        u->no_worker++;
        return NULL;
    }
    if (!worker_has_room(u, w, cost)) {
        u->dropped_backlog++;
        return NULL;
    }
    if (tunio_nat_take_flow(u->cfg.limits) < 0) {
        refuse(u, p);
        return NULL;
    }
    struct udp_session *s = calloc(1, sizeof(*s));
    if (!s) {
        tunio_nat_put_flow(u->cfg.limits);
        return NULL;
    }
    s->id = tunio_nat_next_id(u->cfg.next_id);
    s->version = p->version;
    s->proto = p->proto;
    s->worker = w;
    memcpy(s->src, p->src, 16);
    memcpy(s->dst, p->dst, 16);
    s->sport = p->sport;
    s->dport = p->dport;
    s->upstream = upstream;
    if (!upstream && name_session(u, s, p) < 0) {
        tunio_nat_put_flow(u->cfg.limits);
        free(s);
        send_unreach(u, p, tunio_nat_icmp_code(p->version, EHOSTUNREACH));
        return NULL;
    }
    s->by_tuple = u->tuple[b];
    u->tuple[b] = s;
    uint32_t ib = id_bucket(s->id);
    s->by_id = u->ids[ib];
    u->ids[ib] = s;
    tunio_link_load(u->cfg.link, w, +1);
    u->sessions++;
    u->sessions_opened++;
    return s;
}

static void forward(struct tunio_udp *u, uint8_t *pkt, size_t len, int upstream)
{
    struct tunio_pkt p;
    if (tunio_pkt_parse(&p, pkt, len) != TUNIO_PKT_OK)
        return;
    if (upstream && (!u->cfg.upstream_version || p.proto != TUNIO_IPPROTO_UDP)) {
        u->dropped++; /* no resolver to send it to */
        return;
    }
    /* The address block and the datagram go out as one payload frame: built in place below. For
     * an echo the "datagram" is the whole ICMP message (type, code, checksum, id, sequence, data). */
    int udp = p.proto == TUNIO_IPPROTO_UDP;
    size_t n = udp ? p.payload_len : p.l4_len;
    uint32_t cost = dgram_cost(TUNIO_WIRE_ADDR_LEN + n);
    struct udp_session *s = session_for(u, &p, upstream, cost);
    /* No worker, or the worker is behind: UDP's answer to a full queue is a drop. */
    if (!s || s->inflight == TUNIO_UDP_CREDIT) {
        u->dropped++;
        return;
    }
    if (!session_has_room(s, cost) || !worker_has_room(u, s->worker, cost)) {
        u->dropped++;
        u->dropped_backlog++;
        return;
    }
    uint8_t *msg = ring_reserve(s) == 0 ? malloc(TUNIO_WIRE_ADDR_LEN + n) : NULL;
    if (!msg) {
        u->dropped++;
        return;
    }
    struct tunio_wire_addr a = {
        .proto = p.proto, .version = p.version, .sport = p.sport, .dport = p.dport};
    memcpy(a.src, p.src, 16);
    memcpy(a.dst, p.dst, 16);
    if (s->upstream) {
        /* The worker sends it to the resolver; the app's address goes along only when it is of
         * the resolver's family (it is for the policy, the worker never sends to it). */
        a.version = u->cfg.upstream_version;
        memcpy(a.dst, u->cfg.upstream, 16);
        a.dport = u->cfg.upstream_port;
        if (a.version != p.version)
            memset(a.src, 0, 16);
    }
    tunio_wire_encode_addr(msg, &a);
    memcpy(msg + TUNIO_WIRE_ADDR_LEN, pkt + p.l3_len + (udp ? 8 : 0), n);
    if (!udp)
        s->last_seq = (uint16_t)(pkt[p.l3_len + 6] << 8 | pkt[p.l3_len + 7]);
    if (tunio_link_send_owned(u->cfg.link, s->worker, TUNIO_CMD_DGRAM, s->id, 0, msg,
                              TUNIO_WIRE_ADDR_LEN + n) == 0) {
        sent(u, s, cost);
        s->last_ms = tunio_now_ms();
        u->to_workers++;
    }
}

void tunio_udp_drain(struct tunio_udp *u)
{
    struct tunio_dgram *items;
    size_t n = tunio_queue_take(u->queue, (void **)&items);
    for (size_t i = 0; i < n; i++) {
        forward(u, items[i].data, items[i].len, items[i].upstream);
        free(items[i].data);
    }
    free(items);
}

static void return_credit(struct tunio_udp *u, struct udp_session *s)
{
    if (s->owed) {
        tunio_link_send(u->cfg.link, s->worker, TUNIO_CMD_CREDIT, s->id, s->owed, NULL, 0);
        s->owed = 0;
    }
}

static void tell_app(struct tunio_udp *u, const struct udp_session *s, int err)
{
    if (err == 0)
        return; /* an orderly end: nothing to tell the app */
    int code = tunio_nat_icmp_code(s->version, err);
    if (code < 0)
        code = tunio_nat_icmp_code(s->version, EACCES); /* other failures: prohibited */
    /* ICMP quotes the offending datagram's headers; a header of the session's own tuple is
     * what the app's kernel matches its socket by. */
    uint8_t orig[48];
    size_t n = s->proto == TUNIO_IPPROTO_UDP
                   ? tunio_pkt_build_udp(s->version, s->src, s->sport, s->dst, s->dport, NULL, 0,
                                         orig, sizeof(orig))
                   : tunio_pkt_build_echo(s->version, 0, s->src, s->dst, s->sport, s->last_seq,
                                          NULL, 0, orig, sizeof(orig));
    struct tunio_pkt p;
    if (!n || tunio_pkt_parse(&p, orig, n) != TUNIO_PKT_OK)
        return;
    send_unreach(u, &p, code);
}

/* A DGRAM from the worker: the reply's packet, built in place and written into the TUN. */
static void on_dgram(struct tunio_udp *u, struct udp_session *s, zmq_msg_t *payload)
{
    struct tunio_wire_addr a;
    const uint8_t *data = zmq_msg_data(payload);
    size_t len = zmq_msg_size(payload);
    uint8_t *out = u->out;
    if (tunio_wire_decode_addr(data, len, &a) < 0 || (!s->upstream && a.version != s->version)) {
        u->protocol_errors++;
        return;
    }
    if (s->upstream) {
        /* The resolver's reply, as if from where the app sent its query. */
        a.version = s->version;
        memcpy(a.src, s->dst, 16);
        a.sport = s->dport;
    }
    /* A reply goes to the session's app, whatever the block says: a worker (a remote one
     * among them) must not address a datagram to any other socket of the host. */
    memcpy(a.dst, s->src, 16);
    a.dport = s->sport;
    const uint8_t *body = data + TUNIO_WIRE_ADDR_LEN;
    size_t blen = len - TUNIO_WIRE_ADDR_LEN;
    size_t n;
    if (s->proto == TUNIO_IPPROTO_UDP) {
        n = tunio_pkt_build_udp(a.version, a.src, a.sport, a.dst, a.dport, body, blen, out,
                                TUNIO_TUN_BUF);
    } else if (blen >= 8 && body[1] == 0 &&
               body[0] == (s->version == 6 ? TUNIO_ICMPV6_ECHO_REPLY : TUNIO_ICMP_ECHO_REPLY)) {
        /* An echo reply: the app's own identifier goes back in (a ping socket's kernel
         * chose its own for the worker), the sequence number and data as they came. */
        uint16_t seq = (uint16_t)(body[6] << 8 | body[7]);
        n = tunio_pkt_build_echo(s->version, 1, a.src, s->src, s->sport, seq, body + 8, blen - 8,
                                 out, TUNIO_TUN_BUF);
    } else {
        n = 0; /* only echo replies answer an echo: anything else a dialer sent is dropped */
        u->protocol_errors++;
    }
    if (n) {
        tunio_tun_write(u->cfg.tun, -1, out, n);
        u->from_workers++;
    } else {
        u->dropped++;
    }
    s->last_ms = tunio_now_ms();
    if (++s->owed >= UDP_CREDIT_BATCH)
        return_credit(u, s);
}

int tunio_udp_on_message(struct tunio_udp *u, int worker, const struct tunio_wire_header *h,
                         zmq_msg_t *payload)
{
    struct udp_session *s = by_id(u, h->flow);
    if (h->cmd != TUNIO_CMD_DGRAM && !s)
        return 0; /* not a UDP session: a TCP flow's message */
    if (!s || s->worker != worker) {
        /* Not the sender's session: a DGRAM is answered with a RST, as DATA for no flow is;
         * anything else is ignored (a RST is never answered with a RST, nor a late CREDIT). */
        if (h->cmd == TUNIO_CMD_DGRAM)
            tunio_link_send(u->cfg.link, worker, TUNIO_CMD_RST, h->flow, ENOTCONN, NULL, 0);
        return 1;
    }
    switch (h->cmd) {
    case TUNIO_CMD_DGRAM:
        on_dgram(u, s, payload);
        break;
    case TUNIO_CMD_CREDIT:
        credited(u, s, h->arg);
        break;
    case TUNIO_CMD_RST:
        tell_app(u, s, h->arg > 4095 ? 0 : (int)h->arg);
        session_free(u, s);
        break;
    default:
        u->protocol_errors++;
        break;
    }
    return 1;
}

void tunio_udp_tick(struct tunio_udp *u, uint64_t now)
{
    for (uint32_t b = 0; b < UDP_BUCKETS && u->sessions; b++) {
        struct udp_session *s = u->ids[b];
        while (s) {
            struct udp_session *next = s->by_id;
            if (now - s->last_ms >= u->cfg.timeout_ms) {
                int worker = s->worker;
                uint32_t id = s->id;
                session_free(u, s); /* gone before the worker hears of it */
                tunio_link_send(u->cfg.link, worker, TUNIO_CMD_RST, id, 0, NULL, 0);
            } else {
                return_credit(u, s);
            }
            s = next;
        }
    }
}

uint32_t tunio_udp_worker_lost(struct tunio_udp *u, int worker)
{
    uint32_t ended = 0;
    for (uint32_t b = 0; b < UDP_BUCKETS && u->sessions; b++) {
        struct udp_session *s = u->ids[b];
        while (s) {
            struct udp_session *next = s->by_id;
            if (s->worker == worker) {
                session_free(u, s); /* the next datagram opens a session on another worker */
                ended++;
            }
            s = next;
        }
    }
    return ended;
}

void tunio_udp_end_all(struct tunio_udp *u)
{
    for (uint32_t b = 0; b < UDP_BUCKETS && u->sessions; b++) {
        while (u->ids[b]) {
            struct udp_session *s = u->ids[b];
            int worker = s->worker;
            uint32_t id = s->id;
            session_free(u, s);
            tunio_link_send(u->cfg.link, worker, TUNIO_CMD_RST, id, 0, NULL, 0);
        }
    }
}

void tunio_udp_add_stats(const struct tunio_udp *u, struct tunio_stats *o)
{
    /* Loop-thread counters: read without a lock; a stale value is fine for statistics. */
    o->udp_sessions += u->sessions;
    o->udp_sessions_opened += u->sessions_opened;
    o->udp_to_workers += u->to_workers;
    o->udp_from_workers += u->from_workers;
    o->udp_dropped += u->dropped;
    o->udp_dropped_backlog += u->dropped_backlog;
    for (int w = 0; w < TUNIO_MAX_WORKERS; w++)
        o->udp_backlog_bytes += u->worker_bytes[w];
    o->no_worker += u->no_worker;
    o->protocol_errors += u->protocol_errors;
}
