/* cpu_decode.c — the decode-step kernels of generation: storing a token's keys and values in the KV
 * cache, and attention of one query row per token over its sequence's cached keys (kernels.h has the
 * layouts; a sliding window limits the keys a row sees). Each (token, query head) pair is independent, so any thread schedule gives the same bits.
 * Caller owns every buffer; the score row (at most max_t floats) lives on the stack. */
#include "kernels/cpu/cpu_kernels.h"

#include <math.h>

void st_cpu_kv_store(float *kcache, float *vcache, const float *qkv, const int32_t *row_seq, const int32_t *row_pos,
                     int rows, int h, int kvh, int hd, int max_t) {
    size_t kvd = (size_t)kvh * hd, stride = (size_t)(h + 2 * kvh) * hd;
    for (int i = 0; i < rows; i++) {
        size_t slot = ((size_t)row_seq[i] * max_t + (size_t)row_pos[i]) * kvd;
        const float *k = qkv + (size_t)i * stride + (size_t)h * hd;
        memcpy(kcache + slot, k, kvd * sizeof(float));
        memcpy(vcache + slot, k + kvd, kvd * sizeof(float));
    }
}

/* First key a query at position p sees: 0, or with a sliding window W the keys j with p - j < W. */
static inline int first_key(int p, int window) { return window > 0 && p >= window ? p - window + 1 : 0; }

void st_cpu_attention_cached(float *out, const float *qkv, const float *kcache, const float *vcache,
                             const int32_t *row_seq, const int32_t *row_pos, int rows, int h, int kvh, int hd,
                             int max_t, int window) {
    if (rows <= 0 || h <= 0 || kvh <= 0 || hd <= 0) return;
    size_t kvd = (size_t)kvh * hd, stride = (size_t)(h + 2 * kvh) * hd;
    int group = h / kvh;
    float scale = 1.0f / sqrtf((float)hd);
    long work = (long)rows * h;
    long keys = 0;
    for (int i = 0; i < rows; i++) keys += row_pos[i] + 1 - first_key(row_pos[i], window);
#pragma omp parallel for schedule(dynamic, 4) if (keys * h * hd >= ST_CPU_PAR_MIN)
    for (long w = 0; w < work; w++) {
        int i = (int)(w / h), hi = (int)(w % h);
        int k0 = first_key(row_pos[i], window), nk = row_pos[i] + 1 - k0;
        float s[nk];
        const float *q = qkv + (size_t)i * stride + (size_t)hi * hd;
        size_t base = ((size_t)row_seq[i] * max_t + (size_t)k0) * kvd + (size_t)(hi / group) * hd;
        const float *kb = kcache + base, *vb = vcache + base;
        int j = 0;
        for (; j + 4 <= nk; j += 4) {
            const float *k0 = kb + (size_t)j * kvd;
            float d4[4];
            st_cpu_dot4(d4, q, k0, k0 + kvd, k0 + 2 * kvd, k0 + 3 * kvd, hd);
            for (int r = 0; r < 4; r++) s[j + r] = d4[r] * scale;
        }
        for (; j < nk; j++) s[j] = st_cpu_dot(q, kb + (size_t)j * kvd, hd) * scale;
        float mx = st_cpu_max(s, nk);
        for (j = 0; j < nk; j++) s[j] = st_cpu_expf(s[j] - mx);
        float inv = 1.0f / st_cpu_sum(s, nk);
        float *restrict o = out + (size_t)i * h * hd + (size_t)hi * hd;
        for (int d = 0; d < hd; d++) o[d] = 0.0f;
        for (j = 0; j < nk; j++) st_cpu_axpy(o, s[j] * inv, vb + (size_t)j * kvd, hd);
    }
}
