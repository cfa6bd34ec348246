/* Opening the queues of a multi-queue TUN device. */
#include "tunio.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "common.h"

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
