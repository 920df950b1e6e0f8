/* train_kinds.h — kinds that the job config names and the worker acts on, defined once here: the module
 * bits of a trainable set (finetune.train_modules, st_model_set_trainable), the learning-rate schedules
 * (train.schedule, st_lr_at), the task mixing strategies and the packing modes (st_loader_options). Plain enums with no dependencies, so coordinator/config/ can name them
 * without knowing about models. The config's YAML names are in config_keys.c, in the order of the values. */
#ifndef ST_TRAIN_KINDS_H
#define ST_TRAIN_KINDS_H

/* Module kinds, as bits (YAML: attn, mlp, norm, embed, head). */
enum { ST_MOD_ATTN = 1, ST_MOD_MLP = 2, ST_MOD_NORM = 4, ST_MOD_EMBED = 8, ST_MOD_HEAD = 16, ST_MOD_ALL = 31 };
/* LoRA adapter tensors (worker/lora.h): never part of ST_MOD_ALL, so only a LoRA trainable set selects them. */
enum { ST_MOD_LORA = 32 };
/* The prompt-tuning prompt (worker/prompt.h): like ST_MOD_LORA, outside ST_MOD_ALL. */
enum { ST_MOD_PROMPT = 64 };

/* Learning-rate schedules (YAML: constant, cosine, linear). */
typedef enum { ST_SCHED_CONSTANT = 0, ST_SCHED_COSINE = 1, ST_SCHED_LINEAR = 2 } st_schedule;

/* Task mixing (mixing.strategy, YAML: proportional, temperature, weights; st_loader_options). */
typedef enum { ST_MIXING_PROPORTIONAL = 0, ST_MIXING_TEMPERATURE = 1, ST_MIXING_WEIGHTS = 2 } st_mixing_strategy;

/* Training windows (train.packing, YAML: stream, documents; st_loader_options). */
typedef enum { ST_PACKING_STREAM = 0, ST_PACKING_DOCUMENTS = 1 } st_packing_mode;

#endif
