/* cpu_loss.c — fused softmax cross-entropy: one pass per row computes the loss and overwrites the
 * logits with their gradient.
 *
 * Per row: max, exp(x - max) stored in place while summing, then scaled by weight / sum, minus weight
 * at the target. Rows are independent (parallel over rows); the returned total adds the per-row
 * weighted losses sequentially in double, so it does not depend on threads. A target outside [0, V)
 * on a row with non-zero weight makes that row's loss (and the total) NaN instead of reading out of
 * bounds; its dlogits are then weight * softmax. cross_entropy_acc (the LM head's form) runs the same
 * rows, adds the total to an accumulator and, under bf16, stores each finished row's dlogits as bf16
 * bits (the rounding fused into the row's pass). Caller owns every buffer. */
#include "kernels/bf16.h"
#include "kernels/cpu/cpu_kernels.h"

#include <math.h>

/* One row: loss (NaN for an out-of-range target) and dlogits in place of x. `next` (NULL: none): the row
 * this thread runs after, fetched into the cache while this one's exp pass runs. A head's logits ([rows, V],
 * 128-200 MB) come from memory, and the max pass would otherwise wait on them with the core idle, then the
 * exp and scale passes run from L2 (a row is 128-200 KB) with the memory idle; the prefetch overlaps the two
 * (one cache line of the next row per 16 floats of this one). Prefetches change no value. */
static float xent_row(float *restrict x, const float *next, int32_t tg, float w, int v) {
    int valid = tg >= 0 && tg < v;
    float xt = valid ? x[tg] : 0.0f;
    float mx = st_cpu_max(x, v);
    float acc[ST_LANES] = {0};
    int j = 0;
    for (; j + ST_LANES <= v; j += ST_LANES) {
        if (next) __builtin_prefetch(next + j, 0, 2);
        for (int l = 0; l < ST_LANES; l++) {
            float e = st_cpu_expf(x[j + l] - mx);
            x[j + l] = e;
            acc[l] += e;
        }
    }
    float sum = 0.0f;
    for (int l = 0; l < ST_LANES; l++) sum += acc[l];
    for (; j < v; j++) {
        float e = st_cpu_expf(x[j] - mx);
        x[j] = e;
        sum += e;
    }
    float lse = mx + logf(sum);
    float sc = w / sum;
    for (j = 0; j < v; j++) x[j] *= sc;
    if (!valid) return NAN;
    x[tg] -= w;
    return lse - xt;
}

static double xent_rows(float *logits, uint16_t *dl16, float *loss, const int32_t *target, const float *weight, int n,
                        int v) {
    if (n <= 0) return 0.0;
#pragma omp parallel for schedule(static) if ((long)n * v >= ST_CPU_PAR_MIN)
    for (int i = 0; i < n; i++) {
        float *restrict x = logits + (size_t)i * v;
        float w = weight[i];
        if (w == 0.0f || v <= 0) {
            for (int j = 0; j < v; j++) x[j] = 0.0f;
            loss[i] = 0.0f;
        } else {
            loss[i] = xent_row(x, i + 1 < n ? x + v : NULL, target[i], w, v);
        }
        if (dl16) {
            uint16_t *restrict d = dl16 + (size_t)i * v;
            for (int j = 0; j < v; j++) d[j] = st_float_to_bf16_bits(x[j]);
        }
    }
    double total = 0.0;
    for (int i = 0; i < n; i++)
        if (weight[i] != 0.0f) total += (double)weight[i] * (double)loss[i];
    return total;
}

double st_cpu_cross_entropy(float *logits, float *loss, const int32_t *target, const float *weight, int n, int v) {
    return xent_rows(logits, NULL, loss, target, weight, n, v);
}

void st_cpu_cross_entropy_acc(float *logits, uint16_t *dlogits_bf16, float *loss, const int32_t *target,
                              const float *weight, int n, int v, double *total) {
    *total += xent_rows(logits, dlogits_bf16, loss, target, weight, n, v);
}
