/* config.h — the job configuration (DESIGN.md "Config reference", docs/config.md).
 *
 * A job is described by a YAML file plus `dotted.key=value` overrides. They are parsed into one
 * plain struct, `st_config`, that holds every value with DESIGN.md's defaults filled in. The struct
 * owns no heap memory (fixed-size arrays), so it can be copied with `=` and freed with nothing.
 *
 * The canonical form of a config is its JSON dump (st_config_to_json): every key, fully resolved
 * (run_dir, checkpoint.dir, task names, stage modules), in a fixed order. It is the "serialized
 * JobSpec" stored in metrics, checkpoints and plans, and it is valid YAML: loading it back with
 * st_config_load_string gives an identical struct. Rank 0 loads the user's file and broadcasts the
 * dump; the other ranks load the dump, so every rank sees the same values.
 *
 * Errors return ST_ECONFIG (ST_EIO for an unreadable file) and set a one-line message that names the
 * file (with line:column when the value came from it) and the key path, e.g.
 *   job.yaml:7:3: unknown key 'train.lerning_rate' (did you mean 'train.lr'?) */
#ifndef ST_CONFIG_H
#define ST_CONFIG_H

#include <stdint.h>

#include "kernels/kernels.h" /* st_precision */
#include "worker/train_kinds.h" /* st_schedule, ST_MOD_* module bits, st_mixing_strategy, st_packing_mode */

#define ST_CFG_PATH_MAX 1024 /* bytes for paths and addresses, NUL included */
#define ST_CFG_NAME_MAX 128  /* bytes for task names and layer specs */
#define ST_CFG_MAX_TASKS 64
#define ST_CFG_MAX_STAGES 64

/* distill.teacher_dtype */
typedef enum { ST_TEACHER_FP32 = 0, ST_TEACHER_INT8 = 1 } st_teacher_dtype;

typedef enum { ST_BACKEND_AUTO, ST_BACKEND_CPU, ST_BACKEND_CUDA } st_backend_kind;
typedef enum { ST_FINETUNE_FULL, ST_FINETUNE_FROZEN, ST_FINETUNE_PROGRESSIVE, ST_FINETUNE_LORA, ST_FINETUNE_QLORA,
               ST_FINETUNE_PROMPT_TUNING, ST_FINETUNE_P_TUNING, ST_FINETUNE_PREFIX_TUNING } st_finetune_mode;
typedef enum { ST_LOSS_WEIGHTING_NONE, ST_LOSS_WEIGHTING_UNCERTAINTY } st_loss_weighting_kind;
typedef enum { ST_RESUME_AUTO, ST_RESUME_NONE, ST_RESUME_PATH } st_resume_kind;
typedef enum { ST_NONFINITE_STOP, ST_NONFINITE_SKIP } st_nonfinite_policy;

typedef struct {
    char name[ST_CFG_NAME_MAX];   /* defaults to the file name of `path` without its extension */
    char path[ST_CFG_PATH_MAX];   /* dataset file (HDF5), required */
    double weight;                /* sampling weight (mixing.strategy: weights), >= 0 */
    double loss_weight;           /* multiplies this task's loss, >= 0 */
} st_task_config;

typedef struct {
    int64_t at_step;                      /* the stage starts at this step (first stage: 0) */
    char train_layers[ST_CFG_NAME_MAX];   /* layer spec, see st_parse_layer_ranges */
    unsigned train_modules;               /* ST_MOD_* mask; inherits finetune.train_modules */
} st_stage_config;

typedef struct {
    char source[ST_CFG_PATH_MAX]; /* the file the config came from ("<string>"), for messages; not a key */

    struct { char path[ST_CFG_PATH_MAX]; } model;
    char run_dir[ST_CFG_PATH_MAX];  /* default runs/<job file name without extension> */
    int64_t seed;
    st_backend_kind backend;
    int threads;                    /* 0 = auto (OMP_NUM_THREADS or the affinity mask) */
    st_precision precision;         /* matmul arithmetic: fp32 | bf16 (bf16 operands, fp32 accumulation) */
    st_loss_weighting_kind loss_weighting;
    double loss_weighting_lr;       /* Adam step size of the learned per-task log-variances (uncertainty) */

    struct {
        int64_t steps;              /* 0 before finish() when not given */
        double epochs;              /* 0 = not given; else steps are resolved from the data (trainer) */
        int micro_batch;
        int grad_accum;
        int seq_len;
        double lr;
        st_schedule schedule;
        int64_t warmup_steps;
        double min_lr_ratio;
        double weight_decay;
        double betas[2];
        double eps;
        double grad_clip;           /* 0 = no clipping */
        int64_t log_every;
        st_nonfinite_policy on_nonfinite; /* a non-finite loss / grad norm (or a loss spike): stop | skip the step */
        int max_nonfinite_skips;    /* skip: stop once this many steps in a row were skipped */
        double loss_spike;          /* 0 = off; else a loss above loss_spike x the recent mean counts as bad */
        double collective_timeout_s; /* a collective not done after this long aborts the job (0 = never) */
        st_packing_mode packing;    /* stream | documents (worker/train_kinds.h) */
    } train;

    struct {
        st_finetune_mode mode;
        char train_layers[ST_CFG_NAME_MAX];
        unsigned train_modules;     /* ST_MOD_* mask */
        st_stage_config stages[ST_CFG_MAX_STAGES];
        int n_stages;
        int64_t unfreeze_every;     /* 0 = off */
        double layer_lr_decay;
        struct {                    /* mode lora (worker/lora.h) */
            int r;
            double alpha;
            double dropout;         /* lora_dropout, [0, 1) (worker/lora.h) */
            unsigned targets;       /* ST_LORA_* bits */
            int dora;               /* DoRA magnitude vectors */
            int rslora;
            char layers[ST_CFG_NAME_MAX]; /* layer spec, see st_parse_layer_ranges */
        } lora;
        struct {                    /* mode qlora (worker/qlora.h): lora.* plus the quantized base */
            int quant;              /* st_qlora_quant: 0 nf4, 1 int8 */
            int double_quant;       /* 8-bit quantization of the block scales */
            int block;              /* elements per absmax block */
        } qlora;
        struct {                    /* mode prompt_tuning (worker/prompt.h); p_tuning adds encoder */
            int virtual_tokens;
            char init_text[ST_CFG_PATH_MAX]; /* "" = RANDOM init */
            int encoder;            /* p_tuning: 0 mlp, 1 lstm */
        } prompt;
        struct {                    /* mode prefix_tuning (worker/prompt.h; projection true is refused for now) */
            int virtual_tokens;
            int projection;
        } prefix;
    } finetune;

    struct {
        char teacher[ST_CFG_PATH_MAX]; /* "" = no distillation (worker/distill.h) */
        double temperature;
        double alpha;
        int teacher_dtype; /* ST_TEACHER_FP32 | ST_TEACHER_INT8: the teacher's linear layers and head in int8 */
    } distill;

    struct {
        int stage;
        int overlap;      /* reduce gradients in buckets while backward runs (all ZeRO stages) */
        double bucket_mb; /* bucket size for the overlapped reduction */
    } sharding;

    struct {
        int activation_checkpointing; /* keep each layer's input only, recompute the layer in backward */
        int checkpoint_dtype;         /* st_precision of the kept layer inputs: fp32 (0, default) or bf16 (1) */
    } memory;

    st_task_config tasks[ST_CFG_MAX_TASKS];
    int n_tasks;

    struct {
        st_mixing_strategy strategy;
        double temperature;
        int64_t cap;                /* documents per task counted for mixing rates; 0 = no cap */
    } mixing;

    double split[3];                /* train / val / test fractions, by document */

    struct {
        int64_t every_steps;        /* 0 = no periodic evaluation */
        int batches;
        struct {                    /* sample answers during training (coordinator/trainer/train_samples.c) */
            int64_t every_steps;    /* 0 = off; else every N steps and at the end */
            char prompts[ST_CFG_PATH_MAX]; /* JSONL in `generate`'s input format */
            int max_new;            /* tokens per answer at most */
            double temperature;     /* 0 = greedy (default) */
            int batch;              /* prompts decoded together (as generate --batch) */
            int64_t seed;           /* sampling seed (temperature > 0) */
            int chat;               /* text prompts through the chat template (as generate --chat) */
        } generate;
    } eval;

    struct {
        char dir[ST_CFG_PATH_MAX];  /* default RUN_DIR/checkpoints */
        int64_t every_steps;        /* 0 = only on signal / stop / end */
        int keep_last;              /* 0 = keep all */
        int signal;                 /* signal number that asks for a checkpoint; 0 = none */
        int max_failures;           /* this many failed saves in a row stop the job (0 = never) */
        int async;                  /* 1: the step waits for a snapshot only, the write runs in the background */
    } checkpoint;

    st_resume_kind resume;
    char resume_path[ST_CFG_PATH_MAX]; /* when resume == ST_RESUME_PATH */

    struct {
        char publish[ST_CFG_PATH_MAX];  /* "" = no PUB socket */
        char control[ST_CFG_PATH_MAX];  /* "" = no control socket */
        int heartbeat_ms;
        double stall_after_s;
        int curve;                      /* 1 = CURVE-encrypt the sockets */
    } monitor;
} st_config;

/* Fills every value with its default (model.path and tasks stay empty: they are required). */
void st_config_defaults(st_config *c);

/* Defaults, then the YAML file, then the overrides in order ("train.lr=3e-4", "tasks.0.weight=2",
 * "train.betas=[0.9,0.99]"), then derived defaults and validation. On failure *c is unspecified. */
int st_config_load(st_config *c, const char *yaml_path, int n_overrides, char **overrides);

/* Same, from YAML text in memory; messages name the file "<string>". */
int st_config_load_string(st_config *c, const char *yaml_text, int n_overrides, char **overrides);

/* Canonical JSON of every key (malloc'ed, NUL-terminated; the caller frees it). 0 or ST_ENOMEM. */
int st_config_to_json(const st_config *c, char **json_out);

/* Parses a train_layers spec into mask_out[0..n_layers-1] (1 = selected). Items separated by commas:
 * "N" (one layer), "A-B" (inclusive), "-K" (the last K layers); or the whole spec "all" / "none".
 * Errors (ST_ECONFIG) for malformed items, reversed ranges and indices outside the model.
 * With n_layers < 0 only the syntax is checked and mask_out may be NULL. */
int st_parse_layer_ranges(const char *spec, int n_layers, unsigned char *mask_out);

/* Names of enum values as written in YAML ("cosine", "frozen", ...); "?" when out of range. */
const char *st_backend_name(st_backend_kind k);
const char *st_precision_name(st_precision p);
/* "prompt_tuning" / "p_tuning" / "prefix_tuning" for the prompt-learning modes (worker/prompt.h), else NULL. */
const char *st_config_prompt_learning(const st_config *c);
const char *st_schedule_name(st_schedule k);
const char *st_finetune_mode_name(st_finetune_mode m);
const char *st_mixing_name(st_mixing_strategy s);
const char *st_loss_weighting_name(st_loss_weighting_kind k);
const char *st_nonfinite_name(st_nonfinite_policy p);
const char *st_module_name(unsigned module_bit);  /* one ST_MOD_* bit: "attn", ... */
const char *st_signal_name(int signum);           /* "USR1", ... or "none" for 0 */

#endif
