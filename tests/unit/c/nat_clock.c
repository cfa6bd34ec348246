/* The NAT table's expiry against the readers' clock (tests/unit/test_nat_clock.py builds and runs
 * this). A reader stamps an entry with the time it read before taking the table's lock; the loop
 * reads its own time before it sweeps. Both clocks are CLOCK_MONOTONIC, but a reader that read a
 * packet during that gap stamps the entry a millisecond or more after the sweep's `now`: the sweep
 * must take such an entry as just used, not as one that waited 2^64 ms. Exit 0 when every check
 * holds; each failure names itself on stderr. */
#include <arpa/inet.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../../csrc/checksum.h"
#include "../../../csrc/nat.h"
#include "../../../csrc/packet.h"

#define T 1000000u /* the loop's now; readers read T + 1 */

static const uint8_t APP[4] = {10, 0, 0, 2}, DST[4] = {10, 9, 9, 9};
static const uint8_t LISTEN[4] = {198, 18, 255, 1}, POOL[4] = {198, 18, 255, 240};
static int failures;

static void check(int ok, const char *what)
{
    if (!ok) {
        fprintf(stderr, "FAIL: %s\n", what);
        failures++;
    }
}

/* An IPv4 TCP segment with correct checksums. */
static size_t segment(uint8_t *b, const uint8_t src[4], uint16_t sport, const uint8_t dst[4],
                      uint16_t dport, uint8_t flags, uint32_t seq, uint32_t ack)
{
    memset(b, 0, 40);
    b[0] = 0x45;
    b[3] = 40;
    b[8] = 64;
    b[9] = 6;
    memcpy(b + 12, src, 4);
    memcpy(b + 16, dst, 4);
    uint16_t c = tunio_csum_finish(tunio_csum_add(0, b, 20));
    memcpy(b + 10, &c, 2);
    uint8_t *t = b + 20;
    uint16_t sp = htons(sport), dp = htons(dport);
    uint32_t sq = htonl(seq), ak = htonl(ack);
    memcpy(t, &sp, 2);
    memcpy(t + 2, &dp, 2);
    memcpy(t + 4, &sq, 4);
    memcpy(t + 8, &ak, 4);
    t[12] = 5 << 4;
    t[13] = flags;
    t[14] = 0xfa;
    uint8_t pseudo[12] = {0};
    memcpy(pseudo, src, 4);
    memcpy(pseudo + 4, dst, 4);
    pseudo[9] = 6;
    pseudo[11] = 20;
    c = tunio_csum_finish(tunio_csum_add(tunio_csum_add(0, pseudo, 12), t, 20));
    memcpy(t + 16, &c, 2);
    return 40;
}

static enum tunio_nat_verdict translate(struct tunio_nat *nat, uint8_t *b, size_t n, uint64_t now,
                                        struct tunio_nat_open *open)
{
    struct tunio_pkt p;
    uint8_t reply[128];
    size_t rlen;
    if (tunio_pkt_parse(&p, b, n) != TUNIO_PKT_OK)
        return (enum tunio_nat_verdict) - 1;
    return tunio_nat_translate(nat, &p, now, reply, sizeof(reply), &rlen, open);
}

int main(void)
{
    struct tunio_nat nat;
    struct tunio_nat_config cfg = {.version = 4,
                                   .listen_port = 4000,
                                   .pool_count = 4,
                                   .pending_ms = 15000,
                                   .reserve_ms = 60000,
                                   .silent_ms = 60000};
    memcpy(cfg.listen_addr, LISTEN, 4);
    memcpy(cfg.pool_base, POOL, 4);
    /* The table in a fresh region, as the stack attaches it (csrc/nat.h). */
    struct tunio_nat_config cfgs[2] = {cfg, {0}};
    struct tunio_nat *nats[2] = {&nat, NULL};
    static struct tunio_nat_limits limits;
    size_t region_len = tunio_nat_region_size_of(cfgs);
    void *region = calloc(1, region_len);
    if (!region || tunio_nat_attach(region, region_len, cfgs, nats, &limits, T)) {
        fprintf(stderr, "FAIL: tunio_nat_attach\n");
        return 1;
    }
    uint8_t b[64], out[256];
    size_t n, len;
    uint32_t expired[8];
    struct tunio_nat_open open;

    /* 1. A SYN read at T + 1, a sweep at T: the SYN stays held, its dial still counts. */
    n = segment(b, APP, 40000, DST, 80, 0x02, 1000, 0);
    check(translate(&nat, b, n, T + 1, &open) == TUNIO_NAT_OPEN, "new SYN held");
    check(tunio_nat_sweep(&nat, T, expired, 8) == 0, "a SYN held 'for -1 ms' is not expired");
    check(tunio_nat_release(&nat, open.entry, open.flow_id, T + 2, out, sizeof(out), &len) == 0,
          "the dial's OPEN_OK still releases the held SYN");
    uint32_t first_entry = open.entry, first_flow = open.flow_id;

    /* 2. A flow that ends (the stack closed its socket; the kernel still sends the rest of the
     * data). A straggler read at T + 1, a sweep at T: the slot still translates both ways. */
    n = segment(b, APP, 40001, DST, 80, 0x02, 2000, 0);
    check(translate(&nat, b, n, T - 100, &open) == TUNIO_NAT_OPEN, "second SYN held");
    check(tunio_nat_release(&nat, open.entry, open.flow_id, T - 50, out, sizeof(out), &len) == 0,
          "second SYN released");
    tunio_nat_close(&nat, open.entry, open.flow_id, T);
    uint8_t fake[4];
    n = segment(b, APP, 40001, DST, 80, 0x10, 2001, 5000);
    check(translate(&nat, b, n, T + 1, &open) == TUNIO_NAT_FORWARD, "straggler translated");
    memcpy(fake, b + 12, 4);
    uint16_t fport = (uint16_t)(b[20] << 8 | b[21]);
    tunio_nat_sweep(&nat, T, expired, 8);
    n = segment(b, APP, 40001, DST, 80, 0x10, 2001, 6000);
    check(translate(&nat, b, n, T + 2, &open) == TUNIO_NAT_FORWARD,
          "the app's next ACK after the sweep is translated, not answered with a RST");
    n = segment(b, LISTEN, 4000, fake, fport, 0x18, 6000, 2001);
    check(translate(&nat, b, n, T + 2, &open) == TUNIO_NAT_FORWARD,
          "the listener's data after the sweep still reaches the app");

    /* 3. Expiry itself still works: the first flow ends too, and after the reserve both slots
     * are free again. */
    tunio_nat_close(&nat, first_entry, first_flow, T + 2);
    tunio_nat_sweep(&nat, T + 2 + 60000, expired, 8);
    check(tunio_nat_live(&nat) == 0, "closed slots are released after reserve_ms");

    tunio_nat_fini(&nat);
    free(region);
    if (!failures)
        printf("nat_clock: all checks passed\n");
    return failures != 0;
}
