/* Datagram sessions: UDP, and ICMP echo. The readers queue the datagrams they read; the loop
 * thread owns the session tables, forwards DGRAMs to each session's worker within its credit and
 * writes the replies into the TUN. Runs on the loop thread (but for the queue's push side). */
#ifndef TUNIO_UDP_H
#define TUNIO_UDP_H

#include <stdatomic.h>
#include <stdint.h>
#include <zmq.h>

struct tunio_dnsmap;
struct tunio_link;
struct tunio_nat_limits;
struct tunio_queue;
struct tunio_stats;
struct tunio_tun;
struct tunio_wire_header;
struct tunio_udp;

struct tunio_udp_config {
    uint32_t timeout_ms;             /* a session idle this long is ended */
    uint64_t worker_backlog;         /* DGRAM bytes a worker may have uncredited, all sessions */
    atomic_uint *next_id;            /* the stack's id counter, shared with the NAT tables' flows */
    struct tunio_tun *tun;           /* replies and ICMP errors are written into it */
    struct tunio_link *link;         /* the workers */
    struct tunio_nat_limits *limits; /* each session is a flow of the stack's budget; NULL: none */
    /* DNS (dns.h): queries the readers mark `upstream` go to this resolver instead of their
     * destination, and its replies come back from that destination (version 0: none). */
    uint8_t upstream_version;
    uint8_t upstream[16];
    uint16_t upstream_port;
    /* The fake-IP map: a session to one of its addresses tells its worker the name (NAME) and
     * holds the address while it lives; NULL: no fake-IP DNS. */
    struct tunio_dnsmap *map;
};

int tunio_udp_new(const struct tunio_udp_config *cfg, struct tunio_udp **out);
/* Ends every session without telling anyone, drops what is queued (NULL is fine). */
void tunio_udp_free(struct tunio_udp *u);
/* The queue the readers put datagrams on (struct tunio_dgram). */
struct tunio_queue *tunio_udp_queue(struct tunio_udp *u);
/* Forwards the queued datagrams, opening sessions as needed. */
void tunio_udp_drain(struct tunio_udp *u);
/* Handles a message if it belongs to a datagram session (returns 1), else returns 0. */
int tunio_udp_on_message(struct tunio_udp *u, int worker, const struct tunio_wire_header *h,
                         zmq_msg_t *payload);
/* Returns credit owed, ends idle sessions. */
void tunio_udp_tick(struct tunio_udp *u, uint64_t now);
/* Ends the sessions of `worker` (returns how many): the next datagram opens a session on
 * another one. */
uint32_t tunio_udp_worker_lost(struct tunio_udp *u, int worker);

/* The stack stops: every session ends (RST(0) to its worker). */
void tunio_udp_end_all(struct tunio_udp *u);

/* Adds udp_sessions, udp_sessions_opened, udp_to/from_workers, udp_backlog_bytes, and its
 * udp_dropped, udp_dropped_backlog, no_worker and protocol_errors. */
void tunio_udp_add_stats(const struct tunio_udp *u, struct tunio_stats *o);

#endif
