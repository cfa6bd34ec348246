/* libFuzzer target: every packet the TUN can hand the stack goes through the parser, the NAT
 * translation and the answer builders, as a reader thread would do it; fragments go through the
 * reassembler, and a datagram it completes takes the same path. The tables live across inputs,
 * so sequences of packets (SYN, then segments of the same flow; fragments of one datagram) are
 * explored too. */
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "../csrc/nat.h"
#include "../csrc/packet.h"
#include "../csrc/reasm.h"

static struct tunio_nat nat4, nat6;
static struct tunio_nat_limits limits = {.max_flows = 4096, .max_pending = 64};
static struct tunio_reasm *reasm;
static int ready;
static uint64_t now_ms;
static void *region;
static size_t region_len;
static struct tunio_nat_config cfg[2];
static unsigned inputs;

/* The tables live in a calloc'd region, as they would in a new memfd; small limits, so that
 * refusals are explored too. */
static void attach(void)
{
    struct tunio_nat *nats[2] = {&nat4, &nat6};
    if (tunio_nat_attach(region, region_len, cfg, nats, &limits, now_ms))
        abort();
}

/* Now and then the stack "restarts": the tables are adopted from the region as they are. */
static void restart(void)
{
    tunio_nat_fini(&nat4);
    tunio_nat_fini(&nat6);
    atomic_store(&limits.flows, 0);
    atomic_store(&limits.pending, 0);
    attach();
}

static void setup(void)
{
    cfg[0] = (struct tunio_nat_config){.version = 4,
                                       .listen_port = 4000,
                                       .pool_count = 2,
                                       .pending_ms = 50,
                                       .reserve_ms = 100,
                                       .silent_ms = 100};
    const uint8_t a[4] = {198, 18, 255, 1}, base[4] = {198, 18, 255, 252};
    memcpy(cfg[0].listen_addr, a, 4);
    memcpy(cfg[0].pool_base, base, 4);
    /* fd00:18::1/64, pool at the top of the prefix */
    const uint8_t a6[16] = {0xfd, 0, 0, 0x18, [15] = 1};
    uint8_t base6[16] = {0xfd, 0,    0,    0x18, 0,    0,    0,    0,
                         0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfd};
    cfg[1] = cfg[0];
    cfg[1].version = 6;
    memcpy(cfg[1].listen_addr, a6, 16);
    memcpy(cfg[1].pool_base, base6, 16);
    region_len = tunio_nat_region_size_of(cfg);
    if (!(region = calloc(1, region_len)))
        abort();
    attach();
    if (!(reasm = tunio_reasm_new()))
        abort();
    ready = 1;
}

static void handle(uint8_t *buf, size_t size, int reassembled);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!ready)
        setup();
    if (size > 65536)
        return 0;
    if (++inputs % 997 == 0)
        restart();
    uint8_t *buf = malloc(size ? size : 1);
    memcpy(buf, data, size);
    now_ms += (size & 16) ? 4000 : 7; /* now and then a jump, so held fragments expire */
    handle(buf, size, 0);
    uint32_t expired[64];
    tunio_nat_sweep(&nat4, now_ms, expired, 64);
    tunio_nat_sweep(&nat6, now_ms, expired, 64);
    tunio_reasm_take_discarded(reasm);
    free(buf);
    return 0;
}

static void handle(uint8_t *buf, size_t size, int reassembled)
{
    struct tunio_pkt p;
    uint8_t reply[128], out[65536];
    size_t rlen, olen;
    int st = tunio_pkt_parse(&p, buf, size);
    if (st == TUNIO_PKT_FRAGMENT && !reassembled) {
        uint8_t *whole;
        size_t len;
        if (tunio_reasm_add(reasm, &p, now_ms, &whole, &len) == TUNIO_REASM_DONE) {
            memset(whole - TUNIO_REASM_ROOM, 0, TUNIO_REASM_ROOM); /* the room is writable */
            handle(whole, len, 1);
        }
        return;
    }
    if (st == TUNIO_PKT_OK) {
        tunio_pkt_verify_checksums(&p);
        if (size & 4) { /* as if a virtio-net header said NEEDS_CSUM, with offsets from the input */
            p.partial_csum = 1;
            if (size & 8)
                tunio_pkt_complete_csum(&p, p.l3_len + (buf[0] & 7), buf[size - 1] & 31);
        }
        tunio_pkt_build_icmp_unreach(&p, 1, out, sizeof(out));
        struct tunio_nat *nat = p.version == 6 ? &nat6 : &nat4;
        if (p.proto == TUNIO_IPPROTO_TCP) {
            struct tunio_nat_open open;
            enum tunio_nat_verdict v =
                tunio_nat_translate(nat, &p, now_ms, reply, sizeof(reply), &rlen, &open);
            if (v == TUNIO_NAT_OPEN) {
                /* Decide the dial from the input, so every outcome is reached. */
                switch (size % 4) {
                case 0:
                    tunio_nat_release(nat, open.entry, open.flow_id, now_ms, out, sizeof(out),
                                      &olen);
                    break;
                case 1:
                    tunio_nat_reject(nat, open.entry, open.flow_id, 111, now_ms, out, sizeof(out),
                                     &olen);
                    break;
                case 2:
                    tunio_nat_reject(nat, open.entry, open.flow_id, 113, now_ms, out, sizeof(out),
                                     &olen);
                    break;
                default:
                    break; /* left pending: the sweep expires it */
                }
            }
        } else if (p.proto == TUNIO_IPPROTO_UDP) {
            tunio_pkt_build_udp(p.version, p.dst, p.dport, p.src, p.sport, p.buf + p.l3_len,
                                p.l4_len, out, sizeof(out));
        }
    }
}
