/* The log's repeat limit (tests/unit/test_c_programs.py builds and runs this): the first of a
 * burst of events is written at once, the rest of the period only counted, and the tick after
 * the period writes their count, once; a quiet period lets the next event through at once again.
 * Exit 0 when every check holds; each failure names itself on stderr. */
#include <stdio.h>

#include "../../../csrc/common.h"

#define P TUNIO_LOG_REPEAT_MS

static int failures;

static void check(int ok, const char *what)
{
    if (!ok) {
        fprintf(stderr, "FAIL: %s\n", what);
        failures++;
    }
}

int main(void)
{
    struct tunio_log_repeat r = {0};
    uint64_t t = 5; /* a clock near its start: the first event must not wait a period */
    check(tunio_log_repeat_now(&r, t) == 1, "the first event is written at once");
    check(tunio_log_repeat_due(&r, t + 1) == 0, "nothing is due right after a written line");
    int written = 0;
    for (int i = 1; i <= 100; i++) /* ten a second for ten seconds, less the last tenth */
        written += tunio_log_repeat_now(&r, t + (uint64_t)i * (P / 101));
    check(written == 0, "events within the period are only counted");
    check(tunio_log_repeat_due(&r, t + P - 1) == 0, "the count waits for the period's end");
    check(tunio_log_repeat_due(&r, t + P) == 100, "the tick after the period writes all 100");
    check(tunio_log_repeat_due(&r, t + P + 250) == 0, "a count is written once");
    /* Events go on: the next period counts them, even those past its end before a tick. */
    t += P;
    check(tunio_log_repeat_now(&r, t + 1) == 0, "right after a count's line, events are counted");
    check(tunio_log_repeat_now(&r, t + P + 5) == 0, "a count not yet written keeps the next event");
    check(tunio_log_repeat_due(&r, t + P + 6) == 2, "and that one is in the count");
    /* A quiet period: the next event is news and is written at once. */
    t += P + 6;
    check(tunio_log_repeat_due(&r, t + P) == 0, "a quiet period writes nothing");
    check(tunio_log_repeat_now(&r, t + P) == 1, "after a quiet period an event is written at once");
    return failures ? 1 : 0;
}
