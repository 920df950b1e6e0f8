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
 * machine), as GB/s, and by wall time. Usage: stream_read [MB=192] [reps=7] [L=512]. Owns its buffers;
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
    if (c->joint > 1) { /* J streams at a time, one row of each dotted together */
        size_t J = (size_t)c->joint;
        sub = (n + J - 1) / J;
        for (size_t i = 0; i < sub; i++) {
            const float *rows[3];
            size_t o[3], m = 0;
            for (size_t s = 0; s < J; s++)
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

/* Best GB/s of reps passes over bytes of w: by process CPU time into *cpu, by wall time returned. */
static double measure(float *y, const float *x, const float *w, size_t bytes, int L, const cfg *c, int reps,
                      double *cpu) {
    size_t rows = bytes / ((size_t)L * 4);
    double bc = 1e30, bw = 1e30;
    one_pass(y, x, w, rows, L, c); /* warm-up: TLB, and the resident part into L3 */
    for (int r = 0; r < reps; r++) {
        double w0 = clk(CLOCK_MONOTONIC), c0 = clk(CLOCK_PROCESS_CPUTIME_ID);
        one_pass(y, x, w, rows, L, c);
        double dc = clk(CLOCK_PROCESS_CPUTIME_ID) - c0, dw = clk(CLOCK_MONOTONIC) - w0;
        if (dc < bc) bc = dc;
        if (dw < bw) bw = dw;
    }
    *cpu = rows * (double)L * 4 / bc / 1e9;
    return rows * (double)L * 4 / bw / 1e9;
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

static void line(const char *label, float *y, const float *x, const float *w, size_t bytes, int L, cfg c, int reps) {
    double cpu, wall = measure(y, x, w, bytes, L, &c, reps, &cpu);
    printf("%-10s %5zu MB  streams %2d  joint %d  prefetch %-3s %5d B  aligned %d  resident %3zu MB   "
           "%6.2f GB/s cpu  %6.2f GB/s wall\n",
           label, bytes >> 20, c.streams, c.joint, pf_name(c.resident ? PF_NTA : c.pf), c.dist, c.aligned,
           c.resident >> 20, cpu, wall);
    fflush(stdout);
}

int main(int argc, char **argv) {
    size_t mb = argc > 1 ? (size_t)atol(argv[1]) : 192;
    int reps = argc > 2 ? atoi(argv[2]) : 7, L = argc > 3 ? atoi(argv[3]) : 512;
    if (mb < 4 || mb > 8192 || reps < 1 || L < 32 || L % 32) {
        fprintf(stderr, "usage: stream_read [MB in 4..8192] [reps >= 1] [L: a multiple of 32]\n");
        return 2;
    }
    size_t bytes = (mb + 1) / 2 * 2 << 20;
    char la0[64], la1[64];
    bench_loadavg(la0, sizeof la0);
    float *x = aligned_alloc(64, (size_t)L * 4), *y = malloc(bytes / ((size_t)L * 4) * 4 + 64);
    if (!x || !y) return 1;
    for (int k = 0; k < L; k++) x[k] = 1.0f / (k + 1);
    printf("stream_read: one thread, rows of %d floats, best of %d passes; load %s\n", L, reps, la0);
    for (int huge = 0; huge < 2; huge++) {
        void *base;
        size_t mapped;
        float *w = alloc_pages(bytes, huge, &base, &mapped);
        if (!w) {
            fprintf(stderr, "stream_read: cannot map %zu MB\n", mb);
            return 1;
        }
        const char *pg = huge ? "2MB" : "4KB";
        printf("%s pages: AnonHugePages %ld kB of %zu kB\n", pg, anon_huge_kb(w), bytes >> 10);
        int streams[] = {1, 2, 3, 4, 6, 8, 12};
        for (int i = 0; i < 7; i++) line(pg, y, x, w, bytes, L, (cfg){streams[i], 1, PF_NONE, 0, 0, 0}, reps);
        if (!huge) {
            munmap(base, mapped);
            continue;
        }
        line(pg, y, x, w, bytes, L, (cfg){4, 1, PF_NONE, 0, 1, 0}, reps);
        int dists[] = {256, 512, 1024, 2048, 4096};
        int ss[] = {1, 4};
        for (int si = 0; si < 2; si++)
            for (int k = PF_T0; k <= PF_NTA; k++)
                for (int i = 0; i < 5; i++)
                    line(pg, y, x, w, bytes, L, (cfg){ss[si], 1, k, dists[i], 0, 0}, reps);
        for (int J = 2; J <= 3; J++) {
            line(pg, y, x, w, bytes, L, (cfg){J, J, PF_NONE, 0, 0, 0}, reps);
            line(pg, y, x, w, bytes, L, (cfg){J, J, PF_T0, 1024, 0, 0}, reps);
        }
        size_t sizes[] = {8, 16, 24, 32, 64, 512};
        for (int i = 0; i < 6; i++)
            if ((sizes[i] << 20) <= bytes) line("size", y, x, w, sizes[i] << 20, L, (cfg){4, 1, PF_NONE, 0, 0, 0}, reps);
        size_t res[] = {8, 16, 24};
        for (int i = 0; i < 3; i++)
            for (int d = 512; d <= 2048; d *= 4)
                line("resident", y, x, w, bytes, L, (cfg){4, 1, PF_NTA, d, 0, res[i] << 20}, reps);
        line("nta-all", y, x, w, bytes, L, (cfg){4, 1, PF_NTA, 1024, 0, 0}, reps);
        munmap(base, mapped);
    }
    bench_loadavg(la1, sizeof la1);
    printf("load %s -> %s\n", la0, la1);
    free(x);
    free(y);
    return 0;
}
#endif
