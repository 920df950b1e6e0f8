/* cpu_kd.c — the fused knowledge-distillation loss (kernels.h kd_loss; definition in worker/distill.h): the
 * CPU twin of kernels/cuda/cross_entropy.cu's kd kernel.
 *
 * Per row: the maxima and exponentials of t/T, s/T and s in fp32 (vectorized), their sums, the KL term, the
 * CE term and the gradient in double, written over the student's logits (or, under bf16, as bf16 bits). Rows
 * run in parallel, each thread with its own 3*V floats of exponentials; the per-row parts are then summed in row order, so the
 * sums do not depend on the thread count. An allocation failure makes the sums NaN (the trainer's
 * non-finite check stops the step). */
#include "kernels/bf16.h"
#include "kernels/cpu/cpu_kernels.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* sum_i a[i] in double with fixed-order lane accumulation. */
static double sum_d(const float *restrict a, int n) {
    double acc[ST_LANES] = {0};
    int i = 0;
    for (; i + ST_LANES <= n; i += ST_LANES)
        for (int l = 0; l < ST_LANES; l++) acc[l] += a[i + l];
    double s = 0.0;
    for (int l = 0; l < ST_LANES; l++) s += acc[l];
    for (; i < n; i++) s += a[i];
    return s;
}

/* One row: the loss parts and, in place of s, the gradient. The scaled logits x/T and the exponentials are
 * fp32 (vectorized st_cpu_expf; x/T rounded once, the maxima taken before scaling, which rounding's
 * monotonicity makes the same); sums, logs, probabilities, KL and the gradient are double. e[3*v]: scratch. */
static void kd_row(float *restrict s, const float *restrict t, int32_t y, double w, int v, float temp, double alpha,
                   float *restrict e, double *kd_out, double *ce_out) {
    const float inv_t = 1.0f / temp;
    const float mt = st_cpu_max(t, v) * inv_t, mq = st_cpu_max(s, v) * inv_t, m1 = st_cpu_max(s, v);
    float *restrict et = e, *restrict eq = e + v, *restrict e1 = e + 2 * (size_t)v;
    for (int j = 0; j < v; j++) {
        et[j] = st_cpu_expf(t[j] * inv_t - mt);
        eq[j] = st_cpu_expf(s[j] * inv_t - mq);
        e1[j] = st_cpu_expf(s[j] - m1);
    }
    const double zt = sum_d(et, v), zq = sum_d(eq, v), z1 = sum_d(e1, v);
    const double lt = mt + log(zt), lq = mq + log(zq), l1 = m1 + log(z1);
    const double rt = 1.0 / zt, rq = 1.0 / zq, r1 = 1.0 / z1, T = temp;
    int valid = y >= 0 && y < v;
    *ce_out = valid ? l1 - s[y] : NAN;
    double kl = 0;
    for (int j = 0; j < v; j++) {
        double p = et[j] * rt, q = eq[j] * rq, sm = e1[j] * r1;
        if (p > 0) kl += p * (((double)(t[j] * inv_t) - lt) - ((double)(s[j] * inv_t) - lq));
        s[j] = (float)(w * (alpha * T * (q - p) + (1 - alpha) * (sm - (j == y))));
    }
    *kd_out = T * T * kl;
}

void st_cpu_kd_loss(float *s_logits, uint16_t *dl16, const float *t_logits, float *loss, const int32_t *targets,
                    const float *weight, int n, int v, float temperature, float alpha, double *total,
                    double *parts_out) {
    if (n <= 0) return;
    double *parts = calloc(2 * (size_t)n + 1, sizeof(double)); /* per-row kd, ce: summed in order below */
    int failed = parts == NULL;
#pragma omp parallel if (n > 1) reduction(| : failed)
    {
        float *e = parts ? malloc(3 * (size_t)v * sizeof(float)) : NULL;
        failed |= e == NULL;
#pragma omp for schedule(static)
        for (int i = 0; i < n; i++) {
            float *s = s_logits + (size_t)i * v;
            loss[i] = 0;
            if (weight[i] == 0 || !e) {
                memset(s, 0, (size_t)v * sizeof(float));
            } else {
                kd_row(s, t_logits + (size_t)i * v, targets[i], weight[i], v, temperature, alpha, e, &parts[2 * i],
                       &parts[2 * i + 1]);
                loss[i] = (float)(alpha * parts[2 * i] + (1 - alpha) * parts[2 * i + 1]);
            }
            if (dl16)
                for (int j = 0; j < v; j++) dl16[(size_t)i * v + j] = st_float_to_bf16_bits(s[j]);
        }
        free(e);
    }
    double sum = 0;
    for (int i = 0; i < n && !failed; i++) { /* row order, whatever the thread count: deterministic */
        double w = weight[i];
        if (w == 0) continue;
        sum += w * (alpha * parts[2 * i] + (1 - alpha) * parts[2 * i + 1]);
        parts_out[0] += w * parts[2 * i];
        parts_out[1] += w * parts[2 * i + 1];
    }
    free(parts);
    if (failed) parts_out[0] = parts_out[1] = sum = NAN;
    *total += sum;
}
