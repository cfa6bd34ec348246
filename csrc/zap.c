/* ZAP handler (ZeroMQ RFC 27): with CURVE on a tcp:// endpoint, libzmq asks this socket whether
 * a connecting worker may in. The answer is yes only for the worker public keys the stack was
 * given, so knowing the stack's public key is not enough to receive flows. Runs on the loop
 * thread, like the ROUTER. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "stack_internal.h"

#define ZAP_ENDPOINT "inproc://zeromq.zap.01"
#define KEY_Z85 40
#define KEY_BIN 32

int zap_init(struct tunio_stack *s, const char *clients)
{
    /* `clients`: z85 public keys, 40 characters each, separated by anything else. */
    size_t n = 0;
    for (const char *c = clients; *c;) {
        size_t run = strspn(c, "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                               ".-:+=^!/*?&<>()[]{}@%$#");
        if (run == KEY_Z85) {
            uint8_t *keys = realloc(s->zap_keys, (n + 1) * KEY_BIN);
            if (!keys)
                return -ENOMEM;
            s->zap_keys = keys;
            char z[KEY_Z85 + 1];
            memcpy(z, c, KEY_Z85);
            z[KEY_Z85] = 0;
            if (!zmq_z85_decode(s->zap_keys + n * KEY_BIN, z))
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
    s->zap_nkeys = n;
    s->zap = zmq_socket(s->zctx, ZMQ_REP);
    if (!s->zap)
        return -zmq_errno();
    int linger = 0;
    size_t fl = sizeof(s->zap_fd);
    if (zmq_setsockopt(s->zap, ZMQ_LINGER, &linger, sizeof(linger)) ||
        zmq_bind(s->zap, ZAP_ENDPOINT) || zmq_getsockopt(s->zap, ZMQ_FD, &s->zap_fd, &fl))
        return -zmq_errno();
    return 0;
}

static int allowed(struct tunio_stack *s, const zmq_msg_t *key)
{
    if (zmq_msg_size(key) != KEY_BIN)
        return 0;
    for (size_t i = 0; i < s->zap_nkeys; i++)
        if (!memcmp(s->zap_keys + i * KEY_BIN, zmq_msg_data((zmq_msg_t *)key), KEY_BIN))
            return 1;
    return 0;
}

static void reply(struct tunio_stack *s, const zmq_msg_t *request_id, int ok)
{
    const char *status = ok ? "200" : "400";
    const char *text = ok ? "OK" : "not a known worker key";
    zmq_send(s->zap, "1.0", 3, ZMQ_SNDMORE);
    zmq_send(s->zap, zmq_msg_data((zmq_msg_t *)request_id), zmq_msg_size(request_id),
             ZMQ_SNDMORE);
    zmq_send(s->zap, status, 3, ZMQ_SNDMORE);
    zmq_send(s->zap, text, strlen(text), ZMQ_SNDMORE);
    zmq_send(s->zap, "", 0, ZMQ_SNDMORE); /* user id */
    zmq_send(s->zap, "", 0, 0);           /* metadata */
}

/* Answers every waiting request: version, request id, domain, address, identity, mechanism,
 * credentials (the client's public key for CURVE). */
void zap_drain(struct tunio_stack *s)
{
    for (;;) {
        int events = 0;
        size_t len = sizeof(events);
        if (!s->zap || zmq_getsockopt(s->zap, ZMQ_EVENTS, &events, &len) || !(events & ZMQ_POLLIN))
            return;
        zmq_msg_t f[8];
        int n = 0, more = 1;
        while (more) {
            zmq_msg_t m;
            zmq_msg_init(&m);
            if (zmq_msg_recv(&m, s->zap, ZMQ_DONTWAIT) < 0) {
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
                 allowed(s, &f[6]);
        if (n >= 2)
            reply(s, &f[1], ok);
        if (!ok) {
            char who[64] = "?";
            if (n >= 4) {
                size_t al = zmq_msg_size(&f[3]) < sizeof(who) - 1 ? zmq_msg_size(&f[3])
                                                                   : sizeof(who) - 1;
                memcpy(who, zmq_msg_data(&f[3]), al);
                who[al] = 0;
            }
            tunio_log(TUNIO_LOG_WARNING, "refused a worker from %s: its key is not a tunio "
                                         "worker key of this stack", who);
        }
        for (int i = 0; i < n; i++)
            zmq_msg_close(&f[i]);
    }
}

void zap_fini(struct tunio_stack *s)
{
    if (s->zap)
        zmq_close(s->zap);
    s->zap = NULL;
    free(s->zap_keys);
    s->zap_keys = NULL;
}
