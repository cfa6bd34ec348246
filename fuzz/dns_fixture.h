/* What both DNS fuzz targets serve from: a fake-IP map of `mc` in a region of its own, and the
 * stack's DNS in fake-IP mode on top of it (answering at 198.18.255.2, IPv4 only, TTL 1 s,
 * forwarding over UDP and TCP), as the readers and the DNS flows have them. A target that cannot
 * have them has nothing to test: it aborts. */
#ifndef TUNIO_FUZZ_DNS_FIXTURE_H
#define TUNIO_FUZZ_DNS_FIXTURE_H

#include <stdint.h>
#include <stdlib.h>

#include "../csrc/dns.h"
#include "../csrc/dnsmap.h"

static void dns_fixture(const struct tunio_dnsmap_config *mc, uint64_t now,
                        struct tunio_dnsmap **map, struct tunio_dns **dns)
{
    size_t len = tunio_dnsmap_region_size(mc);
    void *region = calloc(1, len);
    if (!region || tunio_dnsmap_attach(region, len, mc, now, map) != 0)
        abort();
    struct tunio_dns_config dc = {.mode = TUNIO_DNS_FAKE_IP,
                                  .address = {{198, 18, 255, 2}},
                                  .has_address = {1, 0},
                                  .ttl = 1,
                                  .map = *map,
                                  .carries = {1, 1}};
    if (tunio_dns_new(&dc, dns) != 0)
        abort();
}

#endif
