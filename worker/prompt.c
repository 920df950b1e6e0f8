/* prompt.c — prompt tuning on a st_model (see prompt.h). Host loops: the CPU backend only. */
#define _DEFAULT_SOURCE /* strdup */
#include "worker/prompt.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/error.h"
#include "common/rng.h"

struct st_prompt {
    int V;
    int prefix;         /* prefix tuning: the table is [V, L*2*KVD], per-layer keys/values */
    int param;          /* registry index of prompt_embeddings */
    int B, T;           /* the reserved batch: B sequences of T real tokens */
    int32_t *in, *tg;   /* [B * (V + T)] widened batch */
    float *w;
    char *init_text, *tokenizer_dir; /* TEXT init, else NULL */
};

int st_prompt_tokens(const st_model *m) { return m->prompt ? m->prompt->V : 0; }
int st_prompt_param(const st_model *m) { return m->prompt ? m->prompt->param : -1; }

void st_prompt_free(st_prompt *p) {
    if (!p) return;
    free(p->in);
    free(p->tg);
    free(p->w);
    free(p->init_text);
    free(p->tokenizer_dir);
    free(p);
}

const char *st_prompt_init_text(const st_model *m) { return m->prompt ? m->prompt->init_text : NULL; }
const char *st_prompt_tokenizer_dir(const st_model *m) { return m->prompt ? m->prompt->tokenizer_dir : NULL; }

static int check(const st_model *m, int V, const char *mode) {
    if (V < 1) return st_fail(ST_ECONFIG, "finetune.%s.virtual_tokens must be >= 1, got %d", mode[1] == 'r' ? "prefix" : "prompt", V);
    if (m->lora || m->prompt) return st_fail(ST_EINVAL, "the model already has adapters");
    if (m->weights_bf16) return st_fail(ST_ECONFIG, "finetune.mode %s needs precision fp32 (bf16 is not supported yet)", mode);
    if (m->be && !m->be->host_memory)
        return st_fail(ST_ECONFIG, "finetune.mode %s runs on the cpu backend only for now (%s backend)", mode, m->be->name);
    return 0;
}

/* Appends the registry entry; grows the weight buffer (when the model has weights) with init rows. */
static int add_param(st_model *m, int V, int C, uint64_t seed) {
    st_param *np = realloc(m->params, (size_t)(m->n_params + 1) * sizeof *np);
    if (!np) return st_fail(ST_ENOMEM, "out of memory adding the prompt to the registry");
    m->params = np;
    st_param *p = &m->params[m->n_params];
    memset(p, 0, sizeof *p);
    snprintf(p->name, sizeof p->name, "prompt_embeddings");
    p->ndim = 2;
    p->shape[0] = V;
    p->shape[1] = C;
    p->numel = (size_t)V * C;
    p->offset = m->n_weights;
    p->layer = -1;
    p->kind = ST_MOD_PROMPT;
    p->grad_offset = -1;
    m->n_base_params = m->n_params;
    m->n_base_weights = m->n_weights;
    m->prompt->param = m->n_params++;
    m->n_weights += p->numel;
    if (!m->be) return 0; /* registry-only model */
    float *nw = m->be->alloc(m->n_weights * sizeof(float));
    if (!nw) return st_fail(ST_ENOMEM, "cannot allocate %.1f MB for weights with a prompt", m->n_weights * 4.0 / 1e6);
    m->be->copy(nw, m->weights, m->n_base_weights * sizeof(float));
    st_rng rng;
    st_rng_seed(&rng, seed, 0x50726f6dull); /* "Prom": its own stream */
    for (size_t j = 0; j < p->numel; j++) nw[m->n_base_weights + j] = (float)st_rng_normal(&rng);
    m->be->free(m->weights);
    m->weights = nw;
    return 0;
}

static int attach(st_model *m, int V, int prefix, uint64_t seed) {
    int rc = check(m, V, prefix ? "prefix_tuning" : "prompt_tuning");
    if (rc) return rc;
    m->prompt = calloc(1, sizeof *m->prompt);
    if (!m->prompt) return st_fail(ST_ENOMEM, "out of memory for the prompt");
    m->prompt->V = V;
    m->prompt->prefix = prefix;
    rc = add_param(m, V, prefix ? st_prefix_width(&m->cfg) : m->cfg.d_model, seed);
    if (rc) {
        st_prompt_free(m->prompt);
        m->prompt = NULL;
    }
    return rc;
}

int st_prompt_attach(st_model *m, int V, uint64_t seed) { return attach(m, V, 0, seed); }
int st_prefix_attach(st_model *m, int V, uint64_t seed) { return attach(m, V, 1, seed); }
int st_prompt_is_prefix(const st_model *m) { return m->prompt && m->prompt->prefix; }
int st_prefix_width(const st_model_config *c) { return c->n_layer * 2 * c->n_kv_head * c->head_dim; }

int st_prompt_init_ids(st_model *m, const int32_t *ids, int n, const char *text, const char *tokenizer_dir) {
    st_prompt *p = m->prompt;
    if (p && p->prefix) return st_fail(ST_ECONFIG, "prefix tuning has no TEXT init");
    if (!p || n < 1) return st_fail(ST_EINVAL, "prompt TEXT init needs a prompt and at least one token");
    int C = m->cfg.d_model;
    float *dst = m->weights + m->params[p->param].offset;
    for (int v = 0; v < p->V; v++) {
        int32_t id = ids[v % n];
        if (id < 0 || id >= m->cfg.vocab) return st_fail(ST_EINVAL, "prompt init token %d is outside the vocabulary", id);
        memcpy(dst + (size_t)v * C, m->weights + m->params[0].offset + (size_t)id * C, (size_t)C * sizeof(float));
    }
    st_model_weights_changed(m);
    free(p->init_text);
    free(p->tokenizer_dir);
    p->init_text = text ? strdup(text) : NULL;
    p->tokenizer_dir = tokenizer_dir ? strdup(tokenizer_dir) : NULL;
    if ((text && !p->init_text) || (tokenizer_dir && !p->tokenizer_dir)) return st_fail(ST_ENOMEM, "out of memory");
    return 0;
}

int st_prompt_reserve(st_model *m, int B, int T) {
    st_prompt *p = m->prompt;
    size_t n = (size_t)B * (size_t)(p->V + T);
    free(p->in);
    free(p->tg);
    free(p->w);
    p->in = calloc(n, sizeof *p->in);
    p->tg = calloc(n, sizeof *p->tg);
    p->w = calloc(n, sizeof *p->w);
    if (!p->in || !p->tg || !p->w) return st_fail(ST_ENOMEM, "out of memory for the prompt's batch");
    p->B = B;
    p->T = T;
    return 0;
}

void st_prompt_widen(st_model *m, const int32_t *in, const int32_t *tg, const float *w, const int32_t **in_out,
                     const int32_t **tg_out, const float **w_out) {
    st_prompt *p = m->prompt;
    int V = p->V, T = p->T;
    for (int b = 0; b < p->B; b++) {
        size_t o = (size_t)b * (V + T), s = (size_t)b * T;
        /* virtual rows: label -100 in peft, i.e. weight 0 (their token is a placeholder the prompt replaces) */
        memset(p->in + o, 0, (size_t)V * sizeof *p->in);
        memset(p->tg + o, 0, (size_t)V * sizeof *p->tg);
        memset(p->w + o, 0, (size_t)V * sizeof *p->w);
        memcpy(p->in + o + V, in + s, (size_t)T * sizeof *in);
        memcpy(p->tg + o + V, tg + s, (size_t)T * sizeof *tg);
        memcpy(p->w + o + V, w + s, (size_t)T * sizeof *w);
    }
    *in_out = p->in;
    *tg_out = p->tg;
    *w_out = p->w;
}

void st_prompt_forward(st_model *m, float *x) {
    const st_prompt *p = m->prompt;
    if (p->prefix) return; /* the virtual rows only carry the prefix keys/values (st_prefix_layer_forward) */
    int V = p->V, C = m->cfg.d_model, Tm = V + p->T;
    const float *pe = m->weights + m->params[p->param].offset;
    const float *wpe = m->cfg.family == ST_FAMILY_GPT2 ? m->weights + m->params[1].offset : NULL;
    for (int b = 0; b < p->B; b++)
        for (int v = 0; v < V; v++) {
            float *row = x + ((size_t)b * Tm + v) * C;
            for (int j = 0; j < C; j++) row[j] = pe[(size_t)v * C + j] + (wpe ? wpe[(size_t)v * C + j] : 0.0f);
        }
}

void st_prompt_backward(st_model *m, const float *dx) {
    const st_prompt *p = m->prompt;
    const st_param *pp = &m->params[p->param];
    if (p->prefix || pp->grad_offset < 0 || !m->grads) return; /* prefix: st_prefix_layer_backward */
    int V = p->V, C = m->cfg.d_model, Tm = V + p->T;
    float *g = m->grads + pp->grad_offset;
    for (int b = 0; b < p->B; b++)
        for (size_t k = 0; k < (size_t)V * C; k++) g[k] += dx[(size_t)b * Tm * C + k];
}

void st_prompt_real_rows(const st_model *m, float *x) {
    const st_prompt *p = m->prompt;
    for (int b = 0; b < p->B; b++) /* destination never past the source: ascending b is safe */
        memmove(x + (size_t)b * p->T, x + (size_t)b * (p->V + p->T) + p->V, (size_t)p->T * sizeof *x);
}

/* Prefix row v of layer l: keys at column 2l * KVD, values at (2l + 1) * KVD (peft's view [V, L*2, KVH, hd]). */
static size_t prefix_col(const st_model *m, int l, int kv) {
    return (size_t)(2 * l + kv) * m->cfg.n_kv_head * m->cfg.head_dim;
}

void st_prefix_layer_forward(st_model *m, int l, float *qkv) {
    const st_prompt *p = m->prompt;
    if (!p || !p->prefix) return;
    const st_model_config *c = &m->cfg;
    int V = p->V, Tm = V + p->T, W = st_prefix_width(c), KVD = c->n_kv_head * c->head_dim;
    size_t Q = (size_t)(c->n_head + 2 * c->n_kv_head) * c->head_dim, qd = (size_t)c->n_head * c->head_dim;
    const float *tab = m->weights + m->params[p->param].offset;
    for (int b = 0; b < p->B; b++)
        for (int v = 0; v < V; v++) {
            float *row = qkv + ((size_t)b * Tm + v) * Q;
            memcpy(row + qd, tab + (size_t)v * W + prefix_col(m, l, 0), (size_t)KVD * sizeof(float));
            memcpy(row + qd + KVD, tab + (size_t)v * W + prefix_col(m, l, 1), (size_t)KVD * sizeof(float));
        }
}

void st_prefix_layer_backward(st_model *m, int l, float *dqkv) {
    const st_prompt *p = m->prompt;
    if (!p || !p->prefix) return;
    const st_model_config *c = &m->cfg;
    const st_param *pp = &m->params[p->param];
    int V = p->V, Tm = V + p->T, W = st_prefix_width(c), KVD = c->n_kv_head * c->head_dim;
    size_t Q = (size_t)(c->n_head + 2 * c->n_kv_head) * c->head_dim, qd = (size_t)c->n_head * c->head_dim;
    float *g = pp->grad_offset >= 0 && m->grads ? m->grads + pp->grad_offset : NULL;
    for (int b = 0; b < p->B; b++)
        for (int v = 0; v < V; v++) {
            float *row = dqkv + ((size_t)b * Tm + v) * Q;
            for (int kv = 0; kv < 2; kv++) {
                float *d = row + qd + (size_t)kv * KVD;
                if (g) {
                    float *gr = g + (size_t)v * W + prefix_col(m, l, kv);
                    for (int j = 0; j < KVD; j++) gr[j] += d[j];
                }
                /* the virtual rows' own keys/values were replaced: nothing flows back into their residual */
                memset(d, 0, (size_t)KVD * sizeof(float));
            }
        }
}
