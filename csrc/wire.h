/* Codec of the stack <-> worker protocol (docs/protocol.md): a 16-byte header frame and an
 * optional payload frame. Pure functions over byte buffers, shared with the Python codec's golden
 * vectors (tests/golden/frames.json). */
#ifndef TUNIO_WIRE_H
#define TUNIO_WIRE_H

#include <stddef.h>
#include <stdint.h>

/* cffi:begin (the codec, for tests against the golden frames) */
#define TUNIO_WIRE_VERSION 2
#define TUNIO_WIRE_HEADER_LEN 16
#define TUNIO_WIRE_ADDR_LEN 40
#define TUNIO_WIRE_NAME_MAX 64
#define TUNIO_WIRE_DNS_NAME_MAX 253 /* NAME's payload: a domain name, dotted, no final dot */
#define TUNIO_WIRE_FEATURE_NAMES 1  /* HELLO's flags, w->s: the worker takes NAME */

enum tunio_cmd {
    TUNIO_CMD_HELLO = 1,
    TUNIO_CMD_OPEN = 2,
    TUNIO_CMD_OPEN_OK = 3,
    TUNIO_CMD_OPEN_FAIL = 4,
    TUNIO_CMD_DATA = 5,
    TUNIO_CMD_CREDIT = 6,
    TUNIO_CMD_FIN = 7,
    TUNIO_CMD_RST = 8,
    TUNIO_CMD_DGRAM = 9,
    TUNIO_CMD_HEARTBEAT = 10,
    TUNIO_CMD_BYE = 11,
    TUNIO_CMD_DRAIN = 12,      /* w->s: give me no new flows; I finish mine and leave */
    TUNIO_CMD_DATA_FIN = 14,   /* DATA (payload, arg: credit carried) and then FIN, in one */
    TUNIO_CMD_CREDIT_FIN = 15, /* CREDIT (arg, may be 0) and then FIN, in one */
    TUNIO_CMD_NAME = 16,
};

struct tunio_wire_header {
    uint8_t version;
    uint8_t cmd;
    uint16_t flags; /* HELLO: the features its sender takes (TUNIO_WIRE_FEATURE_*); else 0 */
    uint32_t flow;
    uint64_t arg;
};

struct tunio_wire_addr {
    uint8_t proto;
    uint8_t version;
    uint16_t sport;
    uint16_t dport;
    uint8_t src[16];
    uint8_t dst[16];
};

void tunio_wire_encode_header(uint8_t out[TUNIO_WIRE_HEADER_LEN], uint8_t cmd, uint32_t flow,
                              uint64_t arg);
/* The same with the flags field set (HELLO's features). */
void tunio_wire_encode_header_flags(uint8_t out[TUNIO_WIRE_HEADER_LEN], uint8_t cmd, uint16_t flags,
                                    uint32_t flow, uint64_t arg);
/* Decodes and validates a message: the header frame and, when `has_payload`, the payload's length.
 * Returns 0, -EPROTONOSUPPORT for another protocol version (h->version tells which), or -EPROTO
 * for anything else malformed. */
int tunio_wire_decode(const uint8_t *hdr, size_t hdr_len, int has_payload, size_t payload_len,
                      struct tunio_wire_header *h);
void tunio_wire_encode_addr(uint8_t out[TUNIO_WIRE_ADDR_LEN], const struct tunio_wire_addr *a);
int tunio_wire_decode_addr(const uint8_t *in, size_t len, struct tunio_wire_addr *a);
const char *tunio_wire_cmd_name(int cmd);
/* cffi:end */

#endif
