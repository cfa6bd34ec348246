/* TCP flows: the flow table, and each flow's relay between the kernel socket the listener
 * accepted and DATA/CREDIT/FIN/RST with the flow's worker; opening flows (OPEN) for the SYNs the
 * readers hold, their outcome (OPEN_OK, OPEN_FAIL), accepts, expiries and aborts; and the flows
 * of the stack's DNS server over TCP (fake-IP mode), their socket and their upstream, the
 * framing and the answers being dnstcp.h's. Runs on the loop thread only. */
#ifndef TUNIO_FLOWS_H
#define TUNIO_FLOWS_H

#include <stddef.h>
#include <stdint.h>
#include <zmq.h>

#include "defaults.h"

struct tunio_dns;
struct tunio_dnsmap;
struct tunio_link;
struct tunio_nat;
struct tunio_queue;
struct tunio_stats;
struct tunio_tun;
struct tunio_wire_header;
struct tunio_flows;

struct tunio_flows_config {
    uint32_t window;          /* credit window per flow and direction, bytes */
    uint64_t worker_backlog;  /* DATA bytes a worker may have unanswered (not yet credited) */
    int epfd;                 /* the loop's epoll: accepted sockets join it, edge-triggered, */
    uint8_t tag;              /* tagged (flow id << 8) | tag */
    struct tunio_nat *nat[2]; /* [0] IPv4, [1] IPv6; NULL: a family the stack does not carry */
    int listen_fd[2];         /* the listeners of those families */
    struct tunio_tun *tun;    /* refusals are written into it (released SYNs too, without
                               * readers to hand them to) */
    struct tunio_link *link;  /* the workers */
    /* DNS (dns.h): a flow to the DNS address's port 53 in fake-IP mode is the stack's DNS
     * server (dnstcp.h), whose upstream is dialled only for the queries it must answer; with
     * hijack, a flow to any port 53 is relayed to the upstream resolver (version 0: none). */
    struct tunio_dns *dns;
    uint8_t upstream_version;
    uint8_t upstream[16];
    uint16_t upstream_port;
    /* A DNS flow of the stack's own with nothing outstanding is closed (FIN) after this long
     * without a byte either way, ms (RFC 7766 §6.2.3). */
    uint32_t dns_idle_ms;
    /* The fake-IP map: a flow to one of its addresses tells its worker the name (NAME, before
     * OPEN) and holds the address while it lives; NULL: no fake-IP DNS. */
    struct tunio_dnsmap *map;
    /* Released SYNs (struct tunio_dgram, malloc'd) go to the readers through these, one per
     * reader (flow id modulo n_releases), so that the kernel's handling of the SYN (the
     * listener's SYN-ACK), most of a connection's cost on this side, runs on a reader's thread,
     * not on the loop's. None: the loop writes them itself. */
    struct tunio_queue *releases[TUNIO_MAX_QUEUES];
    int n_releases;
};

int tunio_flows_new(const struct tunio_flows_config *cfg, struct tunio_flows **out);
/* Closes every flow's socket, without telling anyone (NULL is fine). */
void tunio_flows_free(struct tunio_flows *fl);
/* The queue the readers put new flows on (struct tunio_nat_open). */
struct tunio_queue *tunio_flows_queue(struct tunio_flows *fl);

/* Opens the flows waiting in the queue: OPEN to a worker, or a refusal if there is none. */
void tunio_flows_open(struct tunio_flows *fl);
/* Accepts what the listener of IP `version` has. 0, or -EMFILE when connections are left in its
 * queue for lack of a descriptor even to reset them: the caller stops watching the listener
 * until its next tick, rather than be woken for them again at once. */
int tunio_flows_accept(struct tunio_flows *fl, int version);
/* epoll events on flow `id`'s socket. */
void tunio_flows_event(struct tunio_flows *fl, uint32_t id, uint32_t events);
/* A message of worker `worker` for a TCP flow (or for no flow of ours). */
void tunio_flows_on_message(struct tunio_flows *fl, int worker, const struct tunio_wire_header *h,
                            zmq_msg_t *payload);
/* The flows of `worker` are gone: those it had dialled are reset (the apps see a RST); those
 * still held (no OPEN_OK yet) are dialled again on another worker, refused only if none can (a
 * DNS flow's upstream that none can dial: its queries are answered SERVFAIL). How many of each:
 * `reset`, `redialed`. */
void tunio_flows_worker_lost(struct tunio_flows *fl, int worker, uint32_t *reset,
                             uint32_t *redialed);
/* Expires held SYNs the worker never answered and released SYNs never accepted, and closes the
 * stack's DNS connections that are idle (dns_idle_ms). */
void tunio_flows_tick(struct tunio_flows *fl, uint64_t now);

/* The stack stops: resets every flow (accepted sockets closed abortively, held SYNs answered
 * with a RST). Returns how many RSTs the kernel sends towards the apps for it: the readers must
 * pass them on before they stop. */
size_t tunio_flows_reset_all(struct tunio_flows *fl);
/* Once the readers are stopped: answers with a RST every SYN still held (queued for the loop, or
 * in a NAT table). */
void tunio_flows_reject_held(struct tunio_flows *fl);

/* Adds flows_opened, flows_retried, flows_active, dial_failed, flows_reset, bytes_*_workers,
 * dns_idle_closed, and its no_worker and protocol_errors. */
void tunio_flows_add_stats(const struct tunio_flows *fl, struct tunio_stats *o);

#endif
