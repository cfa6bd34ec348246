/* TCP flows. Each is the kernel socket the listener accepted on one side, DATA/CREDIT/FIN/RST with
 * the flow's worker on the other. Sockets are edge-triggered; FLOW_READABLE/FLOW_WRITABLE remember
 * an edge that could not be used yet (no credit, nothing to write). Runs on the loop thread only. */
#include "flows.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common.h"
#include "defaults.h"
#include "dns.h"
#include "dnsmap.h"
#include "dnstcp.h"
#include "link.h"
#include "nat.h"
#include "queue.h"
#include "tun.h"
#include "tunio.h"
#include "wire.h"

#define SMALL_DATA 16384u         /* below this a DATA payload is copied; above, handed over */
#define SPARE_PAGE 4096u          /* a read buffer with this much unused is shrunk to its bytes */
#define FLOW_ALLOWANCE SMALL_DATA /* unanswered bytes a flow may have past the backlog bound */
/* A released SYN must be accepted within this. The kernel keeps completing the handshake for
 * long: under load the TUN drops segments, the listener's SYN-ACK retransmits (after 1, 3, 7, 15
 * and 31 s, tcp_synack_retries 5) and the app's SYN retransmits (a Linux app gives up 127 s
 * after its first SYN, tcp_syn_retries 6) can bring the app's ACK a minute or two after the
 * release. A flow dropped before then is reset at its accept, after the app saw it connect: wait
 * out the app's own connect, which started before the release. */
#define ACCEPT_TIMEOUT_MS 130000u

enum flow_flag {
    FLOW_OPEN_OK = 1u << 0,    /* the worker's dial succeeded */
    FLOW_APP_EOF = 1u << 1,    /* the app shut its write side; FIN sent to the worker */
    FLOW_WORKER_FIN = 1u << 2, /* the worker will send no more DATA */
    FLOW_APP_SHUT = 1u << 3,   /* we shut the write side towards the app */
    FLOW_READABLE = 1u << 4,   /* edge seen, not yet drained to EAGAIN */
    FLOW_WRITABLE = 1u << 5,
    FLOW_RELEASED = 1u << 6, /* the app's SYN is released: after OPEN_OK, or at once (DNS) */
};

/* Bytes for the app: a DATA's (credit: how many count for its worker's credit once written), or,
 * on a DNS flow, answers made here (local: how many). */
/* Bytes queued for the app: a worker's DATA as it came (`msg`), or small DATAs copied end to end
 * into a buffer of our own (`own`, `cap` bytes), so that a window of tiny DATAs costs about the
 * window and not a chunk and a message a byte. Bytes [off, end) are still to write. */
struct chunk {
    zmq_msg_t msg;
    uint8_t *own;
    size_t cap;
    size_t end;
    size_t off;
    size_t credit;
    size_t local;
    struct chunk *next;
};

#define COALESCE_BELOW 1024u /* DATAs this small are copied onto the queue's last own chunk */
#define COALESCE_CAP 16384u  /* the most an own chunk grows to */

static uint8_t *chunk_data(struct chunk *c)
{
    return c->own ? c->own : (uint8_t *)zmq_msg_data(&c->msg);
}

static void chunk_free(struct chunk *c)
{
    if (c->own)
        free(c->own);
    else
        zmq_msg_close(&c->msg);
    free(c);
}

/* A flow to the DNS address's port 53 in fake-IP mode is the stack's own DNS server over TCP
 * (dnstcp.h): its SYN is released at once, with no worker; the upstream is dialled, through a
 * worker and the run's dialer, only when a query needs it. Until then the flow has no worker
 * (-1), nor after a dial that failed. */
#define DNS_READ 16384u     /* bytes read from the app at a time */
#define DNS_HELD_MAX 65536u /* answers or queries held past this: the app is not read */
struct dns_flow {
    struct tunio_dnstcp *t;
    struct tunio_nat_open open; /* what the upstream's OPEN is made of */
    uint64_t local;             /* bytes of answers made here and queued for the app */
    int dialled;                /* OPEN sent */
    int fin_sent;               /* FIN sent to the worker */
    /* No upstream any more: it closed its side with every query answered, or its dial failed.
     * Queries for it are answered SERVFAIL here from then on. */
    int upstream_done;
    uint64_t active_ms; /* the last byte either way (or the accept): the idle clock */
};

struct flow {
    uint32_t id;
    uint32_t entry;  /* NAT entry */
    uint8_t version; /* which family's NAT table holds the entry */
    int worker;      /* the link's index of its worker */
    int fd;          /* accepted socket, -1 before accept */
    uint32_t flags;
    uint64_t credit;     /* bytes we may still send to the worker */
    uint64_t uncredited; /* bytes written to the app and not yet returned (CREDIT, or DATA's arg) */
    uint64_t queued;     /* bytes of the DATA held for the app, written or not (their buffers) */
    uint64_t unanswered; /* DATA bytes sent to the worker and not credited back yet */
    struct chunk *head;
    struct chunk *tail;
    uint64_t since_ms; /* OPEN sent, or OPEN_OK received while waiting for accept */
    int fake;          /* to a fake-IP address: holds map entry fake_index, named in NAME */
    uint32_t fake_index;
    struct dns_flow *dns; /* NULL: a relay */
    struct flow *hnext;
    /* In its worker's queue of flows waiting for backlog (see struct backlog) */
    struct flow *wnext;
    struct flow **wprev; /* NULL: not waiting */
};

/* What a worker has been sent and not yet answered with credit, all its flows together, and the
 * flows with credit and input that wait for it to come under the bound, in arrival order. */
struct backlog {
    uint64_t bytes;
    struct flow *head;
    struct flow **tail;
};

struct tunio_flows {
    struct tunio_flows_config cfg;
    struct tunio_queue *opens; /* struct tunio_nat_open, from the readers */
    /* flows, by id: chained hash, grown when it gets dense */
    struct flow **buckets;
    uint32_t mask;
    uint32_t nflows;
    uint8_t *rbuf; /* read buffer, handed to ZeroMQ without a copy when large */
    uint64_t flows_opened;
    uint64_t flows_retried;
    uint64_t dial_failed;
    uint64_t flows_reset;
    uint64_t no_worker;
    uint64_t protocol_errors;
    uint64_t no_name;
    uint64_t bytes_to_workers;
    uint64_t bytes_from_workers;
    uint64_t backlog_waits; /* times a flow with credit waited for its worker's backlog */
    uint64_t dns_idle_closed;
    /* Out of descriptors (EMFILE, ENFILE): the spare that makes room to take a connection and
     * reset it (see accept_spared), and the flows reset so, counted and logged from the tick. */
    int spare_fd;
    uint64_t no_fd;
    uint64_t no_fd_paused; /* times the listener was left alone until the tick: no spare */
    uint64_t no_fd_logged;
    uint64_t no_fd_paused_logged;
    uint64_t no_fd_logged_ms;
    struct backlog backlog[TUNIO_MAX_WORKERS];
};

static struct tunio_nat *nat_of(struct tunio_flows *fl, const struct flow *f)
{
    return fl->cfg.nat[f->version == 6];
}

/* ---- a worker's backlog ---- */

static void wait_for_backlog(struct tunio_flows *fl, struct flow *f)
{
    if (f->wprev)
        return;
    struct backlog *b = &fl->backlog[f->worker];
    if (!b->tail)
        b->tail = &b->head;
    f->wnext = NULL;
    f->wprev = b->tail;
    *b->tail = f;
    b->tail = &f->wnext;
    fl->backlog_waits++;
}

static void stop_waiting(struct tunio_flows *fl, struct flow *f)
{
    if (!f->wprev)
        return;
    struct backlog *b = &fl->backlog[f->worker];
    *f->wprev = f->wnext;
    if (f->wnext)
        f->wnext->wprev = f->wprev;
    else
        b->tail = f->wprev;
    f->wnext = NULL;
    f->wprev = NULL;
}

/* Credit from the worker answers bytes of ours: they leave the backlog. */
static void answered(struct tunio_flows *fl, struct flow *f, uint64_t credit)
{
    uint64_t n = credit < f->unanswered ? credit : f->unanswered;
    f->unanswered -= n;
    fl->backlog[f->worker].bytes -= n;
}

static int backlog_full(const struct tunio_flows *fl, int worker)
{
    return worker >= 0 && fl->backlog[worker].bytes >= fl->cfg.worker_backlog;
}

/* What `f` may send its worker now: its credit while the worker's backlog has room; past the
 * bound, only what keeps the flow's own unanswered bytes under FLOW_ALLOWANCE. Without the
 * allowance a few flows to destinations that take nothing (each holding a window the worker
 * cannot credit back) filled the backlog for good and stopped every other flow of that worker,
 * new ones too; with it each flow keeps moving, a small DATA at a time, and the bound is
 * exceeded by at most FLOW_ALLOWANCE a flow, for the flows that have next to nothing queued. */
static uint64_t sendable(const struct tunio_flows *fl, const struct flow *f)
{
    if (!backlog_full(fl, f->worker))
        return f->credit;
    uint64_t room = f->unanswered < FLOW_ALLOWANCE ? FLOW_ALLOWANCE - f->unanswered : 0;
    return room < f->credit ? room : f->credit;
}

static void pump(struct tunio_flows *fl, struct flow *f);

/* The worker's backlog went down: the flows that waited read again, first come first, while it
 * stays under the bound (a flow that fills it again waits at the end of the queue). */
static void resume_waiting(struct tunio_flows *fl, int worker)
{
    if (worker < 0)
        return; /* a DNS flow with no worker yet */
    struct backlog *b = &fl->backlog[worker];
    while (b->head && !backlog_full(fl, worker)) {
        struct flow *f = b->head;
        stop_waiting(fl, f);
        pump(fl, f);
    }
}

/* ---- flow table ---- */

static uint32_t id_hash(uint32_t id)
{
    id ^= id >> 16;
    id *= 0x7feb352du;
    id ^= id >> 15;
    return id;
}

static struct flow *flow_find(struct tunio_flows *fl, uint32_t id)
{
    struct flow *f = fl->buckets[id_hash(id) & fl->mask];
    while (f && f->id != id)
        f = f->hnext;
    return f;
}

static void table_grow(struct tunio_flows *fl)
{
    uint32_t nb = (fl->mask + 1) * 2;
    struct flow **b = calloc(nb, sizeof(*b));
    if (!b)
        return; /* stays correct, only slower */
    for (uint32_t i = 0; i <= fl->mask; i++) {
        struct flow *f = fl->buckets[i];
        while (f) {
            struct flow *next = f->hnext;
            uint32_t h = id_hash(f->id) & (nb - 1);
            f->hnext = b[h];
            b[h] = f;
            f = next;
        }
    }
    free(fl->buckets);
    fl->buckets = b;
    fl->mask = nb - 1;
}

static struct flow *flow_new(struct tunio_flows *fl, uint32_t id, uint32_t entry, int worker)
{
    if (fl->nflows > fl->mask)
        table_grow(fl);
    struct flow *f = calloc(1, sizeof(*f));
    if (!f)
        return NULL;
    f->id = id;
    f->entry = entry;
    f->worker = worker;
    f->fd = -1;
    f->since_ms = tunio_now_ms();
    uint32_t h = id_hash(id) & fl->mask;
    f->hnext = fl->buckets[h];
    fl->buckets[h] = f;
    fl->nflows++;
    if (worker >= 0)
        tunio_link_load(fl->cfg.link, worker, +1);
    return f;
}

static void flow_free(struct tunio_flows *fl, struct flow *f)
{
    struct flow **link = &fl->buckets[id_hash(f->id) & fl->mask];
    while (*link && *link != f)
        link = &(*link)->hnext;
    if (*link)
        *link = f->hnext;
    while (f->head) {
        struct chunk *c = f->head;
        f->head = c->next;
        chunk_free(c);
    }
    if (f->fd >= 0)
        close(f->fd); /* which takes it out of the epoll: the socket has no other descriptor */
    stop_waiting(fl, f);
    if (f->worker >= 0) {
        fl->backlog[f->worker].bytes -= f->unanswered;
        tunio_link_load(fl->cfg.link, f->worker, -1);
    }
    if (f->dns) {
        tunio_dnstcp_free(f->dns->t);
        free(f->dns);
    }
    if (f->fake)
        tunio_dnsmap_release(fl->cfg.map, f->fake_index, tunio_now_ms());
    fl->nflows--;
    free(f);
}

int tunio_flows_new(const struct tunio_flows_config *cfg, struct tunio_flows **out)
{
    *out = NULL;
    struct tunio_flows *fl = calloc(1, sizeof(*fl));
    if (!fl)
        return -ENOMEM;
    fl->cfg = *cfg;
    fl->spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    fl->mask = 1023;
    fl->buckets = calloc(fl->mask + 1, sizeof(*fl->buckets));
    int err = fl->buckets ? tunio_queue_new(sizeof(struct tunio_nat_open), SIZE_MAX, &fl->opens)
                          : -ENOMEM;
    if (err) {
        tunio_flows_free(fl);
        return err;
    }
    *out = fl;
    return 0;
}

void tunio_flows_free(struct tunio_flows *fl)
{
    if (!fl)
        return;
    if (fl->buckets) {
        for (uint32_t b = 0; b <= fl->mask; b++)
            while (fl->buckets[b])
                flow_free(fl, fl->buckets[b]);
        free(fl->buckets);
    }
    tunio_queue_free(fl->opens);
    if (fl->spare_fd >= 0)
        close(fl->spare_fd);
    free(fl->rbuf);
    free(fl);
}

struct tunio_queue *tunio_flows_queue(struct tunio_flows *fl)
{
    return fl->opens;
}

static int send_to_worker(struct tunio_flows *fl, const struct flow *f, uint8_t cmd, uint64_t arg)
{
    if (f->worker < 0)
        return 0; /* a DNS flow that never needed its upstream */
    return tunio_link_send(fl->cfg.link, f->worker, cmd, f->id, arg, NULL, 0);
}

/* ---- the end of a flow ---- */

/* Every accepted socket carries SO_LINGER {1, 0} from its accept on (inherited from the
 * listener, bind_listener in stack.c), so that whenever it is closed
 * without our say (the stack killed, a flow reset) the app sees a RST, never an EOF that would
 * look like a complete answer; an orderly end clears it first, so no byte is discarded. */
static void set_abortive(int fd, int on)
{
    struct linger lg = {.l_onoff = on, .l_linger = 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
}

static void end_flow(struct tunio_flows *fl, struct flow *f, int orderly)
{
    if (f->fd >= 0) {
        /* No EPOLL_CTL_DEL: the close takes it out (events of this batch still to come name
         * the flow by id, which is gone by then). */
        if (orderly)
            set_abortive(f->fd, 0);
        close(f->fd);
        f->fd = -1;
    }
    tunio_nat_close(nat_of(fl, f), f->entry, f->id, tunio_now_ms());
    flow_free(fl, f);
}

/* Ends a flow abortively: the app sees a RST (or a refused connect if its SYN is still held). */
static void abort_flow(struct tunio_flows *fl, struct flow *f, int reason)
{
    (void)reason;
    fl->flows_reset++;
    if (f->fd >= 0) {
        /* An abortive close (SO_LINGER 0, set at accept): the kernel sends the app a RST. */
        set_abortive(f->fd, 1);
    } else if (!(f->flags & FLOW_RELEASED)) {
        /* The app's SYN is still held: answer it as a refused connect. */
        tunio_tun_reject(fl->cfg.tun, -1, nat_of(fl, f), f->entry, f->id, ECONNREFUSED);
    }
    /* Released but not yet accepted: the accept finds no flow and closes abortively. */
    end_flow(fl, f, 0);
}

/* The app side failed (reset, or a write error): tell the worker, forget the flow. */
static void app_failed(struct tunio_flows *fl, struct flow *f, int err)
{
    fl->flows_reset++;
    send_to_worker(fl, f, TUNIO_CMD_RST, (uint64_t)err);
    end_flow(fl, f, 0);
}

static void maybe_done(struct tunio_flows *fl, struct flow *f)
{
    if ((f->flags & FLOW_APP_EOF) && (f->flags & FLOW_APP_SHUT))
        end_flow(fl, f, 1);
}

/* ---- opening ---- */

static void note_no_worker(struct tunio_flows *fl)
{
    fl->no_worker++;
    if (tunio_log_enabled(TUNIO_LOG_DEBUG) || fl->no_worker == 1)
        tunio_log(TUNIO_LOG_WARNING, "no worker available: new flows are refused");
}

/* Moves a flow's load to worker `w`. */
static void move_to(struct tunio_flows *fl, struct flow *f, int w)
{
    if (w != f->worker) {
        if (f->worker >= 0)
            tunio_link_load(fl->cfg.link, f->worker, -1);
        tunio_link_load(fl->cfg.link, w, +1);
        f->worker = w;
    }
}

/* Sends the OPEN of a held flow to its worker (`repick`: to the least loaded live one instead). A
 * worker whose send fails is doomed (the link reports it lost later) and the next one is tried. 0,
 * or -ENOTCONN when no worker can take it (the flow is then the caller's to refuse). */
static int send_open(struct tunio_flows *fl, struct flow *f, const struct tunio_nat_open *o,
                     int repick)
{
    struct tunio_wire_addr a = {
        .proto = o->proto, .version = o->version, .sport = o->sport, .dport = o->dport};
    memcpy(a.src, o->src, 16);
    memcpy(a.dst, o->dst, 16);
    if (fl->cfg.upstream_version &&
        tunio_dns_to_upstream(fl->cfg.dns, o->version, o->dst, o->dport)) {
        /* DNS over TCP: dialled to the upstream resolver; the app's address goes along only
         * when it is of the resolver's family (for the policy). */
        a.version = fl->cfg.upstream_version;
        memcpy(a.dst, fl->cfg.upstream, 16);
        a.dport = fl->cfg.upstream_port;
        if (a.version != o->version)
            memset(a.src, 0, 16);
    }
    uint8_t block[TUNIO_WIRE_ADDR_LEN];
    tunio_wire_encode_addr(block, &a);
    char name[TUNIO_WIRE_DNS_NAME_MAX + 1];
    int name_len = f->fake ? tunio_dnsmap_name(fl->cfg.map, f->fake_index, name, sizeof(name)) : 0;
    if (name_len < 0)
        return -ENOTCONN;
    int w = repick ? tunio_link_pick(fl->cfg.link) : f->worker;
    for (int tries = 0; tries < TUNIO_MAX_WORKERS && w >= 0; tries++) {
        move_to(fl, f, w);
        f->since_ms = tunio_now_ms();
        /* A flow to a fake-IP address: its name first, to a worker that takes names (NAME). */
        int named =
            !f->fake || ((tunio_link_features(fl->cfg.link, w) & TUNIO_WIRE_FEATURE_NAMES) &&
                         tunio_link_send(fl->cfg.link, w, TUNIO_CMD_NAME, f->id, 0, name,
                                         (size_t)name_len) == 0);
        if (named && tunio_link_send(fl->cfg.link, w, TUNIO_CMD_OPEN, f->id, fl->cfg.window, block,
                                     sizeof(block)) == 0)
            return 0;
        int next = tunio_link_pick(fl->cfg.link);
        if (next == w)
            break; /* not doomed, and still the only choice: give up */
        w = next;
    }
    return -ENOTCONN;
}

static void release_syn(struct tunio_flows *fl, uint32_t id, const uint8_t *syn, size_t n);
static int dns_upstream_failed(struct tunio_flows *fl, struct flow *f);

/* A flow to the stack's DNS server (see struct dns_flow): its SYN released at once. */
static void open_dns_flow(struct tunio_flows *fl, const struct tunio_nat_open *o)
{
    struct tunio_nat *nat = fl->cfg.nat[o->version == 6];
    struct flow *f = flow_new(fl, o->flow_id, o->entry, -1);
    if (f) {
        f->version = o->version;
        f->dns = calloc(1, sizeof(*f->dns));
    }
    if (!f || !f->dns || tunio_dnstcp_new(fl->cfg.dns, &f->dns->t) < 0) {
        tunio_tun_reject(fl->cfg.tun, -1, nat, o->entry, o->flow_id, ECONNREFUSED);
        if (f)
            flow_free(fl, f);
        return;
    }
    f->dns->open = *o;
    fl->flows_opened++;
    uint8_t syn[TUNIO_TUN_BUF];
    size_t n;
    if (tunio_nat_release(nat, f->entry, f->id, tunio_now_ms(), syn, sizeof(syn), &n) < 0) {
        flow_free(fl, f);
        return;
    }
    f->flags |= FLOW_RELEASED;
    f->since_ms = tunio_now_ms();
    release_syn(fl, f->id, syn, n);
}

void tunio_flows_open(struct tunio_flows *fl)
{
    struct tunio_nat_open *items;
    size_t n = tunio_queue_take(fl->opens, (void **)&items);
    for (size_t i = 0; i < n; i++) {
        const struct tunio_nat_open *o = &items[i];
        if (tunio_dns_serves_tcp(fl->cfg.dns, o->version, o->dst, o->dport)) {
            open_dns_flow(fl, o);
            continue;
        }
        int w = tunio_link_pick(fl->cfg.link);
        struct flow *f = w >= 0 ? flow_new(fl, o->flow_id, o->entry, w) : NULL;
        if (f)
            f->version = o->version;
        if (!f) {
            /* No worker to dial: refuse at once rather than leave the app hanging. */
            note_no_worker(fl);
            tunio_tun_reject(fl->cfg.tun, -1, fl->cfg.nat[o->version == 6], o->entry, o->flow_id,
                             ECONNREFUSED);
            continue;
        }
        fl->flows_opened++;
        uint32_t index;
        if (tunio_dnsmap_lookup(fl->cfg.map, o->version, o->dst, &index)) {
            char name[TUNIO_WIRE_DNS_NAME_MAX + 1];
            if (tunio_dnsmap_acquire(fl->cfg.map, index, tunio_now_ms(), name, sizeof(name)) < 0) {
                /* No name has this fake address (any more): unreachable, as a stale address
                 * would be. */
                if (fl->no_name++ == 0 || tunio_log_enabled(TUNIO_LOG_DEBUG))
                    tunio_log(TUNIO_LOG_WARNING, "a flow to a fake-IP address no name has now: "
                                                 "refused (host unreachable)");
                fl->dial_failed++;
                tunio_tun_reject(fl->cfg.tun, -1, fl->cfg.nat[o->version == 6], o->entry,
                                 o->flow_id, EHOSTUNREACH);
                flow_free(fl, f);
                continue;
            }
            f->fake = 1;
            f->fake_index = index;
        }
        if (send_open(fl, f, o, 0) < 0) {
            note_no_worker(fl);
            abort_flow(fl, f, ECONNREFUSED);
        }
    }
    free(items);
}

/* A held flow whose worker is gone before it answered: dialled again on another worker (the app
 * never knows), refused only if none can take it. */
static void reopen(struct tunio_flows *fl, struct flow *f)
{
    struct tunio_nat_open o;
    int err = 0;
    if (f->dns)
        o = f->dns->open; /* released already: its NAT entry no longer describes it */
    else
        err = tunio_nat_describe(nat_of(fl, f), f->entry, f->id, &o);
    if (err == 0 && send_open(fl, f, &o, 1) == 0) {
        fl->flows_retried++;
        tunio_log(TUNIO_LOG_DEBUG,
                  "flow %u: its worker is gone before it answered; dialling "
                  "again on another",
                  f->id);
        return;
    }
    if (f->dns) {
        /* The app's connection is up: its queries get SERVFAIL, not a reset. */
        note_no_worker(fl);
        if (dns_upstream_failed(fl, f) == 0)
            pump(fl, f);
        return;
    }
    abort_flow(fl, f, ECONNRESET);
}

/* ---- the relay ---- */

/* Credit for bytes written to the app is held back and carried on the flow's next DATA (its arg)
 * until it reaches a quarter of the window, while the flow can still carry it (the app has not
 * ended its side): a request/response exchange then costs one message each way instead of two.
 * The worker can never be stalled by it: with nothing queued here, what we hold back is under a
 * quarter of the window, so it has three quarters left to send. */
static int credit_due(const struct tunio_flows *fl, const struct flow *f)
{
    /* A worker that said FIN sends no more DATA: it needs no credit (docs/protocol.md). */
    return f->uncredited && !(f->flags & FLOW_WORKER_FIN) &&
           (f->uncredited >= fl->cfg.window / 4 || (f->flags & FLOW_APP_EOF));
}

/* Sends the credit held back for `f` now, as CREDIT. */
static void return_credit(struct tunio_flows *fl, struct flow *f)
{
    if (f->uncredited) {
        send_to_worker(fl, f, TUNIO_CMD_CREDIT, f->uncredited);
        f->uncredited = 0;
    }
}

/* Writes what the worker sent on to the app, returns credit, passes FIN on. 0, or -1 if the flow
 * ended. A DATA's credit goes back once all of it is written and its buffer freed, not byte by
 * byte: a partly written one holds its whole buffer, and credit for its written part would let
 * the worker send that much again on top of it (two windows held for a stalled app, not one). */
static int dns_may_shut(const struct flow *f);

static int flush_to_app(struct tunio_flows *fl, struct flow *f)
{
    uint64_t freed = 0, local = 0;
    while (f->head && (f->flags & FLOW_WRITABLE)) {
        struct chunk *c = f->head;
        size_t len = c->end - c->off;
        ssize_t n = send(f->fd, chunk_data(c) + c->off, len, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR) {
                f->flags &= ~(uint32_t)FLOW_WRITABLE;
                break;
            }
            app_failed(fl, f, errno);
            return -1;
        }
        c->off += (size_t)n;
        if (c->off == c->end) {
            freed += c->credit;
            local += c->local;
            f->head = c->next;
            if (!f->head)
                f->tail = NULL;
            chunk_free(c);
        }
    }
    f->queued -= freed;
    f->uncredited += freed;
    if (f->dns && (freed || local)) {
        f->dns->local -= local;
        /* An answer the app was slow to take counts from its last byte, not from the query. */
        f->dns->active_ms = tunio_now_ms();
    }
    if (credit_due(fl, f))
        return_credit(fl, f);
    if (!f->head && !(f->flags & FLOW_APP_SHUT) &&
        (f->dns ? dns_may_shut(f) : (f->flags & FLOW_WORKER_FIN) != 0)) {
        /* Once the app's EOF is read nothing is left to read, so the orderly close that
         * maybe_done makes next sends the FIN (after any bytes still unsent) by itself. */
        if (!(f->flags & FLOW_APP_EOF))
            shutdown(f->fd, SHUT_WR);
        f->flags |= FLOW_APP_SHUT;
    }
    return 0;
}

/* The credit held back for the worker that rides on the flow's next DATA or FIN: none once the
 * worker has sent its FIN (it sends nothing more to be credited for). */
static uint64_t credit_to_carry(const struct flow *f)
{
    return (f->flags & FLOW_WORKER_FIN) ? 0 : f->uncredited;
}

/* `n` bytes of the app's go to the worker in a DATA that carries credit_to_carry(f): the credit
 * they spend, and the worker's backlog until it credits them back. Counted before the DATA is
 * sent, so that the counts already hold whatever the worker can have seen (a failed send aborts
 * the flow, and flow_free takes its unanswered bytes off the backlog again). */
static void count_sent(struct tunio_flows *fl, struct flow *f, size_t n)
{
    f->uncredited = 0;
    f->credit -= (uint64_t)n;
    f->unanswered += (uint64_t)n;
    fl->backlog[f->worker].bytes += (uint64_t)n;
}

/* The app's end of input: FIN to the worker, with the credit held back on it (no DATA will
 * carry it now). */
static void app_eof(struct tunio_flows *fl, struct flow *f)
{
    f->flags |= FLOW_APP_EOF;
    uint64_t credit = credit_to_carry(f);
    if (credit)
        send_to_worker(fl, f, TUNIO_CMD_CREDIT_FIN, credit);
    else
        send_to_worker(fl, f, TUNIO_CMD_FIN, 0);
    f->uncredited = 0;
}

/* Reads from the app while there is credit and sends it as DATA (carrying held-back credit); an
 * EOF found right behind the bytes goes with them (DATA_FIN), else alone at the app's end of
 * input (FIN, or CREDIT_FIN with credit held back). A read that comes back short is followed by
 * one more (which the edge-triggered socket needs anyway): its EAGAIN, EOF or bytes decide what
 * goes. 0, or -1 if the flow ended. */
static int read_from_app(struct tunio_flows *fl, struct flow *f)
{
    while ((f->flags & FLOW_READABLE) && !(f->flags & FLOW_APP_EOF) && f->credit > 0) {
        uint64_t may = sendable(fl, f);
        if (!may) {
            wait_for_backlog(fl, f);
            return 0;
        }
        if (!fl->rbuf && !(fl->rbuf = malloc(TUNIO_READ_CHUNK)))
            return 0; /* try again on the next event */
        size_t want = may < TUNIO_READ_CHUNK ? (size_t)may : TUNIO_READ_CHUNK;
        size_t n = 0;
        int eof = 0;
        while (n < want) {
            ssize_t r = recv(f->fd, fl->rbuf + n, want - n, MSG_DONTWAIT);
            if (r < 0) {
                if (errno == EAGAIN || errno == EINTR) {
                    f->flags &= ~(uint32_t)FLOW_READABLE;
                    break;
                }
                app_failed(fl, f, errno);
                return -1;
            }
            if (r == 0) {
                eof = 1;
                break;
            }
            n += (size_t)r;
        }
        if (n == 0) {
            if (eof)
                app_eof(fl, f);
            return 0;
        }
        int err;
        uint8_t cmd = eof ? TUNIO_CMD_DATA_FIN : TUNIO_CMD_DATA;
        uint64_t credit = credit_to_carry(f);
        count_sent(fl, f, n);
        if (n >= SMALL_DATA) {
            /* Handed over without a copy; a buffer with a page or more to spare is shrunk
             * first (in place: the tail goes back to the heap), so what a flow holds in flight
             * is the bytes it sent. A reused heap chunk's tail can be resident from its last
             * use: left on, a window of one read (n = half the chunk) pinned twice its size. */
            uint8_t *buf = fl->rbuf;
            if (TUNIO_READ_CHUNK - n >= SPARE_PAGE) {
                uint8_t *smaller = realloc(buf, n);
                if (smaller)
                    buf = smaller;
            }
            fl->rbuf = NULL;
            err = tunio_link_send_owned(fl->cfg.link, f->worker, cmd, f->id, credit, buf, n);
        } else {
            err = tunio_link_send(fl->cfg.link, f->worker, cmd, f->id, credit, fl->rbuf, n);
        }
        if (err) {
            abort_flow(fl, f, -err);
            return -1;
        }
        fl->bytes_to_workers += (uint64_t)n;
        if (eof) {
            f->flags |= FLOW_APP_EOF;
            return 0;
        }
    }
    return 0;
}

/* ---- DNS flows (struct dns_flow) ---- */

/* Queues bytes [off, off + credit + local) of `msg` for the app (moved from it: it is left
 * empty). 0, or -ENOMEM. */
static void queue_append(struct flow *f, struct chunk *c)
{
    c->next = NULL;
    if (f->tail)
        f->tail->next = c;
    else
        f->head = c;
    f->tail = c;
}

static int queue_chunk(struct flow *f, zmq_msg_t *msg, size_t off, size_t credit, size_t local)
{
    struct chunk *c = malloc(sizeof(*c));
    if (!c)
        return -ENOMEM;
    zmq_msg_init(&c->msg);
    zmq_msg_move(&c->msg, msg);
    c->own = NULL;
    c->cap = c->end = zmq_msg_size(&c->msg);
    c->off = off;
    c->credit = credit;
    c->local = local;
    queue_append(f, c);
    return 0;
}

/* A worker's small DATA (`len` < COALESCE_BELOW bytes), copied onto the queue's last chunk when
 * that is one of ours with room (grown up to COALESCE_CAP), else into a new one. 0, or -ENOMEM. */
static int queue_small(struct flow *f, const uint8_t *data, size_t len)
{
    struct chunk *t = f->tail;
    if (t && t->own && !t->local && t->end + len <= COALESCE_CAP) {
        if (t->end + len > t->cap) {
            size_t cap = t->cap * 2 < t->end + len ? t->end + len : t->cap * 2;
            cap = cap > COALESCE_CAP ? COALESCE_CAP : cap;
            uint8_t *grown = realloc(t->own, cap);
            if (!grown)
                return -ENOMEM;
            t->own = grown;
            t->cap = cap;
        }
        memcpy(t->own + t->end, data, len);
        t->end += len;
        t->credit += len;
        return 0;
    }
    struct chunk *c = malloc(sizeof(*c));
    size_t cap = len < 256u ? 256u : len;
    uint8_t *own = c ? malloc(cap) : NULL;
    if (!own) {
        free(c);
        return -ENOMEM;
    }
    memcpy(own, data, len);
    c->own = own;
    c->cap = cap;
    c->end = len;
    c->off = 0;
    c->credit = len;
    c->local = 0;
    queue_append(f, c);
    return 0;
}

/* Queues the answers made here for the app, all that wait: the caller knows the upstream's stream
 * is between two messages where they go. 0, or -ENOMEM. */
static int dns_queue_answers(struct flow *f)
{
    size_t n;
    const uint8_t *a = tunio_dnstcp_answers(f->dns->t, &n);
    if (!n)
        return 0;
    zmq_msg_t m;
    if (zmq_msg_init_size(&m, n) < 0)
        return -ENOMEM;
    memcpy(zmq_msg_data(&m), a, n);
    if (queue_chunk(f, &m, 0, 0, n) < 0) {
        zmq_msg_close(&m);
        return -ENOMEM;
    }
    tunio_dnstcp_take_answers(f->dns->t, n);
    f->dns->local += n;
    return 0;
}

/* The upstream's bytes (a DATA's payload, moved from it) for the app; answers made here that
 * waited for the end of an upstream message go right behind that end, the rest of the DATA after
 * them. 0, or -ENOMEM. */
static int dns_from_upstream(struct flow *f, zmq_msg_t *payload)
{
    size_t len = zmq_msg_size(payload), waiting;
    tunio_dnstcp_answers(f->dns->t, &waiting);
    size_t split = tunio_dnstcp_from_upstream(f->dns->t, zmq_msg_data(payload), len);
    if (waiting && split && split < len) {
        zmq_msg_t head;
        if (zmq_msg_init_size(&head, split) < 0)
            return -ENOMEM;
        memcpy(zmq_msg_data(&head), zmq_msg_data(payload), split);
        if (queue_chunk(f, &head, 0, split, 0) < 0) {
            zmq_msg_close(&head);
            return -ENOMEM;
        }
        if (dns_queue_answers(f) < 0)
            return -ENOMEM;
        return queue_chunk(f, payload, split, len - split, 0);
    }
    if (queue_chunk(f, payload, 0, len, 0) < 0)
        return -ENOMEM;
    return tunio_dnstcp_upstream_whole(f->dns->t) ? dns_queue_answers(f) : 0;
}

/* Whether the flow holds less than its bounds of answers for the app and queries for the
 * upstream: the app's next bytes may be read. */
static int dns_room(const struct flow *f)
{
    size_t answers, queries;
    tunio_dnstcp_answers(f->dns->t, &answers);
    tunio_dnstcp_queries(f->dns->t, &queries);
    return f->dns->local + answers < DNS_HELD_MAX && queries < DNS_HELD_MAX;
}

/* Whether the app has every answer it will get, once the queue is written: it ended its queries,
 * and the upstream, if dialled, has ended its answers (or was never reached). */
static int dns_may_shut(const struct flow *f)
{
    size_t answers;
    tunio_dnstcp_answers(f->dns->t, &answers);
    return (f->flags & FLOW_APP_EOF) && !answers && (!f->dns->dialled || f->dns->upstream_done);
}

/* Reads and serves the app's queries while there is room. 1: stopped for want of room, 0: the
 * socket has no more for now (or ended), -1: the flow ended (a stream no DNS client sends is
 * reset, counted as malformed). */
static int dns_read(struct tunio_flows *fl, struct flow *f)
{
    while ((f->flags & FLOW_READABLE) && !(f->flags & FLOW_APP_EOF)) {
        if (!dns_room(f))
            return 1;
        uint8_t buf[DNS_READ];
        ssize_t r = recv(f->fd, buf, sizeof(buf), MSG_DONTWAIT);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN) {
                f->flags &= ~(uint32_t)FLOW_READABLE;
                return 0;
            }
            app_failed(fl, f, errno);
            return -1;
        }
        if (r == 0) {
            tunio_dnstcp_app_end(f->dns->t); /* a message cut short is counted */
            f->flags |= FLOW_APP_EOF;
            return 0;
        }
        uint64_t now = tunio_now_ms();
        f->dns->active_ms = now;
        int err = tunio_dnstcp_from_app(f->dns->t, buf, (size_t)r, now);
        if (!err && tunio_dnstcp_upstream_whole(f->dns->t))
            err = dns_queue_answers(f);
        if (err) {
            send_to_worker(fl, f, TUNIO_CMD_RST, ECONNRESET);
            abort_flow(fl, f, -err);
            return -1;
        }
    }
    return 0;
}

/* The upstream's dial failed (OPEN_FAIL, or no worker could take it) before a query reached it.
 * The app's connection stays, and a DNS client waits for an answer to every query it sent on it
 * (matched by id, RFC 7766): each query that waited for the dial is answered SERVFAIL with its
 * id, as the UDP path answers what it cannot serve, and so is every later query for the
 * upstream; A and AAAA are answered here as before.
 * No second dial: one that failed now would most likely fail again, and each try would hold
 * the app's queries for the dial's timeout; the connection closes once idle (dns_idle_ms) and
 * the app's next one dials afresh. The flow leaves its worker. 0, or -1 if the flow ended (the
 * answers could not be queued: reset, as for any stream that cannot go on). */
static int dns_upstream_failed(struct tunio_flows *fl, struct flow *f)
{
    struct dns_flow *d = f->dns;
    if (f->worker >= 0) {
        /* Before OPEN_OK nothing was sent: no backlog and no credit to give back. */
        stop_waiting(fl, f);
        tunio_link_load(fl->cfg.link, f->worker, -1);
        f->worker = -1;
    }
    d->upstream_done = 1;
    /* Nothing of the upstream's came, so its stream is between messages: the answers go now. */
    if (tunio_dnstcp_upstream_failed(d->t) < 0 || dns_queue_answers(f) < 0) {
        abort_flow(fl, f, ENOMEM);
        return -1;
    }
    return 0;
}

/* The queries for the upstream: the first one dials it (the least loaded worker, the run's
 * dialer), then they go as DATA under credit; the app's end of input follows them as FIN. 0, or
 * -1 if the flow ended. */
static int dns_to_upstream(struct tunio_flows *fl, struct flow *f)
{
    struct dns_flow *d = f->dns;
    size_t len;
    const uint8_t *q = tunio_dnstcp_queries(d->t, &len);
    if (len && !d->dialled) {
        d->dialled = 1;
        if (send_open(fl, f, &d->open, 1) < 0) {
            note_no_worker(fl);
            return dns_upstream_failed(fl, f); /* its answers go out with the pump's flush */
        }
        return 0;
    }
    if (!(f->flags & FLOW_OPEN_OK))
        return 0;
    while (len && f->credit > 0) {
        uint64_t may = sendable(fl, f);
        if (!may) {
            wait_for_backlog(fl, f);
            return 0;
        }
        size_t n = len < may ? len : (size_t)may;
        uint64_t credit = credit_to_carry(f);
        count_sent(fl, f, n);
        int err = tunio_link_send(fl->cfg.link, f->worker, TUNIO_CMD_DATA, f->id, credit, q, n);
        if (err) {
            abort_flow(fl, f, -err);
            return -1;
        }
        fl->bytes_to_workers += (uint64_t)n;
        tunio_dnstcp_take_queries(d->t, n);
        q = tunio_dnstcp_queries(d->t, &len);
    }
    if (!len && (f->flags & FLOW_APP_EOF) && !d->fin_sent) {
        d->fin_sent = 1;
        app_eof(fl, f);
    }
    return 0;
}

static void dns_pump(struct tunio_flows *fl, struct flow *f)
{
    struct dns_flow *d = f->dns;
    if ((f->flags & FLOW_WORKER_FIN) && !d->upstream_done) {
        if (tunio_dnstcp_awaiting(d->t) || !tunio_dnstcp_upstream_whole(d->t)) {
            /* The upstream closed with queries unanswered, or inside an answer: the app would
             * wait for the rest for good. */
            send_to_worker(fl, f, TUNIO_CMD_RST, ECONNRESET);
            abort_flow(fl, f, ECONNRESET);
            return;
        }
        d->upstream_done = 1;
        tunio_dnstcp_no_upstream(d->t); /* its queries are answered SERVFAIL here from now on */
    }
    for (;;) {
        if (flush_to_app(fl, f) < 0)
            return;
        int r = dns_read(fl, f);
        if (r < 0 || dns_to_upstream(fl, f) < 0 || flush_to_app(fl, f) < 0)
            return;
        if (r == 0 || !dns_room(f))
            break; /* more comes with an event: input, the app's reads, the worker's credit */
    }
    maybe_done(fl, f);
}

static void pump(struct tunio_flows *fl, struct flow *f)
{
    if (f->fd < 0)
        return;
    if (f->dns) {
        dns_pump(fl, f);
        return;
    }
    if (flush_to_app(fl, f) < 0 || read_from_app(fl, f) < 0)
        return;
    maybe_done(fl, f);
}

void tunio_flows_event(struct tunio_flows *fl, uint32_t id, uint32_t events)
{
    struct flow *f = flow_find(fl, id);
    if (!f)
        return;
    int worker = f->worker; /* a flow that ends gives its backlog back to the others */
    if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))
        f->flags |= FLOW_READABLE;
    if (events & (EPOLLOUT | EPOLLHUP | EPOLLERR))
        f->flags |= FLOW_WRITABLE;
    /* With input waiting the read finds the error after the data, but without credit (or room
     * in the worker's backlog) nothing is read: an app that reset a flow whose destination takes
     * nothing (so no credit comes back) would hold the flow, and the window its worker holds,
     * for good. */
    if ((events & EPOLLERR) && (!(events & EPOLLIN) || !sendable(fl, f))) {
        int err = 0;
        socklen_t len = sizeof(err);
        getsockopt(f->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err) {
            app_failed(fl, f, err);
            resume_waiting(fl, worker);
            return;
        }
    }
    pump(fl, f);
    resume_waiting(fl, worker);
}

/* ---- accepting ---- */

static void attach(struct tunio_flows *fl, struct flow *f, int fd)
{
    f->fd = fd; /* abortive already: the listener's SO_LINGER */
    if (f->dns)
        f->dns->active_ms = tunio_now_ms();
    f->flags |= FLOW_WRITABLE;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET,
                             .data.u64 = (uint64_t)f->id << 8 | fl->cfg.tag};
    if (epoll_ctl(fl->cfg.epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
        tunio_log(TUNIO_LOG_WARNING, "epoll_ctl: %s", strerror(errno));
        abort_flow(fl, f, errno);
        return;
    }
    pump(fl, f);
}

static void close_abortive(int fd)
{
    set_abortive(fd, 1);
    close(fd);
}

/* The spare descriptor, taken again once the one it made room for is closed. */
static void keep_spare(struct tunio_flows *fl)
{
    if (fl->spare_fd < 0)
        fl->spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
}

/* Out of descriptors, accept() fails while the connection stays at the head of the listener's
 * queue: the listener, level-triggered, would wake the loop again at once, for ever, and the app
 * would wait in vain. The spare descriptor, given up for a moment, takes that connection, which
 * is then reset (the app sees a RST, its worker a RST too), and the spare taken again once that
 * descriptor is closed (keep_spare). -1 (errno as accept's) if there is no spare or the accept
 * fails anyway. */
static int accept_spared(struct tunio_flows *fl, int listen_fd, struct sockaddr_storage *ss,
                         socklen_t *sl)
{
    if (fl->spare_fd < 0)
        return -1;
    close(fl->spare_fd);
    fl->spare_fd = -1;
    int fd = accept4(listen_fd, (struct sockaddr *)ss, sl, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
        int err = errno;
        keep_spare(fl);
        errno = err;
    }
    return fd;
}

int tunio_flows_accept(struct tunio_flows *fl, int version)
{
    int listen_fd = fl->cfg.listen_fd[version == 6];
    struct tunio_nat *nat = fl->cfg.nat[version == 6];
    for (;;) {
        struct sockaddr_storage ss;
        socklen_t sl = sizeof(ss);
        int spared = 0;
        int fd = accept4(listen_fd, (struct sockaddr *)&ss, &sl, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0 && (errno == EMFILE || errno == ENFILE)) {
            fd = accept_spared(fl, listen_fd, &ss, &sl);
            spared = fd >= 0;
        }
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if (errno == EMFILE || errno == ENFILE) {
                fl->no_fd_paused++;
                return -EMFILE;
            }
            if (errno != EAGAIN)
                tunio_log(TUNIO_LOG_WARNING, "accept: %s", strerror(errno));
            return 0;
        }
        uint8_t addr[16] = {0};
        uint16_t port = 0;
        if (ss.ss_family == AF_INET) {
            const struct sockaddr_in *sin = (const struct sockaddr_in *)&ss;
            memcpy(addr, &sin->sin_addr, 4);
            port = ntohs(sin->sin_port);
        } else if (ss.ss_family == AF_INET6) {
            const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)&ss;
            memcpy(addr, &sin6->sin6_addr, 16);
            port = ntohs(sin6->sin6_port);
        }
        uint32_t entry, id;
        struct flow *f = NULL;
        if (tunio_nat_lookup_slot(nat, addr, port, &entry, &id) == 0)
            f = flow_find(fl, id);
        if (f && (f->entry != entry || f->fd >= 0))
            f = NULL; /* its flow was reset meanwhile */
        if (!spared && f) {
            attach(fl, f, fd);
        } else if (!spared) {
            close_abortive(fd); /* the app gets a RST, not a silent hang */
        } else {
            /* No descriptor to carry it: reset at once, its worker told, the spare taken back. */
            fl->no_fd++;
            if (f) {
                f->fd = fd;
                set_abortive(fd, 1);
                app_failed(fl, f, EMFILE);
            } else {
                close_abortive(fd);
            }
            keep_spare(fl);
        }
    }
    return 0;
}

/* ---- messages from the worker ---- */

/* DATA, or DATA_FIN (`fin`): the worker's bytes, and for DATA_FIN its FIN behind them. */
static void on_data(struct tunio_flows *fl, struct flow *f, zmq_msg_t *payload, int fin)
{
    size_t len = zmq_msg_size(payload);
    if (!(f->flags & FLOW_OPEN_OK) || (f->flags & FLOW_WORKER_FIN) ||
        f->queued + f->uncredited + len > fl->cfg.window) {
        /* DATA before OPEN_OK, after FIN, or beyond the window we granted. */
        fl->protocol_errors++;
        send_to_worker(fl, f, TUNIO_CMD_RST, EPROTO);
        abort_flow(fl, f, EPROTO);
        return;
    }
    if (f->dns)
        f->dns->active_ms = tunio_now_ms();
    int err = f->dns                 ? dns_from_upstream(f, payload)
              : len < COALESCE_BELOW ? queue_small(f, zmq_msg_data(payload), len)
                                     : queue_chunk(f, payload, 0, len, 0);
    if (err < 0) {
        send_to_worker(fl, f, TUNIO_CMD_RST, ENOMEM);
        abort_flow(fl, f, ENOMEM);
        return;
    }
    f->queued += len;
    fl->bytes_from_workers += len;
    if (fin)
        f->flags |= FLOW_WORKER_FIN;
    pump(fl, f);
}

/* The released SYN goes into the TUN from a reader's thread (see releases in flows.h), or from
 * here if it cannot be handed over. */
static void release_syn(struct tunio_flows *fl, uint32_t id, const uint8_t *syn, size_t n)
{
    if (fl->cfg.n_releases > 0) {
        struct tunio_dgram d = {.data = malloc(n), .len = n};
        if (d.data) {
            memcpy(d.data, syn, n);
            if (tunio_queue_push(fl->cfg.releases[id % (uint32_t)fl->cfg.n_releases], &d) == 0)
                return;
            free(d.data);
        }
    }
    tunio_tun_write(fl->cfg.tun, -1, syn, n);
}

static void on_open_ok(struct tunio_flows *fl, struct flow *f, uint64_t window)
{
    if (f->flags & FLOW_OPEN_OK) {
        fl->protocol_errors++;
        return;
    }
    if (f->dns) {
        /* The upstream of a DNS flow: its queries can go now (the app's SYN went long ago). */
        f->flags |= FLOW_OPEN_OK;
        f->credit = window;
        pump(fl, f);
        return;
    }
    uint8_t syn[TUNIO_TUN_BUF];
    size_t n;
    if (tunio_nat_release(nat_of(fl, f), f->entry, f->id, tunio_now_ms(), syn, sizeof(syn), &n) <
        0) {
        /* The app gave up meanwhile (the held SYN expired). */
        send_to_worker(fl, f, TUNIO_CMD_RST, ETIMEDOUT);
        end_flow(fl, f, 0);
        return;
    }
    f->flags |= FLOW_OPEN_OK | FLOW_RELEASED;
    f->credit = window;
    f->since_ms = tunio_now_ms();
    release_syn(fl, f->id, syn, n);
}

static void on_open_fail(struct tunio_flows *fl, struct flow *f, int err)
{
    if (f->flags & FLOW_OPEN_OK) {
        fl->protocol_errors++; /* a dial cannot fail after it succeeded */
        abort_flow(fl, f, err);
        return;
    }
    fl->dial_failed++;
    if (f->dns) {
        if (dns_upstream_failed(fl, f) == 0)
            pump(fl, f);
        return;
    }
    tunio_tun_reject(fl->cfg.tun, -1, nat_of(fl, f), f->entry, f->id, err);
    flow_free(fl, f);
}

void tunio_flows_on_message(struct tunio_flows *fl, int worker, const struct tunio_wire_header *h,
                            zmq_msg_t *payload)
{
    struct flow *f = flow_find(fl, h->flow);
    if (!f || f->worker != worker) {
        /* Late messages for a flow that is gone are normal; DATA gets a RST so the worker
         * stops sending. */
        if (h->cmd == TUNIO_CMD_DATA || h->cmd == TUNIO_CMD_DATA_FIN)
            tunio_link_send(fl->cfg.link, worker, TUNIO_CMD_RST, h->flow, ENOTCONN, NULL, 0);
        return;
    }
    switch (h->cmd) {
    case TUNIO_CMD_OPEN_OK:
        on_open_ok(fl, f, h->arg);
        break;
    case TUNIO_CMD_OPEN_FAIL:
        on_open_fail(fl, f, h->arg > 4095 ? ECONNREFUSED : (int)h->arg);
        break;
    case TUNIO_CMD_DATA:
    case TUNIO_CMD_DATA_FIN:
        f->credit += h->arg; /* credit the worker carried along: see credit_due */
        answered(fl, f, h->arg);
        on_data(fl, f, payload, h->cmd == TUNIO_CMD_DATA_FIN);
        break;
    case TUNIO_CMD_CREDIT:
        f->credit += h->arg;
        answered(fl, f, h->arg);
        pump(fl, f);
        break;
    case TUNIO_CMD_FIN:
    case TUNIO_CMD_CREDIT_FIN:
        if (f->flags & FLOW_WORKER_FIN) {
            fl->protocol_errors++; /* a second FIN */
            break;
        }
        f->credit += h->cmd == TUNIO_CMD_CREDIT_FIN ? h->arg : 0;
        answered(fl, f, h->cmd == TUNIO_CMD_CREDIT_FIN ? h->arg : 0);
        f->flags |= FLOW_WORKER_FIN;
        pump(fl, f);
        break;
    case TUNIO_CMD_RST:
        abort_flow(fl, f, (int)h->arg);
        break;
    default:
        fl->protocol_errors++;
        break;
    }
    resume_waiting(fl, worker);
}

/* ---- workers lost, expiries ---- */

void tunio_flows_worker_lost(struct tunio_flows *fl, int worker, uint32_t *reset,
                             uint32_t *redialed)
{
    uint64_t reset_before = fl->flows_reset, retried_before = fl->flows_retried;
    for (uint32_t b = 0; b <= fl->mask; b++) {
        struct flow *f = fl->buckets[b];
        while (f) {
            struct flow *next = f->hnext;
            if (f->worker == worker) {
                if (f->flags & FLOW_OPEN_OK)
                    abort_flow(fl, f, ECONNRESET);
                else
                    reopen(fl, f); /* its dial is the lost worker's: another one dials */
            }
            f = next;
        }
    }
    *reset = (uint32_t)(fl->flows_reset - reset_before);
    *redialed = (uint32_t)(fl->flows_retried - retried_before);
}

/* Whether a DNS flow is idle (RFC 7766 §6.2.3): no query unanswered (none waiting for the
 * upstream, nor for its dial), no answer of the upstream's half sent, nothing queued for the app,
 * and no byte either way for dns_idle_ms. A message of the app's begun and not finished does not
 * hold the connection: a client that stalls inside one is closed as if it had sent nothing. */
static int dns_idle(const struct tunio_flows *fl, const struct flow *f, uint64_t now)
{
    const struct dns_flow *d = f->dns;
    size_t answers, queries;
    tunio_dnstcp_answers(d->t, &answers);
    tunio_dnstcp_queries(d->t, &queries);
    /* active_ms may be a moment past `now`: the link's tick, before this one, can make answers
     * (a lost worker's SERVFAILs) and write them. */
    return f->fd >= 0 && d->active_ms + fl->cfg.dns_idle_ms <= now && !f->head && !answers &&
           !queries && !tunio_dnstcp_awaiting(d->t) && tunio_dnstcp_upstream_whole(d->t);
}

/* Closes an idle DNS flow in order: the app sees an EOF (FIN), as from a server that ends an idle
 * connection, not a RST, which would look like a failure; the upstream, if it is up, a FIN as if
 * the app had ended the connection (what its worker sends after that finds no flow: a DATA is
 * refused with a RST, as for any flow that is gone). */
static void dns_idle_close(struct tunio_flows *fl, struct flow *f)
{
    /* A query may have come in the same wake-up as the tick, its event not handled yet: closing
     * with it unread would send a RST. It is served instead, and the clock starts again. */
    uint8_t b;
    if (recv(f->fd, &b, 1, MSG_PEEK | MSG_DONTWAIT) > 0)
        return;
    fl->dns_idle_closed++;
    if ((f->flags & FLOW_OPEN_OK) && !f->dns->fin_sent) {
        f->dns->fin_sent = 1;
        app_eof(fl, f);
    }
    end_flow(fl, f, 1);
}

void tunio_flows_tick(struct tunio_flows *fl, uint64_t now)
{
    if ((fl->no_fd != fl->no_fd_logged || fl->no_fd_paused != fl->no_fd_paused_logged) &&
        now - fl->no_fd_logged_ms >= 1000) {
        tunio_log(TUNIO_LOG_WARNING,
                  "out of file descriptors: %llu connections reset, accepting paused %llu times "
                  "since the last report (raise the descriptor limit, ulimit -n or "
                  "LimitNOFILE=, or lower --max-flows)",
                  (unsigned long long)(fl->no_fd - fl->no_fd_logged),
                  (unsigned long long)(fl->no_fd_paused - fl->no_fd_paused_logged));
        fl->no_fd_logged = fl->no_fd;
        fl->no_fd_paused_logged = fl->no_fd_paused;
        fl->no_fd_logged_ms = now;
    }
    uint32_t expired[1024];
    for (int v = 0; v < 2; v++) {
        if (!fl->cfg.nat[v])
            continue;
        size_t n = tunio_nat_sweep(fl->cfg.nat[v], now, expired, TUNIO_ARRAY_LEN(expired));
        for (size_t i = 0; i < n; i++) {
            /* The worker never answered: the app sees a silent timeout, the worker a RST. */
            struct flow *f = flow_find(fl, expired[i]);
            if (f) {
                send_to_worker(fl, f, TUNIO_CMD_RST, ETIMEDOUT);
                flow_free(fl, f);
            }
        }
    }
    for (uint32_t b = 0; b <= fl->mask; b++) {
        struct flow *f = fl->buckets[b];
        while (f) {
            struct flow *next = f->hnext;
            if ((f->flags & FLOW_RELEASED) && f->fd < 0 && now - f->since_ms > ACCEPT_TIMEOUT_MS) {
                send_to_worker(fl, f, TUNIO_CMD_RST, ETIMEDOUT);
                abort_flow(fl, f, ETIMEDOUT);
            } else if (f->dns && dns_idle(fl, f, now)) {
                dns_idle_close(fl, f);
            }
            f = next;
        }
    }
    for (int w = 0; w < TUNIO_MAX_WORKERS; w++)
        resume_waiting(fl, w); /* backlog given back by the flows that ended here */
}

/* ---- the stack stops ---- */

/* Whether closing this socket abortively makes the kernel send a RST (tcp_need_reset). */
static int sends_rst(int fd)
{
    struct tcp_info ti;
    socklen_t len = sizeof(ti);
    if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &len) < 0)
        return 0;
    switch (ti.tcpi_state) {
    case TCP_ESTABLISHED:
    case TCP_CLOSE_WAIT:
    case TCP_FIN_WAIT1:
    case TCP_FIN_WAIT2:
    case TCP_SYN_RECV:
        return 1;
    default:
        return 0;
    }
}

size_t tunio_flows_reset_all(struct tunio_flows *fl)
{
    size_t resets = 0;
    for (uint32_t b = 0; b <= fl->mask; b++) {
        struct flow *f = fl->buckets[b];
        while (f) {
            struct flow *next = f->hnext;
            if (f->fd >= 0 && sends_rst(f->fd))
                resets++;
            abort_flow(fl, f, ECONNRESET);
            f = next;
        }
    }
    return resets;
}

void tunio_flows_reject_held(struct tunio_flows *fl)
{
    /* Flows the readers queued that the loop never took, then whatever the tables still hold. */
    struct tunio_nat_open *items;
    size_t n = tunio_queue_take(fl->opens, (void **)&items);
    for (size_t i = 0; i < n; i++)
        tunio_tun_reject(fl->cfg.tun, -1, fl->cfg.nat[items[i].version == 6], items[i].entry,
                         items[i].flow_id, ECONNREFUSED);
    free(items);
    for (int v = 0; v < 2; v++) {
        struct tunio_nat *nat = fl->cfg.nat[v];
        uint32_t entries[256], ids[256];
        size_t k;
        while (nat && (k = tunio_nat_held(nat, entries, ids, TUNIO_ARRAY_LEN(ids))) > 0)
            for (size_t i = 0; i < k; i++)
                tunio_tun_reject(fl->cfg.tun, -1, nat, entries[i], ids[i], ECONNREFUSED);
    }
}

void tunio_flows_add_stats(const struct tunio_flows *fl, struct tunio_stats *o)
{
    /* Loop-thread counters: read without a lock; a stale value is fine for statistics. */
    o->flows_opened += fl->flows_opened;
    o->flows_retried += fl->flows_retried;
    o->flows_active += fl->nflows;
    o->dial_failed += fl->dial_failed;
    o->flows_reset += fl->flows_reset;
    o->no_worker += fl->no_worker;
    o->protocol_errors += fl->protocol_errors;
    o->bytes_to_workers += fl->bytes_to_workers;
    o->bytes_from_workers += fl->bytes_from_workers;
    o->backlog_waits += fl->backlog_waits;
    o->dns_idle_closed += fl->dns_idle_closed;
    for (int w = 0; w < TUNIO_MAX_WORKERS; w++)
        o->backlog_bytes += fl->backlog[w].bytes;
}
