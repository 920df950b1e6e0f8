/* train_internal.h — the trainer's state and the functions its files share (private to coordinator/).
 *
 * coordinator/trainer/train.c         set-up, teardown, the loop and step boundaries (calls the others)
 * coordinator/trainer/train_step.c    one optimizer step (data, forward/backward, reduction, AdamW) and eval
 * coordinator/trainer/train_ckpt.c    checkpoint save, resume, final weights, the agreed control word
 * coordinator/trainer/train_guard.c   divergence guard (bad steps, setting a checkpoint aside)
 * coordinator/trainer/train_compat.c  whether a checkpoint may continue this job
 * coordinator/trainer/train_report.c  telemetry step reports, metrics.jsonl, the console line
 * coordinator/trainer/train_stage.c   stage changes (re-sharding itself is worker/comm.c's)
 * coordinator/trainer/train_sync.c    leaves: rank agreement and the published phase
 * coordinator/trainer/train_watchdog.c the collective watchdog thread
 * coordinator/trainer/train_samples.c  eval.generate: sample answers to RUN_DIR/samples.jsonl and the monitor
 * Calls go one way (no file calls back into one that calls it):
 *   train.c → step, ckpt, guard, report, stage, compat, sync, watchdog, samples;  samples → sync
 *   guard → ckpt;  step → guard;  ckpt → stage, compat, sync;  sync → watchdog (mark)
 * All functions here are collective (every rank calls them) unless the comment says rank 0. */
#ifndef ST_TRAIN_INTERNAL_H
#define ST_TRAIN_INTERNAL_H

#include <mpi.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>

#include "checkpoints/ckpt.h"
#include "common/json.h"
#include "coordinator/config/config.h"
#include "coordinator/monitor/monitor_server.h"
#include "coordinator/trainer/plan.h"
#include "coordinator/monitor/telemetry.h"
#include "worker/comm.h"
#include "worker/comm_zero3_teacher_dev.h"
#include "worker/dataset.h"
#include "worker/distill.h"
#include "worker/loader.h"
#include "worker/model.h"
#include "worker/optim.h"
#include "worker/qlora.h"
#include "worker/taskweight.h"

/* Doubles of trainer.task_sums for n tasks: 3 per task, the loss, the norm's part, the two distillation parts. */
#define ST_TASK_SUMS(n) (3 * (size_t)(n) + 4)

typedef struct st_watchdog st_watchdog;

typedef struct {
    const st_config *cfg;      /* = own_cfg: the job with train.steps resolved (train.epochs) */
    const st_config *user_cfg; /* the job as given (the JobSpec checkpoints record) */
    st_config *own_cfg;
    MPI_Comm comm;
    int rank, world;
    int print_error;
    int check_bf16_copy; /* SHARDTUNE_CHECK_BF16_COPY=1: verify the bf16 weight copy after every step */
    const st_backend *be;
    st_model model;
    st_dataset *datasets;
    int n_tasks;
    st_loader loader;
    int loader_ready;
    st_comm dp;
    st_optim optim;
    st_stage_list stages; /* the fine-tuning schedule (coordinator/trainer/plan.h) */
    st_taskw taskw;       /* multi-task loss weighting (fixed or learned uncertainty) */
    int stage;            /* index of the current stage */
    int weights_read;     /* the model's weights are in (ZeRO-3 streams them after the first stage is entered) */
    unsigned char *z3_frozen16; /* device ZeRO-3, setup only: the first stage's frozen parameters read straight into
                                   bf16 (train_frozen16.c st_trainer_z3_frozen_bf16), else NULL */
    int micro, accum, T, slots; /* slots = micro * accum samples per rank per step */
    int32_t *inputs, *targets;
    float *mask, *weight;
    int32_t *doc_pos; /* train.packing documents: [slots * T] position of each token in its document; else NULL */
    int *task_of;
    double *task_sums; /* [ST_TASK_SUMS(n_tasks)]: per task loss sum, target count, input tokens; then the step's
                          loss, the norm's part and the distillation parts (train_step.c reduce_step_sums) */
    double *task_counts; /* [n_tasks + 1]: targets of each task in the global batch, then the total */
    FILE *metrics;
    char *run_dir_new; /* rank 0: the topmost directory of run_dir this run created (NULL: run_dir existed) */
    st_telemetry *tel;
    st_monitor *mon;
    st_probe *probe;
    uint64_t tokens_seen;
    /* checkpoint / resume */
    char *job_json, *model_config_text; /* identical on every rank (attributes are collective) */
    int64_t start_step, last_saved;     /* first step to run; completed steps of the last save (-1) */
    double last_loss, resumed_loss;     /* resumed_loss: loss at save of the checkpoint we resumed (NAN) */
    double peak_flops; /* measured matmul FLOP/s of all ranks together (for MFU) */
    /* knowledge distillation (distill.teacher set): the frozen teacher, replicated on every rank below
     * sharding.stage 3; at stage 3 sharded like the student (teacher_shard: 1/N of its weights per rank,
     * gathered per layer for its forward; on a device backend teacher_dev, worker/comm_zero3_teacher_dev.h) */
    int kd_on;
    st_model teacher;
    st_distill kd;
    st_frozen_shard teacher_shard;
    st_z3teach *teacher_dev;
    /* divergence guard (train_guard.c) */
    double loss_mean;      /* running mean of recent good losses (for train.loss_spike) */
    int64_t good_steps;    /* good steps since start/resume */
    int skips_in_a_row;    /* bad steps skipped since the last good one */
    int save_failures;     /* failed checkpoint saves in a row */
    uint64_t base_checksum; /* checksum of the base weights as loaded (train_compat.c) */
    char pending_ckpt[64];
    st_ckpt_async *ckpt_bg;  /* checkpoint.async: the background writer (NULL: saves are synchronous) */
    const char *bg_why;      /* why the pending background save was taken ("periodic", "requested") */
    double ckpt_blocked_ms;  /* how long the save at this boundary held training (< 0: no save) */
    st_strbuf metrics_held;  /* rank 0: this step's metrics.jsonl line, written when the boundary is over */
    st_watchdog *wd;        /* collective watchdog (train_watchdog.c), NULL when off */
    int64_t wd_step;        /* the step the watchdog reports (as the probe: completed + 1) */
    struct st_train_samples *samples; /* eval.generate (train_samples.c), NULL when off */ /* rank 0: a checkpoint not yet confirmed by a good next step (retention waits) */
} trainer;

typedef struct {
    double loss, grad_norm, seconds, comm_seconds;
    float lr;
    double kd_loss, ce_loss, teacher_seconds; /* distillation only */
    const char *bad; /* why the step was not applied (non-finite loss/grad norm, loss spike), else NULL */
} st_step_result;

enum { CTL_SIGNAL = 1u << 8,   /* a rank got SIGTERM / checkpoint.signal */
       CTL_CKPT_BUSY = 1u << 9 }; /* a rank's background checkpoint write is still running */

/* Set by the signal handlers (train.c); read at step boundaries. */
extern volatile sig_atomic_t st_stop_requested;

/* train_sync.c */
void st_trainer_phase(trainer *t, st_phase phase);
/* All ranks agree whether any rank failed; the lowest failing rank keeps print_error = 1. */
int st_trainer_agree(trainer *t, int rc);
/* train_stage.c: makes stage s current (trainable set, shards, optimizer state carried over). */
int st_trainer_enter_stage(trainer *t, int s);
/* Frozen weights of a bf16 source held once, in bf16, where that is exact: st_model_drop_frozen_fp32 below
 * ZeRO-3, st_comm_drop_frozen_fp32 (collective) at ZeRO-3 once t->weights_read. Returns the floats held so
 * (ZeRO-3: of this rank's parts). */
size_t st_trainer_hold_bf16(trainer *t);
/* SHARDTUNE_REPORT_LOAD_RSS=1 (tests): the line naming the floats the current stage holds in bf16 only. */
void st_trainer_report_bf16(const trainer *t, size_t w16);

int st_trainer_step(trainer *t, int64_t step, st_step_result *r);
/* Why a step with this (all-reduced) loss and grad norm must not be applied, or NULL; also updates the
 * running loss mean on good steps. Same answer on every rank. */
const char *st_trainer_bad_step(trainer *t, double loss, double grad_norm);
/* After every step: 0 to go on, 1 when train.on_nonfinite / max_nonfinite_skips end the run (rank 0 prints). */
int st_trainer_guard(trainer *t, int64_t step, const st_step_result *r);
/* Measures this backend's matmul FLOP/s on every rank and sums them into t->peak_flops. */
void st_trainer_measure_peak(trainer *t);
double st_trainer_eval_task(trainer *t, int k, double *targets_out);

void st_trainer_report(trainer *t, int64_t step, const st_step_result *r, const double *val, const double *val_n);
void st_trainer_banner(const trainer *t); /* rank 0 prints */
int st_trainer_trim_metrics(trainer *t, int64_t keep_upto); /* rank 0 */

int st_trainer_save_final(trainer *t);
int st_trainer_save_checkpoint(trainer *t, int64_t completed, const char *why);
/* Collective. Waits for the pending background checkpoint write (if any) and reports it like a
 * synchronous save (console line, monitor event, save_failures, retention). Returns its code. */
int st_trainer_ckpt_collect(trainer *t);
/* Rank 0: writes the held metrics.jsonl line of the last step (with ckpt_blocked_ms when it saved). */
void st_trainer_metrics_flush(trainer *t);
/* Rank 0: the pending checkpoint is confirmed (the next step was good): older ones may now rotate out. */
void st_trainer_confirm_checkpoint(trainer *t);
/* Rank 0: the pending checkpoint holds the weights that diverged: renamed NAME.diverged, `latest` moved back. */
void st_trainer_set_aside_checkpoint(trainer *t);
unsigned st_trainer_control(trainer *t);
int st_trainer_resume(trainer *t);

/* train_compat.c: 0 when checkpoint `info` may continue this job, else ST_ECONFIG naming what differs
 * (old and new values) and how to proceed. Same answer on every rank. */
int st_trainer_check_compat(const trainer *t, const st_ckpt_info *info, const char *path);
/* The same for the model: config.json keys and the base model's checksum (after the tensors loaded, so a
 * shape mismatch is reported naming the tensor). */
int st_trainer_check_model(const trainer *t, const st_ckpt_info *info, const char *path);
/* train_frozen16.c: a device rank under bf16 below ZeRO-3 loads the model with its frozen bf16-source weights
 * in the bf16 copy only (worker/model.h st_model_bind_frozen_bf16), with the finite check and base_checksum
 * done; *done 0: nothing to hold so (or SHARDTUNE_FROZEN_FP32=1): the caller loads as usual. Not collective. */
int st_trainer_load_frozen_bf16(trainer *t, int *done);
/* The same at device ZeRO-3, in two halves around the communicator's build: the first stage's frozen base
 * parameters that st_model_bf16_storable admits and whose file tensors are BF16 (*out [n_params], NULL when
 * none or SHARDTUNE_FROZEN_FP32=1; not collective: the communicator agrees, st_comm_options.frozen_bf16), then,
 * once it is built, this rank's parts of those it holds in bf16 only (worker/comm_zero3_dev.h
 * st_z3dev_part_held) read straight into them a bounded piece at a time, finite-checked and summed into *sum as
 * load_streamed sums the others (train.c). */
int st_trainer_z3_frozen_bf16(trainer *t, unsigned char **out);
int st_trainer_z3_read_bf16(trainer *t, uint64_t *sum);
/* Which parts of parameter i this rank keeps (ctx: the communicator, st_comm_param_keep; all of it below ZeRO-3):
 * the streamed loads' st_model_keep_fn. */
void st_trainer_keep_part(void *ctx, const st_model *m, int i, size_t *a, size_t *b);
/* train_qload.c (a run st_plan_qload_sharded says so): QLoRA's spec from the config (train.c load_quantized, the
 * sharded load); the layout without the base (before the communicator; not collective); then each rank's parts
 * read, the base checksum and the scales' means agreed (collective, after the first stage is entered). */
st_qlora_spec st_trainer_qlora_spec(const st_config *c, const st_model *m);
int st_trainer_qload_layout(trainer *t);
int st_trainer_qload_read(trainer *t);
/* st_ckpt_checksum of the model's weights (never 0). */
uint64_t st_trainer_weights_checksum(const trainer *t);
/* This rank's, not collective: adds to *sum the checksum's terms of weights [first, first + n) (they add
 * up: the parts of a streamed load sum to the whole load's); -1 when out of memory. */
int st_trainer_range_checksum(const trainer *t, size_t first, size_t n, uint64_t *sum);

/* train_samples.c: eval.generate. open (after resume: the prompts are read and checked, samples.jsonl
 * trimmed to the resumed step) and close are called once; due says whether the boundary after
 * `completed` steps samples; run generates from the current weights and writes / publishes. */
int st_trainer_samples_open(trainer *t);
void st_trainer_samples_close(trainer *t);
int st_trainer_samples_due(const trainer *t, int64_t completed);
int st_trainer_samples_run(trainer *t, int64_t completed);

/* train_watchdog.c: train.collective_timeout_s. start (after monitoring: rank 0 names missing ranks from
 * the monitor) / stop are called once; mark at every phase change (st_trainer_phase does it); pause
 * exempts a paused job. All NULL-safe. */
int st_watchdog_start(trainer *t);
void st_watchdog_mark(st_watchdog *w, int64_t step, int phase);
void st_watchdog_pause(st_watchdog *w, int paused);
void st_watchdog_stop(st_watchdog *w);

#endif
