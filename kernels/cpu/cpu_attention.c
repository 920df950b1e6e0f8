/* cpu_attention.c — rotary embeddings and causal grouped-query self-attention on packed qkv.
 *
 * Layout per token: [q heads (H*hd) | k heads (KVH*hd) | v heads (KVH*hd)]; query head h reads kv
 * head h / (H/KVH). Forward works on tiles of query rows (sgemm for Q K^T and P V, see below) with a
 * bounded score buffer on the stack and saves each row's log-sum-exp; backward recomputes probabilities
 * from it (no T x T matrix is ever stored). Backward is parallel over (batch, kv head) groups: one thread owns every
 * write to a group's dk/dv and the dq of its query heads, so accumulation is race-free and always in
 * the same order. Caller owns every buffer. */
#include "kernels/cpu/cpu_kernels.h"

#include <cblas.h>
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

/* The score work runs as small sgemm calls on tiles of query rows: per (batch, head) and tile of QB
 * consecutive queries, S = scale * Q K^T over the keys the tile can see, then P V (forward) or the five
 * products of the backward. A tile holds at most ST_ATTN_TILE floats of scores (two such buffers on the
 * stack in the backward), so QB shrinks for long sequences; it depends only on T, never on threads, and
 * the single-threaded sgemm inside a unit is deterministic, so results do not depend on the thread count
 * or the schedule. Entries outside a row's causal (and sliding-window) range are set to exactly 0. */
#define ST_ATTN_TILE 8192

/* First key query row ti sees: 0, or with a sliding window W the keys j with ti - j < W. */
static inline int first_key(int ti, int window) { return window > 0 && ti >= window ? ti - window + 1 : 0; }

static inline int attn_tile_rows(int t) {
    int qb = ST_ATTN_TILE / t;
    return qb < 1 ? 1 : qb > t ? t : qb;
}

/* Row r of a tile (query i0 + r) sees the tile's keys [lo, hi] (indices relative to the tile's first key). */
static inline void tile_row_keys(int i0, int r, int kj0, int window, int *lo, int *hi) {
    int i = i0 + r;
    *lo = first_key(i, window) - kj0;
    *hi = i - kj0;
}

static void attention_fwd(float *out, float *lse, const float *qkv, int b, int t, int h, int kvh, int hd,
                          int window) {
    if (b <= 0 || t <= 0 || h <= 0 || kvh <= 0 || hd <= 0) return;
    int stride = (h + 2 * kvh) * hd, group = h / kvh, qb = attn_tile_rows(t);
    int ntiles = (t + qb - 1) / qb;
    float scale = 1.0f / sqrtf((float)hd);
    long units = (long)b * h * ntiles;
    /* units are independent (each writes its own rows of out and lse): any schedule gives the same result */
#pragma omp parallel for schedule(dynamic, 1) if ((long)b * h * t * t * hd >= ST_CPU_PAR_MIN)
    for (long u = 0; u < units; u++) {
        int tile = (int)(u % ntiles), hi = (int)((u / ntiles) % h), bi = (int)(u / ((long)ntiles * h));
        int i0 = tile * qb, i1 = i0 + qb < t ? i0 + qb : t, nq = i1 - i0;
        int kj0 = first_key(i0, window), nk = i1 - kj0;
        const float *tok0 = qkv + (size_t)bi * t * stride;
        const float *q = tok0 + (size_t)i0 * stride + (size_t)hi * hd;
        const float *k = tok0 + (size_t)kj0 * stride + (size_t)h * hd + (size_t)(hi / group) * hd;
        const float *v = k + (size_t)kvh * hd;
        float s[nq * nk];
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, nq, nk, hd, scale, q, stride, k, stride, 0.0f, s, nk);
        for (int r = 0; r < nq; r++) {
            float *restrict row = s + (size_t)r * nk;
            int lo, hk;
            tile_row_keys(i0, r, kj0, window, &lo, &hk);
            float mx = st_cpu_max(row + lo, hk - lo + 1);
            for (int j = lo; j <= hk; j++) row[j] = st_cpu_expf(row[j] - mx);
            float sum = st_cpu_sum(row + lo, hk - lo + 1);
            float inv = 1.0f / sum;
            for (int j = 0; j < nk; j++) row[j] = j >= lo && j <= hk ? row[j] * inv : 0.0f;
            lse[((size_t)bi * h + hi) * t + i0 + r] = mx + logf(sum);
        }
        float *o = out + ((size_t)bi * t + i0) * (size_t)h * hd + (size_t)hi * hd;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, nq, hd, nk, 1.0f, s, nk, v, stride, 0.0f, o, h * hd);
    }
}

void st_cpu_attention_fwd(float *out, float *lse, const float *qkv, int b, int t, int h, int kvh, int hd) {
    attention_fwd(out, lse, qkv, b, t, h, kvh, hd, 0);
}

void st_cpu_attention_window_fwd(float *out, float *lse, const float *qkv, int b, int t, int h, int kvh, int hd,
                                 int window) {
    attention_fwd(out, lse, qkv, b, t, h, kvh, hd, window);
}

/* One (batch, kv head) group: zero its dk/dv, then for each of its query heads and tiles of query rows
 * recompute P = exp(scale Q K^T - lse) (0 outside the causal range), dP = dO V^T,
 * dS = P (dP - rowsum(dO * O)), and accumulate dV += P^T dO, dK += scale dS^T Q, dQ = scale dS K.
 * One thread owns every write of the group (its dk/dv and the dq of its query heads), in a fixed order. */
static void attention_bwd_group(float *dqkv, const float *dout, const float *qkv, const float *out,
                                const float *lse, int bi, int kv, int t, int h, int kvh, int hd, int window) {
    int stride = (h + 2 * kvh) * hd, group = h / kvh, qb = attn_tile_rows(t), ohd = h * hd;
    float scale = 1.0f / sqrtf((float)hd);
    size_t koff = (size_t)h * hd + (size_t)kv * hd, voff = koff + (size_t)kvh * hd;
    const float *tok0 = qkv + (size_t)bi * t * stride;
    float *dtok0 = dqkv + (size_t)bi * t * stride;
    for (int j = 0; j < t; j++) {
        memset(dtok0 + (size_t)j * stride + koff, 0, (size_t)hd * sizeof(float));
        memset(dtok0 + (size_t)j * stride + voff, 0, (size_t)hd * sizeof(float));
    }
    float p[qb * t], ds[qb * t];
    for (int hi = kv * group; hi < (kv + 1) * group; hi++) {
        for (int i0 = 0; i0 < t; i0 += qb) {
            int i1 = i0 + qb < t ? i0 + qb : t, nq = i1 - i0;
            int kj0 = first_key(i0, window), nk = i1 - kj0;
            const float *q = tok0 + (size_t)i0 * stride + (size_t)hi * hd;
            const float *k = tok0 + (size_t)kj0 * stride + koff, *v = tok0 + (size_t)kj0 * stride + voff;
            size_t orow = ((size_t)bi * t + i0) * (size_t)ohd + (size_t)hi * hd;
            const float *dor = dout + orow;
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, nq, nk, hd, scale, q, stride, k, stride, 0.0f, p,
                        nk);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, nq, nk, hd, 1.0f, dor, ohd, v, stride, 0.0f, ds,
                        nk);
            for (int r = 0; r < nq; r++) {
                float *restrict pr = p + (size_t)r * nk, *restrict dr = ds + (size_t)r * nk;
                int lo, hk;
                tile_row_keys(i0, r, kj0, window, &lo, &hk);
                float row_lse = lse[((size_t)bi * h + hi) * t + i0 + r];
                float dsum = st_cpu_dot(dor + (size_t)r * ohd, out + orow + (size_t)r * ohd, hd);
                for (int j = 0; j < nk; j++) {
                    float pj = j >= lo && j <= hk ? st_cpu_expf(pr[j] - row_lse) : 0.0f;
                    pr[j] = pj;
                    dr[j] = pj * (dr[j] - dsum);
                }
            }
            float *dk = dtok0 + (size_t)kj0 * stride + koff, *dv = dtok0 + (size_t)kj0 * stride + voff;
            float *dq = dtok0 + (size_t)i0 * stride + (size_t)hi * hd;
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, nk, hd, nq, 1.0f, p, nk, dor, ohd, 1.0f, dv, stride);
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, nk, hd, nq, scale, ds, nk, q, stride, 1.0f, dk,
                        stride);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, nq, hd, nk, scale, ds, nk, k, stride, 0.0f, dq,
                        stride);
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
