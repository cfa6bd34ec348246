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

#define TUNIO_ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

#endif
