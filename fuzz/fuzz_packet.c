/* libFuzzer target: every packet the TUN can hand the stack goes through the parser, the NAT
 * translation and the answer builders, as a reader thread would do it. The table lives across
 * inputs, so sequences of packets (SYN, then segments of the same flow) are explored too. */
#include <stdlib.h>
#include <string.h>

#include "../csrc/nat.h"
#include "../csrc/packet.h"

static struct tunio_nat nat;
static int ready;
static uint64_t now_ms;

static void setup(void)
{
    struct tunio_nat_config cfg = {.listen_port = 4000, .pool_count = 2, .pending_ms = 50,
                                   .reserve_ms = 100, .silent_ms = 100};
    const uint8_t a[4] = {198, 18, 255, 1}, base[4] = {198, 18, 255, 252};
    memcpy(cfg.listen_addr, a, 4);
    memcpy(cfg.pool_base, base, 4);
    if (tunio_nat_init(&nat, &cfg))
        abort();
    ready = 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!ready)
        setup();
    if (size > 65536)
        return 0;
    uint8_t *buf = malloc(size ? size : 1);
    memcpy(buf, data, size);
    struct tunio_pkt p;
    uint8_t reply[128], out[65536];
    size_t rlen, olen;
    now_ms += 7;
    if (tunio_pkt_parse(&p, buf, size) == TUNIO_PKT_OK) {
        tunio_pkt_verify_checksums(&p);
        tunio_pkt_build_icmp_unreach(&p, 1, out, sizeof(out));
        if (p.proto == TUNIO_IPPROTO_TCP) {
            struct tunio_nat_open open;
            enum tunio_nat_verdict v = tunio_nat_translate(&nat, &p, now_ms, reply, sizeof(reply),
                                                           &rlen, &open);
            if (v == TUNIO_NAT_OPEN) {
                /* Decide the dial from the input, so every outcome is reached. */
                switch (size % 4) {
                case 0: tunio_nat_release(&nat, open.entry, open.flow_id, now_ms, out, sizeof(out), &olen); break;
                case 1: tunio_nat_reject(&nat, open.entry, open.flow_id, 111, now_ms, out, sizeof(out), &olen); break;
                case 2: tunio_nat_reject(&nat, open.entry, open.flow_id, 113, now_ms, out, sizeof(out), &olen); break;
                default: break; /* left pending: the sweep expires it */
                }
            }
        }
    }
    uint32_t expired[64];
    tunio_nat_sweep(&nat, now_ms, expired, 64);
    free(buf);
    return 0;
}
