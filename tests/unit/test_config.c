/* test_config.c — job configuration: defaults, full files, overrides, every error class, the
 * train_layers parser and the JSON dump. Expected values are written out here from DESIGN.md's
 * config reference, not taken from the code under test. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/error.h"
#include "coordinator/config/config.h"
#include "test_tmpdir.h"

static const char *MINIMAL = "model: {path: models/tiny}\n"
                             "tasks:\n"
                             "  - {name: qa, path: data/qa.h5}\n";


static void write_file(const char *path, const char *text) {
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

/* Asserts that the message contains `needle`, printing it when not. */
static void assert_msg_has(const char *needle) {
    if (!strstr(st_error(), needle)) fail_msg("message '%s' lacks '%s'", st_error(), needle);
}

/* Loads `yaml` (+ overrides), expects ST_ECONFIG and a message containing every given fragment. */
static void expect_error(const char *yaml, int n_over, char **over, const char *frag1, const char *frag2) {
    st_config c;
    int rc = st_config_load_string(&c, yaml, n_over, over);
    if (rc != ST_ECONFIG) fail_msg("expected ST_ECONFIG for:\n%s\ngot %d (%s)", yaml, rc, st_error());
    assert_msg_has("<string>");
    if (frag1) assert_msg_has(frag1);
    if (frag2) assert_msg_has(frag2);
}

/* The minimal config with some lines appended (as YAML text). */
static const char *with(const char *extra) {
    static char buf[4096];
    snprintf(buf, sizeof buf, "%s%s", MINIMAL, extra);
    return buf;
}

/* ---------- defaults ---------- */

static void test_defaults(void **state) {
    (void)state;
    st_config c;
    memset(&c, 0xAB, sizeof c);
    st_config_defaults(&c);
    assert_string_equal(c.model.path, "");
    assert_int_equal(c.seed, 1234);
    assert_int_equal(c.backend, ST_BACKEND_AUTO);
    assert_int_equal(c.threads, 0);
    assert_int_equal(c.precision, ST_PRECISION_FP32);
    assert_int_equal(c.loss_weighting, ST_LOSS_WEIGHTING_NONE);
    assert_int_equal(c.train.steps, 0); /* not given: loading makes it 1000 unless train.epochs is given */
    assert_true(c.train.epochs == 0);
    assert_int_equal(c.train.micro_batch, 4);
    assert_int_equal(c.train.grad_accum, 1);
    assert_int_equal(c.train.seq_len, 512);
    assert_true(c.train.lr == 2.0e-5);
    assert_int_equal(c.train.schedule, ST_SCHED_COSINE);
    assert_int_equal(c.train.warmup_steps, 50);
    assert_true(c.train.min_lr_ratio == 0.1);
    assert_true(c.train.weight_decay == 0.0);
    assert_true(c.train.betas[0] == 0.9 && c.train.betas[1] == 0.95);
    assert_true(c.train.eps == 1.0e-8);
    assert_true(c.train.grad_clip == 1.0);
    assert_int_equal(c.train.log_every, 1);
    assert_int_equal(c.finetune.mode, ST_FINETUNE_FULL);
    assert_string_equal(c.finetune.train_layers, "-4");
    assert_int_equal(c.finetune.train_modules,
                     ST_MOD_ATTN | ST_MOD_MLP | ST_MOD_NORM | ST_MOD_EMBED | ST_MOD_HEAD);
    assert_int_equal(c.finetune.n_stages, 0);
    assert_int_equal(c.finetune.unfreeze_every, 0);
    assert_true(c.finetune.layer_lr_decay == 1.0);
    assert_int_equal(c.sharding.stage, 1);
    assert_int_equal(c.n_tasks, 0);
    assert_int_equal(c.mixing.strategy, ST_MIXING_PROPORTIONAL);
    assert_true(c.mixing.temperature == 1.0);
    assert_int_equal(c.mixing.cap, 0);
    assert_true(c.split[0] == 0.8 && c.split[1] == 0.1 && c.split[2] == 0.1);
    assert_int_equal(c.eval.every_steps, 100);
    assert_int_equal(c.eval.batches, 8);
    assert_string_equal(c.checkpoint.dir, "");
    assert_int_equal(c.checkpoint.every_steps, 100);
    assert_int_equal(c.checkpoint.keep_last, 3);
    assert_int_equal(c.checkpoint.signal, SIGUSR1);
    assert_int_equal(c.resume, ST_RESUME_AUTO);
    assert_string_equal(c.monitor.publish, "tcp://127.0.0.1:*");
    assert_string_equal(c.monitor.control, "tcp://127.0.0.1:*");
    assert_int_equal(c.monitor.heartbeat_ms, 500);
    assert_true(c.monitor.stall_after_s == 30.0);
    assert_int_equal(c.monitor.curve, 0);
}

static void test_minimal_derived(void **state) {
    (void)state;
    st_config c;
    const char *yaml = "model: {path: models/tiny}\ntasks:\n  - {path: data/web-text.v2.h5}\n";
    assert_int_equal(st_config_load_string(&c, yaml, 0, NULL), 0);
    assert_string_equal(c.model.path, "models/tiny");
    assert_string_equal(c.run_dir, "runs/job");
    assert_string_equal(c.checkpoint.dir, "runs/job/checkpoints");
    assert_int_equal(c.n_tasks, 1);
    assert_string_equal(c.tasks[0].name, "web-text.v2");
    assert_true(c.tasks[0].weight == 1.0 && c.tasks[0].loss_weight == 1.0);
    assert_int_equal(c.train.steps, 1000); /* untouched defaults survive */
}

/* train.epochs instead of train.steps: exactly one; the JSON dump leaves out the one not given and
 * loads back to the same struct. */
static void test_epochs(void **state) {
    (void)state;
    st_config c, back;
    char *json = NULL;
    const char *yaml = "model: {path: m}\ntasks: [{path: d.h5}]\ntrain: {epochs: 2.5}\n";
    assert_int_equal(st_config_load_string(&c, yaml, 0, NULL), 0);
    assert_true(c.train.epochs == 2.5);
    assert_int_equal(c.train.steps, 0); /* resolved by the trainer from the data */
    assert_int_equal(st_config_to_json(&c, &json), 0);
    assert_null(strstr(json, "\"steps\""));
    assert_non_null(strstr(json, "\"epochs\": 2.5"));
    assert_int_equal(st_config_load_string(&back, json, 0, NULL), 0);
    assert_true(back.train.epochs == 2.5 && back.train.steps == 0);
    free(json);
    assert_int_equal(st_config_load_string(&c, "model: {path: m}\ntasks: [{path: d.h5}]\n", 0, NULL), 0);
    assert_int_equal(c.train.steps, 1000);
    assert_true(c.train.epochs == 0);
    assert_int_equal(st_config_to_json(&c, &json), 0);
    assert_null(strstr(json, "\"epochs\""));
    free(json);
    char *o1[] = {"train.epochs=1"};
    expect_error("model: {path: m}\ntasks: [{path: d.h5}]\ntrain: {steps: 10}\n", 1, o1,
                 "train.steps and train.epochs are both given", "exactly one");
    char *o2[] = {"train.epochs=0"};
    expect_error("model: {path: m}\ntasks: [{path: d.h5}]\n", 1, o2, "train.epochs", NULL);
}

/* ---------- a full file ---------- */

static const char *FULL =
    "# every key, none at its default\n"
    "model:    { path: /models/llama-tiny }\n"
    "run_dir:  runs/full-test\n"
    "seed:     42\n"
    "backend:  cpu\n"
    "threads:  2\n"
    "precision: bf16\n"
    "loss_weighting: uncertainty\n"
    "train:\n"
    "  steps: 500\n"
    "  micro_batch: 2\n"
    "  grad_accum: 3\n"
    "  seq_len: 128\n"
    "  lr: 3.0e-4\n"
    "  schedule: linear\n"
    "  warmup_steps: 10\n"
    "  min_lr_ratio: 0.05\n"
    "  weight_decay: 0.01\n"
    "  betas: [0.8, 0.99]\n"
    "  eps: 1.0e-6\n"
    "  grad_clip: 0.5\n"
    "  log_every: 5\n"
    "finetune:\n"
    "  mode: progressive\n"
    "  train_layers: \"0-3,10-11\"\n"
    "  train_modules: [attn, mlp, head]\n"
    "  stages:\n"
    "    - {at_step: 0, train_layers: \"-2\"}\n"
    "    - {at_step: 200, train_layers: \"-6\", train_modules: [attn, norm]}\n"
    "  unfreeze_every: 0\n"
    "  layer_lr_decay: 0.9\n"
    "sharding: { stage: 2 }\n"
    "tasks:\n"
    "  - { name: qa, path: data/qa.h5, weight: 1.0, loss_weight: 0.5 }\n"
    "  - name: summ\n"
    "    path: data/summ.h5\n"
    "    loss_weight: 3\n"
    "mixing:   { strategy: temperature, temperature: 2.5, cap: 1000 }\n"
    "split:    [0.7, 0.2, 0.1]\n"
    "eval:     { every_steps: 25, batches: 4 }\n"
    "checkpoint: { dir: /scratch/ckpt, every_steps: 50, keep_last: 2, signal: USR2 }\n"
    "resume:   none\n"
    "monitor:  { publish: \"tcp://0.0.0.0:6000\", control: \"tcp://0.0.0.0:6001\", heartbeat_ms: 250,"
    " stall_after_s: 12.5, curve: true }\n";

static void check_full(const st_config *c) {
    assert_string_equal(c->model.path, "/models/llama-tiny");
    assert_string_equal(c->run_dir, "runs/full-test");
    assert_int_equal(c->seed, 42);
    assert_int_equal(c->backend, ST_BACKEND_CPU);
    assert_int_equal(c->threads, 2);
    assert_int_equal(c->precision, ST_PRECISION_BF16);
    assert_int_equal(c->loss_weighting, ST_LOSS_WEIGHTING_UNCERTAINTY);
    assert_int_equal(c->train.steps, 500);
    assert_int_equal(c->train.micro_batch, 2);
    assert_int_equal(c->train.grad_accum, 3);
    assert_int_equal(c->train.seq_len, 128);
    assert_true(c->train.lr == 3.0e-4);
    assert_int_equal(c->train.schedule, ST_SCHED_LINEAR);
    assert_int_equal(c->train.warmup_steps, 10);
    assert_true(c->train.min_lr_ratio == 0.05);
    assert_true(c->train.weight_decay == 0.01);
    assert_true(c->train.betas[0] == 0.8 && c->train.betas[1] == 0.99);
    assert_true(c->train.eps == 1.0e-6);
    assert_true(c->train.grad_clip == 0.5);
    assert_int_equal(c->train.log_every, 5);
    assert_int_equal(c->finetune.mode, ST_FINETUNE_PROGRESSIVE);
    assert_string_equal(c->finetune.train_layers, "0-3,10-11");
    assert_int_equal(c->finetune.train_modules, ST_MOD_ATTN | ST_MOD_MLP | ST_MOD_HEAD);
    assert_int_equal(c->finetune.n_stages, 2);
    assert_int_equal(c->finetune.stages[0].at_step, 0);
    assert_string_equal(c->finetune.stages[0].train_layers, "-2");
    /* a stage without train_modules inherits finetune.train_modules */
    assert_int_equal(c->finetune.stages[0].train_modules, ST_MOD_ATTN | ST_MOD_MLP | ST_MOD_HEAD);
    assert_int_equal(c->finetune.stages[1].at_step, 200);
    assert_string_equal(c->finetune.stages[1].train_layers, "-6");
    assert_int_equal(c->finetune.stages[1].train_modules, ST_MOD_ATTN | ST_MOD_NORM);
    assert_int_equal(c->finetune.unfreeze_every, 0);
    assert_true(c->finetune.layer_lr_decay == 0.9);
    assert_int_equal(c->sharding.stage, 2);
    assert_int_equal(c->n_tasks, 2);
    assert_string_equal(c->tasks[0].name, "qa");
    assert_string_equal(c->tasks[0].path, "data/qa.h5");
    assert_true(c->tasks[0].weight == 1.0 && c->tasks[0].loss_weight == 0.5); /* weight: mixing.strategy weights only */
    assert_string_equal(c->tasks[1].name, "summ");
    assert_string_equal(c->tasks[1].path, "data/summ.h5");
    assert_true(c->tasks[1].weight == 1.0 && c->tasks[1].loss_weight == 3.0);
    assert_int_equal(c->mixing.strategy, ST_MIXING_TEMPERATURE);
    assert_true(c->mixing.temperature == 2.5);
    assert_int_equal(c->mixing.cap, 1000);
    assert_true(c->split[0] == 0.7 && c->split[1] == 0.2 && c->split[2] == 0.1);
    assert_int_equal(c->eval.every_steps, 25);
    assert_int_equal(c->eval.batches, 4);
    assert_string_equal(c->checkpoint.dir, "/scratch/ckpt");
    assert_int_equal(c->checkpoint.every_steps, 50);
    assert_int_equal(c->checkpoint.keep_last, 2);
    assert_int_equal(c->checkpoint.signal, SIGUSR2);
    assert_int_equal(c->resume, ST_RESUME_NONE);
    assert_string_equal(c->monitor.publish, "tcp://0.0.0.0:6000");
    assert_string_equal(c->monitor.control, "tcp://0.0.0.0:6001");
    assert_int_equal(c->monitor.heartbeat_ms, 250);
    assert_true(c->monitor.stall_after_s == 12.5);
    assert_int_equal(c->monitor.curve, 1);
}

static void test_full_file(void **state) {
    (void)state;
    char path[512];
    snprintf(path, sizeof path, "%s/full.yaml", st_test_dir);
    write_file(path, FULL);
    st_config c;
    int rc = st_config_load(&c, path, 0, NULL);
    if (rc) fail_msg("%s", st_error());
    check_full(&c);
    assert_string_equal(c.source, path);
}

static void test_run_dir_from_file_name(void **state) {
    (void)state;
    char path[512];
    snprintf(path, sizeof path, "%s/my-job.yaml", st_test_dir);
    write_file(path, MINIMAL);
    st_config c;
    assert_int_equal(st_config_load(&c, path, 0, NULL), 0);
    assert_string_equal(c.run_dir, "runs/my-job");
    assert_string_equal(c.checkpoint.dir, "runs/my-job/checkpoints");
}

/* ---------- overrides ---------- */

static void test_override_scalars(void **state) {
    (void)state;
    char *over[] = {"train.lr=3e-4", "monitor.curve=true", "resume=ckpts/step-100.h5", "run_dir=runs/x",
                    "finetune.mode=frozen", "checkpoint.signal=SIGTERM", " seed = 7 ", "monitor.publish="};
    st_config c;
    int rc = st_config_load_string(&c, MINIMAL, 8, over);
    if (rc) fail_msg("%s", st_error());
    assert_true(c.train.lr == 3e-4);
    assert_int_equal(c.monitor.curve, 1);
    assert_int_equal(c.resume, ST_RESUME_PATH);
    assert_string_equal(c.resume_path, "ckpts/step-100.h5");
    assert_string_equal(c.run_dir, "runs/x");
    assert_string_equal(c.checkpoint.dir, "runs/x/checkpoints"); /* derived after the overrides */
    assert_int_equal(c.finetune.mode, ST_FINETUNE_FROZEN);
    assert_int_equal(c.checkpoint.signal, SIGTERM);
    assert_int_equal(c.seed, 7);
    assert_string_equal(c.monitor.publish, "");
}

static void test_override_lists(void **state) {
    (void)state;
    char *over[] = {"train.betas=[0.9,0.99]", "split=[0.9, 0.05, 0.05]", "finetune.train_modules=[attn,mlp]",
                    "finetune.mode=progressive",
                    "finetune.stages=[{at_step: 0, train_layers: '-1'}, {at_step: 10, train_layers: all}]"};
    st_config c;
    int rc = st_config_load_string(&c, MINIMAL, 5, over);
    if (rc) fail_msg("%s", st_error());
    assert_true(c.train.betas[0] == 0.9 && c.train.betas[1] == 0.99);
    assert_true(c.split[0] == 0.9 && c.split[1] == 0.05 && c.split[2] == 0.05);
    assert_int_equal(c.finetune.train_modules, ST_MOD_ATTN | ST_MOD_MLP);
    assert_int_equal(c.finetune.n_stages, 2);
    assert_string_equal(c.finetune.stages[0].train_layers, "-1");
    assert_int_equal(c.finetune.stages[1].at_step, 10);
    assert_string_equal(c.finetune.stages[1].train_layers, "all");
    assert_int_equal(c.finetune.stages[1].train_modules, ST_MOD_ATTN | ST_MOD_MLP);
}

static void test_override_indexed(void **state) {
    (void)state;
    char *over[] = {"tasks.0.weight=2", "tasks.1.path=data/b.h5", "tasks.1.loss_weight=0.25", "train.betas.1=0.98",
                    "tasks.2={name: c, path: data/c.h5, weight: 3}", "mixing.strategy=weights"};
    st_config c;
    int rc = st_config_load_string(&c, MINIMAL, 6, over);
    if (rc) fail_msg("%s", st_error());
    assert_int_equal(c.n_tasks, 3);
    assert_string_equal(c.tasks[0].name, "qa");
    assert_true(c.tasks[0].weight == 2.0);
    assert_string_equal(c.tasks[1].name, "b"); /* appended task: name from the file */
    assert_true(c.tasks[1].weight == 1.0 && c.tasks[1].loss_weight == 0.25);
    assert_string_equal(c.tasks[2].name, "c");
    assert_true(c.tasks[2].weight == 3.0);
    assert_true(c.train.betas[0] == 0.9 && c.train.betas[1] == 0.98);

    /* replacing the whole list drops the file's tasks */
    char *replace[] = {"tasks=[{name: x, path: x.h5}]"};
    assert_int_equal(st_config_load_string(&c, MINIMAL, 1, replace), 0);
    assert_int_equal(c.n_tasks, 1);
    assert_string_equal(c.tasks[0].name, "x");
}

static void test_override_later_wins(void **state) {
    (void)state;
    char *over[] = {"train.steps=10", "train.steps=20"};
    st_config c;
    assert_int_equal(st_config_load_string(&c, with("train: {steps: 5}\n"), 2, over), 0);
    assert_int_equal(c.train.steps, 20);
}

static void test_override_errors(void **state) {
    (void)state;
    char *o1[] = {"train.lerning_rate=1e-4"};
    expect_error(MINIMAL, 1, o1, "unknown key 'train.lerning_rate'", "did you mean 'train.lr'?");
    assert_msg_has("override 'train.lerning_rate=1e-4'");
    char *o2[] = {"train.steps"};
    expect_error(MINIMAL, 1, o2, "override 'train.steps'", "dotted.key=value");
    char *o3[] = {"train.betas=[0.9,"};
    expect_error(MINIMAL, 1, o3, "train.betas=[0.9,", "malformed value");
    char *o4[] = {"train.steps=abc"};
    expect_error(MINIMAL, 1, o4, "train.steps: expected an integer in 1..2147483647, got 'abc'", NULL);
    char *o5[] = {"tasks.3.weight=2"};
    expect_error(MINIMAL, 1, o5, "tasks.3", "past the end");
    char *o6[] = {"tasks.0.wieght=2"};
    expect_error(MINIMAL, 1, o6, "unknown key 'tasks.0.wieght'", "did you mean 'tasks.0.weight'?");
    char *o7[] = {"train.lr.x=1"};
    expect_error(MINIMAL, 1, o7, "train.lr.x", "no sub-keys");
    char *o8[] = {"train.betas.2=0.5"};
    expect_error(MINIMAL, 1, o8, "train.betas.2", "out of range");
    char *o9[] = {"tasks.first.weight=1"};
    expect_error(MINIMAL, 1, o9, "tasks.first", "list index");
    char *o10[] = {"trian.steps=3"};
    expect_error(MINIMAL, 1, o10, "unknown key 'trian'", "did you mean 'train'?");
}

/* memory.checkpoint_dtype: fp32 (default) or bf16, bf16 only with activation checkpointing under precision bf16. */
static void test_checkpoint_dtype(void **state) {
    (void)state;
    st_config c;
    char *ok[] = {"memory.checkpoint_dtype=bf16", "memory.activation_checkpointing=true", "precision=bf16"};
    assert_int_equal(st_config_load_string(&c, MINIMAL, 3, ok), 0);
    assert_int_equal(c.memory.checkpoint_dtype, ST_PRECISION_BF16);
    assert_int_equal(st_config_load_string(&c, MINIMAL, 0, NULL), 0);
    assert_int_equal(c.memory.checkpoint_dtype, ST_PRECISION_FP32);
    char *no_ckpt[] = {"memory.checkpoint_dtype=bf16", "precision=bf16"};
    expect_error(MINIMAL, 2, no_ckpt, "memory.checkpoint_dtype", "memory.activation_checkpointing: true");
    char *fp32[] = {"memory.checkpoint_dtype=bf16", "memory.activation_checkpointing=true"};
    expect_error(MINIMAL, 2, fp32, "memory.checkpoint_dtype", "precision: bf16");
    char *bad[] = {"memory.checkpoint_dtype=fp16"};
    expect_error(MINIMAL, 1, bad, "memory.checkpoint_dtype", NULL);
}

/* ---------- error classes in files ---------- */

static void test_unknown_keys(void **state) {
    (void)state;
    expect_error(with("train:\n  lerning_rate: 1e-4\n"), 0, NULL, "unknown key 'train.lerning_rate'",
                 "(did you mean 'train.lr'?)");
    assert_msg_has("<string>:5:3:"); /* line:column of the key */
    expect_error(with("train:\n  stpes: 3\n"), 0, NULL, "unknown key 'train.stpes'", "did you mean 'train.steps'?");
    expect_error(with("trian: {steps: 3}\n"), 0, NULL, "unknown key 'trian'", "did you mean 'train'?");
    expect_error(with("mixing: {stratgy: weights}\n"), 0, NULL, "unknown key 'mixing.stratgy'",
                 "did you mean 'mixing.strategy'?");
    expect_error(with("train: {batch_size: 8}\n"), 0, NULL, "'train.batch_size'", "did you mean 'train.micro_batch'?");
    expect_error("model: {path: m}\ntasks: [{name: a, path: a.h5, lossweight: 2}]\n", 0, NULL,
                 "unknown key 'tasks.0.lossweight'", "did you mean 'tasks.0.loss_weight'?");
    /* nothing close: the valid keys of that section are listed instead */
    expect_error(with("train: {zzzzzzzzzz: 1}\n"), 0, NULL, "unknown key 'train.zzzzzzzzzz'",
                 "valid keys under 'train': steps, epochs, micro_batch");
    expect_error(with("finetune: {lora: {rank: 8}}\n"), 0, NULL, "unknown key 'finetune.lora.rank'", NULL);
    expect_error(with("finetune: {lora: {r: 0}}\n"), 0, NULL, "finetune.lora.r: expected a positive integer", "'0'");
    expect_error(with("finetune: {lora: {targets: [q_proj, qq_proj]}}\n"), 0, NULL, "finetune.lora.targets: unknown name",
                 "'qq_proj'");
    expect_error(with("finetune: {lora: {targets: []}}\n"), 0, NULL, "finetune.lora.targets: expected a non-empty list",
                 NULL);
    expect_error(with("finetune: {mode: lora, lora: {dropout: 1.0}}\n"), 0, NULL, "finetune.lora.dropout", NULL);
    expect_error(with("train: {steps: 3, steps: 4}\n"), 0, NULL, "duplicate key 'train.steps'", NULL);
}

static void test_type_errors(void **state) {
    (void)state;
    expect_error(with("train: {steps: abc}\n"), 0, NULL, "train.steps: expected an integer in 1..2147483647, got 'abc'", NULL);
    assert_msg_has("<string>:4:16:");
    expect_error(with("train: {steps: 1.5}\n"), 0, NULL, "train.steps: expected an integer in 1..2147483647", "'1.5'");
    expect_error(with("train: {steps: [1]}\n"), 0, NULL, "train.steps", "got a list");
    expect_error(with("train: {steps: }\n"), 0, NULL, "train.steps", "got nothing");
    expect_error(with("train: {lr: fast}\n"), 0, NULL, "train.lr: expected a number > 0, got 'fast'", NULL);
    expect_error(with("monitor: {curve: maybe}\n"), 0, NULL, "monitor.curve: expected true or false", "'maybe'");
    expect_error(with("train: 5\n"), 0, NULL, "train: expected a mapping", NULL);
    expect_error(with("train: {betas: 0.9}\n"), 0, NULL, "train.betas: expected a list of 2 numbers", NULL);
    expect_error(with("split: [0.5, 0.5]\n"), 0, NULL, "split: expected a list of 3 numbers", NULL);
    expect_error("model: {path: [a, b]}\ntasks: [{path: a.h5}]\n", 0, NULL, "model.path: expected a string", NULL);
    expect_error(with("finetune: {train_modules: [attn, ffn]}\n"), 0, NULL, "finetune.train_modules",
                 "unknown module 'ffn'");
    expect_error(with("finetune: {train_modules: []}\n"), 0, NULL, "finetune.train_modules", "non-empty list");
    expect_error("model: {path: m}\ntasks: {name: a}\n", 0, NULL, "tasks: expected a list", NULL);
    expect_error(with("seed: 99999999999999999999999\n"), 0, NULL, "seed: expected a non-negative integer", NULL);
    expect_error(with("train: {micro_batch: 4294967297}\n"), 0, NULL, "train.micro_batch", "positive integer");
    expect_error("- a\n- b\n", 0, NULL, "expected a mapping of keys at the top level", NULL);
}

static void test_range_errors(void **state) {
    (void)state;
    expect_error(with("train: {lr: 0}\n"), 0, NULL, "train.lr: expected a number > 0, got '0'", NULL);
    expect_error(with("train: {lr: -1e-4}\n"), 0, NULL, "train.lr", "> 0");
    expect_error(with("train: {micro_batch: 0}\n"), 0, NULL, "train.micro_batch: expected a positive integer", "'0'");
    expect_error(with("train: {seq_len: 1}\n"), 0, NULL, "train.seq_len: expected an integer >= 2", "'1'");
    expect_error(with("train: {betas: [0.9, 1.0]}\n"), 0, NULL, "train.betas.1: expected a number in [0, 1)", "'1.0'");
    expect_error(with("train: {betas: [-0.1, 0.9]}\n"), 0, NULL, "train.betas.0", "[0, 1)");
    expect_error(with("split: [0.8, 0.1, 0.05]\n"), 0, NULL, "split: the three fractions must sum to 1", NULL);
    expect_error(with("split: [0, 0.5, 0.5]\n"), 0, NULL, "split.0", "train fraction");
    expect_error(with("sharding: {stage: 4}\n"), 0, NULL, "sharding.stage: expected an integer in 0..3", "'4'");
    expect_error(with("sharding: {stage: -1}\n"), 0, NULL, "sharding.stage", "0..3");
    expect_error(with("finetune: {mode: soft_prompt}\n"), 0, NULL,
                 "finetune.mode: expected one of full, frozen, progressive, lora, qlora, prompt_tuning", "got 'soft_prompt'");
    expect_error(with("finetune: {mode: p_tuning, prompt: {encoder: gru}}\n"), 0, NULL, "finetune.prompt.encoder", NULL);
    expect_error(with("finetune: {mode: p_tuning, prompt: {init_text: hi}}\n"), 0, NULL, "finetune.prompt.init_text", NULL);
    expect_error(with("finetune: {mode: prompt_tuning, prompt: {virtual_tokens: 0}}\n"), 0, NULL,
                 "finetune.prompt.virtual_tokens", "'0'");
    expect_error(with("finetune: {mode: qlora, qlora: {quant: fp4}}\n"), 0, NULL,
                 "finetune.qlora.quant: expected one of nf4, int8", "'fp4'");
    expect_error(with("finetune: {mode: qlora, qlora: {block: 0}}\n"), 0, NULL, "finetune.qlora.block", "'0'");
    expect_error(with("finetune: {qlora: {bits: 4}}\n"), 0, NULL, "unknown key 'finetune.qlora.bits'", NULL);
    expect_error(with("backend: tpu\n"), 0, NULL, "backend: expected one of auto, cpu, cuda", "'tpu'");
    expect_error(with("precision: fp16\n"), 0, NULL, "precision: expected one of fp32, bf16", "'fp16'");
    expect_error(with("train: {schedule: step}\n"), 0, NULL, "train.schedule: expected one of constant, cosine, linear",
                 NULL);
    expect_error(with("mixing: {strategy: random}\n"), 0, NULL, "mixing.strategy: expected one of proportional, "
                 "temperature, weights", NULL);
    expect_error(with("loss_weighting: gradnorm\n"), 0, NULL, "loss_weighting: expected one of none, uncertainty",
                 NULL);
    expect_error(with("checkpoint: {signal: KILL}\n"), 0, NULL, "checkpoint.signal: expected one of none, USR1", NULL);
    expect_error(with("mixing: {temperature: 0}\n"), 0, NULL, "mixing.temperature", "> 0");
    expect_error(with("train: {min_lr_ratio: 1.5}\n"), 0, NULL, "train.min_lr_ratio", "[0, 1]");
    expect_error(with("threads: -2\n"), 0, NULL, "threads: expected an integer in 0..1024", NULL);
    /* issue 15: values that crashed or were cut later are refused here, naming the key */
    expect_error(with("threads: 100000\n"), 0, NULL, "threads: expected an integer in 0..1024, got '100000'", NULL);
    expect_error(with("train: {steps: 4294967299}\n"), 0, NULL, "train.steps: expected an integer in 1..2147483647",
                 "'4294967299'");
    expect_error(with("train: {micro_batch: 2147483647}\n"), 0, NULL, "train.micro_batch x train.seq_len", "over the limit");
    expect_error(with("train: {micro_batch: 4096, seq_len: 4096, grad_accum: 1000}\n"), 0, NULL,
                 "train.micro_batch x train.grad_accum x train.seq_len", "over the limit");
    expect_error(with("train: {on_nonfinite: ignore}\n"), 0, NULL, "train.on_nonfinite: expected one of stop, skip", NULL);
    expect_error(with("train: {eps: .nan}\n"), 0, NULL, "train.eps", NULL);
    expect_error(with("monitor: {control: \"tcp://127.0.0.1:5555\", publish: \"tcp://127.0.0.1:5555\"}\n"), 0, NULL,
                 "monitor.control", "must differ");
}

static void test_required_and_tasks(void **state) {
    (void)state;
    expect_error("tasks: [{path: a.h5}]\n", 0, NULL, "model.path is required", NULL);
    expect_error("model: {path: m}\n", 0, NULL, "tasks", "at least one task with a path");
    expect_error("model: {path: m}\ntasks: [{name: a}]\n", 0, NULL, "tasks.0.path is required", NULL);
    expect_error("model: {path: m}\ntasks: [{name: a, path: a.h5}, {name: a, path: b.h5}]\n", 0, NULL,
                 "tasks.1.name: duplicate task name 'a'", "tasks.0");
    /* two files with the same stem collide too */
    expect_error("model: {path: m}\ntasks: [{path: x/qa.h5}, {path: y/qa.h5}]\n", 0, NULL, "duplicate task name 'qa'",
                 NULL);
    expect_error("model: {path: m}\ntasks: [{name: 'a b', path: a.h5}]\n", 0, NULL, "tasks.0.name", "'a b'");
    expect_error("model: {path: m}\ntasks: [{path: a.h5, weight: 0}]\n", 0, NULL, "tasks", "weight");
    expect_error("", 0, NULL, "model.path is required", NULL);
}

static void test_finetune_errors(void **state) {
    (void)state;
    expect_error(with("finetune: {mode: progressive}\n"), 0, NULL, "progressive needs finetune.stages", NULL);
    expect_error(with("finetune: {mode: progressive, stages: [{at_step: 5, train_layers: '-1'}]}\n"), 0, NULL,
                 "finetune.stages.0.at_step", "step 0");
    expect_error(with("finetune: {mode: progressive, stages: [{at_step: 0, train_layers: '-1'},"
                      " {at_step: 0, train_layers: '-2'}]}\n"),
                 0, NULL, "finetune.stages.1.at_step", "increasing");
    expect_error(with("finetune: {mode: progressive, stages: [{at_step: 0}]}\n"), 0, NULL,
                 "finetune.stages.0.train_layers is required", NULL);
    expect_error(with("finetune: {mode: frozen, train_layers: '3-1'}\n"), 0, NULL, "finetune.train_layers",
                 "reversed range '3-1'");
    expect_error(with("finetune: {mode: frozen, train_layers: 'top4'}\n"), 0, NULL, "finetune.train_layers",
                 "malformed item 'top4'");
    expect_error(with("finetune: {mode: progressive, unfreeze_every: 10, stages: [{at_step: 0, train_layers: '-1'}]}\n"),
                 0, NULL, "not both", NULL);
    /* a layer choice in full mode would be ignored silently */
    expect_error(with("finetune: {mode: full, train_layers: '0-1'}\n"), 0, NULL,
                 "finetune.train_layers: '0-1' has no effect in finetune.mode full", "finetune.mode: frozen");
    expect_error(with("finetune: {unfreeze_every: 5}\n"), 0, NULL, "finetune.unfreeze_every has no effect in finetune.mode full", NULL);
    /* ... and in the adapter modes (the base stays frozen; lora.layers picks the adapted layers) */
    expect_error(with("finetune: {mode: lora, train_layers: '-1'}\n"), 0, NULL,
                 "finetune.train_layers: '-1' has no effect in finetune.mode lora", "finetune.lora.layers");
    expect_error(with("finetune: {mode: prompt_tuning, train_layers: '0'}\n"), 0, NULL,
                 "finetune.train_layers: '0' has no effect in finetune.mode prompt_tuning", NULL);
    /* keys another mode or mixing strategy never reads: refused by name, never silently ignored */
    expect_error(with("finetune: {mode: full, lora: {r: 8}}\n"), 0, NULL,
                 "finetune.lora.r has no effect in finetune.mode full", "finetune.mode lora or qlora");
    expect_error(with("finetune: {mode: prompt_tuning, lora: {targets: [q_proj]}}\n"), 0, NULL,
                 "finetune.lora.targets has no effect in finetune.mode prompt_tuning", NULL);
    expect_error(with("finetune: {mode: lora, qlora: {quant: int8}}\n"), 0, NULL,
                 "finetune.qlora.quant has no effect in finetune.mode lora", "finetune.mode qlora");
    expect_error(with("finetune: {mode: lora, prompt: {virtual_tokens: 4}}\n"), 0, NULL,
                 "finetune.prompt.virtual_tokens has no effect in finetune.mode lora", NULL);
    expect_error(with("finetune: {mode: prompt_tuning, prefix: {projection: true}}\n"), 0, NULL,
                 "finetune.prefix.projection has no effect in finetune.mode prompt_tuning", NULL);
    expect_error(with("finetune: {mode: prompt_tuning, prompt: {encoder: lstm}}\n"), 0, NULL,
                 "finetune.prompt.encoder has no effect in finetune.mode prompt_tuning", NULL);
    expect_error(with("finetune: {mode: lora, train_modules: [attn]}\n"), 0, NULL,
                 "finetune.train_modules has no effect in finetune.mode lora", "frozen or progressive");
    expect_error(with("mixing: {temperature: 2}\n"), 0, NULL,
                 "mixing.temperature has no effect in mixing.strategy proportional", NULL);
    expect_error(with("mixing: {strategy: weights, cap: 10}\n"), 0, NULL,
                 "mixing.cap has no effect in mixing.strategy weights", NULL);
    expect_error(with("distill: {alpha: 0.9}\n"), 0, NULL, "distill.alpha has no effect in a job without "
                 "distill.teacher", NULL);
    expect_error(with("distill: {temperature: 4}\n"), 0, NULL, "distill.temperature has no effect", NULL);
    expect_error(MINIMAL, 1, (char *[]){"tasks.0.weight=3"}, "tasks.0.weight has no effect in mixing.strategy "
                 "proportional", "mixing.strategy weights");
    /* eval.generate.* without eval.generate.every_steps: nothing is sampled, each key is refused by name */
    const char *gen[][2] = {{"max_new: 8", "max_new"}, {"temperature: 0.7", "temperature"}, {"batch: 2", "batch"},
                            {"seed: 3", "seed"}, {"chat: true", "chat"}, {"prompts: p.jsonl", "prompts"}};
    for (size_t i = 0; i < sizeof gen / sizeof gen[0]; i++) {
        char yaml[256], name[64];
        snprintf(yaml, sizeof yaml, "eval: {generate: {every_steps: 0, %s}}\n", gen[i][0]);
        snprintf(name, sizeof name, "eval.generate.%s has no effect", gen[i][1]);
        expect_error(with(yaml), 0, NULL, name, "set eval.generate.every_steps");
    }
    expect_error(with("eval: {generate: {every_steps: 4, prompts: p.jsonl, max_new: 8}}\n"), 1,
                 (char *[]){"eval.generate.every_steps=0"}, "eval.generate.prompts has no effect", NULL);
    {   /* turning sampling off from the command line: the keys back to their defaults too */
        st_config off;
        char *over[] = {"eval.generate.every_steps=0", "eval.generate.prompts=", "eval.generate.max_new=64"};
        if (st_config_load_string(&off, with("eval: {generate: {every_steps: 4, prompts: p.jsonl, max_new: 8}}\n"), 3,
                                  over))
            fail_msg("sampling off by overrides: %s", st_error());
    }
    /* ... and each read where its mode uses it; a dump of every key reloads (defaults are not "set") */
    st_config c;
    const char *fine[] = {"finetune: {mode: qlora, lora: {r: 4}, qlora: {quant: int8}}\n",
                          "finetune: {mode: p_tuning, prompt: {virtual_tokens: 3, encoder: lstm}}\n",
                          "finetune: {mode: prefix_tuning, prefix: {virtual_tokens: 3}}\n",
                          "finetune: {mode: frozen, train_modules: [attn]}\n",
                          "mixing: {strategy: temperature, temperature: 2, cap: 5}\n",
                          "mixing: {strategy: weights, temperature: 1}\n",
                          "distill: {teacher: t, temperature: 4, alpha: 0.9}\n",
                          "eval: {generate: {every_steps: 5, prompts: p.jsonl, max_new: 8, temperature: 0.7, batch: 2, "
                          "seed: 3, chat: true}}\n",
                          "finetune: {mode: full, lora: {r: 16}}\nmixing: {temperature: 1.0}\n"};
    for (size_t i = 0; i < sizeof fine / sizeof fine[0]; i++) {
        if (st_config_load_string(&c, with(fine[i]), 0, NULL)) fail_msg("%s: %s", fine[i], st_error());
        char *json = NULL;
        assert_int_equal(st_config_to_json(&c, &json), 0);
        if (st_config_load_string(&c, json, 0, NULL)) fail_msg("dump of %s: %s", fine[i], st_error());
        free(json);
    }
    /* progressive with the shorthand alone is fine */
    assert_int_equal(st_config_load_string(&c, with("finetune: {mode: progressive, unfreeze_every: 10}\n"), 0, NULL), 0);
    assert_int_equal(c.finetune.unfreeze_every, 10);
}

static void test_malformed_yaml(void **state) {
    (void)state;
    expect_error(with("train: {steps: 3\n"), 0, NULL, "malformed YAML", NULL);
    expect_error("model:\n  path: m\n bad: [\n", 0, NULL, "<string>:3:", "malformed YAML");
    expect_error(with("---\nseed: 3\n"), 0, NULL, "more than one YAML document", NULL);
    expect_error("model: {path: m}\ntasks:\n\t- {path: a.h5}\n", 0, NULL, "malformed YAML", NULL);
}

static void test_file_errors(void **state) {
    (void)state;
    st_config c;
    char path[512];
    snprintf(path, sizeof path, "%s/does-not-exist.yaml", st_test_dir);
    assert_int_equal(st_config_load(&c, path, 0, NULL), ST_EIO);
    assert_msg_has("does-not-exist.yaml");
    assert_int_equal(st_config_load(&c, st_test_dir, 0, NULL), ST_EIO);
    assert_msg_has("not a regular file");

    snprintf(path, sizeof path, "%s/job.yaml", st_test_dir);
    write_file(path, "model: {path: m}\ntasks: [{path: a.h5}]\ntrain:\n  lerning_rate: 1\n");
    assert_int_equal(st_config_load(&c, path, 0, NULL), ST_ECONFIG);
    assert_msg_has(path);
    assert_msg_has(":4:3: unknown key 'train.lerning_rate' (did you mean 'train.lr'?)");

    char *over[] = {"eval.batchs=3"};
    write_file(path, MINIMAL);
    assert_int_equal(st_config_load(&c, path, 1, over), ST_ECONFIG);
    assert_msg_has(path);
    assert_msg_has("did you mean 'eval.batches'?");
}

/* ---------- layer ranges ---------- */

static void check_mask(const char *spec, int n, const char *expect) {
    unsigned char mask[64];
    memset(mask, 7, sizeof mask);
    int rc = st_parse_layer_ranges(spec, n, mask);
    if (rc) fail_msg("'%s' with %d layers: %s", spec, n, st_error());
    for (int i = 0; i < n; i++)
        if (mask[i] != (unsigned char)(expect[i] - '0')) fail_msg("'%s': layer %d is %d, want %c", spec, i, mask[i], expect[i]);
    assert_int_equal(mask[n], 7); /* nothing written past n_layers */
}

static void check_layer_error(const char *spec, int n, const char *fragment) {
    unsigned char mask[64];
    assert_int_equal(st_parse_layer_ranges(spec, n, mask), ST_ECONFIG);
    assert_msg_has(fragment);
}

static void test_layer_ranges(void **state) {
    (void)state;
    check_mask("0-3,10-11", 12, "111100000011");
    check_mask("-4", 12, "000000001111");
    check_mask("-4", 4, "1111");
    check_mask("all", 5, "11111");
    check_mask(" all ", 3, "111");
    check_mask("none", 3, "000");
    check_mask("5", 8, "00000100");
    check_mask("2, 0 ,7", 8, "10100001");
    check_mask("1-2,2-3", 5, "01110");   /* overlap is a union */
    check_mask("3-3", 5, "00010");
    check_mask("0,-1", 4, "1001");
    check_layer_error("12", 12, "layer 12 is out of range");
    check_layer_error("10-12", 12, "0-11");
    check_layer_error("-5", 4, "last 5 layers but the model has 4");
    check_layer_error("3-1", 8, "reversed range '3-1'");
    check_layer_error("", 8, "empty");
    check_layer_error("1,,2", 8, "empty item");
    check_layer_error("1,", 8, "empty item");
    check_layer_error("a", 8, "malformed item 'a'");
    check_layer_error("1-", 8, "malformed");
    check_layer_error("1--2", 8, "malformed");
    check_layer_error("-0", 8, "'-0'");
    check_layer_error("- 2", 8, "malformed");
    check_layer_error("1.5", 8, "malformed");
    check_layer_error("99999999999", 8, "malformed");
    /* syntax only: no model, no mask */
    assert_int_equal(st_parse_layer_ranges("0-100,-40", -1, NULL), 0);
    assert_int_equal(st_parse_layer_ranges("4-2", -1, NULL), ST_ECONFIG);
}

/* ---------- JSON ---------- */

/* A small JSON syntax checker (RFC 8259 subset that matters here): returns the end or NULL. */
static const char *json_value(const char *p, int depth);
static const char *json_ws(const char *p) {
    while (*p == ' ' || *p == '\n' || *p == '\t' || *p == '\r') p++;
    return p;
}
static const char *json_string(const char *p) {
    if (*p++ != '"') return NULL;
    while (*p && *p != '"') {
        if ((unsigned char)*p < 0x20) return NULL;
        if (*p == '\\') {
            p++;
            if (*p == 'u') {
                for (int i = 1; i <= 4; i++)
                    if (!strchr("0123456789abcdefABCDEF", p[i]) || !p[i]) return NULL;
                p += 4;
            } else if (!*p || !strchr("\"\\/bfnrt", *p)) {
                return NULL;
            }
        }
        p++;
    }
    return *p == '"' ? p + 1 : NULL;
}
static const char *json_number(const char *p) {
    const char *s = p;
    if (*p == '-') p++;
    if (*p == '0') p++;
    else if (*p >= '1' && *p <= '9') while (*p >= '0' && *p <= '9') p++;
    else return NULL;
    if (*p == '.') { p++; if (!(*p >= '0' && *p <= '9')) return NULL; while (*p >= '0' && *p <= '9') p++; }
    if (*p == 'e' || *p == 'E') {
        p++;
        if (*p == '+' || *p == '-') p++;
        if (!(*p >= '0' && *p <= '9')) return NULL;
        while (*p >= '0' && *p <= '9') p++;
    }
    return p > s ? p : NULL;
}
static const char *json_value(const char *p, int depth) {
    p = json_ws(p);
    if (depth > 20) return NULL;
    if (*p == '{' || *p == '[') {
        char close = *p == '{' ? '}' : ']';
        int object = *p == '{';
        p = json_ws(p + 1);
        if (*p == close) return p + 1;
        for (;;) {
            if (object) {
                p = json_string(json_ws(p));
                if (!p) return NULL;
                p = json_ws(p);
                if (*p++ != ':') return NULL;
            }
            p = json_value(p, depth + 1);
            if (!p) return NULL;
            p = json_ws(p);
            if (*p == close) return p + 1;
            if (*p++ != ',') return NULL;
        }
    }
    if (*p == '"') return json_string(p);
    if (!strncmp(p, "true", 4)) return p + 4;
    if (!strncmp(p, "false", 5)) return p + 5;
    if (!strncmp(p, "null", 4)) return p + 4;
    return json_number(p);
}
static int json_valid(const char *text) {
    const char *end = json_value(text, 0);
    return end && *json_ws(end) == 0;
}

static void test_json_checker_rejects(void **state) {
    (void)state; /* the checker itself must be able to fail */
    assert_true(json_valid("{\"a\": [1, 2.5e-3, \"x\\u0001\"], \"b\": {}}"));
    assert_false(json_valid("{\"a\": 1,}"));
    assert_false(json_valid("{a: 1}"));
    assert_false(json_valid("{\"a\": 01x}"));
    assert_false(json_valid("[1, 2"));
}

static void test_json_dump(void **state) {
    (void)state;
    st_config c;
    int rc = st_config_load_string(&c, FULL, 0, NULL);
    if (rc) fail_msg("%s", st_error());
    char *json = NULL;
    assert_int_equal(st_config_to_json(&c, &json), 0);
    assert_non_null(json);
    if (!json_valid(json)) fail_msg("not valid JSON: %s", json);
    const char *must[] = {"\"model\": {\"path\": \"/models/llama-tiny\"}", "\"seed\": 42", "\"backend\": \"cpu\"",
                          "\"threads\": 2", "\"precision\": \"bf16\"", "\"loss_weighting\": \"uncertainty\"", "\"lr\": 0.0003",
                          "\"betas\": [0.8, 0.99]", "\"log_every\": 5", "\"mode\": \"progressive\"",
                          "\"train_modules\": [\"attn\", \"mlp\", \"head\"]",
                          "{\"at_step\": 200, \"train_layers\": \"-6\", \"train_modules\": [\"attn\", \"norm\"]}",
                          "\"sharding\": {\"stage\": 2, \"overlap\": true, \"bucket_mb\": 4}",
                          "{\"name\": \"qa\", \"path\": \"data/qa.h5\", \"weight\": 1, \"loss_weight\": 0.5}",
                          "\"split\": [0.7, 0.2, 0.1]", "\"eval\": {\"every_steps\": 25, \"batches\": 4, \"generate\": {\"every_steps\": 0, \"prompts\": \"\", \"max_new\": 64, \"temperature\": 0, \"batch\": 8, \"seed\": 1234, \"chat\": false}}",
                          "\"signal\": \"USR2\"", "\"resume\": \"none\"", "\"curve\": true",
                          "\"stall_after_s\": 12.5", "\"cap\": 1000", "\"run_dir\": \"runs/full-test\""};
    for (size_t i = 0; i < sizeof must / sizeof must[0]; i++)
        if (!strstr(json, must[i])) fail_msg("JSON lacks %s:\n%s", must[i], json);

    /* The dump is a complete config: loading it gives the same values and the same dump. */
    st_config back;
    rc = st_config_load_string(&back, json, 0, NULL);
    if (rc) fail_msg("reloading the dump: %s\n%s", st_error(), json);
    check_full(&back);
    char *json2 = NULL;
    assert_int_equal(st_config_to_json(&back, &json2), 0);
    assert_string_equal(json, json2);
    free(json);
    free(json2);
}

static void test_json_escapes_and_defaults(void **state) {
    (void)state;
    st_config c;
    const char *yaml = "model: {path: \"odd \\\"dir\\\"\\\\x\\ty\"}\ntasks: [{path: a.h5}]\nresume: \"ckpt/auto 1\"\n";
    int rc = st_config_load_string(&c, yaml, 0, NULL);
    if (rc) fail_msg("%s", st_error());
    assert_string_equal(c.model.path, "odd \"dir\"\\x\ty");
    char *json = NULL;
    assert_int_equal(st_config_to_json(&c, &json), 0);
    if (!json_valid(json)) fail_msg("not valid JSON: %s", json);
    assert_non_null(strstr(json, "\"path\": \"odd \\\"dir\\\"\\\\x\\u0009y\""));
    assert_non_null(strstr(json, "\"lr\": 2e-05"));
    assert_non_null(strstr(json, "\"dir\": \"runs/job/checkpoints\""));
    assert_non_null(strstr(json, "\"resume\": \"ckpt/auto 1\""));
    st_config back;
    assert_int_equal(st_config_load_string(&back, json, 0, NULL), 0);
    assert_string_equal(back.model.path, c.model.path);
    assert_true(back.train.lr == c.train.lr && back.train.eps == c.train.eps);
    assert_int_equal(back.resume, ST_RESUME_PATH);
    assert_string_equal(back.resume_path, "ckpt/auto 1");
    free(json);
}

/* Every prefix and many byte mutations of a full file: each load either succeeds or fails with a
 * message; none crashes (run under ASan/UBSan during development). */
static void test_truncated_and_mutated(void **state) {
    (void)state;
    size_t n = strlen(FULL);
    char *buf = malloc(n + 1);
    assert_non_null(buf);
    st_config c;
    for (size_t len = 0; len <= n; len++) {
        memcpy(buf, FULL, len);
        buf[len] = 0;
        int rc = st_config_load_string(&c, buf, 0, NULL);
        assert_true(rc == 0 || (rc == ST_ECONFIG && st_error()[0]));
    }
    static const char bytes[] = "{}[],:-#'\"\n \t&*!|>%@`0a.";
    unsigned seed = 12345;
    for (int trial = 0; trial < 3000; trial++) {
        memcpy(buf, FULL, n + 1);
        for (int m = 0; m < 3; m++) {
            seed = seed * 1103515245u + 12345u;
            size_t at = (seed >> 8) % n;
            seed = seed * 1103515245u + 12345u;
            buf[at] = bytes[(seed >> 8) % (sizeof bytes - 1)];
        }
        int rc = st_config_load_string(&c, buf, 0, NULL);
        assert_true(rc == 0 || (rc == ST_ECONFIG && st_error()[0]));
    }
    free(buf);
}

/* Every ```yaml example in docs/config.md must load (with the full example checked value by value
 * against the defaults). */
static void test_docs_examples(void **state) {
    (void)state;
    const char *src = getenv("ST_SOURCE_DIR");
    if (!src) fail_msg("ST_SOURCE_DIR is not set (ctest sets it): docs/config.md cannot be found");
    char path[1024];
    snprintf(path, sizeof path, "%s/docs/config.md", src);
    FILE *f = fopen(path, "r");
    assert_non_null(f);
    static char doc[65536], block[16384];
    size_t n = fread(doc, 1, sizeof doc - 1, f);
    fclose(f);
    doc[n] = 0;
    int examples = 0;
    for (const char *p = strstr(doc, "```yaml\n"); p; p = strstr(p, "```yaml\n")) {
        p += 8;
        const char *end = strstr(p, "```");
        assert_non_null(end);
        assert_true((size_t)(end - p) < sizeof block);
        memcpy(block, p, (size_t)(end - p));
        block[end - p] = 0;
        st_config c, d;
        int rc = st_config_load_string(&c, block, 0, NULL);
        if (rc) fail_msg("docs example %d: %s\n%s", examples, st_error(), block);
        if (examples == 0) { /* "every key at its default" */
            char *over[] = {"run_dir=runs/full"};
            assert_int_equal(st_config_load_string(&d, "model: {path: models/llama-tiny}\ntasks: [{path: data/qa.h5}]\n",
                                                   1, over), 0);
            char *a, *b;
            assert_int_equal(st_config_to_json(&c, &a), 0);
            assert_int_equal(st_config_to_json(&d, &b), 0);
            assert_string_equal(a, b);
            free(a);
            free(b);
        }
        examples++;
        p = end + 3;
    }
    assert_int_equal(examples, 4);
}

static void test_names(void **state) {
    (void)state;
    assert_string_equal(st_schedule_name(ST_SCHED_LINEAR), "linear");
    assert_string_equal(st_finetune_mode_name(ST_FINETUNE_PROGRESSIVE), "progressive");
    assert_string_equal(st_backend_name(ST_BACKEND_CUDA), "cuda");
    assert_string_equal(st_precision_name(ST_PRECISION_BF16), "bf16");
    assert_string_equal(st_precision_name(ST_PRECISION_FP32), "fp32");
    assert_string_equal(st_mixing_name(ST_MIXING_WEIGHTS), "weights");
    assert_string_equal(st_loss_weighting_name(ST_LOSS_WEIGHTING_UNCERTAINTY), "uncertainty");
    assert_string_equal(st_module_name(ST_MOD_EMBED), "embed");
    assert_string_equal(st_module_name(3), "?");
    assert_string_equal(st_signal_name(SIGUSR1), "USR1");
    assert_string_equal(st_signal_name(0), "none");
    assert_string_equal(st_schedule_name((st_schedule)9), "?");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults),
        cmocka_unit_test(test_minimal_derived),
        cmocka_unit_test(test_full_file),
        cmocka_unit_test(test_run_dir_from_file_name),
        cmocka_unit_test(test_override_scalars),
        cmocka_unit_test(test_override_lists),
        cmocka_unit_test(test_override_indexed),
        cmocka_unit_test(test_override_later_wins),
        cmocka_unit_test(test_override_errors),
        cmocka_unit_test(test_checkpoint_dtype),
        cmocka_unit_test(test_unknown_keys),
        cmocka_unit_test(test_type_errors),
        cmocka_unit_test(test_range_errors),
        cmocka_unit_test(test_required_and_tasks),
        cmocka_unit_test(test_finetune_errors),
        cmocka_unit_test(test_malformed_yaml),
        cmocka_unit_test(test_file_errors),
        cmocka_unit_test(test_layer_ranges),
        cmocka_unit_test(test_json_checker_rejects),
        cmocka_unit_test(test_json_dump),
        cmocka_unit_test(test_json_escapes_and_defaults),
        cmocka_unit_test(test_truncated_and_mutated),
        cmocka_unit_test(test_docs_examples),
        cmocka_unit_test(test_names),
        cmocka_unit_test(test_epochs),
    };
    return cmocka_run_group_tests(tests, st_test_dir_setup, st_test_dir_teardown);
}
