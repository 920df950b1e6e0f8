/* gguf_quant.c — ggml's tensor encodings: f16, bf16, Q8_0, Q4_0 (see gguf.h; the k-quants are in gguf_kquant.c).
 *
 * Bit-exactness with ggml's reference quantizers (ggml-quants.c quantize_row_*_ref) needs the same fp32
 * operation order: the build uses -march=native, where GCC would fuse `x*id + 8.5f` into one FMA with a
 * different rounding, so the encoders are compiled with fp-contract off. With AVX2 + F16C, Q8_0 / Q4_0 blocks
 * are encoded 8 lanes at a time by the same operations, and on CPUs with AVX-512 (chosen at run time:
 * st_ggml_simd_wide) 16 blocks at a time in 16 lanes (st_ggml_encode_reference keeps the scalar form). */
#include "checkpoints/gguf.h"

#include <math.h>
#include <string.h>
#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "common/error.h"

#define QK 32 /* elements per Q8_0 / Q4_0 block */

static const struct { const char *name; st_ggml_type t; } k_types[] = {
    {"f32", ST_GGML_F32}, {"f16", ST_GGML_F16}, {"bf16", ST_GGML_BF16}, {"q8_0", ST_GGML_Q8_0}, {"q4_0", ST_GGML_Q4_0},
    {"q2_K", ST_GGML_Q2_K}, {"q3_K", ST_GGML_Q3_K}, {"q4_K", ST_GGML_Q4_K}, {"q5_K", ST_GGML_Q5_K},
    {"q6_K", ST_GGML_Q6_K}, {"q4_K_M", ST_GGUF_MIX_Q4_K_M}, {"q5_K_M", ST_GGUF_MIX_Q5_K_M},
    {"q5_0", ST_GGML_Q5_0}, {"q5_1", ST_GGML_Q5_1},
};
#define N_CLI_TYPES 12 /* the first twelve are --quant values; q5_0 / q5_1 only come as k-quant fallbacks */

int st_ggml_type_parse(const char *s, st_ggml_type *out) {
    for (size_t i = 0; i < N_CLI_TYPES; i++)
        if (strcmp(s, k_types[i].name) == 0) {
            *out = k_types[i].t;
            return 0;
        }
    return st_fail(ST_EINVAL, "--quant '%.32s' is not supported (f32, f16, bf16, q8_0, q4_0, q2_K, q3_K, q4_K, "
                   "q5_K, q6_K, q4_K_M or q5_K_M)", s);
}

const char *st_ggml_type_name(st_ggml_type t) {
    for (size_t i = 0; i < sizeof k_types / sizeof k_types[0]; i++)
        if (k_types[i].t == t) return k_types[i].name;
    return "?";
}

size_t st_ggml_row_bytes(st_ggml_type t, int64_t n) {
    switch (t) {
    case ST_GGML_F32: return (size_t)n * 4;
    case ST_GGML_F16:
    case ST_GGML_BF16: return (size_t)n * 2;
    case ST_GGML_Q8_0: return (size_t)(n / QK) * (2 + QK);
    case ST_GGML_Q4_0: return (size_t)(n / QK) * (2 + QK / 2);
    case ST_GGML_Q5_0: return (size_t)(n / QK) * 22;
    case ST_GGML_Q5_1: return (size_t)(n / QK) * 24;
    case ST_GGML_Q2_K: return (size_t)(n / 256) * 84;
    case ST_GGML_Q3_K: return (size_t)(n / 256) * 110;
    case ST_GGML_Q4_K: return (size_t)(n / 256) * 144;
    case ST_GGML_Q5_K: return (size_t)(n / 256) * 176;
    case ST_GGML_Q6_K: return (size_t)(n / 256) * 210;
    default: return 0; /* the mixes are not tensor types */
    }
    return 0;
}

int64_t st_ggml_block_size(st_ggml_type t) {
    switch (t) {
    case ST_GGML_F32:
    case ST_GGML_F16:
    case ST_GGML_BF16: return 1;
    case ST_GGML_Q2_K:
    case ST_GGML_Q3_K:
    case ST_GGML_Q4_K:
    case ST_GGML_Q5_K:
    case ST_GGML_Q6_K:
    case ST_GGUF_MIX_Q4_K_M:
    case ST_GGUF_MIX_Q5_K_M: return 256;
    default: return QK;
    }
}

uint16_t st_fp32_to_fp16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return sign | 0x7e00 | (uint16_t)((ax >> 13) & 0x3ff); /* NaN stays NaN (quiet) */
    if (ax >= 0x477ff000u) return sign | 0x7c00;                                  /* >= 65520 rounds to inf */
    if (ax >= 0x38800000u) {                                                      /* normal half */
        uint32_t r = ax - 0x38000000u;                                            /* rebias 127 -> 15 */
        r = (r + 0xfffu + ((r >> 13) & 1u)) >> 13;                                /* round to nearest even */
        return sign | (uint16_t)r;
    }
    if (ax <= 0x33000000u) return sign; /* <= 2^-25: rounds to zero (the tie goes to even 0) */
    /* subnormal half: value / 2^-24, rounded to nearest even */
    uint32_t m = (ax & 0x7fffffu) | 0x800000u;
    int s = 126 - (int)(ax >> 23);
    uint32_t q = m >> s, rem = m & ((1u << s) - 1), half = 1u << (s - 1);
    if (rem > half || (rem == half && (q & 1u))) q++;
    return sign | (uint16_t)q;
}

uint16_t st_fp32_to_bf16_ggml(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 64); /* quiet NaN */
    return (uint16_t)((u + (0x7fffu + ((u >> 16) & 1u))) >> 16);
}

static void put_u16(uint8_t *p, uint16_t v) {
    p[0] = (uint8_t)(v & 0xff);
    p[1] = (uint8_t)(v >> 8);
}

/* (int)roundf(v) (halves away from zero) for |v| <= 128, in a form the compiler vectorizes: adding the float
 * just below 0.5 and truncating gives the same integer for every float in [-128, 128] (checked exhaustively). */
/* Out of int32's range or NaN (a block scale near the smallest normal makes x / d infinite): INT32_MIN, the value
 * x86's conversion gives there (ggml's (int)roundf does the same), without C's undefined conversion. */
/* (int32_t)v, truncating; INT32_MIN out of range or NaN, as x86's conversion (and ggml's (int8_t) cast of a float,
 * which compiles to it) gives, without C's undefined conversion. */
static inline int32_t trunc_i32(float v) { return v >= -2147483648.f && v < 2147483648.f ? (int32_t)v : INT32_MIN; }

static inline int32_t round_away(float v) {
    return trunc_i32(v + copysignf(0.49999997f, v));
}

/* max |x| over a block, in 8 lanes (max is exact, so the order does not matter; the loop vectorizes). */
static inline float block_amax(const float *x) {
    float m[8] = {0};
    for (int i = 0; i < QK; i += 8)
        for (int k = 0; k < 8; k++) {
            float a = fabsf(x[i + k]);
            m[k] = m[k] > a ? m[k] : a;
        }
    float amax = 0.0f;
    for (int k = 0; k < 8; k++) amax = amax > m[k] ? amax : m[k];
    return amax;
}

/* The value of largest magnitude in a block, the first one on ties (ggml's scan), found in 8 lanes: each lane
 * keeps its own first maximum (strict <, in index order) with its index; lanes are then merged by magnitude,
 * then by the smaller index. */
static inline float block_signed_max(const float *x) {
    float m[8] = {0}, v[8] = {0};
    int idx[8] = {0};
    for (int i = 0; i < QK; i += 8)
        for (int k = 0; k < 8; k++) {
            float a = fabsf(x[i + k]);
            int better = m[k] < a;
            m[k] = better ? a : m[k];
            v[k] = better ? x[i + k] : v[k];
            idx[k] = better ? i + k : idx[k];
        }
    float amax = 0.0f, max = 0.0f;
    int best = QK;
    for (int k = 0; k < 8; k++)
        if (m[k] > amax || (m[k] == amax && m[k] > 0 && idx[k] < best)) {
            amax = m[k];
            max = v[k];
            best = idx[k];
        }
    return max;
}

/* ggml quantize_row_q8_0_ref: d = max|x| / 127, q = roundf(x / d) (half away from zero). */
__attribute__((optimize("fp-contract=off"))) static void q8_0_block(const float *x, uint8_t *out) {
    const float amax = block_amax(x);
    const float d = amax / 127;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    put_u16(out, st_fp32_to_fp16(d));
    int32_t q[QK]; /* via int32 so the loop vectorizes */
    for (int j = 0; j < QK; j++) q[j] = round_away(x[j] * id);
    for (int j = 0; j < QK; j++) out[2 + j] = (uint8_t)(int8_t)q[j];
}

/* ggml quantize_row_q4_0_ref: d = (signed value of largest magnitude, first one on ties) / -8,
 * q = min(15, (int8)(x / d + 8.5)); element j in the low nibble of byte j, element j+16 in the high one. */
__attribute__((optimize("fp-contract=off"))) static void q4_0_block(const float *x, uint8_t *out) {
    const float max = block_signed_max(x);
    const float d = max / -8;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    put_u16(out, st_fp32_to_fp16(d));
    for (int j = 0; j < QK / 2; j++) {
        const float x0 = x[j] * id, x1 = x[QK / 2 + j] * id;
        int8_t a = (int8_t)trunc_i32(x0 + 8.5f), b = (int8_t)trunc_i32(x1 + 8.5f);
        uint8_t qa = (uint8_t)(a < 15 ? a : 15), qb = (uint8_t)(b < 15 ? b : 15);
        out[2 + j] = (uint8_t)(qa | (qb << 4));
    }
}

#if defined(__AVX2__) && defined(__F16C__)
/* Q8_0 / Q4_0 in AVX2, a block of 32 as four vectors of 8: the same fp32 operations as q8_0_block /
 * q4_0_block (mul, add, truncating conversion: no FMA, nothing reassociated; max is exact in any order), so
 * the same bytes for finite inputs (tests/unit/test_gguf_kquant.c compares them over random and edge-case
 * blocks; a block of float-subnormal scale, whose 1/d overflows, goes to the scalar form; NaN blocks are not
 * meaningful weights, `export` refuses them). */
static inline __m256 abs8(__m256 v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v); }

static inline float hmax8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

/* 4 x 8 int32 in [-128, 127] -> 32 int8 in element order (packs work per 128-bit half: dwords are regrouped). */
static inline __m256i pack32(const __m256i q[4]) {
    __m256i ab = _mm256_packs_epi32(q[0], q[1]), cd = _mm256_packs_epi32(q[2], q[3]);
    return _mm256_permutevar8x32_epi32(_mm256_packs_epi16(ab, cd), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

static inline void put_f16_fast(uint8_t *p, float f) {
    uint16_t h = (uint16_t)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT); /* = st_fp32_to_fp16 (round to nearest even) */
    memcpy(p, &h, 2);
}

__attribute__((optimize("fp-contract=off"))) static void q8_0_block_avx2(const float *x, uint8_t *out) {
    __m256 v[4], m = _mm256_setzero_ps();
    for (int k = 0; k < 4; k++) {
        v[k] = _mm256_loadu_ps(x + 8 * k);
        m = _mm256_max_ps(abs8(v[k]), m);
    }
    const float d = hmax8(m) / 127;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    if (!isfinite(id)) { /* float-subnormal block: 1/d overflows, and the scalar's conversions of inf rule */
        q8_0_block(x, out);
        return;
    }
    put_f16_fast(out, d);
    const __m256 vid = _mm256_set1_ps(id), half = _mm256_set1_ps(0.49999997f), sign = _mm256_set1_ps(-0.0f);
    __m256i q[4];
    for (int k = 0; k < 4; k++) { /* round_away: + copysign(0.49999997, v), truncate */
        __m256 p = _mm256_mul_ps(v[k], vid);
        q[k] = _mm256_cvttps_epi32(_mm256_add_ps(p, _mm256_or_ps(_mm256_and_ps(p, sign), half)));
    }
    _mm256_storeu_si256((__m256i *)(out + 2), pack32(q));
}

__attribute__((optimize("fp-contract=off"))) static void q4_0_block_avx2(const float *x, uint8_t *out) {
    __m256 v[4], m = _mm256_setzero_ps();
    for (int k = 0; k < 4; k++) {
        v[k] = _mm256_loadu_ps(x + 8 * k);
        m = _mm256_max_ps(abs8(v[k]), m); /* a NaN lane loses to m, as in ggml's scan */
    }
    const float amax = hmax8(m);
    float max = 0.0f;
    if (amax > 0) { /* the first element of that magnitude */
        const __m256 va = _mm256_set1_ps(amax);
        uint32_t mask = 0;
        for (int k = 0; k < 4; k++)
            mask |= (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(abs8(v[k]), va, _CMP_EQ_OQ)) << (8 * k);
        max = x[__builtin_ctz(mask)];
    }
    const float d = max / -8;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    if (!isfinite(id)) { /* as in q8_0_block_avx2 */
        q4_0_block(x, out);
        return;
    }
    put_f16_fast(out, d);
    const __m256 vid = _mm256_set1_ps(id), off = _mm256_set1_ps(8.5f);
    const __m256i top = _mm256_set1_epi32(15);
    __m256i q[4];
    for (int k = 0; k < 4; k++)
        q[k] = _mm256_min_epi32(_mm256_cvttps_epi32(_mm256_add_ps(_mm256_mul_ps(v[k], vid), off)), top);
    __m256i b = pack32(q); /* elements 0-15 low nibbles, 16-31 high nibbles */
    __m128i lo = _mm256_castsi256_si128(b), hi = _mm256_extracti128_si256(b, 1);
    _mm_storeu_si128((__m128i *)(out + 2), _mm_or_si128(lo, _mm_slli_epi16(hi, 4)));
}
#define Q8_0_BLOCK q8_0_block_avx2
#define Q4_0_BLOCK q4_0_block_avx2

/* Eight blocks at a time (a row's blocks in groups of 8; the rest one at a time above): each block's max |x|
 * (q4_0 also max x and min x) as one 8-lane vector, reduced across the 8 blocks at once by a transposing
 * tree (max and min are exact in any order), so the scales d, their inverses and f16 forms come out of one
 * vector division each (IEEE division and conversion round alike in every lane: the scalar code's values)
 * instead of a serial chain of horizontal max, two scalar divisions and a conversion per block. q4_0's
 * signed max, the first element of largest magnitude: amax itself when no element equals -amax, -amax when
 * none equals amax, and the first such element (as q4_0_block_avx2 finds it) when the block holds both. */
#define RED8X8(name, op)                                                                                          \
    static inline __m256 name(const __m256 v[8]) {                                                                \
        __m256 t[4], u[2];                                                                                        \
        for (int k = 0; k < 4; k++)                                                                               \
            t[k] = op(_mm256_unpacklo_ps(v[2 * k], v[2 * k + 1]), _mm256_unpackhi_ps(v[2 * k], v[2 * k + 1]));   \
        for (int k = 0; k < 2; k++)                                                                               \
            u[k] = op(_mm256_shuffle_ps(t[2 * k], t[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)),                          \
                      _mm256_shuffle_ps(t[2 * k], t[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)));                         \
        return op(_mm256_permute2f128_ps(u[0], u[1], 0x20), _mm256_permute2f128_ps(u[0], u[1], 0x31));            \
    }
RED8X8(hmax8x8, _mm256_max_ps)
RED8X8(hmin8x8, _mm256_min_ps)

/* d = num / den per lane, id = d != 0 ? 1 / d : 0, d as f16; returns the lanes whose id is not finite. */
static inline int scales8(__m256 num, float den, float *id, uint16_t *d16) {
    __m256 d = _mm256_div_ps(num, _mm256_set1_ps(den));
    __m256 nz = _mm256_cmp_ps(d, _mm256_setzero_ps(), _CMP_NEQ_UQ);
    __m256 inv = _mm256_and_ps(_mm256_div_ps(_mm256_set1_ps(1.0f), d), nz);
    _mm256_storeu_ps(id, inv);
    _mm_storeu_si128((__m128i *)d16, _mm256_cvtps_ph(d, _MM_FROUND_TO_NEAREST_INT));
    return _mm256_movemask_ps(_mm256_cmp_ps(abs8(inv), _mm256_set1_ps(INFINITY), _CMP_NLT_UQ));
}

__attribute__((optimize("fp-contract=off"))) static void q8_0_blocks8_avx2(const float *x, uint8_t *out) {
    __m256 am[8];
    for (int b = 0; b < 8; b++) {
        const float *xb = x + QK * b;
        __m256 m0 = _mm256_max_ps(abs8(_mm256_loadu_ps(xb)), abs8(_mm256_loadu_ps(xb + 8)));
        __m256 m1 = _mm256_max_ps(abs8(_mm256_loadu_ps(xb + 16)), abs8(_mm256_loadu_ps(xb + 24)));
        am[b] = _mm256_max_ps(m0, m1);
    }
    float id[8];
    uint16_t d16[8];
    int odd = scales8(hmax8x8(am), 127.0f, id, d16);
    const __m256 half = _mm256_set1_ps(0.49999997f), sign = _mm256_set1_ps(-0.0f);
    for (int b = 0; b < 8; b++) {
        const float *xb = x + QK * b;
        uint8_t *o = out + b * (2 + QK);
        if (odd >> b & 1) { /* as in q8_0_block_avx2 */
            q8_0_block(xb, o);
            continue;
        }
        memcpy(o, &d16[b], 2);
        const __m256 vid = _mm256_set1_ps(id[b]);
        __m256i q[4];
        for (int k = 0; k < 4; k++) {
            __m256 p = _mm256_mul_ps(_mm256_loadu_ps(xb + 8 * k), vid);
            q[k] = _mm256_cvttps_epi32(_mm256_add_ps(p, _mm256_or_ps(_mm256_and_ps(p, sign), half)));
        }
        _mm256_storeu_si256((__m256i *)(o + 2), pack32(q));
    }
}

/* The first element of block xb whose magnitude is amax (> 0). */
static inline float first_of_magnitude(const float *xb, float amax) {
    const __m256 va = _mm256_set1_ps(amax);
    uint32_t mask = 0;
    for (int k = 0; k < 4; k++)
        mask |= (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(abs8(_mm256_loadu_ps(xb + 8 * k)), va, _CMP_EQ_OQ)) << (8 * k);
    return xb[__builtin_ctz(mask)];
}

__attribute__((optimize("fp-contract=off"))) static void q4_0_blocks8_avx2(const float *x, uint8_t *out) {
    __m256 am[8], hi[8], lo[8];
    for (int b = 0; b < 8; b++) {
        const float *xb = x + QK * b;
        __m256 v0 = _mm256_loadu_ps(xb), v1 = _mm256_loadu_ps(xb + 8), v2 = _mm256_loadu_ps(xb + 16),
               v3 = _mm256_loadu_ps(xb + 24);
        am[b] = _mm256_max_ps(_mm256_max_ps(abs8(v0), abs8(v1)), _mm256_max_ps(abs8(v2), abs8(v3)));
        hi[b] = _mm256_max_ps(_mm256_max_ps(v0, v1), _mm256_max_ps(v2, v3));
        lo[b] = _mm256_min_ps(_mm256_min_ps(v0, v1), _mm256_min_ps(v2, v3));
    }
    const __m256 a = hmax8x8(am), neg_a = _mm256_xor_ps(a, _mm256_set1_ps(-0.0f));
    const __m256 has_pos = _mm256_cmp_ps(hmax8x8(hi), a, _CMP_EQ_OQ), has_neg = _mm256_cmp_ps(hmin8x8(lo), neg_a, _CMP_EQ_OQ);
    const __m256 zero = _mm256_cmp_ps(a, _mm256_setzero_ps(), _CMP_EQ_OQ);
    /* amax where +amax occurs, else -amax; +0 for an all-zero block (the scan's initial max) */
    __m256 mx = _mm256_andnot_ps(zero, _mm256_blendv_ps(neg_a, a, has_pos));
    int both = _mm256_movemask_ps(_mm256_andnot_ps(zero, _mm256_and_ps(has_pos, has_neg)));
    if (both) { /* +amax and -amax in one block: the first one decides */
        float m[8], av[8];
        _mm256_storeu_ps(m, mx);
        _mm256_storeu_ps(av, a);
        for (int b = 0; b < 8; b++)
            if (both >> b & 1) m[b] = first_of_magnitude(x + QK * b, av[b]);
        mx = _mm256_loadu_ps(m);
    }
    float id[8];
    uint16_t d16[8];
    int odd = scales8(mx, -8.0f, id, d16);
    const __m256 off = _mm256_set1_ps(8.5f);
    const __m256i top = _mm256_set1_epi32(15);
    for (int b = 0; b < 8; b++) {
        const float *xb = x + QK * b;
        uint8_t *o = out + b * (2 + QK / 2);
        if (odd >> b & 1) { /* as in q4_0_block_avx2 */
            q4_0_block(xb, o);
            continue;
        }
        memcpy(o, &d16[b], 2);
        const __m256 vid = _mm256_set1_ps(id[b]);
        __m256i q[4];
        for (int k = 0; k < 4; k++)
            q[k] = _mm256_min_epi32(_mm256_cvttps_epi32(_mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(xb + 8 * k), vid), off)), top);
        __m256i p = pack32(q);
        _mm_storeu_si128((__m128i *)(o + 2), _mm_or_si128(_mm256_castsi256_si128(p), _mm_slli_epi16(_mm256_extracti128_si256(p, 1), 4)));
    }
}
#define Q_HAVE_BLOCKS8 1

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
/* AVX-512 (run-time choice: st_ggml_simd_wide), 16 blocks at a time: each block's max |x| from two 16-lane
 * registers, then the 16 scales d = amax / 127 (q8_0) or max / -8 (q4_0), their inverses and f16 forms
 * in one vector each (IEEE division and conversion round the same in any lane: the same values as the
 * scalar code's), then each block's levels by the same mul / add / truncation as above, narrowed to bytes
 * with the saturating (q8_0, |q| <= 127 anyway) or plain (q4_0, 0..15) down-conversion. */
#define Q_WIDE __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl")))
#define NB16 16

static Q_WIDE inline __m512 abs16(__m512 v) {
    return _mm512_castsi512_ps(_mm512_andnot_si512(_mm512_set1_epi32((int)0x80000000u), _mm512_castps_si512(v)));
}

/* amax[b] = max |x| of block b; signed: sx[b] = the first element of that magnitude (0 when amax is 0). */
static Q_WIDE void blocks16_max(const float *x, float *amax, float *sx, int signed_max) {
    for (int b = 0; b < NB16; b++) {
        __m512 lo = _mm512_loadu_ps(x + QK * b), hi = _mm512_loadu_ps(x + QK * b + 16);
        float a = _mm512_reduce_max_ps(_mm512_max_ps(abs16(lo), abs16(hi)));
        amax[b] = a;
        if (signed_max) {
            float m = 0.0f;
            if (a > 0) {
                __m512 va = _mm512_set1_ps(a);
                uint32_t mask = (uint32_t)_mm512_cmp_ps_mask(abs16(lo), va, _CMP_EQ_OQ) |
                                ((uint32_t)_mm512_cmp_ps_mask(abs16(hi), va, _CMP_EQ_OQ) << 16);
                m = x[QK * b + __builtin_ctz(mask)];
            }
            sx[b] = m;
        }
    }
}

/* d = num / den per lane, id = d != 0 ? 1 / d : 0, and d as f16 (round to nearest even). */
static Q_WIDE void scales16(const float *num, float den, float *id, uint16_t *d16) {
    __m512 d = _mm512_div_ps(_mm512_loadu_ps(num), _mm512_set1_ps(den));
    __mmask16 nz = _mm512_cmp_ps_mask(d, _mm512_setzero_ps(), _CMP_NEQ_UQ);
    _mm512_storeu_ps(id, _mm512_maskz_div_ps(nz, _mm512_set1_ps(1.0f), d));
    _mm256_storeu_si256((__m256i *)d16, _mm512_cvtps_ph(d, _MM_FROUND_TO_NEAREST_INT));
}

__attribute__((optimize("fp-contract=off"))) static Q_WIDE void q8_0_blocks16(const float *x, uint8_t *out) {
    float amax[NB16], id[NB16];
    uint16_t d16[NB16];
    blocks16_max(x, amax, NULL, 0);
    scales16(amax, 127.0f, id, d16);
    const __m512 half = _mm512_set1_ps(0.49999997f), sign = _mm512_set1_ps(-0.0f);
    for (int b = 0; b < NB16; b++) {
        uint8_t *o = out + b * (2 + QK);
        if (!isfinite(id[b])) { /* as in q8_0_block_avx2 */
            q8_0_block(x + QK * b, o);
            continue;
        }
        memcpy(o, &d16[b], 2);
        const __m512 vid = _mm512_set1_ps(id[b]);
        for (int h = 0; h < 2; h++) { /* round_away: + copysign(0.49999997, v), truncate */
            __m512 p = _mm512_mul_ps(_mm512_loadu_ps(x + QK * b + 16 * h), vid);
            __m512i q = _mm512_cvttps_epi32(_mm512_add_ps(p, _mm512_or_ps(_mm512_and_ps(p, sign), half)));
            _mm_storeu_si128((__m128i *)(o + 2 + 16 * h), _mm512_cvtsepi32_epi8(q));
        }
    }
}

__attribute__((optimize("fp-contract=off"))) static Q_WIDE void q4_0_blocks16(const float *x, uint8_t *out) {
    float amax[NB16], mx[NB16], id[NB16];
    uint16_t d16[NB16];
    blocks16_max(x, amax, mx, 1);
    scales16(mx, -8.0f, id, d16);
    const __m512 off = _mm512_set1_ps(8.5f);
    const __m512i top = _mm512_set1_epi32(15);
    for (int b = 0; b < NB16; b++) {
        uint8_t *o = out + b * (2 + QK / 2);
        if (!isfinite(id[b])) {
            q4_0_block(x + QK * b, o);
            continue;
        }
        memcpy(o, &d16[b], 2);
        const __m512 vid = _mm512_set1_ps(id[b]);
        __m128i q[2];
        for (int h = 0; h < 2; h++)
            q[h] = _mm512_cvtepi32_epi8(_mm512_min_epi32(
                _mm512_cvttps_epi32(_mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(x + QK * b + 16 * h), vid), off)), top));
        _mm_storeu_si128((__m128i *)(o + 2), _mm_or_si128(q[0], _mm_slli_epi16(q[1], 4)));
    }
}
#define Q_HAVE_WIDE 1
#endif
#else
#define Q8_0_BLOCK q8_0_block
#define Q4_0_BLOCK q4_0_block
#endif

void st_ggml_encode_reference(st_ggml_type t, const float *x, int64_t n, uint8_t *out) {
    if (t == ST_GGML_Q8_0)
        for (int64_t b = 0; b < n / QK; b++) q8_0_block(x + b * QK, out + b * (2 + QK));
    else if (t == ST_GGML_Q4_0)
        for (int64_t b = 0; b < n / QK; b++) q4_0_block(x + b * QK, out + b * (2 + QK / 2));
    else
        st_ggml_kquant_scalar(t, x, n, out);
}

void st_ggml_encode(st_ggml_type t, const float *x, int64_t n, uint8_t *out) {
    switch (t) {
    case ST_GGML_F32: memcpy(out, x, (size_t)n * 4); break;
    case ST_GGML_F16: {
        int64_t i = 0;
#ifdef __F16C__ /* vcvtps2ph, round to nearest even: the same bits as st_fp32_to_fp16 (NaNs quieted alike) */
        for (; i + 8 <= n; i += 8)
            _mm_storeu_si128((__m128i *)(out + 2 * i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
#endif
        for (; i < n; i++) put_u16(out + 2 * i, st_fp32_to_fp16(x[i]));
        break;
    }
    case ST_GGML_BF16: /* st_fp32_to_bf16_ggml without branches, so the loop vectorizes */
        for (int64_t i = 0; i < n; i++) {
            uint32_t u;
            memcpy(&u, x + i, 4);
            uint16_t r = (uint16_t)((u + (0x7fffu + ((u >> 16) & 1u))) >> 16), q = (uint16_t)((u >> 16) | 64);
            uint16_t h = (u & 0x7fffffffu) > 0x7f800000u ? q : r;
            memcpy(out + 2 * i, &h, 2);
        }
        break;
    case ST_GGML_Q8_0: {
        int64_t b = 0;
#ifdef Q_HAVE_WIDE
        if (st_ggml_simd_wide())
            for (; b + NB16 <= n / QK; b += NB16) q8_0_blocks16(x + b * QK, out + b * (2 + QK));
#endif
#ifdef Q_HAVE_BLOCKS8
        for (; b + 8 <= n / QK; b += 8) q8_0_blocks8_avx2(x + b * QK, out + b * (2 + QK));
#endif
        for (; b < n / QK; b++) Q8_0_BLOCK(x + b * QK, out + b * (2 + QK));
        break;
    }
    case ST_GGML_Q4_0: {
        int64_t b = 0;
#ifdef Q_HAVE_WIDE
        if (st_ggml_simd_wide())
            for (; b + NB16 <= n / QK; b += NB16) q4_0_blocks16(x + b * QK, out + b * (2 + QK / 2));
#endif
#ifdef Q_HAVE_BLOCKS8
        for (; b + 8 <= n / QK; b += 8) q4_0_blocks8_avx2(x + b * QK, out + b * (2 + QK / 2));
#endif
        for (; b < n / QK; b++) Q4_0_BLOCK(x + b * QK, out + b * (2 + QK / 2));
        break;
    }
    default: st_ggml_encode_kquant(t, x, n, out); break; /* q5_0, q5_1, q2_K..q6_K */
    }
}
