/* TUN reader threads: one per queue. A flow's packets stay on one queue, so per-flow order is
 * kept; the only shared state is the NAT table and the queue of new flows for the loop thread. */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "common.h"
#include "reasm.h"
#include "stack_internal.h"

#define READ_BATCH 64 /* packets per wakeup before checking the stop fd again */
#define REPLY_MAX 128 /* a RST or an ICMP error quoting a SYN */

int packet_queue_init(struct item_queue *q)
{
    memset(q, 0, sizeof(*q));
    q->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (q->efd < 0)
        return -errno;
    int err = pthread_mutex_init(&q->lock, NULL);
    if (err) {
        close(q->efd);
        q->efd = -1;
        return -err;
    }
    return 0;
}

void packet_queue_fini(struct item_queue *q)
{
    free(q->items);
    close(q->efd);
    pthread_mutex_destroy(&q->lock);
}

int packet_queue_push(struct item_queue *q, const void *item, size_t size, size_t max)
{
    pthread_mutex_lock(&q->lock);
    if (q->len >= max) {
        pthread_mutex_unlock(&q->lock);
        return -ENOBUFS;
    }
    if (q->len == q->cap) {
        size_t cap = q->cap ? q->cap * 2 : 64;
        uint8_t *items = realloc(q->items, cap * size);
        if (!items) {
            pthread_mutex_unlock(&q->lock);
            return -ENOMEM;
        }
        q->items = items;
        q->cap = cap;
    }
    memcpy(q->items + q->len * size, item, size);
    q->len++;
    pthread_mutex_unlock(&q->lock);
    uint64_t one = 1;
    ssize_t w = write(q->efd, &one, sizeof(one));
    (void)w; /* an eventfd write only fails when the counter is saturated: already signalled */
    return 0;
}

size_t packet_queue_take(struct item_queue *q, void **out)
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

/* The virtio-net header's fields we use (linux/virtio_net.h; little-endian on the x86/arm
 * hosts a TUN device runs on, as the kernel's own tun_vnet_hdr does for non-legacy headers). */
#define VNET_F_NEEDS_CSUM 1

static uint16_t le16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }

static void handle_packet(struct tunio_stack *s, struct reader *r, uint8_t *frame, size_t n,
                          uint8_t *reply, int reassembled);

/* A fragment: held until its datagram is whole, which then goes the way of any packet. */
static void handle_fragment(struct tunio_stack *s, struct reader *r,
                            const struct tunio_pkt *fragment, uint8_t *reply)
{
    size_t h = s->vnet_len;
    uint8_t *whole = NULL;
    size_t len = 0;
    int res = r->reasm ? tunio_reasm_add(r->reasm, fragment, tunio_now_ms(), &whole, &len)
                       : TUNIO_REASM_DISCARDED;
    unsigned gone = (r->reasm ? tunio_reasm_take_discarded(r->reasm) : 0) +
                    (res == TUNIO_REASM_DISCARDED);
    if (gone)
        atomic_fetch_add_explicit(&s->c.drop[TUNIO_PKT_FRAGMENT], gone, memory_order_relaxed);
    if (res == TUNIO_REASM_DONE) {
        memset(whole - h, 0, h); /* a virtio-net header saying nothing: no offload */
        handle_packet(s, r, whole - h, h + len, reply, 1);
    }
}

static void handle_packet(struct tunio_stack *s, struct reader *r, uint8_t *frame, size_t n,
                          uint8_t *reply, int reassembled)
{
    int fd = r->fd;
    size_t h = s->vnet_len;
    struct tunio_pkt p;
    int st = n < h ? TUNIO_PKT_TRUNCATED : tunio_pkt_parse(&p, frame + h, n - h);
    if (st == TUNIO_PKT_FRAGMENT && !reassembled) {
        handle_fragment(s, r, &p, reply);
        return;
    }
    if (st != TUNIO_PKT_OK) {
        atomic_fetch_add_explicit(&s->c.drop[st], 1, memory_order_relaxed);
        return;
    }
    struct family *fam = stack_family(s, p.version);
    if (!fam->ready) {
        /* An address family the TUN has no address of: nothing of ours can be there. */
        atomic_fetch_add_explicit(&s->c.drop[TUNIO_PKT_UNSUPPORTED], 1, memory_order_relaxed);
        return;
    }
    if (p.proto != TUNIO_IPPROTO_TCP) {
        udp_enqueue(s, &p); /* UDP, and ICMP echo requests: datagram sessions */
        return;
    }
    if (h && (frame[0] & VNET_F_NEEDS_CSUM)) {
        p.partial_csum = 1;
        /* A SYN may be held, copied and injected later without this header: complete its
         * checksum now. Other segments go back with their header and stay partial. */
        if ((p.tcp_flags & TUNIO_TCP_SYN) &&
            tunio_pkt_complete_csum(&p, le16(frame + 6), le16(frame + 8)) == 0)
            frame[0] &= (uint8_t)~VNET_F_NEEDS_CSUM;
    }
    struct tunio_nat_open open;
    size_t reply_len = 0;
    switch (tunio_nat_translate(&fam->nat, &p, tunio_now_ms(), reply, REPLY_MAX, &reply_len,
                                &open)) {
    case TUNIO_NAT_FORWARD:
        /* Written back with its own virtio-net header: a 64 KB segment stays one. */
        if (write(fd, frame, h + p.len) == (ssize_t)(h + p.len))
            atomic_fetch_add_explicit(&s->c.packets_written, 1, memory_order_relaxed);
        else
            atomic_fetch_add_explicit(&s->c.write_errors, 1, memory_order_relaxed);
        break;
    case TUNIO_NAT_REPLY:
        stack_tun_write(s, fd, reply, reply_len);
        break;
    case TUNIO_NAT_OPEN:
        if (packet_queue_push(&s->opens, &open, sizeof(open), SIZE_MAX) < 0)
            stack_reject(s, fd, open.version, open.entry, open.flow_id, ENOMEM);
        break;
    case TUNIO_NAT_DROP:
        break;
    }
}

static void *reader_main(void *arg)
{
    struct reader *r = arg;
    struct tunio_stack *s = r->s;
    uint8_t *buf = malloc(TUNIO_TUN_BUF);
    uint8_t reply[REPLY_MAX];
    r->reasm = tunio_reasm_new(); /* without it, fragments are dropped as before */
    if (!buf) {
        tunio_log(TUNIO_LOG_ERROR, "reader: out of memory");
        return NULL;
    }
    struct pollfd pfd[2] = {{.fd = r->fd, .events = POLLIN}, {.fd = s->stop_fd, .events = POLLIN}};
    while (!atomic_load(&s->stopping)) {
        if (poll(pfd, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            tunio_log(TUNIO_LOG_ERROR, "reader: poll: %s", strerror(errno));
            break;
        }
        if (pfd[1].revents)
            break;
        if (pfd[0].revents & (POLLERR | POLLNVAL)) {
            tunio_log(TUNIO_LOG_ERROR, "reader: TUN queue fd %d failed", r->fd);
            break;
        }
        for (int i = 0; i < READ_BATCH; i++) {
            ssize_t n = read(r->fd, buf, TUNIO_TUN_BUF);
            if (n < 0) {
                if (errno != EAGAIN && errno != EINTR)
                    tunio_log(TUNIO_LOG_WARNING, "reader: read: %s", strerror(errno));
                break;
            }
            if (n == 0)
                break;
            atomic_fetch_add_explicit(&s->c.packets_read, 1, memory_order_relaxed);
            handle_packet(s, r, buf, (size_t)n, reply, 0);
        }
    }
    free(buf);
    tunio_reasm_free(r->reasm);
    r->reasm = NULL;
    return NULL;
}

int reader_start(struct tunio_stack *s, struct reader *r)
{
    r->s = s;
    int err = pthread_create(&r->thread, NULL, reader_main, r);
    if (err)
        return -err;
    /* Named per queue, so top -H and a per-thread CPU profile (make bench) tell the readers
     * from the loop thread. */
    char name[16];
    snprintf(name, sizeof(name), "tunio-rd%d", (int)(r - s->readers));
    pthread_setname_np(r->thread, name);
    r->started = 1;
    return 0;
}

void reader_join(struct reader *r)
{
    if (r->started)
        pthread_join(r->thread, NULL);
    r->started = 0;
}
