/* train_samples.c — eval.generate: sample answers during training. Every eval.generate.every_steps steps
 * (and at the end) the ranks generate answers to the prompts of eval.generate.prompts from the current
 * weights, a group (embeddings, layer, head) at a time: at sharding.stage 3 each group is gathered and
 * given back (the ranks in lockstep, st_gen_params.sync); under lora / DoRA / qlora each group is the
 * base's (dequantized) with the adapters folded in, as `generate --adapter` folds the exported adapter;
 * a prompt-learning table leads every sequence as under `generate --adapter`), with generate's own code
 * (st_gen_run_model: prompts split across ranks in whole batches,
 * answers gathered on rank 0 in input order), so they equal `shardtune generate` on the checkpoint of the
 * same step. Rank 0 appends one line per prompt to RUN_DIR/samples.jsonl ({"step", "id", "prompt",
 * "output", "output_ids", "finish_reason"}) and publishes each as a monitor Event of kind "sample" (text
 * "ID: OUTPUT"). On resume, lines after the resumed step are dropped (as metrics.jsonl's). */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "common/error.h"
#include "common/json.h"
#include "common/util.h"
#include "coordinator/generate/gen_run.h"
#include "coordinator/generate/gen_text.h"
#include "coordinator/trainer/train_internal.h"
#include "worker/comm.h"
#include "worker/lora.h"
#include "worker/qlora.h"

struct st_train_samples {
    st_prompt_set ps;
    st_gen_flags f;
    char path[ST_CFG_PATH_MAX + 32]; /* RUN_DIR/samples.jsonl */
};

/* Rank 0: samples.jsonl keeps only the lines of steps <= keep_upto (a resumed run redoes the others). */
static int trim_samples(const char *path, int64_t keep_upto) {
    char *text = NULL;
    size_t len = 0;
    if (st_read_file(path, &text, &len)) return 0; /* no file yet */
    st_strbuf keep = {0};
    for (char *line = text; line && *line;) {
        char *nl = strchr(line, '\n');
        size_t n = nl ? (size_t)(nl - line) + 1 : strlen(line);
        st_json *row = NULL;
        if (st_json_parse(line, nl ? (size_t)(nl - line) : n, &row) == 0 &&
            st_json_get_int(row, "step", INT64_MAX, NULL) <= keep_upto)
            st_strbuf_append(&keep, line, n);
        st_json_free(row);
        line = nl ? nl + 1 : NULL;
    }
    free(text);
    int rc = keep.failed ? st_fail(ST_ENOMEM, "out of memory trimming %s", path)
                         : st_write_file_atomic(path, keep.data ? keep.data : "", keep.len);
    st_strbuf_free(&keep);
    return rc;
}

/* Checks what can be checked before training: token ids in the vocabulary and within the positions
 * generation can use; text prompts (and eval.generate.chat) need the model's tokenizer, and every text
 * prompt is encoded once here (chat template included), so a bad line fails now, not at the first sample. */
static int check_prompts(const trainer *t, const st_prompt_set *ps) {
    const char *file = t->cfg->eval.generate.prompts;
    int chat = t->cfg->eval.generate.chat, text = chat;
    int limit = st_gen_prompt_positions(&t->model); /* a prompt's virtual tokens lead */
    for (int i = 0; i < ps->n; i++) {
        const st_prompt *p = &ps->p[i];
        text |= p->is_text;
        if (p->is_text) continue;
        if (p->n_ids > limit)
            return st_fail(ST_ECONFIG, "eval.generate.prompts: %s line %ld has %d tokens, more than the %d positions "
                           "of the model", file, p->line_no, p->n_ids, limit);
        for (int k = 0; k < p->n_ids; k++)
            if (p->ids[k] < 0 || p->ids[k] >= t->model.cfg.vocab)
                return st_fail(ST_ECONFIG, "eval.generate.prompts: %s line %ld: token %d is outside the model's "
                               "vocabulary (%d)", file, p->line_no, p->ids[k], t->model.cfg.vocab);
    }
    if (!text) return 0;
    st_gen_text *tok = NULL;
    int rc = st_gen_text_open(t->cfg->model.path, &tok);
    if (!rc && !tok)
        rc = st_fail(ST_ECONFIG, "eval.generate.prompts: %s has text prompts (or eval.generate.chat) but %s has no "
                     "tokenizer.json (give \"input_ids\")", file, t->cfg->model.path);
    for (int i = 0; !rc && i < ps->n; i++) {
        if (!ps->p[i].is_text) continue;
        int32_t *ids = NULL;
        int n = 0;
        rc = st_gen_text_encode(tok, ps->p[i].line, chat, &ids, &n);
        if (rc) st_fail_context(rc, "eval.generate.prompts: %s line %ld", file, ps->p[i].line_no);
        free(ids);
    }
    st_gen_text_free(tok);
    return rc;
}

int st_trainer_samples_open(trainer *t) {
    const st_config *c = t->cfg;
    if (c->eval.generate.every_steps <= 0) return 0;
    if (c->sharding.stage == 3 && !t->be->host_memory) /* generation reads weights + offset (worker/generate.c) */
        return st_fail(ST_ECONFIG, "eval.generate at sharding.stage 3 is supported on CPU ranks only, not on the %s "
                                   "backend (its ranks hold only their shards)", t->be->name);
    struct st_train_samples *s = calloc(1, sizeof *s);
    if (!s) return st_fail(ST_ENOMEM, "out of memory");
    t->samples = s;
    st_gen_flags_default(&s->f);
    s->f.gp.max_new = c->eval.generate.max_new;
    s->f.gp.temperature = (float)c->eval.generate.temperature;
    s->f.gp.batch = c->eval.generate.batch;
    s->f.gp.seed = (uint64_t)c->eval.generate.seed;
    s->f.chat = c->eval.generate.chat;
    snprintf(s->path, sizeof s->path, "%s/samples.jsonl", c->run_dir);
    int rc = st_prompts_read(c->eval.generate.prompts, &s->ps);
    if (rc) return st_fail_context(rc, "eval.generate.prompts");
    if ((rc = check_prompts(t, &s->ps))) return rc;
    if ((rc = st_gen_params_check(&s->f.gp, &t->model))) return st_fail_context(rc, "eval.generate");
    return t->rank == 0 ? trim_samples(s->path, t->start_step) : 0;
}

void st_trainer_samples_close(trainer *t) {
    if (!t->samples) return;
    st_prompts_free(&t->samples->ps);
    free(t->samples);
    t->samples = NULL;
}

int st_trainer_samples_due(const trainer *t, int64_t completed) {
    int64_t every = t->cfg->eval.generate.every_steps;
    return t->samples && (completed % every == 0 || completed == t->cfg->train.steps);
}

/* A parsed JSON value written back as JSON (the prompt's "messages"). */
static void json_write(st_strbuf *b, const st_json *v) {
    switch (v->type) {
    case ST_JSON_STRING: st_strbuf_json_string(b, v->string); break;
    case ST_JSON_NUMBER:
        if (v->is_integer) st_strbuf_printf(b, "%lld", (long long)v->integer);
        else st_strbuf_printf(b, "%.17g", v->number);
        break;
    case ST_JSON_ARRAY:
    case ST_JSON_OBJECT:
        st_strbuf_append(b, v->type == ST_JSON_ARRAY ? "[" : "{", 1);
        for (size_t i = 0; i < v->count; i++) {
            if (i) st_strbuf_append(b, ", ", 2);
            if (v->type == ST_JSON_OBJECT) {
                st_strbuf_json_string(b, v->keys[i]);
                st_strbuf_append(b, ": ", 2);
            }
            json_write(b, v->items[i]);
        }
        st_strbuf_append(b, v->type == ST_JSON_ARRAY ? "]" : "}", 1);
        break;
    case ST_JSON_NULL: st_strbuf_printf(b, "null"); break;
    default: st_strbuf_printf(b, "%s", v->boolean ? "true" : "false");
    }
}

/* The prompt as given: the "prompt" string, the "messages" array, or the input ids. */
static void write_prompt(st_strbuf *b, const st_prompt *p) {
    st_json *v = NULL;
    const st_json *x = NULL;
    if (st_json_parse(p->line, strlen(p->line), &v) == 0 && !p->ids) {
        x = st_json_get(v, "prompt");
        if (!x) x = st_json_get(v, "messages");
    }
    if (x) {
        json_write(b, x);
    } else {
        st_strbuf_append(b, "[", 1);
        for (int k = 0; k < p->n_ids; k++) st_strbuf_printf(b, "%s%d", k ? ", " : "", p->ids[k]);
        st_strbuf_append(b, "]", 1);
    }
    st_json_free(v);
}

/* Rank 0: one samples.jsonl line per prompt, appended, and one monitor event each. */
static int write_samples(trainer *t, int64_t step, const st_answer *ans) {
    const struct st_train_samples *s = t->samples;
    st_strbuf b = {0};
    for (int i = 0; i < s->ps.n; i++) {
        st_strbuf_printf(&b, "{\"step\": %lld, \"id\": ", (long long)step);
        st_strbuf_json_string(&b, s->ps.p[i].id);
        st_strbuf_printf(&b, ", \"prompt\": ");
        write_prompt(&b, &s->ps.p[i]);
        st_strbuf_printf(&b, ", \"output\": ");
        if (ans[i].text) st_strbuf_json_string(&b, ans[i].text);
        else st_strbuf_printf(&b, "null");
        st_strbuf_printf(&b, ", \"output_ids\": [");
        st_strbuf line = {0}; /* the event text: the answer, or its ids without a tokenizer */
        for (int k = 0; k < ans[i].n; k++) {
            st_strbuf_printf(&b, "%s%d", k ? ", " : "", ans[i].ids[k]);
            if (!ans[i].text) st_strbuf_printf(&line, "%s%d", k ? " " : "", ans[i].ids[k]);
        }
        st_strbuf_printf(&b, "], \"finish_reason\": \"%s\"}\n", st_gen_finish_name(ans[i].finish));
        if (t->mon)
            st_monitor_event(t->mon, "sample", step, "%s: %s", s->ps.p[i].id,
                             ans[i].text ? ans[i].text : line.data ? line.data : "");
        st_strbuf_free(&line);
    }
    int rc = 0;
    if (b.failed) rc = st_fail(ST_ENOMEM, "out of memory writing %s", s->path);
    FILE *f = rc ? NULL : fopen(s->path, "a");
    if (!rc && !f) rc = st_fail(ST_EIO, "cannot open %s: %s", s->path, strerror(errno));
    if (f) {
        if (fwrite(b.data, 1, b.len, f) != b.len) rc = st_fail(ST_EIO, "cannot write %s", s->path);
        if (fclose(f) != 0 && !rc) rc = st_fail(ST_EIO, "cannot write %s: %s", s->path, strerror(errno));
    }
    st_strbuf_free(&b);
    return rc;
}

/* Under LoRA (qlora and DoRA too) generation reads a view of the base registry over `w`, a buffer laid
 * out as the base weights whose groups this view's residency hooks fill one at a time: the trainer model's
 * group acquired (its ZeRO-3 gathers), copied (QLoRA under bf16: the embedding,
 * head and dequantized layer exist in bf16 only, widened: the values the training forward reads), each adapter of the group folded
 * in with st_lora_merge_range_at (the fold `generate --adapter` applies to the exported adapter), the
 * trainer's group released; released groups give their pages back, so the copy holds one group (the
 * CPU backend; a device backend keeps what it touched). QLoRA's quantized weights have no place in the
 * trainer's buffer (worker/qlora.h: the fused path; unfused they share one matmul-unit scratch): the view
 * gives them their own places (one layer's, after the base) and dequantizes each straight into its place
 * (st_qlora_dequant_param; unfused: loads it into the scratch, st_qlora_load, and copies it). */
typedef struct {
    const st_model *tm; /* the trainer's model */
    float *w;           /* the view's weights (backend memory) */
    st_param *params;   /* QLoRA: the view's registry (its own offsets, below), NULL: the trainer's */
    int rc;             /* first failure inside a hook */
} merged_view;

static void merged_acquire(void *ctx, int first, int last) {
    merged_view *v = ctx;
    const st_model *m = v->tm;
    int lf, ll;
    st_lora_layer_params(m, m->params[first].layer, &lf, &ll);
    st_model_acquire(m, first, last);
    st_model_acquire(m, lf, ll);
    for (int i = first; i < last; i++) { /* QLoRA's bf16-only part (below n_w16, worker/qlora.h): widened */
        const st_param *p = &m->params[i];
        size_t at = v->params ? v->params[i].offset : p->offset;
        int rc = 0;
        if (st_qlora_fused(m) && st_qlora_holds(m, i)) /* no scratch: dequantized straight into the view */
            rc = st_qlora_dequant_param(m, i, v->w + at, st_qlora_held_bf16(m));
        else {
            st_qlora_load(m, i); /* unfused QLoRA: its matmul unit dequantized into the trainer's scratch */
            if (p->offset < m->n_w16) m->be->from_bf16(v->w + at, m->weights_bf16 + p->offset, p->numel);
            else if (st_model_fp32_dropped(m, i)) st_model_param_fp32(m, i, 0, p->numel, v->w + at); /* bf16 only */
            else m->be->copy(v->w + at, m->weights + p->offset, p->numel * sizeof(float));
        }
        /* the merge (DoRA's norms from dst) writes dst + its trainer offset (offsets, not pointers: a fused
         * QLoRA parameter's trainer offset is virtual, worker/qlora.h) */
        if (!rc) rc = st_lora_merge_range_at(m, v->w, at, i);
        if (rc && !v->rc) v->rc = rc;
    }
    st_model_release(m, lf, ll);
    st_model_release(m, first, last);
}

static void merged_release(void *ctx, int first, int last) {
    merged_view *v = ctx;
    const st_model *m = v->tm;
    const st_param *vp = v->params ? v->params : m->params;
    if (!m->be->host_memory) return;
    for (int i = first; i < last; i++)
        st_comm_discard(v->w, sizeof(float), vp[i].offset, vp[i].offset + vp[i].numel);
}

/* The model generation reads: the trainer's own (its ZeRO-3 hooks gather each group), or under LoRA the
 * merged view above over *owned (backend memory the caller frees). */
static int gen_model(const trainer *t, st_model *g, merged_view *v, float **owned) {
    const st_model *m = &t->model;
    *g = *m;
    *owned = NULL;
    /* without adapters the view is needed only for a bf16-only part without fp32 storage (a device's frozen
     * weights, worker/model.h st_model_bind_frozen_bf16): the whole registry over a buffer of its own */
    int plain = !m->lora && m->n_w16 && !m->qlora;
    if (!m->lora && !plain) return 0;
    const st_backend *be = m->be;
    /* QLoRA: the quantized weights share one matmul unit's scratch in the trainer's layout; the view gives
     * them their own places, a layer's after n_base_weights (the view holds one layer at a time) */
    size_t extra = 0, layer = 0;
    v->params = NULL;
    if (m->qlora) {
        v->params = malloc((size_t)m->n_base_params * sizeof(st_param) + 1);
        if (!v->params) return st_fail(ST_ENOMEM, "eval.generate: out of memory");
        memcpy(v->params, m->params, (size_t)m->n_base_params * sizeof(st_param));
        int cur = -1;
        for (int i = 0; i < m->n_base_params; i++) {
            if (!st_qlora_holds(m, i)) continue;
            if (m->params[i].layer != cur) { cur = m->params[i].layer; layer = 0; }
            v->params[i].offset = m->n_base_weights + layer;
            layer += m->params[i].numel;
            if (layer > extra) extra = layer;
        }
    }
    size_t nw = plain ? m->n_weights : m->n_base_weights + extra;
    float *w = be->alloc(nw * sizeof(float) + sizeof(float));
    if (!w) {
        free(v->params);
        return st_fail(ST_ENOMEM, "eval.generate: out of memory for the merged weights (%.1f MB)", nw * 4.0 / 1e6);
    }
    v->tm = m;
    v->w = w;
    v->rc = 0;
    g->weights = w;
    g->weights_bf16 = NULL;
    if (plain) {
        g->n_w16 = 0; /* the view holds every parameter in fp32 */
        g->w32_dropped = NULL; /* the prompt's tensors are copied in by the same hooks (prompt_table acquires them) */
        st_residency_hooks h = {.acquire = merged_acquire, .release = merged_release, .ctx = v};
        st_model_set_residency(g, &h);
        *owned = w;
        return 0;
    }
    if (v->params) g->params = v->params;
    g->n_params = m->n_base_params;
    g->n_weights = m->n_base_weights + extra;
    g->n_base_params = 0;
    g->n_base_weights = 0;
    g->lora = NULL;
    g->qlora = NULL;
    st_residency_hooks h = {.acquire = merged_acquire, .release = merged_release, .ctx = v};
    st_model_set_residency(g, &h); /* the trainer's ZeRO-3 hooks (embed_rows, grad_ready) do not apply */
    *owned = w;
    return 0;
}

/* eval.generate's lockstep under ZeRO-3 (st_gen_params.sync): whether any rank still generates. */
static int any_busy(void *ctx, int busy) {
    const trainer *t = ctx;
    int any = busy;
    MPI_Allreduce(MPI_IN_PLACE, &any, 1, MPI_INT, MPI_MAX, t->comm);
    return any;
}

int st_trainer_samples_run(trainer *t, int64_t completed) {
    struct st_train_samples *s = t->samples;
    st_trainer_phase(t, ST_PHASE_EVAL);
    st_answer *ans = NULL;
    st_model g;
    merged_view v;
    float *owned = NULL;
    int pe = 0;
    /* generation reads fp32 weights (worker/generate.c): the frozen ones held in bf16 only widened back for it,
     * exactly, and given back after; under LoRA the merged view widens them one group at a time instead */
    if (!t->model.lora && t->dp.stage == 3) st_comm_restore_fp32(&t->dp, &t->model); /* this rank's parts */
    else if (!t->model.lora) st_model_restore_fp32(&t->model);
    int rc = st_trainer_agree(t, gen_model(t, &g, &v, &owned));
    if (!rc) {
        st_gen_flags f = s->f;
        if (t->model.acquire && t->world > 1) { /* ZeRO-3: the gathers are collective */
            f.gp.sync = any_busy;
            f.gp.sync_ctx = t;
        }
        rc = st_gen_run_model(&g, t->cfg->model.path, &f, &s->ps, t->comm, &ans, NULL, NULL, &pe);
        if (!rc && owned) rc = st_trainer_agree(t, v.rc);
        else if (rc) t->print_error = pe; /* only the rank whose st_error() holds the cause prints */
        if (rc && t->print_error) st_fail_context(rc, "eval.generate at step %lld", (long long)completed);
    }
    if (owned) t->model.be->free(owned);
    if (owned) free(v.params);
    st_trainer_hold_bf16(t);
    if (!rc) rc = st_trainer_agree(t, t->rank == 0 ? write_samples(t, completed, ans) : 0);
    st_answers_free(ans, t->rank == 0 ? s->ps.n : 0);
    st_trainer_phase(t, ST_PHASE_IDLE);
    return rc;
}
