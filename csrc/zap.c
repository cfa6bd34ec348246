/* ZAP handler (ZeroMQ RFC 27): with CURVE on a tcp:// endpoint, libzmq asks this socket whether
 * a connecting worker may in. The answer is yes only for the worker public keys the stack was
 * given, so knowing the stack's public key is not enough to receive flows. Runs on the loop
 * thread, like the ROUTER. */
#include "zap.h"

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#include "common.h"

#define ZAP_ENDPOINT "inproc://zeromq.zap.01"
#define KEY_Z85 40
#define KEY_BIN 32

struct tunio_zap {
    void *sock;
    int fd;
    uint8_t *keys; /* allowed worker public keys, 32 bytes each */
    size_t nkeys;
    /* Whoever reaches a tcp:// endpoint can offer a key each time it connects: one line a
     * period. */
    struct tunio_log_repeat refused;
    char refused_last[64]; /* the last refused peer's address, for the period's line */
};

static int parse_keys(struct tunio_zap *z, const char *clients)
{
    size_t n = 0;
    for (const char *c = clients; *c;) {
        size_t run = strspn(c, "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                               ".-:+=^!/*?&<>()[]{}@%$#");
        if (run == KEY_Z85) {
            uint8_t *keys = realloc(z->keys, (n + 1) * KEY_BIN);
            if (!keys)
                return -ENOMEM;
            z->keys = keys;
            char key[KEY_Z85 + 1];
            memcpy(key, c, KEY_Z85);
            key[KEY_Z85] = 0;
            if (!zmq_z85_decode(z->keys + n * KEY_BIN, key))
                return -EINVAL;
            n++;
        } else if (run) {
            return -EINVAL;
        }
        c += run;
        if (*c)
            c++;
    }
    if (n == 0)
        return -EINVAL; /* CURVE with nobody allowed in is a mistake, not a policy */
    z->nkeys = n;
    return 0;
}

int tunio_zap_new(void *zctx, const char *clients, struct tunio_zap **out)
{
    *out = NULL;
    struct tunio_zap *z = calloc(1, sizeof(*z));
    if (!z)
        return -ENOMEM;
    int err = parse_keys(z, clients);
    if (err)
        goto fail;
    z->sock = zmq_socket(zctx, ZMQ_REP);
    if (!z->sock) {
        err = -zmq_errno();
        goto fail;
    }
    int linger = 0;
    size_t fl = sizeof(z->fd);
    if (zmq_setsockopt(z->sock, ZMQ_LINGER, &linger, sizeof(linger)) ||
        zmq_bind(z->sock, ZAP_ENDPOINT) || zmq_getsockopt(z->sock, ZMQ_FD, &z->fd, &fl)) {
        err = -zmq_errno();
        goto fail;
    }
    *out = z;
    return 0;
fail:
    tunio_zap_free(z);
    return err;
}

void tunio_zap_free(struct tunio_zap *z)
{
    if (!z)
        return;
    if (z->sock)
        zmq_close(z->sock);
    free(z->keys);
    free(z);
}

int tunio_zap_fd(const struct tunio_zap *z)
{
    return z->fd;
}

static int allowed(const struct tunio_zap *z, const zmq_msg_t *key)
{
    if (zmq_msg_size(key) != KEY_BIN)
        return 0;
    for (size_t i = 0; i < z->nkeys; i++)
        if (!memcmp(z->keys + i * KEY_BIN, zmq_msg_data((zmq_msg_t *)key), KEY_BIN))
            return 1;
    return 0;
}

static void reply(struct tunio_zap *z, const zmq_msg_t *request_id, int ok)
{
    const char *status = ok ? "200" : "400";
    const char *text = ok ? "OK" : "not a known worker key";
    zmq_send(z->sock, "1.0", 3, ZMQ_SNDMORE);
    zmq_send(z->sock, zmq_msg_data((zmq_msg_t *)request_id), zmq_msg_size(request_id), ZMQ_SNDMORE);
    zmq_send(z->sock, status, 3, ZMQ_SNDMORE);
    zmq_send(z->sock, text, strlen(text), ZMQ_SNDMORE);
    zmq_send(z->sock, "", 0, ZMQ_SNDMORE); /* user id */
    zmq_send(z->sock, "", 0, 0);           /* metadata */
}

/* Answers every waiting request: version, request id, domain, address, identity, mechanism,
 * credentials (the client's public key for CURVE). */
void tunio_zap_drain(struct tunio_zap *z)
{
    for (;;) {
        int events = 0;
        size_t len = sizeof(events);
        if (zmq_getsockopt(z->sock, ZMQ_EVENTS, &events, &len) || !(events & ZMQ_POLLIN))
            return;
        zmq_msg_t f[8];
        int n = 0, more = 1;
        while (more) {
            zmq_msg_t m;
            zmq_msg_init(&m);
            if (zmq_msg_recv(&m, z->sock, ZMQ_DONTWAIT) < 0) {
                zmq_msg_close(&m);
                break;
            }
            more = zmq_msg_more(&m);
            if (n < 8)
                f[n++] = m;
            else
                zmq_msg_close(&m);
        }
        int ok = n >= 7 && zmq_msg_size(&f[5]) == 5 && !memcmp(zmq_msg_data(&f[5]), "CURVE", 5) &&
                 allowed(z, &f[6]);
        if (n >= 2)
            reply(z, &f[1], ok);
        if (!ok) {
            char *who = z->refused_last;
            size_t al = 0;
            if (n >= 4) {
                al = zmq_msg_size(&f[3]);
                if (al > sizeof(z->refused_last) - 1)
                    al = sizeof(z->refused_last) - 1;
                memcpy(who, zmq_msg_data(&f[3]), al);
            } else {
                who[al++] = '?';
            }
            who[al] = 0;
            if (tunio_log_repeat_now(&z->refused, tunio_now_ms()))
                tunio_log(TUNIO_LOG_WARNING,
                          "refused a worker from %s: its key is not a tunio worker key of this "
                          "stack",
                          who);
        }
        for (int i = 0; i < n; i++)
            zmq_msg_close(&f[i]);
    }
}

void tunio_zap_tick(struct tunio_zap *z, uint64_t now)
{
    uint64_t since = z->refused.since_ms;
    uint64_t n = tunio_log_repeat_due(&z->refused, now);
    if (n)
        tunio_log(TUNIO_LOG_WARNING,
                  "refused %llu more workers in the last %llu s, the last from %s: their keys are "
                  "not tunio worker keys of this stack",
                  (unsigned long long)n, (unsigned long long)((now - since + 500) / 1000),
                  z->refused_last);
}
