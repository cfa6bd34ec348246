/* Logging for the C stack: same line format as tunio/logs.py so one log reads as one program. */
#include "common.h"

#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static atomic_int log_level = TUNIO_LOG_INFO;

uint64_t tunio_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

void tunio_log_set_level(int level)
{
    atomic_store(&log_level, level);
}

int tunio_log_enabled(int level)
{
    return level >= atomic_load(&log_level);
}

static const char *level_name(int level)
{
    if (level >= TUNIO_LOG_ERROR)
        return "ERROR";
    if (level >= TUNIO_LOG_WARNING)
        return "WARNING";
    if (level >= TUNIO_LOG_INFO)
        return "INFO";
    return "DEBUG";
}

void tunio_log(int level, const char *fmt, ...)
{
    if (!tunio_log_enabled(level))
        return;
    char line[1024];
    struct timeval tv;
    struct tm tm;
    gettimeofday(&tv, NULL);
    localtime_r(&tv.tv_sec, &tm);
    int n = (int)strftime(line, sizeof(line), "%Y-%m-%d %H:%M:%S", &tm);
    n += snprintf(line + n, sizeof(line) - (size_t)n,
                  ",%03ld %s tunio-stack: ", (long)(tv.tv_usec / 1000), level_name(level));
    va_list ap;
    va_start(ap, fmt);
    int m = vsnprintf(line + n, sizeof(line) - (size_t)n - 1, fmt, ap);
    va_end(ap);
    if (m < 0)
        return;
    n += m;
    if (n > (int)sizeof(line) - 2)
        n = (int)sizeof(line) - 2;
    line[n++] = '\n';
    ssize_t w = write(STDERR_FILENO, line, (size_t)n);
    (void)w; /* nothing sensible to do when stderr is gone */
}
