/* TUN reader threads: one per queue. A flow's packets stay on one queue, so per-flow order is
 * kept; the only shared state is the NAT table and the queues to the loop thread. */
#include "reader.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "common.h"
#include "defaults.h"
#include "dns.h"
#include "nat.h"
#include "packet.h"
#include "queue.h"
#include "reasm.h"
#include "tun.h"
#include "tunio.h"

#define READ_BATCH 64      /* packets per wakeup before checking the stop fd again */
#define REPLY_MAX 128      /* a RST or an ICMP error quoting a SYN */
#define DNS_REPLY_MAX 1024 /* an answer of the stack's DNS, with its IP and UDP headers */

struct tunio_reader {
    struct tunio_reader_config cfg;
    size_t vnet_len;
    struct tunio_reasm *reasm; /* this queue's fragments (reasm.c) */
    pthread_t thread;
    int started;
    /* Written by this reader only; atomic so that stats can read them from another thread. */
    atomic_ullong packets_read;
    atomic_ullong drop[5]; /* by enum tunio_pkt_status */
    atomic_ullong dgrams_dropped;
    atomic_ullong martians;           /* see tunio_pkt_dst_martian */
    uint8_t dns_reply[DNS_REPLY_MAX]; /* this thread's */
};

static void count(atomic_ullong *c, unsigned n)
{
    atomic_fetch_add_explicit(c, n, memory_order_relaxed);
}

/* The virtio-net header's fields we use (linux/virtio_net.h; little-endian on the x86/arm
 * hosts a TUN device runs on, as the kernel's own tun_vnet_hdr does for non-legacy headers). */
#define VNET_F_NEEDS_CSUM 1

static uint16_t le16(const uint8_t *p)
{
    return (uint16_t)(p[0] | p[1] << 8);
}

static void handle_packet(struct tunio_reader *r, uint8_t *frame, size_t n, uint8_t *reply,
                          int reassembled);

/* A fragment: held until its datagram is whole, which then goes the way of any packet. */
static void handle_fragment(struct tunio_reader *r, const struct tunio_pkt *fragment,
                            uint8_t *reply)
{
    size_t h = r->vnet_len;
    uint8_t *whole = NULL;
    size_t len = 0;
    int res = r->reasm ? tunio_reasm_add(r->reasm, fragment, tunio_now_ms(), &whole, &len)
                       : TUNIO_REASM_DISCARDED;
    unsigned gone =
        (r->reasm ? tunio_reasm_take_discarded(r->reasm) : 0) + (res == TUNIO_REASM_DISCARDED);
    if (gone)
        count(&r->drop[TUNIO_PKT_FRAGMENT], gone);
    if (res == TUNIO_REASM_DONE) {
        memset(whole - h, 0, h); /* a virtio-net header saying nothing: no offload */
        handle_packet(r, whole - h, h + len, reply, 1);
    }
}

/* UDP, and ICMP echo requests: datagram sessions, on the loop thread. Copied, since the read
 * buffer is reused at once. */
static void queue_dgram(struct tunio_reader *r, const struct tunio_pkt *p, int upstream)
{
    struct tunio_dgram d = {.data = malloc(p->len), .len = p->len, .upstream = upstream};
    if (d.data)
        memcpy(d.data, p->buf, p->len); /* before the push: the loop may take it at once */
    if (!d.data || tunio_queue_push(r->cfg.dgrams, &d) < 0) {
        free(d.data);
        count(&r->dgrams_dropped, 1);
    }
}

static void handle_packet(struct tunio_reader *r, uint8_t *frame, size_t n, uint8_t *reply,
                          int reassembled)
{
    int fd = r->cfg.fd;
    size_t h = r->vnet_len;
    struct tunio_pkt p;
    int st = n < h ? TUNIO_PKT_TRUNCATED : tunio_pkt_parse(&p, frame + h, n - h);
    if (st == TUNIO_PKT_FRAGMENT && !reassembled) {
        handle_fragment(r, &p, reply);
        return;
    }
    if (st != TUNIO_PKT_OK) {
        count(&r->drop[st], 1);
        return;
    }
    struct tunio_nat *nat = r->cfg.nat[p.version == 6];
    if (!nat) {
        /* An address family the TUN has no address of: nothing of ours can be there. */
        count(&r->drop[TUNIO_PKT_UNSUPPORTED], 1);
        return;
    }
    /* A martian destination is dropped, as Linux drops it on input (and the app's own stack
     * never sends one into a TUN): a flow there would reach the gateway's loopback or its
     * LAN's multicast groups. The stack's own addresses (in the rig, loopback ones) and the
     * DNS address, served below, are not flows to anywhere. */
    int martian = tunio_pkt_dst_martian(&p) && !tunio_nat_owns(nat, p.dst);
    if (p.proto != TUNIO_IPPROTO_TCP) {
        size_t n = 0;
        switch (tunio_dns_serve(r->cfg.dns, &p, tunio_now_ms(), r->dns_reply, DNS_REPLY_MAX, &n)) {
        case TUNIO_DNS_REPLY:
            tunio_tun_write(r->cfg.tun, fd, r->dns_reply, n);
            break;
        case TUNIO_DNS_FORWARD:
            queue_dgram(r, &p, 1);
            break;
        case TUNIO_DNS_DROP:
            break;
        default:
            if (martian)
                count(&r->martians, 1);
            else
                queue_dgram(r, &p, 0);
            break;
        }
        return;
    }
    if (martian) {
        count(&r->martians, 1);
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
    switch (tunio_nat_translate(nat, &p, tunio_now_ms(), reply, REPLY_MAX, &reply_len, &open)) {
    case TUNIO_NAT_FORWARD:
        /* Written back with its own virtio-net header: a 64 KB segment stays one. */
        tunio_tun_write_frame(r->cfg.tun, fd, frame, h + p.len);
        break;
    case TUNIO_NAT_REPLY:
        tunio_tun_write(r->cfg.tun, fd, reply, reply_len);
        break;
    case TUNIO_NAT_OPEN:
        if (tunio_queue_push(r->cfg.opens, &open) < 0)
            tunio_tun_reject(r->cfg.tun, fd, nat, open.entry, open.flow_id, ENOMEM);
        break;
    case TUNIO_NAT_DROP:
        break;
    }
}

/* The readers carry every packet both ways, and each write runs the kernel's receive path: they
 * are this stack's softirq. Starved of CPU by busier processes (the workers, the apps), they let
 * the TUN's transmit ring overflow, and its drops cost every flow retransmits and seconds. So
 * they run at a higher priority than the rest of the machine, when allowed (CAP_SYS_NICE). */
static void raise_priority(void)
{
    pid_t tid = (pid_t)syscall(SYS_gettid);
    if (setpriority(PRIO_PROCESS, (id_t)tid, TUNIO_READER_NICE) < 0)
        tunio_log(TUNIO_LOG_DEBUG, "reader: keeps its priority (setpriority: %s)", strerror(errno));
}

/* The SYNs the loop released: written into our queue, so the kernel answers them (the listener's
 * SYN-ACK) on this thread. */
static void write_releases(struct tunio_reader *r)
{
    struct tunio_dgram *items;
    size_t n = tunio_queue_take(r->cfg.releases, (void **)&items);
    for (size_t i = 0; i < n; i++) {
        tunio_tun_write(r->cfg.tun, r->cfg.fd, items[i].data, items[i].len);
        free(items[i].data);
    }
    free(items);
}

static void *reader_main(void *arg)
{
    struct tunio_reader *r = arg;
    raise_priority();
    uint8_t *buf = malloc(TUNIO_TUN_BUF);
    uint8_t reply[REPLY_MAX];
    r->reasm = tunio_reasm_new(); /* without it, fragments are dropped as before */
    if (!buf) {
        tunio_log(TUNIO_LOG_ERROR, "reader: out of memory");
        tunio_reasm_free(r->reasm);
        r->reasm = NULL;
        if (r->cfg.failed)
            atomic_fetch_add(r->cfg.failed, 1);
        return NULL;
    }
    int fd = r->cfg.fd;
    struct pollfd pfd[3] = {
        {.fd = fd, .events = POLLIN},
        {.fd = r->cfg.stop_fd, .events = POLLIN},
        {.fd = r->cfg.releases ? tunio_queue_fd(r->cfg.releases) : -1, .events = POLLIN}};
    int stopped = 0; /* the way out asked for, not a failure */
    for (;;) {
        if (poll(pfd, 3, -1) < 0) {
            if (errno == EINTR)
                continue;
            tunio_log(TUNIO_LOG_ERROR, "reader: poll: %s", strerror(errno));
            break;
        }
        if (pfd[1].revents) {
            stopped = 1;
            break;
        }
        if (pfd[2].revents)
            write_releases(r);
        if (pfd[0].revents & (POLLERR | POLLNVAL)) {
            tunio_log(TUNIO_LOG_ERROR, "reader: TUN queue fd %d failed", fd);
            break;
        }
        for (int i = 0; i < READ_BATCH; i++) {
            ssize_t n = read(fd, buf, TUNIO_TUN_BUF);
            if (n < 0) {
                if (errno != EAGAIN && errno != EINTR)
                    tunio_log(TUNIO_LOG_WARNING, "reader: read: %s", strerror(errno));
                break;
            }
            if (n == 0)
                break;
            count(&r->packets_read, 1);
            handle_packet(r, buf, (size_t)n, reply, 0);
        }
    }
    free(buf);
    tunio_reasm_free(r->reasm);
    r->reasm = NULL;
    if (!stopped && r->cfg.failed)
        atomic_fetch_add(r->cfg.failed, 1);
    return NULL;
}

int tunio_reader_new(const struct tunio_reader_config *cfg, struct tunio_reader **out)
{
    *out = NULL;
    struct tunio_reader *r = calloc(1, sizeof(*r));
    if (!r)
        return -ENOMEM;
    r->cfg = *cfg;
    r->vnet_len = tunio_tun_vnet_len(cfg->tun);
    atomic_init(&r->packets_read, 0);
    for (size_t i = 0; i < TUNIO_ARRAY_LEN(r->drop); i++)
        atomic_init(&r->drop[i], 0);
    atomic_init(&r->dgrams_dropped, 0);
    atomic_init(&r->martians, 0);
    *out = r;
    return 0;
}

int tunio_reader_start(struct tunio_reader *r)
{
    int err = pthread_create(&r->thread, NULL, reader_main, r);
    if (err)
        return -err;
    /* Named per queue, so top -H and a per-thread CPU profile (make bench) tell the readers
     * from the loop thread. */
    char name[16];
    snprintf(name, sizeof(name), "tunio-rd%d", r->cfg.index);
    pthread_setname_np(r->thread, name);
    r->started = 1;
    return 0;
}

void tunio_reader_join(struct tunio_reader *r)
{
    if (r && r->started)
        pthread_join(r->thread, NULL);
    if (r)
        r->started = 0;
}

void tunio_reader_free(struct tunio_reader *r)
{
    if (!r)
        return;
    tunio_reader_join(r);
    free(r);
}

void tunio_reader_add_stats(const struct tunio_reader *r, struct tunio_stats *o)
{
    o->packets_read += atomic_load(&r->packets_read);
    o->drop_truncated += atomic_load(&r->drop[TUNIO_PKT_TRUNCATED]);
    o->drop_bad_header += atomic_load(&r->drop[TUNIO_PKT_BAD_HEADER]);
    o->drop_fragment += atomic_load(&r->drop[TUNIO_PKT_FRAGMENT]);
    o->drop_unsupported += atomic_load(&r->drop[TUNIO_PKT_UNSUPPORTED]);
    o->udp_dropped += atomic_load(&r->dgrams_dropped);
    o->drop_martian += atomic_load(&r->martians);
}
