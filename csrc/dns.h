/* The stack's DNS: the message parser and builders (pure functions, fuzzed: fuzz/fuzz_dns.c), and
 * the server the TUN readers ask about each UDP datagram to port 53 (tunio_dns_serve).
 *
 * Fake-IP mode: a query to the DNS address (one per family) for A or AAAA of a name is answered
 * here, from the fake-IP map (dnsmap.h), with a short TTL; a malformed query gets FORMERR (or is
 * dropped when it cannot be answered at all); every other query is forwarded: the datagram goes
 * to a worker's UDP session whose destination is the upstream resolver, and the reply comes back
 * from the DNS address (udp.c rewrites both ways). TCP to the DNS address's port 53 is served
 * the same, message by message (dnstcp.h). Hijack mode: every query to port 53, whatever its
 * destination, is forwarded so (over TCP: relayed to the upstream). */
#ifndef TUNIO_DNS_H
#define TUNIO_DNS_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

struct tunio_dnsmap;
struct tunio_pkt;

#define TUNIO_DNS_PORT 53
#define TUNIO_DNS_HEADER 12
#define TUNIO_DNS_TYPE_A 1
#define TUNIO_DNS_TYPE_AAAA 28
#define TUNIO_DNS_CLASS_IN 1
#define TUNIO_DNS_FORMERR 1
#define TUNIO_DNS_SERVFAIL 2
/* An answer built here: a question of at most 255 bytes of name and one AAAA record. */
#define TUNIO_DNS_ANSWER_MAX 640u

enum tunio_dns_mode {
    TUNIO_DNS_OFF = 0,
    TUNIO_DNS_FAKE_IP = 1,
    TUNIO_DNS_HIJACK = 2,
};

/* What tunio_dns_parse found. */
enum tunio_dns_parsed {
    TUNIO_DNS_QUERY = 0,  /* a standard query of one question: q is filled in */
    TUNIO_DNS_OTHER = 1,  /* a message to pass on as it is (another opcode) */
    TUNIO_DNS_BAD = 2,    /* a malformed query: answer FORMERR */
    TUNIO_DNS_IGNORE = 3, /* not a query (a response, or too short to answer): drop */
};

struct tunio_dns_question {
    uint16_t id;
    uint16_t flags;
    uint16_t qtype;
    uint16_t qclass;
    size_t end;      /* offset just past the question */
    size_t name_len; /* of `name` */
    int plain;       /* every label is letters, digits, '-' and '_': a name the map takes */
    char name[256];  /* lower case, dotted, no final dot; "" for the root */
};

int tunio_dns_parse(const uint8_t *msg, size_t len, struct tunio_dns_question *q);
/* The answer to query `msg` (parsed into q): NOERROR with one A or AAAA record of `addr`
 * (addr_len 4 or 16) and `ttl`, or without records when addr is NULL (the name has no address of
 * that family here). The question is copied from the query as the client wrote it; EDNS and the
 * other sections are not. Its length, 0 if it does not fit `cap`. */
size_t tunio_dns_answer(const uint8_t *msg, const struct tunio_dns_question *q, const uint8_t *addr,
                        size_t addr_len, uint32_t ttl, uint8_t *out, size_t cap);
/* An error answer (FORMERR, SERVFAIL) to `msg`: its id and opcode, the question if q is not
 * NULL. Its length, 0 if msg is too short to answer. */
size_t tunio_dns_error(const uint8_t *msg, size_t len, const struct tunio_dns_question *q,
                       int rcode, uint8_t *out, size_t cap);

/* ---- the server ---- */

struct tunio_dns_config {
    int mode;               /* enum tunio_dns_mode */
    uint8_t address[2][16]; /* the DNS address of IPv4 ([0], 4 bytes) and IPv6 ([1]) */
    int has_address[2];
    uint32_t ttl;             /* seconds, in the answers */
    struct tunio_dnsmap *map; /* fake-IP: where the addresses come from */
    int carries[2];           /* the stack carries IPv4 / IPv6: AAAA only with an IPv6 TUN */
};

struct tunio_dns_counters {
    atomic_ullong answered;  /* A/AAAA answered from the map (and SERVFAIL with the map full) */
    atomic_ullong forwarded; /* queries passed to the upstream through a worker */
    atomic_ullong malformed; /* answered FORMERR, or dropped */
};

struct tunio_dns;

int tunio_dns_new(const struct tunio_dns_config *cfg, struct tunio_dns **out);
void tunio_dns_free(struct tunio_dns *d);

enum tunio_dns_verdict {
    TUNIO_DNS_PASS = 0,    /* not ours: the datagram goes its way */
    TUNIO_DNS_REPLY = 1,   /* answered: write the packet built in `out` */
    TUNIO_DNS_FORWARD = 2, /* to the upstream, through a worker's UDP session */
    TUNIO_DNS_DROP = 3,    /* malformed beyond an answer: counted, dropped */
};

/* A message to the DNS address in fake-IP mode, whatever carried it (a datagram, or a TCP
 * stream: dnstcp.h): answered here (REPLY: the answer in `out`, `*out_len` bytes), for the
 * upstream (FORWARD), or not to be answered at all (DROP); counted. Thread-safe. */
enum tunio_dns_verdict tunio_dns_message(struct tunio_dns *d, const uint8_t *msg, size_t len,
                                         uint64_t now, uint8_t *out, size_t cap, size_t *out_len);
/* Counts a malformed message that never got as far as tunio_dns_message (a TCP stream cut short
 * inside one). */
void tunio_dns_note_malformed(struct tunio_dns *d);
/* A datagram the reader read (parsed, UDP): what to do with it. Thread-safe. */
enum tunio_dns_verdict tunio_dns_serve(struct tunio_dns *d, const struct tunio_pkt *p, uint64_t now,
                                       uint8_t *out, size_t cap, size_t *out_len);
/* The mode; whether a TCP flow to `dst`:`dport` (IP `version`) is the stack's to serve (fake-IP
 * mode, to the DNS address's port 53: dnstcp.h), and whether it goes to the upstream instead
 * (also true of the former: what it forwards does). */
int tunio_dns_mode(const struct tunio_dns *d);
int tunio_dns_serves_tcp(const struct tunio_dns *d, int version, const uint8_t dst[16],
                         uint16_t dport);
int tunio_dns_to_upstream(const struct tunio_dns *d, int version, const uint8_t dst[16],
                          uint16_t dport);
const struct tunio_dns_counters *tunio_dns_counters(const struct tunio_dns *d);

#endif
