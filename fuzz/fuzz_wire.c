/* libFuzzer target: the stack <-> worker codec on arbitrary frames. The first input byte says
 * whether a payload frame is present and where the header ends. */
#include <stdint.h>
#include <string.h>

#include "../csrc/wire.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    size_t split = data[0] & 0x1f;
    int has_payload = data[0] >> 7;
    data++;
    size--;
    if (split > size)
        split = size;
    struct tunio_wire_header h;
    if (tunio_wire_decode(data, split, has_payload, size - split, &h) == 0 &&
        (h.cmd == 2 || h.cmd == 9)) {
        struct tunio_wire_addr a;
        uint8_t again[40];
        if (tunio_wire_decode_addr(data + split, size - split, &a) == 0) {
            tunio_wire_encode_addr(again, &a);
            /* A decoded block encodes back to itself, reserved bytes aside. */
            if (memcmp(again, data + split, 6) || memcmp(again + 8, data + split + 8, 32))
                __builtin_trap();
        }
    }
    return 0;
}
