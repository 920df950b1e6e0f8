/* error.c — thread-local last-error message (see error.h). */
#include "common/error.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static _Thread_local char st_errbuf[1024];

int st_fail(int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(st_errbuf, sizeof st_errbuf, fmt, ap);
    va_end(ap);
    return code;
}

int st_fail_context(int code, const char *fmt, ...) {
    char prefix[512], old[sizeof st_errbuf];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    memcpy(old, st_errbuf, sizeof old);
    snprintf(st_errbuf, sizeof st_errbuf, "%s: %s", prefix, old);
    return code;
}

const char *st_error(void) { return st_errbuf; }
