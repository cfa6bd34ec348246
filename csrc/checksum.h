/* Internet checksum (RFC 1071) and its incremental update (RFC 1624). */
#ifndef TUNIO_CHECKSUM_H
#define TUNIO_CHECKSUM_H

#include <stddef.h>
#include <stdint.h>

/* One's-complement sum of `len` bytes folded into 32 bits, starting from `sum`. */
uint32_t tunio_csum_add(uint32_t sum, const void *data, size_t len);
/* Folds and complements a running sum into the checksum field value (network order bytes). */
uint16_t tunio_csum_finish(uint32_t sum);
/* Updates checksum field `*field` (network byte order, as stored) when the 16-bit words `old`
 * (n words) are replaced by `new_` at the same place. */
void tunio_csum_replace(uint8_t *field, const uint8_t *old, const uint8_t *new_, size_t nbytes);

#endif
