/* plan.c — stage schedule, shard map and per-rank memory (see plan.h).
 *
 * The byte counts follow the allocations of the code that runs, not a model of it: st_model_build
 * (weights), st_model_set_trainable (gradients padded to the world), st_comm_init (staging),
 * st_optim_init (moments over the optimizer range), st_model_activation_floats (activations) and
 * train.c's alloc_step_buffers / worker/comm.c's st_comm_reshard_optim. If one of those changes, change it
 * here too (tests/reference/test_dp_memory.py compares the total with a real run's RSS). */
#include "coordinator/trainer/plan.h"

#include "shardtune.pb-c.h"

#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <string.h>

#include "checkpoints/model_dir.h"
#include "common/error.h"
#include "common/util.h"
#include "worker/comm.h"
#include "worker/comm_zero2_dev.h"
#include "worker/comm_zero3_dev.h"
#include "worker/comm_zero3_teacher_dev.h"
#include "worker/lora.h"
#include "text/tokenizer.h"
#include "worker/prompt.h"
#include "worker/qlora.h"

/* ---------------- adapters ---------------- */

static int attach_prompt(const st_config *c, st_model *m) {
    int prefix = c->finetune.mode == ST_FINETUNE_PREFIX_TUNING;
    const char *mode = st_config_prompt_learning(c);
    /* sharding.stage 3: the prompt (P-tuning's encoder, prefix tuning's table or projection) is the
     * trainable (sharded) set; worker/model.c acquires it around the prompt's forward and backward (a
     * prefix table across the layers that read it) */
    /* the teacher sees T positions, the student V + T (worker/distill.c pairs their rows) */
    if (c->distill.teacher[0])
        return st_fail(ST_ECONFIG, "finetune.mode %s with distill.teacher is not supported yet", mode);
    if (prefix)
        return st_prefix_attach(m, c->finetune.prefix.virtual_tokens, c->finetune.prefix.projection, (uint64_t)c->seed);
    if (c->finetune.mode == ST_FINETUNE_P_TUNING)
        return st_ptuning_attach(m, c->finetune.prompt.virtual_tokens, c->finetune.prompt.encoder == 1, (uint64_t)c->seed);
    int rc = st_prompt_attach(m, c->finetune.prompt.virtual_tokens, (uint64_t)c->seed);
    if (rc || !c->finetune.prompt.init_text[0] || !m->be) return rc;
    int32_t *ids = NULL;
    size_t n = 0;
    if ((rc = st_plan_prompt_text_ids(c, &ids, &n))) return rc;
    /* streamed (ZeRO-3): the embeddings are not read yet; rows of zeros now, train.c copies the rows after
     * the load (the text and the tokenizer are recorded here for adapter_config.json either way) */
    rc = st_prompt_init_ids(m, ids, (int)n, c->finetune.prompt.init_text, c->model.path);
    free(ids);
    return rc ? st_fail_context(rc, "finetune.prompt.init_text") : 0;
}

/* peft's TEXT init: the rows are the embeddings of tokenizer(init_text)["input_ids"] (special tokens added,
 * as the tokenizer's call does), repeated and cut to V */
int st_plan_prompt_text_ids(const st_config *c, int32_t **ids, size_t *n) {
    char path[ST_CFG_PATH_MAX + 32];
    *ids = NULL;
    *n = 0;
    snprintf(path, sizeof path, "%s/tokenizer.json", c->model.path);
    if (access(path, R_OK) != 0)
        return st_fail(ST_ECONFIG, "finetune.prompt.init_text needs the model's tokenizer.json (%s has none)", c->model.path);
    st_tokenizer *tok = NULL;
    const char *text = c->finetune.prompt.init_text;
    int rc = st_tokenizer_load(c->model.path, &tok);
    if (!rc) rc = st_tokenizer_encode(tok, text, strlen(text), 1, ids, n);
    if (!rc && !*n) rc = st_fail(ST_ECONFIG, "encodes to no token");
    if (rc) {
        rc = st_fail_context(rc, "finetune.prompt.init_text");
        free(*ids);
        *ids = NULL;
    }
    st_tokenizer_free(tok);
    return rc;
}

int st_plan_act_ckpt(const st_config *c) {
    if (!c->memory.activation_checkpointing) return 0;
    return c->memory.checkpoint_dtype == ST_PRECISION_BF16 ? ST_MODEL_CKPT_BF16 : 1;
}

int st_plan_qlora_mlp_apart(const st_config *c, const st_model_config *mc) {
    int whole = c->finetune.lora.dora || c->finetune.lora.dropout > 0; /* st_lora_rows_whole */
    return st_model_mlp_splits(mc, c->train.micro_batch, c->train.seq_len, st_plan_act_ckpt(c) != 0, whole,
                               c->precision == ST_PRECISION_BF16);
}

int st_plan_z3dev_mode(const st_config *c) { return c->finetune.mode != ST_FINETUNE_QLORA; }

int st_plan_attach_adapters(const st_config *c, st_model *m) {
    if (st_config_prompt_learning(c)) return attach_prompt(c, m);
    int q = c->finetune.mode == ST_FINETUNE_QLORA;
    if (c->finetune.mode != ST_FINETUNE_LORA && !q) return 0;
    /* sharding.stage 3: the adapters are the trainable (sharded) tensors, acquired with their layer
     * (worker/model.c); the frozen base is sharded too (QLoRA: its quantized bytes, which the residency
     * hook gathers per layer; each matmul then dequantizes its unit into the scratch) */
    /* precision bf16: the base (QLoRA: each dequantized matrix) computes from its bf16 copy, the adapters and
     * their optimizer state stay fp32 (worker/model.c); DoRA reads the base weight's bf16 copy widened
     * (worker/lora.c; QLoRA: the loaded matrix's copy), its magnitudes start at the fp32 dequantized rows'
     * norms (st_lora_init_magnitudes) */
    unsigned char *layers = calloc((size_t)m->cfg.n_layer, 1);
    if (!layers) return st_fail(ST_ENOMEM, "out of memory");
    int rc = st_parse_layer_ranges(c->finetune.lora.layers, m->cfg.n_layer, layers);
    if (rc) rc = st_fail_context(rc, "finetune.lora.layers");
    st_lora_spec spec = {.r = c->finetune.lora.r, .alpha = c->finetune.lora.alpha, .rslora = c->finetune.lora.rslora,
                         .dora = c->finetune.lora.dora,
                         .targets = c->finetune.lora.targets, .layers = layers, .seed = (uint64_t)c->seed,
                         .dropout = c->finetune.lora.dropout};
    if (!rc) rc = st_lora_attach(m, &spec);
    free(layers);
    if (!rc && q && m->be) { /* the base goes quantized once the adapters (DoRA's magnitudes read it) exist */
        st_qlora_spec qs = {.quant = (st_qlora_quant)c->finetune.qlora.quant, .double_quant = c->finetune.qlora.double_quant,
                            .block = c->finetune.qlora.block, .mlp_apart = st_plan_qlora_mlp_apart(c, &m->cfg)};
        rc = st_qlora_quantize(m, &qs);
        if (!rc && c->finetune.lora.dora) rc = st_lora_init_magnitudes(m);
    }
    return rc;
}

/* ---------------- stages ---------------- */

static int add_stage(st_stage_list *l, const st_model *m, int64_t at, const char *layers, unsigned modules,
                     const char *what) {
    int L = m->cfg.n_layer;
    st_stage *s = &l->stages[l->n];
    memset(s, 0, sizeof *s);
    s->at_step = at;
    s->modules = modules;
    snprintf(s->layers_spec, sizeof s->layers_spec, "%s", layers);
    s->layers = calloc((size_t)L, 1);
    if (!s->layers) return st_fail(ST_ENOMEM, "out of memory");
    l->n++;
    int rc = st_parse_layer_ranges(layers, L, s->layers);
    if (rc) return st_fail_context(rc, "%s", what);
    if (st_model_count_trainable(m, s->layers, modules) == 0)
        return st_fail(ST_ECONFIG, "%s: nothing to train (train_layers '%s' with these train_modules selects no "
                                   "parameter of a %d-layer model)", what, layers, L);
    return 0;
}

static int progressive_stages(const st_config *c, const st_model *m, st_stage_list *l) {
    const int L = m->cfg.n_layer;
    char what[64], spec[32];
    if (c->finetune.n_stages > 0) {
        for (int i = 0; i < c->finetune.n_stages; i++) {
            const st_stage_config *s = &c->finetune.stages[i];
            snprintf(what, sizeof what, "finetune.stages.%d", i);
            if (i == 0 && s->at_step != 0) return st_fail(ST_ECONFIG, "%s.at_step must be 0 for the first stage", what);
            if (i > 0 && s->at_step <= c->finetune.stages[i - 1].at_step)
                return st_fail(ST_ECONFIG, "%s.at_step %lld must be greater than the previous stage's", what,
                               (long long)s->at_step);
            int rc = add_stage(l, m, s->at_step, s->train_layers, s->train_modules, what);
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
        int rc = add_stage(l, m, (int64_t)k * c->finetune.unfreeze_every, spec, c->finetune.train_modules, what);
        if (rc) return rc;
    }
    return 0;
}

int st_plan_stages(const st_config *c, const st_model *m, st_stage_list *out) {
    memset(out, 0, sizeof *out);
    int L = m->cfg.n_layer;
    int max = c->finetune.n_stages > 0 ? c->finetune.n_stages : L + 1;
    out->stages = calloc((size_t)max + 1, sizeof *out->stages);
    if (!out->stages) return st_fail(ST_ENOMEM, "out of memory");
    int rc;
    switch (c->finetune.mode) {
    case ST_FINETUNE_FULL: rc = add_stage(out, m, 0, "all", ST_MOD_ALL, "finetune.mode full"); break;
    case ST_FINETUNE_FROZEN:
        rc = add_stage(out, m, 0, c->finetune.train_layers, c->finetune.train_modules, "finetune.train_layers");
        break;
    case ST_FINETUNE_PROGRESSIVE: rc = progressive_stages(c, m, out); break;
    case ST_FINETUNE_LORA:
    case ST_FINETUNE_QLORA: /* the adapters alone (st_plan_attach_adapters), every base weight frozen */
        rc = m->lora ? add_stage(out, m, 0, "all", ST_MOD_LORA, "finetune.mode lora")
                     : st_fail(ST_ECONFIG, "finetune.mode lora: the model has no adapters attached");
        break;
    case ST_FINETUNE_PROMPT_TUNING: /* the prompt (prefix) alone, every base weight frozen */
    case ST_FINETUNE_PREFIX_TUNING:
    case ST_FINETUNE_P_TUNING:
        rc = m->prompt ? add_stage(out, m, 0, "all", ST_MOD_PROMPT, "finetune.mode prompt_tuning")
                       : st_fail(ST_ECONFIG, "finetune.mode prompt_tuning: the model has no prompt attached");
        break;
    default: rc = st_fail(ST_ECONFIG, "unknown finetune.mode");
    }
    if (rc) st_stage_list_free(out);
    return rc;
}

void st_stage_list_free(st_stage_list *l) {
    for (int i = 0; l->stages && i < l->n; i++) free(l->stages[i].layers);
    free(l->stages);
    memset(l, 0, sizeof *l);
}

int st_stage_at(const st_stage_list *l, int64_t step) {
    int s = 0;
    while (s + 1 < l->n && l->stages[s + 1].at_step <= step) s++;
    return s;
}

/* ---------------- memory and shards ---------------- */

/* What train.c's alloc_step_buffers takes: inputs, targets (int32), mask, weight (float) per token of the
 * micro x accum samples, task_of per sample, and 3 doubles per task + 2. */
static size_t step_buffer_bytes(const st_config *c) {
    size_t slots = (size_t)c->train.micro_batch * (size_t)c->train.grad_accum;
    return slots * (size_t)c->train.seq_len * (2 * sizeof(int32_t) + 2 * sizeof(float)) + slots * sizeof(int) +
           (3 * (size_t)c->n_tasks + 2) * sizeof(double);
}

/* Floats of the trainable parameters among [first, last). */
static size_t span_floats(const st_model *m, const long *goff, int first, int last) {
    size_t n = 0;
    for (int i = first; i < last; i++) n += goff[i] >= 0 ? m->params[i].numel : 0;
    return n;
}

/* ZeRO-3: the most weight floats gathered at once (worker/model.c's acquire/release order) among those
 * goff marks (>= 0): one layer, the embeddings, or the final norm + head, with a tied embedding held from
 * the embedding to the head. With `prefetch`, the next group's gather travels while one computes (comm.c):
 * two neighbouring groups then. The same bound holds for the gradients resident at once (a layer's until
 * its reduce-scatter; a tied embedding's head gradient from forward to the end of backward). */
static size_t zero3_working_floats(const st_model *m, const long *goff, int prefetch) {
    int e0 = 0, all = prefetch;
    while (e0 < m->n_params && m->params[e0].layer < 0) e0++; /* embeddings come first */
    int fn = e0;
    while (fn < m->n_params && m->params[fn].layer >= 0) fn++;
    size_t embed = span_floats(m, goff, 0, e0), head = span_floats(m, goff, fn, m->n_params), layer = 0;
    for (int i = e0, per = 0; i < fn; i += per) {
        per = 0;
        while (i + per < fn && m->params[i + per].layer == m->params[i].layer) per++;
        size_t n = span_floats(m, goff, i, i + per);
        if (n > layer) layer = n;
    }
    size_t tied = m->cfg.tied_embeddings ? embed : 0, most = embed;
    size_t next = all && fn > e0 ? layer : 0; /* the prefetched neighbour */
    if (embed + next > most) most = embed + next;
    if (layer + next + tied > most) most = layer + next + tied;
    if (head + next + tied > most) most = head + next + tied;
    return most;
}

/* One stage-2 bucket simulation step (comm.c on_grad_ready / s2_launch): the reported gradient range
 * [lo, hi) joins the pending bucket (or first launches it when not adjacent); a bucket of >= `bucket`
 * floats starts; a start with `cap` buckets in flight first finishes the oldest (its pages given back). */
typedef struct { size_t pend_lo, pend_hi, fly[ST_S2_INFLIGHT + 1], live, biggest, piece; int n, cap; } s2_sim;

static void s2_sim_launch(s2_sim *s) {
    for (size_t a = s->pend_lo; a < s->pend_hi; a += s->piece) { /* pieces of at most `piece` floats */
        size_t n = s->pend_hi - a < s->piece ? s->pend_hi - a : s->piece;
        if (s->n == s->cap && s->n > 0) { /* the oldest completes first */
            s->live -= s->fly[0];
            memmove(s->fly, s->fly + 1, (size_t)--s->n * sizeof *s->fly);
        }
        if (n > s->biggest) s->biggest = n;
        if (s->cap > 0) s->fly[s->n++] = n;
        else s->live -= n; /* no overlap: waited for at once */
    }
    s->pend_lo = s->pend_hi = 0;
}

static void s2_sim_report(s2_sim *s, size_t lo, size_t hi, size_t bucket) {
    if (hi <= lo) return;
    if (s->pend_hi > s->pend_lo && hi != s->pend_lo) s2_sim_launch(s);
    if (s->pend_hi <= s->pend_lo) s->pend_hi = hi;
    s->pend_lo = lo;
    if (s->pend_hi - s->pend_lo >= bucket) s2_sim_launch(s);
}

/* Compact range of parameters [first, last) under goff (lo = hi when none trains). */
static void s2_span(const st_model *m, const long *goff, int first, int last, size_t *lo, size_t *hi) {
    *lo = (size_t)-1;
    *hi = 0;
    for (int i = first; i < last; i++) {
        if (goff[i] < 0) continue;
        if ((size_t)goff[i] < *lo) *lo = (size_t)goff[i];
        if ((size_t)goff[i] + m->params[i].numel > *hi) *hi = (size_t)goff[i] + m->params[i].numel;
    }
    if (*hi == 0) *lo = 0;
}

/* ZeRO-2 on host memory (comm.c s2_release): the most gradient floats resident at once during a backward,
 * replaying worker/model.c's report order (final norm + head, each layer top-down then its adapters, the
 * embeddings, a prompt) through the bucketing. A group's gradients are resident while it computes and
 * until its bucket completes; the head's (and a tied embedding's head part) are written in forward.
 * *biggest: the largest bucket (a later micro-batch receives this rank's part of it separately). */
static size_t zero2_working_floats(const st_model *m, const long *goff, size_t bucket, int overlap, size_t *biggest) {
    s2_sim s = {.cap = overlap ? ST_S2_INFLIGHT : 0, .piece = bucket};
    int e0 = 0, nb = st_model_base_params(m);
    while (e0 < nb && m->params[e0].layer < 0) e0++; /* embeddings come first */
    int fn = e0;
    while (fn < nb && m->params[fn].layer >= 0) fn++;
    size_t lo, hi, elo, ehi, peak;
    s2_span(m, goff, 0, e0, &elo, &ehi);
    size_t tied = m->cfg.tied_embeddings ? ehi - elo : 0;
    s2_span(m, goff, fn, nb, &lo, &hi); /* final norm + head: computed first (the head in forward) */
    s.live = tied + (hi - lo);
    peak = s.live;
    s2_sim_report(&s, lo, hi, bucket);
    for (int i = fn; i > e0;) { /* layers, top-down */
        int first = i - 1, lf = 0, ll = 0;
        while (first > e0 && m->params[first - 1].layer == m->params[i - 1].layer) first--;
        size_t alo, ahi;
        s2_span(m, goff, first, i, &lo, &hi);
        if (m->lora) st_lora_layer_params(m, m->params[i - 1].layer, &lf, &ll);
        s2_span(m, goff, lf, ll, &alo, &ahi);
        s.live += (hi - lo) + (ahi - alo);
        if (s.live > peak) peak = s.live;
        s2_sim_report(&s, lo, hi, bucket);
        s2_sim_report(&s, alo, ahi, bucket);
        i = first;
    }
    s.live += (ehi - elo) - tied;
    if (s.live > peak) peak = s.live;
    s2_sim_report(&s, elo, ehi, bucket);
    s2_span(m, goff, nb, m->n_params, &lo, &hi); /* a prompt (adapters were counted with their layers) */
    if (m->prompt && hi > lo) {
        s.live += hi - lo;
        if (s.live > peak) peak = s.live;
    }
    s2_sim_launch(&s);
    *biggest = s.biggest;
    return peak;
}

/* The largest base parameter (floats) and whether one is stored transposed in the files (GPT-2 Conv1D):
 * what the per-tensor load / final/ / export paths hold at once (model_io.c: one tensor, two when
 * transposed). */
static size_t largest_param(const st_model *m, int *transposed) {
    size_t most = 0;
    *transposed = 0;
    for (int i = 0; i < st_model_base_params(m); i++) {
        const st_param *p = &m->params[i];
        if (p->numel > most) most = p->numel;
        if (p->ndim == 2 && p->transpose_io) *transposed = 1;
    }
    return most;
}

/* model_io.c's per-tensor working memory (bytes): the tensor in registry layout, + its HF-layout copy
 * when some tensor is transposed (load: the file's copy and ours). */
static size_t tensor_io_bytes(const st_model *m) {
    int tr = 0;
    size_t most = largest_param(m, &tr);
    return most * sizeof(float) * (tr ? 2 : 1);
}

int st_plan_streams(const st_config *c) {
    if (c->sharding.stage != 3) return 0;
    switch (c->finetune.mode) {
    /* progressive: its first stage's shards; a stage change moves them owner to owner (worker/comm.c
     * reshard_weights, comm_zero3_dev.c st_z3dev_reshard), never from a whole copy */
    case ST_FINETUNE_FULL: case ST_FINETUNE_FROZEN: case ST_FINETUNE_PROGRESSIVE: return 1;
    /* DoRA's magnitudes and a TEXT init read the base: after the streamed load (train.c init_from_base) */
    case ST_FINETUNE_LORA: case ST_FINETUNE_PROMPT_TUNING: case ST_FINETUNE_P_TUNING: case ST_FINETUNE_PREFIX_TUNING:
        return 1;
    default: return 0; /* qlora: quantized as read (train.c load_quantized; stage 3: its own sharded load, train_qload.c) */
    }
}

/* ZeRO-3's int8 teacher: the fp32 bytes of the quantized weights (the layers' matmul weights and an untied
 * head: st_model_param_bf16_only) in a rank's 1/world of the weight space, given back after packing, less two
 * pages per weight; the least over the ranks. */
static size_t teacher_int8_freed(const st_model *t, int world) {
    size_t shard = (t->n_weights + (size_t)world - 1) / (size_t)world, least = (size_t)-1;
    for (int r = 0; r < world; r++) {
        size_t lo = shard * (size_t)r, hi = lo + shard, f = 0;
        for (int i = 0; i < st_model_base_params(t); i++) {
            const st_param *p = &t->params[i];
            size_t a = p->offset > lo ? p->offset : lo, b = p->offset + p->numel < hi ? p->offset + p->numel : hi;
            size_t bytes = b > a ? (b - a) * sizeof(float) : 0;
            if (st_model_param_bf16_only(t, i)) f += bytes > 2 * 4096 ? bytes - 2 * 4096 : 0;
        }
        if (f < least) least = f;
    }
    return least == (size_t)-1 ? 0 : least;
}

/* distill.teacher's bytes on each rank (st_rank_plan.teacher; out[world]) and what its load holds on top
 * (load[world]: a device int8 teacher's whole fp32 shard beside the compacted one, at load only): the registry
 * of its config.json. */
static int teacher_bytes(const st_config *c, int world, size_t *out, size_t *load) {
    for (int r = 0; r < world; r++) out[r] = load[r] = 0;
    if (!c->distill.teacher[0]) return 0;
    st_model_config tc;
    st_model t;
    int rc = st_model_config_read(c->distill.teacher, &tc);
    if (!rc) rc = st_model_build_registry(&t, &tc);
    if (rc) return st_fail_context(rc, "distill.teacher %s", c->distill.teacher);
    const int i8 = c->distill.teacher_dtype == ST_TEACHER_INT8; /* fp32 weights + their int8 packs, fp32 math */
    const st_precision tp = i8 ? ST_PRECISION_FP32 : c->precision;
    size_t n = t.n_weights, group = 0, per = tp == ST_PRECISION_BF16 ? sizeof(float) + sizeof(uint16_t)
                                                                      : sizeof(float);
    int L = t.cfg.n_layer, nb = st_model_base_params(&t);
    for (int l = -1; l <= L; l++) { /* the groups the forward gathers: embeddings, each layer, norm + head */
        int a = l < 0 ? 0 : st_model_layer_first_param(&t, l), b = l < 0 ? st_model_layer_first_param(&t, 0)
                                                                 : l < L ? st_model_layer_first_param(&t, l + 1) : nb;
        size_t f = b > a ? t.params[b - 1].offset + t.params[b - 1].numel - t.params[a].offset : 0;
        if (l == L && t.cfg.tied_embeddings) f += t.params[0].numel; /* the tied wte stays until the head ran */
        if (f > group) group = f;
    }
    size_t weights = c->sharding.stage == 3 ? (n + (size_t)world - 1) / (size_t)world * sizeof(float) + group * per
                                            : n * per;
    const int dev = c->backend == ST_BACKEND_CUDA;
    /* stage 3 on a device (worker/comm_zero3_teacher_dev.c): the device shard and the gather slots (two, three
     * with a tied head: each the largest group, with its bf16 copy under bf16), held for the whole run */
    if (c->sharding.stage == 3 && dev) weights = st_z3teach_floats(&t, world, tp == ST_PRECISION_BF16) * sizeof(float);
    size_t held = weights + st_model_activation_floats_dev(&tc, c->train.micro_batch, c->train.seq_len, tp, 1,
                                                          dev && c->sharding.stage == 3) * sizeof(float);
    /* worker/distill.c: one LM-head chunk of the teacher's logits (the student's chunk rows, the same vocabulary) */
    held += st_model_head_chunk_floats(&tc, c->train.micro_batch, c->train.seq_len, dev) * sizeof(float);
    if (i8) { /* the packs in, the quantized weights' fp32 pages out (train.c load_teacher) */
        size_t freed = 0, lp = 0, hp = 0;
        size_t all = st_model_int8_bytes(&tc, c->train.micro_batch, c->train.seq_len, dev, &freed, &lp, &hp);
        if (c->sharding.stage == 3 && dev) { /* worker/comm_zero3_teacher_dev.c: a share of the pack space (whole
                                                  floats), each slot's pack buffer, the scratch; the fp32 shard
                                                  compacted to the rank's unquantized weights (below) */
            size_t most = 0, space = st_model_int8_space(&t, 1, &most), packs = (size_t)L * lp + hp;
            all = ((space + (size_t)world - 1) / (size_t)world + 3) / 4 * 4 +
                  (t.cfg.tied_embeddings ? 3 : 2) * most + (all - packs);
            freed = 0;
        } else if (c->sharding.stage == 3) { /* a share of the packs, one group's packs gathered, the rank's own pages */
            size_t packs = (size_t)L * lp + hp;
            all = (packs + (size_t)world - 1) / (size_t)world + (lp > hp ? lp : hp) + (all - packs);
            freed = teacher_int8_freed(&t, world);
        }
        held += all;
        held -= freed < held ? freed : 0;
    }
    for (int r = 0; r < world; r++) {
        out[r] = held;
        if (i8 && c->sharding.stage == 3 && dev) { /* st_z3teach_int8_compact: rank r's unquantized weights stay */
            size_t whole = st_z3teach_kept_floats(&t, world, r, 0), kept = st_z3teach_kept_floats(&t, world, r, 1);
            out[r] -= (whole - kept) * sizeof(float);
            load[r] = whole * sizeof(float); /* the whole shard beside the compacted one while it is cut */
        }
    }
    st_model_free(&t);
    return 0;
}

static int streams(const st_config *c) { return st_plan_streams(c); }

int st_plan_qload_sharded(const st_config *c, int device) {
    const char *e = getenv("SHARDTUNE_Z3DEV_QLOAD"); /* "whole": quantized whole, then cut (the A/B) */
    const char *f = getenv("SHARDTUNE_ZERO3_SHARD_FROZEN"); /* CPU ranks' "0": the blob kept whole (worker/comm.c) */
    return c->finetune.mode == ST_FINETUNE_QLORA && c->sharding.stage == 3 && !(e && !strcmp(e, "whole")) &&
           (device || !(f && !strcmp(f, "0")));
}

/* The sharded QLoRA load's read buffers (train_qload.c): a device's staging of the kept base, a 1 Mi-float piece (its
 * pages touched: at most the largest kept tensor; CPU ranks read in place), and the largest quantizable Conv1D
 * (transposed) tensor, read whole (read_values). */
static size_t qload_reads(const st_model *m, int device) {
    size_t most = 0, piece = 0;
    for (int i = 0; i < st_model_base_params(m); i++) {
        const st_param *p = &m->params[i];
        if (!st_qlora_quantizable(m, i)) piece = p->numel > piece ? p->numel : piece;
        else if (p->ndim == 2 && p->transpose_io && p->numel * sizeof(float) > most) most = p->numel * sizeof(float);
    }
    return most + (device ? (piece < ((size_t)1 << 20) ? piece : ((size_t)1 << 20)) * sizeof(float) : 0);
}

int st_plan_loads_late(const st_config *c) {
    return c->sharding.stage < 3 && c->backend != ST_BACKEND_CUDA && c->finetune.mode != ST_FINETUNE_QLORA &&
           c->finetune.mode != ST_FINETUNE_FULL;
}

/* ZeRO-3: whether frozen parameter i is held in bf16 only (worker/comm.c st_comm_drop_frozen_fp32 on CPU ranks,
 * worker/comm_zero3_dev.c st_z3dev_hold_bf16 on a device): of the kinds st_model_bf16_storable names, for a bf16
 * source under precision bf16 (as the rule below stage 3), never under SHARDTUNE_FROZEN_FP32=1. Its part costs 2
 * bytes a float instead of 4; on CPU ranks its gathers fill the bf16 copy only (no fp32 working copy), on a
 * device its gathers fill the slot's bf16 copy (the slots are sized as before). */
static int zero3_bf16_only(const st_config *c, const st_model *m, const long *goff, int i) {
    const char *keep = getenv("SHARDTUNE_FROZEN_FP32");
    return !(keep && !strcmp(keep, "1")) && c->precision == ST_PRECISION_BF16 &&
           !strcmp(m->cfg.dtype, "bfloat16") && c->finetune.mode != ST_FINETUNE_QLORA && goff[i] < 0 &&
           st_model_bf16_storable(m, i);
}

/* The floats of the frozen space's [flo, fhi) (comm.h: the frozen parameters but QLoRA's, registry order) held
 * in bf16 only (zero3_bf16_only). */
static size_t zero3_bf16_kept(const st_config *c, const st_model *m, const long *goff, size_t flo, size_t fhi) {
    size_t n = 0, f = 0;
    for (int i = 0; i < m->n_params; i++) {
        if (goff[i] >= 0) continue;
        size_t a = f, b = f + m->params[i].numel;
        f = b;
        if (!zero3_bf16_only(c, m, goff, i)) continue;
        a = a > flo ? a : flo;
        b = b < fhi ? b : fhi;
        n += b > a ? b - a : 0;
    }
    return n;
}

static void plan_rank(const st_config *c, const st_model *m, const long *goff, const long *frozen_run,
                      st_stage_plan *sp, int world, int rank, st_rank_plan *r, size_t teacher, size_t teacher_load) {
    int zero = c->sharding.stage;
    memset(r, 0, sizeof *r);
    r->lo = sp->shard * (size_t)rank;
    r->hi = r->lo + sp->shard;
    r->first_param = r->last_param = -1;
    for (int i = 0; i < m->n_params; i++) {
        if (goff[i] < 0) continue;
        size_t a = (size_t)goff[i], b = a + m->params[i].numel;
        if (a < r->hi && b > r->lo) {
            if (r->first_param < 0) r->first_param = i;
            r->last_param = i;
            r->n_params++;
        }
    }
    size_t range = zero == 0 ? sp->n_pad : sp->shard; /* st_comm_optim_range */
    r->weights = m->n_weights * (c->precision == ST_PRECISION_BF16 ? sizeof(float) + sizeof(uint16_t) : sizeof(float));
    r->teacher = teacher;
    size_t qload = 0, q32 = m->n_weights; /* QLoRA: the load's working bytes; the floats with fp32 storage */
    size_t qbytes = 0, qdrop = 0; /* QLoRA: the quantized base's bytes + the acquire's buffers, the fp32 floats compact() removes */
    size_t qlayer = 0, qacq = 0;  /* QLoRA: the most quantized bytes of one layer; the acquire's buffers */
    size_t qfused = 0;            /* QLoRA: the fused matmuls' panels (part of qacq; first allocated by a step) */
    size_t qput = 0;              /* QLoRA at stage 3: the sharded load's working bytes (train_qload.c) */
    if (c->finetune.mode == ST_FINETUNE_QLORA) {
        /* worker/qlora.c st_qlora_begin's layout: codes + scales; the compacted buffer (kept base, adapters; no
         * dequantized matrix on the fused path, else one matmul unit's scratch too: st_qlora_footprint) in fp32,
         * and under bf16 its bf16 copy, below n_w16 (embedding, head, an unfused scratch) the bf16 copy only */
        int bf16 = c->precision == ST_PRECISION_BF16;
        st_qlora_spec qs = {.quant = (st_qlora_quant)c->finetune.qlora.quant,
                            .double_quant = c->finetune.qlora.double_quant, .block = c->finetune.qlora.block,
                            .bf16 = bf16 && !m->qlora && zero < 3, /* train.c load_quantized */
                            .mlp_apart = m->qlora ? st_qlora_mlp_apart(m) : st_plan_qlora_mlp_apart(c, &m->cfg)};
        size_t qb, fb, scratch, w16;
        st_qlora_footprint(m, &qs, &qb, &fb, &scratch, &w16);
        size_t nw = m->qlora ? m->n_weights : m->n_weights - fb / sizeof(float) + scratch;
        if (m->qlora) w16 = m->n_w16;
        q32 = nw - w16;
        /* the codes and the acquire's buffers (device memory on CUDA, where every kept tensor is put in
         * pieces: worker/qlora.h) */
        int dev = c->backend == ST_BACKEND_CUDA;
        qacq = st_qlora_acquire_work(m, &qs, dev);
        /* DoRA: its magnitudes and norms read the base a panel of rows at a time (st_qlora_rows) */
        if (c->finetune.lora.dora) qacq += st_qlora_rows_work(m, &qs);
        /* the fused matmuls' panels (worker/qlora.c st_qlora_mm, the CPU twin: one panel per thread, X's bf16
         * copy under bf16; none on a device) */
        qfused = st_qlora_fused_work(m, &qs, c->train.micro_batch * c->train.seq_len, bf16, st_num_threads(), dev);
        qacq += qfused;
        qbytes = qb + qacq;
        r->weights = q32 * sizeof(float) + (bf16 ? nw * sizeof(uint16_t) : 0) + qbytes;
        qlayer = st_qlora_layer_bytes_max(m, &qs);
        qdrop = m->qlora ? 0 : fb / sizeof(float) - scratch;
        /* train.c load_quantized: one tensor in flight, then the adapters' initial values (host) */
        size_t adapters = m->lora ? (m->n_weights - m->n_base_weights) * sizeof(float) : 0;
        qload = st_qlora_load_work(m, &qs, dev);
        if (adapters > qload) qload = adapters;
        /* what the load has written: the fp32 part but an unfused scratch, the bf16-only kept parameters' bf16
         * (that scratch is first written by a matmul's st_qlora_load, the rest of the bf16 copy by the first
         * forward; the fused matmuls' panels by the first step) */
        qload += bf16 ? (q32 * sizeof(float) + (w16 - scratch) * sizeof(uint16_t) + qbytes - qfused)
                      : (q32 - scratch) * sizeof(float) + qbytes - qfused;
        /* train_qload.c: one tensor's bytes and scales, a piece (st_qlora_put_bytes), the read buffers (host) */
        qput = st_qlora_put_bytes_work(m, &qs) + qload_reads(m, dev);
    }
    /* frozen weights of a bf16 source held once, in bf16 (worker/model.h st_model_drop_frozen_fp32): host ranks
     * below stage 3 under bf16 give their fp32 copy back once the trainable set is known (after the load); a
     * device rank never allocates it (st_model_bind_frozen_bf16, coordinator/trainer/train_frozen16.c) for those
     * that no stage of the run trains (frozen_run) */
    size_t w16only = 0, w16most = 0;
    int cuda = c->backend == ST_BACKEND_CUDA;
    if (zero < 3 && c->precision == ST_PRECISION_BF16 && !strcmp(m->cfg.dtype, "bfloat16") &&
        c->finetune.mode != ST_FINETUNE_QLORA && /* QLoRA keeps its own layout (the registry here has no m->qlora) */
        (!cuda || (frozen_run && c->finetune.mode != ST_FINETUNE_FULL)))
        w16only = st_model_bf16_frozen_floats(m, cuda ? frozen_run : goff, &w16most);
    r->weights -= w16only * sizeof(float);
    r->grads = sp->n_trainable ? sp->n_pad * sizeof(float) : 0; /* model->grads: grad_alloc floats */
    if (zero == 2) r->grads += sp->shard * sizeof(float);        /* comm->shard_grads */
    r->optim = 2 * range * sizeof(float) + ((size_t)m->n_params + 1) * sizeof(int);
    r->comm = zero >= 1 && world > 1 ? sp->n_pad * sizeof(float) : 0; /* comm->flat_params (1 rank: none) */
    size_t transient = 0; /* stage 2 on host memory: gradients given back once a backward ends */
    if (zero == 2) { /* comm.c: stage 2 gathers in place when the compact space is the weight space */
        int in_place = sp->n_trainable == m->n_weights;
        for (int i = 0; i < m->n_params && in_place; i++) in_place = goff[i] == (long)m->params[i].offset;
        size_t bucket = (size_t)(c->sharding.bucket_mb * 1048576.0);
        r->comm = world > 1 ? st_comm_param_staging_floats(sp->n_pad, bucket, in_place) * sizeof(float) : 0;
        if (c->backend != ST_BACKEND_CUDA && world > 1 && sp->n_trainable) {
            /* s2_release: the shard, the gradients resident at once, a later micro-batch's receive buffers */
            size_t biggest = 0, bf = st_comm_zero2_piece_floats(bucket);
            size_t live = zero2_working_floats(m, goff, bf, c->sharding.overlap, &biggest);
            size_t recv = c->train.grad_accum > 1 ? (biggest < sp->shard ? biggest : sp->shard) : 0;
            r->grads = (sp->shard + live + ST_S2_INFLIGHT * recv) * sizeof(float);
            transient = (live + ST_S2_INFLIGHT * recv) * sizeof(float);
        }
        if (c->backend == ST_BACKEND_CUDA && st_z2dev_plan_used(m, goff, sp->n_trainable))
            /* worker/comm_zero2_dev.c: shard_grads, the edge buffers, two layer buckets (one on one rank) */
            r->grads = (sp->shard + st_z2dev_floats(m, goff, world)) * sizeof(float);
    }
    /* a prompt's V virtual tokens lead every sequence (worker/prompt.h) */
    r->activations = (st_model_activation_floats_opts(&m->cfg, c->train.micro_batch,
                                                      c->train.seq_len + st_prompt_tokens(m), c->precision,
                                                      st_plan_act_ckpt(c), c->backend == ST_BACKEND_CUDA,
                                                      st_lora_rows_whole(m)) +
                      st_lora_work_floats(m, (size_t)c->train.micro_batch * (size_t)c->train.seq_len,
                                          (size_t)st_model_mlp_block_rows(&m->cfg, c->train.micro_batch,
                                                                          c->train.seq_len + st_prompt_tokens(m),
                                                                          st_plan_act_ckpt(c), st_lora_rows_whole(m))) +
                      /* DoRA's B A (and widened weight); over a fused QLoRA base one panel of rows */
                      st_lora_dora_weight_floats(m, c->finetune.mode == ST_FINETUNE_QLORA && st_qlora_fuses(m->be),
                                                 c->precision == ST_PRECISION_BF16)) *
                     sizeof(float);
    r->buffers = step_buffer_bytes(c);
    size_t stepbuf = r->buffers; /* what the load phase holds: the async snapshot comes with the first save */
    /* rank 0 writing final/: model_io.c's one tensor at a time (st_model_save_dir_streamed), or
     * st_peft_save_dir's adapter copy */
    int tr = 0;
    size_t largest = largest_param(m, &tr), io = tensor_io_bytes(m);
    /* st_peft_save_dir writes the adapters in place on a host backend, from a host copy on a device */
    size_t adapters_copy = c->backend == ST_BACKEND_CUDA ? (m->n_weights - m->n_base_weights) * sizeof(float) : 0;
    size_t copies = rank > 0 ? 0 : m->lora ? adapters_copy : io;
    /* a checkpoint (checkpoints/ckpt_write.c, CPU ranks: written from the live buffers): a bounce window
     * of at most this rank's rows of one tensor */
    size_t written = largest; /* with adapters only they are written (the base tensors are skipped) */
    if (m->lora || m->prompt) {
        written = 0;
        for (int i = st_model_base_params(m); i < m->n_params; i++)
            if (m->params[i].numel > written) written = m->params[i].numel;
    }
    size_t bounce = (written / (size_t)world + 1) * sizeof(float);
    /* after the load: the finite check and the base checksum read through a 1 Mi-float chunk, plus a
     * 64 Ki-element conversion buffer while reading */
    size_t check = ((largest < ((size_t)1 << 20) ? largest : ((size_t)1 << 20)) + ((size_t)1 << 16)) * sizeof(float);
    /* checkpoint.async (checkpoints/ckpt_snap.c): the snapshot's host copy of this rank's /model chunks
     * (adapters only with LoRA) and /optim share, kept from the first save to the end of the run */
    size_t saved = m->lora || m->prompt ? m->n_weights - m->n_base_weights : m->n_weights;
    size_t copy = ((saved + (size_t)world - 1) / (size_t)world + 2 * sp->shard) * sizeof(float);
    size_t snap = c->checkpoint.async ? copy : 0;
    /* with periodic saves the snapshot stays beside every later step; a run whose one save is its last
     * (end, signal, ctl stop) holds it only then, beside the state between steps (late) */
    int periodic = c->checkpoint.every_steps > 0 && (c->train.steps <= 0 || c->checkpoint.every_steps < c->train.steps);
    size_t late = 0;
    if (c->backend == ST_BACKEND_CUDA) r->host_snapshot = snap; /* host memory beside the device's */
    else if (periodic) r->buffers += snap;
    else late = snap;
    if (zero == 3 && c->backend == ST_BACKEND_CUDA) {
        /* worker/comm_zero3_dev.c: the master shard, the frozen shard, the gather slots (and their bf16 copies;
         * two adapter / prompt slots), two layer gradient buffers, the edge gradients, shard_grads and two
         * receive buffers, all allocated for the whole run; QLoRA: this rank's part of the quantized bytes, a
         * layer's bytes per base slot and the acquire's buffers (DoRA's panels), and only on the unfused path
         * (SHARDTUNE_QLORA_FUSED=0) the matmul unit's scratch (+ its bf16 copy): st_qlora_footprint's 0 fused */
        size_t wf, gf;
        int q = c->finetune.mode == ST_FINETUNE_QLORA;
        st_qlora_spec qs = {.quant = (st_qlora_quant)c->finetune.qlora.quant,
                            .double_quant = c->finetune.qlora.double_quant, .block = c->finetune.qlora.block,
                            .mlp_apart = m->qlora ? st_qlora_mlp_apart(m) : st_plan_qlora_mlp_apart(c, &m->cfg)};
        st_z3dev_floats(m, goff, world, sp->shard, c->precision == ST_PRECISION_BF16, q ? &qs : NULL, &wf, &gf);
        /* the frozen shard's parts held in bf16 only: 2 bytes a float. The load reads them straight into bf16
         * (BF16 file tensors: laid out so when the communicator is built, train_frozen16.c
         * st_trainer_z3_frozen_bf16; a bf16 source's are), and so does a resume (train_ckpt.c held_exact: the
         * checkpoint's values of those parts are bf16 values); a stage change (st_z3dev_detach, then the new
         * communicator until st_z3dev_hold_bf16) holds the whole frozen shard in fp32 (enter_fp32; the moves
         * between the two layouts are staged in host memory) */
        size_t nf = 0;
        for (int i = 0; i < m->n_params; i++) nf += goff[i] < 0 ? m->params[i].numel : 0;
        size_t fsh = (nf + (size_t)world - 1) / (size_t)world, flo = fsh * (size_t)rank;
        size_t kept16 = q ? 0 : zero3_bf16_kept(c, m, goff, flo, flo + fsh);
        size_t moved = kept16 * (sizeof(float) - sizeof(uint16_t));
        r->weights = wf * sizeof(float) + (q ? qacq : 0) - kept16 * (sizeof(float) - sizeof(uint16_t));
        r->grads = gf * sizeof(float);
        r->comm = 0;
        r->total = r->weights + r->grads + r->optim + r->comm + r->activations + r->buffers + r->teacher;
        /* load (train.c: the model bound without weights, buffers_external): streamed into the shard once
         * the communicator and optimizer exist, a host chunk at a time: the step's device memory. QLoRA: the
         * same, each rank quantizing only its words of the codes (train_qload.c); under SHARDTUNE_Z3DEV_QLOAD=whole
         * quantized whole on every rank (load_quantized: the whole codes and the compacted buffer, as below
         * stage 3), with the activations and the whole bf16 copy and gradients until the communicator cuts its
         * shards out of them; + an int8 teacher's whole fp32 shard while it is compacted */
        r->at_load = r->total + teacher_load; /* the first stage's held parts read straight into bf16 (progressive too) */
        r->enter_fp32 = moved;
        if (q && st_plan_qload_sharded(c, 1)) /* train_qload.c: laid out without the base, the communicator built,
                                                   then each rank's words quantized and its kept parts read */
            r->at_load += qput;
        else if (q) { /* then the shards are cut (comm_zero3_dev.c qz_init: the master, frozen and quantized shards, the
                    unfused path's scratch) once the whole bf16 copy and gradients are gone, before the whole weights and codes go */
            size_t nw = m->qlora ? m->n_weights : q32, ng = m->n_weights - m->n_base_weights, qb, fb, scr, w16, nf = 0;
            int bf16 = c->precision == ST_PRECISION_BF16;
            st_qlora_footprint(m, &qs, &qb, &fb, &scr, &w16);
            for (int i = 0; i < m->n_params; i++)
                if (goff[i] < 0 && !(m->qlora ? st_qlora_holds(m, i) : st_qlora_quantizable(m, i))) nf += m->params[i].numel;
            size_t w = (size_t)world, cut = (sp->shard + (nf + w - 1) / w + (qb / 4 + w - 1) / w + scr +
                                             (bf16 ? (scr + 1) / 2 : 0)) * sizeof(float);
            size_t early = ng * sizeof(float) + (bf16 ? nw * sizeof(uint16_t) : 0);
            size_t whole = stepbuf + qload + teacher + r->activations + (early > cut ? early : cut);
            r->at_load = whole > r->at_load ? whole : r->at_load;
        }
        /* checkpoints gather one tensor at a time into a slot (already counted); final/ and resume go
         * through host memory a tensor or this rank's parts at a time; an adapter mode's final/ gathers all
         * the adapters (the prompt's tensors) at once into a device buffer made for it */
        size_t tail = m->lora || m->prompt ? (m->n_weights - m->n_base_weights) * sizeof(float) : 0;
        r->at_save = r->total + late + tail;
        r->at_ckpt = r->total + late;
        r->at_resume = r->total; /* the checkpoint's bf16 values written straight into the bf16 parts */
        return;
    }
    if (zero == 3) { /* comm.c stage 3: frozen weights, the resident shard, one gathered group (and the next one
                        in flight when every parameter trains), shard_grads + z3_recv + one group's gradients
                        (+ the gather staging when some parameters are frozen) */
        size_t n = sp->n_trainable, lo = r->lo < n ? r->lo : n, hi = r->hi < n ? r->hi : n;
        /* the frozen space (comm.h): every frozen parameter but QLoRA's quantized ones (whole with the codes,
         * and unfused their one matmul unit's scratch), sharded like the trainable ones: this rank's part of it */
        long *gath = malloc((size_t)m->n_params * sizeof(long));
        size_t nf = 0, whole = 0;
        int every = 1; /* every parameter trains: in-place gathers, prefetched */
        for (int i = 0; i < m->n_params; i++) {
            const st_param *p = &m->params[i];
            int held = qbytes && p->layer >= 0 && p->ndim == 2 && (p->kind == ST_MOD_ATTN || p->kind == ST_MOD_MLP) &&
                       goff[i] < 0; /* worker/qlora.c quantizable() */
            if (goff[i] < 0 && !held) nf += p->numel;
            every &= goff[i] >= 0;
            if (gath) gath[i] = held || zero3_bf16_only(c, m, goff, i) ? -1 : 0; /* no fp32 gathered */
        }
        if (qbytes) whole = m->qlora ? m->n_weights - n - nf : m->n_weights - n - nf - qdrop; /* the scratch */
        size_t fshard = (nf + (size_t)world - 1) / (size_t)world, flo = fshard * (size_t)rank;
        size_t kept = (flo + fshard < nf ? flo + fshard : nf) - (flo < nf ? flo : nf);
        size_t frozen = whole + kept; /* resident frozen floats */
        size_t kept16 = zero3_bf16_kept(c, m, goff, flo, flo + fshard); /* of them held in bf16 only */
        /* gathered at once: a group's trainable and frozen weights, the next group's prefetched with them
         * (the frozen part always, the trainable part when every parameter trains) */
        size_t work = gath ? zero3_working_floats(m, gath, world > 1 && (every || nf)) : m->n_weights;
        size_t gwork = zero3_working_floats(m, goff, 0);
        /* with overlap, up to ST_Z3_RS_SLOTS earlier chunks are in flight while a group computes */
        if (c->sharding.overlap && world > 1) {
            size_t ch = st_comm_zero3_chunk_floats(sp->shard, world);
            gwork += ST_Z3_RS_SLOTS * (gwork < ch ? gwork : ch);
        }
        free(gath);
        size_t staging = n != m->n_weights - qdrop && n ? (sp->n_pad < ST_Z3_CHUNK ? sp->n_pad : ST_Z3_CHUNK) : 0; /* z3_stage */
        /* QLoRA's quantized bytes sharded like the frozen space (comm.c z3_qb): this rank's part, and the
         * layer gathered (the next one prefetched with it) */
        size_t qwork = world > 1 ? 2 * qlayer : 0, qkept = world > 1 ? (qbytes - qacq + (size_t)world - 1) / (size_t)world + qacq : qbytes;
        r->weights = (frozen + hi - lo + work) * sizeof(float) + qkept + qwork - kept16 * (sizeof(float) - sizeof(uint16_t));
        size_t bf_work = 0;
        if (c->precision == ST_PRECISION_BF16) { /* the compute copy of the group acquired (frozen weights
                                                    included) and of the shard the optimizer writes */
            long *all = calloc((size_t)m->n_params, sizeof(long));
            size_t bwork = all ? zero3_working_floats(m, all, 0) : m->n_weights;
            free(all);
            bf_work = bwork * sizeof(uint16_t);
            r->weights += bf_work + (hi - lo) * sizeof(uint16_t);
        }
        r->grads = (sp->shard + st_comm_zero3_recv_floats(sp->shard, c->sharding.overlap ? world : 1) + gwork) * sizeof(float);
        r->comm = staging * sizeof(float);
        r->total = r->weights + r->grads + r->optim + r->comm + r->activations + r->buffers + r->teacher;
        size_t idle = r->total - (work + gwork) * sizeof(float) - bf_work - qwork; /* between steps: no layer gathered */
        int adapters = m->lora || m->prompt;
        /* load: streamed, this rank's parts only, read piece by piece (adapters: attached first, over
         * zeros); else the whole model read, then given back down to this rank's parts */
        /* after it (train.c init_from_base): DoRA gathers one base weight at a time for its magnitudes (and
         * under bf16 its compute copy); a TEXT init assembles the prompt's rows (V x C, and MPI's copy) */
        size_t from_base = st_lora_dora_base_floats(m) * (sizeof(float) + (c->precision == ST_PRECISION_BF16 ? sizeof(uint16_t) : 0));
        if (c->finetune.mode == ST_FINETUNE_PROMPT_TUNING && c->finetune.prompt.init_text[0])
            from_base = 2 * (size_t)st_prompt_tokens(m) * (size_t)m->cfg.d_model * sizeof(float);
        if (streams(c)) r->at_load = (frozen + hi - lo + (adapters ? n : 0)) * sizeof(float) + from_base + stepbuf + (tr ? io : 0) + check + teacher;
        /* QLoRA (train_qload.c): laid out without reading, the communicator built, then each rank's bytes of the
         * codes quantized and its parts of the kept base read: this rank's parts (the frozen space's, the
         * compact one's, the blob's), the adapters whole (initialized on every rank), the load's working bytes;
         * DoRA's magnitudes then gather a layer's bytes at a time and dequantize a panel (the acquire's buffers).
         * Under SHARDTUNE_Z3DEV_QLOAD=whole: load_quantized, as below stage 3: the codes and kept base whole */
        else if (qbytes && st_plan_qload_sharded(c, 0))
            r->at_load = (kept + hi - lo + n) * sizeof(float) + qkept - qacq + stepbuf + teacher + qput +
                         (c->finetune.lora.dora ? qacq + qwork : 0);
        else if (qbytes) r->at_load = stepbuf + qload + teacher;
        else r->at_load = (m->n_weights + sp->n_pad) * sizeof(float) + r->activations + stepbuf + teacher;
        /* final/: one tensor gathered at a time on rank 0 (the others serve their parts); adapters: gathered
         * whole on every rank (st_trainer_save_final) */
        r->at_save = idle + (adapters ? (n - (hi - lo)) * sizeof(float) : 0) + copies + late;
        /* a checkpoint gathers one tensor at a time for its checksum (ckpt_write.c): of an adapter mode,
         * the adapters only */
        size_t ck = largest;
        if (adapters)
            for (int i = st_model_base_params(m), first = 1; i < m->n_params; i++, first = 0)
                ck = first || m->params[i].numel > ck ? m->params[i].numel : ck;
        /* the save first copies this rank's share (ckpt_snap.c: ZeRO-3 acquires its tensors, so even a sync save
         * borrows nothing), gathering one tensor at a time; the write then runs from the copy, rank 0 gathering
         * a tensor at a time beside it. Measured (ref_stream_io: 2 CPU ranks, Llama 4 x 256, V 32000, sync and
         * async): rank 1 peaks at the state between steps plus the copy (-0.8% of this), rank 0 at that plus
         * about one tensor (sync: -5.9% of this). With periodic async saves the copy is already in idle. */
        size_t gathered = ck * sizeof(float) + (adapters ? (ck / (size_t)world + 1) * sizeof(float) : bounce);
        size_t held = c->checkpoint.async ? late : copy;
        r->at_ckpt = idle + (rank == 0 ? held + gathered : gathered > held ? gathered : held);
        /* resume (train_ckpt.c): full / frozen: the parts and one tensor read, the moments read in place (CPU
         * ranks); else the whole weights (the base checked a tensor at a time) and the moments' host copy */
        r->at_resume = idle + (streams(c) && !adapters ? (frozen + hi - lo + largest) * sizeof(float)
                                                       : (m->n_weights - qdrop + largest) * sizeof(float) + 2 * range * sizeof(float)) +
                       kept16 * sizeof(float); /* the parts held in bf16 only: their fp32 places written again, then held so again */
        return;
    }
    r->total = r->weights + r->grads + r->optim + r->comm + r->activations + r->buffers + r->teacher;
    /* a device backend: final/'s adapter copy and resume's host image are host memory, apart */
    int dev = c->backend == ST_BACKEND_CUDA;
    if (dev) r->host_save = copies;
    r->at_save = r->total - transient + (dev ? 0 : copies) + late;
    /* load: the weights as read, a tensor at a time (no host copy); the bf16 copy and the gradient / optimizer
     * buffers come after, within the step total. Host ranks read after the adapters and the precision
     * (st_plan_loads_late, train.c load_late: no copy of the base when the adapters grow the buffer), under bf16
     * the first stage's frozen bf16 tensors straight into their bf16 copy, 2 bytes a float, their fp32 pages never
     * touched (the other tensors' bf16 copy comes with the first forward); a device rank holding frozen weights in
     * bf16 only has the fp32 part and the whole bf16 copy from the start */
    size_t direct16 = st_plan_loads_late(c) ? w16only : 0;
    r->at_load = (dev && w16only ? (m->n_weights - w16only) * sizeof(float) + m->n_weights * sizeof(uint16_t)
                                 : (m->n_weights - direct16) * sizeof(float) + direct16 * sizeof(uint16_t)) +
                 stepbuf + (tr ? io : 0) + check + teacher;
    /* QLoRA: quantized while read (train.c load_quantized), the layout's buffers from the start */
    if (c->finetune.mode == ST_FINETUNE_QLORA) r->at_load = stepbuf + qload + teacher;
    /* a sync save widens a bf16-only tensor's rows into a window of their own (checkpoints/ckpt_write.c; the
     * async snapshot widens into its copy); under adapters the frozen base is not written (its checksum is
     * summed from a stack piece) */
    size_t wide = w16only && !dev && !c->checkpoint.async && !m->lora && !m->prompt ? (w16most / (size_t)world + 1) * sizeof(float) : 0;
    r->at_ckpt = r->total - transient + bounce + wide + late;
    /* resume: a host image of the weights, of which the fp32 part is written (QLoRA: not below n_w16) */
    size_t image = q32 * sizeof(float) + 2 * range * sizeof(float);
    if (dev) r->host_resume = image;
    /* the image is copied over the whole weights, the bf16-only ones too, before they are given back again; an
     * adapter run's (train_ckpt.c own_base) holds the adapters only and the base is summed a 1 Mi-float piece at
     * a time (checkpoints/ckpt_read.c st_ckpt_load_adapters) */
    /* full / frozen / progressive on CPU ranks (train_ckpt.c in_place, unless SHARDTUNE_RESUME_IMAGE=1): no image;
     * the checkpoint's tensors are checked through a piece of whole rows (1 Mi floats, or one row where wider:
     * checkpoints/ckpt_read.c st_ckpt_check_model), then read into the model's own fp32 places, a tensor held in
     * bf16 only into its bf16 copy through the same piece (its fp32 pages never touched while its values are bf16),
     * and the moments into the optimizer's */
    const char *image_env = getenv("SHARDTUNE_RESUME_IMAGE");
    int in_place = !dev && !m->lora && !m->prompt && c->finetune.mode != ST_FINETUNE_QLORA && !(image_env && image_env[0] == '1');
    size_t piece = (size_t)1 << 20;
    for (int i = 0; i < m->n_params; i++)
        if (m->params[i].ndim == 2 && (size_t)m->params[i].shape[1] > piece) piece = (size_t)m->params[i].shape[1];
    if (!dev && (m->lora || m->prompt) && c->finetune.mode != ST_FINETUNE_QLORA)
        r->at_resume = r->total + ((m->n_weights - m->n_base_weights) + 2 * range + ((size_t)1 << 20)) * sizeof(float);
    else if (in_place) r->at_resume = r->total + piece * sizeof(float);
    else r->at_resume = r->total + (dev ? 0 : image + w16only * sizeof(float));
    (void)world;
}

static int plan_stage(const st_config *c, const st_model *m, const st_stage *s, size_t prev_pad, int world,
                      long *goff, const long *frozen_run, st_stage_plan *sp, const size_t *teacher,
                      const size_t *teacher_load) {
    sp->at_step = s->at_step;
    sp->modules = s->modules;
    snprintf(sp->layers_spec, sizeof sp->layers_spec, "%s", s->layers_spec);
    sp->n_trainable = st_model_grad_offsets(m, s->layers, s->modules, goff);
    sp->n_pad = (sp->n_trainable + (size_t)world - 1) / (size_t)world * (size_t)world;
    sp->shard = sp->n_pad / (size_t)world;
    for (int i = 0; i < m->n_params; i++) sp->n_trainable_params += goff[i] >= 0;
    /* st_comm_reshard_optim's old moments: gathered whole (old_m + old_v), or at ZeRO-3 the old shards kept
     * until they are moved into the new ones (comm.c reshard_moments; on a device in pieces through a gather
     * slot, comm_zero3_dev.c st_z3dev_move_moments), unless SHARDTUNE_ZERO3_RESHARD=whole */
    const char *how = getenv("SHARDTUNE_ZERO3_RESHARD");
    int moved = c->sharding.stage == 3 && !(how && !strcmp(how, "whole"));
    sp->transition_extra = 2 * (moved ? prev_pad / (size_t)world : prev_pad) * sizeof(float);
    /* + the old weights: at ZeRO-3 this rank's old parts (compact and frozen shards, fp32 at most) beside the
     * new ones until they are moved (comm.c reshard_weights; on a device st_z3dev_reshard, freed before the
     * new moments are made); whole on every rank under SHARDTUNE_ZERO3_RESHARD=whole */
    size_t old_parts = (m->n_weights + (size_t)world - 1) / (size_t)world + 1;
    if (c->sharding.stage == 3 && prev_pad)
        sp->transition_extra += (moved ? old_parts : m->n_weights) * sizeof(float);
    sp->ranks = calloc((size_t)world, sizeof *sp->ranks);
    if (!sp->ranks) return st_fail(ST_ENOMEM, "out of memory");
    for (int r = 0; r < world; r++)
        plan_rank(c, m, goff, frozen_run, sp, world, r, &sp->ranks[r], teacher[r], teacher_load[r]);
    return 0;
}

int st_plan_build(const st_config *c, const st_model *m, int world, st_plan *out) {
    memset(out, 0, sizeof *out);
    if (world < 1) return st_fail(ST_EINVAL, "--ranks %d must be at least 1", world);
    if (c->sharding.stage < 0 || c->sharding.stage > 3)
        return st_fail(ST_ECONFIG, "sharding.stage %d is not supported (0 to 3)", c->sharding.stage);
    int rc = st_model_check_seq_len(&m->cfg, c->train.seq_len + st_prompt_tokens(m));
    if (rc) return rc;
    out->world = world;
    out->zero_stage = c->sharding.stage;
    out->precision = c->precision;
    out->act_ckpt = c->memory.activation_checkpointing;
    out->micro_batch = c->train.micro_batch;
    out->grad_accum = c->train.grad_accum;
    out->seq_len = c->train.seq_len;
    out->n_weights = m->n_weights;
    out->n_params = m->n_params;
    size_t *teacher = calloc(2 * (size_t)world, sizeof(size_t)); /* per rank: held, and on top at load */
    if (!teacher) return st_fail(ST_ENOMEM, "out of memory");
    if ((rc = teacher_bytes(c, world, teacher, teacher + world))) {
        free(teacher);
        return rc;
    }
    st_stage_list stages;
    rc = st_plan_stages(c, m, &stages);
    if (rc) {
        free(teacher);
        return rc;
    }
    long *goff = malloc((size_t)m->n_params * sizeof(long));
    long *frozen_run = malloc((size_t)m->n_params * sizeof(long)); /* -1: no stage trains it (grad_offset style) */
    out->stages = calloc((size_t)stages.n, sizeof *out->stages);
    if (!goff || !frozen_run || !out->stages) rc = st_fail(ST_ENOMEM, "out of memory");
    for (int i = 0; !rc && i < m->n_params; i++) frozen_run[i] = -1;
    for (int i = 0; !rc && i < stages.n; i++) {
        st_model_grad_offsets(m, stages.stages[i].layers, stages.stages[i].modules, goff);
        for (int k = 0; k < m->n_params; k++)
            if (goff[k] >= 0) frozen_run[k] = 0;
    }
    size_t prev_pad = 0;
    for (int i = 0; !rc && i < stages.n; i++) {
        st_stage_plan *sp = &out->stages[i];
        out->n_stages++;
        rc = plan_stage(c, m, &stages.stages[i], prev_pad, world, goff, frozen_run, sp, teacher, teacher + world);
        if (rc) break;
        /* setup happens in the first stage's layout (stage 3 streams only this rank's parts in) */
        for (int r = 0; i == 0 && r < world; r++) {
            if (sp->ranks[r].at_load > out->load_bytes) out->load_bytes = sp->ranks[r].at_load;
            if (sp->ranks[r].at_load > out->peak) out->peak = sp->ranks[r].at_load;
        }
        for (int r = 0; r < world; r++) /* a checkpoint may be written in any stage */
            if (sp->ranks[r].at_ckpt > out->peak) out->peak = sp->ranks[r].at_ckpt;
        prev_pad = sp->n_pad;
        /* entering a stage, the gathered old moments coexist first with the old buffers, then the new */
        for (int r = 0; r < world; r++) {
            size_t held = sp->ranks[r].total + (i > 0 ? sp->ranks[r].enter_fp32 : 0);
            if (i > 0 && out->stages[i - 1].ranks[r].total > held) held = out->stages[i - 1].ranks[r].total;
            if (held + sp->transition_extra > out->peak) out->peak = held + sp->transition_extra;
        }
    }
    if (!rc) {
        out->final_stage = st_stage_at(&stages, c->train.steps > 0 ? c->train.steps - 1 : 0);
        const st_rank_plan *fr = out->stages[out->final_stage].ranks;
        out->save_extra = fr[0].at_save > fr[0].total ? fr[0].at_save - fr[0].total : 0;
        for (int r = 0; r < world; r++)
            if (fr[r].at_save > out->peak) out->peak = fr[r].at_save;
        out->export_bytes = m->lora || m->prompt ? 0 : tensor_io_bytes(m);
        out->rank_peak = calloc((size_t)world, sizeof *out->rank_peak);
        if (!out->rank_peak) rc = st_fail(ST_ENOMEM, "out of memory");
        for (int r = 0; !rc && r < world; r++) {
            size_t peak = out->stages[0].ranks[r].at_load;
            for (int k = 0; k < out->n_stages; k++) {
                const st_rank_plan *rp = &out->stages[k].ranks[r];
                size_t held = rp->total + (k > 0 ? rp->enter_fp32 : 0); /* the new frozen shard in fp32 first */
                if (k > 0 && out->stages[k - 1].ranks[r].total > held) held = out->stages[k - 1].ranks[r].total;
                held += out->stages[k].transition_extra;
                if (held > peak) peak = held;
                if (rp->at_ckpt > peak) peak = rp->at_ckpt;
            }
            if (fr[r].at_save > peak) peak = fr[r].at_save;
            out->rank_peak[r] = peak;
            if (peak > out->peak) out->peak = peak;
        }
    }
    free(goff);
    free(frozen_run);
    free(teacher);
    st_stage_list_free(&stages);
    if (rc) st_plan_free(out);
    return rc;
}

void st_plan_free(st_plan *p) {
    free(p->rank_peak);
    for (int i = 0; p->stages && i < p->n_stages; i++) free(p->stages[i].ranks);
    free(p->stages);
    memset(p, 0, sizeof *p);
}

/* ---- the Plan message ---- */

int st_plan_pack(const st_stage_list *l, int n_layer, int world, int zero_stage, uint8_t **buf, size_t *len) {
    Shardtune__Plan plan = SHARDTUNE__PLAN__INIT;
    Shardtune__PlanStage *st = calloc((size_t)l->n, sizeof *st);
    Shardtune__PlanStage **sp = calloc((size_t)l->n, sizeof *sp);
    if (!st || !sp) { free(st); free(sp); return st_fail(ST_ENOMEM, "out of memory packing the plan"); }
    plan.version = 1;
    plan.world_size = world;
    plan.zero_stage = zero_stage;
    plan.n_layer = n_layer;
    for (int i = 0; i < l->n; i++) {
        shardtune__plan_stage__init(&st[i]);
        st[i].at_step = l->stages[i].at_step;
        st[i].layer_mask.data = l->stages[i].layers;
        st[i].layer_mask.len = (size_t)n_layer;
        st[i].modules = l->stages[i].modules;
        st[i].train_layers = (char *)l->stages[i].layers_spec;
        sp[i] = &st[i];
    }
    plan.n_stages = (size_t)l->n;
    plan.stages = sp;
    *len = shardtune__plan__get_packed_size(&plan);
    *buf = malloc(*len ? *len : 1);
    int rc = *buf ? 0 : st_fail(ST_ENOMEM, "out of memory packing the plan");
    if (!rc) shardtune__plan__pack(&plan, *buf);
    free(st);
    free(sp);
    return rc;
}

int st_plan_unpack(const uint8_t *buf, size_t len, int n_layer, st_stage_list *out) {
    memset(out, 0, sizeof *out);
    Shardtune__Plan *p = shardtune__plan__unpack(NULL, len, buf);
    if (!p) return st_fail(ST_EFORMAT, "the plan broadcast by rank 0 does not decode");
    int rc = 0;
    if (p->n_layer != n_layer || p->n_stages == 0 || p->n_stages > 100000)
        rc = st_fail(ST_EFORMAT, "the plan from rank 0 is for %d layers and %zu stages; this rank's model has %d",
                     p->n_layer, p->n_stages, n_layer);
    if (!rc) {
        out->stages = calloc(p->n_stages, sizeof *out->stages);
        if (!out->stages) rc = st_fail(ST_ENOMEM, "out of memory unpacking the plan");
    }
    for (size_t i = 0; !rc && i < p->n_stages; i++) {
        const Shardtune__PlanStage *ps = p->stages[i];
        st_stage *s = &out->stages[i];
        if (ps->layer_mask.len != (size_t)n_layer || (i > 0 && ps->at_step <= p->stages[i - 1]->at_step)) {
            rc = st_fail(ST_EFORMAT, "the plan from rank 0 has a malformed stage %zu", i);
            break;
        }
        s->at_step = ps->at_step;
        s->modules = ps->modules;
        s->layers = malloc((size_t)n_layer);
        if (!s->layers) { rc = st_fail(ST_ENOMEM, "out of memory unpacking the plan"); break; }
        memcpy(s->layers, ps->layer_mask.data, (size_t)n_layer);
        snprintf(s->layers_spec, sizeof s->layers_spec, "%s", ps->train_layers ? ps->train_layers : "");
        out->n++;
    }
    shardtune__plan__free_unpacked(p, NULL);
    if (rc) st_stage_list_free(out);
    return rc;
}
