/* train.c — the run loop (see train.h).
 *
 * One step: data → forward/backward per micro-batch → gradient reduction (worker/comm) → clip →
 * AdamW on this rank's range → parameter all-gather → metrics. Setup failures are agreed on by all
 * ranks (agree()), so a bad file on one rank ends every rank with one message from the lowest one. */
#include "coordinator/train.h"

#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "checkpoints/ckpt.h"
#include "checkpoints/model_io.h"
#include "common/error.h"
#include "common/json.h"
#include "common/util.h"
#include "coordinator/control_token.h"
#include "coordinator/monitor_server.h"
#include "coordinator/telemetry.h"
#include "worker/comm.h"
#include "worker/dataset.h"
#include "worker/loader.h"
#include "worker/model.h"
#include "worker/optim.h"

/* ---------------- signals: only set a flag ---------------- */

static volatile sig_atomic_t st_stop_requested;

static void on_signal(int sig) {
    (void)sig;
    st_stop_requested = 1;
}

void st_train_install_signals(const st_config *cfg) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    if (cfg->checkpoint.signal > 0) sigaction(cfg->checkpoint.signal, &sa, NULL);
}

/* ---------------- the trainer ---------------- */

typedef struct {
    int64_t at_step;
    unsigned char *layers; /* [n_layer] */
    unsigned modules;
} stage_plan;

typedef struct {
    const st_config *cfg;
    MPI_Comm comm;
    int rank, world;
    int print_error;
    const st_backend *be;
    st_model model;
    st_dataset *datasets;
    int n_tasks;
    st_loader loader;
    int loader_ready;
    st_comm dp;
    st_optim optim;
    stage_plan *stages;
    int n_stages, stage;
    int micro, accum, T, slots; /* slots = micro * accum samples per rank per step */
    int32_t *inputs, *targets;
    float *mask, *weight;
    int *task_of;
    double *task_sums; /* [3 * n_tasks]: loss sum, target count, input tokens */
    FILE *metrics;
    st_telemetry *tel;
    st_monitor *mon;
    st_probe *probe;
    uint64_t tokens_seen;
    /* checkpoint / resume */
    char *job_json, *model_config_text; /* identical on every rank (attributes are collective) */
    int64_t start_step, last_saved;     /* first step to run; completed steps of the last save (-1) */
    double last_loss, resumed_loss;     /* resumed_loss: loss at save of the checkpoint we resumed (NAN) */
} trainer;

static void set_phase(trainer *t, st_phase phase) {
    if (t->probe) st_probe_set_phase(t->probe, phase);
}

/* All ranks agree whether any rank failed; the lowest failing rank keeps print_error = 1. */
static int agree(trainer *t, int rc) {
    int mine = rc ? t->rank : t->world, first = t->world;
    MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, t->comm);
    if (first == t->world) return 0;
    t->print_error = first == t->rank;
    return rc ? rc : ST_ECOMM;
}

/* ---------------- setup ---------------- */

static int setup_backend(trainer *t) {
    const st_config *c = t->cfg;
    int threads = c->threads > 0 ? c->threads : st_num_threads();
    if (c->backend == ST_BACKEND_CUDA || c->backend == ST_BACKEND_AUTO) {
        const char *local = getenv("SLURM_LOCALID");
        if (!local) local = getenv("OMPI_COMM_WORLD_LOCAL_RANK");
        t->be = st_backend_cuda(local ? atoi(local) : 0);
        if (t->be) return 0;
        if (c->backend == ST_BACKEND_CUDA) return st_fail(ST_EDEVICE, "backend: cuda requested but %s", st_error());
        if (t->rank == 0) printf("backend: auto -> cpu (%s)\n", st_error());
    }
    t->be = st_backend_cpu(threads);
    return 0;
}

static int load_data(trainer *t) {
    const st_config *c = t->cfg;
    t->n_tasks = c->n_tasks;
    t->datasets = calloc((size_t)c->n_tasks, sizeof *t->datasets);
    if (!t->datasets) return st_fail(ST_ENOMEM, "out of memory");
    const st_dataset *ptrs[ST_CFG_MAX_TASKS];
    const char *names[ST_CFG_MAX_TASKS];
    double weights[ST_CFG_MAX_TASKS];
    for (int k = 0; k < c->n_tasks; k++) {
        int rc = st_dataset_load(c->tasks[k].path, &t->datasets[k]);
        if (rc) return st_fail_context(rc, "task '%s'", c->tasks[k].name);
        const st_dataset *d = &t->datasets[k];
        if (d->vocab_size > t->model.cfg.vocab) {
            for (uint64_t i = 0; i < d->n_tokens; i++)
                if ((int64_t)d->tokens[i] >= t->model.cfg.vocab)
                    return st_fail(ST_EINVAL, "%s: token %u at index %llu is outside the model's vocabulary (%d)",
                                   c->tasks[k].path, d->tokens[i], (unsigned long long)i, t->model.cfg.vocab);
        }
        ptrs[k] = d;
        names[k] = c->tasks[k].name;
        weights[k] = c->tasks[k].weight;
    }
    int rc = st_loader_init(&t->loader, c->n_tasks, ptrs, names, weights, st_mixing_name(c->mixing.strategy),
                            c->mixing.temperature, c->mixing.cap, c->split, c->train.seq_len, (uint64_t)c->seed);
    if (rc) return rc;
    t->loader_ready = 1;
    return 0;
}

static int add_stage(trainer *t, int64_t at, const char *layers, unsigned modules, const char *what) {
    int L = t->model.cfg.n_layer;
    stage_plan *s = &t->stages[t->n_stages];
    s->at_step = at;
    s->modules = modules;
    s->layers = calloc((size_t)L, 1);
    if (!s->layers) return st_fail(ST_ENOMEM, "out of memory");
    t->n_stages++;
    int rc = st_parse_layer_ranges(layers, L, s->layers);
    if (rc) return st_fail_context(rc, "%s", what);
    if (st_model_count_trainable(&t->model, s->layers, modules) == 0)
        return st_fail(ST_ECONFIG, "%s: nothing to train (train_layers '%s' with these train_modules selects no "
                                   "parameter of a %d-layer model)", what, layers, L);
    return 0;
}

static int plan_stages(trainer *t) {
    const st_config *c = t->cfg;
    int L = t->model.cfg.n_layer;
    int max = c->finetune.n_stages > 0 ? c->finetune.n_stages : L + 1;
    t->stages = calloc((size_t)max + 1, sizeof *t->stages);
    if (!t->stages) return st_fail(ST_ENOMEM, "out of memory");
    char what[64], spec[32];
    switch (c->finetune.mode) {
    case ST_FINETUNE_FULL: return add_stage(t, 0, "all", ST_MOD_ALL, "finetune.mode full");
    case ST_FINETUNE_FROZEN:
        return add_stage(t, 0, c->finetune.train_layers, c->finetune.train_modules, "finetune.train_layers");
    case ST_FINETUNE_PROGRESSIVE:
        if (c->finetune.n_stages > 0) {
            for (int i = 0; i < c->finetune.n_stages; i++) {
                const st_stage_config *s = &c->finetune.stages[i];
                snprintf(what, sizeof what, "finetune.stages.%d", i);
                if (i == 0 && s->at_step != 0) return st_fail(ST_ECONFIG, "%s.at_step must be 0 for the first stage", what);
                if (i > 0 && s->at_step <= c->finetune.stages[i - 1].at_step)
                    return st_fail(ST_ECONFIG, "%s.at_step %lld must be greater than the previous stage's", what,
                                   (long long)s->at_step);
                int rc = add_stage(t, s->at_step, s->train_layers, s->train_modules, what);
                if (rc) return rc;
            }
            return 0;
        }
        if (c->finetune.unfreeze_every <= 0)
            return st_fail(ST_ECONFIG, "finetune.mode progressive needs finetune.stages or finetune.unfreeze_every");
        /* top-down: the head alone, then one more layer every unfreeze_every steps */
        for (int k = 0; k <= L; k++) {
            snprintf(spec, sizeof spec, k == 0 ? "none" : "-%d", k);
            snprintf(what, sizeof what, "finetune.unfreeze_every (stage %d)", k);
            int rc = add_stage(t, (int64_t)k * c->finetune.unfreeze_every, spec, c->finetune.train_modules, what);
            if (rc) return rc;
        }
        return 0;
    }
    return st_fail(ST_ECONFIG, "unknown finetune.mode");
}

static int stage_at(const trainer *t, int64_t step) {
    int s = 0;
    while (s + 1 < t->n_stages && t->stages[s + 1].at_step <= step) s++;
    return s;
}

static st_optim_config optim_config(const st_config *c) {
    st_optim_config o;
    o.lr = (float)c->train.lr;
    o.beta1 = (float)c->train.betas[0];
    o.beta2 = (float)c->train.betas[1];
    o.eps = (float)c->train.eps;
    o.weight_decay = (float)c->train.weight_decay;
    o.schedule = c->train.schedule == ST_SCHEDULE_COSINE   ? ST_SCHED_COSINE
                 : c->train.schedule == ST_SCHEDULE_LINEAR ? ST_SCHED_LINEAR
                                                           : ST_SCHED_CONSTANT;
    o.warmup_steps = (int)c->train.warmup_steps;
    o.total_steps = (int)c->train.steps;
    o.min_lr_ratio = (float)c->train.min_lr_ratio;
    o.layer_lr_decay = (float)c->finetune.layer_lr_decay;
    return o;
}

/* Makes stage `s` current: trainable set, gradient layout, shards and optimizer state. Parameters that
 * stay trainable keep their AdamW moments and step count; new ones start fresh. */
static int enter_stage(trainer *t, int s) {
    st_model *m = &t->model;
    long *old_off = malloc((size_t)m->n_params * sizeof(long));
    if (!old_off) return st_fail(ST_ENOMEM, "out of memory");
    for (int i = 0; i < m->n_params; i++) old_off[i] = m->params[i].grad_offset;
    /* the full old moments on every rank, so each rank can cut its new shard from them */
    float *old_m = NULL, *old_v = NULL;
    int rc = 0;
    if (t->optim.m && t->dp.n_pad > 0) {
        old_m = st_calloc_aligned(t->dp.n_pad * sizeof(float));
        old_v = st_calloc_aligned(t->dp.n_pad * sizeof(float));
        if (!old_m || !old_v) rc = st_fail(ST_ENOMEM, "out of memory re-sharding optimizer state");
        if (!rc) rc = st_comm_gather_state(&t->dp, t->optim.m, old_m);
        if (!rc) rc = st_comm_gather_state(&t->dp, t->optim.v, old_v);
    }
    int *old_steps = t->optim.param_step;
    t->optim.param_step = NULL;
    st_optim_free(&t->optim, t->be);
    st_comm_free(&t->dp);
    m->grad_align = t->world;
    if (!rc) rc = st_model_set_trainable(m, t->stages[s].layers, t->stages[s].modules);
    if (!rc) rc = st_comm_init(&t->dp, t->comm, t->cfg->sharding.stage, m);
    size_t lo, hi;
    st_comm_optim_range(&t->dp, &lo, &hi);
    st_optim_config oc = optim_config(t->cfg);
    if (!rc) rc = st_optim_init(&t->optim, &oc, lo, hi, m, t->be);
    if (!rc && old_steps) st_optim_carry_over(&t->optim, m, old_off, old_steps, old_m, old_v);
    t->stage = s;
    free(old_steps);
    free(old_m);
    free(old_v);
    free(old_off);
    return rc;
}

static int open_run_dir(trainer *t) {
    const st_config *c = t->cfg;
    if (t->rank != 0) return 0;
    int rc = st_mkdirs(c->run_dir);
    if (rc) return st_fail(rc, "run_dir %s: %s", c->run_dir, st_error());
    char path[ST_CFG_PATH_MAX + 32];
    snprintf(path, sizeof path, "%s/metrics.jsonl", c->run_dir);
    t->metrics = fopen(path, "a");
    if (!t->metrics) return st_fail(ST_EIO, "run_dir %s is not writable: %s", c->run_dir, strerror(errno));
    return 0;
}

static int start_monitoring(trainer *t) {
    const st_config *c = t->cfg;
    char pull[256] = "";
    int rc = 0;
    int enabled = c->monitor.publish[0] || c->monitor.control[0];
    if (!enabled) return 0;
    if (t->rank == 0) {
        char token[ST_TOKEN_BUF];
        rc = st_token_create(c->run_dir, token);
        st_monitor_opts mo = {0};
        mo.publish_addr = c->monitor.publish[0] ? c->monitor.publish : NULL;
        mo.control_addr = c->monitor.control[0] ? c->monitor.control : NULL;
        mo.token = token;
        mo.world_size = t->world;
        mo.stall_after_s = c->monitor.stall_after_s;
        if (!rc) rc = st_monitor_start(&mo, &t->mon);
        if (!rc) snprintf(pull, sizeof pull, "%s", st_monitor_pull_endpoint(t->mon));
    }
    if ((rc = agree(t, rc))) return rc;
    MPI_Bcast(pull, sizeof pull, MPI_CHAR, 0, t->comm);
    st_telemetry_opts to = {0};
    to.coordinator_addr = pull;
    to.rank = t->rank;
    to.heartbeat_ms = c->monitor.heartbeat_ms;
    to.job_id = getenv("SLURM_JOB_ID");
    rc = st_telemetry_start(&to, &t->tel);
    if (!rc) t->probe = st_telemetry_probe(t->tel);
    return agree(t, rc);
}

static int alloc_step_buffers(trainer *t) {
    const st_config *c = t->cfg;
    t->micro = c->train.micro_batch;
    t->accum = c->train.grad_accum;
    t->T = c->train.seq_len;
    t->slots = t->micro * t->accum;
    size_t n = (size_t)t->slots * t->T;
    t->inputs = malloc(n * sizeof(int32_t));
    t->targets = malloc(n * sizeof(int32_t));
    t->mask = malloc(n * sizeof(float));
    t->weight = malloc(n * sizeof(float));
    t->task_of = malloc((size_t)t->slots * sizeof(int));
    t->task_sums = calloc(3 * (size_t)t->n_tasks + 2, sizeof(double));
    if (!t->inputs || !t->targets || !t->mask || !t->weight || !t->task_of || !t->task_sums)
        return st_fail(ST_ENOMEM, "out of memory for step buffers");
    return 0;
}

/* The texts every checkpoint carries: the canonical job JSON and the model's config.json. */
static int read_job_texts(trainer *t) {
    int rc = st_config_to_json(t->cfg, &t->job_json);
    if (rc) return rc;
    char path[ST_CFG_PATH_MAX + 16];
    size_t len;
    snprintf(path, sizeof path, "%s/config.json", t->cfg->model.path);
    return st_read_file(path, &t->model_config_text, &len);
}

static int setup(trainer *t) {
    const st_config *c = t->cfg;
    int rc = agree(t, setup_backend(t));
    if (!rc) rc = agree(t, st_model_load_dir(c->model.path, t->be, &t->model));
    if (!rc) rc = agree(t, st_model_alloc_activations(&t->model, c->train.micro_batch, c->train.seq_len));
    if (!rc) rc = agree(t, load_data(t));
    if (!rc) rc = agree(t, plan_stages(t));
    if (!rc) rc = agree(t, alloc_step_buffers(t));
    if (!rc) rc = agree(t, open_run_dir(t));
    if (!rc) rc = start_monitoring(t);
    if (!rc) rc = agree(t, enter_stage(t, 0));
    if (!rc) rc = agree(t, read_job_texts(t));
    return rc;
}

static void teardown(trainer *t) {
    /* every rank's last reports reach the coordinator before it closes its sockets */
    if (t->tel) st_telemetry_stop(t->tel);
    if (t->mon || t->tel) MPI_Barrier(t->comm);
    if (t->mon) st_monitor_stop(t->mon);
    if (t->metrics) fclose(t->metrics);
    st_optim_free(&t->optim, t->be);
    free(t->optim.param_step);
    st_comm_free(&t->dp);
    if (t->loader_ready) st_loader_free(&t->loader);
    for (int k = 0; t->datasets && k < t->n_tasks; k++) st_dataset_free(&t->datasets[k]);
    free(t->datasets);
    for (int s = 0; s < t->n_stages; s++) free(t->stages[s].layers);
    free(t->stages);
    free(t->inputs);
    free(t->targets);
    free(t->mask);
    free(t->weight);
    free(t->task_of);
    free(t->task_sums);
    free(t->job_json);
    free(t->model_config_text);
    st_model_free(&t->model);
}

/* ---------------- one step ---------------- */

typedef struct {
    double loss, grad_norm, seconds, comm_seconds;
    float lr;
} step_result;

/* Fills this rank's samples and their loss weights: mask x task loss weight / targets in the global batch. */
static int load_step_data(trainer *t) {
    const st_config *c = t->cfg;
    int G = t->world * t->slots;
    int rc = st_loader_next(&t->loader, G, t->rank * t->slots, t->slots, t->inputs, t->targets, t->mask, t->task_of);
    if (rc) return rc;
    size_t n = (size_t)t->slots * t->T;
    double count = 0;
    for (size_t i = 0; i < n; i++) count += t->mask[i];
    MPI_Allreduce(MPI_IN_PLACE, &count, 1, MPI_DOUBLE, MPI_SUM, t->comm);
    double inv = count > 0 ? 1.0 / count : 0.0;
    for (int s = 0; s < t->slots; s++) {
        float lw = (float)(c->tasks[t->task_of[s]].loss_weight * inv);
        for (int j = 0; j < t->T; j++) t->weight[(size_t)s * t->T + j] = t->mask[(size_t)s * t->T + j] * lw;
    }
    return 0;
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

static int train_step(trainer *t, int64_t step, step_result *r) {
    st_model *m = &t->model;
    double t0 = st_now();
    memset(t->task_sums, 0, (3 * (size_t)t->n_tasks + 2) * sizeof(double));
    set_phase(t, ST_PHASE_DATA);
    int rc = load_step_data(t);
    if (rc) return rc;
    st_model_zero_grad(m);
    double loss = 0;
    for (int a = 0; a < t->accum; a++) {
        size_t off = (size_t)a * t->micro * t->T;
        set_phase(t, ST_PHASE_FORWARD);
        loss += st_model_forward(m, t->inputs + off, t->targets + off, t->weight + off, 1);
        account_tasks(t, a * t->micro);
        set_phase(t, ST_PHASE_BACKWARD);
        if (a == t->accum - 1) st_comm_overlap_begin(&t->dp, m); /* reduce while backward runs */
        st_model_backward(m);
    }
    set_phase(t, ST_PHASE_COMM);
    float *g = NULL;
    rc = st_comm_reduce_grads(&t->dp, m, &g);
    if (rc) return rc;
    double norm = sqrt(st_comm_grad_sumsq(&t->dp, m, g));
    r->lr = st_lr_at(&t->optim.cfg, (int)step);
    set_phase(t, ST_PHASE_OPTIMIZER);
    st_optim_update(&t->optim, m, g, r->lr, st_clip_scale(norm, (float)t->cfg->train.grad_clip));
    set_phase(t, ST_PHASE_COMM);
    rc = st_comm_gather_params(&t->dp, m);
    if (rc) return rc;
    t->task_sums[3 * t->n_tasks] = loss;
    MPI_Allreduce(MPI_IN_PLACE, t->task_sums, 3 * t->n_tasks + 1, MPI_DOUBLE, MPI_SUM, t->comm);
    set_phase(t, ST_PHASE_IDLE);
    r->loss = t->task_sums[3 * t->n_tasks];
    r->grad_norm = norm;
    r->comm_seconds = t->dp.comm_seconds;
    r->seconds = st_now() - t0;
    return 0;
}

/* ---------------- eval on each task's val split ---------------- */

/* Mean val loss per target token of task k over at most eval.batches micro-batches, split over ranks. */
static double eval_task(trainer *t, int k, double *targets_out) {
    st_loader_eval it;
    double sums[2] = {0, 0};
    if (st_loader_eval_begin(&t->loader, k, ST_SPLIT_VAL, &it) == 0) {
        int T = t->T, B = t->micro;
        for (int b = 0; b < t->cfg->eval.batches; b++) {
            int rows = 0;
            for (; rows < B; rows++) {
                size_t o = (size_t)rows * T;
                if (!st_loader_eval_next(&it, t->inputs + o, t->targets + o, t->mask + o)) break;
            }
            if (rows == 0) break;
            if (b % t->world != t->rank) continue;
            for (int i = rows * T; i < B * T; i++) { t->inputs[i] = 0; t->targets[i] = 0; t->mask[i] = 0; }
            st_model_forward(&t->model, t->inputs, t->targets, t->mask, 0);
            for (int i = 0; i < B * T; i++) {
                sums[0] += (double)t->mask[i] * t->model.loss_per_pos[i];
                sums[1] += t->mask[i];
            }
        }
    }
    MPI_Allreduce(MPI_IN_PLACE, sums, 2, MPI_DOUBLE, MPI_SUM, t->comm);
    *targets_out = sums[1];
    return sums[1] > 0 ? sums[0] / sums[1] : NAN;
}

/* ---------------- reporting (rank 0) ---------------- */

static void json_task_map(st_strbuf *b, const trainer *t, const char *key, int which) {
    st_strbuf_printf(b, ",\"%s\":{", key);
    for (int k = 0; k < t->n_tasks; k++) {
        double cnt = t->task_sums[3 * k + 1];
        st_strbuf_json_string(b, t->cfg->tasks[k].name);
        if (which == 0) {
            if (cnt > 0) st_strbuf_printf(b, ":%.9g%s", t->task_sums[3 * k] / cnt, k + 1 < t->n_tasks ? "," : "");
            else st_strbuf_printf(b, ":null%s", k + 1 < t->n_tasks ? "," : "");
        } else {
            st_strbuf_printf(b, ":%.0f%s", t->task_sums[3 * k + 2], k + 1 < t->n_tasks ? "," : "");
        }
    }
    st_strbuf_append(b, "}", 1);
}

static void report_step(trainer *t, int64_t step, const step_result *r, const double *val, const double *val_n) {
    const st_config *c = t->cfg;
    uint64_t step_tokens = (uint64_t)t->world * t->slots * t->T;
    double tps = step_tokens / r->seconds;
    if (t->tel) {
        st_step_report rep;
        memset(&rep, 0, sizeof rep);
        rep.step = step + 1;
        rep.loss = r->loss;
        rep.step_seconds = r->seconds;
        rep.comm_seconds = r->comm_seconds;
        rep.tokens = (uint64_t)t->slots * t->T;
        rep.ntasks = t->n_tasks < ST_TELEMETRY_MAX_TASKS ? t->n_tasks : ST_TELEMETRY_MAX_TASKS;
        for (int k = 0; k < rep.ntasks; k++) {
            snprintf(rep.task_name[k], sizeof rep.task_name[k], "%s", c->tasks[k].name);
            double cnt = t->task_sums[3 * k + 1];
            rep.task_loss[k] = cnt > 0 ? t->task_sums[3 * k] / cnt : 0;
            rep.task_tokens[k] = (uint64_t)t->task_sums[3 * k + 2];
        }
        rep.grad_norm = r->grad_norm;
        rep.lr = r->lr;
        rep.stage = t->stage;
        st_telemetry_report(t->tel, &rep);
    }
    if (t->rank != 0) return;
    st_strbuf b = {0};
    st_strbuf_printf(&b, "{\"step\":%lld,\"loss\":%.9g,\"lr\":%.9g,\"grad_norm\":%.9g,\"tokens\":%llu,"
                         "\"tokens_per_s\":%.1f,\"step_ms\":%.3f,\"comm_ms\":%.3f,\"stage\":%d",
                     (long long)step + 1, r->loss, (double)r->lr, r->grad_norm, (unsigned long long)t->tokens_seen,
                     tps, r->seconds * 1e3, r->comm_seconds * 1e3, t->stage);
    json_task_map(&b, t, "task_loss", 0);
    json_task_map(&b, t, "task_tokens", 1);
    if (val) {
        st_strbuf_append(&b, ",\"val_loss\":{", 13);
        for (int k = 0; k < t->n_tasks; k++) {
            st_strbuf_json_string(&b, c->tasks[k].name);
            if (isnan(val[k])) st_strbuf_printf(&b, ":null");
            else st_strbuf_printf(&b, ":%.9g", val[k]);
            if (k + 1 < t->n_tasks) st_strbuf_append(&b, ",", 1);
        }
        st_strbuf_append(&b, "}", 1);
        (void)val_n;
    }
    st_strbuf_append(&b, "}\n", 2);
    if (b.data) {
        fputs(b.data, t->metrics);
        fflush(t->metrics);
    }
    st_strbuf_free(&b);
    if (c->train.log_every > 0 && ((step + 1) % c->train.log_every == 0 || step + 1 == c->train.steps)) {
        printf("step %5lld/%lld | loss %.4f | lr %.2e | gnorm %.3f | %.0f tok/s | %.0f ms", (long long)step + 1,
               (long long)c->train.steps, r->loss, (double)r->lr, r->grad_norm, tps, r->seconds * 1e3);
        if (t->n_stages > 1) printf(" | stage %d", t->stage);
        if (val)
            for (int k = 0; k < t->n_tasks; k++) printf(" | val[%s] %.4f", c->tasks[k].name, val[k]);
        printf("\n");
        fflush(stdout);
    }
}

/* ---------------- final weights ---------------- */

static int save_final(trainer *t) {
    if (t->rank != 0) return 0;
    char dir[ST_CFG_PATH_MAX + 16], tmp[ST_CFG_PATH_MAX + 32], old[ST_CFG_PATH_MAX + 32];
    snprintf(dir, sizeof dir, "%s/final", t->cfg->run_dir);
    snprintf(tmp, sizeof tmp, "%s/final.partial", t->cfg->run_dir);
    snprintf(old, sizeof old, "%s/final.old", t->cfg->run_dir);
    int rc = st_model_save_dir(&t->model, tmp, 0);
    if (rc) return st_fail_context(rc, "writing final weights");
    /* swap in atomically-enough: the previous final/ survives until the new one is complete */
    if (access(dir, F_OK) == 0 && rename(dir, old) != 0)
        return st_fail(ST_EIO, "cannot replace %s: %s", dir, strerror(errno));
    if (rename(tmp, dir) != 0) return st_fail(ST_EIO, "cannot rename %s to %s: %s", tmp, dir, strerror(errno));
    char cmd[ST_CFG_PATH_MAX + 64];
    if (access(old, F_OK) == 0) {
        snprintf(cmd, sizeof cmd, "%s/model.safetensors", old);
        unlink(cmd);
        snprintf(cmd, sizeof cmd, "%s/config.json", old);
        unlink(cmd);
        rmdir(old);
    }
    return 0;
}

/* ---------------- checkpoints ---------------- */

/* Collective. Saves the state after `completed` updates. On failure rank 0 prints one line and the
 * previous checkpoints stay as they were; the training state is never touched by a save. */
static int save_checkpoint(trainer *t, int64_t completed, const char *why) {
    const st_config *c = t->cfg;
    set_phase(t, ST_PHASE_CHECKPOINT);
    size_t words = st_loader_state_words(&t->loader);
    uint64_t *loader_state = malloc(words * sizeof *loader_state);
    const char *names[ST_CFG_MAX_TASKS];
    uint64_t sums[ST_CFG_MAX_TASKS];
    for (int k = 0; k < t->n_tasks; k++) {
        names[k] = c->tasks[k].name;
        sums[k] = t->datasets[k].checksum;
    }
    int rc = agree(t, loader_state ? 0 : st_fail(ST_ENOMEM, "out of memory"));
    char name[ST_CKPT_NAME_MAX] = "";
    double secs = 0;
    if (!rc) {
        st_loader_state_save(&t->loader, loader_state);
        st_ckpt_meta meta = {0};
        meta.step = completed;
        meta.tokens_seen = t->tokens_seen;
        meta.stage = t->stage;
        meta.last_loss = t->last_loss;
        meta.job_spec = t->job_json;
        meta.model_config = t->model_config_text;
        meta.loader_state = loader_state;
        meta.loader_words = words;
        meta.n_tasks = t->n_tasks;
        meta.task_names = names;
        meta.task_checksums = sums;
        rc = st_ckpt_save(t->comm, c->checkpoint.dir, &t->model, &t->optim, &meta, c->checkpoint.keep_last, name, &secs);
    }
    free(loader_state);
    set_phase(t, ST_PHASE_IDLE);
    if (rc == 0) {
        t->last_saved = completed;
        if (t->rank == 0) {
            printf("checkpoint: %s/%s (%s, %.2f s)\n", c->checkpoint.dir, name, why, secs);
            fflush(stdout);
        }
        if (t->mon) st_monitor_event(t->mon, "checkpoint_saved", completed, "%s/%s (%s, %.2f s)", c->checkpoint.dir, name, why, secs);
        return 0;
    }
    if (t->rank == 0) {
        fprintf(stderr, "shardtune train: warning: checkpoint at step %lld failed (%s): %s\n", (long long)completed, why,
                st_error());
        fflush(stderr);
    }
    if (t->mon) st_monitor_event(t->mon, "checkpoint_failed", completed, "%s", st_error());
    return rc;
}

enum { CTL_SIGNAL = 1u << 8 }; /* a rank got SIGTERM / checkpoint.signal */

/* The control word every rank agrees on at a step boundary: any rank's signal flag OR'ed with the
 * control requests rank 0's monitor accepted since the last boundary. */
static unsigned boundary_control(trainer *t) {
    unsigned bits = st_stop_requested ? CTL_SIGNAL : 0;
    if (t->rank == 0 && t->mon) bits |= st_monitor_take_control(t->mon);
    MPI_Allreduce(MPI_IN_PLACE, &bits, 1, MPI_UNSIGNED, MPI_BOR, t->comm);
    return bits;
}

/* One checkpoint file: header, datasets, weights, optimizer range, loader. The trainer's state
 * changes only once everything has been read and verified. */
static int try_resume(trainer *t, const char *path) {
    const st_config *c = t->cfg;
    st_ckpt_info info;
    int rc = agree(t, st_ckpt_read_info(path, &info));
    if (rc) return rc;
    for (int k = 0; !rc && k < t->n_tasks; k++) {
        int found = -1;
        for (int j = 0; j < info.n_tasks; j++)
            if (strcmp(info.task_names[j], c->tasks[k].name) == 0) found = j;
        if (found < 0)
            rc = st_fail(ST_ECONFIG, "task '%s' is not in checkpoint %s (the task list changed; use resume: none to start over)",
                         c->tasks[k].name, path);
        else if (info.task_checksums[found] != t->datasets[k].checksum)
            rc = st_fail(ST_ECONFIG, "task '%s': dataset %s changed since checkpoint %s was saved (checksum differs)",
                         c->tasks[k].name, c->tasks[k].path, path);
    }
    if (!rc && info.step > c->train.steps)
        rc = st_fail(ST_ECONFIG, "checkpoint %s is at step %lld, beyond train.steps %lld", path, (long long)info.step,
                     (long long)c->train.steps);
    rc = agree(t, rc);
    float *w = rc ? NULL : malloc(t->model.n_weights * sizeof(float));
    if (!rc) rc = agree(t, w ? st_ckpt_load_model(path, &t->model, w) : st_fail(ST_ENOMEM, "out of memory"));
    int s = stage_at(t, info.step);
    if (!rc && s != t->stage) rc = agree(t, enter_stage(t, s));
    size_t n = t->optim.hi - t->optim.lo;
    float *mh = NULL, *vh = NULL;
    int *steps = NULL;
    if (!rc) {
        mh = malloc((n ? n : 1) * sizeof(float));
        vh = malloc((n ? n : 1) * sizeof(float));
        steps = calloc((size_t)t->model.n_params, sizeof(int));
        rc = agree(t, mh && vh && steps ? 0 : st_fail(ST_ENOMEM, "out of memory"));
    }
    if (!rc) {
        rc = st_ckpt_load_optim(t->comm, path, &t->model, t->optim.lo, t->optim.hi, mh, vh, steps);
        if (rc) t->print_error = t->rank == 0; /* every rank holds the same message */
    }
    if (!rc) rc = agree(t, st_loader_state_restore(&t->loader, info.loader_state, info.loader_words));
    if (!rc) {
        const st_backend *be = t->be;
        be->copy_to_device(t->model.weights, w, t->model.n_weights * sizeof(float));
        if (n && t->optim.m) {
            be->copy_to_device(t->optim.m, mh, n * sizeof(float));
            be->copy_to_device(t->optim.v, vh, n * sizeof(float));
        }
        for (int i = 0; i < t->model.n_params; i++)
            t->optim.param_step[i] = t->model.params[i].grad_offset >= 0 ? steps[i] : 0;
        t->start_step = info.step;
        t->last_saved = info.step;
        t->tokens_seen = info.tokens_seen;
        t->last_loss = t->resumed_loss = info.last_loss;
        if (t->rank == 0) {
            const char *base = strrchr(path, '/');
            printf("resumed from %s at step %lld (saved by %d rank%s); loss at save %.6f\n", base ? base + 1 : path,
                   (long long)info.step, info.world_size, info.world_size == 1 ? "" : "s", info.last_loss);
            fflush(stdout);
        }
    }
    free(w);
    free(mh);
    free(vh);
    free(steps);
    st_ckpt_info_free(&info);
    return rc;
}

/* A damaged file (unreadable, truncated, failing a checksum) makes auto-resume fall back to the
 * previous checkpoint; a mismatch with the job (shapes, datasets, tasks) is the user's to fix. */
static int is_damage(int rc) { return rc == ST_ECORRUPT || rc == ST_EFORMAT || rc == ST_EIO; }

static int resume(trainer *t) {
    const st_config *c = t->cfg;
    t->resumed_loss = NAN;
    if (c->resume == ST_RESUME_NONE) {
        if (t->rank == 0) printf("resume: none -> starting from step 0\n");
        return 0;
    }
    if (c->resume == ST_RESUME_PATH) {
        char path[ST_CFG_PATH_MAX + ST_CKPT_NAME_MAX + 2];
        int rc = agree(t, st_ckpt_resolve(c->resume_path, path, sizeof path));
        if (rc) return rc;
        return try_resume(t, path);
    }
    /* auto: rank 0 lists the directory, everyone tries the candidates in the same order */
    char (*names)[ST_CKPT_NAME_MAX] = NULL;
    int n = 0;
    int rc = t->rank == 0 ? st_ckpt_candidates(c->checkpoint.dir, &names, &n) : 0;
    if ((rc = agree(t, rc))) return rc;
    MPI_Bcast(&n, 1, MPI_INT, 0, t->comm);
    if (t->rank != 0 && n > 0 && !(names = calloc((size_t)n, ST_CKPT_NAME_MAX))) n = -1;
    if ((rc = agree(t, n < 0 ? st_fail(ST_ENOMEM, "out of memory") : 0))) return rc;
    if (n > 0) MPI_Bcast(names, n * ST_CKPT_NAME_MAX, MPI_CHAR, 0, t->comm);
    for (int i = 0; i < n; i++) {
        char path[ST_CFG_PATH_MAX + ST_CKPT_NAME_MAX + 2];
        snprintf(path, sizeof path, "%s/%s", c->checkpoint.dir, names[i]);
        rc = try_resume(t, path);
        if (rc == 0 || !is_damage(rc)) break;
        if (t->rank == 0) {
            fprintf(stderr, "shardtune train: warning: checkpoint %s is unusable (%s); falling back to %s\n", path,
                    st_error(), i + 1 < n ? names[i + 1] : "a fresh start");
            fflush(stderr);
        }
        rc = 0;
        t->print_error = 1;
    }
    if (rc == 0 && t->start_step == 0 && t->rank == 0)
        printf("resume: auto -> no %scheckpoint in %s, starting from step 0\n", n > 0 ? "usable " : "", c->checkpoint.dir);
    free(names);
    return rc;
}

/* ---------------- the loop ---------------- */

static void print_banner(const trainer *t) {
    if (t->rank != 0) return;
    const st_config *c = t->cfg;
    const st_model_config *mc = &t->model.cfg;
    printf("shardtune: %s %d layers, dim %d, heads %d/%d, vocab %d | %.2fM params, %.2fM trainable | "
           "%d rank(s) x %d thread(s), backend %s | global batch %d x %d tokens | %d task(s)\n",
           mc->model_type, mc->n_layer, mc->d_model, mc->n_head, mc->n_kv_head, mc->vocab,
           t->model.n_weights / 1e6, t->model.n_grads / 1e6, t->world,
           c->threads > 0 ? c->threads : st_num_threads(), t->be->name, t->world * t->slots, t->T, t->n_tasks);
    fflush(stdout);
}

/* Waits at a step boundary until `ctl resume` or a stop; a checkpoint request is served meanwhile.
 * Returns the bits that ended the pause. */
static unsigned pause_here(trainer *t, int64_t completed) {
    if (t->rank == 0) { printf("paused at step %lld (ctl resume to continue)\n", (long long)completed); fflush(stdout); }
    if (t->mon) st_monitor_event(t->mon, "pause", completed, "paused");
    for (;;) {
        usleep(200 * 1000);
        unsigned bits = boundary_control(t);
        if (bits & (ST_CTL_STOP | CTL_SIGNAL)) return bits;
        if ((bits & ST_CTL_CHECKPOINT) && t->last_saved != completed) save_checkpoint(t, completed, "requested");
        if (bits & ST_CTL_RESUME) {
            if (t->rank == 0) { printf("resumed at step %lld\n", (long long)completed); fflush(stdout); }
            if (t->mon) st_monitor_event(t->mon, "resume", completed, "resumed");
            return bits;
        }
    }
}

/* Everything that happens between steps after `completed` updates. Returns 0 to go on, 1 when the run
 * stopped after a checkpoint, or a negative code when it must end with an error. */
static int step_boundary(trainer *t, int64_t completed) {
    const st_config *c = t->cfg;
    unsigned bits = boundary_control(t);
    if ((bits & ST_CTL_PAUSE) && !(bits & (ST_CTL_STOP | CTL_SIGNAL))) bits |= pause_here(t, completed);
    int last = completed == c->train.steps;
    if ((bits & (ST_CTL_STOP | CTL_SIGNAL)) && !last) {
        const char *why = bits & CTL_SIGNAL ? "signal" : "ctl stop";
        int rc = t->last_saved == completed ? 0 : save_checkpoint(t, completed, why);
        if (rc) {
            if (t->rank == 0) fprintf(stderr, "shardtune train: error: stop requested (%s) but the checkpoint failed; "
                                              "the previous checkpoint in %s is intact\n", why, c->checkpoint.dir);
            t->print_error = 0;
            return rc;
        }
        if (t->mon) st_monitor_event(t->mon, "stop", completed, "stopped after a checkpoint (%s)", why);
        if (t->rank == 0) { printf("stopped at step %lld (%s): checkpointed, exit %d to requeue\n", (long long)completed, why, 85); fflush(stdout); }
        return 1;
    }
    int periodic = c->checkpoint.every_steps > 0 && completed % c->checkpoint.every_steps == 0;
    if ((periodic || last || (bits & ST_CTL_CHECKPOINT)) && t->last_saved != completed)
        save_checkpoint(t, completed, bits & ST_CTL_CHECKPOINT ? "requested" : last ? "end" : "periodic");
    return 0; /* a failed save does not stop training: the warning was printed, the old checkpoint stands */
}

st_run_result st_train_run(const st_config *cfg, MPI_Comm comm, int *print_error) {
    trainer t;
    memset(&t, 0, sizeof t);
    t.cfg = cfg;
    t.comm = comm;
    MPI_Comm_rank(comm, &t.rank);
    MPI_Comm_size(comm, &t.world);
    t.print_error = 1;
    t.last_saved = -1;
    t.last_loss = NAN;
    st_run_result result = ST_RUN_FINISHED;
    int rc = setup(&t);
    if (!rc) rc = resume(&t);
    if (rc) { result = ST_RUN_FAILED; goto done; }
    print_banner(&t);
    if (t.mon) {
        if (t.start_step > 0) st_monitor_event(t.mon, "resume", t.start_step, "resumed at step %lld on %d rank(s)", (long long)t.start_step, t.world);
        st_monitor_event(t.mon, "start", t.start_step, "training %lld steps on %d rank(s)", (long long)cfg->train.steps, t.world);
    }
    double *val = calloc((size_t)t.n_tasks, sizeof(double)), *val_n = calloc((size_t)t.n_tasks, sizeof(double));
    for (int64_t step = t.start_step; step < cfg->train.steps; step++) {
        int s = stage_at(&t, step);
        if (s != t.stage) {
            rc = agree(&t, enter_stage(&t, s));
            if (rc) { result = ST_RUN_FAILED; break; }
            if (t.mon) st_monitor_event(t.mon, "stage_change", step, "stage %d: %.2fM trainable", s, t.model.n_grads / 1e6);
        }
        if (t.probe) st_probe_set_step(t.probe, step + 1);
        step_result r = {0};
        rc = agree(&t, train_step(&t, step, &r));
        if (rc) { result = ST_RUN_FAILED; break; }
        t.tokens_seen += (uint64_t)t.world * t.slots * t.T;
        t.last_loss = r.loss;
        if (step == t.start_step && step > 0 && t.rank == 0) {
            printf("continuity: first loss after resume %.6f vs %.6f at save\n", r.loss, t.resumed_loss);
            fflush(stdout);
        }
        int do_eval = cfg->eval.every_steps > 0 && ((step + 1) % cfg->eval.every_steps == 0);
        if (do_eval) {
            set_phase(&t, ST_PHASE_EVAL);
            for (int k = 0; k < t.n_tasks; k++) val[k] = eval_task(&t, k, &val_n[k]);
            set_phase(&t, ST_PHASE_IDLE);
        }
        report_step(&t, step, &r, do_eval ? val : NULL, val_n);
        int b = step_boundary(&t, step + 1);
        if (b < 0) { result = ST_RUN_FAILED; break; }
        if (b > 0) { result = ST_RUN_CHECKPOINTED; break; }
    }
    free(val);
    free(val_n);
    if (result == ST_RUN_FINISHED) {
        rc = agree(&t, save_final(&t));
        if (rc) result = ST_RUN_FAILED;
        else if (t.rank == 0) printf("final weights: %s/final\n", cfg->run_dir);
        if (t.mon) st_monitor_event(t.mon, "end", cfg->train.steps, "finished");
    }
done:
    *print_error = t.print_error;
    teardown(&t);
    return result;
}
