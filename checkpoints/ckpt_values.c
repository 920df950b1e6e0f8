/* ckpt_values.c — value checks of weights as loaded: a model file holding NaN or Inf is refused at
 * load naming the tensor, instead of training or evaluating to a loss of nan with exit 0. */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <stdlib.h>

#include "checkpoints/ckpt.h"
#include "common/error.h"

/* 1 when x[0..n) holds a NaN or an inf: the largest |x| as bits (exponent all ones = non-finite), a branch-free
 * reduction that vectorizes (an early-exit isfinite loop does not: it cost more than q4_0's encoder). */
static int any_nonfinite(const float *x, size_t n) {
    uint32_t most = 0;
    for (size_t k = 0; k < n; k++) {
        uint32_t u;
        memcpy(&u, x + k, 4);
        u &= 0x7fffffffu;
        most = u > most ? u : most;
    }
    return most >= 0x7f800000u;
}

int st_check_finite_values(const float *x, size_t n, size_t first, const char *source, const char *name) {
    for (size_t at = 0; at < n; at += 4096) {
        size_t m = n - at < 4096 ? n - at : 4096;
        if (!any_nonfinite(x + at, m)) continue;
        for (size_t k = at; k < at + m; k++) /* the first one, for the message */
            if (!isfinite(x[k]))
                return st_fail(ST_EFORMAT, "%s: tensor %s holds a non-finite value (%g at element %zu): the model "
                               "file is damaged or was saved from a diverged run", source, name, (double)x[k], first + k);
    }
    return 0;
}

int st_model_check_finite(const st_model *m, const char *source) { return st_model_check_finite_part(m, source, NULL, NULL); }

int st_model_check_finite_part(const st_model *m, const char *source, st_model_keep_fn keep, void *ctx) {
    const size_t chunk = 1u << 20;
    float *host = malloc(chunk * sizeof(float));
    if (!host) return st_fail(ST_ENOMEM, "out of memory checking the weights of %s", source);
    int rc = 0;
    for (int i = 0; !rc && i < m->n_params; i++) {
        const st_param *p = &m->params[i];
        size_t first = 0, last = p->numel;
        if (keep) keep(ctx, m, i, &first, &last);
        for (size_t at = first; !rc && at < last; at += chunk) {
            size_t n = last - at < chunk ? last - at : chunk;
            m->be->copy_to_host(host, st_model_part(m, i) + at, n * sizeof(float));
            rc = st_check_finite_values(host, n, at, source, p->name);
        }
    }
    free(host);
    return rc;
}
