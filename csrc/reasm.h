/* IPv4 and IPv6 fragment reassembly, one table per TUN reader (lock-free: the kernel puts every
 * fragment of a datagram on the same queue, since a fragment's flow hash has no ports).
 *
 * Apps whose datagrams exceed the TUN's MTU send them as fragments; reassembled, they travel
 * like any other packet. A datagram whose fragments overlap, disagree on its length, or do not
 * fit in 64 KiB is discarded (RFC 5722 for IPv6; the same rule for IPv4), as is one left
 * incomplete for TUNIO_REASM_TIMEOUT_MS or pushed out of a full table by a newer one. */
#ifndef TUNIO_REASM_H
#define TUNIO_REASM_H

#include <stddef.h>
#include <stdint.h>

#include "packet.h"

#define TUNIO_REASM_SLOTS 16         /* datagrams being reassembled at once, per reader */
#define TUNIO_REASM_TIMEOUT_MS 30000 /* an incomplete datagram is discarded after this */
#define TUNIO_REASM_ROOM 16          /* writable bytes before a finished packet (a vnet header) */

struct tunio_reasm;

struct tunio_reasm *tunio_reasm_new(void);
void tunio_reasm_free(struct tunio_reasm *r);

enum {
    TUNIO_REASM_DISCARDED = -1, /* this fragment's datagram is discarded (with the fragment) */
    TUNIO_REASM_HELD = 0,       /* kept until the rest arrives */
    TUNIO_REASM_DONE = 1,       /* *out / *out_len: the whole IP packet, valid until the next
                                 * call, with TUNIO_REASM_ROOM writable bytes before it */
};

/* Takes one fragment, as tunio_pkt_parse described it (it returned TUNIO_PKT_FRAGMENT).
 * Returns one of the above. */
int tunio_reasm_add(struct tunio_reasm *r, const struct tunio_pkt *fragment, uint64_t now_ms,
                    uint8_t **out, size_t *out_len);

/* Other datagrams discarded since the last call to this: expired, or pushed out of a full table. */
unsigned tunio_reasm_take_discarded(struct tunio_reasm *r);

#endif
