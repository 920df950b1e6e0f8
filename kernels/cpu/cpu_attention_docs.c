/* cpu_attention_docs.c — document-packed sequences (train.packing: documents): causal attention that
 * never crosses a document, RoPE and GPT-2 learned positions restarted at each document.
 *
 * pos[B*T] (backend memory) is each token's position inside its document: 0 at a document's first token,
 * then +1 per token. Documents are contiguous, so query row i of a sequence sees exactly the keys
 * i - pos[i] .. i (and, with a sliding window W > 0, only keys j with i - j < W). Same layouts and lse contract as cpu_attention.c; backward is parallel over
 * (batch, kv head) groups with one owner per dk/dv row, so results do not depend on the thread count.
 * Caller owns every buffer. */
#include "kernels/cpu/cpu_kernels.h"

#include <math.h>
#include <string.h>

/* Rotates q and k heads of row r by the angle of position pos[r] (dir -1: the transpose). */
static void rope_pos_apply(float *qkv, const float *cos_t, const float *sin_t, const int32_t *pos, int b, int t,
                           int h, int kvh, int hd, float dir) {
    int half = hd / 2, stride = (h + 2 * kvh) * hd, heads = h + kvh;
    long rows = (long)b * t;
#pragma omp parallel for schedule(static) if (rows * heads * hd >= ST_CPU_PAR_MIN)
    for (long r = 0; r < rows; r++) {
        const float *cs = cos_t + (size_t)pos[r] * half, *sn = sin_t + (size_t)pos[r] * half;
        for (int hh = 0; hh < heads; hh++) {
            float *x = qkv + (size_t)r * stride + (size_t)hh * hd;
            for (int i = 0; i < half; i++) {
                float lo = x[i], hi = x[i + half], s = dir * sn[i];
                x[i] = lo * cs[i] - hi * s;
                x[i + half] = hi * cs[i] + lo * s;
            }
        }
    }
}

void st_cpu_rope_pos_fwd(float *qkv, const float *cos, const float *sin, const int32_t *pos, int b, int t, int h,
                         int kvh, int hd) {
    rope_pos_apply(qkv, cos, sin, pos, b, t, h, kvh, hd, 1.0f);
}

void st_cpu_rope_pos_bwd(float *dqkv, const float *cos, const float *sin, const int32_t *pos, int b, int t, int h,
                         int kvh, int hd) {
    rope_pos_apply(dqkv, cos, sin, pos, b, t, h, kvh, hd, -1.0f);
}

void st_cpu_embedding_pos_fwd(float *out, const int32_t *tokens, const float *wte, const float *wpe,
                              const int32_t *pos, int b, int t, int c) {
    long rows = (long)b * t;
#pragma omp parallel for schedule(static) if (rows * c >= ST_CPU_PAR_MIN)
    for (long r = 0; r < rows; r++) {
        const float *e = wte + (size_t)tokens[r] * c, *p = wpe + (size_t)pos[r] * c;
        for (int j = 0; j < c; j++) out[(size_t)r * c + j] = e[j] + p[j];
    }
}

/* dwpe only (the caller runs embedding_bwd with dwpe = NULL for dwte): columns split across threads,
 * rows in order, so accumulation order is fixed. */
void st_cpu_embedding_pos_bwd(float *dwpe, const float *dout, const int32_t *pos, int b, int t, int c) {
    long rows = (long)b * t;
#pragma omp parallel for schedule(static) if (rows * c >= ST_CPU_PAR_MIN)
    for (int j = 0; j < c; j++)
        for (long r = 0; r < rows; r++) dwpe[(size_t)pos[r] * c + j] += dout[(size_t)r * c + j];
}

/* First key of query row ti: its document's first token, or the sliding window's edge if later. */
static inline int docs_first_key(const int32_t *pos_row, int ti, int window) {
    int j0 = ti - pos_row[ti];
    if (window > 0 && ti - window + 1 > j0) j0 = ti - window + 1;
    return j0;
}

void st_cpu_attention_docs_fwd(float *out, float *lse, const float *qkv, const int32_t *pos, int b, int t, int h,
                               int kvh, int hd, int window) {
    if (b <= 0 || t <= 0 || h <= 0 || kvh <= 0 || hd <= 0) return;
    int stride = (h + 2 * kvh) * hd, group = h / kvh;
    float scale = 1.0f / sqrtf((float)hd);
    long rows = (long)b * h * t;
#pragma omp parallel for schedule(static, 8) if (rows * t * hd >= ST_CPU_PAR_MIN)
    for (long r = 0; r < rows; r++) {
        int ti = (int)(r % t), hi = (int)((r / t) % h), bi = (int)(r / ((long)t * h));
        int j0 = docs_first_key(pos + (size_t)bi * t, ti, window), nk = ti - j0 + 1;
        float s[t];
        const float *q = qkv + ((size_t)bi * t + ti) * stride + (size_t)hi * hd;
        const float *k = qkv + ((size_t)bi * t + j0) * stride + (size_t)(h + hi / group) * hd;
        const float *v = k + (size_t)kvh * hd;
        for (int j = 0; j < nk; j++) s[j] = st_cpu_dot(q, k + (size_t)j * stride, hd) * scale;
        float mx = st_cpu_max(s, nk);
        for (int j = 0; j < nk; j++) s[j] = st_cpu_expf(s[j] - mx);
        float sum = st_cpu_sum(s, nk);
        float *o = out + ((size_t)bi * t + ti) * (size_t)h * hd + (size_t)hi * hd;
        memset(o, 0, (size_t)hd * sizeof(float));
        for (int j = 0; j < nk; j++) st_cpu_axpy(o, s[j] / sum, v + (size_t)j * stride, hd);
        lse[((size_t)bi * h + hi) * t + ti] = mx + logf(sum);
    }
}

/* One (batch, kv head) group: dk/dv zeroed, then every query row of its heads adds in a fixed order. */
static void docs_bwd_group(float *dqkv, const float *dout, const float *qkv, const float *out, const float *lse,
                           const int32_t *pos, int bi, int kv, int t, int h, int kvh, int hd, int window) {
    int stride = (h + 2 * kvh) * hd, group = h / kvh;
    float scale = 1.0f / sqrtf((float)hd);
    size_t koff = (size_t)(h + kv) * hd, voff = koff + (size_t)kvh * hd;
    const float *x = qkv + (size_t)bi * t * stride;
    float *dx = dqkv + (size_t)bi * t * stride;
    for (int j = 0; j < t; j++) {
        memset(dx + (size_t)j * stride + koff, 0, (size_t)hd * sizeof(float));
        memset(dx + (size_t)j * stride + voff, 0, (size_t)hd * sizeof(float));
    }
    float dq[hd];
    for (int hi = kv * group; hi < (kv + 1) * group; hi++) {
        for (int ti = 0; ti < t; ti++) {
            const float *q = x + (size_t)ti * stride + (size_t)hi * hd;
            size_t orow = ((size_t)bi * t + ti) * (size_t)h * hd + (size_t)hi * hd;
            float row_lse = lse[((size_t)bi * h + hi) * t + ti];
            float dsum = st_cpu_dot(dout + orow, out + orow, hd);
            memset(dq, 0, sizeof dq);
            for (int j = docs_first_key(pos + (size_t)bi * t, ti, window); j <= ti; j++) {
                const float *kj = x + (size_t)j * stride + koff, *vj = x + (size_t)j * stride + voff;
                float p = st_cpu_expf(st_cpu_dot(q, kj, hd) * scale - row_lse);
                float ds = p * (st_cpu_dot(dout + orow, vj, hd) - dsum);
                st_cpu_axpy(dq, ds, kj, hd);
                st_cpu_axpy(dx + (size_t)j * stride + koff, ds * scale, q, hd);
                st_cpu_axpy(dx + (size_t)j * stride + voff, p, dout + orow, hd);
            }
            float *dqr = dx + (size_t)ti * stride + (size_t)hi * hd;
            for (int d = 0; d < hd; d++) dqr[d] = dq[d] * scale;
        }
    }
}

void st_cpu_attention_docs_bwd(float *dqkv, const float *dout, const float *qkv, const float *out, const float *lse,
                               const int32_t *pos, int b, int t, int h, int kvh, int hd, int window) {
    if (b <= 0 || t <= 0 || h <= 0 || kvh <= 0 || hd <= 0) return;
    int groups = b * kvh;
#pragma omp parallel for schedule(static) if ((long)b * h * t * t * hd >= ST_CPU_PAR_MIN)
    for (int g = 0; g < groups; g++) docs_bwd_group(dqkv, dout, qkv, out, lse, pos, g / kvh, g % kvh, t, h, kvh, hd,
                                                 window);
}
