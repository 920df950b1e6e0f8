/* gguf_kquant.c — ggml's k-quant encodings Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (super-blocks of 256) and Q5_0 / Q5_1
 * (llama.cpp's fallbacks for Q4_K / Q5_K rows that are not a multiple of 256), the same arithmetic as ggml's
 * reference quantizers (quantize_row_q2_K_ref / q4_K_ref / q5_K_ref with make_qkx2_quants, q3_K_ref with
 * make_q3_quants, q6_K_ref with make_qx_quants, q5_0_ref, q5_1_ref), which is what llama-quantize runs
 * without an importance matrix.
 *
 * Bit-exactness needs the same fp32 operation order and no FMA contraction: CMakeLists.txt compiles this
 * file with -ffp-contract=off (the build's -march=native would otherwise fuse multiply-adds), and every
 * sum below runs in the order ggml's loops do. The sub-block searches also run in vector lanes (one lane per
 * sub-block, the scalar operations in the scalar order), which the unit test holds to the scalar bytes.
 * Block layouts (little-endian, as ggml-common.h):
 *   Q2_K (84 bytes):  scales[16] (4-bit scale | 4-bit min << 4), qs[64] (2-bit levels), f16 d, f16 dmin;
 *                     x = d*sc[j]*q - dmin*m[j] for sub-block j of 16.
 *   Q3_K (110 bytes): hmask[32] (third bits), qs[64] (low 2 bits), scales[12] (16 six-bit), f16 d;
 *                     x = d*(sc[j]-32)*(q-4) for sub-block j of 16.
 *   Q4_K (144 bytes): f16 d, f16 dmin, scales[12] (8 six-bit scales + 8 six-bit mins), qs[128] (nibbles);
 *                     x = d*sc[j]*q - dmin*m[j] for sub-block j of 32.
 *   Q5_K (176 bytes): as Q4_K with qh[32] (fifth bits) before qs[128].
 *   Q6_K (210 bytes): ql[128] (low nibbles), qh[64] (high 2 bits), int8 scales[16], f16 d;
 *                     x = d*scales[j]*(q - 32) for sub-block j of 16.
 *   Q5_0 (22 bytes):  f16 d, qh[4] (fifth bits), qs[16]; x = d*(q - 16).
 *   Q5_1 (24 bytes):  f16 d, f16 m, qh[4], qs[16]; x = d*q + m. */
#include <float.h>
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "checkpoints/gguf.h"
#include "checkpoints/safetensors.h"

#define QKK 256
#define EPS_GROUP 1e-15f /* ggml's GROUP_MAX_EPS: an all-(near-)zero group */

/* Round to nearest, ties to even, for |v| < 2^22: adding 1.5 * 2^23 leaves the integer in the low
 * mantissa bits (ggml's nearest_int does the same). */
static inline int round_ne(float v) {
    float s = v + 12582912.f;
    int32_t i;
    memcpy(&i, &s, 4);
    return (i & 0x007fffff) - 0x00400000;
}

static inline int clampi(int v, int lo, int hi) { return v < lo ? lo : v > hi ? hi : v; }

static void put_f16(uint8_t *p, float f) {
    uint16_t h = st_fp32_to_fp16(f);
    p[0] = (uint8_t)(h & 0xff);
    p[1] = (uint8_t)(h >> 8);
}
static float get_f16(const uint8_t *p) { return st_f16_to_f32((uint16_t)(p[0] | (p[1] << 8))); }

/* The search parameters of ggml's make_qkx2_quants: levels 0..nmax, candidate inverse scales
 * (nmax + rmin + 0.1 k) / range for k = 0..nstep; mad: weighted absolute instead of squared error. */
typedef struct {
    int nmax;
    float rmin;
    int nstep;
    int mad;
} affine_fit;
static const affine_fit FIT_Q4 = {15, -1.f, 20, 0}, FIT_Q5 = {31, -0.5f, 15, 0}, FIT_Q2 = {3, -0.5f, 15, 1};

/* Error of x ~ scale * l + min under weights w (squared or absolute differences, in index order). */
static float affine_error(const float *x, const float *w, const uint8_t *l, int n, float scale, float min, int mad) {
    float e = 0;
    for (int i = 0; i < n; i++) {
        float diff = scale * l[i] + min - x[i];
        diff = mad ? fabsf(diff) : diff * diff;
        e += w[i] * diff;
    }
    return e;
}

/* One group of n elements, levels 0..nmax with an affine fit x ~ scale*l + min (min <= 0): a first guess
 * from the range, then nstep+1 candidate inverse scales each refit by weighted least squares; the smallest
 * weighted error wins. Returns scale; *neg_min = -min. (make_qkx2_quants: q4_K n 32, nmax 15, rmin -1,
 * 20 steps; q5_K n 32, nmax 31, rmin -0.5, 15 steps; q2_K n 16, nmax 3, rmin -0.5, 15 steps, absolute error.) */
static float fit_affine(const float *x, const float *w, int n, const affine_fit *p, uint8_t *L, float *neg_min) {
    float min = x[0], max = x[0], sum_w = w[0], sum_x = sum_w * x[0];
    for (int i = 1; i < n; i++) {
        if (x[i] < min) min = x[i];
        if (x[i] > max) max = x[i];
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if (min > 0) min = 0;
    if (max == min) {
        memset(L, 0, (size_t)n);
        *neg_min = -min;
        return 0.f;
    }
    const int nmax = p->nmax;
    float iscale = nmax / (max - min), scale = 1 / iscale;
    for (int i = 0; i < n; i++) L[i] = (uint8_t)clampi(round_ne(iscale * (x[i] - min)), 0, nmax);
    float best = affine_error(x, w, L, n, scale, min, p->mad);
    uint8_t aux[32];
    for (int is = 0; is <= p->nstep; is++) {
        iscale = (p->rmin + 0.1f * is + nmax) / (max - min);
        float sum_l = 0, sum_l2 = 0, sum_xl = 0;
        for (int i = 0; i < n; i++) {
            int l = clampi(round_ne(iscale * (x[i] - min)), 0, nmax);
            aux[i] = (uint8_t)l;
            sum_l += w[i] * l;
            sum_l2 += w[i] * l * l;
            sum_xl += w[i] * l * x[i];
        }
        float D = sum_w * sum_l2 - sum_l * sum_l;
        if (!(D > 0)) continue;
        float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
        float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
        if (this_min > 0) {
            this_min = 0;
            this_scale = sum_xl / sum_l2;
        }
        float err = affine_error(x, w, aux, n, this_scale, this_min, p->mad);
        if (err < best) {
            memcpy(L, aux, (size_t)n);
            best = err;
            scale = this_scale;
            min = this_min;
        }
    }
    *neg_min = -min;
    return scale;
}

/* fit_affine for 16 groups of n (16 or 32) consecutive elements at once, lane j = group j (q2_K: the 16
 * groups of a super-block; q4_K / q5_K: the 8 groups of two consecutive super-blocks): the same operations
 * in the same order within each lane, written as loops over the 8 lanes (innermost, branch-free) so that they compile
 * to 8-wide vector instructions; ~5x faster than eight fit_affine calls and bit-identical to them (lanes
 * whose group is flat take fit_affine's early exit at the end; tests/unit/test_gguf_kquant.c compares the two).
 * Rounding: (v + 1.5*2^23) - 1.5*2^23 is round-to-nearest-even for |v| < 2^22 (no FMA/reassociation here),
 * where it equals round_ne; beyond (groups of float-subnormal range, whose inverse scale overflows, or huge
 * values) the two part, so fit_groups returns 1 when any non-flat lane may have left that range, and the
 * caller fits those groups with fit_affine instead (same bytes as the scalar form for every input). */
#define NL 16
static inline float rne(float v) { return (v + 12582912.f) - 12582912.f; }
static inline float clampf(float v, float hi) { return v < 0 ? 0 : v > hi ? hi : v; }
/* c ? a : b by the bits: GCC does not turn `c ? a : b` that feeds a division (or selects its result) into a
 * vector blend (the division might raise an FP exception the branch would have skipped), so such lane loops
 * would stay scalar; this form is a plain and/or and vectorizes. The value is the same. */
static inline float pick(int c, float a, float b) {
    uint32_t ua, ub, m = 0u - (uint32_t)(c != 0);
    memcpy(&ua, &a, 4);
    memcpy(&ub, &b, 4);
    uint32_t r = (ua & m) | (ub & ~m);
    float f;
    memcpy(&f, &r, 4);
    return f;
}

static inline __attribute__((always_inline)) int fit_groups(const float *x, int n, const float w[32][NL],
                                                            const affine_fit *p, int mad, uint8_t *L, float *scale,
                                                            float *neg_min) {
    const float nmax = (float)p->nmax;
    float xt[32][NL], aux[32][NL];
    float mn[NL], mx[NL], sw[NL], sx[NL], isc[NL], sc[NL], best[NL], den[NL], mn0[NL], bisc[NL], bmn[NL], xmn[NL];
    int flat[NL], far[NL]; /* far: some |isc * (x - mn)| below may reach 2^22, where rne and round_ne part */
    for (int i = 0; i < n; i++)
        for (int j = 0; j < NL; j++) xt[i][j] = x[n * j + i];
    for (int j = 0; j < NL; j++) {
        mn[j] = mx[j] = xt[0][j];
        sw[j] = w[0][j];
        sx[j] = sw[j] * xt[0][j];
    }
    for (int i = 1; i < n; i++)
        for (int j = 0; j < NL; j++) {
            mn[j] = xt[i][j] < mn[j] ? xt[i][j] : mn[j];
            mx[j] = xt[i][j] > mx[j] ? xt[i][j] : mx[j];
            sw[j] += w[i][j];
            sx[j] += w[i][j] * xt[i][j];
        }
    for (int j = 0; j < NL; j++) {
        xmn[j] = mn[j];
        mn[j] = mn[j] > 0 ? 0 : mn[j];
        mn0[j] = mn[j];
        flat[j] = mx[j] == mn[j];
        den[j] = flat[j] ? 1.f : mx[j] - mn[j]; /* flat lanes: finite placeholders, replaced below */
        isc[j] = p->nmax / den[j];
        sc[j] = 1 / isc[j];
        best[j] = 0;
        bisc[j] = isc[j]; /* the winning levels are round(bisc * (x - bmn)), recomputed at the end */
        bmn[j] = mn[j];
        far[j] = !(fabsf(isc[j]) * (mx[j] - mn[j]) < 4194304.f); /* also NaN / inf */
    }
    for (int i = 0; i < n; i++)
        for (int j = 0; j < NL; j++) {
            float l = clampf(rne(isc[j] * (xt[i][j] - mn[j])), nmax);
            float diff = sc[j] * l + mn[j] - xt[i][j];
            diff = mad ? fabsf(diff) : diff * diff;
            best[j] += w[i][j] * diff;
        }
    for (int is = 0; is <= p->nstep; is++) {
        float sl[NL] = {0}, sl2[NL] = {0}, sxl[NL] = {0}, err[NL] = {0}, ts[NL], tm[NL];
        for (int j = 0; j < NL; j++) { /* the selects by pick, so that these lane loops vectorize */
            isc[j] = (p->rmin + 0.1f * is + p->nmax) / pick(flat[j], 1.f, mx[j] - mn[j]);
            /* x - mn lies between xmn - mn and mx - mn (rounding is monotone): bounds |isc * (x - mn)| */
            float a = fabsf(xmn[j] - mn[j]), b = fabsf(mx[j] - mn[j]);
            far[j] |= !(fabsf(isc[j]) * (a > b ? a : b) < 4194304.f);
        }
        for (int i = 0; i < n; i++)
            for (int j = 0; j < NL; j++) {
                float l = clampf(rne(isc[j] * (xt[i][j] - mn[j])), nmax);
                aux[i][j] = l;
                sl[j] += w[i][j] * l;
                sl2[j] += w[i][j] * l * l;
                sxl[j] += w[i][j] * l * xt[i][j];
            }
        for (int j = 0; j < NL; j++) {
            float D = sw[j] * sl2[j] - sl[j] * sl[j];
            float Dd = pick(D > 0, D, 1.f);
            ts[j] = (sw[j] * sxl[j] - sx[j] * sl[j]) / Dd;
            tm[j] = (sl2[j] * sx[j] - sl[j] * sxl[j]) / Dd;
            float s0 = pick(sl2[j] != 0, sxl[j] / pick(sl2[j] != 0, sl2[j], 1.f), 0.f); /* used only when tm > 0, where sl2 > 0 */
            ts[j] = pick(tm[j] > 0, s0, ts[j]);
            tm[j] = pick(tm[j] > 0, 0.f, tm[j]);
            den[j] = D; /* reused: > 0 marks a valid candidate */
        }
        for (int i = 0; i < n; i++)
            for (int j = 0; j < NL; j++) {
                float diff = ts[j] * aux[i][j] + tm[j] - xt[i][j];
                diff = mad ? fabsf(diff) : diff * diff;
                err[j] += w[i][j] * diff;
            }
        for (int j = 0; j < NL; j++) {
            int take = den[j] > 0 && err[j] < best[j];
            best[j] = take ? err[j] : best[j];
            sc[j] = take ? ts[j] : sc[j];
            bisc[j] = take ? isc[j] : bisc[j];
            bmn[j] = take ? mn[j] : bmn[j]; /* the min these levels were rounded against */
            mn[j] = take ? tm[j] : mn[j];
        }
    }
    for (int i = 0; i < n; i++) /* the same operations as in the loops: the same levels */
        for (int j = 0; j < NL; j++) aux[i][j] = clampf(rne(bisc[j] * (xt[i][j] - bmn[j])), nmax);
    int out_of_range = 0;
    for (int j = 0; j < NL; j++) {
        /* a far lane's levels may be NaN / out of range (converting those is undefined): the caller redoes
         * such a group with the scalar form, so they are not stored */
        for (int i = 0; i < n; i++) L[n * j + i] = flat[j] || far[j] ? 0 : (uint8_t)aux[i][j];
        scale[j] = flat[j] ? 0.f : sc[j];
        neg_min[j] = flat[j] ? -mn0[j] : -mn[j];
        out_of_range |= !flat[j] && far[j];
    }
    return out_of_range;
}

/* fit_groups specialised (n and mad constant, so the loops unroll and vectorize as written), each in two
 * builds: the default target and, on x86-64 with GCC, one for AVX-512 whose 16 lanes are one
 * 512-bit register (GCC's -march=native keeps 256-bit vectors by default); st_ggml_simd_wide() picks at run
 * time (the CPU has AVX-512F/DQ/BW/VL and SHARDTUNE_GGUF_SIMD is not "avx2"). Both are the same C, so the same
 * operations in the same order per lane: the same bytes (tests/unit/test_gguf_kquant.c). noinline: under
 * -march=native the default target has AVX-512 too, and inlined into it the 512-bit preference is lost. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define KQ_WIDE __attribute__((noinline, target("avx512f,avx512dq,avx512bw,avx512vl,prefer-vector-width=512")))
static atomic_int kq_wide_choice = -1;
void st_ggml_simd_reset(void) { atomic_store(&kq_wide_choice, -1); }
int st_ggml_simd_wide(void) {
    int v = atomic_load(&kq_wide_choice);
    if (v < 0) {
        const char *e = getenv("SHARDTUNE_GGUF_SIMD");
        __builtin_cpu_init();
        v = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
            __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") && !(e && strcmp(e, "avx2") == 0);
        atomic_store(&kq_wide_choice, v);
    }
    return v;
}
static KQ_WIDE int fit_groups32_wide(const float *x, const float w[32][NL], const affine_fit *p, uint8_t *L,
                                     float *scale, float *neg_min) {
    return fit_groups(x, 32, w, p, 0, L, scale, neg_min);
}
static KQ_WIDE int fit_groups16_mad_wide(const float *x, const float w[32][NL], const affine_fit *p, uint8_t *L,
                                         float *scale, float *neg_min) {
    return fit_groups(x, 16, w, p, 1, L, scale, neg_min);
}
#else
void st_ggml_simd_reset(void) {}
int st_ggml_simd_wide(void) { return 0; }
#endif
static int fit_groups32(const float *x, const float w[32][NL], const affine_fit *p, uint8_t *L, float *scale,
                        float *neg_min) {
#ifdef KQ_WIDE
    if (st_ggml_simd_wide()) return fit_groups32_wide(x, w, p, L, scale, neg_min);
#endif
    return fit_groups(x, 32, w, p, 0, L, scale, neg_min);
}
static int fit_groups16_mad(const float *x, const float w[32][NL], const affine_fit *p, uint8_t *L, float *scale,
                            float *neg_min) {
#ifdef KQ_WIDE
    if (st_ggml_simd_wide()) return fit_groups16_mad_wide(x, w, p, L, scale, neg_min);
#endif
    return fit_groups(x, 16, w, p, 1, L, scale, neg_min);
}

/* Q4_K / Q5_K (same scheme, 4 or 5-bit levels): 8 groups of 32 fitted independently (weights rms(x) + |x|),
 * their scales and mins quantized to 6 bits against the block's largest (d = max scale / 63, dmin = max
 * min / 63), then every element re-quantized with the 6-bit scale and min it will be decoded with.
 * Writes d, dmin and the 12 scale bytes at out[0..15] and the levels to L. */
/* The 16 groups of 32 of two consecutive super-blocks (512 floats) fitted in the lanes, weights rms + |x|. */
static int kx_fit_pair(const float *x, const affine_fit *p, uint8_t *L, float *scales, float *mins) {
    float wt[32][NL], sx2[NL] = {0}, av[NL];
    for (int i = 0; i < 32; i++)
        for (int j = 0; j < NL; j++) sx2[j] += x[32 * j + i] * x[32 * j + i];
    for (int j = 0; j < NL; j++) av[j] = sqrtf(sx2[j] / 32);
    for (int i = 0; i < 32; i++)
        for (int j = 0; j < NL; j++) wt[i][j] = av[j] + fabsf(x[32 * j + i]);
    return fit_groups32(x, (const float(*)[NL])wt, p, L, scales, mins);
}

/* fitted: L, scales and mins hold the sub-block fits (kx_fit_pair); else they are fitted here, one at a time. */
static void kx_block(const float *x, uint8_t *out, const affine_fit *p, int fitted, uint8_t *L, float *scales,
                     float *mins) {
    float w[32], max_scale = 0, max_min = 0;
    if (!fitted) {
        for (int j = 0; j < 8; j++) {
            const float *g = x + 32 * j;
            float sum_x2 = 0;
            for (int l = 0; l < 32; l++) sum_x2 += g[l] * g[l];
            float av_x = sqrtf(sum_x2 / 32);
            for (int l = 0; l < 32; l++) w[l] = av_x + fabsf(g[l]);
            scales[j] = fit_affine(g, w, 32, p, L + 32 * j, &mins[j]);
        }
    }
    for (int j = 0; j < 8; j++) { /* in group order, as ggml's loop does */
        if (scales[j] > max_scale) max_scale = scales[j];
        if (mins[j] > max_min) max_min = mins[j];
    }
    float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f, inv_min = max_min > 0 ? 63.f / max_min : 0.f;
    uint8_t *sc = out + 4, ls[8], lm[8];
    for (int j = 0; j < 8; j++) {
        ls[j] = (uint8_t)round_ne(inv_scale * scales[j]); /* 0..63 up to rounding: clamped as ggml does */
        lm[j] = (uint8_t)round_ne(inv_min * mins[j]);
        if (ls[j] > 63) ls[j] = 63;
        if (lm[j] > 63) lm[j] = 63;
    }
    /* 12 bytes: groups 0-3 in the low 6 bits of bytes 0-3 (scale) / 4-7 (min); groups 4-7 split into a
     * low nibble pair in bytes 8-11 and their top 2 bits in the high bits of bytes 0-7 */
    for (int j = 0; j < 4; j++) {
        sc[j] = (uint8_t)(ls[j] | ((ls[j + 4] >> 4) << 6));
        sc[j + 4] = (uint8_t)(lm[j] | ((lm[j + 4] >> 4) << 6));
        sc[j + 8] = (uint8_t)((ls[j + 4] & 0xF) | ((lm[j + 4] & 0xF) << 4));
    }
    put_f16(out, max_scale / 63.f);
    put_f16(out + 2, max_min / 63.f);
    float d16 = get_f16(out), dmin16 = get_f16(out + 2);
    for (int j = 0; j < 8; j++) {
        const float d = d16 * ls[j];
        if (!d) continue; /* keeps the search's levels, as ggml does */
        const float dm = dmin16 * lm[j];
        for (int i = 0; i < 32; i++)
            L[32 * j + i] = (uint8_t)clampi(round_ne((x[32 * j + i] + dm) / d), 0, p->nmax);
    }
}

/* Q4_K (144 bytes): each 64 elements, element l in the low nibble of qs byte l, l+32 in the high one. */
static void q4_K_pack(const uint8_t *L, uint8_t *out) {
    uint8_t *q = out + 16;
    for (int j = 0; j < QKK; j += 64, q += 32)
        for (int l = 0; l < 32; l++) q[l] = (uint8_t)(L[j + l] | (L[j + l + 32] << 4));
}

/* Q5_K (176 bytes): qh[32] after the scales, then qs[128] as Q4_K's low nibbles; the fifth bit of element
 * 64 k + l goes to bit 2k of qh[l], of element 64 k + 32 + l to bit 2k+1. */
static void q5_K_pack(const uint8_t *L, uint8_t *out) {
    uint8_t *qh = out + 16, *q = out + 48;
    memset(qh, 0, 32);
    for (int j = 0, k = 0; j < QKK; j += 64, q += 32, k += 2)
        for (int l = 0; l < 32; l++) {
            uint8_t a = L[j + l], b = L[j + l + 32];
            qh[l] |= (uint8_t)(((a >> 4) << k) | ((b >> 4) << (k + 1)));
            q[l] = (uint8_t)((a & 0xF) | ((b & 0xF) << 4));
        }
}

/* nb Q4_K / Q5_K super-blocks: pairs fitted in the 16 lanes (a last odd one next to a copy of itself). */
static void kx_row(const float *x, int64_t nb, uint8_t *out, st_ggml_type t) {
    const affine_fit *p = t == ST_GGML_Q4_K ? &FIT_Q4 : &FIT_Q5;
    const size_t bytes = t == ST_GGML_Q4_K ? 144 : 176;
    for (int64_t b = 0; b < nb; b += 2) {
        float pair[2 * QKK], scales[16], mins[16];
        uint8_t L[2 * QKK];
        const float *src = x + b * QKK;
        if (b + 1 == nb) {
            memcpy(pair, src, sizeof(float) * QKK);
            memcpy(pair + QKK, src, sizeof(float) * QKK);
            src = pair;
        }
        int fitted = !kx_fit_pair(src, p, L, scales, mins); /* else: out of the lanes' range, one at a time */
        for (int h = 0; h < 2 && b + h < nb; h++) {
            uint8_t *o = out + (size_t)(b + h) * bytes;
            kx_block(src + h * QKK, o, p, fitted, L + h * QKK, scales + 8 * h, mins + 8 * h);
            (t == ST_GGML_Q4_K ? q4_K_pack : q5_K_pack)(L + h * QKK, o);
        }
    }
}

/* One super-block with the sub-blocks fitted one at a time (the reference form). */
static void kx_block_scalar(const float *x, uint8_t *out, st_ggml_type t) {
    uint8_t L[QKK];
    float scales[8], mins[8];
    kx_block(x, out, t == ST_GGML_Q4_K ? &FIT_Q4 : &FIT_Q5, 0, L, scales, mins);
    (t == ST_GGML_Q4_K ? q4_K_pack : q5_K_pack)(L, out);
}

/* Q2_K (84 bytes: scales[16], qs[64], f16 d, f16 dmin): 16 groups of 16 fitted with levels 0..3 (weights |x|,
 * absolute error), scale and min of each group as 4-bit multiples of d = max scale / 15 and dmin = max min
 * / 15 (low / high nibble of scales[g]; not clamped, as ggml does), then re-quantized with them. Each 128
 * elements: element l + 32 i in bits 2i..2i+1 of qs byte l. */
static void q2_K_block(const float *x, uint8_t *out, int lanes) {
    uint8_t L[QKK], *sc = out, *qs = out + 16;
    float w[16], scales[16], mins[16], max_scale = 0, max_min = 0;
    if (lanes) { /* the 16 groups in the 16 lanes of fit_groups */
        float wt[32][NL];
        for (int i = 0; i < 16; i++)
            for (int j = 0; j < NL; j++) wt[i][j] = fabsf(x[16 * j + i]);
        lanes = !fit_groups16_mad(x, (const float(*)[NL])wt, &FIT_Q2, L, scales, mins); /* else one at a time */
    }
    for (int g = 0; g < 16; g++) {
        if (!lanes) {
            for (int l = 0; l < 16; l++) w[l] = fabsf(x[16 * g + l]);
            scales[g] = fit_affine(x + 16 * g, w, 16, &FIT_Q2, L + 16 * g, &mins[g]);
        }
        if (scales[g] > max_scale) max_scale = scales[g];
        if (mins[g] > max_min) max_min = mins[g];
    }
    memset(sc, 0, 16);
    if (max_scale > 0) {
        float iscale = 15.f / max_scale;
        for (int g = 0; g < 16; g++) sc[g] = (uint8_t)round_ne(iscale * scales[g]);
    }
    put_f16(out + 80, max_scale > 0 ? max_scale / 15.f : 0.f);
    if (max_min > 0) {
        float iscale = 15.f / max_min;
        for (int g = 0; g < 16; g++) sc[g] = (uint8_t)(sc[g] | ((unsigned)round_ne(iscale * mins[g]) << 4)); /* low bits as ggml's int shift */
    }
    put_f16(out + 82, max_min > 0 ? max_min / 15.f : 0.f);
    float d16 = get_f16(out + 80), dmin16 = get_f16(out + 82);
    for (int g = 0; g < 16; g++) {
        const float d = d16 * (sc[g] & 0xF);
        if (!d) continue;
        const float dm = dmin16 * (sc[g] >> 4);
        for (int i = 0; i < 16; i++) L[16 * g + i] = (uint8_t)clampi(round_ne((x[16 * g + i] + dm) / d), 0, 3);
    }
    for (int j = 0; j < QKK; j += 128)
        for (int l = 0; l < 32; l++)
            qs[j / 4 + l] = (uint8_t)(L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6));
}

/* The value of largest magnitude in a 16-element group (the first on ties), its magnitude in *amax. */
static float group_extreme16(const float *x, float *amax) {
    float max = 0;
    *amax = 0;
    for (int i = 0; i < 16; i++) {
        float ax = fabsf(x[i]);
        if (ax > *amax) {
            *amax = ax;
            max = x[i];
        }
    }
    return max;
}

/* One 16-element group, symmetric 3-bit levels -4..3: start from the scale that puts the value of largest
 * magnitude at -4, then up to 5 sweeps that move single levels while that raises sum(w x l)^2 / sum(w l^2)
 * (w = x^2). Returns the least-squares scale; L gets levels + 4. (make_q3_quants with nmax 4, rmse.) */
static float fit_group3(const float *x, int8_t *L) {
    float amax, max = group_extreme16(x, &amax);
    if (amax < EPS_GROUP) {
        memset(L, 0, 16);
        return 0.f;
    }
    float iscale = -4 / max, sumlx = 0, suml2 = 0;
    for (int i = 0; i < 16; i++) {
        int l = clampi(round_ne(iscale * x[i]), -4, 3);
        L[i] = (int8_t)l;
        float w = x[i] * x[i];
        sumlx += w * x[i] * l;
        suml2 += w * l * l;
    }
    for (int itry = 0; itry < 5; itry++) {
        int changed = 0;
        for (int i = 0; i < 16; i++) {
            float w = x[i] * x[i], slx = sumlx - w * x[i] * L[i];
            if (!(slx > 0)) continue;
            float sl2 = suml2 - w * L[i] * L[i];
            int nl = clampi(round_ne(x[i] * sl2 / slx), -4, 3);
            if (nl == L[i]) continue;
            slx += w * x[i] * nl;
            sl2 += w * nl * nl;
            if (sl2 > 0 && slx * slx * suml2 > sumlx * sumlx * sl2) {
                L[i] = (int8_t)nl;
                sumlx = slx;
                suml2 = sl2;
                changed++;
            }
        }
        if (!changed) break;
    }
    for (int i = 0; i < 16; i++) L[i] = (int8_t)(L[i] + 4);
    return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

/* Q3_K (110 bytes: hmask[32], qs[64], scales[12], f16 d): 16 groups of 16 fitted by fit_group3, their scales
 * as 6-bit signed multiples of d = -max/32 (low nibbles of groups 0-7 / 8-15 in the low / high nibble of
 * scales[0..7], the top 2 bits of group g in bits 2(g/4) of scales[8 + g%4]); then re-quantized. The third
 * bit of element j goes to bit j/32 of hmask[j%32]; the low 2 bits are packed as Q2_K's. */
static void q3_K_block(const float *x, uint8_t *out) {
    int8_t L[QKK];
    uint8_t *hm = out, *qs = out + 32, *sc = out + 96;
    float scales[16], max_scale = 0, amax = 0;
    for (int g = 0; g < 16; g++) {
        scales[g] = fit_group3(x + 16 * g, L + 16 * g);
        if (fabsf(scales[g]) > amax) {
            amax = fabsf(scales[g]);
            max_scale = scales[g];
        }
    }
    memset(sc, 0, 12);
    if (max_scale != 0) {
        float iscale = -32.f / max_scale;
        for (int g = 0; g < 16; g++) {
            int l = clampi((int8_t)round_ne(iscale * scales[g]), -32, 31) + 32;
            if (g < 8) sc[g] = (uint8_t)(l & 0xF);
            else sc[g - 8] = (uint8_t)(sc[g - 8] | ((l & 0xF) << 4));
            sc[g % 4 + 8] = (uint8_t)(sc[g % 4 + 8] | ((l >> 4) << (2 * (g / 4))));
        }
        put_f16(out + 108, 1 / iscale);
    } else {
        put_f16(out + 108, 0.f);
    }
    float d16 = get_f16(out + 108);
    for (int g = 0; g < 16; g++) {
        int s = g < 8 ? sc[g] & 0xF : sc[g - 8] >> 4;
        s = (s | (((sc[8 + g % 4] >> (2 * (g / 4))) & 3) << 4)) - 32;
        const float d = d16 * s;
        if (!d) continue;
        for (int i = 0; i < 16; i++) L[16 * g + i] = (int8_t)(clampi(round_ne(x[16 * g + i] / d), -4, 3) + 4);
    }
    memset(hm, 0, 32);
    for (int j = 0; j < QKK; j++)
        if (L[j] > 3) {
            hm[j % 32] = (uint8_t)(hm[j % 32] | (1u << (j / 32)));
            L[j] = (int8_t)(L[j] - 4);
        }
    for (int j = 0; j < QKK; j += 128)
        for (int l = 0; l < 32; l++)
            qs[j / 4 + l] = (uint8_t)(L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6));
}

/* Sums of w*x*l and w*l*l (w = x^2) for levels l = clamp(round(iscale*x), -32, 31); L gets l + 32. */
static void sym_sums(const float *x, float iscale, int8_t *L, float *sumlx, float *suml2) {
    float a = 0, b = 0;
    for (int i = 0; i < 16; i++) {
        int l = clampi(round_ne(iscale * x[i]), -32, 31);
        if (L) L[i] = (int8_t)(l + 32);
        float w = x[i] * x[i];
        a += w * x[i] * l;
        b += w * l * l;
    }
    *sumlx = a;
    *suml2 = b;
}

/* One 16-element group, symmetric 6-bit levels -32..31: the scale that puts the value of largest magnitude
 * at -32, then 18 nearby inverse scales, the best by weighted (x^2) least squares. (make_qx_quants with
 * nmax 32, rmse_type 1.) Returns the scale; L gets levels + 32. */
static float fit_group6(const float *x, int8_t *L) {
    float amax, max = group_extreme16(x, &amax);
    if (amax < EPS_GROUP) {
        memset(L, 0, 16);
        return 0.f;
    }
    float iscale = -32 / max, sumlx, suml2;
    sym_sums(x, iscale, L, &sumlx, &suml2);
    float scale = suml2 ? sumlx / suml2 : 0.0f, best = scale * sumlx;
    for (int is = -9; is <= 9; is++) {
        if (is == 0) continue;
        iscale = -(32 + 0.1f * is) / max;
        sym_sums(x, iscale, NULL, &sumlx, &suml2);
        if (suml2 > 0 && sumlx * sumlx > best * suml2) {
            sym_sums(x, iscale, L, &sumlx, &suml2);
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    return scale;
}

/* fit_group6 for the 16 groups of a super-block at once, lane g = group g (16 lanes: one AVX-512 register,
 * two AVX2 ones): the same operations in the same order within each lane, branch-free, so that the loops
 * vectorize; bit-identical to 16 fit_group6 calls (tests/unit/test_gguf_kquant.c). Groups whose largest
 * magnitude is below EPS_GROUP compute on a placeholder and are zeroed at the end, as fit_group6 returns. */
#define NG 16
static inline float clamp6(float v) { return v < -32.f ? -32.f : v > 31.f ? 31.f : v; }

static inline __attribute__((always_inline)) void fit_groups6_body(const float *x, int8_t *L, float *scale) {
    float xt[16][NG], w2[16][NG], w3[16][NG], mx[NG], am[NG], sc[NG], best[NG], bisc[NG];
    for (int i = 0; i < 16; i++)
        for (int g = 0; g < NG; g++) {
            xt[i][g] = x[16 * g + i];
            w2[i][g] = xt[i][g] * xt[i][g];   /* the weight w = x^2 */
            w3[i][g] = w2[i][g] * xt[i][g];   /* w * x, as (w * x) * l below rounds it */
        }
    for (int g = 0; g < NG; g++) mx[g] = am[g] = 0;
    for (int i = 0; i < 16; i++)
        for (int g = 0; g < NG; g++) {
            float ax = fabsf(xt[i][g]);
            int more = ax > am[g];
            am[g] = more ? ax : am[g];
            mx[g] = more ? xt[i][g] : mx[g];
        }
    for (int g = 0; g < NG; g++) mx[g] = am[g] < EPS_GROUP ? 1.f : mx[g];
    for (int is = 0; is <= 18; is++) { /* is 0: the start (-32 / max); then -9..9 without 0 */
        int step = is == 0 ? 0 : is <= 9 ? is - 10 : is - 9;
        float isc[NG], a[NG] = {0}, b[NG] = {0};
        const float num = step == 0 ? -32.f : -(32 + 0.1f * step);
        for (int g = 0; g < NG; g++) isc[g] = num / mx[g];
        for (int i = 0; i < 16; i++)
            for (int g = 0; g < NG; g++) {
                float l = clamp6(rne(isc[g] * xt[i][g]));
                a[g] += w3[i][g] * l;
                b[g] += w2[i][g] * l * l;
            }
        /* the selects by pick and & for &&, so that the lane loops vectorize (fit_groups) */
        if (is == 0) {
            for (int g = 0; g < NG; g++) {
                sc[g] = pick(b[g] != 0, a[g] / pick(b[g] != 0, b[g], 1.f), 0.0f);
                best[g] = sc[g] * a[g];
                bisc[g] = isc[g];
            }
        } else {
            for (int g = 0; g < NG; g++) {
                int take = (b[g] > 0) & (a[g] * a[g] > best[g] * b[g]);
                sc[g] = pick(take, a[g] / pick(b[g] > 0, b[g], 1.f), sc[g]);
                best[g] = pick(take, sc[g] * a[g], best[g]);
                bisc[g] = pick(take, isc[g], bisc[g]); /* the winning levels: recomputed below */
            }
        }
    }
    for (int g = 0; g < NG; g++) {
        int flat = am[g] < EPS_GROUP;
        /* a level is NaN where bisc is infinite (a group max near the smallest normal) and x is 0: level 0
         * (stored 32), without the undefined float-to-int conversion of a NaN */
        for (int i = 0; i < 16; i++) {
            float l = clamp6(rne(bisc[g] * xt[i][g]));
            L[16 * g + i] = (int8_t)(flat ? 0 : l != l ? 32 : (int)l + 32);
        }
        scale[g] = flat ? 0.f : sc[g];
    }
}

static void fit_groups6_plain(const float *x, int8_t *L, float *scale) { fit_groups6_body(x, L, scale); }
#ifdef KQ_WIDE
static KQ_WIDE void fit_groups6_wide(const float *x, int8_t *L, float *scale) { fit_groups6_body(x, L, scale); }
#endif
static void fit_groups6(const float *x, int8_t *L, float *scale) {
#ifdef KQ_WIDE
    if (st_ggml_simd_wide()) {
        fit_groups6_wide(x, L, scale);
        return;
    }
#endif
    fit_groups6_plain(x, L, scale);
}

/* Q6_K: 16 groups of 16 fitted independently, their scales quantized to int8 against the one of largest
 * magnitude (d = -max/128), then every element re-quantized with the scale it will be decoded with. */
static void q6_K_block(const float *x, uint8_t *out, int lanes) {
    int8_t L[QKK];
    float scales[16], max_scale = 0, max_abs = 0;
    if (lanes) fit_groups6(x, L, scales);
    for (int g = 0; g < 16; g++) {
        if (!lanes) scales[g] = fit_group6(x + 16 * g, L + 16 * g);
        if (fabsf(scales[g]) > max_abs) {
            max_abs = fabsf(scales[g]);
            max_scale = scales[g];
        }
    }
    uint8_t *ql = out, *qh = out + 128, *sc = out + 192;
    if (max_abs < EPS_GROUP) {
        memset(out, 0, 210);
        return;
    }
    float iscale = -128.f / max_scale;
    put_f16(out + 208, 1 / iscale);
    float d16 = get_f16(out + 208);
    for (int g = 0; g < 16; g++) {
        int s = round_ne(iscale * scales[g]);
        sc[g] = (uint8_t)(int8_t)(s < 127 ? s : 127);
    }
    for (int g = 0; g < 16; g++) {
        const float d = d16 * (int8_t)sc[g];
        if (!d) continue;
        for (int i = 0; i < 16; i++) L[16 * g + i] = (int8_t)(clampi(round_ne(x[16 * g + i] / d), -32, 31) + 32);
    }
    /* each 128 elements: low nibbles of l, l+64 in ql[l] and of l+32, l+96 in ql[l+32]; the four high
     * 2-bit pairs in qh[l] */
    for (int j = 0; j < QKK; j += 128, ql += 64, qh += 32)
        for (int l = 0; l < 32; l++) {
            const uint8_t *u = (const uint8_t *)L + j + l;
            ql[l] = (uint8_t)((u[0] & 0xF) | ((u[64] & 0xF) << 4));
            ql[l + 32] = (uint8_t)((u[32] & 0xF) | ((u[96] & 0xF) << 4));
            qh[l] = (uint8_t)((u[0] >> 4) | ((u[32] >> 4) << 2) | ((u[64] >> 4) << 4) | ((u[96] >> 4) << 6));
        }
}

/* Q5_0: d = (value of largest magnitude, first on ties) / -16, q = min(31, trunc(x/d + 16.5)); low nibbles
 * as Q4_0 (element j in byte j, j+16 in its high nibble), the fifth bits in a 32-bit mask. */
static void q5_0_block(const float *x, uint8_t *out) {
    float amax = 0, max = 0;
    for (int j = 0; j < 32; j++)
        if (amax < fabsf(x[j])) {
            amax = fabsf(x[j]);
            max = x[j];
        }
    const float d = max / -16, id = d ? 1.0f / d : 0.0f;
    put_f16(out, d);
    uint32_t qh = 0;
    for (int j = 0; j < 16; j++) {
        int8_t a = (int8_t)(x[j] * id + 16.5f), b = (int8_t)(x[16 + j] * id + 16.5f);
        uint8_t qa = (uint8_t)(a < 31 ? a : 31), qb = (uint8_t)(b < 31 ? b : 31);
        out[6 + j] = (uint8_t)((qa & 0xF) | ((qb & 0xF) << 4));
        qh |= ((uint32_t)(qa >> 4) << j) | ((uint32_t)(qb >> 4) << (j + 16));
    }
    for (int k = 0; k < 4; k++) out[2 + k] = (uint8_t)(qh >> (8 * k));
}

/* Q5_1 (24 bytes: f16 d, f16 m, qh[4], qs[16]): x = d*q + m with m = min, d = (max - min) / 31,
 * q = (uint8)((x - m)/d + 0.5); nibbles and fifth bits as Q5_0. */
static void q5_1_block(const float *x, uint8_t *out) {
    float min = FLT_MAX, max = -FLT_MAX;
    for (int j = 0; j < 32; j++) {
        if (x[j] < min) min = x[j];
        if (x[j] > max) max = x[j];
    }
    const float d = (max - min) / 31, id = d ? 1.0f / d : 0.0f;
    put_f16(out, d);
    put_f16(out + 2, min);
    uint32_t qh = 0;
    for (int j = 0; j < 16; j++) {
        uint8_t a = (uint8_t)((x[j] - min) * id + 0.5f), b = (uint8_t)((x[16 + j] - min) * id + 0.5f);
        out[8 + j] = (uint8_t)((a & 0xF) | ((b & 0xF) << 4));
        qh |= ((uint32_t)((a & 0x10u) >> 4) << j) | ((uint32_t)((b & 0x10u) >> 4) << (j + 16));
    }
    for (int k = 0; k < 4; k++) out[4 + k] = (uint8_t)(qh >> (8 * k));
}

void st_ggml_encode_kquant(st_ggml_type t, const float *x, int64_t n, uint8_t *out) {
    if (t == ST_GGML_Q4_K || t == ST_GGML_Q5_K) {
        kx_row(x, n / QKK, out, t);
        return;
    }
    const size_t bytes = st_ggml_row_bytes(t, st_ggml_block_size(t));
    const int64_t nb = n / st_ggml_block_size(t);
    for (int64_t b = 0; b < nb; b++) {
        const float *xb = x + b * st_ggml_block_size(t);
        uint8_t *ob = out + (size_t)b * bytes;
        switch (t) {
        case ST_GGML_Q2_K: q2_K_block(xb, ob, 1); break;
        case ST_GGML_Q3_K: q3_K_block(xb, ob); break;
        case ST_GGML_Q6_K: q6_K_block(xb, ob, 1); break;
        case ST_GGML_Q5_0: q5_0_block(xb, ob); break;
        case ST_GGML_Q5_1: q5_1_block(xb, ob); break;
        default: return;
        }
    }
}

void st_ggml_kquant_scalar(st_ggml_type t, const float *x, int64_t n, uint8_t *out) {
    for (int64_t b = 0; b < n / QKK; b++) {
        if (t == ST_GGML_Q4_K) kx_block_scalar(x + b * QKK, out + b * 144, t);
        if (t == ST_GGML_Q5_K) kx_block_scalar(x + b * QKK, out + b * 176, t);
        if (t == ST_GGML_Q6_K) q6_K_block(x + b * QKK, out + b * 210, 0);
        if (t == ST_GGML_Q2_K) q2_K_block(x + b * QKK, out + b * 84, 0);
    }
}
