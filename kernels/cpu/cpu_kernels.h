/* cpu_kernels.h — private wiring of the CPU backend: the st_cpu_* kernels that fill the table in
 * cpu_backend.c, plus small inline helpers shared by them.
 *
 * Why the helpers look the way they do: we compile without -ffast-math, so GCC will not reorder a
 * float reduction and therefore will not vectorize `s += a[i] * b[i]`. The helpers keep ST_LANES
 * independent partial sums (which GCC maps onto SIMD registers) and combine them in a fixed order,
 * which also makes every reduction deterministic. st_cpu_expf is a branch-free exp that GCC can
 * vectorize (libm's expf is a scalar call). None of these allocate; callers own all buffers. */
#ifndef ST_CPU_KERNELS_H
#define ST_CPU_KERNELS_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include "kernels/kernels.h"

/* Every file of the backend includes this first. Without these two options GCC keeps float compares
 * and sqrtf as branches (a NaN compare may raise an FP flag; sqrtf of a negative sets errno) and so
 * vectorizes none of the loops that clamp, select or take square roots. Neither option changes any
 * computed value: we never read FP exception flags or errno. */
#if defined(__GNUC__) && !defined(__clang__) /* clang (fuzz builds) has no such pragma */
#pragma GCC optimize("no-trapping-math", "no-math-errno")
#endif

/* Below this much work (roughly: floats touched) a kernel runs on the calling thread only:
 * waking the OpenMP team costs a few microseconds. */
#define ST_CPU_PAR_MIN 32768
#define ST_LANES 16

/* ---- inline helpers ---- */

/* sum_i a[i] * b[i] with fixed-order lane accumulation. */
static inline float st_cpu_dot(const float *restrict a, const float *restrict b, int n) {
    float acc[ST_LANES] = {0};
    int i = 0;
    for (; i + ST_LANES <= n; i += ST_LANES)
        for (int l = 0; l < ST_LANES; l++) acc[l] += a[i + l] * b[i + l];
    float s = 0.0f;
    for (int l = 0; l < ST_LANES; l++) s += acc[l];
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* Four dot products of q with k0..k3 sharing the loads of q: out[r] = st_cpu_dot(q, kr, n) bit for bit
 * (same lanes, same combination order). */
static inline void st_cpu_dot4(float out[4], const float *restrict q, const float *restrict k0,
                               const float *restrict k1, const float *restrict k2, const float *restrict k3, int n) {
    float a0[ST_LANES] = {0}, a1[ST_LANES] = {0}, a2[ST_LANES] = {0}, a3[ST_LANES] = {0};
    int i = 0;
    for (; i + ST_LANES <= n; i += ST_LANES)
        for (int l = 0; l < ST_LANES; l++) {
            float x = q[i + l];
            a0[l] += x * k0[i + l];
            a1[l] += x * k1[i + l];
            a2[l] += x * k2[i + l];
            a3[l] += x * k3[i + l];
        }
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
    for (int l = 0; l < ST_LANES; l++) s0 += a0[l], s1 += a1[l], s2 += a2[l], s3 += a3[l];
    for (; i < n; i++) s0 += q[i] * k0[i], s1 += q[i] * k1[i], s2 += q[i] * k2[i], s3 += q[i] * k3[i];
    out[0] = s0, out[1] = s1, out[2] = s2, out[3] = s3;
}

/* sum_i a[i] with fixed-order lane accumulation. */
static inline float st_cpu_sum(const float *restrict a, int n) {
    float acc[ST_LANES] = {0};
    int i = 0;
    for (; i + ST_LANES <= n; i += ST_LANES)
        for (int l = 0; l < ST_LANES; l++) acc[l] += a[i + l];
    float s = 0.0f;
    for (int l = 0; l < ST_LANES; l++) s += acc[l];
    for (; i < n; i++) s += a[i];
    return s;
}

/* max_i a[i] (n >= 1); NaN-agnostic like a plain compare loop. */
static inline float st_cpu_max(const float *restrict a, int n) {
    float acc[ST_LANES];
    for (int l = 0; l < ST_LANES; l++) acc[l] = a[0];
    int i = 0;
    for (; i + ST_LANES <= n; i += ST_LANES)
        for (int l = 0; l < ST_LANES; l++) acc[l] = a[i + l] > acc[l] ? a[i + l] : acc[l];
    float m = acc[0];
    for (int l = 1; l < ST_LANES; l++) m = acc[l] > m ? acc[l] : m;
    for (; i < n; i++) m = a[i] > m ? a[i] : m;
    return m;
}

/* y[i] += s * x[i] */
static inline void st_cpu_axpy(float *restrict y, float s, const float *restrict x, int n) {
    for (int i = 0; i < n; i++) y[i] += s * x[i];
}

/* exp(x) in float, relative error ~2 ulp, vectorizable. Range reduction x = n ln2 + r with
 * |r| <= ln2/2, degree-7 Taylor series for exp(r) (truncation error < 1e-8), then scale by 2^n
 * built directly in the exponent bits. Results below FLT_MIN are flushed to 0, above FLT_MAX
 * give +inf, NaN stays NaN. */
static inline float st_cpu_expf(float x) {
    const float hi = 88.37f, lo = -87.33f;
    float xc = x > hi ? hi : x;
    xc = xc < lo ? lo : xc;
    /* round to nearest integer: adding 1.5 * 2^23 pushes the fraction bits out of the mantissa */
    float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = xc - n * 0.693359375f;   /* ln2 split in a high part with few mantissa bits ... */
    r = r - n * -2.12194440e-4f;       /* ... and the low remainder, so n * ln2_hi is exact */
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t bits = ((int32_t)(n == n ? n : 0.0f) + 127) << 23; /* NaN: no UB cast; p carries the NaN */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    float y = p * scale;
    y = x < lo ? 0.0f : y;
    return x > 88.72f ? __builtin_inff() : y;
}

/* ---- kernels (see kernels/kernels.h for each contract) ---- */

/* cpu_backend.c */
/* 0 when SHARDTUNE_SGEMM (the CPU matmuls' sgemm: unset = oneDNN on AVX-512 when built with it, else OpenBLAS;
 * or "onednn" / "openblas") names a library this build has, else ST_EINVAL / ST_EDEVICE with a message naming the value. */
int st_cpu_sgemm_check(void);

/* "onednn" or "openblas": the library st_cpu_matmul's blocks use in this process (benches print it). */
const char *st_cpu_sgemm_library(void);
/* One single-threaded row-major sgemm through the library st_cpu_matmul's blocks use (SHARDTUNE_SGEMM). */
void st_cpu_sgemm_one(int ta, int tb, int m, int n, int k, float alpha, const float *a, int lda, const float *b,
                      int ldb, float beta, float *c, int ldc);
/* qmatmul (kernels.h): the fused dequantize-matmul, panels of W dequantized per thread (cpu_qmatmul.c). */
void st_cpu_qmatmul(float *c, st_mm_in x, const st_qweight *w, int m, int trans, int bf16, float beta, float *scratch,
                    size_t scratch_floats);
/* The rows of each block st_cpu_matmul splits C into for this shape on the calling thread's team (a multiple of
 * 16, the last block shorter): it splits by rows when m >= n and the product is big enough to wake the team;
 * m when it does not. The sgemm library may order a sum by the call's row count (oneDNN 2.6 on AVX2), so
 * qmatmul runs the same row blocks to keep the whole-matrix path's bits. */
int st_cpu_matmul_rows(int m, int n, int k);
void st_cpu_matmul(float *c, const float *a, const float *b, int m, int n, int k, int trans_a, int trans_b,
                   float alpha, float beta);
void st_cpu_bias_add(float *y, const float *bias, int n, int c);
void st_cpu_add_scalar(float *x, float v, size_t n);
void st_cpu_dora_norm(float *c, float *inv, const float *w, const float *ba, const float *mg, int out, int in,
                      float scale);
void st_cpu_dora_apply(float *y, int ldy, const float *z, const float *base, const float *c, int rows, int out);
void st_cpu_dora_bwd(float *gm, float *base, float *dy, const float *z, const float *c, const float *inv, int rows,
                     int out);
void st_cpu_scale_rows(float *w, const float *c, int out, int in);
void st_cpu_prompt_act(float *r, const float *a, size_t n, int tanh_act);
void st_cpu_prompt_act_bwd(float *dx, const float *a, const float *r, size_t n, int tanh_act);
void st_cpu_lora_dropout(float *out, const float *x, const float *add, int rows, int in, int t, uint64_t key,
                         int64_t sample0, int k, uint64_t thresh, float inv);
void st_cpu_copy_cols(float *dst, int ldd, const float *src, int lds, int rows, int cols, int accumulate);
void st_cpu_bias_bwd(float *dbias, const float *dy, int n, int c);
void st_cpu_scale(float *x, float s, size_t n);
double st_cpu_sumsq(const float *x, size_t n);

/* cpu_bf16.c */
void st_cpu_matmul_bf16(float *c, st_mm_in a, st_mm_in b, const float *bias, int m, int n, int k, int trans_a,
                        int trans_b, float alpha, float beta, float *scratch);
void st_cpu_to_bf16(uint16_t *dst, const float *src, size_t n);
void st_cpu_from_bf16(float *dst, const uint16_t *src, size_t n);
void st_cpu_round_bf16(float *x, size_t n);

/* cpu_norm.c */
void st_cpu_layernorm_fwd(float *out, float *mean, float *rstd, const float *x, const float *w, const float *b,
                          int n, int c, float eps);
void st_cpu_layernorm_bwd(float *dx, float *dw, float *db, const float *dout, const float *x, const float *w,
                          const float *mean, const float *rstd, int n, int c);
void st_cpu_rmsnorm_fwd(float *out, float *rstd, const float *x, const float *w, int n, int c, float eps);
void st_cpu_rmsnorm_bwd(float *dx, float *dw, const float *dout, const float *x, const float *w,
                        const float *rstd, int n, int c);

/* cpu_attention.c */
void st_cpu_rope_fwd(float *qkv, const float *cos, const float *sin, int b, int t, int h, int kvh, int hd);
void st_cpu_rope_bwd(float *dqkv, const float *cos, const float *sin, int b, int t, int h, int kvh, int hd);
void st_cpu_attention_window_fwd(float *out, float *lse, const float *qkv, int b, int t, int h, int kvh, int hd,
                                 int window);
void st_cpu_attention_window_bwd(float *dqkv, const float *dout, const float *qkv, const float *out,
                                 const float *lse, int b, int t, int h, int kvh, int hd, int window);
/* cpu_attention_docs.c: document-packed sequences (kernels.h, attention_docs_fwd and friends). */
void st_cpu_attention_docs_fwd(float *out, float *lse, const float *qkv, const int32_t *pos, int b, int t, int h,
                               int kvh, int hd, int window);
void st_cpu_attention_docs_bwd(float *dqkv, const float *dout, const float *qkv, const float *out, const float *lse,
                               const int32_t *pos, int b, int t, int h, int kvh, int hd, int window);
void st_cpu_rope_pos_fwd(float *qkv, const float *cos, const float *sin, const int32_t *pos, int b, int t, int h,
                         int kvh, int hd);
void st_cpu_rope_pos_bwd(float *dqkv, const float *cos, const float *sin, const int32_t *pos, int b, int t, int h,
                         int kvh, int hd);
void st_cpu_embedding_pos_fwd(float *out, const int32_t *tokens, const float *wte, const float *wpe,
                              const int32_t *pos, int b, int t, int c);
void st_cpu_embedding_pos_bwd(float *dwpe, const float *dout, const int32_t *pos, int b, int t, int c);
void st_cpu_head_rmsnorm_fwd(float *qkv, float *xs, float *rstd, const float *wq, const float *wk, int n, int h,
                             int kvh, int hd, float eps);
void st_cpu_head_rmsnorm_bwd(float *dqkv, float *dwq, float *dwk, const float *xs, const float *rstd,
                             const float *wq, const float *wk, int n, int h, int kvh, int hd);
void st_cpu_attention_fwd(float *out, float *lse, const float *qkv, int b, int t, int h, int kvh, int hd);
void st_cpu_attention_bwd(float *dqkv, const float *dout, const float *qkv, const float *out, const float *lse,
                          int b, int t, int h, int kvh, int hd);

/* cpu_activations.c */
void st_cpu_gelu_fwd(float *out, const float *x, size_t n);
void st_cpu_gelu_bwd(float *dx, const float *dout, const float *x, size_t n);
void st_cpu_swiglu_fwd(float *out, const float *gu, int n, int f);
void st_cpu_swiglu_bwd(float *dgu, const float *dout, const float *gu, int n, int f);

/* cpu_embedding.c */
void st_cpu_embedding_fwd(float *out, const int32_t *tokens, const float *wte, const float *wpe, int b, int t,
                          int c);
void st_cpu_embedding_bwd(float *dwte, float *dwpe, const float *dout, const int32_t *tokens, int b, int t,
                          int c);

/* cpu_loss.c */
double st_cpu_cross_entropy(float *logits, float *loss, const int32_t *target, const float *weight, int n, int v);
void st_cpu_cross_entropy_acc(float *logits, uint16_t *dlogits_bf16, float *loss, const int32_t *target,
                              const float *weight, int n, int v, double *total);
void st_cpu_xent_block_stats(const float *logits, float *stats, const int32_t *target, const float *weight, int n,
                             int nv, int j0);
void st_cpu_xent_block_loss(const float *stats, float *loss, const int32_t *target, const float *weight, int n, int v,
                            double *total);
void st_cpu_xent_block_grad(float *logits, uint16_t *dlogits_bf16, const float *stats, const int32_t *target,
                            const float *weight, int n, int nv, int j0);
void st_cpu_kd_loss(float *s_logits, uint16_t *dlogits_bf16, const float *t_logits, float *loss,
                    const int32_t *target, const float *weight, int n, int v, float temperature, float alpha,
                    double *total, double *parts);

/* cpu_optim.c */
void st_cpu_adamw(float *param, const float *grad, float *m, float *v, size_t n, float lr, float beta1,
                  float beta2, float eps, float weight_decay, float grad_scale, int step);
void st_cpu_adamw_multi(const st_adamw_range *ranges, int count, float beta1, float beta2, float eps,
                        float grad_scale);
void st_cpu_dequant_int8(float *out, const int8_t *q, const float *scale, size_t n, int block);
/* int8 forward matmuls (cpu_int8.c; kernels.h matmul_w8a8) */
void st_cpu_w8_pack(void *packed, const float *w, int out, int in);
void st_cpu_matmul_w8a8(float *c, const float *a, const void *packed, const float *bias, int m, int out, int in,
                        float beta, void *scratch);
/* 1 when the AVX-512 VNNI path runs (the CPU has it and SHARDTUNE_INT8 is not "scalar"); tests force a path
 * with st_cpu_int8_force(0 scalar | 1 VNNI | -1 the default again). */
int st_cpu_int8_vnni(void);
void st_cpu_int8_force(int vnni);
void st_cpu_dequant_nf4(float *out, const uint8_t *packed, const float *absmax, size_t n, int block);

/* cpu_decode.c */
void st_cpu_kv_store(float *kcache, float *vcache, const float *qkv, const int32_t *row_seq, const int32_t *row_pos,
                     int rows, int h, int kvh, int hd, int max_t);
void st_cpu_attention_cached(float *out, const float *qkv, const float *kcache, const float *vcache,
                             const int32_t *row_seq, const int32_t *row_pos, int rows, int h, int kvh, int hd,
                             int max_t, int window);
void st_cpu_decode_mm(float *y, const float *x, const float *w, const uint16_t *w16, int rows, int out, int in,
                      float beta);

#endif
