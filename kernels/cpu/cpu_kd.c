/* cpu_kd.c — the fused knowledge-distillation loss (kernels.h kd_loss; definition in worker/distill.h): the
 * CPU twin of kernels/cuda/cross_entropy.cu's kd kernel.
 *
 * Per row, in double: the maxima and sums of exp of t/T, s/T and s, the KL term, the CE term and the
 * gradient, written over the student's logits (or, under bf16, as bf16 bits). Rows run in parallel, each
 * thread with its own 3*V doubles of exponentials; the per-row parts are then summed in row order, so the
 * sums do not depend on the thread count. An allocation failure makes the sums NaN (the trainer's
 * non-finite check stops the step). */
#include "kernels/bf16.h"
#include "kernels/cpu/cpu_kernels.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* One row: the loss parts and, in place of s, the gradient. e[3*v] is scratch: exp(z - max) of t/T, s/T, s. */
static void kd_row(float *s, const float *t, int32_t y, double w, int v, double T, double alpha, double *e,
                   double *kd_out, double *ce_out) {
    const double inv_t = 1.0 / T;
    double mt = -INFINITY, mq = -INFINITY, m1 = -INFINITY;
    for (int j = 0; j < v; j++) {
        mt = fmax(mt, t[j] * inv_t);
        mq = fmax(mq, s[j] * inv_t);
        m1 = fmax(m1, (double)s[j]);
    }
    double *et = e, *eq = e + v, *e1 = e + 2 * (size_t)v, zt = 0, zq = 0, z1 = 0;
    for (int j = 0; j < v; j++) {
        zt += et[j] = exp(t[j] * inv_t - mt);
        zq += eq[j] = exp(s[j] * inv_t - mq);
        z1 += e1[j] = exp(s[j] - m1);
    }
    double lt = mt + log(zt), lq = mq + log(zq), l1 = m1 + log(z1), kl = 0;
    for (int j = 0; j < v; j++) {
        double p = et[j] / zt, q = eq[j] / zq, sm = e1[j] / z1;
        if (p > 0) kl += p * ((t[j] * inv_t - lt) - (s[j] * inv_t - lq));
        et[j] = p, eq[j] = q, e1[j] = sm;
    }
    int valid = y >= 0 && y < v;
    *kd_out = T * T * kl;
    *ce_out = valid ? l1 - s[y] : NAN;
    for (int j = 0; j < v; j++)
        s[j] = (float)(w * (alpha * T * (eq[j] - et[j]) + (1 - alpha) * (e1[j] - (j == y))));
}

void st_cpu_kd_loss(float *s_logits, uint16_t *dl16, const float *t_logits, float *loss, const int32_t *targets,
                    const float *weight, int n, int v, float temperature, float alpha, double *total,
                    double *parts_out) {
    if (n <= 0) return;
    double *parts = calloc(2 * (size_t)n + 1, sizeof(double)); /* per-row kd, ce: summed in order below */
    int failed = parts == NULL;
#pragma omp parallel if (n > 1) reduction(| : failed)
    {
        double *e = parts ? malloc(3 * (size_t)v * sizeof(double)) : NULL;
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
