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

static int check(const st_model *m, int V) {
    if (V < 1) return st_fail(ST_ECONFIG, "finetune.prompt.virtual_tokens must be >= 1, got %d", V);
    if (m->lora || m->prompt) return st_fail(ST_EINVAL, "the model already has adapters");
    if (m->weights_bf16) return st_fail(ST_ECONFIG, "finetune.mode prompt_tuning needs precision fp32 (bf16 is not supported yet)");
    if (m->be && !m->be->host_memory)
        return st_fail(ST_ECONFIG, "finetune.mode prompt_tuning runs on the cpu backend only for now (%s backend)", m->be->name);
    return 0;
}

/* Appends the registry entry; grows the weight buffer (when the model has weights) with init rows. */
static int add_param(st_model *m, int V, uint64_t seed) {
    int C = m->cfg.d_model;
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

int st_prompt_attach(st_model *m, int V, uint64_t seed) {
    int rc = check(m, V);
    if (rc) return rc;
    m->prompt = calloc(1, sizeof *m->prompt);
    if (!m->prompt) return st_fail(ST_ENOMEM, "out of memory for the prompt");
    m->prompt->V = V;
    rc = add_param(m, V, seed);
    if (rc) {
        st_prompt_free(m->prompt);
        m->prompt = NULL;
    }
    return rc;
}

int st_prompt_init_ids(st_model *m, const int32_t *ids, int n, const char *text, const char *tokenizer_dir) {
    st_prompt *p = m->prompt;
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
    if (pp->grad_offset < 0 || !m->grads) return;
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
