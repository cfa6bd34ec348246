/* The stack's lifecycle and its loop thread. tunio_stack_new binds everything (so workers can
 * connect as soon as it returns); tunio_stack_run starts the TUN readers and runs the loop until
 * the stop eventfd is written; tunio_stack_free copes with a half-built stack. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/ip6.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <sys/uio.h>
#include <unistd.h>

#include "common.h"
#include "stack_internal.h"

#define TUNIO_VERSION "0.1.0"
#define LISTEN_BACKLOG 65535
#define EVENTS_PER_WAIT 256
#define BYE_LINGER_MS 500
#define TICK_MS 250u

const char *tunio_version(void)
{
    return TUNIO_VERSION;
}

/* ---- flow table: chained hash by id, grown when it gets dense ---- */

static uint32_t id_hash(uint32_t id)
{
    id ^= id >> 16;
    id *= 0x7feb352du;
    id ^= id >> 15;
    return id;
}

struct flow *stack_flow_find(struct tunio_stack *s, uint32_t id)
{
    struct flow *f = s->flow_buckets[id_hash(id) & s->flow_mask];
    while (f && f->id != id)
        f = f->hnext;
    return f;
}

static void flow_table_grow(struct tunio_stack *s)
{
    uint32_t nb = (s->flow_mask + 1) * 2;
    struct flow **b = calloc(nb, sizeof(*b));
    if (!b)
        return; /* stays correct, only slower */
    for (uint32_t i = 0; i <= s->flow_mask; i++) {
        struct flow *f = s->flow_buckets[i];
        while (f) {
            struct flow *next = f->hnext;
            uint32_t h = id_hash(f->id) & (nb - 1);
            f->hnext = b[h];
            b[h] = f;
            f = next;
        }
    }
    free(s->flow_buckets);
    s->flow_buckets = b;
    s->flow_mask = nb - 1;
}

struct flow *stack_flow_new(struct tunio_stack *s, uint32_t id, uint32_t entry, int worker)
{
    if (s->nflows > s->flow_mask)
        flow_table_grow(s);
    struct flow *f = calloc(1, sizeof(*f));
    if (!f)
        return NULL;
    f->id = id;
    f->entry = entry;
    f->worker = worker;
    f->fd = -1;
    f->since_ms = tunio_now_ms();
    uint32_t h = id_hash(id) & s->flow_mask;
    f->hnext = s->flow_buckets[h];
    s->flow_buckets[h] = f;
    s->nflows++;
    s->workers[worker].flows++;
    return f;
}

void stack_flow_free(struct tunio_stack *s, struct flow *f)
{
    struct flow **link = &s->flow_buckets[id_hash(f->id) & s->flow_mask];
    while (*link && *link != f)
        link = &(*link)->hnext;
    if (*link)
        *link = f->hnext;
    while (f->head) {
        struct chunk *c = f->head;
        f->head = c->next;
        zmq_msg_close(&c->msg);
        free(c);
    }
    if (f->fd >= 0) {
        epoll_ctl(s->epfd, EPOLL_CTL_DEL, f->fd, NULL);
        close(f->fd);
    }
    s->workers[f->worker].flows--;
    s->nflows--;
    free(f);
}

void stack_tun_write(struct tunio_stack *s, int fd, const uint8_t *pkt, size_t len)
{
    if (fd < 0)
        fd = s->tun_fds[0];
    /* Packets we built carry full checksums: an all-zero virtio-net header says so. */
    static const uint8_t no_offload[TUNIO_VNET_HLEN];
    struct iovec iov[2] = {{.iov_base = (void *)no_offload, .iov_len = s->vnet_len},
                           {.iov_base = (void *)pkt, .iov_len = len}};
    if (writev(fd, iov, 2) == (ssize_t)(s->vnet_len + len))
        atomic_fetch_add_explicit(&s->c.packets_written, 1, memory_order_relaxed);
    else
        atomic_fetch_add_explicit(&s->c.write_errors, 1, memory_order_relaxed);
}

void stack_reject(struct tunio_stack *s, int fd, int version, uint32_t entry, uint32_t flow_id,
                  int err)
{
    uint8_t out[256]; /* a RST, or an ICMP error quoting the SYN's headers */
    size_t n = 0;
    if (tunio_nat_reject(stack_nat(s, version), entry, flow_id, err, tunio_now_ms(), out,
                         sizeof(out), &n) == 0 &&
        n)
        stack_tun_write(s, fd, out, n);
}

/* ---- construction ---- */

/* Takes the NAT pool from the top of the prefix (below A if A sits up there), in the low 32 bits
 * of the address: the NAT table walks the pool there. */
static int make_pool(const struct tunio_prefix *px, unsigned want, struct tunio_nat_config *nc)
{
    int bits = px->version == 4 ? 32 : 128;
    if ((px->version != 4 && px->version != 6) || px->prefix_len > bits - 2)
        return -EINVAL;
    size_t off = px->version == 4 ? 0 : 12;
    uint8_t top[16] = {0};
    memcpy(top, px->address, px->version == 4 ? 4 : 16);
    for (int bit = px->prefix_len; bit < bits; bit++)
        top[bit / 8] |= (uint8_t)(0x80u >> (bit % 8)); /* every host bit set */
    int low_host_bits = bits - px->prefix_len < 32 ? bits - px->prefix_len : 32;
    uint32_t mask = low_host_bits == 32 ? 0 : ~0u << low_host_bits;
    uint32_t a = (uint32_t)px->address[off] << 24 | (uint32_t)px->address[off + 1] << 16 |
                 (uint32_t)px->address[off + 2] << 8 | px->address[off + 3];
    uint32_t t = (uint32_t)top[off] << 24 | (uint32_t)top[off + 1] << 16 |
                 (uint32_t)top[off + 2] << 8 | top[off + 3];
    uint32_t first = (t & mask) + 1, last = t - 1; /* all-zero and all-one hosts left alone */
    uint32_t hosts = last - first;                 /* host addresses but A */
    if (want == 0)
        want = TUNIO_DEFAULT_POOL;
    if (want > TUNIO_NAT_POOL_MAX)
        want = TUNIO_NAT_POOL_MAX;
    if (want > hosts)
        want = hosts;
    int a_in_top = !memcmp(px->address, top, off); /* same upper bytes as the top */
    uint32_t base = last - want + 1;
    if (a_in_top && a >= base && a <= last)
        base = a - want;
    if (want == 0 || base < first)
        return -EINVAL;
    nc->version = px->version;
    nc->pool_count = want;
    memcpy(nc->pool_base, top, 16);
    nc->pool_base[off] = (uint8_t)(base >> 24);
    nc->pool_base[off + 1] = (uint8_t)(base >> 16);
    nc->pool_base[off + 2] = (uint8_t)(base >> 8);
    nc->pool_base[off + 3] = (uint8_t)base;
    memcpy(nc->listen_addr, px->address, 16);
    if (px->version == 4)
        memset(nc->listen_addr + 4, 0, 12);
    return 0;
}

static int bind_listener(struct tunio_stack *s, const struct tunio_prefix *px, struct family *fam)
{
    int v6 = px->version == 6;
    int fd = socket(v6 ? AF_INET6 : AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    /* Bind even while the address is not (yet) on an interface: an IPv6 address may still be
     * tentative, and tests drive the stack through socketpairs with no TUN at all. */
    setsockopt(fd, v6 ? IPPROTO_IPV6 : IPPROTO_IP, v6 ? IPV6_FREEBIND : IP_FREEBIND, &one,
               sizeof(one));
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof(ss));
    socklen_t sl;
    if (v6) {
        struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&ss;
        sin6->sin6_family = AF_INET6;
        sin6->sin6_port = htons(s->cfg.listen_port);
        memcpy(&sin6->sin6_addr, px->address, 16);
        sl = sizeof(*sin6);
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
    } else {
        struct sockaddr_in *sin = (struct sockaddr_in *)&ss;
        sin->sin_family = AF_INET;
        sin->sin_port = htons(s->cfg.listen_port);
        memcpy(&sin->sin_addr, px->address, 4);
        sl = sizeof(*sin);
    }
    if (bind(fd, (struct sockaddr *)&ss, sl) < 0 || listen(fd, LISTEN_BACKLOG) < 0 ||
        getsockname(fd, (struct sockaddr *)&ss, &sl) < 0) {
        int err = -errno;
        close(fd);
        return err;
    }
    fam->listen_fd = fd;
    fam->listen_port = ntohs(v6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                : ((struct sockaddr_in *)&ss)->sin_port);
    return 0;
}

static int setup_family(struct tunio_stack *s, const struct tunio_prefix *px)
{
    struct family *fam = stack_family(s, px->version);
    if (fam->ready)
        return -EINVAL; /* one prefix per family */
    struct tunio_nat_config nc;
    memset(&nc, 0, sizeof(nc));
    int err = make_pool(px, s->cfg.pool_count, &nc);
    if (err || (err = bind_listener(s, px, fam)))
        return err;
    nc.listen_port = fam->listen_port;
    nc.pending_ms = s->cfg.pending_ms;
    nc.reserve_ms = s->cfg.reserve_ms;
    nc.silent_ms = s->cfg.reserve_ms;
    if ((err = tunio_nat_init(&fam->nat, &nc, &s->next_flow_id)))
        return err;
    fam->ready = 1;
    tunio_log(TUNIO_LOG_DEBUG, "IPv%d: listener on port %u, NAT pool of %u addresses",
              px->version, fam->listen_port, nc.pool_count);
    return 0;
}

static int bind_router(struct tunio_stack *s, const struct tunio_config *cfg)
{
    s->zctx = zmq_ctx_new();
    if (!s->zctx)
        return -zmq_errno();
    int err;
    /* The ZAP handler must exist before the ROUTER binds, or early workers are let in. */
    if (cfg->curve_secret && (err = zap_init(s, cfg->curve_clients ? cfg->curve_clients : "")))
        return err;
    s->router = zmq_socket(s->zctx, ZMQ_ROUTER);
    if (!s->router)
        return -zmq_errno();
    /* Credits bound what is queued per flow; high-water marks would only drop messages. */
    int zero = 0, one = 1, linger = BYE_LINGER_MS;
    size_t fl = sizeof(s->router_fd);
    if (zmq_setsockopt(s->router, ZMQ_SNDHWM, &zero, sizeof(zero)) ||
        zmq_setsockopt(s->router, ZMQ_RCVHWM, &zero, sizeof(zero)) ||
        zmq_setsockopt(s->router, ZMQ_ROUTER_MANDATORY, &one, sizeof(one)) ||
        zmq_setsockopt(s->router, ZMQ_LINGER, &linger, sizeof(linger)))
        return -zmq_errno();
    if (cfg->curve_secret &&
        (zmq_setsockopt(s->router, ZMQ_CURVE_SERVER, &one, sizeof(one)) ||
         zmq_setsockopt(s->router, ZMQ_CURVE_SECRETKEY, cfg->curve_secret,
                        strlen(cfg->curve_secret)) ||
         zmq_setsockopt(s->router, ZMQ_ZAP_DOMAIN, "tunio", 5)))
        return -zmq_errno();
    if (zmq_bind(s->router, s->endpoint) ||
        zmq_getsockopt(s->router, ZMQ_FD, &s->router_fd, &fl))
        return -zmq_errno();
    return 0;
}

static int watch(struct tunio_stack *s, int fd, uint64_t tag)
{
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = tag};
    return epoll_ctl(s->epfd, EPOLL_CTL_ADD, fd, &ev) < 0 ? -errno : 0;
}

int tunio_stack_new(const struct tunio_config *cfg, struct tunio_stack **out)
{
    *out = NULL;
    if (!cfg->endpoint || cfg->n_tun_fds < 1 || cfg->n_tun_fds > TUNIO_MAX_QUEUES ||
        cfg->window == 0 || cfg->n_prefixes < 1 || cfg->n_prefixes > 2)
        return -EINVAL;
    struct tunio_stack *s = calloc(1, sizeof(*s));
    if (!s)
        return -ENOMEM;
    s->epfd = s->stop_fd = s->timer_fd = -1;
    s->fam[0].listen_fd = s->fam[1].listen_fd = -1;
    atomic_init(&s->next_flow_id, 1);
    s->cfg = *cfg;
    s->cfg.tun_fds = NULL;
    s->cfg.endpoint = NULL;
    if (!s->cfg.pending_ms)
        s->cfg.pending_ms = TUNIO_DEFAULT_PENDING_MS;
    if (!s->cfg.reserve_ms)
        s->cfg.reserve_ms = TUNIO_DEFAULT_RESERVE_MS;
    if (!s->cfg.heartbeat_ms)
        s->cfg.heartbeat_ms = TUNIO_DEFAULT_HEARTBEAT_MS;
    if (!s->cfg.udp_timeout_ms)
        s->cfg.udp_timeout_ms = TUNIO_DEFAULT_UDP_TIMEOUT_MS;
    tunio_log_set_level(cfg->log_level ? cfg->log_level : TUNIO_LOG_INFO);
    s->n_tun = cfg->n_tun_fds;
    s->vnet_len = cfg->vnet ? TUNIO_VNET_HLEN : 0;
    memcpy(s->tun_fds, cfg->tun_fds, sizeof(int) * (size_t)cfg->n_tun_fds);
    s->flow_mask = 1023;
    int err = -ENOMEM;
    s->endpoint = strdup(cfg->endpoint);
    s->flow_buckets = calloc(s->flow_mask + 1, sizeof(*s->flow_buckets));
    if (!s->endpoint || !s->flow_buckets)
        goto fail;
    for (int i = 0; i < cfg->n_prefixes; i++)
        if ((err = setup_family(s, &cfg->prefixes[i])))
            goto fail;
    if ((err = packet_queue_init(&s->opens)))
        goto fail;
    s->opens_ready = 1;
    s->udpq.efd = -1;
    s->udp_out = malloc(TUNIO_TUN_BUF);
    if (!s->udp_out || (err = udp_init(s)))
        goto fail;
    s->epfd = epoll_create1(EPOLL_CLOEXEC);
    s->stop_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    s->timer_fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    if (s->epfd < 0 || s->stop_fd < 0 || s->timer_fd < 0) {
        err = -errno;
        goto fail;
    }
    if ((err = bind_router(s, cfg)))
        goto fail;
    /* The loop's tick: heartbeats go out every heartbeat_ms, expiries are checked every tick. */
    uint32_t tick = s->cfg.heartbeat_ms < TICK_MS ? s->cfg.heartbeat_ms : TICK_MS;
    struct itimerspec its = {.it_interval = {.tv_sec = tick / 1000,
                                             .tv_nsec = (long)(tick % 1000) * 1000000L}};
    its.it_value = its.it_interval;
    if (timerfd_settime(s->timer_fd, 0, &its, NULL) < 0) {
        err = -errno;
        goto fail;
    }
    if ((s->fam[0].ready && (err = watch(s, s->fam[0].listen_fd, TAG_LISTENER4))) ||
        (s->fam[1].ready && (err = watch(s, s->fam[1].listen_fd, TAG_LISTENER6))) ||
        (err = watch(s, s->router_fd, TAG_ROUTER)) ||
        (s->zap && (err = watch(s, s->zap_fd, TAG_ZAP))) ||
        (err = watch(s, s->opens.efd, TAG_OPENS)) || (err = watch(s, s->udpq.efd, TAG_UDPQ)) ||
        (err = watch(s, s->stop_fd, TAG_STOP)) ||
        (err = watch(s, s->timer_fd, TAG_TIMER)))
        goto fail;
    tunio_log(TUNIO_LOG_DEBUG, "endpoint %s", s->endpoint);
    *out = s;
    return 0;
fail:
    tunio_stack_free(s);
    return err;
}

void tunio_stack_free(struct tunio_stack *s)
{
    if (!s)
        return;
    for (int i = 0; i < s->n_tun; i++)
        reader_join(&s->readers[i]);
    if (s->flow_buckets) {
        for (uint32_t b = 0; b <= s->flow_mask; b++)
            while (s->flow_buckets[b])
                stack_flow_free(s, s->flow_buckets[b]);
        free(s->flow_buckets);
    }
    if (s->router)
        zmq_close(s->router);
    zap_fini(s);
    if (s->zctx)
        zmq_ctx_term(s->zctx);
    for (int v = 0; v < 2; v++)
        if (s->fam[v].listen_fd >= 0)
            close(s->fam[v].listen_fd);
    if (s->epfd >= 0)
        close(s->epfd);
    if (s->stop_fd >= 0)
        close(s->stop_fd);
    if (s->timer_fd >= 0)
        close(s->timer_fd);
    udp_fini(s);
    free(s->udp_out);
    if (s->opens_ready)
        packet_queue_fini(&s->opens);
    for (int v = 0; v < 2; v++)
        if (s->fam[v].ready)
            tunio_nat_fini(&s->fam[v].nat);
    free(s->rbuf);
    free(s->endpoint);
    free(s);
}

int tunio_stack_stop(struct tunio_stack *s)
{
    uint64_t one = 1;
    atomic_store(&s->stopping, 1);
    return write(s->stop_fd, &one, sizeof(one)) == sizeof(one) ? 0 : -errno;
}

int tunio_stack_listen_port(struct tunio_stack *s, int version)
{
    struct family *fam = stack_family(s, version);
    return fam->ready ? fam->listen_port : -EAFNOSUPPORT;
}

/* ---- the loop ---- */

static void on_timer(struct tunio_stack *s)
{
    uint64_t ticks;
    ssize_t r = read(s->timer_fd, &ticks, sizeof(ticks));
    (void)r;
    uint64_t now = tunio_now_ms();
    broker_tick(s, now);
    relay_tick(s, now);
    udp_tick(s, now);
}

static void dispatch(struct tunio_stack *s, const struct epoll_event *ev)
{
    uint64_t tag = ev->data.u64 & 0xff;
    switch (tag) {
    case TAG_LISTENER4:
        relay_accept(s, 4);
        break;
    case TAG_LISTENER6:
        relay_accept(s, 6);
        break;
    case TAG_OPENS:
        broker_open_flows(s);
        break;
    case TAG_UDPQ:
        udp_drain(s);
        break;
    case TAG_ZAP:
        zap_drain(s);
        break;
    case TAG_TIMER:
        on_timer(s);
        break;
    case TAG_FLOW: {
        struct flow *f = stack_flow_find(s, (uint32_t)(ev->data.u64 >> 8));
        if (f)
            relay_event(s, f, ev->events);
        break;
    }
    default: /* the ROUTER is drained after every batch; the stop fd ends the loop */
        break;
    }
}

/* ZMQ_FD only signals that the socket's state may have changed: ask ZMQ_EVENTS whether messages
 * are waiting, every time, since a send can consume the signal of a pending receive. */
static int router_readable(struct tunio_stack *s)
{
    int events = 0;
    size_t len = sizeof(events);
    if (zmq_getsockopt(s->router, ZMQ_EVENTS, &events, &len) < 0)
        return 0;
    return events & ZMQ_POLLIN;
}

int tunio_stack_run(struct tunio_stack *s)
{
    int err = 0;
    /* The calling thread is the loop while this runs: named so, like the readers, for top -H and
     * per-thread profiles; its own name comes back at the end. */
    char caller_name[16] = "";
    pthread_getname_np(pthread_self(), caller_name, sizeof(caller_name));
    pthread_setname_np(pthread_self(), "tunio-loop");
    for (int i = 0; i < s->n_tun; i++) {
        s->readers[i].fd = s->tun_fds[i];
        if ((err = reader_start(s, &s->readers[i]))) {
            tunio_stack_stop(s);
            goto out;
        }
    }
    struct epoll_event events[EVENTS_PER_WAIT];
    while (!atomic_load(&s->stopping)) {
        int timeout = router_readable(s) ? 0 : -1;
        int n = epoll_wait(s->epfd, events, EVENTS_PER_WAIT, timeout);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            err = -errno;
            tunio_log(TUNIO_LOG_ERROR, "epoll_wait: %s", strerror(errno));
            break;
        }
        for (int i = 0; i < n && !atomic_load(&s->stopping); i++) {
            dispatch(s, &events[i]);
            broker_reap(s);
        }
        zap_drain(s);
        if (router_readable(s) && !atomic_load(&s->stopping)) {
            /* One batch, then the sockets have their turn (epoll_wait with timeout 0). */
            broker_drain(s);
            broker_reap(s);
        }
    }
    atomic_store(&s->stopping, 1);
    broker_bye_all(s);
out:
    for (int i = 0; i < s->n_tun; i++)
        reader_join(&s->readers[i]);
    if (caller_name[0])
        pthread_setname_np(pthread_self(), caller_name);
    return err;
}

void tunio_stack_stats(struct tunio_stack *s, struct tunio_stats *o)
{
    memset(o, 0, sizeof(*o));
    o->packets_read = atomic_load(&s->c.packets_read);
    o->packets_written = atomic_load(&s->c.packets_written);
    o->drop_truncated = atomic_load(&s->c.drop[TUNIO_PKT_TRUNCATED]);
    o->drop_bad_header = atomic_load(&s->c.drop[TUNIO_PKT_BAD_HEADER]);
    o->drop_fragment = atomic_load(&s->c.drop[TUNIO_PKT_FRAGMENT]);
    o->drop_unsupported = atomic_load(&s->c.drop[TUNIO_PKT_UNSUPPORTED]);
    for (int v = 0; v < 2; v++) {
        struct tunio_nat *nat = &s->fam[v].nat;
        if (!s->fam[v].ready)
            continue;
        o->drop_reserved += atomic_load(&nat->n.drop_reserved);
        o->drop_unknown += atomic_load(&nat->n.drop_unknown);
        o->rst_unknown_flow += atomic_load(&nat->n.rst_sent);
        o->nat_table_full += atomic_load(&nat->n.table_full);
        o->nat_entries += tunio_nat_live(nat);
    }
    o->write_errors = atomic_load(&s->c.write_errors);
    /* Loop-thread counters: read without a lock; a stale value is fine for statistics. */
    o->flows_opened = s->c.flows_opened;
    o->flows_active = s->nflows;
    o->dial_failed = s->c.dial_failed;
    o->flows_reset = s->c.flows_reset;
    o->no_worker = s->c.no_worker;
    o->workers = (uint64_t)broker_alive_workers(s);
    o->workers_lost = s->c.workers_lost;
    o->protocol_errors = s->c.protocol_errors;
    o->bytes_to_workers = s->c.bytes_to_workers;
    o->bytes_from_workers = s->c.bytes_from_workers;
    o->udp_sessions = s->udp_sessions;
    o->udp_sessions_opened = s->c.udp_sessions_opened;
    o->udp_to_workers = s->c.udp_to_workers;
    o->udp_from_workers = s->c.udp_from_workers;
    o->udp_dropped = atomic_load(&s->c.udp_dropped);
}
