/* config_keys.c — the key tables (config_keys.h) and the defaults of every value.
 *
 * This file is the single place that lists the config keys: name, type, range and where the value
 * lives in st_config. The order of each table is the order of the JSON dump and of "valid keys"
 * lists in messages; it follows DESIGN.md's config reference. Static data only. */
#include "coordinator/config/config.h"
#include "coordinator/config/config_keys.h"
#include "common/util.h" /* ST_MAX_THREADS */
#include "worker/lora.h"

#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* Offset of a field inside one of st_config's anonymous section structs. */
#define SOFF(sec, field) (offsetof(st_config, sec.field) - offsetof(st_config, sec))

#define KEY_I32(n, o, l, h, fl) {.name = n, .kind = ST_KEY_I32, .off = (o), .lo = (l), .hi = (h), .flags = (fl)}
#define KEY_I64(n, o, l, h, fl) {.name = n, .kind = ST_KEY_I64, .off = (o), .lo = (l), .hi = (h), .flags = (fl)}
#define KEY_F64(n, o, l, h, fl) {.name = n, .kind = ST_KEY_F64, .off = (o), .lo = (l), .hi = (h), .flags = (fl)}
#define KEY_STR(n, o, sz) {.name = n, .kind = ST_KEY_STRING, .off = (o), .size = (sz)}
#define KEY_ENUM(n, o, nm) {.name = n, .kind = ST_KEY_ENUM, .off = (o), .names = (nm)}
#define KEY_SECTION(n, sec, tbl) {.name = n, .kind = ST_KEY_SECTION, .off = offsetof(st_config, sec), .sub = (tbl)}
#define NO_HI ST_KEY_NO_HI

static const char *const backend_names[] = {"auto", "cpu", "cuda", NULL};
static const char *const precision_names[] = {"fp32", "bf16", NULL}; /* indexed by st_precision */
static const char *const schedule_names[] = {"constant", "cosine", "linear", NULL};
static const char *const mode_names[] = {"full",          "frozen",   "progressive",   "lora", "qlora",
                                        "prompt_tuning", "p_tuning", "prefix_tuning", NULL};
static const char *const encoder_names[] = {"mlp", "lstm", NULL};
static const char *const quant_names[] = {"nf4", "int8", NULL}; /* indexed by st_qlora_quant */
static const char *const mixing_names[] = {"proportional", "temperature", "weights", NULL};
static const char *const loss_weighting_names[] = {"none", "uncertainty", NULL};
static const char *const packing_names[] = {"stream", "documents", NULL}; /* indexed by st_packing_mode */
static const char *const teacher_dtype_names[] = {"fp32", "int8", NULL}; /* ST_TEACHER_FP32, ST_TEACHER_INT8 */
static const char *const nonfinite_names[] = {"stop", "skip", NULL}; /* indexed by st_nonfinite_policy */
const char *const st_module_names[] = {"attn", "mlp", "norm", "embed", "head", NULL};

static void task_defaults(void *elem) {
    st_task_config *t = elem;
    memset(t, 0, sizeof *t);
    t->weight = 1.0;
    t->loss_weight = 1.0;
}

static void stage_defaults(void *elem) {
    st_stage_config *s = elem;
    memset(s, 0, sizeof *s); /* train_modules 0 = inherit finetune.train_modules */
}

static const st_key model_keys[] = {
    KEY_STR("path", SOFF(model, path), ST_CFG_PATH_MAX),
    {0},
};

static const st_key train_keys[] = {
    KEY_I64("steps", SOFF(train, steps), 1, INT32_MAX, ST_KEY_UNSET_ZERO) /* the lr schedule counts in int */,
    KEY_F64("epochs", SOFF(train, epochs), 0, 1e6, ST_KEY_LO_OPEN | ST_KEY_UNSET_ZERO), /* or passes over the train split */
    KEY_I32("micro_batch", SOFF(train, micro_batch), 1, 0, NO_HI),
    KEY_I32("grad_accum", SOFF(train, grad_accum), 1, 0, NO_HI),
    KEY_I32("seq_len", SOFF(train, seq_len), 2, 0, NO_HI),
    KEY_F64("lr", SOFF(train, lr), 0, 0, ST_KEY_LO_OPEN | NO_HI),
    KEY_ENUM("schedule", SOFF(train, schedule), schedule_names),
    KEY_I64("warmup_steps", SOFF(train, warmup_steps), 0, INT32_MAX, 0),
    KEY_F64("min_lr_ratio", SOFF(train, min_lr_ratio), 0, 1, 0),
    KEY_F64("weight_decay", SOFF(train, weight_decay), 0, 0, NO_HI),
    {.name = "betas", .kind = ST_KEY_F64_LIST, .off = SOFF(train, betas), .size = 2, .lo = 0, .hi = 1,
     .flags = ST_KEY_HI_OPEN},
    KEY_F64("eps", SOFF(train, eps), 0, 0, ST_KEY_LO_OPEN | NO_HI),
    KEY_F64("grad_clip", SOFF(train, grad_clip), 0, 0, NO_HI),
    KEY_I64("log_every", SOFF(train, log_every), 1, 0, NO_HI),
    KEY_ENUM("on_nonfinite", SOFF(train, on_nonfinite), nonfinite_names),
    KEY_ENUM("packing", SOFF(train, packing), packing_names),
    KEY_I32("max_nonfinite_skips", SOFF(train, max_nonfinite_skips), 1, 1000000, 0),
    KEY_F64("loss_spike", SOFF(train, loss_spike), 0, 0, NO_HI),
    KEY_F64("collective_timeout_s", SOFF(train, collective_timeout_s), 0, 0, NO_HI),
    {0},
};

static const st_key stage_keys[] = {
    KEY_I64("at_step", offsetof(st_stage_config, at_step), 0, 0, NO_HI),
    KEY_STR("train_layers", offsetof(st_stage_config, train_layers), ST_CFG_NAME_MAX),
    {.name = "train_modules", .kind = ST_KEY_MODULES, .off = offsetof(st_stage_config, train_modules)},
    {0},
};

/* Offset of a field of finetune.lora inside its struct. */
#define LOFF(field) (offsetof(st_config, finetune.lora.field) - offsetof(st_config, finetune.lora))

static const st_key lora_keys[] = {
    KEY_I32("r", LOFF(r), 1, 0, NO_HI),
    KEY_F64("alpha", LOFF(alpha), 0, 0, ST_KEY_LO_OPEN | NO_HI),
    KEY_F64("dropout", LOFF(dropout), 0, 1, ST_KEY_HI_OPEN),
    {.name = "targets", .kind = ST_KEY_NAMESET, .off = LOFF(targets), .names = st_lora_target_names},
    {.name = "dora", .kind = ST_KEY_BOOL, .off = LOFF(dora)},
    {.name = "rslora", .kind = ST_KEY_BOOL, .off = LOFF(rslora)},
    KEY_STR("layers", LOFF(layers), ST_CFG_NAME_MAX),
    {0},
};

#define QOFF(field) (offsetof(st_config, finetune.qlora.field) - offsetof(st_config, finetune.qlora))

static const st_key qlora_keys[] = {
    KEY_ENUM("quant", QOFF(quant), quant_names),
    {.name = "double_quant", .kind = ST_KEY_BOOL, .off = QOFF(double_quant)},
    KEY_I32("block", QOFF(block), 1, 0, NO_HI),
    {0},
};

#define POFF(field) (offsetof(st_config, finetune.prompt.field) - offsetof(st_config, finetune.prompt))

static const st_key prompt_keys[] = {
    KEY_I32("virtual_tokens", POFF(virtual_tokens), 1, 0, NO_HI),
    KEY_STR("init_text", POFF(init_text), ST_CFG_PATH_MAX),
    KEY_ENUM("encoder", POFF(encoder), encoder_names),
    {0},
};

#define XOFF(field) (offsetof(st_config, finetune.prefix.field) - offsetof(st_config, finetune.prefix))

static const st_key prefix_keys[] = {
    KEY_I32("virtual_tokens", XOFF(virtual_tokens), 1, 0, NO_HI),
    {.name = "projection", .kind = ST_KEY_BOOL, .off = XOFF(projection)},
    {0},
};

static const st_key finetune_keys[] = {
    KEY_ENUM("mode", SOFF(finetune, mode), mode_names),
    KEY_STR("train_layers", SOFF(finetune, train_layers), ST_CFG_NAME_MAX),
    {.name = "train_modules", .kind = ST_KEY_MODULES, .off = SOFF(finetune, train_modules)},
    {.name = "stages", .kind = ST_KEY_LIST, .off = SOFF(finetune, stages), .size = sizeof(st_stage_config),
     .count_off = SOFF(finetune, n_stages), .max = ST_CFG_MAX_STAGES, .sub = stage_keys,
     .elem_defaults = stage_defaults},
    KEY_I64("unfreeze_every", SOFF(finetune, unfreeze_every), 0, 0, NO_HI),
    KEY_F64("layer_lr_decay", SOFF(finetune, layer_lr_decay), 0, 1, ST_KEY_LO_OPEN),
    {.name = "lora", .kind = ST_KEY_SECTION, .off = SOFF(finetune, lora), .sub = lora_keys},
    {.name = "qlora", .kind = ST_KEY_SECTION, .off = SOFF(finetune, qlora), .sub = qlora_keys},
    {.name = "prompt", .kind = ST_KEY_SECTION, .off = SOFF(finetune, prompt), .sub = prompt_keys},
    {.name = "prefix", .kind = ST_KEY_SECTION, .off = SOFF(finetune, prefix), .sub = prefix_keys},
    {0},
};

static const st_key distill_keys[] = {
    KEY_STR("teacher", SOFF(distill, teacher), ST_CFG_PATH_MAX),
    KEY_F64("temperature", SOFF(distill, temperature), 0, 0, ST_KEY_LO_OPEN | NO_HI),
    KEY_F64("alpha", SOFF(distill, alpha), 0, 1, 0),
    KEY_ENUM("teacher_dtype", SOFF(distill, teacher_dtype), teacher_dtype_names),
    {0},
};

static const st_key sharding_keys[] = {
    KEY_I32("stage", SOFF(sharding, stage), 0, 3, 0),
    {.name = "overlap", .kind = ST_KEY_BOOL, .off = SOFF(sharding, overlap)},
    KEY_F64("bucket_mb", SOFF(sharding, bucket_mb), 0, 0, ST_KEY_LO_OPEN | NO_HI),
    {0},
};

static const st_key memory_keys[] = {
    {.name = "activation_checkpointing", .kind = ST_KEY_BOOL, .off = SOFF(memory, activation_checkpointing)},
    KEY_ENUM("checkpoint_dtype", SOFF(memory, checkpoint_dtype), precision_names),
    {0},
};

static const st_key task_keys[] = {
    KEY_STR("name", offsetof(st_task_config, name), ST_CFG_NAME_MAX),
    KEY_STR("path", offsetof(st_task_config, path), ST_CFG_PATH_MAX),
    KEY_F64("weight", offsetof(st_task_config, weight), 0, 0, NO_HI),
    KEY_F64("loss_weight", offsetof(st_task_config, loss_weight), 0, 0, NO_HI),
    {0},
};

static const st_key mixing_keys[] = {
    KEY_ENUM("strategy", SOFF(mixing, strategy), mixing_names),
    KEY_F64("temperature", SOFF(mixing, temperature), 0, 0, ST_KEY_LO_OPEN | NO_HI),
    KEY_I64("cap", SOFF(mixing, cap), 0, 0, NO_HI),
    {0},
};

#define GOFF(field) (offsetof(st_config, eval.generate.field) - offsetof(st_config, eval.generate))
static const st_key eval_generate_keys[] = {
    KEY_I64("every_steps", GOFF(every_steps), 0, 0, NO_HI),
    KEY_STR("prompts", GOFF(prompts), ST_CFG_PATH_MAX),
    KEY_I32("max_new", GOFF(max_new), 1, 1 << 20, 0),
    KEY_F64("temperature", GOFF(temperature), 0, 1e6, 0),
    KEY_I32("batch", GOFF(batch), 1, 4096, 0),
    KEY_I64("seed", GOFF(seed), 0, 0, NO_HI),
    {.name = "chat", .kind = ST_KEY_BOOL, .off = GOFF(chat)},
    {0},
};

static const st_key eval_keys[] = {
    KEY_I64("every_steps", SOFF(eval, every_steps), 0, 0, NO_HI),
    KEY_I32("batches", SOFF(eval, batches), 1, 0, NO_HI),
    {.name = "generate", .kind = ST_KEY_SECTION, .off = SOFF(eval, generate), .sub = eval_generate_keys},
    {0},
};

static const st_key checkpoint_keys[] = {
    KEY_STR("dir", SOFF(checkpoint, dir), ST_CFG_PATH_MAX),
    KEY_I64("every_steps", SOFF(checkpoint, every_steps), 0, 0, NO_HI),
    KEY_I32("keep_last", SOFF(checkpoint, keep_last), 0, 0, NO_HI),
    {.name = "signal", .kind = ST_KEY_SIGNAL, .off = SOFF(checkpoint, signal)},
    KEY_I32("max_failures", SOFF(checkpoint, max_failures), 0, 0, NO_HI),
    {.name = "async", .kind = ST_KEY_BOOL, .off = SOFF(checkpoint, async)},
    {0},
};

static const st_key monitor_keys[] = {
    KEY_STR("publish", SOFF(monitor, publish), ST_CFG_PATH_MAX),
    KEY_STR("control", SOFF(monitor, control), ST_CFG_PATH_MAX),
    KEY_I32("heartbeat_ms", SOFF(monitor, heartbeat_ms), 1, 0, NO_HI),
    KEY_F64("stall_after_s", SOFF(monitor, stall_after_s), 0, 0, ST_KEY_LO_OPEN | NO_HI),
    {.name = "curve", .kind = ST_KEY_BOOL, .off = SOFF(monitor, curve)},
    {0},
};

const st_key st_config_root_keys[] = {
    KEY_SECTION("model", model, model_keys),
    KEY_STR("run_dir", offsetof(st_config, run_dir), ST_CFG_PATH_MAX),
    KEY_I64("seed", offsetof(st_config, seed), 0, 0, NO_HI),
    KEY_ENUM("backend", offsetof(st_config, backend), backend_names),
    KEY_I32("threads", offsetof(st_config, threads), 0, ST_MAX_THREADS, 0),
    KEY_ENUM("precision", offsetof(st_config, precision), precision_names),
    KEY_ENUM("loss_weighting", offsetof(st_config, loss_weighting), loss_weighting_names),
    KEY_F64("loss_weighting_lr", offsetof(st_config, loss_weighting_lr), 0, 0, ST_KEY_LO_OPEN | NO_HI),
    KEY_SECTION("train", train, train_keys),
    KEY_SECTION("finetune", finetune, finetune_keys),
    KEY_SECTION("distill", distill, distill_keys),
    KEY_SECTION("sharding", sharding, sharding_keys),
    KEY_SECTION("memory", memory, memory_keys),
    {.name = "tasks", .kind = ST_KEY_LIST, .off = offsetof(st_config, tasks), .size = sizeof(st_task_config),
     .count_off = offsetof(st_config, n_tasks), .max = ST_CFG_MAX_TASKS, .sub = task_keys,
     .elem_defaults = task_defaults},
    KEY_SECTION("mixing", mixing, mixing_keys),
    {.name = "split", .kind = ST_KEY_F64_LIST, .off = offsetof(st_config, split), .size = 3, .lo = 0, .hi = 1},
    KEY_SECTION("eval", eval, eval_keys),
    KEY_SECTION("checkpoint", checkpoint, checkpoint_keys),
    {.name = "resume", .kind = ST_KEY_RESUME, .off = offsetof(st_config, resume)},
    KEY_SECTION("monitor", monitor, monitor_keys),
    {0},
};

void st_config_defaults(st_config *c) {
    memset(c, 0, sizeof *c);
    strcpy(c->source, "<string>");
    c->seed = 1234;
    c->backend = ST_BACKEND_AUTO;
    c->threads = 0;
    c->precision = ST_PRECISION_FP32;
    c->loss_weighting = ST_LOSS_WEIGHTING_NONE;
    c->loss_weighting_lr = 0.01;

    c->train.steps = 0; /* not given: 1000 unless train.epochs is (config.c finish) */
    c->train.micro_batch = 4;
    c->train.grad_accum = 1;
    c->train.seq_len = 512;
    c->train.lr = 2.0e-5;
    c->train.schedule = ST_SCHED_COSINE;
    c->train.warmup_steps = 50;
    c->train.min_lr_ratio = 0.1;
    c->train.weight_decay = 0.0;
    c->train.betas[0] = 0.9;
    c->train.betas[1] = 0.95;
    c->train.eps = 1.0e-8;
    c->train.grad_clip = 1.0;
    c->train.log_every = 1;
    c->train.on_nonfinite = ST_NONFINITE_STOP;
    c->train.max_nonfinite_skips = 10;
    c->train.loss_spike = 0.0;
    c->train.collective_timeout_s = 600.0;

    c->finetune.mode = ST_FINETUNE_FULL;
    strcpy(c->finetune.train_layers, "-4");
    c->finetune.train_modules = ST_MOD_ALL;
    c->finetune.unfreeze_every = 0;
    c->finetune.layer_lr_decay = 1.0;
    c->finetune.lora.r = 16;
    c->finetune.lora.alpha = 32;
    c->finetune.lora.targets = ST_LORA_Q | ST_LORA_K | ST_LORA_V | ST_LORA_O | ST_LORA_GATE | ST_LORA_UP | ST_LORA_DOWN;
    strcpy(c->finetune.lora.layers, "all");
    c->finetune.qlora.double_quant = 1;
    c->finetune.qlora.block = 64;
    c->finetune.prompt.virtual_tokens = 20;
    c->finetune.prefix.virtual_tokens = 20;

    c->distill.temperature = 2.0;
    c->distill.alpha = 0.5;

    c->sharding.stage = 1;
    c->sharding.overlap = 1;
    c->sharding.bucket_mb = 4.0;

    c->mixing.strategy = ST_MIXING_PROPORTIONAL;
    c->mixing.temperature = 1.0;
    c->mixing.cap = 0;

    c->split[0] = 0.8;
    c->split[1] = 0.1;
    c->split[2] = 0.1;

    c->eval.every_steps = 100;
    c->eval.batches = 8;
    c->eval.generate.max_new = 64;
    c->eval.generate.batch = 8; /* generate's --batch default: the same answers as `shardtune generate` */
    c->eval.generate.seed = 1234;

    c->checkpoint.every_steps = 100;
    c->checkpoint.keep_last = 3;
    c->checkpoint.signal = SIGUSR1;
    c->checkpoint.max_failures = 3;
    c->checkpoint.async = 1;

    c->resume = ST_RESUME_AUTO;

    strcpy(c->monitor.publish, "tcp://127.0.0.1:*"); /* free ports: a second job on the host just works */
    strcpy(c->monitor.control, "tcp://127.0.0.1:*");
    c->monitor.heartbeat_ms = 500;
    c->monitor.stall_after_s = 30.0;
    c->monitor.curve = 0;
}

static const char *name_at(const char *const *names, int n, int i) { return i >= 0 && i < n ? names[i] : "?"; }

const char *st_backend_name(st_backend_kind k) { return name_at(backend_names, 3, (int)k); }
const char *st_precision_name(st_precision p) { return name_at(precision_names, 2, (int)p); }
const char *st_schedule_name(st_schedule k) { return name_at(schedule_names, 3, (int)k); }
const char *st_finetune_mode_name(st_finetune_mode m) { return name_at(mode_names, 8, (int)m); }
const char *st_mixing_name(st_mixing_strategy s) { return name_at(mixing_names, 3, (int)s); }
const char *st_loss_weighting_name(st_loss_weighting_kind k) { return name_at(loss_weighting_names, 2, (int)k); }
const char *st_nonfinite_name(st_nonfinite_policy p) { return name_at(nonfinite_names, 2, (int)p); }

const char *st_module_name(unsigned module_bit) {
    for (int i = 0; st_module_names[i]; i++)
        if (module_bit == (1u << i)) return st_module_names[i];
    return "?";
}
