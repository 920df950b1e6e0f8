/* train.c — the run loop (see train.h): set-up, stage changes, teardown, step boundaries.
 *
 * One step: data → forward/backward per micro-batch → gradient reduction (worker/comm) → clip →
 * AdamW on this rank's range → parameter all-gather → metrics. Setup failures are agreed on by all
 * ranks (agree()), so a bad file on one rank ends every rank with one message from the lowest one. */
#include "coordinator/trainer/train.h"
#include "coordinator/trainer/train_internal.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "common/error.h"
#include "common/json.h"
#include "common/util.h"
#include "checkpoints/ckpt.h"
#include "checkpoints/model_io.h"
#include "worker/comm_zero3_dev.h"
#include "worker/lora.h"
#include "worker/prompt.h"
#include "worker/qlora.h"
#include "kernels/cuda/launch_host.h" /* st_cuda_shared_device: plain C, in every build */
#include "coordinator/monitor/control_token.h"
#include "coordinator/trainer/data_plan.h"

/* ---------------- signals: only set a flag ---------------- */

volatile sig_atomic_t st_stop_requested;

static void on_signal(int sig) {
    st_stop_requested = sig > 0 ? sig : 1; /* which one: the stop line explains mpirun's view of SIGTERM */
}

void st_train_install_signals(const st_config *cfg) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sa.sa_flags = SA_RESTART; /* a signal must not fail a read or write in flight */
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    /* before the config is known the default checkpoint signal is caught too, so an early USR1 from
     * Slurm is remembered instead of killing the process */
    sigaction(cfg && cfg->checkpoint.signal > 0 ? cfg->checkpoint.signal : SIGUSR1, &sa, NULL);
}

/* ---------------- setup ---------------- */

static int setup_backend(trainer *t) {
    const st_config *c = t->cfg;
    int threads = c->threads > 0 ? c->threads : st_num_threads();
    if ((t->be = st_backend_override())) return 0; /* a test's backend (kernels.h) */
    if (c->backend == ST_BACKEND_CUDA || c->backend == ST_BACKEND_AUTO) {
        /* the node-local rank from MPI itself: launcher variables disagree under mpirun inside srun */
        int local = 0, local_size = 1;
        int rc = st_comm_node_rank(t->comm, &local, &local_size);
        if (rc) return rc;
        t->be = st_backend_cuda_for_rank(local, local_size);
        if (t->be) return 0;
        if (c->backend == ST_BACKEND_CUDA) return st_fail(ST_EDEVICE, "backend: cuda requested but %s", st_error());
        if (t->rank == 0) printf("backend: auto -> cpu (%s)\n", st_error());
    }
    t->be = st_backend_cpu(threads);
    return 0;
}

/* Every rank must run the same backend (comm picks NCCL or MPI by it), and no two ranks of a node may
 * share a GPU (NCCL refuses): both are one clear line instead of a hang or an NCCL error later. */
static int check_backends(trainer *t) {
    int cuda = !t->be->host_memory, lo = cuda, hi = cuda;
    MPI_Allreduce(&cuda, &lo, 1, MPI_INT, MPI_MIN, t->comm);
    MPI_Allreduce(&cuda, &hi, 1, MPI_INT, MPI_MAX, t->comm);
    if (lo != hi)
        return st_fail(ST_EDEVICE, "backend: auto found a usable GPU on some ranks but not on others (rank %d: %s): "
                                   "set backend: cuda or backend: cpu", t->rank, t->be->name);
    if (cuda && t->world > 1) {
        unsigned char id[16], *all = NULL;
        int n = 0, a = 0, b = 0;
        if (t->be->device_id(id) != 0) { /* cannot tell: a unique id, so this rank is never "shared" */
            memset(id, 0xff, sizeof id);
            memcpy(id, &t->rank, sizeof t->rank);
        }
        int rc = st_comm_node_allgather(t->comm, id, 16, &all, &n);
        if (!rc && st_cuda_shared_device(all, n, &a, &b))
            rc = st_fail(ST_EDEVICE, "node-local ranks %d and %d are on the same GPU: give each rank its own "
                                     "(srun --gpus-per-task=1, or at most one rank per visible GPU)", a, b);
        free(all);
        return rc;
    }
    return 0;
}

static int load_data(trainer *t) {
    const st_config *c = t->cfg;
    t->n_tasks = c->n_tasks;
    t->datasets = calloc((size_t)c->n_tasks, sizeof *t->datasets);
    if (!t->datasets) return st_fail(ST_ENOMEM, "out of memory");
    int rc = st_data_plan_open(c, t->model.cfg.vocab, t->datasets, &t->loader);
    if (rc) return rc;
    t->loader_ready = 1;
    for (int k = 0; k < c->n_tasks && c->train.packing == ST_PACKING_DOCUMENTS && t->rank == 0; k++)
        printf("packing: task %s: %llu sequences per epoch, efficiency %.1f%% (tokens used / slots)\n", c->tasks[k].name,
               (unsigned long long)t->loader.tasks[k].n_windows, 100.0 * st_loader_packing_efficiency(&t->loader, k));
    if (c->train.epochs > 0) { /* train.epochs: the step count of this data, batch and packing */
        int64_t G = (int64_t)c->train.micro_batch * c->train.grad_accum * t->world, steps = 0;
        if ((rc = st_data_plan_epoch_steps(&t->loader, c->train.epochs, G, &steps))) return rc;
        t->own_cfg->train.steps = steps;
        if (t->rank == 0)
            printf("train.epochs %g -> %lld steps (%llu train sequences per epoch, global batch %lld = micro_batch %d "
                   "x grad_accum %d x %d rank(s))\n", c->train.epochs, (long long)steps,
                   (unsigned long long)st_data_plan_epoch_sequences(&t->loader), (long long)G, c->train.micro_batch,
                   c->train.grad_accum, t->world);
    }
    return 0;
}

/* The shortest prefix of `path` (cut at a '/') that does not exist, malloc'ed; NULL when path exists. */
static char *first_missing_dir(const char *path) {
    if (access(path, F_OK) == 0) return NULL;
    char *p = strdup(path);
    for (char *s = p ? p + 1 : NULL; s && *s; s++) {
        if (*s != '/') continue;
        *s = 0;
        if (access(p, F_OK) != 0) return p;
        *s = '/';
    }
    return p;
}

/* A run that fails before its first step (a bad resume path, a monitor address that cannot be bound...)
 * leaves no run directory behind when it created it: its files (empty metrics.jsonl, control token,
 * monitor.addr) and the directories it made up to the topmost one go. Anything else there is kept. */
static void remove_new_run_dir(const trainer *t) {
    if (t->rank != 0 || !t->run_dir_new || access(t->cfg->run_dir, F_OK) != 0) return;
    char why[1024]; /* the run's error stays the one reported */
    snprintf(why, sizeof why, "%s", st_error());
    int left = st_remove_dir_files(t->cfg->run_dir) != 0; /* a subdirectory: leave it all */
    st_fail(ST_EIO, "%s", why);
    if (left) return;
    char *p = strdup(t->cfg->run_dir);
    size_t top = strlen(t->run_dir_new), n = p ? strlen(p) : 0;
    while (n > 1 && p[n - 1] == '/') p[--n] = 0; /* "runs/j/": its parent is runs */
    for (char *s = p ? strrchr(p, '/') : NULL; s && (size_t)(s - p) >= top; s = strrchr(p, '/')) {
        *s = 0;
        if (s == p || rmdir(p) != 0) break;
    }
    free(p);
}

static int open_run_dir(trainer *t) {
    const st_config *c = t->cfg;
    if (t->rank != 0) return 0;
    t->run_dir_new = first_missing_dir(c->run_dir);
    int rc = st_mkdirs(c->run_dir);
    if (rc) return st_fail(rc, "run_dir %s: %s", c->run_dir, st_error());
    char path[ST_CFG_PATH_MAX + 32];
    snprintf(path, sizeof path, "%s/metrics.jsonl", c->run_dir);
    t->metrics = fopen(path, "a");
    if (!t->metrics) return st_fail(ST_EIO, "run_dir %s is not writable: %s", c->run_dir, strerror(errno));
    return 0;
}

/* Rank 0: the addresses the sockets bound ("*" = a free port) go to RUN_DIR/monitor.addr for
 * `shardtune monitor/ctl --run-dir`, and to the console. */
static int announce_monitor(trainer *t) {
    char pub[256], ctl[256];
    st_monitor_bound(t->mon, pub, ctl, sizeof pub);
    int rc = st_monitor_addr_write(t->cfg->run_dir, pub, ctl);
    if (rc) return rc;
    printf("monitor: publish %s, control %s (in %s/monitor.addr: shardtune monitor --run-dir %s)\n", pub[0] ? pub : "off",
           ctl[0] ? ctl : "off", t->cfg->run_dir, t->cfg->run_dir);
    fflush(stdout);
    return 0;
}

static int start_monitoring(trainer *t) {
    const st_config *c = t->cfg;
    char pull[256] = "";
    int rc = 0;
    int enabled = c->monitor.publish[0] || c->monitor.control[0];
    if (!enabled) return 0;
    if (t->rank == 0) {
        char token[ST_TOKEN_BUF], curve_pub[ST_CURVE_KEY_BUF], curve_secret[ST_CURVE_KEY_BUF] = "";
        rc = st_token_create(c->run_dir, token);
        if (!rc) rc = c->monitor.curve ? st_curve_keys_create(c->run_dir, curve_pub, curve_secret)
                                       : st_curve_keys_remove(c->run_dir); /* no stale key misleads clients */
        st_monitor_opts mo = {0};
        mo.curve = c->monitor.curve;
        mo.curve_secret_z85 = curve_secret;
        mo.publish_addr = c->monitor.publish[0] ? c->monitor.publish : NULL;
        mo.control_addr = c->monitor.control[0] ? c->monitor.control : NULL;
        mo.token = token;
        mo.world_size = t->world;
        mo.stall_after_s = c->monitor.stall_after_s;
        if (!rc) rc = st_monitor_start(&mo, &t->mon);
        if (!rc) snprintf(pull, sizeof pull, "%s", st_monitor_pull_endpoint(t->mon));
        if (!rc) rc = announce_monitor(t);
    }
    if ((rc = st_trainer_agree(t, rc))) return rc;
    MPI_Bcast(pull, sizeof pull, MPI_CHAR, 0, t->comm);
    st_telemetry_opts to = {0};
    to.coordinator_addr = pull;
    to.rank = t->rank;
    to.heartbeat_ms = c->monitor.heartbeat_ms;
    to.job_id = getenv("SLURM_JOB_ID");
    rc = st_telemetry_start(&to, &t->tel);
    if (!rc) t->probe = st_telemetry_probe(t->tel);
    return st_trainer_agree(t, rc);
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
    if (c->train.packing == ST_PACKING_DOCUMENTS && !(t->doc_pos = malloc(n * sizeof(int32_t))))
        return st_fail(ST_ENOMEM, "out of memory for step buffers");
    t->task_sums = calloc(ST_TASK_SUMS(t->n_tasks), sizeof(double));
    t->task_counts = calloc((size_t)t->n_tasks + 1, sizeof(double));
    st_taskw_init(&t->taskw, t->n_tasks, c->loss_weighting == ST_LOSS_WEIGHTING_UNCERTAINTY, c->loss_weighting_lr);
    if (!t->inputs || !t->targets || !t->mask || !t->weight || !t->task_of || !t->task_sums || !t->task_counts)
        return st_fail(ST_ENOMEM, "out of memory for step buffers");
    return 0;
}

/* The texts every checkpoint carries: the canonical job JSON and the model's config.json. */
static int read_job_texts(trainer *t) {
    int rc = st_config_to_json(t->user_cfg, &t->job_json); /* as given: train.epochs, not the steps it resolved to */
    if (rc) return rc;
    char path[ST_CFG_PATH_MAX + 16];
    size_t len;
    snprintf(path, sizeof path, "%s/config.json", t->cfg->model.path);
    return st_read_file(path, &t->model_config_text, &len);
}

/* Rank 0 plans the schedule and broadcasts it as a shardtune.Plan; every rank trains exactly that. */
static int share_plan(trainer *t) {
    const st_config *c = t->cfg;
    uint8_t *buf = NULL;
    size_t len = 0;
    int rc = 0;
    if (t->rank == 0) {
        st_stage_list mine;
        rc = st_plan_stages(c, &t->model, &mine);
        if (!rc) {
            rc = st_plan_pack(&mine, t->model.cfg.n_layer, t->world, c->sharding.stage, &buf, &len);
            st_stage_list_free(&mine);
        }
    }
    rc = st_trainer_agree(t, rc);
    if (rc) return rc;
    unsigned long n = (unsigned long)len;
    MPI_Bcast(&n, 1, MPI_UNSIGNED_LONG, 0, t->comm);
    if (t->rank != 0) buf = malloc(n ? n : 1);
    rc = st_trainer_agree(t, buf ? 0 : st_fail(ST_ENOMEM, "out of memory"));
    if (!rc) {
        MPI_Bcast(buf, (int)n, MPI_BYTE, 0, t->comm);
        rc = st_trainer_agree(t, st_plan_unpack(buf, n, t->model.cfg.n_layer, &t->stages));
    }
    free(buf);
    return rc;
}

static void keep_teacher_part(void *ctx, const st_model *m, int i, size_t *a, size_t *b) {
    st_frozen_shard_keep(ctx, m, i, a, b);
}

/* sharding.stage 3: the teacher sharded like the student (worker/comm.h st_frozen_shard): each rank reads
 * only its 1/N of the weight space from the files (streaming load) and keeps it; the forward gathers a
 * layer at a time. */
static int load_teacher_sharded(trainer *t) {
    const char *dir = t->cfg->distill.teacher;
    int rc = st_model_open_dir(dir, t->be, &t->teacher);
    if (!rc) rc = st_frozen_shard_init(&t->teacher_shard, t->comm, &t->teacher);
    if (!rc) rc = st_model_load_weights_part(&t->teacher, dir, keep_teacher_part, &t->teacher_shard);
    if (!rc) rc = st_model_check_finite_part(&t->teacher, dir, keep_teacher_part, &t->teacher_shard);
    return rc;
}

/* sharding.stage 3 on a device backend (worker/comm_zero3_teacher_dev.h): bound without weights, this rank's
 * 1/N of the weight space streamed into its device shard; the forward gathers a group at a time into device
 * slots through the student communicator's NCCL (t->dp, built later: read at each gather). No whole-model
 * buffer is made. */
static int load_teacher_dev(trainer *t) {
    const st_config *c = t->cfg;
    const char *dir = c->distill.teacher;
    int rc = st_model_open_registry(dir, &t->teacher);
    t->teacher.buffers_external = 1; /* st_model_set_precision: no whole bf16 copy (the slots hold theirs) */
    if (!rc) rc = st_model_bind(&t->teacher, t->be, 0);
    const int bf16 = c->precision == ST_PRECISION_BF16 && c->distill.teacher_dtype != ST_TEACHER_INT8; /* int8: fp32 */
    if (!rc) rc = st_z3teach_init(&t->teacher_dev, &t->dp, t->comm, &t->teacher, bf16);
    if (!rc) rc = st_model_load_weights_part(&t->teacher, dir, st_z3teach_keep, t->teacher_dev);
    if (!rc) rc = st_model_check_finite_part(&t->teacher, dir, st_z3teach_keep, t->teacher_dev);
    return rc;
}

/* distill.teacher: loaded whole on every rank on the student's backend (sharded at sharding.stage 3), sized
 * for the student's micro-batches, computing in the job's precision (bf16: its own bf16 weight copy, packed
 * once: it is frozen; at stage 3 made per gathered layer), or with distill.teacher_dtype: int8 its linear
 * layers and head in int8 (quantized once here), the rest in fp32. */
static int load_teacher(trainer *t) {
    const st_config *c = t->cfg;
    const int i8 = c->distill.teacher_dtype == ST_TEACHER_INT8;
    if (i8 && !t->be->matmul_w8a8)
        return st_fail(ST_ECONFIG, "distill.teacher_dtype: int8 is not available on the %s backend (no int8 matmul "
                                   "kernel there): use distill.teacher_dtype: fp32 or backend: cpu", t->be->name);
    const int dev3 = c->sharding.stage == 3 && !t->be->host_memory;
    int rc = dev3 ? load_teacher_dev(t)
             : c->sharding.stage == 3 ? load_teacher_sharded(t)
                                      : st_model_load_dir(c->distill.teacher, t->be, &t->teacher);
    if (rc) return st_fail_context(rc, "distill.teacher");
    t->kd_on = 1;
    /* forward only: activation checkpointing keeps one layer's working set, not every layer's (same math) */
    if ((rc = st_model_set_activation_checkpointing(&t->teacher, 1))) return rc;
    if ((rc = st_model_alloc_activations(&t->teacher, c->train.micro_batch, c->train.seq_len))) return rc;
    /* int8: the teacher's matmuls in int8 (worker/model.h st_model_set_int8), the rest of it in fp32 whatever
     * the job's precision (it has no backward: precision only chose its matmul operands) */
    if ((rc = st_model_set_precision(&t->teacher, i8 ? ST_PRECISION_FP32 : c->precision)))
        return st_fail_context(rc, "distill.teacher");
    /* a device's stage 3 packs through the student communicator's NCCL: once it exists (setup) */
    if (i8 && !dev3 && (rc = st_model_set_int8(&t->teacher, NULL)))
        return st_fail_context(rc, "distill.teacher_dtype: int8");
    /* stage 3: packed group by group from the gathered fp32 weights, each rank keeping its share of the packs
     * (worker/comm.h st_frozen_shard) */
    if (i8 && t->be->host_memory) { /* the quantized weights' fp32 values are not read again: their pages go */
        int max = 4 * t->teacher.cfg.n_layer + 1;
        size_t *lo = malloc(2 * (size_t)max * sizeof(size_t));
        if (!lo) return st_fail(ST_ENOMEM, "out of memory");
        int n = st_model_int8_ranges(&t->teacher, lo, lo + max, max);
        for (int i = 0; i < n; i++) st_comm_discard(t->teacher.weights, sizeof(float), lo[i], lo[max + i]);
        free(lo);
    }
    return st_distill_init(&t->kd, &t->teacher, &t->model, (float)c->distill.temperature, (float)c->distill.alpha);
}


/* ZeRO-3 streaming load, once the communicator has decided what each rank keeps: every rank reads only
 * that from the safetensors files (ranged reads, converted per piece), checks those values are finite,
 * and the base model's checksum is summed from the ranks' parts (a parameter kept whole on every rank
 * counts on rank 0 only): the number a whole load gives, so resume checks are unchanged. */
static void keep_fp32(void *ctx, const st_model *m, int i, size_t *a, size_t *b) {
    st_comm_param_keep(ctx, m, i, a, b);
    if (st_z3dev_part_held(ctx, i)) *a = *b = 0; /* read straight into bf16 (st_trainer_z3_read_bf16) */
}

static int load_streamed(trainer *t) {
    const st_config *c = t->cfg;
    st_model *m = &t->model;
    int rc = st_trainer_agree(t, st_model_load_weights_part(m, c->model.path, keep_fp32, &t->dp));
    if (!rc) rc = st_trainer_agree(t, st_model_check_finite_part(m, c->model.path, keep_fp32, &t->dp));
    uint64_t sum = 0;
    if (!rc) rc = st_trainer_agree(t, st_trainer_z3_read_bf16(t, &sum)); /* device ZeRO-3: the parts held in bf16 */
    if (rc) return rc;
    int ok = 1;
    for (int i = 0; i < st_model_base_params(m); i++) {
        const st_param *p = &m->params[i];
        size_t a, b;
        keep_fp32(&t->dp, m, i, &a, &b);
        if (a < b && (st_comm_param_sharded(&t->dp, m, i) || t->rank == 0) &&
            st_trainer_range_checksum(t, p->offset + a, b - a, &sum))
            ok = 0;
    }
    MPI_Allreduce(MPI_IN_PLACE, &ok, 1, MPI_INT, MPI_MIN, t->comm);
    MPI_Allreduce(MPI_IN_PLACE, &sum, 1, MPI_UINT64_T, MPI_SUM, t->comm);
    t->base_checksum = !ok ? 0 : sum ? sum : 1; /* 0: not recorded, the check is skipped, never wrong */
    return 0;
}

/* ZeRO-3 streamed prompt tuning with a TEXT init: the prompt's rows are rows of the embeddings, of which
 * each rank holds its part. Every rank puts the elements of those rows it keeps into a V x C table (zeros
 * elsewhere); a bitwise-OR all-reduce assembles it (each element's bits from its owner, exactly; an
 * embedding kept whole gives the same bits from every rank), and each rank keeps its part of the prompt. */
static int prompt_text_rows(trainer *t) {
    st_model *m = &t->model;
    int32_t *ids = NULL;
    size_t n = 0, ea, eb, pa, pb;
    int rc = st_plan_prompt_text_ids(t->cfg, &ids, &n);
    int V = st_prompt_tokens(m), P = st_prompt_param(m);
    size_t C = (size_t)m->cfg.d_model, e0 = m->params[0].offset;
    uint32_t *rows = rc ? NULL : calloc((size_t)V * C + 1, sizeof *rows);
    if (!rc && !rows) rc = st_fail(ST_ENOMEM, "out of memory for the prompt's TEXT init");
    st_comm_param_keep(&t->dp, m, 0, &ea, &eb);
    for (int v = 0; !rc && v < V; v++) { /* the ids were checked against the vocabulary at attach */
        size_t s = (size_t)ids[v % n] * C, a = s > ea ? s : ea, b = s + C < eb ? s + C : eb;
        if (a < b && st_z3dev_part_held(&t->dp, 0)) /* a device ZeRO-3 part read in bf16 only: widened */
            st_z3dev_part_fp32(&t->dp, 0, a, b - a, (float *)(rows + (size_t)v * C + (a - s)), 1);
        else if (a < b) /* this rank's part of the row, wherever it keeps it (a device ZeRO-3 shard too) */
            m->be->copy_to_host(rows + (size_t)v * C + (a - s), st_model_weight_ptr(m, e0 + a), (b - a) * sizeof(float));
    }
    free(ids);
    int ok = !rc;
    MPI_Allreduce(MPI_IN_PLACE, &ok, 1, MPI_INT, MPI_MIN, t->comm);
    if (ok && MPI_Allreduce(MPI_IN_PLACE, rows, V * (int)C, MPI_UINT32_T, MPI_BOR, t->comm) != MPI_SUCCESS)
        rc = st_fail(ST_ECOMM, "rank %d: the prompt's TEXT init all-reduce failed", t->rank);
    if (ok && !rc) {
        st_comm_param_keep(&t->dp, m, P, &pa, &pb);
        if (pb > pa) m->be->copy_to_device(st_model_part(m, P) + pa, rows + pa, (pb - pa) * sizeof(float));
        st_model_weights_changed(m);
    }
    free(rows);
    return rc ? rc : ok ? 0 : st_fail(ST_ECOMM, "rank %d: another rank could not set up the prompt's TEXT init", t->rank);
}

/* ZeRO-3 streamed load, then what reads the base while setting up (stages 0-2 do it at attach, from the
 * whole base): DoRA's magnitudes (each base weight gathered whole in turn, st_model_acquire, the same norms
 * as at attach; each rank writes its part) and prompt tuning's TEXT init (its rows assembled above). */
static int init_from_base(trainer *t) {
    const st_config *c = t->cfg;
    if (c->finetune.mode == ST_FINETUNE_LORA && c->finetune.lora.dora)
        return st_trainer_agree(t, st_lora_init_magnitudes_kept(&t->model, st_trainer_keep_part, &t->dp));
    if (c->finetune.mode == ST_FINETUNE_PROMPT_TUNING && c->finetune.prompt.init_text[0]) return prompt_text_rows(t);
    return 0;
}

/* A parameter QLoRA keeps unquantized but cannot read in place: one held in bf16 only (worker/qlora.h), or
 * any kept one on a device backend: read, checked and summed a piece at a time (st_qlora_put_part rounds it
 * into the bf16 copy or copies it to the device); its own checksum (from element 0) kept for the
 * checkpoints' adapter_base_checksum (used for the bf16-only ones). */
static int load_pieces(st_model *m, st_safetensors *s, int i, const char *dir, size_t at, uint64_t *sum) {
    const size_t chunk = (size_t)1 << 20;
    const st_param *p = &m->params[i];
    float *buf = malloc((p->numel < chunk ? p->numel : chunk) * sizeof(float) + sizeof(float));
    int rc = buf ? 0 : st_fail(ST_ENOMEM, "out of memory loading %s", p->name);
    uint64_t own = 0;
    for (size_t a = 0; !rc && a < p->numel; a += chunk) {
        size_t n = p->numel - a < chunk ? p->numel - a : chunk;
        rc = st_model_read_param_range(s, m, i, a, n, buf);
        if (!rc) rc = st_check_finite_values(buf, n, a, dir, p->name);
        if (rc) break;
        *sum += st_ckpt_checksum(buf, at + a, n);
        own += st_ckpt_checksum(buf, a, n);
        rc = st_qlora_put_part(m, i, a, n, buf);
    }
    st_qlora_set_sum(m, i, own);
    free(buf);
    return rc;
}

/* QLoRA below stage 3: the base is read a tensor at a time and quantized as it comes (worker/qlora.h
 * st_qlora_begin / st_qlora_put): the load holds the compacted buffer (kept base, one matmul unit's scratch, the
 * adapters), the codes so far and one fp32 tensor, never the fp32 base. Each tensor is checked finite and
 * summed into the base checksum at its registry offset: the number a whole load gives. */
static int load_quantized(trainer *t) {
    const st_config *c = t->cfg;
    st_model *m = &t->model;
    int rc = st_model_open_registry(c->model.path, m);
    if (!rc) rc = st_plan_attach_adapters(c, m); /* the adapters' registry entries (no backend yet) */
    if (!rc) rc = st_model_bind(m, t->be, 0);
    if (rc) return rc;
    int nb = st_model_base_params(m);
    size_t *at = malloc((size_t)nb * sizeof *at + 1), most = 0;
    if (!at) return st_fail(ST_ENOMEM, "out of memory loading %s", c->model.path);
    for (int i = 0; i < nb; i++) at[i] = m->params[i].offset; /* the registry's, before the layout moves them */
    st_qlora_spec qs = st_trainer_qlora_spec(c, m);
    rc = st_qlora_begin(m, &qs);
    for (int i = 0; !rc && i < nb; i++)
        if (st_qlora_holds(m, i) && m->params[i].numel > most) most = m->params[i].numel;
    float *host = rc ? NULL : malloc(most * sizeof(float) + sizeof(float));
    if (!rc && !host) rc = st_fail(ST_ENOMEM, "out of memory loading %s", c->model.path);
    st_safetensors *s = NULL;
    if (!rc) rc = st_model_check_files(m, c->model.path, &s);
    uint64_t sum = 0;
    for (int i = 0; !rc && i < nb; i++) { /* kept ones read in place on a host-memory backend */
        const st_param *p = &m->params[i];
        if (st_qlora_bf16_only(m, i) || (!st_qlora_holds(m, i) && !m->be->host_memory)) {
            rc = load_pieces(m, s, i, c->model.path, at[i], &sum);
            continue;
        }
        float *dst = st_qlora_holds(m, i) ? host : m->weights + p->offset;
        rc = st_model_read_param(s, m, i, dst);
        if (!rc) rc = st_check_finite_values(dst, p->numel, 0, c->model.path, p->name);
        if (!rc) sum += st_ckpt_checksum(dst, at[i], p->numel);
        if (!rc && dst == host) rc = st_qlora_put(m, i, host);
    }
    if (s) st_safetensors_close(s);
    free(host);
    free(at);
    st_model_weights_changed(m);
    if (!rc) rc = st_lora_init_adapters(m);
    if (!rc && c->finetune.lora.dora) rc = st_lora_init_magnitudes(m);
    t->base_checksum = sum ? sum : 1;
    return rc;
}

/* Prompt tuning's TEXT init below stage 3 after load_late: the prompt attached over the unread base
 * (zero rows), so its rows are the embedding's rows now, widened from the bf16 copy where it is held there
 * (st_model_param_fp32: the values the attach would have copied). */
static int prompt_text_local(trainer *t) {
    st_model *m = &t->model;
    int32_t *ids = NULL;
    size_t n = 0;
    int rc = st_plan_prompt_text_ids(t->cfg, &ids, &n);
    size_t C = (size_t)m->cfg.d_model;
    float *dst = rc ? NULL : st_model_part(m, st_prompt_param(m));
    for (int v = 0; !rc && v < st_prompt_tokens(m); v++) /* the ids were checked against the vocabulary at attach */
        st_model_param_fp32(m, 0, (size_t)ids[(size_t)v % n] * C, C, dst + (size_t)v * C);
    free(ids);
    st_model_weights_changed(m);
    return rc;
}

/* Below stage 3 on a host backend (st_plan_loads_late; the model opened without weights, the adapters attached
 * over them, so the base was never copied, and the precision set): under bf16 every frozen tensor of the first
 * stage that st_model_drop_frozen_fp32 would hold in bf16 only and whose file tensor is BF16 (bf16 values by
 * construction) is read straight into the bf16 copy, a piece at a time (st_model_bf16_load_planned /
 * st_model_mark_bf16_only): its fp32 pages are never touched, so no rank ever holds the fp32 model. The others
 * are read as fp32 in place (an F32 / F16 tensor then gets today's exactness check at stage entry). Every
 * tensor is checked finite and summed into the base checksum at its registry offset (the number a whole load
 * gives); then what reads the base at attach: DoRA's magnitudes, a prompt TEXT init. */
static int load_late(trainer *t) {
    const st_config *c = t->cfg;
    st_model *m = &t->model;
    const size_t chunk = (size_t)1 << 20;
    st_stage_list sl;
    int rc = st_plan_stages(c, m, &sl);
    if (rc) return rc;
    long *goff = malloc((size_t)m->n_params * sizeof *goff + 1);
    float *buf = malloc(chunk * sizeof(float));
    if (!goff || !buf) rc = st_fail(ST_ENOMEM, "out of memory loading %s", c->model.path);
    else st_model_grad_offsets(m, sl.stages[0].layers, sl.stages[0].modules, goff); /* st_trainer_enter_stage(t, 0)'s */
    st_stage_list_free(&sl);
    st_safetensors *s = NULL;
    if (!rc) rc = st_model_check_files(m, c->model.path, &s);
    uint64_t sum = 0;
    for (int i = 0; !rc && i < st_model_base_params(m); i++) {
        const st_param *p = &m->params[i];
        if (st_model_param_dtype(s, m, i) != ST_DTYPE_BF16 || (p->ndim == 2 && p->transpose_io) ||
            !st_model_bf16_load_planned(m, i, goff)) {
            float *w = m->weights + p->offset;
            rc = st_model_read_param(s, m, i, w);
            if (!rc) rc = st_check_finite_values(w, p->numel, 0, c->model.path, p->name);
            if (!rc) sum += st_ckpt_checksum(w, p->offset, p->numel);
            continue;
        }
        for (size_t a = 0; !rc && a < p->numel; a += chunk) {
            size_t n = p->numel - a < chunk ? p->numel - a : chunk;
            uint16_t *w16 = m->weights_bf16 + p->offset + a;
            rc = st_model_read_param_bf16_range(s, m, i, a, n, w16);
            if (rc) break;
            m->be->from_bf16(buf, w16, n); /* the fp32 values it stands for, exactly: checked and summed */
            rc = st_check_finite_values(buf, n, a, c->model.path, p->name);
            if (!rc) sum += st_ckpt_checksum(buf, p->offset + a, n);
        }
        if (!rc) rc = st_model_mark_bf16_only(m, i);
    }
    if (s) st_safetensors_close(s);
    free(buf);
    free(goff);
    st_model_weights_changed(m); /* the fp32 ones' bf16 copy is made by the first forward */
    t->base_checksum = sum ? sum : 1;
    if (!rc && c->finetune.mode == ST_FINETUNE_LORA && c->finetune.lora.dora) rc = st_lora_init_magnitudes(m);
    if (!rc && c->finetune.mode == ST_FINETUNE_PROMPT_TUNING && c->finetune.prompt.init_text[0]) rc = prompt_text_local(t);
    return rc;
}

/* The resident set now (kB, from /proc/self/statm; -1 where it cannot be read): the tests' load report. */
static long resident_kb(void) {
    long pages = -1, rss = -1;
    FILE *f = fopen("/proc/self/statm", "r");
    if (f && fscanf(f, "%ld %ld", &pages, &rss) != 2) rss = -1;
    if (f) fclose(f);
    return rss < 0 ? -1 : rss * (sysconf(_SC_PAGESIZE) / 1024);
}

static int setup(trainer *t) {
    const st_config *c = t->cfg;
    int rc = st_trainer_agree(t, setup_backend(t));
    if (!rc) rc = st_trainer_agree(t, check_backends(t));
    /* ZeRO-3 streams the weights in once the communicator knows what this rank keeps (load_streamed) */
    int stream = st_plan_streams(c);
    const char *report = getenv("SHARDTUNE_REPORT_LOAD_RSS"); /* tests: the load phase's peak, measured */
    struct rusage ru;
    if (!rc && report && !strcmp(report, "1") && getrusage(RUSAGE_SELF, &ru) == 0)
        fprintf(stderr, "shardtune train: rank %d: peak RSS before loading the model: %ld kB, resident now %ld kB\n",
                t->rank, ru.ru_maxrss, resident_kb());
    int quant = !stream && c->finetune.mode == ST_FINETUNE_QLORA; /* quantized while read (load_quantized) */
    /* ZeRO-3 (a device and CPU ranks alike): laid out without reading the base, which each rank reads its parts
     * of once the communicator exists (train_qload.c) */
    int qshard = !rc && quant && st_plan_qload_sharded(c, !t->be->host_memory);
    /* below stage 3 on a host backend: read once the adapters and the precision are set, under bf16 the frozen
     * BF16 tensors straight into the bf16 copy (load_late) */
    int late = !rc && !stream && !quant && t->be->host_memory && st_plan_loads_late(c);
    /* ZeRO-3 on a device (worker/comm_zero3_dev.c): no whole-model buffer is ever made; the communicator
     * holds the shard the streamed load fills (a mode it cannot run is refused when it is built) */
    int dev3 = !rc && stream && !t->be->host_memory && st_plan_z3dev_mode(c);
    if (dev3) {
        rc = st_model_open_registry(c->model.path, &t->model);
        t->model.buffers_external = 1;
        if (!rc) rc = st_model_bind(&t->model, t->be, 0);
        rc = st_trainer_agree(t, rc);
    }
    /* a device rank under bf16: frozen weights of a bf16 source in its bf16 copy only (train_frozen16.c) */
    int w16 = 0;
    if (!rc && !dev3 && !stream && !quant && !late) rc = st_trainer_agree(t, st_trainer_load_frozen_bf16(t, &w16));
    if (!rc && !dev3 && !w16) rc = st_trainer_agree(t, stream || late ? st_model_open_dir(c->model.path, t->be, &t->model)
                                      : quant ? (qshard ? st_trainer_qload_layout(t) : load_quantized(t))
                                              : st_model_load_dir(c->model.path, t->be, &t->model));
    t->model.weights_unread = stream || late; /* the adapters attach over zeros: the base is read after */
    if (!rc && t->rank == 0 && st_model_load_warning())
        fprintf(stderr, "shardtune train: warning: %s\n", st_model_load_warning());
    int whole = !stream && !quant && !late && !w16; /* read whole, as fp32, before the adapters */
    if (!rc && whole) rc = st_trainer_agree(t, t->rank == 0 ? st_model_check_finite(&t->model, c->model.path) : 0);
    if (!rc && whole) t->base_checksum = st_trainer_weights_checksum(t); /* a resume refuses another base model */
    if (!rc && !quant) rc = st_trainer_agree(t, st_plan_attach_adapters(c, &t->model));
    t->model.weights_unread = 0;
    /* every step starts with st_model_zero_grad: the first weight-gradient matmuls overwrite (model.h) */
    t->model.grad_overwrite = 1;
    /* checkpointing first: the arena is then laid out once, at its checkpointed size */
    if (!rc) rc = st_trainer_agree(t, st_model_set_activation_checkpointing(&t->model, st_plan_act_ckpt(c)));
    if (!rc) rc = st_trainer_agree(t, st_model_alloc_activations(&t->model, c->train.micro_batch, c->train.seq_len));
    if (!rc) rc = st_trainer_agree(t, st_model_set_precision(&t->model, c->precision));
    if (!rc && late) rc = st_trainer_agree(t, load_late(t));
    if (!rc && c->distill.teacher[0]) rc = st_trainer_agree(t, load_teacher(t));
    const char *check = getenv("SHARDTUNE_CHECK_BF16_COPY");
    t->check_bf16_copy = check && !strcmp(check, "1");
    if (!rc) rc = st_trainer_agree(t, load_data(t));
    if (!rc) rc = share_plan(t);
    if (!rc) rc = st_trainer_agree(t, alloc_step_buffers(t));
    if (!rc) rc = st_trainer_agree(t, open_run_dir(t));
    if (!rc) rc = start_monitoring(t);
    t->weights_read = !stream && !qshard; /* ZeRO-3: streamed in below, once the communicator exists */
    /* device ZeRO-3: the frozen parts to read straight into bf16, chosen before the communicator allocates */
    if (!rc && dev3) rc = st_trainer_agree(t, st_trainer_z3_frozen_bf16(t, &t->z3_frozen16));
    if (!rc) rc = st_trainer_agree(t, st_trainer_enter_stage(t, 0));
    free(t->z3_frozen16);
    t->z3_frozen16 = NULL;
    if (!rc && t->teacher_dev && c->distill.teacher_dtype == ST_TEACHER_INT8) { /* packed group by group (collective) */
        rc = st_model_set_int8(&t->teacher, NULL);
        if (!rc) rc = st_z3teach_int8_compact(t->teacher_dev); /* the quantized weights' fp32 values go */
        rc = st_trainer_agree(t, rc ? st_fail_context(rc, "distill.teacher_dtype: int8") : 0);
    }
    if (!rc && stream) rc = load_streamed(t);
    if (!rc && stream) rc = init_from_base(t);
    if (!rc && qshard) rc = st_trainer_qload_read(t);
    t->weights_read = 1;
    if (!rc && stream) st_trainer_report_bf16(t, st_trainer_hold_bf16(t)); /* ZeRO-3: the parts just read */
    if (!rc && dev3) rc = st_trainer_agree(t, t->be->status()); /* a device fault while loading is the load's */
    if (!rc && stream && report && !strcmp(report, "1"))
        fprintf(stderr, "shardtune train: rank %d: resident after holding the frozen parts: %ld kB\n", t->rank, resident_kb());
    if (!rc && report && !strcmp(report, "1") && getrusage(RUSAGE_SELF, &ru) == 0)
        fprintf(stderr, "shardtune train: rank %d: peak RSS after loading the model: %ld kB\n", t->rank, ru.ru_maxrss);
    if (!rc) rc = st_trainer_agree(t, read_job_texts(t));
    return rc;
}

/* SHARDTUNE_ZERO3_PROFILE=1 (bench/zero3_step.sh): where stage 3 spent its communication time, per rank. */
static void report_zero3_profile(const trainer *t) {
    const char *on = getenv("SHARDTUNE_ZERO3_PROFILE");
    if (!on || strcmp(on, "1") || t->dp.stage != 3) return;
    double p[ST_Z3_PROF_N];
    st_comm_zero3_profile(&t->dp, p);
    fprintf(stderr, "shardtune train: rank %d: stage-3 comm ms: acquire embeddings %.1f, layers %.1f, head %.1f; "
                    "grad reduce-scatter %.1f, backward end %.1f\n",
            t->rank, 1e3 * p[ST_Z3_ACQ_EMBED], 1e3 * p[ST_Z3_ACQ_LAYER], 1e3 * p[ST_Z3_ACQ_HEAD], 1e3 * p[ST_Z3_GRAD],
            1e3 * p[ST_Z3_BWD_END]);
}

static void teardown(trainer *t) {
    st_trainer_samples_close(t);
    st_trainer_phase(t, ST_PHASE_IDLE);
    /* every rank's last reports reach the coordinator before it closes its sockets */
    if (t->tel) st_telemetry_stop(t->tel);
    if (t->mon || t->tel) MPI_Barrier(t->comm);
    st_watchdog_stop(t->wd); /* after the last collective; before the monitor it reads goes */
    t->wd = NULL;
    if (t->mon) st_monitor_stop(t->mon);
    st_ckpt_async_free(t->ckpt_bg); /* a failed run may leave one in flight: it ends first */
    t->ckpt_bg = NULL;
    st_trainer_metrics_flush(t);
    if (t->metrics) fclose(t->metrics);
    st_optim_free(&t->optim, t->be);
    free(t->optim.param_step);
    report_zero3_profile(t);
    st_comm_free(&t->dp);
    if (t->loader_ready) st_loader_free(&t->loader);
    for (int k = 0; t->datasets && k < t->n_tasks; k++) st_dataset_free(&t->datasets[k]);
    free(t->datasets);
    st_stage_list_free(&t->stages);
    free(t->inputs);
    free(t->targets);
    free(t->mask);
    free(t->doc_pos);
    free(t->weight);
    free(t->task_of);
    free(t->task_sums);
    free(t->task_counts);
    free(t->job_json);
    free(t->model_config_text);
    st_model_free(&t->model);
    st_z3teach_free(t->teacher_dev); /* also after a failed load: its device buffers */
    t->teacher_dev = NULL;
    if (t->kd_on) {
        st_distill_free(&t->kd, t->be);
        st_frozen_shard_free(&t->teacher_shard);
        st_model_free(&t->teacher);
    }
}

/* ---------------- the loop ---------------- */


/* Waits at a step boundary until `ctl resume` or a stop; a checkpoint request is served meanwhile.
 * Returns the bits that ended the pause. */
static unsigned pause_here(trainer *t, int64_t completed) {
    if (t->rank == 0) { printf("paused at step %lld (ctl resume to continue)\n", (long long)completed); fflush(stdout); }
    if (t->mon) st_monitor_event(t->mon, "pause", completed, "paused");
    st_watchdog_pause(t->wd, 1); /* the control word is agreed every 200 ms, but nothing moves for hours */
    for (;;) {
        usleep(200 * 1000);
        unsigned bits = st_trainer_control(t);
        if (bits & (ST_CTL_STOP | CTL_SIGNAL)) { st_watchdog_pause(t->wd, 0); return bits; }
        if ((bits & ST_CTL_CHECKPOINT) && t->last_saved != completed) st_trainer_save_checkpoint(t, completed, "requested");
        if (bits & ST_CTL_RESUME) {
            if (t->rank == 0) { printf("resumed at step %lld\n", (long long)completed); fflush(stdout); }
            if (t->mon) st_monitor_event(t->mon, "resume", completed, "resumed");
            st_watchdog_pause(t->wd, 0);
            return bits;
        }
    }
}

/* A failed save is a warning (the previous checkpoint stands) until checkpoint.max_failures in a row;
 * the one at the end always fails the job, after final/ is written. 1 when the job must stop. */
static int too_many_failures(trainer *t) {
    int max = t->cfg->checkpoint.max_failures;
    if (max <= 0 || t->save_failures < max) return 0;
    if (t->rank == 0)
        fprintf(stderr, "shardtune train: error: %d checkpoint saves in a row failed (checkpoint.max_failures %d); "
                        "stopping: the last good checkpoint in %s is intact\n", t->save_failures, max,
                t->cfg->checkpoint.dir);
    t->print_error = 0;
    return 1;
}

/* Everything that happens between steps after `completed` updates. Returns 0 to go on, 1 when the run
 * stopped after a checkpoint, or a negative code when it must end with an error. */
static int step_boundary(trainer *t, int64_t completed) {
    const st_config *c = t->cfg;
    unsigned bits = st_trainer_control(t);
    if ((bits & ST_CTL_PAUSE) && !(bits & (ST_CTL_STOP | CTL_SIGNAL))) bits |= pause_here(t, completed);
    int last = completed == c->train.steps;
    if ((bits & (ST_CTL_STOP | CTL_SIGNAL)) && !last) {
        const char *why = bits & CTL_SIGNAL ? "signal" : "ctl stop";
        /* exit 85 only once the checkpoint (a background write included) is committed */
        int rc = t->last_saved == completed ? st_trainer_ckpt_collect(t) : st_trainer_save_checkpoint(t, completed, why);
        if (rc) {
            if (t->rank == 0) fprintf(stderr, "shardtune train: error: stop requested (%s) but the checkpoint failed; "
                                              "the previous checkpoint in %s is intact\n", why, c->checkpoint.dir);
            t->print_error = 0;
            return rc;
        }
        if (t->mon) st_monitor_event(t->mon, "stop", completed, "stopped after a checkpoint (%s)", why);
        if (t->rank == 0) {
            printf("stopped at step %lld (%s): checkpointed, exit %d to requeue\n", (long long)completed, why, 85);
            /* Ctrl-C on mpirun reaches the ranks as SIGTERM; mpirun then exits 1 whatever the ranks return */
            if (st_stop_requested == SIGTERM && getenv("OMPI_COMM_WORLD_SIZE"))
                printf("note: under mpirun, Ctrl-C / SIGTERM makes mpirun itself exit 1 after this clean stop; the "
                       "checkpoint is committed (send SIGUSR1 to mpirun or use `shardtune ctl stop` for exit 85)\n");
            fflush(stdout);
        }
        return 1;
    }
    /* a background write that every rank has finished is collected here (its failure counts) */
    if (st_ckpt_async_pending(t->ckpt_bg) && !(bits & CTL_CKPT_BUSY) && st_trainer_ckpt_collect(t) &&
        too_many_failures(t))
        return ST_EIO;
    /* no periodic save while steps are being skipped: those weights are suspect until a good step */
    int periodic = c->checkpoint.every_steps > 0 && completed % c->checkpoint.every_steps == 0 && !t->skips_in_a_row;
    if ((periodic || last || (bits & ST_CTL_CHECKPOINT)) && t->last_saved != completed &&
        st_trainer_save_checkpoint(t, completed, bits & ST_CTL_CHECKPOINT ? "requested" : last ? "end" : "periodic") &&
        too_many_failures(t))
        return ST_EIO;
    return 0;
}

st_run_result st_train_run(const st_config *job, MPI_Comm comm, int *print_error) {
    trainer t;
    memset(&t, 0, sizeof t);
    t.user_cfg = job;
    if (!(t.own_cfg = malloc(sizeof *t.own_cfg))) { /* a copy whose train.steps train.epochs may resolve */
        st_fail(ST_ENOMEM, "out of memory");
        *print_error = 1;
        return ST_RUN_FAILED;
    }
    *t.own_cfg = *job;
    const st_config *cfg = t.cfg = t.own_cfg;
    t.comm = comm;
    MPI_Comm_rank(comm, &t.rank);
    MPI_Comm_size(comm, &t.world);
    t.print_error = 1;
    t.last_saved = -1;
    t.last_loss = NAN;
    t.ckpt_blocked_ms = -1;
    st_run_result result = ST_RUN_FINISHED;
    int rc = setup(&t);
    if (!rc && cfg->checkpoint.async) rc = st_trainer_agree(&t, st_ckpt_async_init(comm, &t.ckpt_bg));
    if (!rc) rc = st_trainer_resume(&t);
    if (!rc) rc = st_trainer_agree(&t, st_trainer_trim_metrics(&t, t.start_step));
    if (!rc) rc = st_trainer_agree(&t, st_watchdog_start(&t));
    if (!rc) rc = st_trainer_agree(&t, st_trainer_samples_open(&t));
    int early = rc != 0; /* failed before the first step: nothing of the run's own is in run_dir yet */
    if (rc) { result = ST_RUN_FAILED; goto done; }
    st_trainer_measure_peak(&t);
    st_trainer_banner(&t);
    if (t.mon) {
        if (t.start_step > 0) st_monitor_event(t.mon, "resume", t.start_step, "resumed at step %lld on %d rank(s)", (long long)t.start_step, t.world);
        st_monitor_event(t.mon, "start", t.start_step, "training %lld steps on %d rank(s)", (long long)cfg->train.steps, t.world);
    }
    double *val = calloc((size_t)t.n_tasks, sizeof(double)), *val_n = calloc((size_t)t.n_tasks, sizeof(double));
    for (int64_t step = t.start_step; step < cfg->train.steps; step++) {
        int s = st_stage_at(&t.stages, step);
        if (s != t.stage) {
            rc = st_trainer_agree(&t, st_trainer_enter_stage(&t, s));
            if (rc) { result = ST_RUN_FAILED; break; }
            if (t.mon) st_monitor_event(t.mon, "stage_change", step, "stage %d: %.2fM trainable", s, t.model.n_grads / 1e6);
        }
        if (t.probe) st_probe_set_step(t.probe, step + 1);
        t.wd_step = step + 1;
        st_step_result r = {0};
        rc = st_trainer_agree(&t, st_trainer_step(&t, step, &r));
        if (rc) { result = ST_RUN_FAILED; break; }
        t.tokens_seen += (uint64_t)t.world * t.slots * t.T;
        if (!r.bad) t.last_loss = r.loss;
        if (step == t.start_step && step > 0 && t.rank == 0) {
            printf("continuity: first loss after resume %.6f vs %.6f at save\n", r.loss, t.resumed_loss);
            fflush(stdout);
        }
        int do_eval = cfg->eval.every_steps > 0 && ((step + 1) % cfg->eval.every_steps == 0);
        if (do_eval) {
            st_trainer_phase(&t, ST_PHASE_EVAL);
            for (int k = 0; k < t.n_tasks; k++) val[k] = st_trainer_eval_task(&t, k, &val_n[k]);
            st_trainer_phase(&t, ST_PHASE_IDLE);
        }
        st_trainer_report(&t, step, &r, do_eval ? val : NULL, val_n);
        if (st_trainer_guard(&t, step, &r)) { st_trainer_metrics_flush(&t); result = ST_RUN_DIVERGED; break; }
        int b = step_boundary(&t, step + 1);
        st_trainer_metrics_flush(&t);
        if (b < 0) { result = ST_RUN_FAILED; break; }
        if (b > 0) { result = ST_RUN_CHECKPOINTED; break; }
        if (st_trainer_samples_due(&t, step + 1) && st_trainer_samples_run(&t, step + 1)) { result = ST_RUN_FAILED; break; }
    }
    free(val);
    free(val_n);
    st_trainer_ckpt_collect(&t); /* a write still in flight ends before anything else (reported, counted) */
    if (result == ST_RUN_FINISHED) {
        st_trainer_phase(&t, ST_PHASE_CHECKPOINT); /* the others wait for rank 0's write */
        rc = st_trainer_agree(&t, st_trainer_save_final(&t));
        st_trainer_phase(&t, ST_PHASE_IDLE);
        if (rc) result = ST_RUN_FAILED;
        else if (t.rank == 0) printf("final weights: %s/final\n", cfg->run_dir);
        if (!rc && t.last_saved != cfg->train.steps) {
            /* the run finished but its last checkpoint could not be saved: not a success for a scheduler */
            if (t.rank == 0)
                fprintf(stderr, "shardtune train: error: the checkpoint at the end (step %lld) failed; final/ is written, "
                                "the newest checkpoint in %s is older\n", (long long)cfg->train.steps, cfg->checkpoint.dir);
            t.print_error = 0;
            result = ST_RUN_FAILED;
        }
        if (t.mon) st_monitor_event(t.mon, "end", cfg->train.steps, "finished");
    }
done:
    *print_error = t.print_error;
    teardown(&t);
    if (early) remove_new_run_dir(&t);
    free(t.run_dir_new);
    free(t.own_cfg);
    return result;
}
