/* The TUN device's queues: opening them (tunio_tun_open, in tunio.h), and writing packets into
 * them from any thread (the readers' forwarded frames; the packets the stack builds: released
 * SYNs, RSTs and ICMP errors, UDP replies), counted here. The queue fds are the caller's. */
#ifndef TUNIO_TUN_H
#define TUNIO_TUN_H

#include <stddef.h>
#include <stdint.h>

#define TUNIO_VNET_HLEN 10u /* struct virtio_net_hdr */
#define TUNIO_TUN_BUF (65536u + TUNIO_VNET_HLEN)

struct tunio_nat;
struct tunio_stats;
struct tunio_tun;

/* Takes `n` queue fds (not closed by tunio_tun_free); `vnet`: they carry virtio-net headers. */
int tunio_tun_new(const int *fds, int n, int vnet, struct tunio_tun **out);
void tunio_tun_free(struct tunio_tun *t);
int tunio_tun_queues(const struct tunio_tun *t);
int tunio_tun_queue_fd(const struct tunio_tun *t, int i);
/* Bytes of virtio-net header before each packet on the queues: 0 or TUNIO_VNET_HLEN. */
size_t tunio_tun_vnet_len(const struct tunio_tun *t);

/* Writes a packet the stack built through queue fd `fd` (-1: the first queue). */
void tunio_tun_write(struct tunio_tun *t, int fd, const uint8_t *pkt, size_t len);
/* Writes a frame as it was read, virtio-net header included, back through queue fd `fd`. */
void tunio_tun_write_frame(struct tunio_tun *t, int fd, const uint8_t *frame, size_t len);
/* Answers the SYN that `nat` holds for `entry` as a direct connect failing with `err` would have
 * been answered (see tunio_nat_reject), through queue fd `fd` (-1: the first queue). */
void tunio_tun_reject(struct tunio_tun *t, int fd, struct tunio_nat *nat, uint32_t entry,
                      uint32_t flow_id, int err);

/* Adds packets_written and write_errors. */
void tunio_tun_add_stats(const struct tunio_tun *t, struct tunio_stats *o);

#endif
