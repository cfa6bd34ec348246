/* Stack <-> worker protocol codec. Big-endian fields; see docs/protocol.md. */
#include "wire.h"

#include <errno.h>
#include <string.h>

static void put16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}
static uint16_t get16(const uint8_t *p)
{
    return (uint16_t)(p[0] << 8 | p[1]);
}

void tunio_wire_encode_header(uint8_t out[TUNIO_WIRE_HEADER_LEN], uint8_t cmd, uint32_t flow,
                              uint64_t arg)
{
    tunio_wire_encode_header_flags(out, cmd, 0, flow, arg);
}

void tunio_wire_encode_header_flags(uint8_t out[TUNIO_WIRE_HEADER_LEN], uint8_t cmd, uint16_t flags,
                                    uint32_t flow, uint64_t arg)
{
    out[0] = TUNIO_WIRE_VERSION;
    out[1] = cmd;
    put16(out + 2, flags);
    for (int i = 0; i < 4; i++)
        out[4 + i] = (uint8_t)(flow >> (24 - 8 * i));
    for (int i = 0; i < 8; i++)
        out[8 + i] = (uint8_t)(arg >> (56 - 8 * i));
}

/* Which commands carry a payload frame: 1 = required, 0 = forbidden. */
static int payload_rule(uint8_t cmd)
{
    switch (cmd) {
    case TUNIO_CMD_HELLO:
    case TUNIO_CMD_OPEN:
    case TUNIO_CMD_DATA:
    case TUNIO_CMD_DATA_FIN:
    case TUNIO_CMD_DGRAM:
    case TUNIO_CMD_NAME:
        return 1;
    case TUNIO_CMD_OPEN_OK:
    case TUNIO_CMD_OPEN_FAIL:
    case TUNIO_CMD_CREDIT:
    case TUNIO_CMD_FIN:
    case TUNIO_CMD_RST:
    case TUNIO_CMD_HEARTBEAT:
    case TUNIO_CMD_BYE:
    case TUNIO_CMD_DRAIN:
    case TUNIO_CMD_CREDIT_FIN:
        return 0;
    default:
        return -1;
    }
}

static int is_flow_cmd(uint8_t cmd)
{
    return cmd != TUNIO_CMD_HELLO && cmd != TUNIO_CMD_HEARTBEAT && cmd != TUNIO_CMD_BYE &&
           cmd != TUNIO_CMD_DRAIN;
}

int tunio_wire_decode(const uint8_t *hdr, size_t hdr_len, int has_payload, size_t payload_len,
                      struct tunio_wire_header *h)
{
    memset(h, 0, sizeof(*h));
    /* The version first: a peer of another version, whose header may be laid out differently,
     * still learns why it is refused. */
    if (hdr_len >= 1 && hdr[0] != TUNIO_WIRE_VERSION) {
        h->version = hdr[0];
        return -EPROTONOSUPPORT;
    }
    if (hdr_len != TUNIO_WIRE_HEADER_LEN)
        return -EPROTO;
    h->version = hdr[0];
    h->cmd = hdr[1];
    h->flags = get16(hdr + 2);
    for (int i = 0; i < 4; i++)
        h->flow = h->flow << 8 | hdr[4 + i];
    for (int i = 0; i < 8; i++)
        h->arg = h->arg << 8 | hdr[8 + i];
    int rule = payload_rule(h->cmd);
    if (rule < 0 || rule != !!has_payload)
        return -EPROTO;
    if (is_flow_cmd(h->cmd) ? h->flow == 0 : h->flow != 0)
        return -EPROTO;
    switch (h->cmd) {
    case TUNIO_CMD_OPEN:
        return payload_len == TUNIO_WIRE_ADDR_LEN ? 0 : -EPROTO;
    case TUNIO_CMD_DATA:
    case TUNIO_CMD_DATA_FIN:
        return payload_len > 0 ? 0 : -EPROTO;
    case TUNIO_CMD_DGRAM:
        return payload_len >= TUNIO_WIRE_ADDR_LEN ? 0 : -EPROTO;
    case TUNIO_CMD_HELLO:
        return payload_len <= TUNIO_WIRE_NAME_MAX ? 0 : -EPROTO;
    case TUNIO_CMD_NAME:
        return payload_len >= 1 && payload_len <= TUNIO_WIRE_DNS_NAME_MAX ? 0 : -EPROTO;
    default:
        return 0;
    }
}

void tunio_wire_encode_addr(uint8_t out[TUNIO_WIRE_ADDR_LEN], const struct tunio_wire_addr *a)
{
    out[0] = a->proto;
    out[1] = a->version;
    put16(out + 2, a->sport);
    put16(out + 4, a->dport);
    put16(out + 6, 0);
    memcpy(out + 8, a->src, 16);
    memcpy(out + 24, a->dst, 16);
}

int tunio_wire_decode_addr(const uint8_t *in, size_t len, struct tunio_wire_addr *a)
{
    if (len < TUNIO_WIRE_ADDR_LEN || (in[1] != 4 && in[1] != 6))
        return -EPROTO;
    a->proto = in[0];
    a->version = in[1];
    a->sport = get16(in + 2);
    a->dport = get16(in + 4);
    memcpy(a->src, in + 8, 16);
    memcpy(a->dst, in + 24, 16);
    return 0;
}

const char *tunio_wire_cmd_name(int cmd)
{
    static const char *const names[] = {
        "?",   "HELLO", "OPEN",      "OPEN_OK", "OPEN_FAIL", "DATA", "CREDIT",   "FIN",
        "RST", "DGRAM", "HEARTBEAT", "BYE",     "DRAIN",     "?",    "DATA_FIN", "CREDIT_FIN"};
    if (cmd == TUNIO_CMD_NAME)
        return "NAME";
    return cmd > 0 && cmd < (int)(sizeof(names) / sizeof(names[0])) ? names[cmd] : "?";
}
