/* bench_io.h — what the I/O benchmarks (ckpt_bench.c, gguf_bench.c) share: the raw disk write they compare
 * against, the median of repeated timings, and the load average they print. Header-only (each bench is
 * one file); returns times in seconds. */
#ifndef ST_BENCH_IO_H
#define ST_BENCH_IO_H

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/util.h"

/* Seconds to write BYTES to DIR/raw.bench in 1 MiB writes and fsync it (the file is removed after). */
static inline double bench_raw_write(const char *dir, size_t bytes) {
    char path[1200];
    snprintf(path, sizeof path, "%s/raw.bench", dir);
    char *buf = malloc(1 << 20);
    if (!buf) return 0;
    memset(buf, 0x5a, 1 << 20);
    double t0 = st_now();
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    for (size_t done = 0; fd >= 0 && done < bytes; done += 1 << 20)
        if (write(fd, buf, 1 << 20) < 0) break;
    if (fd >= 0) {
        fsync(fd);
        close(fd);
    }
    double t = st_now() - t0;
    unlink(path);
    free(buf);
    return t;
}

static inline int bench_by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* The median of v[0..n) (sorts v). */
static inline double bench_median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, bench_by_value);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* The 1/5/15-minute load averages from /proc/loadavg, as text ("" when unreadable). */
static inline void bench_loadavg(char *out, size_t n) {
    FILE *f = fopen("/proc/loadavg", "r");
    out[0] = 0;
    if (f) {
        if (!fgets(out, (int)n, f)) out[0] = 0;
        fclose(f);
    }
    char *sp = out;
    for (int k = 0; k < 3 && sp; k++) sp = strchr(sp + 1, ' ');
    if (sp) *sp = 0;
}

#endif
