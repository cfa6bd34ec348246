/* The reader-to-loop item queue: a growable array under a mutex, signalled by an eventfd. The
 * loop takes the whole array at once, so a push costs one copy and a lock held for it only. */
#include "queue.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

struct tunio_queue {
    pthread_mutex_t lock;
    uint8_t *items;
    size_t len;
    size_t cap;
    size_t size; /* bytes per item */
    size_t max;  /* items that may wait */
    int efd;     /* eventfd the loop watches */
};

int tunio_queue_new(size_t size, size_t max, struct tunio_queue **out)
{
    *out = NULL;
    struct tunio_queue *q = calloc(1, sizeof(*q));
    if (!q)
        return -ENOMEM;
    q->size = size;
    q->max = max;
    q->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (q->efd < 0) {
        int err = -errno;
        free(q);
        return err;
    }
    int err = pthread_mutex_init(&q->lock, NULL);
    if (err) {
        close(q->efd);
        free(q);
        return -err;
    }
    *out = q;
    return 0;
}

void tunio_queue_free(struct tunio_queue *q)
{
    if (!q)
        return;
    free(q->items);
    close(q->efd);
    pthread_mutex_destroy(&q->lock);
    free(q);
}

int tunio_queue_fd(const struct tunio_queue *q)
{
    return q->efd;
}

int tunio_queue_push(struct tunio_queue *q, const void *item)
{
    pthread_mutex_lock(&q->lock);
    if (q->len >= q->max) {
        pthread_mutex_unlock(&q->lock);
        return -ENOBUFS;
    }
    if (q->len == q->cap) {
        size_t cap = q->cap ? q->cap * 2 : 64;
        uint8_t *items = realloc(q->items, cap * q->size);
        if (!items) {
            pthread_mutex_unlock(&q->lock);
            return -ENOMEM;
        }
        q->items = items;
        q->cap = cap;
    }
    memcpy(q->items + q->len * q->size, item, q->size);
    int was_empty = q->len++ == 0;
    pthread_mutex_unlock(&q->lock);
    /* Only the first item after a take signals: the consumer reads the eventfd before it takes
     * (under the lock) everything queued, so a later item is taken with it, or finds the queue
     * empty again and signals itself. Under load one wake-up and one write carry a batch. */
    if (was_empty) {
        uint64_t one = 1;
        ssize_t w = write(q->efd, &one, sizeof(one));
        (void)w; /* an eventfd write only fails when the counter is saturated: signalled */
    }
    return 0;
}

size_t tunio_queue_take(struct tunio_queue *q, void **out)
{
    uint64_t v;
    ssize_t r = read(q->efd, &v, sizeof(v));
    (void)r;
    pthread_mutex_lock(&q->lock);
    size_t n = q->len;
    *out = q->items;
    q->items = NULL;
    q->len = q->cap = 0;
    pthread_mutex_unlock(&q->lock);
    return n;
}
