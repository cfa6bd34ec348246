/* Bounds-checked parsing of the IP packets read from the TUN device, and the few packets the
 * stack builds itself (TCP RST, ICMP unreachable). Nothing here allocates or keeps state. */
#ifndef TUNIO_PACKET_H
#define TUNIO_PACKET_H

#include <stddef.h>
#include <stdint.h>

/* cffi:begin (the parser and the builders, for tests) */
#define TUNIO_IPPROTO_ICMP 1
#define TUNIO_IPPROTO_TCP 6
#define TUNIO_IPPROTO_UDP 17
#define TUNIO_IPPROTO_ICMPV6 58

#define TUNIO_ICMP_ECHO_REPLY 0
#define TUNIO_ICMP_ECHO 8
#define TUNIO_ICMPV6_ECHO 128
#define TUNIO_ICMPV6_ECHO_REPLY 129

#define TUNIO_TCP_FIN 0x01
#define TUNIO_TCP_SYN 0x02
#define TUNIO_TCP_RST 0x04
#define TUNIO_TCP_PSH 0x08
#define TUNIO_TCP_ACK 0x10

/* Why a packet was not accepted by the parser; each has a drop counter. */
enum tunio_pkt_status {
    TUNIO_PKT_OK = 0,
    TUNIO_PKT_TRUNCATED,   /* shorter than its headers say */
    TUNIO_PKT_BAD_HEADER,  /* impossible header lengths or fields */
    TUNIO_PKT_FRAGMENT,    /* a fragment: for the reassembler (reasm.c); as a drop counter,
                            * the datagrams it discards */
    TUNIO_PKT_UNSUPPORTED, /* IP version or protocol the stack does not carry (yet) */
};

/* A parsed packet. Addresses are kept as bytes in network order (16 bytes, IPv4 in the first 4)
 * so the tables above this layer stay address-family generic. */
struct tunio_pkt {
    uint8_t *buf;
    size_t len;      /* IP total length (trailing bytes beyond it are ignored) */
    uint8_t version; /* 4 or 6 */
    uint8_t proto;   /* TUNIO_IPPROTO_* */
    size_t l3_len;   /* IP header length, IPv6 extension headers included */
    size_t l4_len;   /* bytes from the transport header to the end of the packet */
    uint8_t src[16];
    uint8_t dst[16];
    uint16_t sport; /* host order; an ICMP echo's identifier */
    uint16_t dport; /* 0 for an ICMP echo */
    /* TCP only */
    uint8_t tcp_flags;
    uint32_t seq;
    uint32_t ack;
    size_t tcp_hlen;
    size_t payload_len;
    /* The transport checksum field holds only the pseudo-header's sum, to be completed by
     * whoever sends the packet on (a virtio-net header's NEEDS_CSUM): a rewrite then changes
     * just that sum. Set by the caller after parsing. */
    uint8_t partial_csum;
    /* A fragment (TUNIO_PKT_FRAGMENT), for the reassembler: src, dst, proto (IPv6: the fragment
     * header's next header), len and l3_len (the header a reassembled datagram keeps: IPv4's, or
     * IPv6's with the extension headers before the fragment header) are set, and these. */
    size_t frag_data;    /* where this fragment's payload starts (len if it has none) */
    size_t frag_offset;  /* where that payload goes in the datagram's payload */
    size_t frag_next_at; /* IPv6: the next-header byte that names the fragment header */
    uint32_t frag_id;
    uint8_t frag_more; /* more fragments follow */
};

int tunio_pkt_parse(struct tunio_pkt *p, uint8_t *buf, size_t len);
const char *tunio_pkt_status_name(int status);

/* Rewrites source and destination address/port of a parsed TCP or UDP packet in place and
 * updates the checksums incrementally. Ports in host order. */
void tunio_pkt_rewrite(struct tunio_pkt *p, const uint8_t src[16], uint16_t sport,
                       const uint8_t dst[16], uint16_t dport);

/* Completes a partial checksum in software: sums from `start` to the end of the packet and
 * stores the result at start + offset. -1 if those offsets do not fit the packet. */
int tunio_pkt_complete_csum(struct tunio_pkt *p, size_t start, size_t offset);

/* Builds, into `out` (at least 40 bytes), the RST a closed port would send in answer to the TCP
 * packet `p`, with addresses swapped. Returns its length, or 0 if `p` must not be answered (it is a
 * RST itself). */
size_t tunio_pkt_build_rst(const struct tunio_pkt *p, uint8_t *out, size_t cap);

/* The largest ICMP error built (IPv6's minimum MTU): a buffer of this size holds any. */
#define TUNIO_ICMP_ERROR_MAX 1280u

/* Builds an ICMP (IPv4: type 3) or ICMPv6 (type 1) destination unreachable with `code` from
 * p's destination to its source, quoting p's IP header (options and extension headers too) and
 * the first bytes of its payload, cut to what fits in `cap` and in the most an error may carry.
 * Returns the length (0 if `cap` cannot hold even the headers). */
size_t tunio_pkt_build_icmp_unreach(const struct tunio_pkt *p, uint8_t code, uint8_t *out,
                                    size_t cap);

/* Builds an IPv4 or IPv6 (`version`) UDP packet from `src:sport` to `dst:dport` carrying
 * `payload` into `out`. Returns its length, 0 if it does not fit. */
size_t tunio_pkt_build_udp(int version, const uint8_t src[16], uint16_t sport,
                           const uint8_t dst[16], uint16_t dport, const uint8_t *payload,
                           size_t len, uint8_t *out, size_t cap);

/* Builds an ICMP / ICMPv6 echo request (reply = 0) or reply (reply = 1) carrying `data`. */
size_t tunio_pkt_build_echo(int version, int reply, const uint8_t src[16], const uint8_t dst[16],
                            uint16_t id, uint16_t seq, const uint8_t *data, size_t len,
                            uint8_t *out, size_t cap);

/* 1 if the destination of `p` is one no router forwards a packet to (a "martian" destination,
 * as Linux calls those it drops on input): IPv4 0.0.0.0/8, 127.0.0.0/8, multicast 224.0.0.0/4
 * and the limited broadcast; IPv6 ::, ::1, multicast ff00::/8 and IPv4-mapped ::ffff:0:0/96.
 * Dialed, such a flow would reach the gateway's own loopback services, or its LAN's multicast
 * groups, on behalf of whoever can send into the TUN. */
int tunio_pkt_dst_martian(const struct tunio_pkt *p);

/* Verifies the IPv4 header checksum and the TCP/UDP checksum of a parsed packet: 0 if both are
 * right. Tests use it: the kernel does not check checksums of some packets we hand it. */
int tunio_pkt_verify_checksums(const struct tunio_pkt *p);
/* cffi:end */

#endif
