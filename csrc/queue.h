/* The queue from the TUN reader threads to the loop thread: items of one fixed size, copied in
 * under a mutex, with an eventfd the loop's epoll watches. One carries new flows (struct
 * tunio_nat_open, owned by flows.c), one datagrams (struct tunio_dgram, owned by udp.c). */
#ifndef TUNIO_QUEUE_H
#define TUNIO_QUEUE_H

#include <stddef.h>
#include <stdint.h>

struct tunio_queue;

/* A datagram read from the TUN, copied by its reader for the loop (the reader's buffer is reused
 * at once): the item of the datagram queue. Whoever takes it frees `data`. */
struct tunio_dgram {
    uint8_t *data;
    size_t len;
    int upstream; /* a DNS query for the upstream resolver (dns.h), not for its destination */
};

/* A queue of items of `size` bytes; while `max` items wait, a push is refused. */
int tunio_queue_new(size_t size, size_t max, struct tunio_queue **out);
/* Frees the queue and its item array (NULL is fine). What items point to is the owner's: take
 * them first. */
void tunio_queue_free(struct tunio_queue *q);
/* The eventfd that is readable while items wait. */
int tunio_queue_fd(const struct tunio_queue *q);
/* Any thread: appends a copy of `item` unless `max` items wait already (-ENOBUFS). */
int tunio_queue_push(struct tunio_queue *q, const void *item);
/* Moves the queued items into `*out` (caller frees); returns how many. */
size_t tunio_queue_take(struct tunio_queue *q, void **out);

#endif
