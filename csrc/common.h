/* Shared helpers of the C stack: time, logging, error conventions.
 * Every function that can fail returns 0 (or a count) on success and -errno on failure. */
#ifndef TUNIO_COMMON_H
#define TUNIO_COMMON_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <stddef.h>
#include <stdint.h>

enum {
    TUNIO_LOG_DEBUG = 10,
    TUNIO_LOG_INFO = 20,
    TUNIO_LOG_WARNING = 30,
    TUNIO_LOG_ERROR = 40,
};

/* Milliseconds on the monotonic clock. */
uint64_t tunio_now_ms(void);

/* Writes one line to stderr in the same shape as the Python side's logging format (text, or JSON
 * after tunio_log_set_json(1)), as a single write() so lines from several threads and processes
 * never interleave. */
void tunio_log(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void tunio_log_set_level(int level);
void tunio_log_set_json(int on);
int tunio_log_enabled(int level);

/* A warning a peer can cause as often as it likes (a refused key, a malformed message): the first
 * is written at once, those of the next TUNIO_LOG_REPEAT_MS only counted, and the count written by
 * the first tick after that, so a peer that retries ten times a second costs the log a line a
 * period, and no event goes unsaid. */
#define TUNIO_LOG_REPEAT_MS 10000u
struct tunio_log_repeat {
    uint64_t since_ms; /* when its last line was written */
    uint64_t held;     /* events since then, counted and not yet written */
    int started;
};
/* 1 if this event is to be written now; 0 if it is counted for tunio_log_repeat_due. */
int tunio_log_repeat_now(struct tunio_log_repeat *r, uint64_t now);
/* For a tick: the events counted, once the period since the last line is over (a new one starts);
 * else 0. */
uint64_t tunio_log_repeat_due(struct tunio_log_repeat *r, uint64_t now);

#define TUNIO_ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

#endif
