/* plan.h — the training plan: stage schedule, shard map and per-rank memory estimate.
 *
 * Stages: the fine-tuning mode turns into a list of stages (full: one; frozen: one; progressive: one per
 * finetune.stages entry, or the head alone then one more layer top-down every unfreeze_every steps).
 * Each stage is a layer mask and a module mask for st_model_set_trainable. The run loop and
 * `shardtune plan` share st_plan_stages, so the planner shows exactly what training will do.
 *
 * Plan: for each stage and each rank, the compact trainable space padded to the world size, the rank's
 * shard [lo, hi) and the parameters it touches, and the bytes this rank holds, mirroring the buffers that
 * worker/model.c, worker/comm.c, worker/optim.c and coordinator/trainer/train.c allocate (docs/finetune.md).
 *
 * Memory: st_stage_list and st_plan own their arrays (release with the *_free functions). Both borrow
 * nothing after they return; the model passed in may be registry-only (st_model_build_registry). */
#ifndef ST_PLAN_H
#define ST_PLAN_H

#include <stddef.h>
#include <stdint.h>

#include "coordinator/config/config.h"
#include "worker/model.h"

typedef struct {
    int64_t at_step;                    /* first step of this stage */
    unsigned char *layers;              /* [n_layer], 1 = layer selected (owned) */
    unsigned modules;                   /* ST_MOD_* bits */
    char layers_spec[ST_CFG_NAME_MAX];  /* the train_layers spec it came from ("all", "-2", ...) */
} st_stage;

typedef struct {
    int n;
    st_stage *stages; /* [n], ascending at_step, the first at 0 */
} st_stage_list;

/* Builds the stage schedule of cfg->finetune for model m (only m->cfg and the registry are read).
 * Fails (ST_ECONFIG, message naming the key) on an invalid layer spec, a stage that trains nothing,
 * non-increasing at_step, or progressive without stages / unfreeze_every. On failure *out is empty. */
int st_plan_stages(const st_config *cfg, const st_model *m, st_stage_list *out);
void st_stage_list_free(st_stage_list *l);

/* The schedule as a serialized shardtune.Plan (proto/shardtune.proto), for rank 0 to broadcast.
 * *buf is malloc'ed. unpack never trusts the bytes: a malformed plan or one for another layer count is
 * ST_EFORMAT. */
int st_plan_pack(const st_stage_list *l, int n_layer, int world, int zero_stage, uint8_t **buf, size_t *len);
int st_plan_unpack(const uint8_t *buf, size_t len, int n_layer, st_stage_list *out);

/* Whether training at sharding.stage 3 streams the base in (each rank reads only the parts it keeps,
 * after the adapters are attached): full and frozen, LoRA without DoRA, prompt tuning without a TEXT init,
 * P-tuning and prefix tuning. Not progressive, DoRA, a TEXT init (they read the base while setting up)
 * nor QLoRA (its base is quantized whole): those read the whole model, then keep their parts. */
int st_plan_streams(const st_config *cfg);

/* Whether training below sharding.stage 3 on a host backend (not QLoRA, not full) reads the model late: after
 * the adapters are attached (over the unread base: no copy of it) and the precision is set, under bf16 the
 * first stage's frozen BF16 tensors straight into the bf16 copy (train.c load_late): no rank holds the fp32
 * model at load (SHARDTUNE_FROZEN_FP32=1, tests: every tensor read as fp32, as before). */
int st_plan_loads_late(const st_config *cfg);

/* The st_model_set_activation_checkpointing argument of a job: 0, 1, or ST_MODEL_CKPT_BF16 with
 * memory.checkpoint_dtype: bf16. */
int st_plan_act_ckpt(const st_config *c);

/* Whether sharding.stage 3 on a device backend streams this finetune.mode into worker/comm_zero3_dev.c's
 * shards (the model bound without weights): every mode but QLoRA, which has a sharded load of its own
 * (train_qload.c: each rank quantizes only its words of the codes once the communicator exists; with
 * SHARDTUNE_Z3DEV_QLOAD=whole quantized whole on every rank, train.c load_quantized, then cut). */
int st_plan_z3dev_mode(const st_config *c);
/* Whether QLoRA at sharding.stage 3 loads its base sharded (train_qload.c), on a device (device: the backend has
 * no host memory) and on CPU ranks alike: always, unless SHARDTUNE_Z3DEV_QLOAD=whole (both: the A/B and the tests'
 * reference) or, on CPU ranks, SHARDTUNE_ZERO3_SHARD_FROZEN=0 (the blob kept whole: nothing to shard). */
int st_plan_qload_sharded(const st_config *c, int device);

/* finetune.mode lora: adds the adapters of cfg->finetune.lora to m (worker/lora.h; a registry-only model
 * gets the registry entries). No-op for the other modes. Call before st_plan_stages / st_plan_build. */
int st_plan_attach_adapters(const st_config *cfg, st_model *m);
/* finetune.mode qlora: whether the quantized base keeps gate and up as dequantization units of their own
 * (worker/qlora.h spec.mlp_apart): where the model runs them as two matmuls anyway (st_model_mlp_splits:
 * precision bf16, activation checkpointing with the MLP in token blocks, no DoRA / LoRA dropout). */
int st_plan_qlora_mlp_apart(const st_config *c, const st_model_config *mc);
/* finetune.prompt.init_text's token ids (*ids malloc'd, *n > 0): the model directory's tokenizer.json. */
int st_plan_prompt_text_ids(const st_config *cfg, int32_t **ids, size_t *n);

/* Index of the stage in force at `step` (0-based completed steps). */
int st_stage_at(const st_stage_list *l, int64_t step);

/* One rank's view of one stage. Byte counts are what the process holds for the run's tensors. */
typedef struct {
    size_t lo, hi;            /* shard of the compact space (hi may exceed n_trainable: padding) */
    int n_params;             /* trainable parameters the shard touches */
    int first_param, last_param; /* registry indices of the first and last ones, -1 when none */
    size_t weights;           /* all weights, fp32, replicated */
    size_t teacher;           /* distill.teacher (worker/distill.c): its weights (whole; sharding.stage 3: this
                                 rank's 1/N of them + one gathered group, worker/comm.h st_frozen_shard), their
                                 bf16 copy under bf16 (stage 3: the group's), its checkpointed forward's
                                 activations; distill.teacher_dtype int8: + the packs and their scratch (stage
                                 3: 1/N of the packs + one group's) - the quantized weights' fp32 pages given
                                 back (host ranks); 0 without a teacher. In total and every phase */
    size_t grads;             /* model gradient buffer (padded compact space) + stage-2 reduced shard */
    size_t optim;             /* AdamW exp_avg + exp_avg_sq over the optimizer range, + step counters */
    size_t comm;              /* comm.c parameter staging (stages 1-2) */
    size_t activations;       /* st_model_activation_floats(micro_batch, seq_len) */
    size_t buffers;           /* train.c step buffers (tokens, masks, loss weights of micro x accum samples),
                                 + the checkpoint.async snapshot copy (ckpt_snap.c) on the CPU backend */
    size_t host_snapshot;     /* backend cuda: the checkpoint.async snapshot, in host memory (copy_to_host),
                                 so not part of the device figures (total, at_*) */
    size_t host_save;         /* backend cuda, rank 0 (below stage 3): host memory final/ adds beside the device
                                 figures (st_peft_save_dir's host copy of the adapters) */
    size_t host_resume;       /* backend cuda (below stage 3): the resume's host image of the fp32 weights and of
                                 the moments, beside the device figures */
    size_t total;
    size_t at_save;           /* held while final/ is written at the end of this stage: total, + model_io.c's
                                 one tensor at a time on rank 0 (two when a tensor is stored transposed);
                                 ZeRO-3 (streamed): no per-layer working set, rank 0 + one gathered tensor */
    size_t at_load;           /* held once the model is read (setup, first stage only): the weights as read
                                 (ZeRO-3 full/frozen: frozen + this rank's shard only), the read buffers, step
                                 buffers; the other buffers are allocated but not touched yet (no memory) */
    size_t at_resume;         /* held while resuming from a checkpoint (first stage): the weights read and a
                                 host copy of the rank's moments (ZeRO-3 full/frozen: this rank's parts,
                                 one tensor at a time, moments read in place on CPU ranks), on top of the
                                 buffers held between steps; not part of rank_peak */
    size_t at_ckpt;           /* held while a checkpoint is written (CPU ranks: from the live buffers, a
                                 bounce window; ZeRO-3: one tensor gathered at a time, no layer working set) */
    size_t enter_fp32;        /* device ZeRO-3: entering this stage (a stage change), on top of total: the new
                                 frozen shard whole in fp32 until its parts go back to bf16 only (the other 2
                                 bytes of each float held so) */
} st_rank_plan;

typedef struct {
    int64_t at_step;
    char layers_spec[ST_CFG_NAME_MAX];
    unsigned modules;
    size_t n_trainable;      /* trainable floats */
    size_t n_pad;            /* padded to a multiple of the world size */
    size_t shard;            /* n_pad / world */
    int n_trainable_params;
    size_t transition_extra; /* bytes every rank holds in addition while entering this stage (the previous
                                stage's full moments, gathered to re-shard them); 0 for the first stage */
    st_rank_plan *ranks;     /* [world] */
} st_stage_plan;

typedef struct {
    int world, zero_stage, micro_batch, grad_accum, seq_len;
    st_precision precision;
    int act_ckpt;             /* memory.activation_checkpointing */
    size_t n_weights;
    int n_params;
    int n_stages;
    st_stage_plan *stages; /* [n_stages] */
    int final_stage;       /* the stage in force at the last step (train.steps) */
    size_t save_extra;     /* bytes rank 0 holds in addition while writing final/ (model_io.c's host copy
                              of the weights and their HF-layout copy; ZeRO-3: + the gathered model, - the
                              per-layer working set): its at_save - total */
    size_t load_bytes;     /* max over ranks of the first stage's at_load */
    size_t peak;           /* bytes: max over ranks of rank_peak */
    size_t *rank_peak;     /* [world]: each rank's max over the phases: at_load, every stage's total (+ the
                              transition), at_ckpt, and at_save of the final stage */
    size_t export_bytes;   /* `shardtune export` of such a checkpoint or model directory (one process): one
                              tensor at a time (two when stored transposed); 0 for adapter runs */
} st_plan;

/* Plans `cfg` on `world` ranks for model m (registry only is enough). Checks seq_len against the
 * model's max positions. On failure *out is empty. */
int st_plan_build(const st_config *cfg, const st_model *m, int world, st_plan *out);
void st_plan_free(st_plan *p);

#endif
