/* error.c — thread-local last-error message (see error.h). */
#include "common/error.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static _Thread_local char st_errbuf[1024];

int st_fail(int code, const char *fmt, ...) {
    /* format into a copy: the arguments may include st_error() itself */
    char tmp[sizeof st_errbuf];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    memcpy(st_errbuf, tmp, sizeof tmp);
    return code;
}

int st_fail_context(int code, const char *fmt, ...) {
    char prefix[512], old[sizeof st_errbuf];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    memcpy(old, st_errbuf, sizeof old);
    size_t n = strlen(prefix);
    if (n > sizeof st_errbuf - 3) n = sizeof st_errbuf - 3;
    memcpy(st_errbuf, prefix, n);
    memcpy(st_errbuf + n, ": ", 2);
    size_t rest = sizeof st_errbuf - n - 3;
    size_t m = strnlen(old, rest);
    memcpy(st_errbuf + n + 2, old, m);
    st_errbuf[n + 2 + m] = 0;
    return code;
}

const char *st_error(void) { return st_errbuf; }
