/* The workers, as the ROUTER sees them: who is there, who is alive, who gets the next flow, and
 * the framing of every message. Runs on the loop thread only. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "stack_internal.h"

#define DRAIN_BATCH 1024    /* messages handled per drain call before epoll is consulted again */
#define STACK_NAME "tunio-stack"

static int send_frame(struct tunio_stack *s, const void *data, size_t len, int more)
{
    int rc = zmq_send(s->router, data, len, ZMQ_DONTWAIT | (more ? ZMQ_SNDMORE : 0));
    return rc < 0 ? -zmq_errno() : 0;
}

static void worker_lost(struct tunio_stack *s, int w, const char *why);

/* A send found the worker's connection gone. Its flows are reset by broker_reap() once the
 * current event is handled, never under a caller that still holds one of them. */
static void doom(struct tunio_stack *s, int w)
{
    s->workers[w].doomed = 1;
    s->doomed = 1;
}

static int send_header(struct tunio_stack *s, int w, uint8_t cmd, uint32_t flow, uint64_t arg,
                       int more)
{
    struct worker *wk = &s->workers[w];
    uint8_t hdr[TUNIO_WIRE_HEADER_LEN];
    tunio_wire_encode_header(hdr, cmd, flow, arg);
    int err = send_frame(s, wk->id, wk->id_len, 1);
    if (!err)
        err = send_frame(s, hdr, sizeof(hdr), more);
    return err;
}

int broker_send(struct tunio_stack *s, int w, uint8_t cmd, uint32_t flow, uint64_t arg,
                const void *payload, size_t len)
{
    if (w < 0 || w >= s->nworkers || !s->workers[w].alive || s->workers[w].doomed)
        return -ENOTCONN;
    int err = send_header(s, w, cmd, flow, arg, payload != NULL);
    if (!err && payload)
        err = send_frame(s, payload, len, 0);
    if (err == -EHOSTUNREACH)
        doom(s, w);
    return err;
}

static void free_owned(void *data, void *hint)
{
    (void)hint;
    free(data);
}

int broker_send_owned_cmd(struct tunio_stack *s, int w, uint8_t cmd, uint32_t flow, uint64_t arg,
                          uint8_t *buf, size_t len)
{
    if (w < 0 || w >= s->nworkers || !s->workers[w].alive || s->workers[w].doomed) {
        free(buf);
        return -ENOTCONN;
    }
    int err = send_header(s, w, cmd, flow, arg, 1);
    if (err) {
        free(buf);
    } else {
        zmq_msg_t m;
        zmq_msg_init_data(&m, buf, len, free_owned, NULL);
        if (zmq_msg_send(&m, s->router, ZMQ_DONTWAIT) < 0) {
            err = -zmq_errno();
            zmq_msg_close(&m);
        }
    }
    if (err == -EHOSTUNREACH)
        doom(s, w);
    return err;
}

int broker_alive_workers(struct tunio_stack *s)
{
    int n = 0;
    for (int i = 0; i < s->nworkers; i++)
        n += s->workers[i].alive;
    return n;
}

/* Least loaded first; ties go round-robin so equal workers share new flows evenly. */
int broker_pick_worker(struct tunio_stack *s)
{
    int best = -1;
    for (int k = 0; k < s->nworkers; k++) {
        int i = (int)((s->rr + (unsigned)k) % (unsigned)s->nworkers);
        struct worker *w = &s->workers[i];
        if (!w->alive || (w->capacity && w->flows >= w->capacity))
            continue;
        if (best < 0 || w->flows < s->workers[best].flows)
            best = i;
    }
    if (best >= 0)
        s->rr = (unsigned)best + 1;
    return best;
}

void broker_open_flows(struct tunio_stack *s)
{
    struct tunio_nat_open *items;
    size_t n = packet_queue_take(&s->opens, (void **)&items);
    for (size_t i = 0; i < n; i++) {
        const struct tunio_nat_open *o = &items[i];
        int w = broker_pick_worker(s);
        struct flow *f = w >= 0 ? stack_flow_new(s, o->flow_id, o->entry, w) : NULL;
        if (f)
            f->version = o->version;
        if (!f) {
            /* No worker to dial: refuse at once rather than leave the app hanging. */
            s->c.no_worker++;
            if (tunio_log_enabled(TUNIO_LOG_DEBUG) || s->c.no_worker == 1)
                tunio_log(TUNIO_LOG_WARNING, "no worker available: new flows are refused");
            stack_reject(s, -1, o->version, o->entry, o->flow_id, ECONNREFUSED);
            continue;
        }
        struct tunio_wire_addr a = {.proto = o->proto, .version = o->version,
                                    .sport = o->sport, .dport = o->dport};
        memcpy(a.src, o->src, 16);
        memcpy(a.dst, o->dst, 16);
        uint8_t block[TUNIO_WIRE_ADDR_LEN];
        tunio_wire_encode_addr(block, &a);
        s->c.flows_opened++;
        if (broker_send(s, w, TUNIO_CMD_OPEN, o->flow_id, s->cfg.window, block, sizeof(block)))
            relay_abort(s, f, ECONNREFUSED);
    }
    free(items);
}

static int find_worker(struct tunio_stack *s, const void *id, size_t len)
{
    for (int i = 0; i < s->nworkers; i++)
        if (s->workers[i].id_len == len && !memcmp(s->workers[i].id, id, len))
            return i;
    return -1;
}

/* Resets every flow of worker `w`: the apps see a RST (or a refused connect). */
static void reset_flows_of(struct tunio_stack *s, int w)
{
    for (uint32_t b = 0; b <= s->flow_mask; b++) {
        struct flow *f = s->flow_buckets[b];
        while (f) {
            struct flow *next = f->hnext;
            if (f->worker == w)
                relay_abort(s, f, ECONNRESET);
            f = next;
        }
    }
}

static void worker_lost(struct tunio_stack *s, int w, const char *why)
{
    struct worker *wk = &s->workers[w];
    if (!wk->alive)
        return;
    wk->alive = 0;
    s->c.workers_lost++;
    tunio_log(TUNIO_LOG_WARNING, "worker %s lost (%s): resetting its %u flows", wk->name, why,
              wk->flows);
    reset_flows_of(s, w);
    udp_worker_lost(s, w);
}

static void on_hello(struct tunio_stack *s, const uint8_t *id, size_t id_len,
                     const struct tunio_wire_header *h, zmq_msg_t *payload)
{
    int w = find_worker(s, id, id_len);
    if (w >= 0 && s->workers[w].alive) {
        /* A worker saying HELLO again has dropped its flows: drop ours too. */
        reset_flows_of(s, w);
        udp_worker_lost(s, w);
    } else if (w < 0) {
        for (w = 0; w < s->nworkers && s->workers[w].alive; w++)
            ;
        if (w == s->nworkers) {
            if (s->nworkers == TUNIO_MAX_WORKERS) {
                tunio_log(TUNIO_LOG_ERROR, "too many workers (%d): HELLO ignored",
                          TUNIO_MAX_WORKERS);
                return;
            }
            s->nworkers++;
        }
    }
    struct worker *wk = &s->workers[w];
    memset(wk, 0, sizeof(*wk));
    memcpy(wk->id, id, id_len);
    wk->id_len = id_len;
    size_t nl = zmq_msg_size(payload);
    memcpy(wk->name, zmq_msg_data(payload), nl);
    wk->name[nl] = 0;
    wk->alive = 1;
    wk->capacity = h->arg;
    wk->last_seen = tunio_now_ms();
    tunio_log(TUNIO_LOG_INFO, "worker %s joined (%d alive)", wk->name, broker_alive_workers(s));
    broker_send(s, w, TUNIO_CMD_HELLO, 0, 0, STACK_NAME, strlen(STACK_NAME));
}

static void on_message(struct tunio_stack *s, zmq_msg_t *frames, int nframes)
{
    const uint8_t *id = zmq_msg_data(&frames[0]);
    size_t id_len = zmq_msg_size(&frames[0]);
    struct tunio_wire_header h;
    zmq_msg_t *payload = nframes == 3 ? &frames[2] : NULL;
    int err = nframes < 2 || nframes > 3 || id_len > sizeof(s->workers[0].id)
                  ? -EPROTO
                  : tunio_wire_decode(zmq_msg_data(&frames[1]), zmq_msg_size(&frames[1]),
                                      payload != NULL, payload ? zmq_msg_size(payload) : 0, &h);
    int w = id_len <= sizeof(s->workers[0].id) ? find_worker(s, id, id_len) : -1;
    if (err) {
        s->c.protocol_errors++;
        tunio_log(TUNIO_LOG_WARNING, "malformed message from %s dropped (%s)",
                  w >= 0 ? s->workers[w].name : "an unknown peer",
                  err == -EPROTONOSUPPORT ? "protocol version" : "framing");
        if (err == -EPROTONOSUPPORT && id_len <= sizeof(s->workers[0].id)) {
            /* Tell the peer why, so it can say so in its log; it gets no flows. */
            uint8_t hdr[TUNIO_WIRE_HEADER_LEN];
            tunio_wire_encode_header(hdr, TUNIO_CMD_BYE, 0, EPROTONOSUPPORT);
            if (!send_frame(s, id, id_len, 1))
                send_frame(s, hdr, sizeof(hdr), 0);
        }
        return;
    }
    if (h.cmd == TUNIO_CMD_HELLO) {
        on_hello(s, id, id_len, &h, payload);
        return;
    }
    if (w < 0 || !s->workers[w].alive) {
        /* Not (or no longer) a worker of ours: it will say HELLO again once our silence tells
         * it so. DATA still gets its RST so nothing waits on it. */
        if (h.cmd == TUNIO_CMD_DATA) {
            uint8_t hdr[TUNIO_WIRE_HEADER_LEN];
            tunio_wire_encode_header(hdr, TUNIO_CMD_RST, h.flow, ENOTCONN);
            if (!send_frame(s, id, id_len, 1))
                send_frame(s, hdr, sizeof(hdr), 0);
        }
        return;
    }
    s->workers[w].last_seen = tunio_now_ms();
    switch (h.cmd) {
    case TUNIO_CMD_HEARTBEAT:
        break;
    case TUNIO_CMD_BYE:
        worker_lost(s, w, "it said BYE");
        break;
    case TUNIO_CMD_OPEN:
        s->c.protocol_errors++; /* only the stack opens flows */
        break;
    default:
        if (!udp_on_message(s, w, &h, payload))
            relay_on_message(s, w, &h, payload);
        break;
    }
}

void broker_drain(struct tunio_stack *s)
{
    for (int handled = 0; handled < DRAIN_BATCH; handled++) {
        zmq_msg_t frames[4];
        int n = 0, more = 1, failed = 0;
        while (more) {
            zmq_msg_t *m = &frames[n < 4 ? n : 3];
            if (n >= 4)
                zmq_msg_close(m); /* too many frames: keep draining, reject below */
            zmq_msg_init(m);
            if (zmq_msg_recv(m, s->router, ZMQ_DONTWAIT) < 0) {
                zmq_msg_close(m);
                failed = 1;
                break;
            }
            more = zmq_msg_more(m);
            n++;
        }
        int kept = n < 4 ? n : 4;
        if (!failed)
            on_message(s, frames, n <= 3 ? n : 4);
        for (int i = 0; i < kept; i++)
            zmq_msg_close(&frames[i]);
        if (failed)
            return; /* EAGAIN: nothing more queued */
    }
}

void broker_reap(struct tunio_stack *s)
{
    if (!s->doomed)
        return;
    s->doomed = 0;
    for (int i = 0; i < s->nworkers; i++) {
        if (s->workers[i].doomed) {
            s->workers[i].doomed = 0;
            worker_lost(s, i, "its connection is gone");
        }
    }
}

void broker_tick(struct tunio_stack *s, uint64_t now)
{
    uint64_t limit = (uint64_t)s->cfg.heartbeat_ms * TUNIO_LIVENESS;
    int beat = now - s->last_heartbeat >= s->cfg.heartbeat_ms;
    if (beat)
        s->last_heartbeat = now;
    for (int i = 0; i < s->nworkers; i++) {
        struct worker *w = &s->workers[i];
        if (!w->alive)
            continue;
        if (now - w->last_seen > limit)
            worker_lost(s, i, "no heartbeat");
        else if (beat)
            broker_send(s, i, TUNIO_CMD_HEARTBEAT, 0, 0, NULL, 0);
    }
}

void broker_bye_all(struct tunio_stack *s)
{
    for (int i = 0; i < s->nworkers; i++)
        if (s->workers[i].alive)
            broker_send(s, i, TUNIO_CMD_BYE, 0, 0, NULL, 0);
}
