/* The stack's private state, shared by its parts:
 *   reader.c  one thread per TUN queue: parse, translate, write back, hand new flows on;
 *   stack.c   lifecycle and the loop thread (epoll over listener, accepted sockets, ROUTER);
 *   broker.c  the workers: ROUTER messages, HELLO/heartbeat/BYE, least-loaded choice;
 *   relay.c   one flow: accepted socket <-> DATA/CREDIT/FIN/RST with its worker.
 * Only the loop thread touches flows, workers and the ZeroMQ socket; the readers share just the
 * NAT table (locked) and the queue of new flows (locked, signalled by an eventfd). */
#ifndef TUNIO_STACK_INTERNAL_H
#define TUNIO_STACK_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <zmq.h>

#include "defaults.h"
#include "nat.h"
#include "tunio.h"
#include "wire.h"

#define TUNIO_VNET_HLEN 10u /* struct virtio_net_hdr */
#define TUNIO_TUN_BUF (65536u + TUNIO_VNET_HLEN)

/* epoll tags: the low byte says what an event is for; flows carry their id above it. */
enum {
    TAG_LISTENER4 = 1,
    TAG_LISTENER6,
    TAG_ROUTER,
    TAG_OPENS,
    TAG_STOP,
    TAG_TIMER,
    TAG_UDPQ,
    TAG_ZAP,
    TAG_FLOW,
};

enum flow_flag {
    FLOW_OPEN_OK = 1u << 0,    /* the worker's dial succeeded */
    FLOW_APP_EOF = 1u << 1,    /* the app shut its write side; FIN sent to the worker */
    FLOW_WORKER_FIN = 1u << 2, /* the worker will send no more DATA */
    FLOW_APP_SHUT = 1u << 3,   /* we shut the write side towards the app */
    FLOW_READABLE = 1u << 4,   /* edge seen, not yet drained to EAGAIN */
    FLOW_WRITABLE = 1u << 5,
};

struct chunk {
    zmq_msg_t msg;
    size_t off;
    struct chunk *next;
};

struct flow {
    uint32_t id;
    uint32_t entry;       /* NAT entry */
    uint8_t version;      /* which family's NAT table holds the entry */
    int worker;           /* index in stack.workers */
    int fd;               /* accepted socket, -1 before accept */
    uint32_t flags;
    uint64_t credit;      /* bytes we may still send to the worker */
    uint64_t uncredited;  /* bytes written to the app and not yet returned (CREDIT, or DATA's arg) */
    uint64_t queued;      /* bytes held for the app */
    struct chunk *head;
    struct chunk *tail;
    uint64_t since_ms;    /* OPEN sent, or OPEN_OK received while waiting for accept */
    struct flow *hnext;
};

struct worker {
    uint8_t id[256];
    size_t id_len;
    char name[TUNIO_WIRE_NAME_MAX + 1];
    int alive;
    int doomed; /* its connection is gone; reaped after the current event */
    uint64_t last_seen;
    uint32_t flows;
    uint64_t capacity;
};

/* Items handed from the reader threads to the loop thread, signalled by an eventfd. */
struct item_queue {
    pthread_mutex_t lock;
    uint8_t *items;
    size_t len;
    size_t cap;
    int efd; /* eventfd the loop watches */
};

struct udp_session;

struct stack_counters {
    atomic_ullong packets_read;
    atomic_ullong packets_written;
    atomic_ullong drop[5]; /* by enum tunio_pkt_status */
    atomic_ullong write_errors;
    uint64_t flows_opened;
    uint64_t dial_failed;
    uint64_t flows_reset;
    uint64_t no_worker;
    uint64_t workers_lost;
    uint64_t protocol_errors;
    uint64_t bytes_to_workers;
    uint64_t bytes_from_workers;
    atomic_ullong udp_dropped;
    uint64_t udp_sessions_opened;
    uint64_t udp_to_workers;
    uint64_t udp_from_workers;
};

/* One address family the stack carries: its listener and its NAT table. */
struct family {
    int ready;
    struct tunio_nat nat;
    int listen_fd;
    uint16_t listen_port;
};

struct tunio_reasm;

struct reader {
    struct tunio_stack *s;
    struct tunio_reasm *reasm; /* this queue's fragments (reasm.c) */
    int fd;
    pthread_t thread;
    int started;
};

struct tunio_stack {
    struct tunio_config cfg;
    char *endpoint;
    int tun_fds[TUNIO_MAX_QUEUES];
    int n_tun;
    size_t vnet_len; /* bytes of virtio-net header before each packet on the queues: 0 or 10 */
    struct reader readers[TUNIO_MAX_QUEUES];
    struct family fam[2]; /* [0] IPv4, [1] IPv6 */
    atomic_uint next_flow_id;
    struct item_queue opens; /* struct tunio_nat_open */
    int opens_ready;
    struct item_queue udpq;  /* datagrams read from the TUN */
    struct udp_session **udp_tuple;
    struct udp_session **udp_id;
    uint32_t udp_sessions;
    uint8_t *udp_out;        /* where reply packets are built */
    int epfd;
    int stop_fd;
    int timer_fd;
    void *zctx;
    void *router;
    int router_fd;
    void *zap;          /* ZAP handler, with CURVE only */
    int zap_fd;
    uint8_t *zap_keys;  /* allowed worker public keys, 32 bytes each */
    size_t zap_nkeys;
    atomic_int stopping;
    /* flows, by id */
    struct flow **flow_buckets;
    uint32_t flow_mask;
    uint32_t nflows;
    /* workers */
    struct worker workers[TUNIO_MAX_WORKERS];
    int nworkers;
    unsigned rr;
    int doomed; /* some worker is doomed */
    uint64_t last_heartbeat;
    uint8_t *rbuf; /* read buffer, handed to ZeroMQ without a copy when large */
    struct stack_counters c;
};

/* stack.c */
static inline struct family *stack_family(struct tunio_stack *s, int version)
{
    return &s->fam[version == 6];
}
static inline struct tunio_nat *stack_nat(struct tunio_stack *s, int version)
{
    return &s->fam[version == 6].nat;
}
struct flow *stack_flow_find(struct tunio_stack *s, uint32_t id);
struct flow *stack_flow_new(struct tunio_stack *s, uint32_t id, uint32_t entry, int worker);
void stack_flow_free(struct tunio_stack *s, struct flow *f);
/* Answers a held SYN as a direct connect failing with `err` would have been answered (see
 * tunio_nat_reject), through queue fd `fd` (-1: the first queue). */
void stack_reject(struct tunio_stack *s, int fd, int version, uint32_t entry, uint32_t flow_id,
                  int err);
/* Writes a packet into the TUN device through queue fd `fd` (-1: the first queue). */
void stack_tun_write(struct tunio_stack *s, int fd, const uint8_t *pkt, size_t len);

/* reader.c */
int reader_start(struct tunio_stack *s, struct reader *r);
void reader_join(struct reader *r);
int packet_queue_init(struct item_queue *q);
void packet_queue_fini(struct item_queue *q);
/* Appends a copy of `item` (`size` bytes) unless `max` items wait already (-ENOBUFS). */
int packet_queue_push(struct item_queue *q, const void *item, size_t size, size_t max);
/* Moves the queued items into `*out` (caller frees); returns how many. */
size_t packet_queue_take(struct item_queue *q, void **out);

/* broker.c */
int broker_send(struct tunio_stack *s, int worker, uint8_t cmd, uint32_t flow, uint64_t arg,
                const void *payload, size_t len);
/* Sends `cmd` whose payload lives in a malloc'd buffer, handed to ZeroMQ (freed by it). */
int broker_send_owned_cmd(struct tunio_stack *s, int worker, uint8_t cmd, uint32_t flow,
                          uint64_t arg, uint8_t *buf, size_t len);
int broker_pick_worker(struct tunio_stack *s);
void broker_drain(struct tunio_stack *s);
void broker_open_flows(struct tunio_stack *s);
void broker_tick(struct tunio_stack *s, uint64_t now);
void broker_reap(struct tunio_stack *s);
void broker_bye_all(struct tunio_stack *s);
int broker_alive_workers(struct tunio_stack *s);

/* zap.c */
int zap_init(struct tunio_stack *s, const char *clients);
void zap_drain(struct tunio_stack *s);
void zap_fini(struct tunio_stack *s);

/* udp.c */
int udp_init(struct tunio_stack *s);
void udp_fini(struct tunio_stack *s);
void udp_enqueue(struct tunio_stack *s, const struct tunio_pkt *p); /* reader threads */
void udp_drain(struct tunio_stack *s);
/* Handles a message if it belongs to a UDP session (returns 1), else returns 0. */
int udp_on_message(struct tunio_stack *s, int worker, const struct tunio_wire_header *h,
                   zmq_msg_t *payload);
void udp_tick(struct tunio_stack *s, uint64_t now);
void udp_worker_lost(struct tunio_stack *s, int worker);

/* relay.c */
void relay_accept(struct tunio_stack *s, int version);
void relay_event(struct tunio_stack *s, struct flow *f, uint32_t events);
void relay_pump(struct tunio_stack *s, struct flow *f);
void relay_on_message(struct tunio_stack *s, int worker, const struct tunio_wire_header *h,
                      zmq_msg_t *payload);
/* Ends a flow abortively: the app sees a RST (or a refused connect if its SYN is still held). */
void relay_abort(struct tunio_stack *s, struct flow *f, int reason);
void relay_tick(struct tunio_stack *s, uint64_t now);

#endif
