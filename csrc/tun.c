/* The TUN device's queues: opening them, and writing into them (any thread). */
#include "tun.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/uio.h>
#include <unistd.h>

#include "common.h"
#include "defaults.h"
#include "nat.h"
#include "tunio.h"

struct tunio_tun {
    int fds[TUNIO_MAX_QUEUES];
    int n;
    size_t vnet_len; /* bytes of virtio-net header before each packet on the queues: 0 or 10 */
    atomic_ullong packets_written;
    atomic_ullong write_errors;
};

int tunio_tun_open(const char *name, int queues, int vnet, int *fds)
{
    /* With virtio-net headers the kernel hands us (and takes back) TCP segments of up to 64 KB
     * with the checksum left to complete: a fortieth of the packets to read and rewrite. */
    unsigned offload = vnet ? TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN : 0;
    if (queues < 1 || !name || strlen(name) >= IFNAMSIZ)
        return -EINVAL;
    int i, err = 0;
    for (i = 0; i < queues; i++) {
        int fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
        if (fd < 0) {
            err = -errno;
            goto fail;
        }
        struct ifreq ifr;
        memset(&ifr, 0, sizeof(ifr));
        ifr.ifr_flags = IFF_TUN | IFF_NO_PI | IFF_MULTI_QUEUE | (vnet ? IFF_VNET_HDR : 0);
        strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
        /* Offload flags survive on a persistent device: a reader without virtio-net headers
         * would then get partial checksums. Set them explicitly every time. */
        if (ioctl(fd, TUNSETIFF, &ifr) < 0 || ioctl(fd, TUNSETOFFLOAD, offload) < 0) {
            err = -errno;
            close(fd);
            goto fail;
        }
        fds[i] = fd;
    }
    return 0;
fail:
    while (i-- > 0)
        close(fds[i]);
    return err;
}

int tunio_tun_new(const int *fds, int n, int vnet, struct tunio_tun **out)
{
    *out = NULL;
    if (n < 1 || n > TUNIO_MAX_QUEUES)
        return -EINVAL;
    struct tunio_tun *t = calloc(1, sizeof(*t));
    if (!t)
        return -ENOMEM;
    memcpy(t->fds, fds, sizeof(int) * (size_t)n);
    t->n = n;
    t->vnet_len = vnet ? TUNIO_VNET_HLEN : 0;
    atomic_init(&t->packets_written, 0);
    atomic_init(&t->write_errors, 0);
    *out = t;
    return 0;
}

void tunio_tun_free(struct tunio_tun *t)
{
    free(t);
}

int tunio_tun_queues(const struct tunio_tun *t)
{
    return t->n;
}

int tunio_tun_queue_fd(const struct tunio_tun *t, int i)
{
    return t->fds[i];
}

size_t tunio_tun_vnet_len(const struct tunio_tun *t)
{
    return t->vnet_len;
}

static void count(struct tunio_tun *t, int ok)
{
    atomic_fetch_add_explicit(ok ? &t->packets_written : &t->write_errors, 1, memory_order_relaxed);
}

void tunio_tun_write(struct tunio_tun *t, int fd, const uint8_t *pkt, size_t len)
{
    if (fd < 0)
        fd = t->fds[0];
    /* Packets we built carry full checksums: an all-zero virtio-net header says so. */
    static const uint8_t no_offload[TUNIO_VNET_HLEN];
    struct iovec iov[2] = {{.iov_base = (void *)no_offload, .iov_len = t->vnet_len},
                           {.iov_base = (void *)pkt, .iov_len = len}};
    count(t, writev(fd, iov, 2) == (ssize_t)(t->vnet_len + len));
}

void tunio_tun_write_frame(struct tunio_tun *t, int fd, const uint8_t *frame, size_t len)
{
    count(t, write(fd, frame, len) == (ssize_t)len);
}

void tunio_tun_reject(struct tunio_tun *t, int fd, struct tunio_nat *nat, uint32_t entry,
                      uint32_t flow_id, int err)
{
    uint8_t out[256]; /* a RST, or an ICMP error quoting the SYN's headers */
    size_t n = 0;
    if (tunio_nat_reject(nat, entry, flow_id, err, tunio_now_ms(), out, sizeof(out), &n) == 0 && n)
        tunio_tun_write(t, fd, out, n);
}

void tunio_tun_add_stats(const struct tunio_tun *t, struct tunio_stats *o)
{
    o->packets_written += atomic_load(&t->packets_written);
    o->write_errors += atomic_load(&t->write_errors);
}
