/* Logging for the C stack, in the two shapes of tunio/logs.py so one log reads as one program:
 * text lines (the default), or one JSON object a line (--log-format json) with the same keys in
 * the same order: time (RFC 3339, UTC, ms, Z), level, process, pid, logger, message. */
#include "common.h"

#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define LINE_MAX_BYTES 1024
#define JSON_PROCESS "tunio-stack"
#define JSON_LOGGER "tunio.stack"

static atomic_int log_level = TUNIO_LOG_INFO;
static atomic_int log_json = 0;

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

void tunio_log_set_json(int on)
{
    atomic_store(&log_json, on != 0);
}

int tunio_log_enabled(int level)
{
    return level >= atomic_load(&log_level);
}

int tunio_log_repeat_now(struct tunio_log_repeat *r, uint64_t now)
{
    /* Events still counted are the tick's to write first, so their line keeps its count. */
    if (r->held == 0 && (!r->started || now - r->since_ms >= TUNIO_LOG_REPEAT_MS)) {
        r->started = 1;
        r->since_ms = now;
        return 1;
    }
    r->held++;
    return 0;
}

uint64_t tunio_log_repeat_due(struct tunio_log_repeat *r, uint64_t now)
{
    if (r->held == 0 || now - r->since_ms < TUNIO_LOG_REPEAT_MS)
        return 0;
    uint64_t n = r->held;
    r->held = 0;
    r->since_ms = now;
    return n;
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

/* The length of the valid UTF-8 sequence at s (n bytes left), or 0 if there is none. */
static size_t utf8_len(const unsigned char *s, size_t n)
{
    size_t len;
    unsigned min;
    if (s[0] < 0x80)
        return 1;
    if (s[0] >= 0xc2 && s[0] <= 0xdf) {
        len = 2;
        min = 0x80;
    } else if (s[0] >= 0xe0 && s[0] <= 0xef) {
        len = 3;
        min = 0x800;
    } else if (s[0] >= 0xf0 && s[0] <= 0xf4) {
        len = 4;
        min = 0x10000;
    } else {
        return 0;
    }
    if (n < len)
        return 0;
    unsigned cp = s[0] & (0x7f >> len);
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xc0) != 0x80)
            return 0;
        cp = cp << 6 | (s[i] & 0x3f);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
        return 0;
    return len;
}

/* Appends `s` as the body of a JSON string (no quotes) to out[*n..cap), as Python's json.dumps
 * with ensure_ascii=False writes it; a byte that is not UTF-8 becomes U+FFFD. Stops short rather
 * than cut an escape in two. */
static void json_escape(char *out, size_t *n, size_t cap, const char *s, size_t len)
{
    const unsigned char *u = (const unsigned char *)s;
    for (size_t i = 0; i < len;) {
        char esc[8];
        const char *piece = esc;
        size_t plen;
        size_t adv = 1;
        unsigned char c = u[i];
        if (c == '"' || c == '\\') {
            esc[0] = '\\';
            esc[1] = (char)c;
            plen = 2;
        } else if (c < 0x20) {
            const char *named = c == '\n'   ? "\\n"
                                : c == '\r' ? "\\r"
                                : c == '\t' ? "\\t"
                                : c == '\b' ? "\\b"
                                : c == '\f' ? "\\f"
                                            : NULL;
            if (named) {
                piece = named;
                plen = 2;
            } else {
                plen = (size_t)snprintf(esc, sizeof(esc), "\\u%04x", c);
            }
        } else if (c < 0x80) {
            piece = (const char *)&u[i];
            plen = 1;
        } else if ((adv = utf8_len(&u[i], len - i)) > 0) {
            piece = (const char *)&u[i];
            plen = adv;
        } else {
            piece = "\xef\xbf\xbd"; /* U+FFFD */
            plen = 3;
            adv = 1;
        }
        if (*n + plen > cap)
            return;
        memcpy(out + *n, piece, plen);
        *n += plen;
        i += adv;
    }
}

static void emit(const char *line, size_t n)
{
    ssize_t w = write(STDERR_FILENO, line, n);
    (void)w; /* nothing sensible to do when stderr is gone */
}

void tunio_log(int level, const char *fmt, ...)
{
    if (!tunio_log_enabled(level))
        return;
    char msg[LINE_MAX_BYTES];
    va_list ap;
    va_start(ap, fmt);
    int m = vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (m < 0)
        return;
    size_t mlen = (size_t)m < sizeof(msg) ? (size_t)m : sizeof(msg) - 1;
    struct timeval tv;
    struct tm tm;
    gettimeofday(&tv, NULL);
    /* A line is written with one write(), so lines from several threads and processes never
     * interleave. */
    char line[2 * LINE_MAX_BYTES + 256];
    size_t n;
    if (atomic_load(&log_json)) {
        gmtime_r(&tv.tv_sec, &tm);
        char stamp[32];
        strftime(stamp, sizeof(stamp), "%Y-%m-%dT%H:%M:%S", &tm);
        const char *lv = level_name(level);
        char lower[8] = "";
        for (size_t i = 0; lv[i] && i < sizeof(lower) - 1; i++)
            lower[i] = (char)(lv[i] + ('a' - 'A'));
        n = (size_t)snprintf(
            line, sizeof(line),
            "{\"time\": \"%s.%03ldZ\", \"level\": \"%s\", \"process\": \"" JSON_PROCESS
            "\", \"pid\": %ld, \"logger\": \"" JSON_LOGGER "\", \"message\": \"",
            stamp, (long)(tv.tv_usec / 1000), lower, (long)getpid());
        json_escape(line, &n, sizeof(line) - 3, msg, mlen);
        memcpy(line + n, "\"}\n", 3);
        n += 3;
    } else {
        localtime_r(&tv.tv_sec, &tm);
        n = strftime(line, sizeof(line), "%Y-%m-%d %H:%M:%S", &tm);
        n += (size_t)snprintf(line + n, sizeof(line) - n,
                              ",%03ld %s tunio-stack: ", (long)(tv.tv_usec / 1000),
                              level_name(level));
        memcpy(line + n, msg, mlen);
        n += mlen;
        line[n++] = '\n';
    }
    emit(line, n);
}
