/* cpu_gemv.c — the decode-step matrix-vector product of generation (st_backend.gemv):
 * y[j] = dot(W[j, :], x) (+ y[j] when beta is 1) for one token row, W [n, k] row-major (HF layout).
 *
 * Decode at batch 1 streams every weight once per token, so it runs at memory speed; this kernel reads
 * four weight rows per pass against one load of x, prefetches ahead, and splits the rows over the
 * OpenMP team in blocks of 64 rows.
 * Every y[j] is the same bits whatever the instruction set and thread count: 16 lanes of separate
 * multiply and add (this file is compiled with -ffp-contract=off, so the portable body, st_cpu_dot,
 * does not fuse them either), the lanes summed in order, then the tail. The AVX-512 and AVX2 bodies are picked at run time
 * (__builtin_cpu_supports); the portable body is st_cpu_dot itself. st_cpu_gemv_use picks one by name
 * (tests compare them). */
#include "kernels/cpu/cpu_kernels.h"

#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define ST_GEMV_X86 1
#endif

/* Rows per parallel block, and the weight size (floats) from which the team helps: the training
 * matmul's threshold. 2^18 (every projection of a 512-wide model split over 2 threads) decoded 2-3x
 * slower on the shared 2-core machine at load average 11-14 (a barrier per GEMV waits for a descheduled
 * thread), so the split stays for the large ones (the LM head). */
#define GEMV_BLOCK 64
#define GEMV_PAR_MIN (1L << 21)

/* Lanes summed in order, as st_cpu_dot does. */
static inline float lane_sum(const float *acc) {
    float s = 0.0f;
    for (int l = 0; l < ST_LANES; l++) s += acc[l];
    return s;
}

static inline void put(float *y, float d, float beta) { *y = beta == 0.0f ? d : d + beta * *y; }

static void rows_portable(float *y, const float *x, const float *w, int j0, int j1, int k, float beta) {
    for (int j = j0; j < j1; j++) put(y + j, st_cpu_dot(w + (size_t)j * k, x, k), beta);
}

#ifdef ST_GEMV_X86
/* Tail elements past the last full 16 of row r, added after the lanes (st_cpu_dot's order). */
static inline float tail(const float *r, const float *x, int i, int k, float s) {
    for (; i < k; i++) s += r[i] * x[i];
    return s;
}

__attribute__((target("avx512f"))) static void rows_avx512(float *y, const float *x, const float *w, int j0,
                                                           int j1, int k, float beta) {
    int j = j0, k16 = k / 16 * 16;
    float acc[4][ST_LANES];
    for (; j + 4 <= j1; j += 4) {
        const float *r0 = w + (size_t)j * k, *r1 = r0 + k, *r2 = r1 + k, *r3 = r2 + k;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int i = 0; i < k16; i += 16) {
            _mm_prefetch((const char *)(r0 + i + 4 * (size_t)k), _MM_HINT_T0);
            _mm_prefetch((const char *)(r2 + i + 4 * (size_t)k), _MM_HINT_T0);
            __m512 xv = _mm512_loadu_ps(x + i);
            a0 = _mm512_add_ps(a0, _mm512_mul_ps(xv, _mm512_loadu_ps(r0 + i)));
            a1 = _mm512_add_ps(a1, _mm512_mul_ps(xv, _mm512_loadu_ps(r1 + i)));
            a2 = _mm512_add_ps(a2, _mm512_mul_ps(xv, _mm512_loadu_ps(r2 + i)));
            a3 = _mm512_add_ps(a3, _mm512_mul_ps(xv, _mm512_loadu_ps(r3 + i)));
        }
        _mm512_storeu_ps(acc[0], a0), _mm512_storeu_ps(acc[1], a1);
        _mm512_storeu_ps(acc[2], a2), _mm512_storeu_ps(acc[3], a3);
        put(y + j, tail(r0, x, k16, k, lane_sum(acc[0])), beta);
        put(y + j + 1, tail(r1, x, k16, k, lane_sum(acc[1])), beta);
        put(y + j + 2, tail(r2, x, k16, k, lane_sum(acc[2])), beta);
        put(y + j + 3, tail(r3, x, k16, k, lane_sum(acc[3])), beta);
    }
    rows_portable(y, x, w, j, j1, k, beta);
}

/* Two 8-float registers per row hold lanes 0-7 and 8-15. */
__attribute__((target("avx2"))) static void rows_avx2(float *y, const float *x, const float *w, int j0, int j1,
                                                      int k, float beta) {
    int j = j0, k16 = k / 16 * 16;
    float acc[2][ST_LANES];
    for (; j + 2 <= j1; j += 2) {
        const float *r0 = w + (size_t)j * k, *r1 = r0 + k;
        __m256 a0 = _mm256_setzero_ps(), b0 = a0, a1 = a0, b1 = a0;
        for (int i = 0; i < k16; i += 16) {
            _mm_prefetch((const char *)(r0 + i + 2 * (size_t)k), _MM_HINT_T0);
            _mm_prefetch((const char *)(r1 + i + 2 * (size_t)k), _MM_HINT_T0);
            __m256 xl = _mm256_loadu_ps(x + i), xh = _mm256_loadu_ps(x + i + 8);
            a0 = _mm256_add_ps(a0, _mm256_mul_ps(xl, _mm256_loadu_ps(r0 + i)));
            b0 = _mm256_add_ps(b0, _mm256_mul_ps(xh, _mm256_loadu_ps(r0 + i + 8)));
            a1 = _mm256_add_ps(a1, _mm256_mul_ps(xl, _mm256_loadu_ps(r1 + i)));
            b1 = _mm256_add_ps(b1, _mm256_mul_ps(xh, _mm256_loadu_ps(r1 + i + 8)));
        }
        _mm256_storeu_ps(acc[0], a0), _mm256_storeu_ps(acc[0] + 8, b0);
        _mm256_storeu_ps(acc[1], a1), _mm256_storeu_ps(acc[1] + 8, b1);
        put(y + j, tail(r0, x, k16, k, lane_sum(acc[0])), beta);
        put(y + j + 1, tail(r1, x, k16, k, lane_sum(acc[1])), beta);
    }
    rows_portable(y, x, w, j, j1, k, beta);
}
#endif

typedef void (*rows_fn)(float *, const float *, const float *, int, int, int, float);

typedef struct {
    const char *name;
    rows_fn f;
} body;

/* The body this CPU runs for isa ("avx512", "avx2", "portable"; NULL or "": the widest it has). */
static body pick_isa(const char *isa) {
    int any = !isa || !*isa;
#ifdef ST_GEMV_X86
    __builtin_cpu_init();
    if ((any || !strcmp(isa, "avx512")) && __builtin_cpu_supports("avx512f")) return (body){"avx512", rows_avx512};
    if ((any || !strcmp(isa, "avx2")) && __builtin_cpu_supports("avx2")) return (body){"avx2", rows_avx2};
#endif
    if (any || !strcmp(isa, "portable")) return (body){"portable", rows_portable};
    return (body){NULL, NULL};
}

static rows_fn g_body; /* set once before use, or by st_cpu_gemv_use between calls */

const char *st_cpu_gemv_use(const char *isa) {
    body b = pick_isa(isa);
    if (b.f) __atomic_store_n(&g_body, b.f, __ATOMIC_RELAXED);
    return b.name;
}

static rows_fn pick(void) {
    rows_fn f = __atomic_load_n(&g_body, __ATOMIC_RELAXED);
    if (!f) { /* SHARDTUNE_GEMV_ISA caps the body (benches); an ISA this CPU lacks: the widest it has */
        body b = pick_isa(getenv("SHARDTUNE_GEMV_ISA"));
        if (!b.f) b = pick_isa(NULL);
        __atomic_store_n(&g_body, f = b.f, __ATOMIC_RELAXED);
    }
    return f;
}

void st_cpu_gemv(float *y, const float *x, const float *w, int n, int k, float beta) {
    if (n <= 0) return;
    if (k <= 0) {
        for (int j = 0; j < n; j++) put(y + j, 0.0f, beta);
        return;
    }
    rows_fn f = pick();
    int blocks = (n + GEMV_BLOCK - 1) / GEMV_BLOCK;
#pragma omp parallel for schedule(static) if ((long)n * k >= GEMV_PAR_MIN && blocks > 1)
    for (int b = 0; b < blocks; b++) {
        int j0 = b * GEMV_BLOCK, j1 = j0 + GEMV_BLOCK < n ? j0 + GEMV_BLOCK : n;
        f(y, x, w, j0, j1, k, beta);
    }
}
