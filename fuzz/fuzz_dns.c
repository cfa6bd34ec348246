/* libFuzzer target: the stack's DNS on arbitrary queries. Each input is parsed; what parses is
 * answered and its answer checked, each plain name goes through a small fake-IP map (a /28 pool:
 * recycling at once) whose address must map back to its index, and the whole datagram is served
 * as the TUN readers serve it (fake-IP mode, from a UDP packet to the DNS address). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../csrc/dns.h"
#include "../csrc/dnsmap.h"
#include "../csrc/packet.h"
#include "dns_fixture.h"

static struct tunio_dnsmap *map;
static struct tunio_dns *dns;
static uint64_t clock_ms = 1;

static void setup(void)
{
    struct tunio_dnsmap_config mc = {.net4 = {198, 18, 0, 0},
                                     .len4 = 28,
                                     .hole_lo = 4,
                                     .hole_hi = 8,
                                     .net6 = {0xfd, 0, 0x74},
                                     .len6 = 124,
                                     .hold_ms = 3};
    dns_fixture(&mc, clock_ms, &map, &dns);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!map)
        setup();
    clock_ms += 1 + (size & 3);
    struct tunio_dns_question q;
    uint8_t out[1024];
    int kind = tunio_dns_parse(data, size, &q);
    if (kind == TUNIO_DNS_QUERY) {
        if (q.end > size || q.name_len > 253 || (q.plain && strlen(q.name) != q.name_len))
            __builtin_trap();
        static const uint8_t addr[16] = {198, 18, 0, 7};
        size_t n = tunio_dns_answer(data, &q, addr, 4, 5, out, sizeof(out));
        if (n != q.end + 16 || memcmp(out, data, 2) || !(out[2] & 0x80))
            __builtin_trap();
        if (q.plain) {
            uint32_t index, back;
            uint8_t a[16];
            if (tunio_dnsmap_resolve(map, q.name, q.name_len, clock_ms, &index) == 0) {
                for (int v = 4; v <= 6; v += 2) {
                    if (tunio_dnsmap_address(map, index, v, a) != 0 ||
                        !tunio_dnsmap_lookup(map, v, a, &back) || back != index)
                        __builtin_trap();
                }
                char name[256];
                if (tunio_dnsmap_acquire(map, index, clock_ms, name, sizeof(name)) !=
                        (int)q.name_len ||
                    strcmp(name, q.name))
                    __builtin_trap();
                if (size & 4)
                    tunio_dnsmap_release(map, index, clock_ms); /* else it stays held */
            }
        }
    }
    if (kind != TUNIO_DNS_IGNORE && tunio_dns_error(data, size, NULL, 1, out, sizeof(out)) != 12)
        __builtin_trap();
    /* The reader's path: the same bytes as the payload of a UDP datagram to the DNS address. */
    static const uint8_t app[16] = {198, 18, 255, 1}, server[16] = {198, 18, 255, 2};
    uint8_t pkt[2048], reply[1024];
    size_t plen = tunio_pkt_build_udp(4, app, 5353, server, 53, data, size, pkt, sizeof(pkt));
    struct tunio_pkt p;
    if (plen && tunio_pkt_parse(&p, pkt, plen) == TUNIO_PKT_OK) {
        size_t rlen;
        int v = tunio_dns_serve(dns, &p, clock_ms, reply, sizeof(reply), &rlen);
        struct tunio_pkt r;
        if (v == TUNIO_DNS_REPLY &&
            (tunio_pkt_parse(&r, reply, rlen) != TUNIO_PKT_OK || r.sport != 53 || r.dport != 5353))
            __builtin_trap();
    }
    return 0;
}
