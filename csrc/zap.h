/* ZAP handler (ZeroMQ RFC 27) for a CURVE endpoint: admits only the worker public keys it was
 * given. Created by the link (link.c) before its ROUTER binds; runs on the loop thread. */
#ifndef TUNIO_ZAP_H
#define TUNIO_ZAP_H

#include <stdint.h>

struct tunio_zap;

/* Binds the handler in ZeroMQ context `zctx`. `clients`: z85 public keys, 40 characters each,
 * separated by anything else; at least one. */
int tunio_zap_new(void *zctx, const char *clients, struct tunio_zap **out);
/* Closes the handler's socket (before the context is terminated); NULL is fine. */
void tunio_zap_free(struct tunio_zap *z);
/* The ZMQ_FD of the handler's socket, for the loop's epoll. */
int tunio_zap_fd(const struct tunio_zap *z);
/* Answers every waiting request. */
void tunio_zap_drain(struct tunio_zap *z);
/* From the link's tick: the line for the refusals counted since the last one, when due. */
void tunio_zap_tick(struct tunio_zap *z, uint64_t now);

#endif
