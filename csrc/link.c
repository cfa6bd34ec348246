/* The workers, as the ROUTER sees them: who is there, who is alive, who gets the next flow, and
 * the framing of every message. Runs on the loop thread only. */
#include "link.h"

#include <errno.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "defaults.h"
#include "tunio.h"
#include "wire.h"
#include "zap.h"

#define DRAIN_BATCH 1024 /* messages handled per drain call before epoll is consulted again */
#define STACK_NAME "tunio-stack"
#define BYE_LINGER_MS 500
/* A context option of libzmq 4.3 that zmq.h declares only with its draft API. */
#ifndef ZMQ_ZERO_COPY_RECV
#define ZMQ_ZERO_COPY_RECV 10
#endif

struct worker {
    uint8_t id[256];
    size_t id_len;
    char name[TUNIO_WIRE_NAME_MAX + 1];
    int alive;
    int doomed; /* its connection is gone; reaped after the current event */
    int full;   /* doomed for leaving TUNIO_LINK_QUEUE_MAX messages unread */
    uint64_t last_seen;
    uint32_t flows; /* its flows and datagram sessions */
    uint64_t capacity;
    uint16_t features; /* HELLO's flags: TUNIO_WIRE_FEATURE_* */
    int draining;      /* it said DRAIN: it finishes its flows and gets no new ones */
};

struct tunio_link {
    struct tunio_link_config cfg;
    char *endpoint;
    void *zctx;
    void *router;
    int router_fd;
    struct tunio_zap *zap; /* with CURVE only */
    struct worker workers[TUNIO_MAX_WORKERS];
    int nworkers;
    unsigned rr;
    int doomed; /* some worker is doomed */
    /* No message waits and ZMQ_FD will fire for the next: true from a ZMQ_EVENTS without
     * POLLIN or a receive that found nothing (both process every pending command, so the next
     * one signals the fd again) until the next call on the socket or the fd firing. */
    int quiet;
    uint64_t last_heartbeat;
    uint64_t workers_lost;
    uint64_t protocol_errors;
    /* A peer that keeps sending what we cannot read: one line a period. */
    struct tunio_log_repeat malformed;
    char malformed_from[TUNIO_WIRE_NAME_MAX + 1]; /* the last one's sender and why, */
    const char *malformed_why;                    /* for the period's line */
};

/* ---- construction ---- */

static int bind_router(struct tunio_link *l)
{
    const struct tunio_link_config *cfg = &l->cfg;
    l->zctx = zmq_ctx_new();
    if (!l->zctx)
        return -zmq_errno();
    /* Every message in a buffer of its own size. By default a message under 8 KiB is a view into
     * the connection's receive buffer, which it keeps alive (8 KiB and ~10 KiB of reference
     * counts): a flow holding such DATA for a slow app held up to 18 KiB a message, 5-7 times its
     * window at 1,000-byte DATA. A libzmq without the option keeps its default. */
    zmq_ctx_set(l->zctx, ZMQ_ZERO_COPY_RECV, 0);
    /* ZeroMQ's I/O thread as SCHED_BATCH: woken by the loop's send, it no longer preempts the
     * loop (nor a reader) on a busy CPU, but runs when that CPU is free or the other is; the
     * loop then goes on with its batch, and the I/O thread finds several messages to write at
     * once (measured on 2 cores: a sixth more short connections a second, a seventh less of
     * the stack's CPU each, exchanges no slower). */
    zmq_ctx_set(l->zctx, ZMQ_THREAD_SCHED_POLICY, SCHED_BATCH);
    int err;
    /* The ZAP handler must exist before the ROUTER binds, or early workers are let in. */
    if (cfg->curve_secret &&
        (err = tunio_zap_new(l->zctx, cfg->curve_clients ? cfg->curve_clients : "", &l->zap)))
        return err;
    l->router = zmq_socket(l->zctx, ZMQ_ROUTER);
    if (!l->router)
        return -zmq_errno();
    /* Credits bound what is queued per flow; the send high-water mark bounds the rest, and a
     * worker that reaches it is lost (ROUTER_MANDATORY makes a full queue EAGAIN, not a drop). */
    int zero = 0, one = 1, linger = BYE_LINGER_MS, queue_max = TUNIO_LINK_QUEUE_MAX;
    int64_t max_frame = cfg->max_frame ? (int64_t)cfg->max_frame : -1;
    size_t fl = sizeof(l->router_fd);
    if (zmq_setsockopt(l->router, ZMQ_SNDHWM, &queue_max, sizeof(queue_max)) ||
        zmq_setsockopt(l->router, ZMQ_RCVHWM, &zero, sizeof(zero)) ||
        zmq_setsockopt(l->router, ZMQ_ROUTER_MANDATORY, &one, sizeof(one)) ||
        zmq_setsockopt(l->router, ZMQ_LINGER, &linger, sizeof(linger)) ||
        zmq_setsockopt(l->router, ZMQ_MAXMSGSIZE, &max_frame, sizeof(max_frame)) ||
        /* tcp://[fd00::1]:5555 binds (without it ZeroMQ takes IPv4 only), tcp://\*:5555 both. */
        zmq_setsockopt(l->router, ZMQ_IPV6, &one, sizeof(one)))
        return -zmq_errno();
    if (cfg->curve_secret && (zmq_setsockopt(l->router, ZMQ_CURVE_SERVER, &one, sizeof(one)) ||
                              zmq_setsockopt(l->router, ZMQ_CURVE_SECRETKEY, cfg->curve_secret,
                                             strlen(cfg->curve_secret)) ||
                              zmq_setsockopt(l->router, ZMQ_ZAP_DOMAIN, "tunio", 5)))
        return -zmq_errno();
    if (zmq_bind(l->router, l->endpoint)) {
        int err = zmq_errno();
        tunio_log(TUNIO_LOG_ERROR, "cannot bind the workers' endpoint %s: %s", l->endpoint,
                  zmq_strerror(err));
        return -err;
    }
    if (zmq_getsockopt(l->router, ZMQ_FD, &l->router_fd, &fl))
        return -zmq_errno();
    return 0;
}

int tunio_link_new(const struct tunio_link_config *cfg, struct tunio_link **out)
{
    *out = NULL;
    if (!cfg->endpoint || !cfg->on_message || !cfg->on_worker_lost)
        return -EINVAL;
    struct tunio_link *l = calloc(1, sizeof(*l));
    if (!l)
        return -ENOMEM;
    l->cfg = *cfg;
    l->router_fd = -1;
    l->endpoint = strdup(cfg->endpoint);
    l->cfg.endpoint = l->endpoint;
    int err = l->endpoint ? bind_router(l) : -ENOMEM;
    if (err) {
        tunio_link_free(l);
        return err;
    }
    *out = l;
    return 0;
}

void tunio_link_free(struct tunio_link *l)
{
    if (!l)
        return;
    if (l->router)
        zmq_close(l->router);
    tunio_zap_free(l->zap);
    if (l->zctx)
        zmq_ctx_term(l->zctx);
    free(l->endpoint);
    free(l);
}

int tunio_link_fd(const struct tunio_link *l)
{
    return l->router_fd;
}

int tunio_link_zap_fd(const struct tunio_link *l)
{
    return l->zap ? tunio_zap_fd(l->zap) : -1;
}

void tunio_link_zap_drain(struct tunio_link *l)
{
    if (l->zap)
        tunio_zap_drain(l->zap);
}

/* ---- sending ---- */

static int send_frame(struct tunio_link *l, const void *data, size_t len, int more)
{
    l->quiet = 0; /* a send may process commands, and with them the fd's signal */
    int rc = zmq_send(l->router, data, len, ZMQ_DONTWAIT | (more ? ZMQ_SNDMORE : 0));
    return rc < 0 ? -zmq_errno() : 0;
}

/* A send found the worker's connection gone, or its queue full. It is reported lost by
 * tunio_link_reap() once the current event is handled, never under a caller that still holds
 * one of its flows. */
static void doom(struct tunio_link *l, int w, int err)
{
    if (err == -EAGAIN)
        l->workers[w].full = 1;
    l->workers[w].doomed = 1;
    l->doomed = 1;
}

/* Whether a failed send loses the worker: its connection is gone (EHOSTUNREACH), or it left
 * TUNIO_LINK_QUEUE_MAX messages unread (EAGAIN): either way nothing more reaches it in order. */
static int loses_worker(int err)
{
    return err == -EHOSTUNREACH || err == -EAGAIN;
}

static int send_header(struct tunio_link *l, int w, uint8_t cmd, uint32_t flow, uint64_t arg,
                       int more)
{
    struct worker *wk = &l->workers[w];
    uint8_t hdr[TUNIO_WIRE_HEADER_LEN];
    tunio_wire_encode_header(hdr, cmd, flow, arg);
    int err = send_frame(l, wk->id, wk->id_len, 1);
    if (!err)
        err = send_frame(l, hdr, sizeof(hdr), more);
    return err;
}

static int reachable(const struct tunio_link *l, int w)
{
    return w >= 0 && w < l->nworkers && l->workers[w].alive && !l->workers[w].doomed;
}

int tunio_link_send(struct tunio_link *l, int w, uint8_t cmd, uint32_t flow, uint64_t arg,
                    const void *payload, size_t len)
{
    if (!reachable(l, w))
        return -ENOTCONN;
    int err = send_header(l, w, cmd, flow, arg, payload != NULL);
    if (!err && payload)
        err = send_frame(l, payload, len, 0);
    if (loses_worker(err))
        doom(l, w, err);
    return err;
}

static void free_owned(void *data, void *hint)
{
    (void)hint;
    free(data);
}

int tunio_link_send_owned(struct tunio_link *l, int w, uint8_t cmd, uint32_t flow, uint64_t arg,
                          uint8_t *buf, size_t len)
{
    if (!reachable(l, w)) {
        free(buf);
        return -ENOTCONN;
    }
    int err = send_header(l, w, cmd, flow, arg, 1);
    if (err) {
        free(buf);
    } else {
        zmq_msg_t m;
        zmq_msg_init_data(&m, buf, len, free_owned, NULL);
        l->quiet = 0;
        if (zmq_msg_send(&m, l->router, ZMQ_DONTWAIT) < 0) {
            err = -zmq_errno();
            zmq_msg_close(&m);
        }
    }
    if (loses_worker(err))
        doom(l, w, err);
    return err;
}

/* A reply to a peer that is not (or no longer) one of our workers: header only. */
static void send_to_peer(struct tunio_link *l, const uint8_t *id, size_t id_len, uint8_t cmd,
                         uint32_t flow, uint64_t arg)
{
    uint8_t hdr[TUNIO_WIRE_HEADER_LEN];
    tunio_wire_encode_header(hdr, cmd, flow, arg);
    if (!send_frame(l, id, id_len, 1))
        send_frame(l, hdr, sizeof(hdr), 0);
}

/* ---- workers and their load ---- */

static int alive_workers(const struct tunio_link *l)
{
    int n = 0;
    for (int i = 0; i < l->nworkers; i++)
        n += l->workers[i].alive;
    return n;
}

/* Least loaded first; ties go round-robin so equal workers share new flows evenly. */
int tunio_link_pick(struct tunio_link *l)
{
    int best = -1;
    for (int k = 0; k < l->nworkers; k++) {
        int i = (int)((l->rr + (unsigned)k) % (unsigned)l->nworkers);
        struct worker *w = &l->workers[i];
        if (!w->alive || w->doomed || w->draining || (w->capacity && w->flows >= w->capacity))
            continue;
        if (best < 0 || w->flows < l->workers[best].flows)
            best = i;
    }
    if (best >= 0)
        l->rr = (unsigned)best + 1;
    return best;
}

void tunio_link_load(struct tunio_link *l, int w, int delta)
{
    l->workers[w].flows += (uint32_t)delta;
}

static int find_worker(const struct tunio_link *l, const void *id, size_t len)
{
    for (int i = 0; i < l->nworkers; i++)
        if (l->workers[i].id_len == len && !memcmp(l->workers[i].id, id, len))
            return i;
    return -1;
}

static void worker_lost(struct tunio_link *l, int w, const char *why)
{
    struct worker *wk = &l->workers[w];
    if (!wk->alive)
        return;
    wk->alive = 0;
    /* A drained worker leaving once its flows are done: the end of a reload, not a loss. */
    int drained = wk->draining && wk->flows == 0;
    struct tunio_link_lost lost = {0};
    l->cfg.on_worker_lost(l->cfg.owner, w, &lost);
    if (drained) {
        tunio_log(TUNIO_LOG_INFO, "worker %s left, drained (%s)", wk->name, why);
    } else {
        l->workers_lost++;
        tunio_log(TUNIO_LOG_WARNING,
                  "worker %s lost (%s): %u flows reset, %u held flows passed to other workers, "
                  "%u UDP sessions ended",
                  wk->name, why, lost.reset, lost.redialed, lost.sessions);
    }
}

static void on_hello(struct tunio_link *l, const uint8_t *id, size_t id_len,
                     const struct tunio_wire_header *h, zmq_msg_t *payload)
{
    int w = find_worker(l, id, id_len);
    int again = w >= 0 && l->workers[w].alive;
    if (again) {
        /* A worker saying HELLO again has dropped its flows: drop ours too. A worker that
         * started before its stack said HELLO more than once, and all of them come at once:
         * only one that drops flows is news. */
        struct tunio_link_lost lost = {0};
        l->workers[w].alive = 0;
        l->cfg.on_worker_lost(l->cfg.owner, w, &lost);
        if (lost.reset || lost.redialed || lost.sessions)
            tunio_log(TUNIO_LOG_WARNING,
                      "worker %s said HELLO again: %u flows reset, %u held flows passed to other "
                      "workers, %u UDP sessions ended",
                      l->workers[w].name, lost.reset, lost.redialed, lost.sessions);
    } else if (w < 0) {
        for (w = 0; w < l->nworkers && l->workers[w].alive; w++)
            ;
        if (w == l->nworkers) {
            if (l->nworkers == TUNIO_MAX_WORKERS) {
                tunio_log(TUNIO_LOG_ERROR, "too many workers (%d): HELLO ignored",
                          TUNIO_MAX_WORKERS);
                return;
            }
            l->nworkers++;
        }
    }
    struct worker *wk = &l->workers[w];
    memset(wk, 0, sizeof(*wk));
    memcpy(wk->id, id, id_len);
    wk->id_len = id_len;
    size_t nl = zmq_msg_size(payload);
    memcpy(wk->name, zmq_msg_data(payload), nl);
    wk->name[nl] = 0;
    /* The name goes into log lines: a control byte (a newline above all) would let a worker
     * write lines of its own into the stack's log. */
    for (size_t i = 0; i < nl; i++)
        if ((unsigned char)wk->name[i] < 0x20 || wk->name[i] == 0x7f)
            wk->name[i] = '?';
    wk->alive = 1;
    wk->capacity = h->arg;
    wk->features = h->flags;
    wk->last_seen = tunio_now_ms();
    if (!again)
        tunio_log(TUNIO_LOG_INFO, "worker %s joined (%d alive)", wk->name, alive_workers(l));
    tunio_link_send(l, w, TUNIO_CMD_HELLO, 0, 0, STACK_NAME, strlen(STACK_NAME));
}

/* ---- receiving ---- */

static void on_message(struct tunio_link *l, zmq_msg_t *frames, int nframes)
{
    const uint8_t *id = zmq_msg_data(&frames[0]);
    size_t id_len = zmq_msg_size(&frames[0]);
    struct tunio_wire_header h;
    zmq_msg_t *payload = nframes == 3 ? &frames[2] : NULL;
    int err = nframes < 2 || nframes > 3 || id_len > sizeof(l->workers[0].id)
                  ? -EPROTO
                  : tunio_wire_decode(zmq_msg_data(&frames[1]), zmq_msg_size(&frames[1]),
                                      payload != NULL, payload ? zmq_msg_size(payload) : 0, &h);
    int w = id_len <= sizeof(l->workers[0].id) ? find_worker(l, id, id_len) : -1;
    if (err) {
        l->protocol_errors++;
        snprintf(l->malformed_from, sizeof(l->malformed_from), "%s",
                 w >= 0 ? l->workers[w].name : "an unknown peer");
        l->malformed_why = err == -EPROTONOSUPPORT ? "protocol version" : "framing";
        if (tunio_log_repeat_now(&l->malformed, tunio_now_ms()))
            tunio_log(TUNIO_LOG_WARNING, "malformed message from %s dropped (%s)",
                      l->malformed_from, l->malformed_why);
        if (err == -EPROTONOSUPPORT && id_len <= sizeof(l->workers[0].id)) {
            /* Tell the peer why, so it can say so in its log; it gets no flows. */
            send_to_peer(l, id, id_len, TUNIO_CMD_BYE, 0, EPROTONOSUPPORT);
        }
        return;
    }
    if (h.cmd == TUNIO_CMD_HELLO) {
        on_hello(l, id, id_len, &h, payload);
        return;
    }
    if (w < 0 || !l->workers[w].alive) {
        /* Not (or no longer) a worker of ours: it will say HELLO again once our silence tells
         * it so. DATA still gets its RST so nothing waits on it. */
        if (h.cmd == TUNIO_CMD_DATA || h.cmd == TUNIO_CMD_DATA_FIN)
            send_to_peer(l, id, id_len, TUNIO_CMD_RST, h.flow, ENOTCONN);
        return;
    }
    l->workers[w].last_seen = tunio_now_ms();
    switch (h.cmd) {
    case TUNIO_CMD_HEARTBEAT:
        break;
    case TUNIO_CMD_BYE:
        worker_lost(l, w, "it said BYE");
        break;
    case TUNIO_CMD_DRAIN:
        if (!l->workers[w].draining)
            tunio_log(TUNIO_LOG_INFO, "worker %s drains: no new flows for it (%u left)",
                      l->workers[w].name, l->workers[w].flows);
        l->workers[w].draining = 1;
        break;
    case TUNIO_CMD_OPEN:
        l->protocol_errors++; /* only the stack opens flows */
        break;
    default:
        l->cfg.on_message(l->cfg.owner, w, &h, payload);
        break;
    }
}

int tunio_link_readable(struct tunio_link *l)
{
    if (l->quiet)
        return 0;
    int events = 0;
    size_t len = sizeof(events);
    if (zmq_getsockopt(l->router, ZMQ_EVENTS, &events, &len) < 0)
        return 0;
    l->quiet = !(events & ZMQ_POLLIN);
    return events & ZMQ_POLLIN;
}

void tunio_link_fired(struct tunio_link *l)
{
    l->quiet = 0;
}

void tunio_link_drain(struct tunio_link *l)
{
    for (int handled = 0; handled < DRAIN_BATCH; handled++) {
        zmq_msg_t frames[4];
        int n = 0, more = 1, failed = 0;
        while (more) {
            zmq_msg_t *m = &frames[n < 4 ? n : 3];
            if (n >= 4)
                zmq_msg_close(m); /* too many frames: keep draining, reject below */
            zmq_msg_init(m);
            if (zmq_msg_recv(m, l->router, ZMQ_DONTWAIT) < 0) {
                zmq_msg_close(m);
                failed = 1;
                l->quiet = n == 0 && zmq_errno() == EAGAIN; /* nothing waits: see quiet */
                break;
            }
            l->quiet = 0;
            more = zmq_msg_more(m);
            n++;
        }
        int kept = n < 4 ? n : 4;
        if (!failed)
            on_message(l, frames, n <= 3 ? n : 4);
        for (int i = 0; i < kept; i++)
            zmq_msg_close(&frames[i]);
        if (failed)
            return; /* EAGAIN: nothing more queued */
    }
}

void tunio_link_reap(struct tunio_link *l)
{
    if (!l->doomed)
        return;
    l->doomed = 0;
    for (int i = 0; i < l->nworkers; i++) {
        if (l->workers[i].doomed) {
            char full[64];
            snprintf(full, sizeof(full), "it left %d messages unread", TUNIO_LINK_QUEUE_MAX);
            l->workers[i].doomed = 0;
            worker_lost(l, i, l->workers[i].full ? full : "its connection is gone");
        }
    }
}

void tunio_link_tick(struct tunio_link *l, uint64_t now)
{
    uint64_t since = l->malformed.since_ms;
    uint64_t dropped = tunio_log_repeat_due(&l->malformed, now);
    if (dropped)
        tunio_log(TUNIO_LOG_WARNING,
                  "dropped %llu more malformed messages in the last %llu s, the last from %s (%s)",
                  (unsigned long long)dropped, (unsigned long long)((now - since + 500) / 1000),
                  l->malformed_from, l->malformed_why);
    if (l->zap)
        tunio_zap_tick(l->zap, now);
    uint64_t limit = (uint64_t)l->cfg.heartbeat_ms * TUNIO_LIVENESS;
    int beat = now - l->last_heartbeat >= l->cfg.heartbeat_ms;
    if (beat)
        l->last_heartbeat = now;
    for (int i = 0; i < l->nworkers; i++) {
        struct worker *w = &l->workers[i];
        if (!w->alive)
            continue;
        if (now - w->last_seen > limit)
            worker_lost(l, i, "no heartbeat");
        else if (beat)
            tunio_link_send(l, i, TUNIO_CMD_HEARTBEAT, 0, 0, NULL, 0);
    }
}

void tunio_link_bye_all(struct tunio_link *l)
{
    for (int i = 0; i < l->nworkers; i++)
        if (l->workers[i].alive)
            tunio_link_send(l, i, TUNIO_CMD_BYE, 0, 0, NULL, 0);
}

int tunio_link_features(const struct tunio_link *l, int worker)
{
    return worker >= 0 && worker < l->nworkers ? l->workers[worker].features : 0;
}

int tunio_link_worker_info(const struct tunio_link *l, int index, struct tunio_worker_info *out)
{
    /* Loop-thread state read from any thread: a stale (or, for a name being replaced, mixed)
     * value is fine for statistics; the name is always terminated. */
    if (index < 0 || index >= l->nworkers)
        return -ENOENT;
    const struct worker *w = &l->workers[index];
    memset(out, 0, sizeof(*out));
    memcpy(out->name, w->name, sizeof(out->name) - 1);
    out->name[sizeof(out->name) - 1] = 0;
    out->alive = w->alive && !w->doomed;
    out->flows = w->flows;
    out->capacity = w->capacity;
    out->draining = w->draining;
    return 0;
}

void tunio_link_add_stats(const struct tunio_link *l, struct tunio_stats *o)
{
    /* Loop-thread counters: read without a lock; a stale value is fine for statistics. */
    o->workers += (uint64_t)alive_workers(l);
    o->workers_lost += l->workers_lost;
    o->protocol_errors += l->protocol_errors;
}
