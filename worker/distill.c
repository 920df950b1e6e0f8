/* distill.c — see distill.h. */
#include "worker/distill.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/error.h"

int st_distill_init(st_distill *d, st_model *teacher, const st_model *student, float temperature, float alpha) {
    memset(d, 0, sizeof *d);
    if (teacher->cfg.vocab != student->cfg.vocab)
        return st_fail(ST_ECONFIG, "distill.teacher: vocabulary size %d differs from the student's %d",
                       teacher->cfg.vocab, student->cfg.vocab);
    if (strcmp(student->be->name, "cpu") != 0 || strcmp(teacher->be->name, "cpu") != 0)
        return st_fail(ST_ECONFIG, "distill: only the cpu backend is supported so far (backend: cpu)");
    if (!(temperature > 0) || !(alpha >= 0 && alpha <= 1))
        return st_fail(ST_ECONFIG, "distill: temperature must be > 0 and alpha in [0, 1] (got %g, %g)",
                       (double)temperature, (double)alpha);
    d->teacher = teacher;
    d->temperature = temperature;
    d->alpha = alpha;
    return 0;
}

void st_distill_free(st_distill *d) {
    free(d->t_logits);
    memset(d, 0, sizeof *d);
}

void st_distill_reset(st_distill *d) { d->kd_sum = d->ce_sum = 0; }

/* log-sum-exp of z[0..v) * scale, and the max it was shifted by. */
static double lse_scaled(const float *z, int v, double scale, double *max_out) {
    double mx = -INFINITY, s = 0;
    for (int j = 0; j < v; j++) mx = fmax(mx, z[j] * scale);
    for (int j = 0; j < v; j++) s += exp(z[j] * scale - mx);
    *max_out = mx;
    return mx + log(s);
}

double st_distill_rows(float *s_logits, const float *t_logits, float *loss, const int32_t *targets,
                       const float *weight, int n, int v, float temperature, float alpha, double *kd, double *ce) {
    double total = 0, inv_t = 1.0 / temperature, T = temperature;
    for (int i = 0; i < n; i++) {
        float *s = s_logits + (size_t)i * v;
        const float *t = t_logits + (size_t)i * v;
        double w = weight[i];
        if (w == 0) {
            memset(s, 0, (size_t)v * sizeof(float));
            loss[i] = 0;
            continue;
        }
        double mx, lt = lse_scaled(t, v, inv_t, &mx), lq = lse_scaled(s, v, inv_t, &mx), l1 = lse_scaled(s, v, 1.0, &mx);
        double kl = 0;
        for (int j = 0; j < v; j++) {
            double logp = t[j] * inv_t - lt, logq = s[j] * inv_t - lq;
            kl += exp(logp) * (logp - logq);
        }
        double kd_i = T * T * kl, ce_i = l1 - s[targets[i]];
        double li = alpha * kd_i + (1 - alpha) * ce_i;
        for (int j = 0; j < v; j++) {
            double p = exp(t[j] * inv_t - lt), q = exp(s[j] * inv_t - lq), sm = exp(s[j] - l1);
            s[j] = (float)(w * (alpha * T * (q - p) + (1 - alpha) * (sm - (j == targets[i]))));
        }
        loss[i] = (float)li;
        total += w * li;
        *kd += w * kd_i;
        *ce += w * ce_i;
    }
    return total;
}

/* The student's head-loss hook: the teacher's logits for rows [r0, r0+rows) from its final hidden states. */
static double head_loss(void *ctx, float *logits, float *loss, const int32_t *targets, const float *weight, int r0,
                        int rows, int v) {
    st_distill *d = ctx;
    st_model *t = d->teacher;
    size_t need = (size_t)rows * v;
    if (need > d->t_logits_floats) {
        free(d->t_logits);
        d->t_logits = malloc(need * sizeof(float));
        d->t_logits_floats = d->t_logits ? need : 0;
        if (!d->t_logits) return NAN; /* the trainer's non-finite check stops the step with a message */
    }
    int C = t->cfg.d_model, head = t->cfg.tied_embeddings ? 0 : t->n_params - 1;
    const float *x = st_model_final_hidden(t) + (size_t)r0 * C;
    t->be->matmul(d->t_logits, x, t->weights + t->params[head].offset, rows, v, C, 0, 1, 1.0f, 0.0f);
    return st_distill_rows(logits, d->t_logits, loss, targets, weight, rows, v, d->temperature, d->alpha, &d->kd_sum,
                           &d->ce_sum);
}

void st_distill_attach(st_distill *d, st_model *student, const int32_t *inputs) {
    size_t N = (size_t)student->B * student->T;
    int32_t *zeros_t = calloc(N, sizeof(int32_t));
    float *zeros_w = calloc(N, sizeof(float));
    /* the teacher's own loss is not needed: weight 0 everywhere makes its head produce only lnf */
    if (zeros_t && zeros_w) st_model_forward(d->teacher, inputs, zeros_t, zeros_w, 0);
    free(zeros_t);
    free(zeros_w);
    student->head_loss = head_loss;
    student->head_loss_ctx = d;
}

void st_distill_detach(st_model *student) {
    student->head_loss = NULL;
    student->head_loss_ctx = NULL;
}
