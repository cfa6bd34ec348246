/* The stack: its construction, its loop thread, and the only place that dispatches. Each part
 * owns its state behind its own header (tun.h, reader.h, link.h, flows.h, udp.h, nat.h); this
 * file creates them, hands each what it needs, and routes to them: epoll events by tag, the
 * link's messages to flows or udp, a lost worker to both, the tick to all, and their counters
 * into one tunio_stats.
 *
 * tunio_stack_new binds everything (so workers can connect as soon as it returns);
 * tunio_stack_run starts the TUN readers and runs the loop until the stop eventfd is written;
 * tunio_stack_free copes with a half-built stack. Threads: the readers (one per queue) share only
 * the NAT tables (locked), the queues to the loop (locked) and the TUN writer (atomic counters);
 * everything else is the loop thread's. */
#include "tunio.h"

#include <arpa/inet.h>
#include <errno.h>
#include <malloc.h>
#include <netinet/in.h>
#include <netinet/ip6.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#include "common.h"
#include "defaults.h"
#include "dns.h"
#include "dnsmap.h"
#include "flows.h"
#include "link.h"
#include "nat.h"
#include "queue.h"
#include "reader.h"
#include "tun.h"
#include "udp.h"

#define TUNIO_VERSION "0.1.0"
#define LISTEN_BACKLOG 65535
#define EVENTS_PER_WAIT 256
#define TICK_MS 250u
#define STOP_WAIT_MS 1000u   /* the readers pass the stop's resets on within this, or stop anyway */
#define STOP_QUIET_MS 20u    /* and then run until the apps have been silent this long */
#define REFUSAL_LOG_MS 1000u /* refusals are logged at most this often, with their counts */

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

/* One address family the stack carries: its listener and its NAT table. The table is embedded
 * here and handed to the others by pointer (NULL for a family not carried), so where it lives is
 * this file's business alone. */
struct family {
    int ready;
    struct tunio_nat_config nc;
    struct tunio_nat nat;
    int listen_fd;
    uint16_t listen_port;
    int paused; /* not watched until the next tick: out of descriptors (tunio_flows_accept) */
};

struct tunio_stack {
    struct tunio_config cfg;
    struct family fam[2]; /* [0] IPv4, [1] IPv6 */
    void *region;         /* the NAT tables' memory: the supervisor's memfd, or private */
    size_t region_len;
    size_t nat_len; /* the NAT tables' part of the region; the fake-IP map follows */
    struct tunio_dnsmap *map;
    struct tunio_dns *dns;
    atomic_uint *next_flow_id;      /* in the region: one id space for TCP flows and UDP sessions */
    struct tunio_nat_limits limits; /* --max-flows, --max-pending: one budget for all */
    uint64_t refused_logged[3];     /* refusals counted by the last log line, by reason */
    uint64_t refusals_logged_ms;
    uint64_t stop_resets;
    uint64_t idle_since_ms; /* the last tick that saw a flow (or the start) */
    int trimmed;            /* the freed heap went back during this idle spell */
    uint64_t memory_trims;
    atomic_uint_fast64_t loop_ticks; /* read by tunio_stack_stats from another thread */
    atomic_int readers_failed;       /* readers whose queue failed (counted by them) */
    int tun_lost;                    /* every reader's did: the run ends with -ENODEV */
    struct tunio_tun *tun;
    struct tunio_link *link;
    struct tunio_flows *flows;
    struct tunio_udp *udp;
    struct tunio_reader *readers[TUNIO_MAX_QUEUES];
    int n_readers;
    struct tunio_queue *releases[TUNIO_MAX_QUEUES]; /* released SYNs, loop to reader i */
    int n_releases;
    int epfd;
    int stop_fd;         /* ends the loop */
    int readers_stop_fd; /* ends the readers: after the loop, once the stop's resets are out */
    int timer_fd;
    atomic_int stopping;
};

const char *tunio_version(void)
{
    return TUNIO_VERSION;
}

static struct family *family_of(struct tunio_stack *s, int version)
{
    return &s->fam[version == 6];
}

static struct tunio_nat *nat_or_null(struct tunio_stack *s, int i)
{
    return s->fam[i].ready ? &s->fam[i].nat : NULL;
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

/* Keepalive on the listener, inherited by every accepted socket (see keepalive_idle_s). */
static void set_keepalive(int fd, const struct tunio_config *cfg)
{
    if (!cfg->keepalive_idle_s)
        return;
    int on = 1, idle = (int)cfg->keepalive_idle_s, intvl = (int)cfg->keepalive_interval_s,
        cnt = (int)cfg->keepalive_count;
    setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &on, sizeof(on));
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof(idle));
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &intvl, sizeof(intvl));
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof(cnt));
}

static int bind_listener(const struct tunio_prefix *px, uint16_t port, struct family *fam,
                         const struct tunio_config *cfg)
{
    int v6 = px->version == 6;
    int fd = socket(v6 ? AF_INET6 : AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    /* Accepted sockets inherit TCP_NODELAY: the app's stack already segmented its writes, and
     * the worker's bytes must not wait for the app's delayed ACK behind a small write (Nagle
     * would stall a write-write-read exchange for 40 ms). */
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    /* And SO_LINGER {1, 0}: an accepted socket closed without our say resets its app (see
     * set_abortive in flows.c), from its accept on, without a setsockopt per connection. */
    struct linger abortive = {.l_onoff = 1, .l_linger = 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &abortive, sizeof(abortive));
    set_keepalive(fd, cfg);
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
        sin6->sin6_port = htons(port);
        memcpy(&sin6->sin6_addr, px->address, 16);
        sl = sizeof(*sin6);
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
    } else {
        struct sockaddr_in *sin = (struct sockaddr_in *)&ss;
        sin->sin_family = AF_INET;
        sin->sin_port = htons(port);
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
    fam->listen_port =
        ntohs(v6 ? ((struct sockaddr_in6 *)&ss)->sin6_port : ((struct sockaddr_in *)&ss)->sin_port);
    return 0;
}

/* The NAT configuration of each family the prefixes carry (version 0: not carried); listener
 * ports are not known yet. */
static int nat_configs(const struct tunio_config *cfg, struct tunio_nat_config nc[2])
{
    memset(nc, 0, 2 * sizeof(*nc));
    if (cfg->n_prefixes < 1 || cfg->n_prefixes > 2)
        return -EINVAL;
    for (int i = 0; i < cfg->n_prefixes; i++) {
        const struct tunio_prefix *px = &cfg->prefixes[i];
        struct tunio_nat_config *c = &nc[px->version == 6];
        if (c->version)
            return -EINVAL; /* one prefix per family */
        int err = make_pool(px, cfg->pool_count, c);
        if (err)
            return err;
    }
    return 0;
}

static uint32_t get32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static void put32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

/* Whether the first `len` bits of a and b are the same. */
static int same_prefix(const uint8_t *a, const uint8_t *b, int len)
{
    for (int bit = 0; bit < len; bit++)
        if ((a[bit / 8] ^ b[bit / 8]) & (0x80u >> (bit % 8)))
            return 0;
    return 1;
}

/* The fake-IP map's configuration: its pools, the TUN's IPv4 prefix left out of the IPv4 one.
 * 0 without fake-IP (mc->len4 = mc->len6 = 0), -EINVAL for a pool inside the TUN's prefix. */
static int map_config(const struct tunio_config *cfg, struct tunio_dnsmap_config *mc)
{
    memset(mc, 0, sizeof(*mc));
    if (cfg->dns_mode != TUNIO_DNS_FAKE_IP)
        return 0;
    const struct tunio_prefix *p4 = &cfg->dns_pool[0], *p6 = &cfg->dns_pool[1];
    if (p4->version == 4) {
        if (p4->prefix_len < 8 || p4->prefix_len > 30)
            return -EINVAL;
        uint32_t mask = ~0u << (32 - p4->prefix_len);
        put32(mc->net4, get32(p4->address) & mask);
        mc->len4 = p4->prefix_len;
        for (int i = 0; i < cfg->n_prefixes; i++) {
            const struct tunio_prefix *px = &cfg->prefixes[i];
            if (px->version != 4)
                continue;
            int shorter = px->prefix_len < p4->prefix_len ? px->prefix_len : p4->prefix_len;
            if (!same_prefix(px->address, mc->net4, shorter))
                continue;
            if (px->prefix_len <= p4->prefix_len)
                return -EINVAL; /* the pool lies inside the TUN's prefix */
            uint32_t tmask = ~0u << (32 - px->prefix_len);
            mc->hole_lo = (get32(px->address) & tmask) - get32(mc->net4);
            mc->hole_hi = mc->hole_lo + (uint32_t)(1ull << (32 - px->prefix_len));
        }
    }
    if (p6->version == 6) {
        if (p6->prefix_len < 96 || p6->prefix_len > 126)
            return -EINVAL;
        memcpy(mc->net6, p6->address, 16);
        for (int bit = p6->prefix_len; bit < 128; bit++)
            mc->net6[bit / 8] &= (uint8_t) ~(0x80u >> (bit % 8));
        mc->len6 = p6->prefix_len;
        for (int i = 0; i < cfg->n_prefixes; i++) {
            const struct tunio_prefix *px = &cfg->prefixes[i];
            int shorter = px->prefix_len < p6->prefix_len ? px->prefix_len : p6->prefix_len;
            if (px->version == 6 && same_prefix(px->address, mc->net6, shorter))
                return -EINVAL; /* the pool and the TUN's prefix overlap */
        }
    }
    mc->hold_ms = cfg->dns_ttl * 1000u + cfg->dns_hold_ms;
    return tunio_dnsmap_capacity(mc) ? 0 : -EINVAL;
}

int64_t tunio_nat_region_size(const struct tunio_config *cfg)
{
    struct tunio_nat_config nc[2];
    struct tunio_dnsmap_config mc;
    int err = nat_configs(cfg, nc);
    if (!err)
        err = map_config(cfg, &mc);
    return err ? err : (int64_t)(tunio_nat_region_size_of(nc) + tunio_dnsmap_region_size(&mc));
}

/* The NAT tables' memory: the region the caller keeps across stacks (a memfd, mapped shared), or
 * a private one that goes with this stack. Untouched pages cost nothing either way. */
static int map_region(struct tunio_stack *s, int fd, const struct tunio_nat_config nc[2],
                      const struct tunio_dnsmap_config *mc)
{
    s->nat_len = tunio_nat_region_size_of(nc);
    size_t len = s->nat_len + tunio_dnsmap_region_size(mc);
    void *mem;
    if (fd >= 0) {
        struct stat st;
        if (fstat(fd, &st) < 0)
            return -errno;
        if (st.st_size < 0 || (size_t)st.st_size < len) {
            tunio_log(TUNIO_LOG_ERROR, "the NAT region (fd %d) has %lld bytes, not %zu", fd,
                      (long long)st.st_size, len);
            return -EINVAL;
        }
        mem = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    } else {
        mem = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    }
    if (mem == MAP_FAILED)
        return -errno;
    s->region = mem;
    s->region_len = len;
    return 0;
}

/* Listeners and NAT tables of every family. A region a killed stack of the same configuration
 * left holds its tables: the listeners take the ports they were made for (so the RSTs its dying
 * sockets sent, and later segments of its flows, still find a way back), and the tables are
 * adopted (tunio_nat_attach). */
static int setup_families(struct tunio_stack *s, const struct tunio_config *cfg)
{
    struct tunio_nat_config nc[2];
    struct tunio_dnsmap_config mc;
    int err = nat_configs(cfg, nc);
    if (err || (err = map_config(cfg, &mc)) || (err = map_region(s, cfg->nat_region_fd, nc, &mc)))
        return err;
    uint16_t ports[2];
    tunio_nat_region_ports(s->region, s->nat_len, nc, ports);
    for (int i = 0; i < cfg->n_prefixes; i++) {
        const struct tunio_prefix *px = &cfg->prefixes[i];
        int v = px->version == 6;
        struct family *fam = &s->fam[v];
        uint16_t want = cfg->listen_port ? cfg->listen_port : ports[v];
        err = bind_listener(px, want, fam, cfg);
        if (err && want && !cfg->listen_port) {
            tunio_log(TUNIO_LOG_WARNING,
                      "IPv%d: the previous stack's listener port %u is taken (%s): its flows "
                      "are forgotten",
                      px->version, want, strerror(-err));
            err = bind_listener(px, 0, fam, cfg);
        }
        if (err)
            return err;
        nc[v].listen_port = fam->listen_port;
        nc[v].pending_ms = s->cfg.pending_ms;
        nc[v].reserve_ms = s->cfg.reserve_ms;
        nc[v].silent_ms = s->cfg.reserve_ms;
    }
    struct tunio_nat *nats[2] = {nc[0].version ? &s->fam[0].nat : NULL,
                                 nc[1].version ? &s->fam[1].nat : NULL};
    if ((err = tunio_nat_attach(s->region, s->nat_len, nc, nats, &s->limits, tunio_now_ms())))
        return err;
    if (s->region_len > s->nat_len &&
        (err = tunio_dnsmap_attach((uint8_t *)s->region + s->nat_len, s->region_len - s->nat_len,
                                   &mc, tunio_now_ms(), &s->map)))
        return err;
    s->next_flow_id = tunio_nat_region_ids(s->region);
    for (int v = 0; v < 2; v++) {
        if (!nats[v])
            continue;
        s->fam[v].ready = 1;
        s->fam[v].nc = nc[v];
        if (nats[v]->adopted)
            tunio_log(TUNIO_LOG_INFO,
                      "IPv%d: took over %u NAT entries of the previous stack (listener port %u)",
                      nc[v].version, nats[v]->adopted, nc[v].listen_port);
        tunio_log(TUNIO_LOG_DEBUG, "IPv%d: listener on port %u, NAT pool of %u addresses",
                  nc[v].version, s->fam[v].listen_port, nc[v].pool_count);
    }
    return 0;
}

static int make_dns(struct tunio_stack *s, const struct tunio_config *cfg)
{
    if (cfg->dns_mode == TUNIO_DNS_OFF)
        return 0;
    if ((cfg->dns_mode != TUNIO_DNS_FAKE_IP && cfg->dns_mode != TUNIO_DNS_HIJACK) ||
        (cfg->dns_upstream.version != 4 && cfg->dns_upstream.version != 6))
        return -EINVAL;
    struct tunio_dns_config dc = {
        .mode = cfg->dns_mode,
        .ttl = cfg->dns_ttl,
        .map = s->map,
        .carries = {s->fam[0].ready, s->fam[1].ready},
    };
    for (int v = 0; v < 2; v++) {
        const struct tunio_prefix *a = &cfg->dns_address[v];
        if (a->version == (v ? 6 : 4)) {
            memcpy(dc.address[v], a->address, v ? 16 : 4);
            dc.has_address[v] = 1;
        }
    }
    return tunio_dns_new(&dc, &s->dns);
}

static void upstream_of(const struct tunio_config *cfg, uint8_t *version, uint8_t addr[16],
                        uint16_t *port)
{
    *version = cfg->dns_mode ? cfg->dns_upstream.version : 0;
    memset(addr, 0, 16);
    memcpy(addr, cfg->dns_upstream.address, cfg->dns_upstream.version == 6 ? 16 : 4);
    *port = cfg->dns_upstream_port ? cfg->dns_upstream_port : TUNIO_DNS_PORT;
}

static void on_link_message(void *owner, int worker, const struct tunio_wire_header *h,
                            zmq_msg_t *payload);
static void on_worker_lost(void *owner, int worker, struct tunio_link_lost *out);

static int make_link(struct tunio_stack *s, const struct tunio_config *cfg)
{
    struct tunio_link_config lc = {
        .endpoint = cfg->endpoint,
        .curve_secret = cfg->curve_secret,
        .curve_clients = cfg->curve_clients,
        .heartbeat_ms = s->cfg.heartbeat_ms,
        /* A worker's DATA is at most the credit it holds (the window), and its own workers send
         * one read of a destination at most; a datagram is smaller. A peer claiming more is cut
         * off rather than have the stack allocate whatever length it claims. */
        .max_frame = s->cfg.window > TUNIO_READ_CHUNK ? s->cfg.window : TUNIO_READ_CHUNK,
        .on_message = on_link_message,
        .on_worker_lost = on_worker_lost,
        .owner = s,
    };
    return tunio_link_new(&lc, &s->link);
}

/* One queue of released SYNs per reader (see flows.h). */
static int make_releases(struct tunio_stack *s)
{
    for (int i = 0; i < tunio_tun_queues(s->tun); i++) {
        int err = tunio_queue_new(sizeof(struct tunio_dgram), SIZE_MAX, &s->releases[i]);
        if (err)
            return err;
        s->n_releases = i + 1;
    }
    return 0;
}

static void free_releases(struct tunio_stack *s)
{
    for (int i = 0; i < s->n_releases; i++) {
        struct tunio_dgram *items;
        size_t n = tunio_queue_take(s->releases[i], (void **)&items);
        for (size_t k = 0; k < n; k++)
            free(items[k].data);
        free(items);
        tunio_queue_free(s->releases[i]);
    }
    s->n_releases = 0;
}

static int make_flows(struct tunio_stack *s)
{
    struct tunio_flows_config fc = {
        .window = s->cfg.window,
        .worker_backlog = s->cfg.worker_backlog,
        .epfd = s->epfd,
        .tag = TAG_FLOW,
        .nat = {nat_or_null(s, 0), nat_or_null(s, 1)},
        .listen_fd = {s->fam[0].listen_fd, s->fam[1].listen_fd},
        .tun = s->tun,
        .link = s->link,
        .dns = s->dns,
        .map = s->map,
        .n_releases = s->n_releases,
    };
    memcpy(fc.releases, s->releases, sizeof(fc.releases));
    upstream_of(&s->cfg, &fc.upstream_version, fc.upstream, &fc.upstream_port);
    fc.dns_idle_ms = s->cfg.dns_tcp_idle_ms;
    return tunio_flows_new(&fc, &s->flows);
}

static int make_udp(struct tunio_stack *s)
{
    struct tunio_udp_config uc = {
        .timeout_ms = s->cfg.udp_timeout_ms,
        .worker_backlog = s->cfg.worker_backlog, /* a bound of its own, beside the TCP flows' */
        .next_id = s->next_flow_id,
        .tun = s->tun,
        .link = s->link,
        .limits = &s->limits,
        .map = s->map,
    };
    upstream_of(&s->cfg, &uc.upstream_version, uc.upstream, &uc.upstream_port);
    return tunio_udp_new(&uc, &s->udp);
}

static int make_readers(struct tunio_stack *s)
{
    for (int i = 0; i < tunio_tun_queues(s->tun); i++) {
        struct tunio_reader_config rc = {
            .index = i,
            .fd = tunio_tun_queue_fd(s->tun, i),
            .stop_fd = s->readers_stop_fd,
            .tun = s->tun,
            .nat = {nat_or_null(s, 0), nat_or_null(s, 1)},
            .opens = tunio_flows_queue(s->flows),
            .dgrams = tunio_udp_queue(s->udp),
            .dns = s->dns,
            .releases = i < s->n_releases ? s->releases[i] : NULL,
            .failed = &s->readers_failed,
        };
        int err = tunio_reader_new(&rc, &s->readers[i]);
        if (err)
            return err;
        s->n_readers = i + 1;
    }
    return 0;
}

static int watch(struct tunio_stack *s, int fd, uint64_t tag)
{
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = tag};
    return epoll_ctl(s->epfd, EPOLL_CTL_ADD, fd, &ev) < 0 ? -errno : 0;
}

static int start_timer(struct tunio_stack *s)
{
    /* The loop's tick: heartbeats go out every heartbeat_ms, expiries are checked every tick. */
    uint32_t tick = s->cfg.heartbeat_ms < TICK_MS ? s->cfg.heartbeat_ms : TICK_MS;
    struct itimerspec its = {
        .it_interval = {.tv_sec = tick / 1000, .tv_nsec = (long)(tick % 1000) * 1000000L}};
    its.it_value = its.it_interval;
    return timerfd_settime(s->timer_fd, 0, &its, NULL) < 0 ? -errno : 0;
}

int tunio_stack_new(const struct tunio_config *cfg, struct tunio_stack **out)
{
    *out = NULL;
    if (!cfg->endpoint || cfg->n_tun_fds < 1 || cfg->n_tun_fds > TUNIO_MAX_QUEUES ||
        cfg->window == 0 || cfg->n_prefixes < 1 || cfg->n_prefixes > 2 ||
        (cfg->max_flows && cfg->max_pending > cfg->max_flows))
        return -EINVAL;
    struct tunio_stack *s = calloc(1, sizeof(*s));
    if (!s)
        return -ENOMEM;
    s->epfd = s->stop_fd = s->readers_stop_fd = s->timer_fd = -1;
    s->fam[0].listen_fd = s->fam[1].listen_fd = -1;
    atomic_init(&s->stopping, 0);
    s->limits.max_flows = cfg->max_flows;
    s->limits.max_pending = cfg->max_pending;
    atomic_init(&s->limits.flows, 0);
    atomic_init(&s->limits.pending, 0);
    atomic_init(&s->limits.pending_peak, 0);
    atomic_init(&s->limits.refused_max_flows, 0);
    atomic_init(&s->limits.refused_max_pending, 0);
    atomic_init(&s->limits.deferred_pending_share, 0);
    s->cfg = *cfg;
    s->cfg.tun_fds = NULL; /* the caller's: only what the parts copied is kept */
    s->cfg.endpoint = NULL;
    s->cfg.curve_secret = NULL;
    s->cfg.curve_clients = NULL;
    if (!s->cfg.pending_ms)
        s->cfg.pending_ms = TUNIO_DEFAULT_PENDING_MS;
    if (!s->cfg.reserve_ms)
        s->cfg.reserve_ms = TUNIO_DEFAULT_RESERVE_MS;
    if (!s->cfg.heartbeat_ms)
        s->cfg.heartbeat_ms = TUNIO_DEFAULT_HEARTBEAT_MS;
    if (!s->cfg.worker_backlog)
        s->cfg.worker_backlog = TUNIO_DEFAULT_WORKER_BACKLOG;
    if (!s->cfg.udp_timeout_ms)
        s->cfg.udp_timeout_ms = TUNIO_DEFAULT_UDP_TIMEOUT_MS;
    if (!s->cfg.trim_idle_ms)
        s->cfg.trim_idle_ms = TUNIO_DEFAULT_TRIM_IDLE_MS;
    if (!s->cfg.dns_tcp_idle_ms)
        s->cfg.dns_tcp_idle_ms = TUNIO_DEFAULT_DNS_TCP_IDLE_MS;
    s->idle_since_ms = tunio_now_ms();
    tunio_log_set_level(cfg->log_level ? cfg->log_level : TUNIO_LOG_INFO);
    tunio_log_set_json(cfg->log_json);
    int err;
    if ((err = tunio_tun_new(cfg->tun_fds, cfg->n_tun_fds, cfg->vnet, &s->tun)) ||
        (err = setup_families(s, cfg)) || (err = make_dns(s, cfg)))
        goto fail;
    s->epfd = epoll_create1(EPOLL_CLOEXEC);
    s->stop_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    s->readers_stop_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    s->timer_fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    if (s->epfd < 0 || s->stop_fd < 0 || s->readers_stop_fd < 0 || s->timer_fd < 0) {
        err = -errno;
        goto fail;
    }
    if ((err = make_link(s, cfg)) || (err = make_releases(s)) || (err = make_flows(s)) ||
        (err = make_udp(s)) || (err = make_readers(s)) || (err = start_timer(s)))
        goto fail;
    int zap_fd = tunio_link_zap_fd(s->link);
    if ((s->fam[0].ready && (err = watch(s, s->fam[0].listen_fd, TAG_LISTENER4))) ||
        (s->fam[1].ready && (err = watch(s, s->fam[1].listen_fd, TAG_LISTENER6))) ||
        (err = watch(s, tunio_link_fd(s->link), TAG_ROUTER)) ||
        (zap_fd >= 0 && (err = watch(s, zap_fd, TAG_ZAP))) ||
        (err = watch(s, tunio_queue_fd(tunio_flows_queue(s->flows)), TAG_OPENS)) ||
        (err = watch(s, tunio_queue_fd(tunio_udp_queue(s->udp)), TAG_UDPQ)) ||
        (err = watch(s, s->stop_fd, TAG_STOP)) || (err = watch(s, s->timer_fd, TAG_TIMER)))
        goto fail;
    tunio_log(TUNIO_LOG_DEBUG, "endpoint %s", cfg->endpoint);
    *out = s;
    return 0;
fail:
    tunio_stack_free(s);
    return err;
}

/* Every part copes with NULL, so a stack that failed half-way through tunio_stack_new is freed by
 * the same code as a whole one. The order matters: readers first (they use everything), flows
 * and sessions before the link (they count their load on it) and before the epoll fd (flows
 * remove their sockets from it), the NAT tables after everything that holds a pointer to them, the
 * region they live in last. */
void tunio_stack_free(struct tunio_stack *s)
{
    if (!s)
        return;
    for (int i = 0; i < s->n_readers; i++)
        tunio_reader_free(s->readers[i]);
    free_releases(s);
    tunio_flows_free(s->flows);
    tunio_udp_free(s->udp);
    tunio_link_free(s->link);
    for (int v = 0; v < 2; v++)
        if (s->fam[v].listen_fd >= 0)
            close(s->fam[v].listen_fd);
    if (s->epfd >= 0)
        close(s->epfd);
    if (s->stop_fd >= 0)
        close(s->stop_fd);
    if (s->readers_stop_fd >= 0)
        close(s->readers_stop_fd);
    if (s->timer_fd >= 0)
        close(s->timer_fd);
    for (int v = 0; v < 2; v++)
        if (s->fam[v].ready)
            tunio_nat_fini(&s->fam[v].nat);
    tunio_dns_free(s->dns);
    tunio_dnsmap_free(s->map);
    if (s->region)
        munmap(s->region, s->region_len); /* a shared region stays for the next stack */
    tunio_tun_free(s->tun);
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
    struct family *fam = family_of(s, version);
    return fam->ready ? fam->listen_port : -EAFNOSUPPORT;
}

/* ---- the loop: the one place that dispatches ---- */

/* Flow ids are one space for TCP flows and datagram sessions: an id that names a session (or a
 * DGRAM) is udp's, anything else is a TCP flow's. */
static void on_link_message(void *owner, int worker, const struct tunio_wire_header *h,
                            zmq_msg_t *payload)
{
    struct tunio_stack *s = owner;
    if (!tunio_udp_on_message(s->udp, worker, h, payload))
        tunio_flows_on_message(s->flows, worker, h, payload);
}

static void on_worker_lost(void *owner, int worker, struct tunio_link_lost *out)
{
    struct tunio_stack *s = owner;
    tunio_flows_worker_lost(s->flows, worker, &out->reset, &out->redialed);
    out->sessions = tunio_udp_worker_lost(s->udp, worker);
}

/* New flows refused or deferred past a limit are logged from the tick, at most once a second, with how many
 * and why: a flood costs a line a second, never a line a flow. */
static void report_refusals(struct tunio_stack *s, uint64_t now)
{
    uint64_t n[3] = {atomic_load(&s->limits.refused_max_flows),
                     atomic_load(&s->limits.refused_max_pending),
                     atomic_load(&s->limits.deferred_pending_share)};
    uint64_t *last = s->refused_logged;
    if ((n[0] == last[0] && n[1] == last[1] && n[2] == last[2]) ||
        now - s->refusals_logged_ms < REFUSAL_LOG_MS)
        return;
    /* One destination holding a quarter of every dial is rarely an app's doing: say the two
     * usual causes, one of which is a way out that leads back into the TUN. */
    const char *why = n[2] != last[2]
                          ? ": a destination that does not answer, or the workers' own connections "
                            "routed back into the TUN (see the egress mark's routing table)"
                          : "";
    tunio_log(TUNIO_LOG_WARNING,
              "held back %llu new flows since the last report: %llu refused past --max-flows %u, "
              "%llu refused past --max-pending %u, %llu SYNs left for the app to send again (their "
              "destination held a quarter of it; %u held now)%s",
              (unsigned long long)(n[0] + n[1] + n[2] - last[0] - last[1] - last[2]),
              (unsigned long long)(n[0] - last[0]), s->limits.max_flows,
              (unsigned long long)(n[1] - last[1]), s->limits.max_pending,
              (unsigned long long)(n[2] - last[2]), atomic_load(&s->limits.pending), why);
    memcpy(last, n, sizeof(n));
    s->refusals_logged_ms = now;
}

/* Freed heap stays with the process for reuse while flows run: what lies below the top of an
 * arena cannot be unmapped by free() at all, and the ZeroMQ I/O thread allocates the workers'
 * DATA in arenas of its own. Once no flow (TCP flow or UDP session) has run for trim_idle_ms,
 * malloc_trim hands every arena's free pages back, once until flows come back. */
static void trim_when_idle(struct tunio_stack *s, uint64_t now)
{
    struct tunio_stats st = {0};
    tunio_flows_add_stats(s->flows, &st);
    tunio_udp_add_stats(s->udp, &st);
    if (st.flows_active || st.udp_sessions) {
        s->idle_since_ms = now;
        s->trimmed = 0;
        return;
    }
    if (s->trimmed || now - s->idle_since_ms < s->cfg.trim_idle_ms)
        return;
    s->trimmed = 1;
#ifdef __GLIBC__
    malloc_trim(0);
    s->memory_trims++;
    tunio_log(TUNIO_LOG_DEBUG, "no flows for %u ms: freed heap given back to the system",
              s->cfg.trim_idle_ms);
#endif
}

/* A listener whose queue holds connections that no descriptor can take, even to reset them,
 * would wake the loop again at once, for ever (it is level-triggered): it is left alone until the
 * next tick, when descriptors may have been freed. */
static void accept_or_pause(struct tunio_stack *s, int v)
{
    struct family *fam = &s->fam[v];
    if (tunio_flows_accept(s->flows, v ? 6 : 4) == -EMFILE && !fam->paused) {
        struct epoll_event ev = {.events = 0, .data.u64 = v ? TAG_LISTENER6 : TAG_LISTENER4};
        if (epoll_ctl(s->epfd, EPOLL_CTL_MOD, fam->listen_fd, &ev) == 0)
            fam->paused = 1;
    }
}

static void resume_listeners(struct tunio_stack *s)
{
    for (int v = 0; v < 2; v++) {
        struct family *fam = &s->fam[v];
        if (!fam->paused || fam->listen_fd < 0)
            continue;
        struct epoll_event ev = {.events = EPOLLIN, .data.u64 = v ? TAG_LISTENER6 : TAG_LISTENER4};
        if (epoll_ctl(s->epfd, EPOLL_CTL_MOD, fam->listen_fd, &ev) == 0)
            fam->paused = 0;
    }
}

static void on_timer(struct tunio_stack *s)
{
    uint64_t ticks;
    ssize_t r = read(s->timer_fd, &ticks, sizeof(ticks));
    (void)r;
    uint64_t now = tunio_now_ms();
    atomic_fetch_add_explicit(&s->loop_ticks, 1, memory_order_relaxed);
    if (!s->tun_lost && s->n_readers && atomic_load(&s->readers_failed) == s->n_readers) {
        /* Nothing reads the TUN any more (its device was deleted, say): a stack that ran on
         * would hold its flows still for good. Ended, it says why, and its supervisor decides. */
        s->tun_lost = 1;
        tunio_log(TUNIO_LOG_ERROR, "every TUN queue failed (%d): the device is gone; stopping",
                  s->n_readers);
        tunio_stack_stop(s);
    }
    tunio_link_tick(s->link, now);
    tunio_flows_tick(s->flows, now);
    resume_listeners(s);
    tunio_udp_tick(s->udp, now);
    report_refusals(s, now);
    trim_when_idle(s, now);
}

static void dispatch(struct tunio_stack *s, const struct epoll_event *ev)
{
    uint64_t tag = ev->data.u64 & 0xff;
    switch (tag) {
    case TAG_LISTENER4:
    case TAG_LISTENER6:
        accept_or_pause(s, tag == TAG_LISTENER6);
        break;
    case TAG_OPENS:
        tunio_flows_open(s->flows);
        break;
    case TAG_UDPQ:
        tunio_udp_drain(s->udp);
        break;
    case TAG_ZAP:
        tunio_link_zap_drain(s->link);
        break;
    case TAG_TIMER:
        on_timer(s);
        break;
    case TAG_FLOW:
        tunio_flows_event(s->flows, (uint32_t)(ev->data.u64 >> 8), ev->events);
        break;
    case TAG_ROUTER: /* drained after every batch */
        tunio_link_fired(s->link);
        break;
    default: /* the stop fd ends the loop */
        break;
    }
}

static uint64_t rst_to_apps(struct tunio_stack *s)
{
    uint64_t n = 0;
    for (int v = 0; v < 2; v++)
        if (s->fam[v].ready)
            n += atomic_load(&s->fam[v].nat.n.rst_to_app);
    return n;
}

/* Connections a listener holds that no accept took yet: closing it resets each (TCP_INFO's
 * tcpi_unacked is a listener's accept queue length). */
static size_t accept_queue(int fd)
{
    struct tcp_info ti;
    socklen_t len = sizeof(ti);
    return getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &len) == 0 ? ti.tcpi_unacked : 0;
}

static uint64_t packets_read(const struct tunio_stack *s)
{
    struct tunio_stats st;
    memset(&st, 0, sizeof(st));
    for (int i = 0; i < s->n_readers; i++)
        tunio_reader_add_stats(s->readers[i], &st);
    return st.packets_read;
}

/* The readers run until they have passed on the stop's `resets` RSTs and the apps have fallen
 * silent for STOP_QUIET_MS, STOP_WAIT_MS after `start` at most. The silence is for an app that
 * ignores the RST it was sent: one whose sequence number is ahead of what it has received (a
 * segment of the flow still on its way, or lost) only earns a challenge ACK (RFC 5961). Whatever
 * an app sends after the resets gets a RST whose sequence number is the app's own
 * acknowledgement, which it cannot refuse (the kernel's, for a flow whose socket is gone; the
 * readers', for a finished entry), but only while the readers run. */
static void wait_for_readers(struct tunio_stack *s, uint64_t start, uint64_t before, size_t resets)
{
    struct timespec ms = {.tv_sec = 0, .tv_nsec = 1000000L};
    uint64_t seen = packets_read(s), quiet_since = tunio_now_ms();
    for (uint64_t now = quiet_since; now - start < STOP_WAIT_MS; now = tunio_now_ms()) {
        uint64_t read = packets_read(s);
        if (read != seen) {
            seen = read;
            quiet_since = now;
        } else if (rst_to_apps(s) - before >= resets && now - quiet_since >= STOP_QUIET_MS) {
            return;
        }
        nanosleep(&ms, NULL); /* the readers' progress has no event of its own to wait on */
    }
}

/* The stop, after the loop: no app may be left hanging. New SYNs get a RST from the readers;
 * every flow is reset (accepted sockets closed abortively: the kernel sends each app a RST, which
 * the readers translate; held SYNs answered with a RST); closing the listeners resets what they
 * had not handed out; UDP sessions end; the workers get BYE (they close their destinations'
 * sockets abortively). Then the readers run until they have passed on as many RSTs towards the
 * apps as the stop caused and the apps fall silent (wait_for_readers), STOP_WAIT_MS at most. */
static void reset_everything(struct tunio_stack *s)
{
    uint64_t start = tunio_now_ms();
    for (int v = 0; v < 2; v++)
        if (s->fam[v].ready)
            tunio_nat_refuse_new(&s->fam[v].nat);
    uint64_t before = rst_to_apps(s);
    size_t resets = tunio_flows_reset_all(s->flows);
    for (int v = 0; v < 2; v++) {
        if (s->fam[v].listen_fd >= 0) {
            resets += accept_queue(s->fam[v].listen_fd);
            epoll_ctl(s->epfd, EPOLL_CTL_DEL, s->fam[v].listen_fd, NULL);
            close(s->fam[v].listen_fd);
            s->fam[v].listen_fd = -1;
        }
    }
    tunio_udp_end_all(s->udp);
    tunio_link_bye_all(s->link);
    s->stop_resets = resets;
    wait_for_readers(s, start, before, resets);
    uint64_t passed = rst_to_apps(s) - before;
    tunio_log(passed < resets ? TUNIO_LOG_WARNING : TUNIO_LOG_DEBUG,
              "stop: %zu flows reset, %llu of their RSTs passed on to the apps in %llu ms", resets,
              (unsigned long long)passed, (unsigned long long)(tunio_now_ms() - start));
}

static void stop_readers(struct tunio_stack *s)
{
    uint64_t one = 1;
    ssize_t w = write(s->readers_stop_fd, &one, sizeof(one));
    (void)w; /* an eventfd write only fails when the counter is saturated: already signalled */
    for (int i = 0; i < s->n_readers; i++)
        tunio_reader_join(s->readers[i]);
}

int tunio_stack_run(struct tunio_stack *s)
{
    int err = 0;
    /* The calling thread is the loop while this runs: named so, like the readers, for top -H and
     * per-thread profiles; its own name comes back at the end. */
    char caller_name[16] = "";
    pthread_getname_np(pthread_self(), caller_name, sizeof(caller_name));
    pthread_setname_np(pthread_self(), "tunio-loop");
    for (int i = 0; i < s->n_readers; i++) {
        if ((err = tunio_reader_start(s->readers[i]))) {
            tunio_stack_stop(s);
            goto out;
        }
    }
    struct epoll_event events[EVENTS_PER_WAIT];
    while (!atomic_load(&s->stopping)) {
        /* ZMQ_FD only signals that the socket's state may have changed: ask, every time, since
         * a send can consume the signal of a pending receive. */
        int timeout = tunio_link_readable(s->link) ? 0 : -1;
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
            tunio_link_reap(s->link);
        }
        tunio_link_zap_drain(s->link);
        if (tunio_link_readable(s->link) && !atomic_load(&s->stopping)) {
            /* One batch, then the sockets have their turn (epoll_wait with timeout 0). */
            tunio_link_drain(s->link);
            tunio_link_reap(s->link);
        }
    }
    /* Also when the loop failed. */
    tunio_stack_stop(s);
    if (s->tun_lost && !err)
        err = -ENODEV;
    reset_everything(s);
out:
    stop_readers(s);
    tunio_flows_reject_held(s->flows);
    if (caller_name[0])
        pthread_setname_np(pthread_self(), caller_name);
    return err;
}

void tunio_stack_stats(struct tunio_stack *s, struct tunio_stats *o)
{
    memset(o, 0, sizeof(*o));
    for (int i = 0; i < s->n_readers; i++)
        tunio_reader_add_stats(s->readers[i], o);
    tunio_tun_add_stats(s->tun, o);
    for (int v = 0; v < 2; v++) {
        struct tunio_nat *nat = nat_or_null(s, v);
        if (!nat)
            continue;
        o->drop_reserved += atomic_load(&nat->n.drop_reserved);
        o->drop_unknown += atomic_load(&nat->n.drop_unknown);
        o->rst_unknown_flow += atomic_load(&nat->n.rst_sent);
        o->nat_table_full += atomic_load(&nat->n.table_full);
        o->nat_entries += tunio_nat_live(nat);
        o->nat_adopted += nat->adopted;
        o->rst_to_apps += atomic_load(&nat->n.rst_to_app);
    }
    o->pending = atomic_load(&s->limits.pending);
    o->pending_peak = atomic_load(&s->limits.pending_peak);
    o->refused_max_flows = atomic_load(&s->limits.refused_max_flows);
    o->refused_max_pending = atomic_load(&s->limits.refused_max_pending);
    o->deferred_pending_share = atomic_load(&s->limits.deferred_pending_share);
    o->stop_resets = s->stop_resets;
    if (s->dns) {
        const struct tunio_dns_counters *dn = tunio_dns_counters(s->dns);
        o->dns_answered = atomic_load(&dn->answered);
        o->dns_forwarded = atomic_load(&dn->forwarded);
        o->dns_malformed = atomic_load(&dn->malformed);
    }
    if (s->map) {
        const struct tunio_dnsmap_counters *mn = tunio_dnsmap_counters(s->map);
        o->dns_map_entries = tunio_dnsmap_entries(s->map);
        o->dns_recycled = atomic_load(&mn->recycled);
        o->dns_pool_full = atomic_load(&mn->full);
    }
    o->memory_trims = s->memory_trims;
    o->loop_ticks = atomic_load_explicit(&s->loop_ticks, memory_order_relaxed);
    tunio_link_add_stats(s->link, o);
    tunio_flows_add_stats(s->flows, o);
    tunio_udp_add_stats(s->udp, o);
}

int tunio_stack_worker_info(struct tunio_stack *s, int index, struct tunio_worker_info *out)
{
    return tunio_link_worker_info(s->link, index, out);
}
