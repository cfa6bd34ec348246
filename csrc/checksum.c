/* Checksums: computed fresh for packets we build, updated incrementally for packets we rewrite
 * (a rewrite touches a few words; summing a whole 64 KiB segment again would not be free). */
#include "checksum.h"

uint32_t tunio_csum_add(uint32_t sum, const void *data, size_t len)
{
    const uint8_t *p = data;
    uint64_t s = sum;
    while (len >= 2) {
        s += (uint32_t)(p[0] << 8 | p[1]);
        p += 2;
        len -= 2;
    }
    if (len)
        s += (uint32_t)(p[0] << 8);
    while (s >> 32)
        s = (s & 0xffffffffu) + (s >> 32);
    while (s >> 16)
        s = (s & 0xffffu) + (s >> 16);
    return (uint32_t)s;
}

uint16_t tunio_csum_finish(uint32_t sum)
{
    while (sum >> 16)
        sum = (sum & 0xffffu) + (sum >> 16);
    return (uint16_t)~sum;
}

void tunio_csum_replace(uint8_t *field, const uint8_t *old, const uint8_t *new_, size_t nbytes)
{
    /* RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m') */
    uint32_t sum = (uint16_t) ~(uint16_t)(field[0] << 8 | field[1]);
    for (size_t i = 0; i + 1 < nbytes; i += 2) {
        sum += (uint16_t) ~(uint16_t)(old[i] << 8 | old[i + 1]);
        sum += (uint16_t)(new_[i] << 8 | new_[i + 1]);
    }
    uint16_t c = tunio_csum_finish(sum);
    field[0] = (uint8_t)(c >> 8);
    field[1] = (uint8_t)c;
}
