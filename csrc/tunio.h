/* Public C API of the tunio stack. cffi binds what lies between the cffi:begin and cffi:end
 * markers as written here (tunio/_build.py reads it, comments stripped): keep it plain C that
 * cffi's parser takes (no macros but integer #defines).
 * Functions return 0 (or a count) on success and -errno on failure. */
#ifndef TUNIO_H
#define TUNIO_H

#include <stdint.h>

/* cffi:begin */
/* An address of the TUN device with its prefix: the stack carries that address family. */
struct tunio_prefix {
    uint8_t address[16]; /* A: the TUN's own address (IPv4 in the first 4 bytes) */
    uint8_t version;     /* 4 or 6 */
    uint8_t prefix_len;  /* NAT pool addresses are taken from the top of the prefix */
};

struct tunio_config {
    const int *tun_fds; /* one fd per TUN queue, opened by the caller (or test socketpairs) */
    int n_tun_fds;
    struct tunio_prefix prefixes[2]; /* at most one IPv4 and one IPv6 */
    int n_prefixes;
    uint16_t listen_port;      /* 0: any free port */
    unsigned pool_count;       /* NAT pool addresses; 0: up to 16 */
    const char *endpoint;      /* ZeroMQ endpoint the ROUTER binds */
    uint32_t window;           /* credit window per flow and direction, bytes */
    uint64_t worker_backlog;   /* DATA bytes a worker may have uncredited, and DGRAM bytes
                                  apart (0: the default) */
    uint32_t pending_ms;       /* a held SYN waits this long for the dial's outcome */
    uint32_t reserve_ms;       /* a NAT slot stays reserved this long after its flow ends */
    uint32_t heartbeat_ms;     /* heartbeat interval; a worker silent 3 intervals is dead */
    int log_level;             /* 10 debug, 20 info, 30 warning, 40 error */
    uint32_t udp_timeout_ms;   /* a UDP session idle this long is ended */
    int vnet;                  /* the queues were opened with virtio-net headers (offloads) */
    const char *curve_secret;  /* z85 secret key of the stack: CURVE on the endpoint; NULL: off */
    const char *curve_clients; /* z85 public keys of the workers allowed in (with CURVE) */
    int nat_region_fd;         /* the NAT region, a memfd of tunio_nat_region_size() bytes that
                                  outlives the stack (the supervisor's); -1: a private one */
    uint32_t max_flows;        /* TCP flows + UDP sessions at once; 0: no limit */
    uint32_t max_pending;      /* held SYNs (dials running) at once; 0: no limit */
    int log_json;              /* log lines as JSON objects (else text) */
    /* DNS answered by the stack (README "DNS"): 0 off, 1 fake-ip, 2 hijack. */
    int dns_mode;
    /* fake-ip: the IPv4 pool ([0]) and the IPv6 pool ([1]), each a network (address and
     * prefix_len); version 0: no pool of that family. The TUN's own IPv4 prefix is left out. */
    struct tunio_prefix dns_pool[2];
    /* fake-ip: where the stack answers, [0] IPv4 and [1] IPv6 (prefix_len unused); version 0:
     * none of that family. */
    struct tunio_prefix dns_address[2];
    /* The resolver that other queries (and, with hijack, every query) go to, through a worker
     * (prefix_len unused; version 0: none). */
    struct tunio_prefix dns_upstream;
    uint16_t dns_upstream_port;
    uint32_t dns_ttl;      /* seconds: the TTL of the fake-IP answers */
    uint32_t dns_hold_ms;  /* an answered address keeps its name this long past the TTL */
    uint32_t trim_idle_ms; /* without flows this long, freed heap goes back to the system */
    /* fake-ip: a DNS-over-TCP connection to the DNS address with no query unanswered and no
     * byte either way this long is closed (FIN); 0: TUNIO_DEFAULT_DNS_TCP_IDLE_MS */
    uint32_t dns_tcp_idle_ms;
    /* TCP keepalive on the flows' app side (the accepted sockets inherit it from the
     * listener): seconds idle before the first probe, seconds between probes, and probes left
     * unanswered before the flow is reset. A flow whose app vanished without a word (a VM
     * switched off, a container killed, a laptop gone from the LAN) ends this way instead of
     * holding its slot, its worker's connection and its destination's forever. Idle 0: off. */
    uint32_t keepalive_idle_s;
    uint32_t keepalive_interval_s;
    uint32_t keepalive_count;
};

struct tunio_stats {
    uint64_t packets_read;
    uint64_t packets_written;
    uint64_t drop_truncated;
    uint64_t drop_bad_header;
    uint64_t drop_fragment;
    uint64_t drop_unsupported;
    uint64_t drop_reserved;
    uint64_t drop_unknown;
    uint64_t drop_martian; /* packets to a destination no router forwards to (packet.h) */
    uint64_t rst_unknown_flow;
    uint64_t nat_table_full;
    uint64_t nat_entries;
    uint64_t write_errors;
    uint64_t flows_opened;
    uint64_t flows_active;
    uint64_t dial_failed;
    uint64_t flows_reset;
    uint64_t no_worker;
    uint64_t workers;
    uint64_t workers_lost;
    uint64_t protocol_errors;
    uint64_t bytes_to_workers;
    uint64_t bytes_from_workers;
    uint64_t udp_sessions;
    uint64_t udp_sessions_opened;
    uint64_t udp_to_workers;
    uint64_t udp_from_workers;
    uint64_t udp_dropped;
    uint64_t pending;             /* SYNs held now, their dial running */
    uint64_t pending_peak;        /* the most held at once */
    uint64_t refused_max_flows;   /* new flows refused past max_flows (TCP RST, UDP ICMP) */
    uint64_t refused_max_pending; /* SYNs refused past max_pending */
    uint64_t
        deferred_pending_share; /* SYNs left unanswered (the app retries): their destination held 1/4 of max_pending */
    uint64_t flows_retried;   /* held flows dialled again after their worker was lost */
    uint64_t nat_adopted;     /* NAT entries taken over from a previous stack's region */
    uint64_t rst_to_apps;     /* RSTs of the listener translated towards apps */
    uint64_t stop_resets;     /* RSTs the last stop waited for (flows it reset) */
    uint64_t dns_answered;    /* A/AAAA queries answered from the fake-IP map */
    uint64_t dns_forwarded;   /* queries sent on to the upstream resolver */
    uint64_t dns_malformed;   /* queries answered FORMERR or dropped (TCP: the connection reset) */
    uint64_t dns_map_entries; /* names holding a fake address now */
    uint64_t dns_recycled;    /* fake addresses taken from one name for another */
    uint64_t dns_pool_full;   /* queries answered SERVFAIL: every fake address was held */
    uint64_t memory_trims;    /* freed heap given back after trim_idle_ms without flows */
    uint64_t backlog_waits;   /* times a flow with credit waited for its worker's backlog */
    uint64_t backlog_bytes;   /* DATA bytes the workers have not credited back, now */
    uint64_t dns_idle_closed; /* DNS-over-TCP connections closed idle (dns_tcp_idle_ms) */
    uint64_t udp_backlog_bytes;   /* DGRAM bytes the workers have not credited back, now */
    uint64_t udp_dropped_backlog; /* datagrams dropped at a session's or worker's byte bound
                                     (also in udp_dropped) */
    uint64_t loop_ticks; /* the loop's timer ticks (4 a second): it moves while the loop turns */
};

/* One worker as the stack sees it. */
struct tunio_worker_info {
    char name[65];     /* as it said in HELLO */
    int alive;         /* 0: lost (its slot is kept for a worker that takes it over) */
    uint32_t flows;    /* its load: TCP flows and datagram sessions */
    uint64_t capacity; /* the most it takes (HELLO's arg), 0: no limit */
    int draining;      /* it said DRAIN: it gets no new flows */
};

struct tunio_stack;

/* Opens `queues` queues of the multi-queue TUN device `name` (created if absent, non-persistent).
 * `vnet`: with virtio-net headers and TSO/checksum offload; else offloads explicitly off.
 * Writes the fds to `fds`. */
int tunio_tun_open(const char *name, int queues, int vnet, int *fds);

/* Bytes of the NAT region for this configuration (its prefixes and pool_count), or -errno. */
int64_t tunio_nat_region_size(const struct tunio_config *cfg);

/* Binds the listener and the ROUTER, so that on return workers can connect. With a NAT region
 * that a previous stack of the same configuration left (killed), its table is adopted and the
 * listeners take its ports. */
int tunio_stack_new(const struct tunio_config *cfg, struct tunio_stack **out);
/* Runs until tunio_stack_stop(). Reader threads are started and joined inside. On the way out
 * every TCP flow is reset towards its app (and its worker), every held SYN gets a RST and the UDP
 * sessions end; the readers run until they have passed the resets on (at most about 1 s). */
int tunio_stack_run(struct tunio_stack *s);
/* Thread- and signal-safe: asks run() to return. */
int tunio_stack_stop(struct tunio_stack *s);
void tunio_stack_free(struct tunio_stack *s);
/* Counters, from any thread. The loop thread's own are read without a lock: a value may be a
 * moment stale, which is fine for statistics. */
void tunio_stack_stats(struct tunio_stack *s, struct tunio_stats *out);
/* Worker `index` of the stack's table (0..), from any thread (stale reads as for the stats);
 * -ENOENT past the last. */
int tunio_stack_worker_info(struct tunio_stack *s, int index, struct tunio_worker_info *out);
/* The listener's port for IP `version`, or -EAFNOSUPPORT if that family is not carried. */
int tunio_stack_listen_port(struct tunio_stack *s, int version);
const char *tunio_version(void);
/* cffi:end */

#endif
