/* distill.c — knowledge distillation in the student's LM head (see distill.h); the loss kernel is the
 * backend's kd_loss (kernels/cpu/cpu_kd.c, kernels/cuda/cross_entropy.cu). */
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
    if (teacher->be != student->be)
        return st_fail(ST_ECONFIG, "distill.teacher: the teacher must run on the student's backend (%s)",
                       student->be->name);
    if (!student->be->kd_loss)
        return st_fail(ST_ECONFIG, "distill: the %s backend has no distillation loss kernel", student->be->name);
    if (!(temperature > 0) || !(alpha >= 0 && alpha <= 1))
        return st_fail(ST_ECONFIG, "distill: temperature must be > 0 and alpha in [0, 1] (got %g, %g)",
                       (double)temperature, (double)alpha);
    const st_backend *be = student->be;
    size_t N = (size_t)student->B * student->T;
    int32_t *zeros_t = calloc(N ? N : 1, sizeof(int32_t));
    float *zeros_w = calloc(N ? N : 1, sizeof(float));
    d->sums = be->alloc(2 * sizeof(double));
    /* one head chunk of teacher logits, made now: the run's memory from the start (the planner counts it) */
    size_t chunk = st_model_head_chunk_floats(&student->cfg, student->B, student->T, !be->host_memory);
    d->t_logits = be->alloc((chunk ? chunk : 1) * sizeof(float));
    d->t_logits_floats = d->t_logits ? chunk : 0;
    if (!zeros_t || !zeros_w || !d->sums || !d->t_logits) {
        free(zeros_t), free(zeros_w);
        st_distill_free(d, be);
        return st_fail(ST_ENOMEM, "out of memory");
    }
    d->no_targets = zeros_t, d->no_weight = zeros_w;
    teacher->hidden_only = 1;
    d->teacher = teacher;
    d->temperature = temperature;
    d->alpha = alpha;
    return 0;
}

void st_distill_free(st_distill *d, const st_backend *be) {
    if (be) {
        be->free(d->t_logits);
        be->free(d->sums);
    }
    free(d->no_targets);
    free(d->no_weight);
    memset(d, 0, sizeof *d);
}

void st_distill_reset(st_distill *d) {
    if (d->sums) d->teacher->be->memset0(d->sums, 2 * sizeof(double));
}

void st_distill_parts(const st_distill *d, double *kd, double *ce) {
    double kc[2] = {0, 0};
    if (d->sums) d->teacher->be->copy_to_host(kc, d->sums, sizeof kc);
    *kd = kc[0], *ce = kc[1];
}

/* The student's head-loss hook: the teacher's logits for rows [r0, r0+rows) from its final hidden states (its
 * own precision rules), then the fused KD rows on the backend; nothing waits for the host. */
static void head_loss(void *ctx, float *logits, uint16_t *dl16, float *loss, const int32_t *targets,
                      const float *weight, int r0, int rows, int v, double *total) {
    st_distill *d = ctx;
    st_model *t = d->teacher;
    const st_backend *be = t->be;
    size_t need = (size_t)rows * v;
    if (need > d->t_logits_floats) {
        be->free(d->t_logits);
        d->t_logits = be->alloc(need * sizeof(float));
        d->t_logits_floats = d->t_logits ? need : 0;
    }
    /* a sharded teacher (ZeRO-3) gathers its final norm and head (a tied wte) for the chunk: every rank runs
     * the same chunks (the same micro-batch shape), so the gathers happen even without a logits buffer */
    int fn = st_model_layer_first_param(t, t->cfg.n_layer), nb = st_model_base_params(t);
    int e0 = st_model_layer_first_param(t, 0), tied = t->cfg.tied_embeddings;
    st_model_acquire(t, fn, nb);
    if (tied) st_model_acquire(t, 0, e0);
    if (d->t_logits) st_model_head_logits(t, d->t_logits, r0, rows);
    if (tied) st_model_release(t, 0, e0);
    st_model_release(t, fn, nb);
    if (!d->t_logits) { /* the trainer's non-finite check stops the step with a message */
        double nan = NAN;
        be->copy_to_device(total, &nan, sizeof nan);
        return;
    }
    if (d->capture_t_logits)
        be->copy_to_host(d->capture_t_logits + (size_t)r0 * v, d->t_logits, (size_t)rows * v * sizeof(float));
    be->kd_loss(logits, dl16, d->t_logits, loss, targets, weight, rows, v, d->temperature, d->alpha, total, d->sums);
}

void st_distill_attach(st_distill *d, st_model *student, const int32_t *inputs) {
    st_model_forward(d->teacher, inputs, d->no_targets, d->no_weight, 0);
    student->head_loss = head_loss;
    student->head_loss_ctx = d;
    student->head_loss_rows = 1;
}

void st_distill_detach(st_model *student) {
    student->head_loss = NULL;
    student->head_loss_ctx = NULL;
}
