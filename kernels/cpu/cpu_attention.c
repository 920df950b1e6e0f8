/* cpu_attention.c — rotary embeddings and causal grouped-query self-attention on packed qkv.
 *
 * Layout per token: [q heads (H*hd) | k heads (KVH*hd) | v heads (KVH*hd)]; query head h reads kv
 * head h / (H/KVH). Forward works one query row at a time with a score buffer of at most T floats on
 * the stack and saves the row's log-sum-exp; backward recomputes probabilities from it (no T x T
 * matrix is ever stored). Backward is parallel over (batch, kv head) groups: one thread owns every
 * write to a group's dk/dv and the dq of its query heads, so accumulation is race-free and always in
 * the same order. Caller owns every buffer. */
#include "kernels/cpu/cpu_kernels.h"

#include <math.h>

/* ---- RoPE (HF rotate_half: pairs (i, i + hd/2)) ---- */

/* Rotates the first (H+KVH) heads of every token row by +angle (dir = 1) or -angle (dir = -1). */
static void rope_apply(float *qkv, const float *cos_t, const float *sin_t, int b, int t, int h, int kvh, int hd,
                       float dir) {
    int half = hd / 2, stride = (h + 2 * kvh) * hd, heads = h + kvh;
    long rows = (long)b * t;
#pragma omp parallel for schedule(static) if (rows * heads * hd >= ST_CPU_PAR_MIN)
    for (long r = 0; r < rows; r++) {
        int pos = (int)(r % t);
        const float *restrict cs = cos_t + (size_t)pos * half;
        const float *restrict sn = sin_t + (size_t)pos * half;
        for (int hh = 0; hh < heads; hh++) {
            float *restrict x1 = qkv + (size_t)r * stride + (size_t)hh * hd;
            float *restrict x2 = x1 + half;
            for (int i = 0; i < half; i++) {
                float a = x1[i], c = x2[i], s = dir * sn[i];
                x1[i] = a * cs[i] - c * s;
                x2[i] = c * cs[i] + a * s;
            }
        }
    }
}

void st_cpu_rope_fwd(float *qkv, const float *cos, const float *sin, int b, int t, int h, int kvh, int hd) {
    rope_apply(qkv, cos, sin, b, t, h, kvh, hd, 1.0f);
}

/* The rotation is orthogonal, so its transpose (the gradient map) is the inverse rotation. */
void st_cpu_rope_bwd(float *dqkv, const float *cos, const float *sin, int b, int t, int h, int kvh, int hd) {
    rope_apply(dqkv, cos, sin, b, t, h, kvh, hd, -1.0f);
}

/* ---- per-head q/k RMSNorm (Qwen3) ---- */

void st_cpu_head_rmsnorm_fwd(float *qkv, float *xs, float *rstd, const float *wq, const float *wk, int n, int h,
                             int kvh, int hd, float eps) {
    int stride = (h + 2 * kvh) * hd, heads = h + kvh;
#pragma omp parallel for schedule(static) if ((long)n * heads * hd >= ST_CPU_PAR_MIN)
    for (long r = 0; r < n; r++) {
        for (int j = 0; j < heads; j++) {
            float *restrict x = qkv + (size_t)r * stride + (size_t)j * hd;
            float *restrict keep = xs + ((size_t)r * heads + j) * hd;
            const float *restrict w = j < h ? wq : wk;
            float ss = 0.0f;
            for (int i = 0; i < hd; i++) {
                keep[i] = x[i];
                ss += x[i] * x[i];
            }
            float rs = 1.0f / sqrtf(ss / (float)hd + eps);
            for (int i = 0; i < hd; i++) x[i] = x[i] * rs * w[i];
            rstd[(size_t)r * heads + j] = rs;
        }
    }
}

void st_cpu_head_rmsnorm_bwd(float *dqkv, float *dwq, float *dwk, const float *xs, const float *rstd,
                             const float *wq, const float *wk, int n, int h, int kvh, int hd) {
    int stride = (h + 2 * kvh) * hd, heads = h + kvh;
    /* weight gradients first (they read dout): column i of each weight sums its rows in order */
    for (int k = 0; k < 2; k++) {
        float *dw = k ? dwk : dwq;
        if (!dw) continue;
        int j0 = k ? h : 0, j1 = k ? heads : h;
#pragma omp parallel for schedule(static) if ((long)n * heads * hd >= ST_CPU_PAR_MIN)
        for (int i = 0; i < hd; i++) {
            float acc = 0.0f;
            for (long r = 0; r < n; r++)
                for (int j = j0; j < j1; j++)
                    acc += dqkv[(size_t)r * stride + (size_t)j * hd + i] * xs[((size_t)r * heads + j) * hd + i] *
                           rstd[(size_t)r * heads + j];
            dw[i] += acc;
        }
    }
    /* dx = rs * (w dy) - x * rs^3 * mean(w dy x) */
#pragma omp parallel for schedule(static) if ((long)n * heads * hd >= ST_CPU_PAR_MIN)
    for (long r = 0; r < n; r++) {
        for (int j = 0; j < heads; j++) {
            float *restrict d = dqkv + (size_t)r * stride + (size_t)j * hd;
            const float *restrict x = xs + ((size_t)r * heads + j) * hd;
            const float *restrict w = j < h ? wq : wk;
            float rs = rstd[(size_t)r * heads + j], dot = 0.0f;
            for (int i = 0; i < hd; i++) dot += d[i] * w[i] * x[i];
            float c = rs * rs * rs * dot / (float)hd;
            for (int i = 0; i < hd; i++) d[i] = rs * w[i] * d[i] - x[i] * c;
        }
    }
}

/* ---- attention ---- */

/* First key query row ti sees: 0, or with a sliding window W the keys j with ti - j < W. */
static inline int first_key(int ti, int window) { return window > 0 && ti >= window ? ti - window + 1 : 0; }

static void attention_fwd(float *out, float *lse, const float *qkv, int b, int t, int h, int kvh, int hd,
                          int window) {
    if (b <= 0 || t <= 0 || h <= 0 || kvh <= 0 || hd <= 0) return;
    int stride = (h + 2 * kvh) * hd, group = h / kvh;
    float scale = 1.0f / sqrtf((float)hd);
    long rows = (long)b * h * t;
    /* rows of one head are interleaved across threads in chunks of 8: balances the causal triangle and
     * keeps both threads on the same K/V block. Each row is independent: any schedule is deterministic. */
#pragma omp parallel for schedule(static, 8) if (rows * t * hd >= ST_CPU_PAR_MIN)
    for (long r = 0; r < rows; r++) {
        int ti = (int)(r % t);
        int hi = (int)((r / t) % h);
        int bi = (int)(r / ((long)t * h));
        float s[t]; /* scores of keys j0..ti */
        int j0 = first_key(ti, window);
        const float *q = qkv + ((size_t)bi * t + ti) * stride + (size_t)hi * hd;
        const float *kbase = qkv + ((size_t)bi * t + j0) * stride + (size_t)h * hd + (size_t)(hi / group) * hd;
        const float *vbase = kbase + (size_t)kvh * hd;
        int nk = ti - j0 + 1;
        int j = 0;
        for (; j + 4 <= nk; j += 4) {
            const float *k0 = kbase + (size_t)j * stride;
            float d4[4];
            st_cpu_dot4(d4, q, k0, k0 + stride, k0 + 2 * (size_t)stride, k0 + 3 * (size_t)stride, hd);
            for (int r4 = 0; r4 < 4; r4++) s[j + r4] = d4[r4] * scale;
        }
        for (; j < nk; j++) s[j] = st_cpu_dot(q, kbase + (size_t)j * stride, hd) * scale;
        float mx = st_cpu_max(s, nk);
        for (j = 0; j < nk; j++) s[j] = st_cpu_expf(s[j] - mx);
        float sum = st_cpu_sum(s, nk);
        float inv = 1.0f / sum;
        float *restrict o = out + ((size_t)bi * t + ti) * (size_t)h * hd + (size_t)hi * hd;
        for (int d = 0; d < hd; d++) o[d] = 0.0f;
        for (j = 0; j < nk; j++) st_cpu_axpy(o, s[j] * inv, vbase + (size_t)j * stride, hd);
        lse[((size_t)bi * h + hi) * t + ti] = mx + logf(sum);
    }
}

void st_cpu_attention_fwd(float *out, float *lse, const float *qkv, int b, int t, int h, int kvh, int hd) {
    attention_fwd(out, lse, qkv, b, t, h, kvh, hd, 0);
}

void st_cpu_attention_window_fwd(float *out, float *lse, const float *qkv, int b, int t, int h, int kvh, int hd,
                                 int window) {
    attention_fwd(out, lse, qkv, b, t, h, kvh, hd, window);
}

/* One (batch, kv head) group: zero its dk/dv, then for each of its query heads and rows accumulate
 * dq (written once per row), dk and dv in a fixed order. Per row the scores q.k_j and dout.v_j of all
 * keys are computed first, four keys at a time (st_cpu_dot4 shares the loads of q / dout and gives
 * independent dependency chains to overlap), and the probabilities in one vectorizable pass; only the
 * three axpys stay in the per-key loop. Every value is the same float computation as the one-key-at-a-time
 * form (st_cpu_dot4 == st_cpu_dot bit for bit), and dq / dk / dv are accumulated in the same order. */
static void attention_bwd_group(float *dqkv, const float *dout, const float *qkv, const float *out,
                                const float *lse, int bi, int kv, int t, int h, int kvh, int hd, int window) {
    int stride = (h + 2 * kvh) * hd, group = h / kvh;
    float scale = 1.0f / sqrtf((float)hd);
    size_t koff = (size_t)h * hd + (size_t)kv * hd, voff = koff + (size_t)kvh * hd;
    const float *tok0 = qkv + (size_t)bi * t * stride;
    float *dtok0 = dqkv + (size_t)bi * t * stride;
    for (int j = 0; j < t; j++) {
        memset(dtok0 + (size_t)j * stride + koff, 0, (size_t)hd * sizeof(float));
        memset(dtok0 + (size_t)j * stride + voff, 0, (size_t)hd * sizeof(float));
    }
    float dq[hd], p[t], ds[t]; /* p: probabilities of keys j0..ti; ds: first dout.v_j, then dscore_j */
    for (int hi = kv * group; hi < (kv + 1) * group; hi++) {
        for (int ti = 0; ti < t; ti++) {
            int j0 = first_key(ti, window); /* index j below is key j0 + j */
            const float *kbase = tok0 + (size_t)j0 * stride + koff, *vbase = tok0 + (size_t)j0 * stride + voff;
            float *dkv0 = dtok0 + (size_t)j0 * stride;
            const float *q = tok0 + (size_t)ti * stride + (size_t)hi * hd;
            size_t orow = ((size_t)bi * t + ti) * (size_t)h * hd + (size_t)hi * hd;
            const float *dor = dout + orow;
            float row_lse = lse[((size_t)bi * h + hi) * t + ti];
            float dsum = st_cpu_dot(dor, out + orow, hd); /* sum_j p_j dp_j = dout . out */
            int nk = ti - j0 + 1, j = 0;
            for (; j + 4 <= nk; j += 4) {
                const float *k0 = kbase + (size_t)j * stride, *v0 = vbase + (size_t)j * stride;
                st_cpu_dot4(p + j, q, k0, k0 + stride, k0 + 2 * (size_t)stride, k0 + 3 * (size_t)stride, hd);
                st_cpu_dot4(ds + j, dor, v0, v0 + stride, v0 + 2 * (size_t)stride, v0 + 3 * (size_t)stride, hd);
            }
            for (; j < nk; j++) {
                p[j] = st_cpu_dot(q, kbase + (size_t)j * stride, hd);
                ds[j] = st_cpu_dot(dor, vbase + (size_t)j * stride, hd);
            }
            for (j = 0; j < nk; j++) {
                p[j] = st_cpu_expf(p[j] * scale - row_lse);
                ds[j] = p[j] * (ds[j] - dsum);
            }
            for (int d = 0; d < hd; d++) dq[d] = 0.0f;
            for (j = 0; j < nk; j++) {
                st_cpu_axpy(dq, ds[j], kbase + (size_t)j * stride, hd);
                st_cpu_axpy(dkv0 + (size_t)j * stride + koff, ds[j] * scale, q, hd);
                st_cpu_axpy(dkv0 + (size_t)j * stride + voff, p[j], dor, hd);
            }
            float *dqr = dtok0 + (size_t)ti * stride + (size_t)hi * hd;
            for (int d = 0; d < hd; d++) dqr[d] = dq[d] * scale;
        }
    }
}

static void attention_bwd(float *dqkv, const float *dout, const float *qkv, const float *out, const float *lse,
                          int b, int t, int h, int kvh, int hd, int window) {
    if (b <= 0 || t <= 0 || h <= 0 || kvh <= 0 || hd <= 0) return;
    int groups = b * kvh;
#pragma omp parallel for schedule(static) if ((long)b * h * t * t * hd >= ST_CPU_PAR_MIN)
    for (int g = 0; g < groups; g++)
        attention_bwd_group(dqkv, dout, qkv, out, lse, g / kvh, g % kvh, t, h, kvh, hd, window);
}

void st_cpu_attention_bwd(float *dqkv, const float *dout, const float *qkv, const float *out, const float *lse,
                          int b, int t, int h, int kvh, int hd) {
    attention_bwd(dqkv, dout, qkv, out, lse, b, t, h, kvh, hd, 0);
}

void st_cpu_attention_window_bwd(float *dqkv, const float *dout, const float *qkv, const float *out,
                                 const float *lse, int b, int t, int h, int kvh, int hd, int window) {
    attention_bwd(dqkv, dout, qkv, out, lse, b, t, h, kvh, hd, window);
}
