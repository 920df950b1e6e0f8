/* cpu_int8.c — the CPU backend's int8 forward matmul (kernels.h matmul_w8a8; a distillation teacher under
 * distill.teacher_dtype: int8): weights quantized once per output row and packed, activations quantized per
 * token on the fly, products summed exactly in int32, rescaled to fp32.
 *
 * Layout of a packed weight (w8_pack; the blob is 64-byte aligned backend memory):
 *   header (64 bytes: out, in, np, kp), scales s[np] (fp32), row sums of the codes wsum[np] (int32),
 *   codes in VNNI order: for each block of 16 output rows, for each group of 4 inputs, 16 x 4 bytes
 *   (row j of the block, inputs 4g..4g+3), np = out rounded up to 16, kp = in rounded up to 4 (zero codes).
 * Activations go to the scratch as u8 = p + 128 (AVX-512 VNNI's vpdpbusd multiplies u8 by s8), so
 * sum_k u8 q = sum_k p q + 128 wsum: the offset is taken back exactly before the rescale.
 *
 * Two paths compute the same integers, so their results are bit-identical: AVX-512 VNNI (vpdpbusd, chosen
 * at run time when the CPU has it, whatever the build flags) and a portable scalar loop (any CPU;
 * SHARDTUNE_INT8=scalar forces it). The rescale and the beta / bias epilogue are written as the same
 * sequence of fp32 operations in both (the file is built without FMA contraction). Every output element
 * is one integer sum: results do not depend on the thread count. */
#include "kernels/cpu/cpu_kernels.h"

#include <math.h>
#include <omp.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define ST_INT8_X86 1
#endif

typedef struct {
    int32_t out, in, np, kp;
    int32_t pad[12];
} w8_header;

#define W8_PANEL 64 /* output columns per tile (4 blocks of 16) */
#define W8_ROWS 64  /* activation rows per tile */

static int round_up(int x, int a) { return (x + a - 1) / a * a; }

size_t st_cpu_w8_bytes(int out, int in) {
    size_t np = (size_t)round_up(out, 16), kp = (size_t)round_up(in, 4);
    return sizeof(w8_header) + np * (sizeof(float) + sizeof(int32_t)) + np * kp;
}

size_t st_cpu_w8_scratch_bytes(int m, int in) {
    return (size_t)round_up(m, 16) * sizeof(float) + (size_t)m * (size_t)round_up(in, 4);
}

/* One code: clamp(rint(x / s), -127, 127), 0 when s = 0 (an all-zero row). */
static inline int code_of(float x, float s) {
    float v = s > 0.0f ? rintf(x / s) : 0.0f;
    return (int)fmaxf(-127.0f, fminf(127.0f, v));
}

/* absmax / 127 of a row: its quantization step. */
static float step_of(const float *x, int n) {
    float amax = 0.0f;
    for (int k = 0; k < n; k++) amax = fmaxf(amax, fabsf(x[k]));
    return amax / 127.0f;
}

/* One activation row quantized into its u8 form (code + 128; the padding 128 too); returns the step. */
static float quant_row(const float *x, int n, int kp, uint8_t *q) {
    float s = step_of(x, n);
    for (int k = 0; k < n; k++) q[k] = (uint8_t)(code_of(x[k], s) + 128);
    for (int k = n; k < kp; k++) q[k] = 128;
    return s;
}

void st_cpu_w8_pack(void *packed, const float *w, int out, int in) {
    w8_header *h = packed;
    memset(h, 0, sizeof *h);
    h->out = out, h->in = in, h->np = round_up(out, 16), h->kp = round_up(in, 4);
    float *s = (float *)(h + 1);
    int32_t *wsum = (int32_t *)(s + h->np);
    int8_t *codes = (int8_t *)(wsum + h->np);
    memset(s, 0, (size_t)h->np * (sizeof(float) + sizeof(int32_t)) + (size_t)h->np * h->kp);
#pragma omp parallel for schedule(static)
    for (int j = 0; j < out; j++) {
        const float *row = w + (size_t)j * in;
        float sj = step_of(row, in);
        int32_t sum = 0;
        int8_t *blk = codes + (size_t)(j / 16) * 16 * h->kp + (j % 16) * 4;
        for (int k = 0; k < in; k++) { /* padding codes stay 0 */
            int v = code_of(row[k], sj);
            sum += v;
            blk[(size_t)(k / 4) * 64 + k % 4] = (int8_t)v;
        }
        s[j] = sj, wsum[j] = sum;
    }
}

static atomic_int vnni_choice = -1;

/* 1 when the VNNI path runs: the CPU has AVX-512 VNNI and SHARDTUNE_INT8 is not "scalar". */
int st_cpu_int8_vnni(void) {
    int v = atomic_load(&vnni_choice);
    if (v < 0) {
        const char *e = getenv("SHARDTUNE_INT8");
        v = 0;
#ifdef ST_INT8_X86
        __builtin_cpu_init();
        v = __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512dq") && !(e && strcmp(e, "scalar") == 0);
#else
        (void)e;
#endif
        atomic_store(&vnni_choice, v);
    }
    return v;
}

/* Tests: 0 forces the scalar path, 1 the VNNI one (only where the CPU has it), -1 back to the default. */
void st_cpu_int8_force(int vnni) { atomic_store(&vnni_choice, vnni); }

/* The epilogue of one output element (both paths: the same fp32 operations in the same order). */
static inline float epilogue(int32_t isum, float ta, float sj, float cold, float beta, const float *bias, int j) {
    float sc = ta * sj;
    float v = (float)isum * sc;
    if (beta != 0.0f) v = beta * cold + v;
    if (bias) v = v + bias[j];
    return v;
}

/* Rows [i0, i1) x columns [j0, j1) on the scalar path. */
static void tile_scalar(float *c, const uint8_t *qa, const float *ta, const w8_header *h, int i0, int i1, int j0,
                        int j1, float beta, const float *bias) {
    const float *s = (const float *)(h + 1);
    const int32_t *wsum = (const int32_t *)(s + h->np);
    const int8_t *codes = (const int8_t *)(wsum + h->np);
    int kp = h->kp;
    for (int i = i0; i < i1; i++) {
        const uint8_t *a = qa + (size_t)i * kp;
        for (int j = j0; j < j1; j++) {
            const int8_t *blk = codes + (size_t)(j / 16) * 16 * kp + (j % 16) * 4;
            int32_t acc = 0;
            for (int g = 0; g < kp / 4; g++)
                for (int t = 0; t < 4; t++) acc += (int32_t)a[g * 4 + t] * (int32_t)blk[(size_t)g * 64 + t];
            float *cij = c + (size_t)i * h->out + j;
            *cij = epilogue(acc - 128 * wsum[j], ta[i], s[j], beta != 0.0f ? *cij : 0.0f, beta, bias, j);
        }
    }
}

#ifdef ST_INT8_X86
#define VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")))

/* The epilogue of both micro-kernels: rows [i, i + mr) x blocks [b, b + nb) of the int32 sums to fp32,
 * C = (acc - 128 * row sum of the codes) * token scale * row scale (+ beta * C) (+ bias); columns >= out
 * masked. */
static inline __attribute__((always_inline)) VNNI_TARGET void store_tile(float *c, __m512i acc[4][4],
                                                                         const float *ta, const w8_header *h,
                                                                         int i, int mr, int b, int nb, float beta,
                                                                         const float *bias) {
    const float *s = (const float *)(h + 1);
    const int32_t *wsum = (const int32_t *)(s + h->np);
    const int out = h->out;
    const __m512i off = _mm512_set1_epi32(128);
    const __m512 vbeta = _mm512_set1_ps(beta);
    for (int q = 0; q < nb; q++) {
        int j = (b + q) * 16;
        __mmask16 mk = out - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (out - j)) - 1);
        __m512 sj = _mm512_maskz_loadu_ps(mk, s + j);
        __m512i ws = _mm512_mullo_epi32(_mm512_maskz_loadu_epi32(mk, wsum + j), off);
        __m512 bj = bias ? _mm512_maskz_loadu_ps(mk, bias + j) : _mm512_setzero_ps();
        for (int r = 0; r < mr; r++) {
            float *cr = c + (size_t)(i + r) * out + j;
            __m512 sc = _mm512_mul_ps(_mm512_set1_ps(ta[i + r]), sj);
            __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][q], ws)), sc);
            if (beta != 0.0f) v = _mm512_add_ps(_mm512_mul_ps(vbeta, _mm512_maskz_loadu_ps(mk, cr)), v);
            if (bias) v = _mm512_add_ps(v, bj);
            _mm512_mask_storeu_ps(cr, mk, v);
        }
    }
}

/* MR rows x NB blocks of 16 columns starting at row i, block b; nb_valid blocks exist, the last may be partial
 * (columns >= out are masked). Inlined with constant MR, NB on the main path. */
static inline __attribute__((always_inline)) VNNI_TARGET void micro(float *c, const uint8_t *qa, const float *ta,
                                                                    const w8_header *h, int i, int mr, int b, int nb,
                                                                    float beta, const float *bias) {
    const float *s = (const float *)(h + 1);
    const int32_t *wsum = (const int32_t *)(s + h->np);
    const int8_t *codes = (const int8_t *)(wsum + h->np);
    int kp = h->kp;
    __m512i acc[4][4];
    for (int r = 0; r < 4; r++)
        for (int q = 0; q < 4; q++) acc[r][q] = _mm512_setzero_si512();
    const int8_t *bp[4];
    for (int q = 0; q < nb; q++) bp[q] = codes + (size_t)(b + q) * 16 * kp;
    const uint8_t *ap[4];
    for (int r = 0; r < mr; r++) ap[r] = qa + (size_t)(i + r) * kp;
    for (int g = 0; g < kp / 4; g++) {
        __m512i bv[4];
        for (int q = 0; q < nb; q++) bv[q] = _mm512_loadu_si512((const void *)(bp[q] + (size_t)g * 64));
        for (int r = 0; r < mr; r++) {
            int32_t a4;
            memcpy(&a4, ap[r] + g * 4, 4);
            __m512i av = _mm512_set1_epi32(a4);
            for (int q = 0; q < nb; q++) acc[r][q] = _mm512_dpbusd_epi32(acc[r][q], av, bv[q]);
        }
    }
    store_tile(c, acc, ta, h, i, mr, b, nb, beta, bias);
}

/* quant_row(x, n, kp, q) in AVX-512: the same operations per element (absmax, x / s correctly rounded,
 * rint, clamp), so the same codes and scale. */
static VNNI_TARGET float quant_row_avx512(const float *x, int n, int kp, uint8_t *q) {
    __m512 am = _mm512_setzero_ps();
    const __m512 sign = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    int k = 0;
    for (; k + 16 <= n; k += 16) am = _mm512_max_ps(am, _mm512_and_ps(_mm512_loadu_ps(x + k), sign));
    float amax = _mm512_reduce_max_ps(am);
    for (; k < n; k++) amax = fmaxf(amax, fabsf(x[k]));
    float s = amax / 127.0f;
    if (!(s > 0.0f)) {
        memset(q, 128, (size_t)kp);
        return s;
    }
    const __m512 vs = _mm512_set1_ps(s), lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
    const __m512i off = _mm512_set1_epi32(128);
    for (k = 0; k + 16 <= n; k += 16) {
        __m512 v = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(x + k), vs), _MM_FROUND_TO_NEAREST_INT);
        v = _mm512_max_ps(lo, _mm512_min_ps(hi, v));
        _mm_storeu_si128((__m128i *)(q + k), _mm512_cvtepi32_epi8(_mm512_add_epi32(_mm512_cvtps_epi32(v), off)));
    }
    for (; k < n; k++) q[k] = (uint8_t)((int)fmaxf(-127.0f, fminf(127.0f, rintf(x[k] / s))) + 128);
    for (; k < kp; k++) q[k] = 128;
    return s;
}

/* The main path: 4 rows x 4 blocks (64 columns), the 16 accumulators as named variables so that they stay in
 * registers (GCC keeps an array of them partly on the stack, through a store-load chain per k group). The
 * epilogue is micro()'s, on the same values. */
#define ACC4(r) __m512i c##r##0 = _mm512_setzero_si512(), c##r##1 = c##r##0, c##r##2 = c##r##0, c##r##3 = c##r##0
#define DP4(r)                                                                                                  \
    do {                                                                                                        \
        int32_t a4;                                                                                             \
        memcpy(&a4, a##r + g * 4, 4);                                                                           \
        __m512i av = _mm512_set1_epi32(a4);                                                                     \
        c##r##0 = _mm512_dpbusd_epi32(c##r##0, av, b0), c##r##1 = _mm512_dpbusd_epi32(c##r##1, av, b1);        \
        c##r##2 = _mm512_dpbusd_epi32(c##r##2, av, b2), c##r##3 = _mm512_dpbusd_epi32(c##r##3, av, b3);        \
    } while (0)
static VNNI_TARGET void micro44(float *c, const uint8_t *qa, const float *ta, const w8_header *h, int i, int b,
                                float beta, const float *bias) {
    const float *s = (const float *)(h + 1);
    const int32_t *wsum = (const int32_t *)(s + h->np);
    const int8_t *codes = (const int8_t *)(wsum + h->np);
    const int kp = h->kp;
    const int8_t *p0 = codes + (size_t)b * 16 * kp, *p1 = p0 + 16 * kp, *p2 = p1 + 16 * kp, *p3 = p2 + 16 * kp;
    const uint8_t *a0 = qa + (size_t)i * kp, *a1 = a0 + kp, *a2 = a1 + kp, *a3 = a2 + kp;
    ACC4(0);
    ACC4(1);
    ACC4(2);
    ACC4(3);
    for (int g = 0; g < kp / 4; g++) {
        const __m512i b0 = _mm512_loadu_si512((const void *)(p0 + (size_t)g * 64));
        const __m512i b1 = _mm512_loadu_si512((const void *)(p1 + (size_t)g * 64));
        const __m512i b2 = _mm512_loadu_si512((const void *)(p2 + (size_t)g * 64));
        const __m512i b3 = _mm512_loadu_si512((const void *)(p3 + (size_t)g * 64));
        DP4(0);
        DP4(1);
        DP4(2);
        DP4(3);
    }
    __m512i acc[4][4] = {{c00, c01, c02, c03}, {c10, c11, c12, c13}, {c20, c21, c22, c23}, {c30, c31, c32, c33}};
    store_tile(c, acc, ta, h, i, 4, b, 4, beta, bias);
}
#undef ACC4
#undef DP4

static VNNI_TARGET void tile_vnni(float *c, const uint8_t *qa, const float *ta, const w8_header *h, int i0, int i1,
                                  int b0, int b1, float beta, const float *bias) {
    for (int b = b0; b < b1; b += 4) {
        int nb = b1 - b < 4 ? b1 - b : 4;
        int i = i0;
        if (nb == 4)
            for (; i + 4 <= i1; i += 4) micro44(c, qa, ta, h, i, b, beta, bias);
        for (; i < i1; i++) micro(c, qa, ta, h, i, 1, b, nb, beta, bias);
    }
}
#endif

void st_cpu_matmul_w8a8(float *c, const float *a, const void *packed, const float *bias, int m, int out, int in,
                        float beta, void *scratch) {
    const w8_header *h = packed;
    if (m <= 0 || out <= 0 || h->out != out || h->in != in) return;
    float *ta = scratch;
    uint8_t *qa = (uint8_t *)(ta + round_up(m, 16));
    int kp = h->kp;
    const int vnni = st_cpu_int8_vnni();
#pragma omp parallel for schedule(static) if ((long)m * in >= ST_CPU_PAR_MIN)
    for (int i = 0; i < m; i++) {
#ifdef ST_INT8_X86
        if (vnni) {
            ta[i] = quant_row_avx512(a + (size_t)i * in, in, kp, qa + (size_t)i * kp);
            continue;
        }
#endif
        ta[i] = quant_row(a + (size_t)i * in, in, kp, qa + (size_t)i * kp);
    }
    const int nblk = h->np / 16, panels = (out + W8_PANEL - 1) / W8_PANEL, rowt = (m + W8_ROWS - 1) / W8_ROWS;
    const int tiles = panels * rowt;
#pragma omp parallel for schedule(static) if ((long)m * out * in >= (1L << 20) && tiles > 1)
    for (int t = 0; t < tiles; t++) {
        int p = t / rowt, r = t % rowt;
        int i0 = r * W8_ROWS, i1 = i0 + W8_ROWS < m ? i0 + W8_ROWS : m;
        int b0 = p * (W8_PANEL / 16), b1 = b0 + W8_PANEL / 16 < nblk ? b0 + W8_PANEL / 16 : nblk;
#ifdef ST_INT8_X86
        if (vnni) {
            tile_vnni(c, qa, ta, h, i0, i1, b0, b1, beta, bias);
            continue;
        }
#endif
        (void)vnni;
        int j1 = b1 * 16 < out ? b1 * 16 : out;
        tile_scalar(c, qa, ta, h, i0, i1, b0 * 16, j1, beta, bias);
    }
}
