/* The TUN reader threads, one per queue: parse, translate (NAT), write back, and hand new flows
 * and datagrams to the loop thread through its queues. A reader gets what it needs handed in; it
 * shares only the NAT tables (locked), the queues (locked) and the TUN writer (counters atomic). */
#ifndef TUNIO_READER_H
#define TUNIO_READER_H

#include <stdatomic.h>

struct tunio_nat;
struct tunio_queue;
struct tunio_stats;
struct tunio_dns;
struct tunio_tun;
struct tunio_reader;

struct tunio_reader_config {
    int index;                    /* the queue's number: the thread is named tunio-rd<index> */
    int fd;                       /* its TUN queue */
    int stop_fd;                  /* the thread ends once this is readable */
    struct tunio_tun *tun;        /* packets are written back through it */
    struct tunio_nat *nat[2];     /* [0] IPv4, [1] IPv6; NULL: a family the stack does not carry */
    struct tunio_queue *opens;    /* new flows (struct tunio_nat_open) for the loop */
    struct tunio_queue *dgrams;   /* datagrams (struct tunio_dgram) for the loop */
    struct tunio_dns *dns;        /* UDP to port 53 is asked about first; NULL: no DNS of ours */
    struct tunio_queue *releases; /* from the loop: released SYNs (struct tunio_dgram) to write
                                   * into this queue (NULL: none) */
    atomic_int *failed;           /* counted up when this reader ends on a failure of its queue
                                   * (the device deleted): NULL, not counted */
};

int tunio_reader_new(const struct tunio_reader_config *cfg, struct tunio_reader **out);
/* Starts the thread. */
int tunio_reader_start(struct tunio_reader *r);
/* Waits for the thread to end (the stop fd must be readable); a no-op if it is not running. */
void tunio_reader_join(struct tunio_reader *r);
/* Joins, then frees (NULL is fine). */
void tunio_reader_free(struct tunio_reader *r);
/* Adds packets_read, the parser's drops and the datagrams it could not queue. */
void tunio_reader_add_stats(const struct tunio_reader *r, struct tunio_stats *o);

#endif
