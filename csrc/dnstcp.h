/* DNS over TCP to the stack's DNS address (fake-IP mode): the framing of both byte streams of
 * such a connection (RFC 1035 §4.2.2: each message behind its 2-byte length) and what becomes of
 * the app's messages. Each whole query of the app's stream is given to tunio_dns_message, as a
 * datagram would be: its answer (A/AAAA from the fake-IP map, FORMERR, ...) is framed into the
 * answers for the app, a query for the upstream is framed into the queries for it. The
 * upstream's stream is only followed, so that an answer made here goes to the app between two of
 * the upstream's messages, never inside one. Pipelined queries (RFC 7766) are answered each
 * alone, matched by their ids; the order of the answers may differ from the queries'.
 *
 * Bytes in, bytes out, no I/O (fuzzed: fuzz/fuzz_dnstcp.c); flows.c reads and writes the socket
 * and talks to the worker. Loop thread only. */
#ifndef TUNIO_DNSTCP_H
#define TUNIO_DNSTCP_H

#include <stddef.h>
#include <stdint.h>

struct tunio_dns;
struct tunio_dnstcp;

#define TUNIO_DNSTCP_MESSAGE_MAX 65535u /* a message's length, its prefix not counted */

int tunio_dnstcp_new(struct tunio_dns *dns, struct tunio_dnstcp **out);
void tunio_dnstcp_free(struct tunio_dnstcp *t); /* NULL is fine */

/* Bytes of the app's stream, in order. Every message they complete is served: answered
 * (tunio_dnstcp_answers) or framed for the upstream (tunio_dnstcp_queries); the start of a message
 * is kept (at most one message's bytes) until the rest comes. 0, -ENOMEM, or -EBADMSG: the
 * stream cannot go on (a length of 0, a message too short for a header, a response), counted as
 * malformed, the connection to be reset. */
int tunio_dnstcp_from_app(struct tunio_dnstcp *t, const uint8_t *p, size_t n, uint64_t now);
/* The app's stream ended: a message left incomplete is counted as malformed (1; else 0). */
int tunio_dnstcp_app_end(struct tunio_dnstcp *t);

/* Bytes of the upstream's stream, in order: the offset just past the first message they end
 * (1..n), or 0 if they end none. */
size_t tunio_dnstcp_from_upstream(struct tunio_dnstcp *t, const uint8_t *p, size_t n);
/* Whether the upstream's bytes so far are whole messages (an answer may go to the app now). */
int tunio_dnstcp_upstream_whole(const struct tunio_dnstcp *t);
/* Queries framed for the upstream that it has not answered yet (its messages counted). */
size_t tunio_dnstcp_awaiting(const struct tunio_dnstcp *t);
/* The upstream is gone (it closed its side): a query for it is answered SERVFAIL from now on. */
void tunio_dnstcp_no_upstream(struct tunio_dnstcp *t);
/* The upstream could not be dialled: every query framed for it and not taken is answered SERVFAIL
 * instead (its id, its question), framed into the answers in the order the app sent them, and
 * every later query for it too; none waits for the upstream any more. 0, -ENOMEM (the stream
 * cannot go on), or -EALREADY if query bytes were taken already (they reached an upstream, which
 * so was dialled: nothing is changed). */
int tunio_dnstcp_upstream_failed(struct tunio_dnstcp *t);

/* The framed answers for the app, and the framed queries for the upstream, not yet taken: always
 * whole messages, in the order they were made. */
const uint8_t *tunio_dnstcp_answers(const struct tunio_dnstcp *t, size_t *len);
void tunio_dnstcp_take_answers(struct tunio_dnstcp *t, size_t n);
const uint8_t *tunio_dnstcp_queries(const struct tunio_dnstcp *t, size_t *len);
void tunio_dnstcp_take_queries(struct tunio_dnstcp *t, size_t n);

#endif
