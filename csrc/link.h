/* The link to the workers: the ZeroMQ ROUTER (and its ZAP handler with CURVE), the workers table
 * (HELLO, heartbeats, BYE, liveness), the least-loaded choice of a worker and the load it counts
 * per worker, and the framing of every message. Runs on the loop thread only.
 *
 * The link knows no flows: it hands each decoded flow or session message to its owner, and tells
 * its owner when a worker's flows are gone, always from tunio_link_drain, _reap or _tick (never
 * from inside a send, so a caller holding a flow never sees it vanish under it). */
#ifndef TUNIO_LINK_H
#define TUNIO_LINK_H

#include <stddef.h>
#include <stdint.h>
#include <zmq.h>

struct tunio_stats;
struct tunio_wire_header;
struct tunio_worker_info;
struct tunio_link;

/* What became of a lost worker's flows: the log line says what was done, not the worker's load,
 * which counts the held flows that another worker now dials. */
struct tunio_link_lost {
    uint32_t reset;    /* flows the apps see reset (or refused, if none could dial again) */
    uint32_t redialed; /* held flows passed to another worker */
    uint32_t sessions; /* UDP sessions ended: their next datagram opens one elsewhere */
};

struct tunio_link_config {
    const char *endpoint;      /* the ROUTER binds it (copied) */
    const char *curve_secret;  /* z85 secret key: CURVE on the endpoint; NULL: off */
    const char *curve_clients; /* z85 public keys of the workers let in (with CURVE) */
    uint32_t heartbeat_ms;     /* a worker silent TUNIO_LIVENESS intervals is lost */
    /* A peer that sends a larger frame is disconnected by ZeroMQ before the frame is held
     * (ZMQ_MAXMSGSIZE); 0: no limit. */
    uint64_t max_frame;
    /* A message of a flow or a datagram session from `worker`: every command but HELLO,
     * HEARTBEAT, BYE and OPEN. `payload` is NULL or may be moved from (zmq_msg_move). */
    void (*on_message)(void *owner, int worker, const struct tunio_wire_header *h,
                       zmq_msg_t *payload);
    /* The flows and sessions of `worker` are gone: it was lost, or it said HELLO again. The
     * worker is not alive while this runs: nothing new is sent to it or given to it. What
     * became of them goes in `out`, for the link's log line. */
    void (*on_worker_lost)(void *owner, int worker, struct tunio_link_lost *out);
    void *owner;
};

/* Binds the ROUTER (with CURVE: the ZAP handler first), so that on return workers can connect. */
int tunio_link_new(const struct tunio_link_config *cfg, struct tunio_link **out);
/* Closes the sockets and terminates the context (NULL is fine). */
void tunio_link_free(struct tunio_link *l);
/* The ROUTER's ZMQ_FD, and the ZAP handler's (-1 without CURVE), for the loop's epoll. */
int tunio_link_fd(const struct tunio_link *l);
int tunio_link_zap_fd(const struct tunio_link *l);
/* Answers the ZAP handler's waiting requests (a no-op without CURVE). */
void tunio_link_zap_drain(struct tunio_link *l);

/* ZMQ_FD only signals that the socket's state may have changed: whether messages are waiting.
 * Asks ZeroMQ (ZMQ_EVENTS: a getpid and a poll in libzmq) only when something may have changed
 * since it last found none: a call on the socket, or the fd firing (tunio_link_fired). */
int tunio_link_readable(struct tunio_link *l);
/* The loop's epoll found ZMQ_FD readable. */
void tunio_link_fired(struct tunio_link *l);
/* Handles up to a batch of waiting messages. */
void tunio_link_drain(struct tunio_link *l);
/* Reports the workers whose connection a send found gone (after the event that found it). */
void tunio_link_reap(struct tunio_link *l);
/* Heartbeats out every heartbeat_ms; workers silent too long are lost. */
void tunio_link_tick(struct tunio_link *l, uint64_t now);
/* BYE to every live worker (the stack stops). */
void tunio_link_bye_all(struct tunio_link *l);

/* Sends a message (payload copied, if any) to `worker`. -ENOTCONN if it is not alive. */
int tunio_link_send(struct tunio_link *l, int worker, uint8_t cmd, uint32_t flow, uint64_t arg,
                    const void *payload, size_t len);
/* The same with a payload in a malloc'd buffer, handed to ZeroMQ without a copy (freed by it,
 * or here on failure). */
int tunio_link_send_owned(struct tunio_link *l, int worker, uint8_t cmd, uint32_t flow,
                          uint64_t arg, uint8_t *buf, size_t len);

/* The worker for a new flow or session: least loaded first among the live ones whose connection
 * no send has found gone, -1 if none can take one. */
int tunio_link_pick(struct tunio_link *l);
/* A flow or session of `worker` begins (+1) or ends (-1): its load, for tunio_link_pick. */
void tunio_link_load(struct tunio_link *l, int worker, int delta);

/* What worker `worker` said it takes in its HELLO (TUNIO_WIRE_FEATURE_*). */
int tunio_link_features(const struct tunio_link *l, int worker);

/* The worker at `index` of the table (0..; -ENOENT past its end): name, alive, load, capacity. */
int tunio_link_worker_info(const struct tunio_link *l, int index, struct tunio_worker_info *out);

/* Adds workers (alive), workers_lost and its protocol_errors. */
void tunio_link_add_stats(const struct tunio_link *l, struct tunio_stats *o);

#endif
