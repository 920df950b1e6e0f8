/* train_step.c — one optimizer step: data and loss weights, forward/backward per micro-batch, the
 * gradient reduction, clipping, AdamW and the parameter gather; and eval on the val splits. */
#include "coordinator/trainer/train_internal.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/error.h"
#include "common/json.h"
#include "common/util.h"
#include "worker/lora.h"

/* ---------------- one step ---------------- */


/* Fills this rank's samples and their loss weights: mask x task loss weight / targets in the global batch. */
static int load_step_data(trainer *t) {
    const st_config *c = t->cfg;
    int G = t->world * t->slots;
    int rc = st_loader_next_docs(&t->loader, G, t->rank * t->slots, t->slots, t->inputs, t->targets, t->mask,
                                 t->task_of, NULL, t->doc_pos);
    if (rc) return rc;
    /* targets per task in the whole global batch: [n_tasks] then the total */
    double *count = t->task_counts;
    memset(count, 0, ((size_t)t->n_tasks + 1) * sizeof(double));
    for (int s = 0; s < t->slots; s++)
        for (int j = 0; j < t->T; j++) count[t->task_of[s]] += t->mask[(size_t)s * t->T + j];
    for (int k = 0; k < t->n_tasks; k++) count[t->n_tasks] += count[k];
    MPI_Allreduce(MPI_IN_PLACE, count, t->n_tasks + 1, MPI_DOUBLE, MPI_SUM, t->comm);
    for (int s = 0; s < t->slots; s++) {
        int k = t->task_of[s];
        /* fixed: the mean over all targets, each task scaled by loss_weight; learned: each task's own mean,
         * scaled by loss_weight * exp(-s_k) */
        double denom = t->taskw.learned ? count[k] : count[t->n_tasks];
        float lw = denom > 0 ? (float)(c->tasks[k].loss_weight * st_taskw_scale(&t->taskw, k) / denom) : 0.0f;
        for (int j = 0; j < t->T; j++) t->weight[(size_t)s * t->T + j] = t->mask[(size_t)s * t->T + j] * lw;
    }
    return 0;
}

/* One step of the learned task weights from this step's all-reduced per-task means. */
static void update_task_weights(trainer *t) {
    if (!t->taskw.learned) return;
    double lw[ST_TASKW_MAX], mean[ST_TASKW_MAX];
    int present[ST_TASKW_MAX];
    for (int k = 0; k < t->n_tasks && k < ST_TASKW_MAX; k++) {
        double cnt = t->task_sums[3 * k + 1];
        present[k] = cnt > 0;
        mean[k] = cnt > 0 ? t->task_sums[3 * k] / cnt : 0.0;
        lw[k] = t->cfg->tasks[k].loss_weight;
    }
    st_taskw_update(&t->taskw, lw, mean, present);
}

/* Adds this micro-batch's per-task loss sums, target counts and input tokens. */
static void account_tasks(trainer *t, int first_sample) {
    int N = t->micro * t->T;
    for (int i = 0; i < N; i++) {
        int s = first_sample + i / t->T;
        int k = t->task_of[s];
        float mk = t->mask[(size_t)first_sample * t->T + i];
        t->task_sums[3 * k] += (double)mk * t->model.loss_per_pos[i];
        t->task_sums[3 * k + 1] += mk;
        t->task_sums[3 * k + 2] += 1;
    }
}

/* The step's one scalar all-reduce, after the gradient reduction: the per-task sums, the loss, this rank's
 * part of the norm's sum of squares when the ranks' parts are summed (`partial`, stages 1-3 on several
 * ranks: st_comm_grad_sumsq_part) and the distillation parts. One vector instead of a collective each: the
 * sum is element-wise, each element's bits those of its own all-reduce. *sq becomes the global sum. Under
 * SHARDTUNE_NORM_CHECK the norm's own all-reduce too; a difference sets *check (the step still runs its
 * collectives: no rank is left waiting). */
static int reduce_step_sums(trainer *t, double loss, double *sq, int partial, st_step_result *r, int *check) {
    double *x = t->task_sums, mine = *sq;
    int at = 3 * t->n_tasks, n = at + 1, kd = 0;
    x[at] = loss;
    if (partial) x[n++] = mine;
    if (t->kd_on) { /* the two parts of the loss, weighted like it (DESIGN.md: ce_loss, kd_loss) */
        kd = n;
        st_distill_parts(&t->kd, &x[kd], &x[kd + 1]);
        n += 2;
    }
    double t0 = st_now();
    int rc = MPI_Allreduce(MPI_IN_PLACE, x, n, MPI_DOUBLE, MPI_SUM, t->comm);
    if (partial) t->dp.comm_seconds += st_now() - t0; /* the norm's reduction, counted as before */
    if (rc != MPI_SUCCESS) return st_fail(ST_ECOMM, "rank %d: the step's loss and norm all-reduce failed", t->rank);
    r->loss = x[at];
    if (kd) r->kd_loss = x[kd], r->ce_loss = x[kd + 1];
    if (!partial) return 0;
    *sq = x[at + 1];
    if (!t->dp.sq_check) return 0;
    double alone = 0; /* SHARDTUNE_NORM_CHECK: the norm's own all-reduce, as before, gives the same bits */
    MPI_Allreduce(&mine, &alone, 1, MPI_DOUBLE, MPI_SUM, t->comm);
    if (memcmp(&alone, sq, sizeof alone) && !*check)
        *check = st_fail(ST_ECOMM, "rank %d: SHARDTUNE_NORM_CHECK: the norm's sum of squares reduced with the loss "
                                   "is %.17g, on its own %.17g", t->rank, *sq, alone);
    return 0;
}

int st_trainer_step(trainer *t, int64_t step, st_step_result *r) {
    st_model *m = &t->model;
    double t0 = st_now();
    memset(t->task_sums, 0, ST_TASK_SUMS(t->n_tasks) * sizeof(double));
    r->teacher_seconds = 0;
    if (t->kd_on) st_distill_reset(&t->kd);
    st_trainer_phase(t, ST_PHASE_DATA);
    int rc = load_step_data(t);
    if (rc) return rc;
    st_model_zero_grad(m);
    double loss = 0;
    for (int a = 0; a < t->accum; a++) {
        size_t off = (size_t)a * t->micro * t->T;
        st_trainer_phase(t, ST_PHASE_FORWARD);
        if (t->kd_on) { /* the teacher's forward first; the student's head then computes the KD loss */
            double tt = st_now();
            st_distill_attach(&t->kd, m, t->inputs + off);
            r->teacher_seconds += st_now() - tt;
        }
        if (t->doc_pos && (rc = st_model_set_doc_positions(m, t->doc_pos + off))) return rc;
        /* LoRA dropout masks keyed by the step and the global sample index (split-independent) */
        st_lora_dropout_batch(m, step, (int64_t)t->world * t->slots * step + (int64_t)t->rank * t->slots +
                                           (int64_t)a * t->micro);
        loss += st_model_forward(m, t->inputs + off, t->targets + off, t->weight + off, 1);
        st_distill_detach(m); /* evaluation keeps plain cross-entropy */
        account_tasks(t, a * t->micro);
        st_trainer_phase(t, ST_PHASE_BACKWARD);
        /* reduce while backward runs: stages 0-1 on the last micro-batch; stages 2-3 every micro-batch */
        st_comm_backward_begin(&t->dp, m, t->cfg->sharding.overlap, a == t->accum - 1);
        st_model_backward(m);
        if ((rc = st_comm_backward_end(&t->dp, m))) return rc;
    }
    st_trainer_phase(t, ST_PHASE_COMM);
    float *g = NULL;
    rc = st_comm_reduce_grads(&t->dp, m, &g);
    if (rc) return rc;
    double sq = 0;
    int partial = 0;
    int check = st_comm_grad_sumsq_part(&t->dp, m, g, &sq, &partial); /* fails only under SHARDTUNE_NORM_CHECK */
    r->lr = st_lr_at(&t->optim.cfg, (int)step);
    /* the loss (and the norm) summed before the update so that every rank can refuse a bad step alike */
    if ((rc = reduce_step_sums(t, loss, &sq, partial, r, &check))) return rc;
    double norm = sqrt(sq);
    r->bad = st_trainer_bad_step(t, r->loss, norm);
    st_trainer_phase(t, ST_PHASE_OPTIMIZER);
    /* AdamW and (ZeRO 1-2) the parameter all-gather, bucket by bucket; a bad step changes nothing */
    if (!r->bad) rc = st_comm_update_params(&t->dp, m, &t->optim, g, r->lr, st_clip_scale(norm, (float)t->cfg->train.grad_clip));
    if (!rc && t->check_bf16_copy) rc = st_model_check_bf16_copy(m);
    if (!rc) rc = check; /* the norm check's difference, after the step's collectives */
    if (rc) return rc;
    st_trainer_phase(t, ST_PHASE_IDLE);
    if (!r->bad) update_task_weights(t);
    r->grad_norm = norm;
    r->comm_seconds = t->dp.comm_seconds;
    r->seconds = st_now() - t0;
    /* a device failure (kernels.h `status`) ends the run here, after the step's collectives (every rank
     * ran the same ones) and before the step is reported or saved */
    if ((rc = t->be->status()) != 0)
        st_fail_context(rc, "step %lld: device failure (nothing of this step is saved; the last checkpoint stands)",
                        (long long)step + 1);
    return rc;
}

/* ---------------- eval on each task's val split ---------------- */

/* Mean val loss per target token of task k over at most eval.batches micro-batches, split over ranks. */
double st_trainer_eval_task(trainer *t, int k, double *targets_out) {
    st_loader_eval it;
    double sums[2] = {0, 0};
    if (st_loader_eval_begin(&t->loader, k, ST_SPLIT_VAL, &it) == 0) {
        int T = t->T, B = t->micro;
        for (int b = 0; b < t->cfg->eval.batches; b++) {
            int rows = 0;
            for (; rows < B; rows++) {
                size_t o = (size_t)rows * T;
                if (!st_loader_eval_next_docs(&it, t->inputs + o, t->targets + o, t->mask + o, NULL,
                                              t->doc_pos ? t->doc_pos + o : NULL)) break;
            }
            if (rows == 0) break;
            /* ZeRO-3: a forward gathers each layer from every rank, so every rank runs every batch */
            int mine = b % t->world == t->rank;
            if (!mine && t->dp.stage != 3) continue;
            for (int i = rows * T; i < B * T; i++) { t->inputs[i] = 0; t->targets[i] = 0; t->mask[i] = 0; }
            for (int i = rows * T; i < B * T && t->doc_pos; i++) t->doc_pos[i] = i % T;
            if (t->doc_pos && st_model_set_doc_positions(&t->model, t->doc_pos)) break; /* checked in training */
            st_model_forward(&t->model, t->inputs, t->targets, t->mask, 0);
            for (int i = 0; i < B * T && mine; i++) {
                sums[0] += (double)t->mask[i] * t->model.loss_per_pos[i];
                sums[1] += t->mask[i];
            }
        }
    }
    MPI_Allreduce(MPI_IN_PLACE, sums, 2, MPI_DOUBLE, MPI_SUM, t->comm);
    *targets_out = sums[1];
    return sums[1] > 0 ? sums[0] / sums[1] : NAN;
}


/* MFU is relative to what this machine's matmul actually reaches (as bench/cpu_train reports it), not
 * to a datasheet: a 1024^3 matmul on the training backend in the run's precision (matmul_bf16 under
 * precision: bf16, whose peak is several times the fp32 one on a GPU), best of three. */
void st_trainer_measure_peak(trainer *t) {
    const st_backend *be = t->be;
    const int n = 1024;
    size_t bytes = (size_t)n * n * sizeof(float);
    int bf16 = t->cfg->precision == ST_PRECISION_BF16;
    float *a = be->alloc(bytes), *b = be->alloc(bytes), *c = be->alloc(bytes);
    float *scratch = bf16 ? be->alloc(st_matmul_bf16_scratch_floats(n, n, n) * sizeof(float)) : NULL;
    double best = 0;
    if (a && b && c && (scratch || !bf16)) {
        for (int rep = 0; rep < 3; rep++) {
            double t0 = st_now();
            if (bf16) /* bf16 operands, as the weights and saved activations are: the GEMM alone */
                be->matmul_bf16(c, st_mm_bf16((const uint16_t *)a), st_mm_bf16((const uint16_t *)b), NULL, n, n, n,
                                0, 1, 1.0f, 0.0f, scratch);
            else be->matmul(c, a, b, n, n, n, 0, 1, 1.0f, 0.0f);
            be->synchronize();
            double dt = st_now() - t0;
            if (dt > 0 && 2.0 * n * n * n / dt > best) best = 2.0 * n * n * n / dt;
        }
    }
    be->free(a);
    be->free(b);
    be->free(c);
    be->free(scratch);
    /* a device failure here stays recorded: the first step's status check reports it */
    MPI_Allreduce(&best, &t->peak_flops, 1, MPI_DOUBLE, MPI_SUM, t->comm);
}
