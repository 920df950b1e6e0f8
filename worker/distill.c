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
    size_t N = (size_t)student->B * student->T;
    d->no_targets = calloc(N ? N : 1, sizeof(int32_t));
    d->no_weight = calloc(N ? N : 1, sizeof(float));
    if (!d->no_targets || !d->no_weight) {
        st_distill_free(d);
        return st_fail(ST_ENOMEM, "out of memory");
    }
    teacher->hidden_only = 1;
    d->teacher = teacher;
    d->temperature = temperature;
    d->alpha = alpha;
    return 0;
}

void st_distill_free(st_distill *d) {
    free(d->t_logits);
    free(d->no_targets);
    free(d->no_weight);
    memset(d, 0, sizeof *d);
}

void st_distill_reset(st_distill *d) { d->kd_sum = d->ce_sum = 0; }

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
    *kd_out = T * T * kl;
    *ce_out = l1 - s[y];
    for (int j = 0; j < v; j++)
        s[j] = (float)(w * (alpha * T * (eq[j] - et[j]) + (1 - alpha) * (e1[j] - (j == y))));
}

double st_distill_rows(float *s_logits, const float *t_logits, float *loss, const int32_t *targets,
                       const float *weight, int n, int v, float temperature, float alpha, double *kd, double *ce) {
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
                continue;
            }
            kd_row(s, t_logits + (size_t)i * v, targets[i], weight[i], v, temperature, alpha, e, &parts[2 * i],
                   &parts[2 * i + 1]);
            loss[i] = (float)(alpha * parts[2 * i] + (1 - alpha) * parts[2 * i + 1]);
        }
        free(e);
    }
    double total = 0;
    for (int i = 0; i < n && !failed; i++) { /* row order, whatever the thread count: deterministic */
        double w = weight[i];
        total += w * (alpha * parts[2 * i] + (1 - alpha) * parts[2 * i + 1]);
        *kd += w * parts[2 * i];
        *ce += w * parts[2 * i + 1];
    }
    free(parts);
    return failed ? NAN : total; /* NAN: the trainer's non-finite check stops the step */
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
    st_model_forward(d->teacher, inputs, d->no_targets, d->no_weight, 0);
    student->head_loss = head_loss;
    student->head_loss_ctx = d;
}

void st_distill_detach(st_model *student) {
    student->head_loss = NULL;
    student->head_loss_ctx = NULL;
}
