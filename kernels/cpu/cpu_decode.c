/* cpu_decode.c — the decode-step kernels of generation: storing a token's keys and values in the KV
 * cache, and attention of one query row per token over its sequence's cached keys (kernels.h has the
 * layouts; a sliding window limits the keys a row sees). A run of at least PREFILL_RUN rows of one
 * sequence at consecutive positions (a prefill chunk) attends per head through two sgemm tiles (scores
 * Q K^T over the keys the run sees, masked softmax per row, then P V), in pieces of PREFILL_TILE rows;
 * other rows (decode steps) one by one with the score row on the stack; with GQA, when every thread gets
 * one, an item is a (row, kv head) whose query heads score each key row loaded once (the same sums as head
 * by head). Each (row or run, query head) is computed by one thread in a fixed order, so any thread
 * schedule gives the same bits. decode_mm (at the end): generation's small-batch products on weights held
 * as fp32 or bf16, one fixed-order dot product per output. Caller owns every buffer. */
#include "kernels/cpu/cpu_kernels.h"

#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>

/* Rows of one sequence at consecutive positions from which the sgemm tiles pay off. */
#define PREFILL_RUN 16
/* A long run is cut into tiles of this many rows: a tile scores only the keys up to its own last row, so
 * the masked (causal) part of the score tiles that is computed and thrown away shrinks from half of a
 * T x T square to about one tile per row. */
#define PREFILL_TILE 128

/* Offset of (sequence seq, kv head g, position p) in a [S, KVH, max_t, hd] cache (kernels.h). */
static inline size_t kv_slot(int seq, int g, int p, int kvh, int hd, int max_t) {
    return (((size_t)seq * kvh + (size_t)g) * max_t + (size_t)p) * hd;
}

void st_cpu_kv_store(float *kcache, float *vcache, const float *qkv, const int32_t *row_seq, const int32_t *row_pos,
                     int rows, int h, int kvh, int hd, int max_t) {
    size_t kvd = (size_t)kvh * hd, stride = (size_t)(h + 2 * kvh) * hd;
    for (int i = 0; i < rows; i++) {
        const float *k = qkv + (size_t)i * stride + (size_t)h * hd;
        for (int g = 0; g < kvh; g++) {
            size_t slot = kv_slot(row_seq[i], g, row_pos[i], kvh, hd, max_t);
            memcpy(kcache + slot, k + (size_t)g * hd, (size_t)hd * sizeof(float));
            memcpy(vcache + slot, k + kvd + (size_t)g * hd, (size_t)hd * sizeof(float));
        }
    }
}

/* First key a query at position p sees: 0, or with a sliding window W the keys j with p - j < W. */
static inline int first_key(int p, int window) { return window > 0 && p >= window ? p - window + 1 : 0; }

/* A decode step's cached keys and values arrive from memory (the weights streamed since the last step
 * have pushed them out of the caches). A kv head's keys (values) are contiguous by position, one stream
 * per head. The loops over positions prefetch KEYS_AHEAD (VALUES_AHEAD) positions ahead (no effect on
 * the arithmetic): a help when the slices were strided; on the contiguous streams it measured neutral. */
#define KEYS_AHEAD 16
#define VALUES_AHEAD 64
static inline void prefetch_slice(const float *p, int n) {
    for (int b = 0; b < n * (int)sizeof(float); b += 64) __builtin_prefetch((const char *)p + b);
}

/* o[hd] = sum_j p[j] v_j (v_j: row j of vb, stride hd), keys in order for every element. A chunk of
 * VALUE_CHUNK output dims stays in registers over all the keys (the same sums as an axpy per key, which
 * would store and reload o for every key). */
#define VALUE_CHUNK 64
static void weigh_values(float *restrict o, const float *restrict p, const float *restrict vb, int nk, int hd) {
    for (int d0 = 0; d0 < hd; d0 += VALUE_CHUNK) {
        int w = hd - d0 < VALUE_CHUNK ? hd - d0 : VALUE_CHUNK;
        float acc[VALUE_CHUNK] = {0};
        if (w == VALUE_CHUNK)
            for (int j = 0; j < nk; j++) {
                const float *restrict v = vb + (size_t)j * hd + d0;
                if (j + VALUES_AHEAD < nk) prefetch_slice(v + VALUES_AHEAD * hd, VALUE_CHUNK);
                for (int d = 0; d < VALUE_CHUNK; d++) acc[d] += p[j] * v[d];
            }
        else
            for (int j = 0; j < nk; j++) {
                const float *restrict v = vb + (size_t)j * hd + d0;
                if (j + VALUES_AHEAD < nk) prefetch_slice(v + VALUES_AHEAD * hd, w);
                for (int d = 0; d < w; d++) acc[d] += p[j] * v[d];
            }
        memcpy(o + d0, acc, (size_t)w * sizeof(float));
    }
}

/* Row i (sequence seq, position p), query head hi, over its keys one by one (the score row on the stack). */
static void attend_row(float *out, const float *qkv, const float *kcache, const float *vcache, int seq, int p, int i,
                       int hi, int h, int kvh, int hd, int max_t, int window) {
    size_t stride = (size_t)(h + 2 * kvh) * hd;
    float scale = 1.0f / sqrtf((float)hd);
    int first = first_key(p, window), nk = p + 1 - first; /* >= 1: the row's own key */
    if (nk < 1) return;
    float s[nk];
    const float *q = qkv + (size_t)i * stride + (size_t)hi * hd;
    size_t base = kv_slot(seq, hi / (h / kvh), first, kvh, hd, max_t);
    const float *kb = kcache + base, *vb = vcache + base;
    int j = 0;
    for (; j + 4 <= nk; j += 4) {
        const float *k0 = kb + (size_t)j * hd;
        for (int t = 0; t < 4 && j + KEYS_AHEAD + t < nk; t++) prefetch_slice(k0 + (KEYS_AHEAD + t) * hd, hd);
        float d4[4];
        st_cpu_dot4(d4, q, k0, k0 + hd, k0 + 2 * hd, k0 + 3 * hd, hd);
        for (int r = 0; r < 4; r++) s[j + r] = d4[r] * scale;
    }
    for (; j < nk; j++) s[j] = st_cpu_dot(q, kb + (size_t)j * hd, hd) * scale;
    float mx = st_cpu_max(s, nk);
    for (j = 0; j < nk; j++) s[j] = st_cpu_expf(s[j] - mx);
    float inv = 1.0f / st_cpu_sum(s, nk);
    for (j = 0; j < nk; j++) s[j] *= inv;
    weigh_values(out + (size_t)i * h * hd + (size_t)hi * hd, s, vb, nk, hd);
}

/* A decode item's score rows on the stack at most (floats): past it the heads go one by one. */
#define GROUP_MAX_SCORES 65536

/* Row i, the query heads g*G .. g*G+G-1 that share kv head g (GQA, G = h / kvh): each key row is loaded
 * once for all G heads' scores (st_cpu_dot4 per head: the same bits as attend_row head by head). */
static void attend_group(float *out, const float *qkv, const float *kcache, const float *vcache, int seq, int p, int i,
                         int g, int h, int kvh, int hd, int max_t, int window) {
    int G = h / kvh, first = first_key(p, window), nk = p + 1 - first;
    if (G == 1 || nk < 1 || (long)G * nk > GROUP_MAX_SCORES) {
        for (int r = 0; r < G; r++) attend_row(out, qkv, kcache, vcache, seq, p, i, g * G + r, h, kvh, hd, max_t, window);
        return;
    }
    size_t stride = (size_t)(h + 2 * kvh) * hd;
    float scale = 1.0f / sqrtf((float)hd);
    float s[G * nk];
    const float *q = qkv + (size_t)i * stride + (size_t)g * G * hd;
    size_t base = kv_slot(seq, g, first, kvh, hd, max_t);
    const float *kb = kcache + base, *vb = vcache + base;
    int j = 0;
    for (; j + 4 <= nk; j += 4) {
        const float *k0 = kb + (size_t)j * hd;
        for (int t = 0; t < 4 && j + KEYS_AHEAD + t < nk; t++) prefetch_slice(k0 + (KEYS_AHEAD + t) * hd, hd);
        for (int r = 0; r < G; r++) {
            float d4[4];
            st_cpu_dot4(d4, q + (size_t)r * hd, k0, k0 + hd, k0 + 2 * hd, k0 + 3 * hd, hd);
            for (int t = 0; t < 4; t++) s[(size_t)r * nk + j + t] = d4[t] * scale;
        }
    }
    for (; j < nk; j++)
        for (int r = 0; r < G; r++) s[(size_t)r * nk + j] = st_cpu_dot(q + (size_t)r * hd, kb + (size_t)j * hd, hd) * scale;
    for (int r = 0; r < G; r++) {
        float *sr = s + (size_t)r * nk;
        float mx = st_cpu_max(sr, nk);
        for (j = 0; j < nk; j++) sr[j] = st_cpu_expf(sr[j] - mx);
        float inv = 1.0f / st_cpu_sum(sr, nk);
        for (j = 0; j < nk; j++) sr[j] *= inv;
        weigh_values(out + (size_t)i * h * hd + (size_t)(g * G + r) * hd, sr, vb, nk, hd);
    }
}

/* Rows r0..r0+n-1 of one sequence at positions p0..p0+n-1, query head hi: S = scale Q K^T over keys
 * lo..p0+n-1 (lo: the first key row r0 sees), each row's softmax over its own causal / window range (the
 * rest 0), O = P V. s: scratch [n, nk]. */
static void attend_run(float *out, const float *qkv, const float *kcache, const float *vcache, int seq, int r0,
                       int p0, int n, int hi, int h, int kvh, int hd, int max_t, int window, float *s) {
    size_t stride = (size_t)(h + 2 * kvh) * hd;
    int lo = first_key(p0, window), nk = p0 + n - lo;
    size_t base = kv_slot(seq, hi / (h / kvh), lo, kvh, hd, max_t);
    const float *q = qkv + (size_t)r0 * stride + (size_t)hi * hd;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, nk, hd, 1.0f / sqrtf((float)hd), q, (int)stride,
                kcache + base, hd, 0.0f, s, nk);
    for (int i = 0; i < n; i++) {
        float *row = s + (size_t)i * nk;
        int a = first_key(p0 + i, window) - lo, b = p0 + i - lo + 1; /* keys [a, b) */
        float mx = st_cpu_max(row + a, b - a);
        for (int j = a; j < b; j++) row[j] = st_cpu_expf(row[j] - mx);
        float inv = 1.0f / st_cpu_sum(row + a, b - a);
        for (int j = 0; j < a; j++) row[j] = 0.0f;
        for (int j = a; j < b; j++) row[j] *= inv;
        for (int j = b; j < nk; j++) row[j] = 0.0f;
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, hd, nk, 1.0f, s, nk, vcache + base, hd, 0.0f,
                out + (size_t)r0 * h * hd + (size_t)hi * hd, h * hd);
}

/* Length of the run of rows from r0 (same sequence, consecutive positions). */
static int run_length(const int32_t *row_seq, const int32_t *row_pos, int rows, int r0) {
    int r1 = r0 + 1;
    while (r1 < rows && row_seq[r1] == row_seq[r0] && row_pos[r1] == row_pos[r1 - 1] + 1) r1++;
    return r1 - r0;
}

/* The runs of at least PREFILL_RUN rows: item k of h * n_runs is run k / h, head k % h. */
static void attention_runs(float *out, const float *qkv, const float *kcache, const float *vcache,
                           const int32_t *row_seq, const int32_t *row_pos, const int *run_r0, const int *run_n,
                           int n_runs, int h, int kvh, int hd, int max_t, int window) {
    long items = (long)n_runs * h;
#pragma omp parallel if (items > 1)
    {
        float *s = NULL;
        size_t cap = 0;
#pragma omp for schedule(dynamic, 1)
        for (long k = 0; k < items; k++) {
            int r0 = run_r0[k / h], n = run_n[k / h], p0 = row_pos[r0];
            size_t need = (size_t)n * (size_t)(p0 + n - first_key(p0, window));
            if (need > cap) {
                free(s);
                s = calloc(need, sizeof *s); /* zeroed: the compiler cannot see sgemm write it */
                cap = s ? need : 0;
            }
            if (s)
                attend_run(out, qkv, kcache, vcache, row_seq[r0], r0, p0, n, (int)(k % h), h, kvh, hd, max_t, window,
                           s);
            else /* no scratch: the run's rows one by one */
                for (int i = 0; i < n; i++)
                    attend_row(out, qkv, kcache, vcache, row_seq[r0], p0 + i, r0 + i, (int)(k % h), h, kvh, hd, max_t,
                               window);
        }
        free(s);
    }
}

void st_cpu_attention_cached(float *out, const float *qkv, const float *kcache, const float *vcache,
                             const int32_t *row_seq, const int32_t *row_pos, int rows, int h, int kvh, int hd,
                             int max_t, int window) {
    if (rows <= 0 || h <= 0 || kvh <= 0 || hd <= 0) return;
    /* prefill runs through sgemm tiles; the rows left (tiled[i] = 0) one by one. Fewer rows than a run
     * (a decode step) allocate nothing. */
    int runs_possible = rows >= PREFILL_RUN;
    int *run_r0 = runs_possible ? malloc((size_t)rows * sizeof(int)) : NULL;
    int *run_n = runs_possible ? malloc((size_t)rows * sizeof(int)) : NULL;
    unsigned char *tiled = runs_possible ? calloc((size_t)rows, 1) : NULL;
    int n_runs = 0;
    for (int r0 = 0; run_r0 && run_n && tiled && r0 < rows;) {
        int n = run_length(row_seq, row_pos, rows, r0);
        if (n >= PREFILL_RUN) {
            memset(tiled + r0, 1, (size_t)n);
            for (int a = 0; a < n;) { /* tiles of PREFILL_TILE rows; a short last piece joins the one before */
                int m = n - a <= PREFILL_TILE + PREFILL_RUN ? n - a : PREFILL_TILE;
                run_r0[n_runs] = r0 + a;
                run_n[n_runs++] = m;
                a += m;
            }
        }
        r0 += n;
    }
    if (tiled && n_runs > 0)
        attention_runs(out, qkv, kcache, vcache, row_seq, row_pos, run_r0, run_n, n_runs, h, kvh, hd, max_t, window);
    free(run_r0);
    free(run_n);
    long keys = 0;
    for (int i = 0; i < rows; i++)
        if (!tiled || !tiled[i]) keys += row_pos[i] + 1 - first_key(row_pos[i], window);
    int par = keys * h * hd >= ST_CPU_PAR_MIN;
    if (kvh < h && kvh >= (par ? omp_get_max_threads() : 1)) { /* items (row, kv head): every thread has one */
        long work = (long)rows * kvh;
#pragma omp parallel for schedule(dynamic, 1) if (par)
        for (long w = 0; w < work; w++)
            if (!tiled || !tiled[w / kvh])
                attend_group(out, qkv, kcache, vcache, row_seq[w / kvh], row_pos[w / kvh], (int)(w / kvh),
                             (int)(w % kvh), h, kvh, hd, max_t, window);
    } else {
        long work = (long)rows * h;
#pragma omp parallel for schedule(dynamic, 4) if (par)
        for (long w = 0; w < work; w++)
            if (!tiled || !tiled[w / h])
                attend_row(out, qkv, kcache, vcache, row_seq[w / h], row_pos[w / h], (int)(w / h), (int)(w % h), h,
                           kvh, hd, max_t, window);
    }
    free(tiled);
}

/* ---- decode_mm: generation's small-batch products on fp32- or bf16-held weights ----
 * One dot product per output, in one order for both holdings: NACC vector accumulators take the in-order
 * chunks of LANES elements round-robin (chunk c into accumulator c % NACC) while NACC whole chunks remain,
 * then the remaining whole chunks into accumulator 0, then the last in % LANES elements one by one (fmaf)
 * into a scalar; the result is reduce((a0 + a1) + (a2 + a3)) + scalar. A bf16 weight is widened exactly
 * (its bits shifted left 16) before the same fp32 FMA, so a weight whose fp32 value is a bf16 value gives
 * the same bits held either way. LANES is 16 (AVX-512), 8 (AVX2) or 8 (portable: 8 scalar lanes). */
#define NACC 4

static inline float widen16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

#if defined(__AVX512F__)
#include <immintrin.h>
#define LANES 16
typedef __m512 vacc;
static inline vacc v_zero(void) { return _mm512_setzero_ps(); }
static inline vacc v_ld32(const float *p) { return _mm512_loadu_ps(p); }
static inline vacc v_ld16(const uint16_t *p) {
    __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
}
static inline vacc v_fma(vacc a, vacc b, vacc c) { return _mm512_fmadd_ps(a, b, c); }
static inline vacc v_add(vacc a, vacc b) { return _mm512_add_ps(a, b); }
static inline float v_sum(vacc a) { return _mm512_reduce_add_ps(a); }
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LANES 8
typedef __m256 vacc;
static inline vacc v_zero(void) { return _mm256_setzero_ps(); }
static inline vacc v_ld32(const float *p) { return _mm256_loadu_ps(p); }
static inline vacc v_ld16(const uint16_t *p) {
    __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
}
static inline vacc v_fma(vacc a, vacc b, vacc c) { return _mm256_fmadd_ps(a, b, c); }
static inline vacc v_add(vacc a, vacc b) { return _mm256_add_ps(a, b); }
static inline float v_sum(vacc a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#else
#define LANES 8
typedef struct { float v[8]; } vacc;
static inline vacc v_zero(void) { vacc a = {{0}}; return a; }
static inline vacc v_ld32(const float *p) { vacc a; memcpy(a.v, p, sizeof a.v); return a; }
static inline vacc v_ld16(const uint16_t *p) { vacc a; for (int l = 0; l < 8; l++) a.v[l] = widen16(p[l]); return a; }
static inline vacc v_fma(vacc a, vacc b, vacc c) { for (int l = 0; l < 8; l++) c.v[l] = fmaf(a.v[l], b.v[l], c.v[l]); return c; }
static inline vacc v_add(vacc a, vacc b) { for (int l = 0; l < 8; l++) a.v[l] += b.v[l]; return a; }
static inline float v_sum(vacc a) { return ((a.v[0] + a.v[4]) + (a.v[2] + a.v[6])) + ((a.v[1] + a.v[5]) + (a.v[3] + a.v[7])); }
#endif

/* The dot product of x[in] and weight row w (fp32) or w16 (bf16), in the order above. */
#define DECODE_DOT(NAME, T, LOAD, SCALAR)                                                                      \
    static float NAME(const float *restrict x, const T *restrict w, int in) {                                 \
        vacc a0 = v_zero(), a1 = v_zero(), a2 = v_zero(), a3 = v_zero();                                       \
        int k = 0;                                                                                             \
        for (; k + NACC * LANES <= in; k += NACC * LANES) {                                                    \
            a0 = v_fma(v_ld32(x + k), LOAD(w + k), a0);                                                        \
            a1 = v_fma(v_ld32(x + k + LANES), LOAD(w + k + LANES), a1);                                        \
            a2 = v_fma(v_ld32(x + k + 2 * LANES), LOAD(w + k + 2 * LANES), a2);                                \
            a3 = v_fma(v_ld32(x + k + 3 * LANES), LOAD(w + k + 3 * LANES), a3);                                \
        }                                                                                                      \
        for (; k + LANES <= in; k += LANES) a0 = v_fma(v_ld32(x + k), LOAD(w + k), a0);                        \
        float t = 0.0f;                                                                                        \
        for (; k < in; k++) t = fmaf(x[k], SCALAR(w[k]), t);                                                   \
        return v_sum(v_add(v_add(a0, a1), v_add(a2, a3))) + t;                                                 \
    }
/* Two weight rows wa, wb against the same x: each row's dot product in exactly the order above (its own
 * accumulators, tail and reduction), x loaded once for both. Two rows side by side keep more weight lines
 * in flight than one row at a time (see DECODE_STREAMS). */
#define DECODE_DOT2(NAME, T, LOAD, SCALAR)                                                                     \
    static void NAME(float d[2], const float *restrict x, const T *restrict wa, const T *restrict wb, int in) { \
        vacc a0 = v_zero(), a1 = v_zero(), a2 = v_zero(), a3 = v_zero();                                       \
        vacc b0 = v_zero(), b1 = v_zero(), b2 = v_zero(), b3 = v_zero();                                       \
        int k = 0;                                                                                             \
        for (; k + NACC * LANES <= in; k += NACC * LANES) {                                                    \
            vacc x0 = v_ld32(x + k), x1 = v_ld32(x + k + LANES);                                               \
            vacc x2 = v_ld32(x + k + 2 * LANES), x3 = v_ld32(x + k + 3 * LANES);                               \
            a0 = v_fma(x0, LOAD(wa + k), a0), b0 = v_fma(x0, LOAD(wb + k), b0);                                \
            a1 = v_fma(x1, LOAD(wa + k + LANES), a1), b1 = v_fma(x1, LOAD(wb + k + LANES), b1);                \
            a2 = v_fma(x2, LOAD(wa + k + 2 * LANES), a2), b2 = v_fma(x2, LOAD(wb + k + 2 * LANES), b2);        \
            a3 = v_fma(x3, LOAD(wa + k + 3 * LANES), a3), b3 = v_fma(x3, LOAD(wb + k + 3 * LANES), b3);        \
        }                                                                                                      \
        for (; k + LANES <= in; k += LANES) {                                                                  \
            vacc xk = v_ld32(x + k);                                                                           \
            a0 = v_fma(xk, LOAD(wa + k), a0), b0 = v_fma(xk, LOAD(wb + k), b0);                                \
        }                                                                                                      \
        float ta = 0.0f, tb = 0.0f;                                                                            \
        for (; k < in; k++) ta = fmaf(x[k], SCALAR(wa[k]), ta), tb = fmaf(x[k], SCALAR(wb[k]), tb);            \
        d[0] = v_sum(v_add(v_add(a0, a1), v_add(a2, a3))) + ta;                                                \
        d[1] = v_sum(v_add(v_add(b0, b1), v_add(b2, b3))) + tb;                                                \
    }
#define AS_IS(v) (v)
DECODE_DOT(dot_w32, float, v_ld32, AS_IS)
DECODE_DOT(dot_w16, uint16_t, v_ld16, widen16)
DECODE_DOT2(dot2_w32, float, v_ld32, AS_IS)
DECODE_DOT2(dot2_w16, uint16_t, v_ld16, widen16)

/* From this many weights a product is split across the team by output rows (as st_cpu_matmul's one-row
 * products: streaming 256 KB costs far more than waking the team). */
#define DECODE_PAR_MIN (1L << 16)

/* A thread reads its weight rows as this many sequential streams side by side (row i of each quarter of
 * its range in turn, two quarters' rows at a time through DECODE_DOT2): one core's read rate from memory is
 * bounded by the cache lines it has in flight, and the hardware prefetcher runs ahead on each stream it
 * follows, so several streams keep more lines coming than one. On the 2-core AMD EPYC (Zen 3) VM, 1 thread,
 * matrices streamed from memory: 4 streams read bf16 rows at 1.6-1.8x and fp32 rows at ~1.35x the rate of
 * one stream (3 about the same, 6 and 8 slower); reading the 4 as two pairs of rows dotted together adds
 * 3-9% more on fp32 (bench/stream_read: 192 MB, rounds alternating, loaded machine), software prefetch
 * nothing clear. Only the order in which outputs are computed changes: each is still its one dot product. */
#define DECODE_STREAMS 4 /* even: its streams go in pairs */
_Static_assert(DECODE_STREAMS % 2 == 0, "decode_mm reads its streams in pairs");

/* y[r, o] (+)= dot(x[r], W[o]) for every row r. */
static inline void decode_out(float *y, const float *x, const float *w, const uint16_t *w16, int rows, int out, int in,
                              float beta, int o) {
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * in;
        float d = w16 ? dot_w16(xr, w16 + (size_t)o * in, in) : dot_w32(xr, w + (size_t)o * in, in);
        float *yo = y + (size_t)r * out + o;
        *yo = beta != 0.0f ? *yo + d : d;
    }
}

/* decode_out for outputs o and p, their weight rows read side by side. */
static inline void decode_pair(float *y, const float *x, const float *w, const uint16_t *w16, int rows, int out,
                               int in, float beta, int o, int p) {
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * in;
        float d[2];
        if (w16) dot2_w16(d, xr, w16 + (size_t)o * in, w16 + (size_t)p * in, in);
        else dot2_w32(d, xr, w + (size_t)o * in, w + (size_t)p * in, in);
        float *yo = y + (size_t)r * out + o, *yp = y + (size_t)r * out + p;
        *yo = beta != 0.0f ? *yo + d[0] : d[0];
        *yp = beta != 0.0f ? *yp + d[1] : d[1];
    }
}

void st_cpu_decode_mm(float *y, const float *x, const float *w, const uint16_t *w16, int rows, int out, int in,
                      float beta) {
    if (rows <= 0 || out <= 0) return;
#pragma omp parallel if ((long)out * in >= DECODE_PAR_MIN && out >= 32)
    {
        int nt = omp_get_num_threads(), id = omp_get_thread_num();
        int per = ((out + nt - 1) / nt + 15) / 16 * 16;
        int lo = id * per < out ? id * per : out;
        int hi = lo + per < out ? lo + per : out;
        int sub = (hi - lo + DECODE_STREAMS - 1) / DECODE_STREAMS; /* rows per stream */
        for (int i = 0; i < sub; i++)
            for (int s = 0; s < DECODE_STREAMS; s += 2) {
                int o = lo + s * sub + i, p = o + sub;
                if (p < hi) decode_pair(y, x, w, w16, rows, out, in, beta, o, p);
                else if (o < hi) decode_out(y, x, w, w16, rows, out, in, beta, o);
            }
    }
}
