/* stream_read.c — how fast one core reads a large fp32 array the way decode_mm does (generation at batch 1
 * streams every weight once per token, so this rate is its ceiling; kernels/cpu/cpu_decode.c). The array
 * is read as rows of L floats (default 512), each row one dot product with an x[L] held in L1 (4 AVX2
 * accumulators, as decode_mm), over S interleaved streams (row i of each of S equal parts in turn). Lines
 * vary one thing at a time: S; 4 KB vs 2 MB pages (MADV_NOHUGEPAGE / MADV_HUGEPAGE, with the buffer's
 * AnonHugePages from /proc/self/smaps); software prefetch (prefetcht0 / prefetchnta D bytes ahead in each
 * stream); J rows of J streams dotted together (one pass over x for J rows); aligned loads; the array size
 * (a repeated pass over less than the 32 MB L3 hits in it); and a part of R MB read with plain loads while
 * the rest is read with prefetchnta, to see whether that part then stays in L3 between passes. Each line:
 * the best of REPS passes by process CPU time (one thread, so the time it actually ran on a shared
 * machine), as GB/s, and by wall time. Usage: stream_read [MB=192] [reps=7] [L=512] [focus] (focus: only the
 * candidates against decode_mm's order, for more rounds). Owns its buffers;
 * prints the load average before and after. Numbers only, no assertions. */
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include "bench_io.h"

#if !defined(__AVX2__) || !defined(__FMA__)
int main(void) {
    fprintf(stderr, "stream_read: built without AVX2 + FMA\n");
    return 1;
}
#else

enum { PF_NONE, PF_T0, PF_NTA };

typedef struct {
    int streams, joint, pf, dist, aligned;
    size_t resident; /* bytes at the start of each pass read with plain loads (the rest with prefetchnta) */
} cfg;

static double clk(clockid_t id) {
    struct timespec ts;
    clock_gettime(id, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static inline void pf(const float *p, int kind) {
    if (kind == PF_T0) _mm_prefetch((const char *)p, _MM_HINT_T0);
    else if (kind == PF_NTA) _mm_prefetch((const char *)p, _MM_HINT_NTA);
}

static inline float hsum(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* One row: decode_mm's dot product (L a multiple of 32), prefetching d floats ahead when kind != PF_NONE. */
static inline float dot_row(const float *x, const float *w, int L, int kind, int d, int aligned) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int k = 0; k < L; k += 32) {
        if (kind != PF_NONE) {
            pf(w + k + d, kind);
            pf(w + k + d + 16, kind);
        }
        __m256 w0, w1, w2, w3;
        if (aligned) {
            w0 = _mm256_load_ps(w + k), w1 = _mm256_load_ps(w + k + 8);
            w2 = _mm256_load_ps(w + k + 16), w3 = _mm256_load_ps(w + k + 24);
        } else {
            w0 = _mm256_loadu_ps(w + k), w1 = _mm256_loadu_ps(w + k + 8);
            w2 = _mm256_loadu_ps(w + k + 16), w3 = _mm256_loadu_ps(w + k + 24);
        }
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), w0, a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8), w1, a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 16), w2, a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 24), w3, a3);
    }
    return hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
}

/* J rows (J = 2 or 3) dotted together: each row's own 4 accumulators in the same order as dot_row. */
static inline void dot_rows(float *y, const float *x, const float *const *w, int J, int L, int kind, int d) {
    __m256 a[3][4];
    for (int j = 0; j < 3; j++)
        for (int c = 0; c < 4; c++) a[j][c] = _mm256_setzero_ps();
    for (int k = 0; k < L; k += 32) {
        for (int j = 0; j < J; j++)
            if (kind != PF_NONE) {
                pf(w[j] + k + d, kind);
                pf(w[j] + k + d + 16, kind);
            }
        for (int c = 0; c < 4; c++) {
            __m256 xv = _mm256_loadu_ps(x + k + 8 * c);
            for (int j = 0; j < J; j++) a[j][c] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w[j] + k + 8 * c), a[j][c]);
        }
    }
    for (int j = 0; j < J; j++) y[j] = hsum(_mm256_add_ps(_mm256_add_ps(a[j][0], a[j][1]), _mm256_add_ps(a[j][2], a[j][3])));
}

/* One pass over rows [r0, r1) of w as c->streams streams; y gets one output per row. */
static void pass_range(float *y, const float *x, const float *w, size_t r0, size_t r1, int L, const cfg *c,
                       int kind) {
    size_t n = r1 - r0, S = (size_t)c->streams, sub = (n + S - 1) / S;
    int d = c->dist / 4;
    if (c->joint > 1) { /* S streams in groups of J (J divides S), one row of each of a group dotted together */
        size_t J = (size_t)c->joint;
        for (size_t i = 0; i < sub; i++)
            for (size_t g = 0; g < S; g += J) {
                const float *rows[3];
                size_t o[3], m = 0;
                for (size_t s = g; s < g + J; s++)
                    if (s * sub + i < n) o[m] = r0 + s * sub + i, rows[m] = w + o[m] * L, m++;
                float out[3];
                if (m == J) {
                    dot_rows(out, x, rows, (int)J, L, kind, d);
                    for (size_t s = 0; s < m; s++) y[o[s]] = out[s];
                } else
                    for (size_t s = 0; s < m; s++) y[o[s]] = dot_row(x, rows[s], L, kind, d, 0);
            }
        return;
    }
    for (size_t i = 0; i < sub; i++)
        for (size_t s = 0; s < S; s++) {
            size_t o = s * sub + i;
            if (o < n) y[r0 + o] = dot_row(x, w + (r0 + o) * L, L, kind, d, c->aligned);
        }
}

static void one_pass(float *y, const float *x, const float *w, size_t rows, int L, const cfg *c) {
    size_t rr = c->resident / ((size_t)L * 4);
    if (rr > rows) rr = rows;
    if (c->resident) {
        cfg plain = *c;
        plain.pf = PF_NONE;
        pass_range(y, x, w, 0, rr, L, &plain, PF_NONE);
        pass_range(y, x, w, rr, rows, L, c, PF_NTA);
    } else
        pass_range(y, x, w, 0, rows, L, c, c->pf);
}

/* Seconds of one pass over bytes of w: by process CPU time into *cpu, by wall time returned. */
static double timed_pass(float *y, const float *x, const float *w, size_t bytes, int L, const cfg *c, double *cpu) {
    size_t rows = bytes / ((size_t)L * 4);
    double w0 = clk(CLOCK_MONOTONIC), c0 = clk(CLOCK_PROCESS_CPUTIME_ID);
    one_pass(y, x, w, rows, L, c);
    *cpu = clk(CLOCK_PROCESS_CPUTIME_ID) - c0;
    return clk(CLOCK_MONOTONIC) - w0;
}

/* kB of AnonHugePages in the mapping that holds p (-1 when unknown). */
static long anon_huge_kb(const void *p) {
    FILE *f = fopen("/proc/self/smaps", "r");
    if (!f) return -1;
    char line[512];
    int inside = 0;
    long kb = -1;
    while (fgets(line, sizeof line, f)) {
        unsigned long lo, hi;
        if (sscanf(line, "%lx-%lx ", &lo, &hi) == 2 && strchr(line, '-') < strchr(line, ' '))
            inside = (uintptr_t)p >= lo && (uintptr_t)p < hi;
        else if (inside && sscanf(line, "AnonHugePages: %ld kB", &kb) == 1)
            break;
    }
    fclose(f);
    return kb;
}

/* bytes (a multiple of 2 MB) at a 2 MB boundary, advised huge or not, written once. */
static float *alloc_pages(size_t bytes, int huge, void **base, size_t *mapped) {
    size_t two = (size_t)2 << 20;
    *mapped = bytes + two;
    char *m = mmap(NULL, *mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) return NULL;
    *base = m;
    float *p = (float *)(((uintptr_t)m + two - 1) & ~(uintptr_t)(two - 1));
    madvise(p, bytes, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
    for (size_t i = 0; i < bytes / 4; i++) p[i] = (float)((i * 7) % 13) * 0.01f;
    return p;
}

static const char *pf_name(int k) { return k == PF_T0 ? "t0" : k == PF_NTA ? "nta" : "-"; }

/* One line of the table: a configuration, the buffer (4 KB or 2 MB pages) and how much of it to read. */
typedef struct {
    const char *label;
    int huge;
    size_t mb;
    cfg c;
    double cpu, wall; /* best seconds */
} row;

#define MAX_ROWS 96

/* The table: streams on both page sizes, then on 2 MB pages aligned loads, software prefetch, joint rows,
 * smaller arrays (L3), a resident part. */
static int make_rows(row *t, size_t mb, int focus) {
    int n = 0;
    if (focus) { /* the candidates against decode_mm's own order (4 streams, no prefetch), more rounds */
        t[n++] = (row){"2MB", 1, mb, {1, 1, PF_NONE, 0, 0, 0}, 0, 0};
        t[n++] = (row){"2MB", 1, mb, {4, 1, PF_NONE, 0, 0, 0}, 0, 0};
        int d[] = {128, 256, 384};
        for (int i = 0; i < 3; i++) t[n++] = (row){"2MB", 1, mb, {4, 1, PF_T0, d[i], 0, 0}, 0, 0};
        for (int i = 0; i < 3; i++) t[n++] = (row){"2MB", 1, mb, {4, 1, PF_NTA, d[i], 0, 0}, 0, 0};
        t[n++] = (row){"2MB", 1, mb, {2, 2, PF_NONE, 0, 0, 0}, 0, 0};
        t[n++] = (row){"2MB", 1, mb, {3, 3, PF_NONE, 0, 0, 0}, 0, 0};
        t[n++] = (row){"2MB", 1, mb, {4, 2, PF_NONE, 0, 0, 0}, 0, 0};
        t[n++] = (row){"2MB", 1, mb, {6, 3, PF_NONE, 0, 0, 0}, 0, 0};
        t[n++] = (row){"2MB", 1, mb, {4, 2, PF_NTA, 256, 0, 0}, 0, 0};
        t[n++] = (row){"2MB", 1, mb, {3, 3, PF_NTA, 256, 0, 0}, 0, 0};
        return n;
    }
    int streams[] = {1, 2, 3, 4, 6, 8, 12};
    for (int huge = 0; huge < 2; huge++)
        for (int i = 0; i < 7; i++) t[n++] = (row){huge ? "2MB" : "4KB", huge, mb, {streams[i], 1, PF_NONE, 0, 0, 0}, 0, 0};
    t[n++] = (row){"2MB", 1, mb, {4, 1, PF_NONE, 0, 1, 0}, 0, 0};
    int dists[] = {256, 512, 1024, 2048, 4096}, ss[] = {1, 4, 8};
    for (int si = 0; si < 3; si++)
        for (int k = PF_T0; k <= PF_NTA; k++)
            for (int i = 0; i < 5; i++) t[n++] = (row){"2MB", 1, mb, {ss[si], 1, k, dists[i], 0, 0}, 0, 0};
    for (int J = 2; J <= 3; J++) {
        t[n++] = (row){"2MB", 1, mb, {J, J, PF_NONE, 0, 0, 0}, 0, 0};
        t[n++] = (row){"2MB", 1, mb, {J, J, PF_T0, 1024, 0, 0}, 0, 0};
    }
    size_t sizes[] = {8, 16, 24, 32, 64};
    for (int i = 0; i < 5; i++)
        if (sizes[i] <= mb) t[n++] = (row){"size", 1, sizes[i], {4, 1, PF_NONE, 0, 0, 0}, 0, 0};
    size_t res[] = {8, 16, 24};
    for (int i = 0; i < 3; i++) t[n++] = (row){"resident", 1, mb, {4, 1, PF_NTA, 1024, 0, res[i] << 20}, 0, 0};
    return n;
}

int main(int argc, char **argv) {
    size_t mb = argc > 1 ? (size_t)atol(argv[1]) : 192;
    int reps = argc > 2 ? atoi(argv[2]) : 7, L = argc > 3 ? atoi(argv[3]) : 512, focus = argc > 4 && !strcmp(argv[4], "focus");
    if (mb < 4 || mb > 8192 || reps < 1 || L < 32 || L % 32) {
        fprintf(stderr, "usage: stream_read [MB in 4..8192] [reps >= 1] [L: a multiple of 32] [focus]\n");
        return 2;
    }
    mb = (mb + 1) / 2 * 2;
    size_t bytes = mb << 20;
    char la0[64], la1[64];
    bench_loadavg(la0, sizeof la0);
    float *x = aligned_alloc(64, (size_t)L * 4), *y = malloc(bytes / ((size_t)L * 4) * 4 + 64);
    void *base[2];
    size_t mapped[2];
    float *w[2];
    for (int h = 0; h < 2; h++)
        if (!(w[h] = alloc_pages(bytes, h, &base[h], &mapped[h]))) {
            fprintf(stderr, "stream_read: cannot map %zu MB\n", mb);
            return 1;
        }
    if (!x || !y) return 1;
    for (int k = 0; k < L; k++) x[k] = 1.0f / (k + 1);
    static row t[MAX_ROWS];
    int n = make_rows(t, mb, focus);
    for (int i = 0; i < n; i++) t[i].cpu = t[i].wall = 1e30;
    /* rounds: every line once per round, so a burst of load from other users hits all lines alike */
    for (int r = 0; r <= reps; r++)
        for (int i = 0; i < n; i++) {
            double cpu, wall;
            timed_pass(y, x, w[t[i].huge], t[i].mb << 20, L, &t[i].c, &cpu); /* warm: TLB, resident part */
            wall = timed_pass(y, x, w[t[i].huge], t[i].mb << 20, L, &t[i].c, &cpu);
            if (r > 0 && cpu < t[i].cpu) t[i].cpu = cpu;
            if (r > 0 && wall < t[i].wall) t[i].wall = wall;
        }
    bench_loadavg(la1, sizeof la1);
    printf("stream_read: one thread, rows of %d floats, best of %d rounds; AnonHugePages %ld kB (4 KB buffer), %ld "
           "kB (2 MB buffer) of %zu kB\n", L, reps, anon_huge_kb(w[0]), anon_huge_kb(w[1]), bytes >> 10);
    for (int i = 0; i < n; i++) {
        const cfg *c = &t[i].c;
        double b = (double)(t[i].mb << 20) / 1e9;
        printf("%-9s %4zu MB  streams %2d  joint %d  prefetch %-3s %4d B  aligned %d  resident %2zu MB  "
               "%6.2f GB/s cpu  %6.2f GB/s wall\n",
               t[i].label, t[i].mb, c->streams, c->joint, pf_name(c->resident ? PF_NTA : c->pf), c->dist, c->aligned,
               c->resident >> 20, b / t[i].cpu, b / t[i].wall);
    }
    printf("load %s -> %s\n", la0, la1);
    for (int h = 0; h < 2; h++) munmap(base[h], mapped[h]);
    free(x);
    free(y);
    return 0;
}
#endif
