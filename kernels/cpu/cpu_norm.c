/* cpu_norm.c — LayerNorm and RMSNorm over rows of C, forward and backward.
 *
 * Forward and the dx part of backward are parallel over rows. The weight/bias gradients (sums over
 * rows) are parallel over column blocks, each block walking the rows in order, so they are
 * deterministic for any thread count. dx, dw, db ACCUMULATE (+=); out, mean, rstd are overwritten.
 * Caller owns every buffer. */
#include "kernels/cpu/cpu_kernels.h"

#include <math.h>

#define ST_NORM_COLS 64

void st_cpu_layernorm_fwd(float *out, float *mean, float *rstd, const float *x, const float *w, const float *b,
                          int n, int c, float eps) {
#pragma omp parallel for schedule(static) if ((long)n * c >= ST_CPU_PAR_MIN)
    for (int i = 0; i < n; i++) {
        const float *restrict xr = x + (size_t)i * c;
        float *restrict o = out + (size_t)i * c;
        float mu = st_cpu_sum(xr, c) / (float)c;
        /* two-pass variance: exact centring avoids the E[x^2]-E[x]^2 cancellation */
        float acc[ST_LANES] = {0};
        int j = 0;
        for (; j + ST_LANES <= c; j += ST_LANES)
            for (int l = 0; l < ST_LANES; l++) {
                float d = xr[j + l] - mu;
                acc[l] += d * d;
            }
        float var = 0.0f;
        for (int l = 0; l < ST_LANES; l++) var += acc[l];
        for (; j < c; j++) var += (xr[j] - mu) * (xr[j] - mu);
        var /= (float)c;
        float rs = 1.0f / sqrtf(var + eps);
        for (j = 0; j < c; j++) o[j] = (xr[j] - mu) * rs * w[j] + b[j];
        mean[i] = mu;
        rstd[i] = rs;
    }
}

/* dw[j] += sum_i dout[i,j] * xhat[i,j]; db[j] += sum_i dout[i,j] (db may be NULL). For RMSNorm
 * mean is NULL (xhat = x * rstd). */
static void norm_param_grads(float *dw, float *db, const float *dout, const float *x, const float *mean,
                             const float *rstd, int n, int c) {
    int nblocks = (c + ST_NORM_COLS - 1) / ST_NORM_COLS;
#pragma omp parallel for schedule(static) if ((long)n * c >= ST_CPU_PAR_MIN)
    for (int blk = 0; blk < nblocks; blk++) {
        int c0 = blk * ST_NORM_COLS;
        int wdt = c - c0 < ST_NORM_COLS ? c - c0 : ST_NORM_COLS;
        float aw[ST_NORM_COLS] = {0}, ab[ST_NORM_COLS] = {0};
        for (int i = 0; i < n; i++) {
            const float *restrict dr = dout + (size_t)i * c + c0;
            const float *restrict xr = x + (size_t)i * c + c0;
            float mu = mean ? mean[i] : 0.0f, rs = rstd[i];
            for (int j = 0; j < wdt; j++) {
                aw[j] += dr[j] * ((xr[j] - mu) * rs);
                ab[j] += dr[j];
            }
        }
        for (int j = 0; j < wdt; j++) dw[c0 + j] += aw[j];
        if (db)
            for (int j = 0; j < wdt; j++) db[c0 + j] += ab[j];
    }
}

void st_cpu_layernorm_bwd(float *dx, float *dw, float *db, const float *dout, const float *x, const float *w,
                          const float *mean, const float *rstd, int n, int c) {
#pragma omp parallel for schedule(static) if ((long)n * c >= ST_CPU_PAR_MIN)
    for (int i = 0; i < n; i++) {
        const float *restrict dr = dout + (size_t)i * c;
        const float *restrict xr = x + (size_t)i * c;
        float *restrict dxr = dx + (size_t)i * c;
        float mu = mean[i], rs = rstd[i];
        /* dnorm = dout * w; need mean(dnorm) and mean(dnorm * xhat) */
        float a1[ST_LANES] = {0}, a2[ST_LANES] = {0};
        int j = 0;
        for (; j + ST_LANES <= c; j += ST_LANES)
            for (int l = 0; l < ST_LANES; l++) {
                float dn = dr[j + l] * w[j + l];
                a1[l] += dn;
                a2[l] += dn * ((xr[j + l] - mu) * rs);
            }
        float s1 = 0.0f, s2 = 0.0f;
        for (int l = 0; l < ST_LANES; l++) {
            s1 += a1[l];
            s2 += a2[l];
        }
        for (; j < c; j++) {
            float dn = dr[j] * w[j];
            s1 += dn;
            s2 += dn * ((xr[j] - mu) * rs);
        }
        float m1 = s1 / (float)c, m2 = s2 / (float)c;
        for (j = 0; j < c; j++) {
            float xhat = (xr[j] - mu) * rs;
            dxr[j] += (dr[j] * w[j] - m1 - xhat * m2) * rs;
        }
    }
    norm_param_grads(dw, db, dout, x, mean, rstd, n, c);
}

void st_cpu_rmsnorm_fwd(float *out, float *rstd, const float *x, const float *w, int n, int c, float eps) {
#pragma omp parallel for schedule(static) if ((long)n * c >= ST_CPU_PAR_MIN)
    for (int i = 0; i < n; i++) {
        const float *restrict xr = x + (size_t)i * c;
        float *restrict o = out + (size_t)i * c;
        float ms = st_cpu_dot(xr, xr, c) / (float)c;
        float rs = 1.0f / sqrtf(ms + eps);
        for (int j = 0; j < c; j++) o[j] = w[j] * (xr[j] * rs); /* HF order: weight * (x * rstd) */
        rstd[i] = rs;
    }
}

void st_cpu_rmsnorm_bwd(float *dx, float *dw, const float *dout, const float *x, const float *w,
                        const float *rstd, int n, int c) {
#pragma omp parallel for schedule(static) if ((long)n * c >= ST_CPU_PAR_MIN)
    for (int i = 0; i < n; i++) {
        const float *restrict dr = dout + (size_t)i * c;
        const float *restrict xr = x + (size_t)i * c;
        float *restrict dxr = dx + (size_t)i * c;
        float rs = rstd[i];
        /* d/dx of w * x * rstd: rstd * (dnorm - xhat * mean(dnorm * xhat)), dnorm = dout * w */
        float acc[ST_LANES] = {0};
        int j = 0;
        for (; j + ST_LANES <= c; j += ST_LANES)
            for (int l = 0; l < ST_LANES; l++) acc[l] += dr[j + l] * w[j + l] * (xr[j + l] * rs);
        float s = 0.0f;
        for (int l = 0; l < ST_LANES; l++) s += acc[l];
        for (; j < c; j++) s += dr[j] * w[j] * (xr[j] * rs);
        float m = s / (float)c;
        for (j = 0; j < c; j++) dxr[j] += rs * (dr[j] * w[j] - (xr[j] * rs) * m);
    }
    norm_param_grads(dw, NULL, dout, x, NULL, rstd, n, c);
}
