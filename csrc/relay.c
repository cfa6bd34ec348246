/* One flow: the kernel socket the listener accepted on one side, DATA/CREDIT/FIN/RST with the
 * flow's worker on the other. Sockets are edge-triggered; FLOW_READABLE/FLOW_WRITABLE remember an
 * edge that could not be used yet (no credit, nothing to write). Runs on the loop thread only. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common.h"
#include "stack_internal.h"

#define SMALL_DATA 16384u        /* below this a DATA payload is copied; above, handed over */
#define ACCEPT_TIMEOUT_MS 10000u /* a released SYN must be accepted within this */

/* Credit for bytes written to the app is held back and carried on the flow's next DATA (its arg)
 * until it reaches a quarter of the window, while the flow can still carry it (the app has not
 * ended its side): a request/response exchange then costs one message each way instead of two.
 * The worker can never be stalled by it: with nothing queued here, what we hold back is under a
 * quarter of the window, so it has three quarters left to send. */
static int credit_due(const struct tunio_stack *s, const struct flow *f)
{
    return f->uncredited && (f->uncredited >= s->cfg.window / 4 || (f->flags & FLOW_APP_EOF));
}

/* Sends the credit held back for `f` now, as CREDIT. */
static void return_credit(struct tunio_stack *s, struct flow *f)
{
    if (f->uncredited) {
        broker_send(s, f->worker, TUNIO_CMD_CREDIT, f->id, f->uncredited, NULL, 0);
        f->uncredited = 0;
    }
}

static void end_flow(struct tunio_stack *s, struct flow *f)
{
    if (f->fd >= 0) {
        epoll_ctl(s->epfd, EPOLL_CTL_DEL, f->fd, NULL);
        close(f->fd);
        f->fd = -1;
    }
    tunio_nat_close(stack_nat(s, f->version), f->entry, f->id, tunio_now_ms());
    stack_flow_free(s, f);
}

void relay_abort(struct tunio_stack *s, struct flow *f, int reason)
{
    (void)reason;
    s->c.flows_reset++;
    if (f->fd >= 0) {
        /* An abortive close: the kernel sends the app a RST for this connection. */
        struct linger lg = {.l_onoff = 1, .l_linger = 0};
        setsockopt(f->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
    } else if (!(f->flags & FLOW_OPEN_OK)) {
        /* The app's SYN is still held: answer it as a refused connect. */
        stack_reject(s, -1, f->version, f->entry, f->id, ECONNREFUSED);
    }
    /* Released but not yet accepted: the accept finds no flow and closes abortively. */
    end_flow(s, f);
}

/* The app side failed (reset, or a write error): tell the worker, forget the flow. */
static void app_failed(struct tunio_stack *s, struct flow *f, int err)
{
    s->c.flows_reset++;
    broker_send(s, f->worker, TUNIO_CMD_RST, f->id, (uint64_t)err, NULL, 0);
    end_flow(s, f);
}

static void maybe_done(struct tunio_stack *s, struct flow *f)
{
    if ((f->flags & FLOW_APP_EOF) && (f->flags & FLOW_APP_SHUT))
        end_flow(s, f);
}

/* Writes what the worker sent on to the app, returns credit, passes FIN on. 0, or -1 if the flow
 * ended. */
static int flush_to_app(struct tunio_stack *s, struct flow *f)
{
    uint64_t written = 0;
    while (f->head && (f->flags & FLOW_WRITABLE)) {
        struct chunk *c = f->head;
        size_t len = zmq_msg_size(&c->msg) - c->off;
        ssize_t n = send(f->fd, (uint8_t *)zmq_msg_data(&c->msg) + c->off, len,
                         MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR) {
                f->flags &= ~(uint32_t)FLOW_WRITABLE;
                break;
            }
            app_failed(s, f, errno);
            return -1;
        }
        written += (uint64_t)n;
        c->off += (size_t)n;
        if (c->off == zmq_msg_size(&c->msg)) {
            f->head = c->next;
            if (!f->head)
                f->tail = NULL;
            zmq_msg_close(&c->msg);
            free(c);
        }
    }
    f->queued -= written;
    f->uncredited += written;
    if (credit_due(s, f))
        return_credit(s, f);
    if (!f->head && (f->flags & FLOW_WORKER_FIN) && !(f->flags & FLOW_APP_SHUT)) {
        shutdown(f->fd, SHUT_WR);
        f->flags |= FLOW_APP_SHUT;
    }
    return 0;
}

/* Reads from the app while there is credit, sends DATA (carrying held-back credit), and FIN at
 * the app's end of input (with any credit held back sent first: no DATA will carry it now). 0, or
 * -1 if the flow ended. */
static int read_from_app(struct tunio_stack *s, struct flow *f)
{
    while ((f->flags & FLOW_READABLE) && !(f->flags & FLOW_APP_EOF) && f->credit > 0) {
        if (!s->rbuf && !(s->rbuf = malloc(TUNIO_READ_CHUNK)))
            return 0; /* try again on the next event */
        size_t want = f->credit < TUNIO_READ_CHUNK ? (size_t)f->credit : TUNIO_READ_CHUNK;
        ssize_t n = recv(f->fd, s->rbuf, want, MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR) {
                f->flags &= ~(uint32_t)FLOW_READABLE;
                return 0;
            }
            app_failed(s, f, errno);
            return -1;
        }
        if (n == 0) {
            f->flags |= FLOW_APP_EOF;
            return_credit(s, f); /* no DATA will carry it now */
            broker_send(s, f->worker, TUNIO_CMD_FIN, f->id, 0, NULL, 0);
            return 0;
        }
        int err;
        uint64_t credit = f->uncredited; /* what we held back rides along */
        if ((size_t)n >= SMALL_DATA) {
            /* Handed over without a copy; a buffer mostly empty is shrunk first, so what a
             * flow holds in flight stays close to the bytes it sent. */
            uint8_t *buf = s->rbuf;
            if ((size_t)n < TUNIO_READ_CHUNK / 2) {
                uint8_t *smaller = realloc(buf, (size_t)n);
                if (smaller)
                    buf = smaller;
            }
            s->rbuf = NULL;
            err = broker_send_owned_cmd(s, f->worker, TUNIO_CMD_DATA, f->id, credit, buf,
                                        (size_t)n);
        } else {
            err = broker_send(s, f->worker, TUNIO_CMD_DATA, f->id, credit, s->rbuf, (size_t)n);
        }
        if (err) {
            relay_abort(s, f, -err);
            return -1;
        }
        f->uncredited = 0;
        f->credit -= (uint64_t)n;
        s->c.bytes_to_workers += (uint64_t)n;
    }
    return 0;
}

void relay_pump(struct tunio_stack *s, struct flow *f)
{
    if (f->fd < 0)
        return;
    if (flush_to_app(s, f) < 0 || read_from_app(s, f) < 0)
        return;
    maybe_done(s, f);
}

void relay_event(struct tunio_stack *s, struct flow *f, uint32_t events)
{
    if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))
        f->flags |= FLOW_READABLE;
    if (events & (EPOLLOUT | EPOLLHUP | EPOLLERR))
        f->flags |= FLOW_WRITABLE;
    if ((events & EPOLLERR) && !(events & EPOLLIN)) {
        int err = 0;
        socklen_t len = sizeof(err);
        getsockopt(f->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err) {
            app_failed(s, f, err);
            return;
        }
    }
    relay_pump(s, f);
}

static void attach(struct tunio_stack *s, struct flow *f, int fd)
{
    f->fd = fd;
    f->flags |= FLOW_WRITABLE;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET,
                             .data.u64 = (uint64_t)f->id << 8 | TAG_FLOW};
    if (epoll_ctl(s->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
        tunio_log(TUNIO_LOG_WARNING, "epoll_ctl: %s", strerror(errno));
        relay_abort(s, f, errno);
        return;
    }
    relay_pump(s, f);
}

static void close_abortive(int fd)
{
    struct linger lg = {.l_onoff = 1, .l_linger = 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
    close(fd);
}

void relay_accept(struct tunio_stack *s, int version)
{
    struct family *fam = stack_family(s, version);
    for (;;) {
        struct sockaddr_storage ss;
        socklen_t sl = sizeof(ss);
        int fd = accept4(fam->listen_fd, (struct sockaddr *)&ss, &sl, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if (errno != EAGAIN)
                tunio_log(TUNIO_LOG_WARNING, "accept: %s", strerror(errno));
            return;
        }
        uint8_t addr[16] = {0};
        uint16_t port = 0;
        if (ss.ss_family == AF_INET) {
            const struct sockaddr_in *sin = (const struct sockaddr_in *)&ss;
            memcpy(addr, &sin->sin_addr, 4);
            port = ntohs(sin->sin_port);
        } else if (ss.ss_family == AF_INET6) {
            const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)&ss;
            memcpy(addr, &sin6->sin6_addr, 16);
            port = ntohs(sin6->sin6_port);
        }
        uint32_t entry, id;
        struct flow *f = NULL;
        if (tunio_nat_lookup_slot(&fam->nat, addr, port, &entry, &id) == 0)
            f = stack_flow_find(s, id);
        if (!f || f->entry != entry || f->fd >= 0) {
            /* Its flow was reset meanwhile: the app gets a RST, not a silent hang. */
            close_abortive(fd);
            continue;
        }
        attach(s, f, fd);
    }
}

static void on_data(struct tunio_stack *s, struct flow *f, zmq_msg_t *payload)
{
    size_t len = zmq_msg_size(payload);
    if (!(f->flags & FLOW_OPEN_OK) || (f->flags & FLOW_WORKER_FIN) ||
        f->queued + f->uncredited + len > s->cfg.window) {
        /* DATA before OPEN_OK, after FIN, or beyond the window we granted. */
        s->c.protocol_errors++;
        broker_send(s, f->worker, TUNIO_CMD_RST, f->id, EPROTO, NULL, 0);
        relay_abort(s, f, EPROTO);
        return;
    }
    struct chunk *c = malloc(sizeof(*c));
    if (!c) {
        broker_send(s, f->worker, TUNIO_CMD_RST, f->id, ENOMEM, NULL, 0);
        relay_abort(s, f, ENOMEM);
        return;
    }
    zmq_msg_init(&c->msg);
    zmq_msg_move(&c->msg, payload);
    c->off = 0;
    c->next = NULL;
    if (f->tail)
        f->tail->next = c;
    else
        f->head = c;
    f->tail = c;
    f->queued += len;
    s->c.bytes_from_workers += len;
    relay_pump(s, f);
}

static void on_open_ok(struct tunio_stack *s, struct flow *f, uint64_t window)
{
    if (f->flags & FLOW_OPEN_OK) {
        s->c.protocol_errors++;
        return;
    }
    uint8_t syn[TUNIO_TUN_BUF];
    size_t n;
    if (tunio_nat_release(stack_nat(s, f->version), f->entry, f->id, tunio_now_ms(), syn,
                          sizeof(syn), &n) < 0) {
        /* The app gave up meanwhile (the held SYN expired). */
        broker_send(s, f->worker, TUNIO_CMD_RST, f->id, ETIMEDOUT, NULL, 0);
        end_flow(s, f);
        return;
    }
    f->flags |= FLOW_OPEN_OK;
    f->credit = window;
    f->since_ms = tunio_now_ms();
    stack_tun_write(s, -1, syn, n);
}

static void on_open_fail(struct tunio_stack *s, struct flow *f, int err)
{
    if (f->flags & FLOW_OPEN_OK) {
        s->c.protocol_errors++; /* a dial cannot fail after it succeeded */
        relay_abort(s, f, err);
        return;
    }
    s->c.dial_failed++;
    stack_reject(s, -1, f->version, f->entry, f->id, err);
    stack_flow_free(s, f);
}

void relay_on_message(struct tunio_stack *s, int worker, const struct tunio_wire_header *h,
                      zmq_msg_t *payload)
{
    struct flow *f = stack_flow_find(s, h->flow);
    if (!f || f->worker != worker) {
        /* Late messages for a flow that is gone are normal; DATA gets a RST so the worker
         * stops sending. */
        if (h->cmd == TUNIO_CMD_DATA)
            broker_send(s, worker, TUNIO_CMD_RST, h->flow, ENOTCONN, NULL, 0);
        return;
    }
    switch (h->cmd) {
    case TUNIO_CMD_OPEN_OK:
        on_open_ok(s, f, h->arg);
        break;
    case TUNIO_CMD_OPEN_FAIL:
        on_open_fail(s, f, h->arg > 4095 ? ECONNREFUSED : (int)h->arg);
        break;
    case TUNIO_CMD_DATA:
        f->credit += h->arg; /* credit the worker carried along: see credit_due */
        on_data(s, f, payload);
        break;
    case TUNIO_CMD_CREDIT:
        f->credit += h->arg;
        relay_pump(s, f);
        break;
    case TUNIO_CMD_FIN:
        f->flags |= FLOW_WORKER_FIN;
        relay_pump(s, f);
        break;
    case TUNIO_CMD_RST:
        relay_abort(s, f, (int)h->arg);
        break;
    default:
        s->c.protocol_errors++;
        break;
    }
}

void relay_tick(struct tunio_stack *s, uint64_t now)
{
    uint32_t expired[1024];
    for (int v = 0; v < 2; v++) {
        if (!s->fam[v].ready)
            continue;
        size_t n = tunio_nat_sweep(&s->fam[v].nat, now, expired, TUNIO_ARRAY_LEN(expired));
        for (size_t i = 0; i < n; i++) {
            /* The worker never answered: the app sees a silent timeout, the worker a RST. */
            struct flow *f = stack_flow_find(s, expired[i]);
            if (f) {
                broker_send(s, f->worker, TUNIO_CMD_RST, f->id, ETIMEDOUT, NULL, 0);
                stack_flow_free(s, f);
            }
        }
    }
    for (uint32_t b = 0; b <= s->flow_mask; b++) {
        struct flow *f = s->flow_buckets[b];
        while (f) {
            struct flow *next = f->hnext;
            if ((f->flags & FLOW_OPEN_OK) && f->fd < 0 && now - f->since_ms > ACCEPT_TIMEOUT_MS) {
                broker_send(s, f->worker, TUNIO_CMD_RST, f->id, ETIMEDOUT, NULL, 0);
                relay_abort(s, f, ETIMEDOUT);
            }
            f = next;
        }
    }
}
