/* prompt.c — prompt learning on a st_model (see prompt.h): prompt tuning, P-tuning's encoders (MLP here,
 * the LSTM core in prompt_lstm.c), prefix tuning with or without its projection. Every mode runs on any
 * backend: the rows move with the backend's copy / copy_cols, the linears are backend matmuls. The LSTM core
 * is host code (a recurrence over the V virtual tokens with fp64 sums, as torch's reference computes it):
 * on a device backend its weights are copied to a host mirror at each encode, its [V, 2H] output up to
 * the device, the output's gradient down, and its tensors' gradients accumulated on the host mirror and
 * copied back (lstm_* below). */
#define _DEFAULT_SOURCE /* strdup */
#include "worker/prompt.h"

#include <stdio.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>

#include "common/error.h"
#include "common/rng.h"
#include "worker/prompt_lstm.h"

struct st_prompt {
    int V;
    int prefix;         /* prefix tuning: the table is [V, L*2*KVD], per-layer keys/values */
    /* an encoder (P-tuning's MLP head, prefix tuning's projection): param is its embedding [V, cin],
     * followed by its `enc` linears (weight, bias); hidden layers are ReLU (P-tuning) or Tanh (prefix) */
    int enc;            /* number of linears: 0 (none), 3 (P-tuning MLP), 2 (prefix projection, P-tuning LSTM) */
    int lstm;           /* P-tuning LSTM: 16 LSTM tensors between the embedding and the linears */
    st_plstm *ls;
    float *lx, *ldx, *lde; /* LSTM: output [V, 2H], its gradient, the embedding's gradient scratch [V, C] */
    float *hw, *hg;     /* LSTM on a device backend: host mirrors of [embedding | 16 LSTM tensors] (weights,
                           gradients), the tensors at mo[k] */
    size_t mo[17];
    float *dlx;         /* LSTM on a device backend: [2, V, 2H] device copies of lx and ldx */
    int tanh_act;
    int cin, hid, cout;
    float *table;       /* [V, cout] encoder output of this forward */
    float *a[2], *r[2], *d[2]; /* [V, hid] pre-activations, activations, their gradients */
    float *dtab;        /* [V, cout] the table's gradient */
    int param;          /* registry index of prompt_embeddings */
    int B, T;           /* the reserved batch: B sequences of T real tokens */
    int32_t *in, *tg;   /* [B * (V + T)] widened batch */
    float *w;
    float *zeros;       /* prefix tuning: 2 * KVD zeros (backend memory) that clear the virtual rows' dk/dv */
    const st_backend *be; /* the backend zeros, table, dtab and a[0] came from (NULL: host memory) */
    char *init_text, *tokenizer_dir; /* TEXT init, else NULL */
};

int st_prompt_tokens(const st_model *m) { return m->prompt ? m->prompt->V : 0; }
int st_prompt_param(const st_model *m) { return m->prompt ? m->prompt->param : -1; }
int st_prompt_param_count(const st_model *m) { return !m->prompt ? 0 : 1 + 16 * m->prompt->lstm + 2 * m->prompt->enc; }
static int lin0(const st_prompt *p) { return 1 + 16 * p->lstm; } /* the first linear's offset from param */
int st_prompt_is_ptuning(const st_model *m) { return m->prompt && m->prompt->enc && !m->prompt->prefix; }
int st_prompt_has_encoder(const st_model *m) { return m->prompt && m->prompt->enc; }
int st_prompt_table_width(const st_model *m) {
    return !m->prompt ? 0 : m->prompt->prefix ? st_prefix_width(&m->cfg) : m->cfg.d_model;
}

void st_prompt_free(st_prompt *p) {
    if (!p) return;
    free(p->in);
    free(p->tg);
    free(p->w);
    float *bufs[] = {p->table, p->a[0], p->dtab, p->zeros, p->dlx};
    for (int i = 0; i < 5; i++)
        if (bufs[i] && p->be) p->be->free(bufs[i]);
        else free(bufs[i]);
    st_plstm_free(p->ls);
    free(p->lx);
    free(p->hw);
    free(p->hg);
    free(p->init_text);
    free(p->tokenizer_dir);
    free(p);
}

const char *st_prompt_init_text(const st_model *m) { return m->prompt ? m->prompt->init_text : NULL; }
const char *st_prompt_tokenizer_dir(const st_model *m) { return m->prompt ? m->prompt->tokenizer_dir : NULL; }

static int check(const st_model *m, int V, const char *mode, int encoder) {
    if (V < 1)
        return st_fail(ST_ECONFIG, "finetune.%s.virtual_tokens must be >= 1, got %d",
                       strcmp(mode, "prefix_tuning") ? "prompt" : "prefix", V);
    if (m->lora || m->prompt) return st_fail(ST_EINVAL, "the model already has adapters");
    if (m->weights_bf16 && !m->n_w16) /* the bf16 copy is sized for the weights before the prompt's tensors (a
                                         bf16-only part's grows with them: st_model_grow_bf16) */
        return st_fail(ST_EINVAL, "finetune.mode %s: the prompt must be attached before precision bf16 is set", mode);
    (void)encoder;
    return 0;
}

/* One registry entry to append: name, shape and init (std > 0: N(0, std); else U(-bound, bound)). */
typedef struct {
    const char *name;
    int64_t d0, d1;
    double std, bound;
} entry;

/* Appends the entries after the base registry (kind ST_MOD_PROMPT, layer -1); grows the weight buffer
 * (when the model has weights) with their init values, drawn in order from one stream of seed. */
static int add_entries(st_model *m, int n, const entry *e, uint64_t seed) {
    st_param *np = realloc(m->params, (size_t)(m->n_params + n) * sizeof *np);
    if (!np) return st_fail(ST_ENOMEM, "out of memory adding the prompt to the registry");
    m->params = np;
    m->n_base_params = m->n_params;
    m->n_base_weights = m->n_weights;
    m->prompt->param = m->n_params;
    for (int k = 0; k < n; k++) {
        st_param *p = &m->params[m->n_params++];
        memset(p, 0, sizeof *p);
        snprintf(p->name, sizeof p->name, "%s", e[k].name);
        p->ndim = e[k].d1 ? 2 : 1;
        p->shape[0] = e[k].d0;
        p->shape[1] = e[k].d1;
        p->numel = (size_t)e[k].d0 * (size_t)(e[k].d1 ? e[k].d1 : 1);
        p->offset = m->n_weights;
        p->layer = -1;
        p->kind = ST_MOD_PROMPT;
        p->grad_offset = -1;
        m->n_weights += p->numel;
    }
    if (!m->be) return 0; /* registry-only model */
    size_t extra = m->n_weights - m->n_base_weights;
    /* a model bound without weights (ZeRO-3 on a device, buffers_external): the prompt's floats only */
    int tail = m->buffers_external && !m->weights;
    size_t w16 = m->n_w16; /* a bf16-only part (st_model_bind_frozen_bf16) has no fp32 place: not allocated */
    float *nw = m->be->alloc((tail ? extra + 1 : m->n_weights - w16) * sizeof(float));
    if (!nw) return st_fail(ST_ENOMEM, "cannot allocate %.1f MB for weights with a prompt", m->n_weights * 4.0 / 1e6);
    float *host = malloc(extra * sizeof(float) + 1);
    if (!host) { m->be->free(nw); return st_fail(ST_ENOMEM, "out of memory initializing the prompt"); }
    if (tail) nw -= m->n_base_weights; /* element offset n_base_weights is the allocation's first */
    else nw -= w16;
    if (!tail && !m->weights_unread)
        m->be->copy(nw + w16, m->weights + w16, (m->n_base_weights - w16) * sizeof(float)); /* else zeros */
    st_rng rng;
    st_rng_seed(&rng, seed, 0x50726f6dull); /* "Prom": its own stream */
    float *dst = host;
    for (int k = 0; k < n; k++)
        for (size_t j = 0; j < m->params[m->prompt->param + k].numel; j++)
            *dst++ = e[k].std > 0 ? (float)(e[k].std * st_rng_normal(&rng))
                                  : (float)(e[k].bound * (2.0 * st_rng_uniform(&rng) - 1.0));
    m->be->copy_to_device(nw + m->n_base_weights, host, extra * sizeof(float));
    free(host);
    if (!tail) m->be->free(m->weights + w16);
    m->weights = nw;
    m->weights_tail_only = tail;
    return st_model_grow_bf16(m, m->n_base_weights); /* a bf16-only part's copy grows with the registry */
}

static int add_param(st_model *m, int V, int C, uint64_t seed) {
    entry e = {"prompt_embeddings", V, C, 1.0, 0.0};
    return add_entries(m, 1, &e, seed);
}

/* Backend memory (host memory for a model without a backend). */
static float *palloc(st_prompt *p, const st_model *m, size_t floats) {
    p->be = m->be;
    return m->be ? m->be->alloc(floats * sizeof(float) + sizeof(float)) : calloc(floats + 1, sizeof(float));
}

/* The encoder's working memory: table and dtab [V, cout], activations [V, hid] x 6. */
static int encoder_buffers(st_prompt *p, const st_model *m) {
    size_t vh = (size_t)p->V * p->hid;
    p->table = palloc(p, m, (size_t)p->V * p->cout);
    p->dtab = palloc(p, m, (size_t)p->V * p->cout);
    p->a[0] = palloc(p, m, 6 * vh);
    if (!p->table || !p->dtab || !p->a[0]) return st_fail(ST_ENOMEM, "out of memory for the prompt encoder");
    p->a[1] = p->a[0] + vh;
    p->r[0] = p->a[1] + vh;
    p->r[1] = p->r[0] + vh;
    p->d[0] = p->r[1] + vh;
    p->d[1] = p->d[0] + vh;
    return 0;
}

/* P-tuning: peft's PromptEncoder (MLP): embedding [V, C] N(0, 1), then Linear(C, H), ReLU, Linear(H, H),
 * ReLU, Linear(H, C), each Linear with torch's default init U(+-1/sqrt(in)) for weight and bias.
 * Prefix projection: peft's PrefixEncoder: embedding [V, D] (D = KVH*hd, its token_dim), Linear(D, H), Tanh,
 * Linear(H, L*2*D), H = D (its default encoder_hidden_size). */
static int add_encoder(st_model *m, int V, int prefix, uint64_t seed) {
    st_prompt *p = m->prompt;
    int C = prefix ? m->cfg.n_kv_head * m->cfg.head_dim : m->cfg.d_model, H = C;
    int out = prefix ? st_prefix_width(&m->cfg) : C;
    double bc = 1.0 / sqrt((double)C), bh = 1.0 / sqrt((double)H);
    entry mlp[7] = {{"prompt_encoder.embedding.weight", V, C, 1.0, 0.0},
                    {"prompt_encoder.mlp_head.0.weight", H, C, 0.0, bc}, {"prompt_encoder.mlp_head.0.bias", H, 0, 0.0, bc},
                    {"prompt_encoder.mlp_head.2.weight", H, H, 0.0, bh}, {"prompt_encoder.mlp_head.2.bias", H, 0, 0.0, bh},
                    {"prompt_encoder.mlp_head.4.weight", out, H, 0.0, bh}, {"prompt_encoder.mlp_head.4.bias", out, 0, 0.0, bh}};
    entry proj[5] = {{"prompt_encoder.embedding.weight", V, C, 1.0, 0.0},
                     {"prompt_encoder.transform.0.weight", H, C, 0.0, bc}, {"prompt_encoder.transform.0.bias", H, 0, 0.0, bc},
                     {"prompt_encoder.transform.2.weight", out, H, 0.0, bh},
                     {"prompt_encoder.transform.2.bias", out, 0, 0.0, bh}};
    int rc = prefix ? add_entries(m, 5, proj, seed) : add_entries(m, 7, mlp, seed);
    if (rc) return rc;
    p->enc = prefix ? 2 : 3;
    p->tanh_act = prefix;
    p->cin = C;
    p->hid = H;
    p->cout = out;
    return encoder_buffers(p, m);
}

/* A device backend: the LSTM's host mirrors and the device copies of its output and output gradient. */
static int lstm_mirrors(st_prompt *p, const st_model *m) {
    size_t n = 0;
    for (int k = 0; k < 17; k++) {
        p->mo[k] = n;
        n += m->params[p->param + k].numel;
    }
    p->hw = malloc(n * sizeof(float));
    p->hg = malloc(n * sizeof(float));
    p->dlx = palloc(p, m, (size_t)p->V * 2 * p->hid);
    if (!p->hw || !p->hg || !p->dlx) return st_fail(ST_ENOMEM, "out of memory for the LSTM prompt encoder's host mirror");
    return 0;
}

/* The host mirror of tensor k (0: the embedding, 1 + j: LSTM tensor j) from the device: weights, or the
 * gradient (0 where the tensor has none). */
static void lstm_down(const st_model *m, int k, int grads) {
    const st_prompt *p = m->prompt;
    const st_param *pp = &m->params[p->param + k];
    if (!grads) m->be->copy_to_host(p->hw + p->mo[k], st_model_param_weights(m, p->param + k), pp->numel * sizeof(float));
    else if (pp->grad_offset >= 0)
        m->be->copy_to_host(p->hg + p->mo[k], st_model_param_grad(m, p->param + k), pp->numel * sizeof(float));
}

/* P-tuning with the LSTM encoder: peft's PromptEncoder (LSTM): embedding [V, C] N(0, 1), torch.nn.LSTM(C, H,
 * num_layers 2, bidirectional) with torch's init U(+-1/sqrt(H)), then Linear(2H, 2H), ReLU, Linear(2H, C)
 * (U(+-1/sqrt(2H))); H = C, peft's default encoder_hidden_size. */
static int add_lstm_encoder(st_model *m, int V, uint64_t seed) {
    st_prompt *p = m->prompt;
    int C = m->cfg.d_model, H = C;
    double bh = 1.0 / sqrt((double)H), b2 = 1.0 / sqrt(2.0 * H);
    entry e[21];
    char names[16][64];
    e[0] = (entry){"prompt_encoder.embedding.weight", V, C, 1.0, 0.0};
    static const char *const kinds[4] = {"weight_ih", "weight_hh", "bias_ih", "bias_hh"};
    for (int l = 0; l < ST_PLSTM_LAYERS; l++)
        for (int d = 0; d < 2; d++)
            for (int k = 0; k < 4; k++) {
                int i = (l * 2 + d) * 4 + k;
                snprintf(names[i], sizeof names[i], "prompt_encoder.lstm_head.%s_l%d%s", kinds[k], l, d ? "_reverse" : "");
                e[1 + i] = (entry){names[i], 4 * H, k == 0 ? (l ? 2 * H : C) : k == 1 ? H : 0, 0.0, bh};
            }
    e[17] = (entry){"prompt_encoder.mlp_head.0.weight", 2 * H, 2 * H, 0.0, b2};
    e[18] = (entry){"prompt_encoder.mlp_head.0.bias", 2 * H, 0, 0.0, b2};
    e[19] = (entry){"prompt_encoder.mlp_head.2.weight", C, 2 * H, 0.0, b2};
    e[20] = (entry){"prompt_encoder.mlp_head.2.bias", C, 0, 0.0, b2};
    int rc = add_entries(m, 21, e, seed);
    if (rc) return rc;
    p->enc = 2;
    p->lstm = 1;
    p->cin = p->hid = 2 * H;
    p->cout = C;
    rc = st_plstm_init(&p->ls, V, C, H);
    p->lx = rc ? NULL : malloc((size_t)V * (4 * H + C) * sizeof(float));
    if (!rc && !p->lx) rc = st_fail(ST_ENOMEM, "out of memory for the LSTM prompt encoder");
    if (rc) return rc;
    p->ldx = p->lx + (size_t)V * 2 * H;
    p->lde = p->ldx + (size_t)V * 2 * H;
    rc = encoder_buffers(p, m);
    return rc || !m->be || m->be->host_memory ? rc : lstm_mirrors(p, m);
}

/* The LSTM's 16 weights (and gradients, NULL where frozen) in torch's order. */
static void lstm_tensors(const st_model *m, const float *w[16], float *g[16]) {
    const st_prompt *p = m->prompt;
    for (int k = 0; k < 16; k++) {
        w[k] = st_model_param_weights(m, p->param + 1 + k); /* where they are now (a device ZeRO-3 gather buffer) */
        if (g) g[k] = m->grads ? st_model_param_grad(m, p->param + 1 + k) : NULL;
    }
}

/* kind: 0 prompt tuning, 1 prefix tuning, 2 P-tuning (MLP encoder), 3 prefix tuning with projection,
 * 4 P-tuning (LSTM encoder) */
static int attach(st_model *m, int V, int prefix, uint64_t seed) {
    int rc = check(m, V, prefix == 2 || prefix == 4 ? "p_tuning" : prefix ? "prefix_tuning" : "prompt_tuning", prefix == 4);
    if (rc) return rc;
    m->prompt = calloc(1, sizeof *m->prompt);
    if (!m->prompt) return st_fail(ST_ENOMEM, "out of memory for the prompt");
    m->prompt->V = V;
    m->prompt->prefix = prefix == 1 || prefix == 3;
    if (prefix == 4) rc = add_lstm_encoder(m, V, seed);
    else if (prefix >= 2) rc = add_encoder(m, V, prefix == 3, seed);
    else rc = add_param(m, V, prefix ? st_prefix_width(&m->cfg) : m->cfg.d_model, seed);
    if (rc) {
        st_prompt_free(m->prompt);
        m->prompt = NULL;
    }
    return rc;
}

int st_prompt_attach(st_model *m, int V, uint64_t seed) { return attach(m, V, 0, seed); }
int st_prefix_attach(st_model *m, int V, int projection, uint64_t seed) { return attach(m, V, projection ? 3 : 1, seed); }
int st_ptuning_attach(st_model *m, int V, int lstm, uint64_t seed) { return attach(m, V, lstm ? 4 : 2, seed); }
int st_prompt_is_lstm(const st_model *m) { return m->prompt && m->prompt->lstm; }
int st_prompt_is_prefix(const st_model *m) { return m->prompt && m->prompt->prefix; }
int st_prefix_width(const st_model_config *c) { return c->n_layer * 2 * c->n_kv_head * c->head_dim; }

int st_prompt_init_ids(st_model *m, const int32_t *ids, int n, const char *text, const char *tokenizer_dir) {
    st_prompt *p = m->prompt;
    if (p && (p->prefix || p->enc)) return st_fail(ST_ECONFIG, "only prompt tuning has a TEXT init");
    if (!p || n < 1) return st_fail(ST_EINVAL, "prompt TEXT init needs a prompt and at least one token");
    int C = m->cfg.d_model;
    float *dst = m->weights + m->params[p->param].offset;
    for (int v = 0; v < p->V; v++) {
        int32_t id = ids[v % n];
        if (id < 0 || id >= m->cfg.vocab) return st_fail(ST_EINVAL, "prompt init token %d is outside the vocabulary", id);
        if (m->weights_tail_only) /* no base here (ZeRO-3 on a device): zeros, the rows come after the load */
            m->be->memset0(dst + (size_t)v * C, (size_t)C * sizeof(float));
        else if (st_model_fp32_dropped(m, 0)) /* the embedding in bf16 only: its row widened, exactly */
            m->be->from_bf16(dst + (size_t)v * C, m->weights_bf16 + m->params[0].offset + (size_t)id * C, (size_t)C);
        else
            m->be->copy(dst + (size_t)v * C, m->weights + m->params[0].offset + (size_t)id * C, (size_t)C * sizeof(float));
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
    if (p->prefix && !p->zeros && m->be) {
        p->zeros = palloc(p, m, 2 * (size_t)m->cfg.n_kv_head * m->cfg.head_dim);
        if (!p->zeros) return st_fail(ST_ENOMEM, "out of memory for the prefix");
    }
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

static void encode(const st_model *m, float *out);

void st_prompt_forward(st_model *m, float *x) {
    const st_prompt *p = m->prompt;
    if (p->enc) encode(m, p->table);
    if (p->prefix) { /* the virtual rows only carry the prefix keys/values (st_prefix_layer_forward) */
        if (p->enc) m->be->memset0(p->dtab, (size_t)p->V * p->cout * sizeof(float));
        return;
    }
    int V = p->V, C = m->cfg.d_model, Tm = V + p->T;
    const float *pe = p->enc ? p->table : st_model_param_weights(m, p->param);
    const float *wpe = m->cfg.family == ST_FAMILY_GPT2 ? st_model_param_weights(m, 1) : NULL; /* acquired with wte */
    for (int b = 0; b < p->B; b++) { /* rows = pe (+ wpe): backend copies (encoder: its host table, the CPU) */
        float *rows = x + (size_t)b * Tm * C;
        m->be->copy(rows, pe, (size_t)V * C * sizeof(float));
        if (wpe) m->be->copy_cols(rows, C, wpe, C, V, C, 1);
    }
}

/* The encoder's backward: the table's gradient dtab [V, cout] through its linears into its tensors (+=). */
static void encoder_backward(st_model *m, const float *dtab) {
    const st_prompt *p = m->prompt;
    const st_backend *be = m->be;
    int V = p->V, H = p->hid, n = p->enc, l0 = lin0(p);
    const float *w[7];
    float *g[7];
    for (int k = 0; k < 1 + 2 * n; k++) { /* w[0]: the embedding, w[1 + 2j], w[2 + 2j]: linear j */
        w[k] = st_model_param_weights(m, p->param + (k ? l0 - 1 + k : 0));
        g[k] = st_model_param_grad(m, p->param + (k ? l0 - 1 + k : 0));
    }
    const float *dy = dtab;
    for (int j = n - 1; j >= 0; j--) { /* linear j: y = x W^T + b, W = w[1 + 2j] [out, in] */
        int in = j == 0 ? p->cin : H, out = j == n - 1 ? p->cout : H;
        const float *x = j == 0 ? (p->lstm ? (p->dlx ? p->dlx : p->lx) : w[0]) : p->r[j - 1];
        if (g[1 + 2 * j]) be->matmul(g[1 + 2 * j], dy, x, out, in, V, 1, 0, 1.0f, 1.0f); /* dW += dy^T x */
        if (g[2 + 2 * j]) be->bias_bwd(g[2 + 2 * j], dy, V, out);
        if (j == 0 && p->lstm) { /* through the LSTM into the embedding */
            const float *lw[16];
            float *lg[16];
            lstm_tensors(m, lw, lg);
            be->matmul(p->dlx ? p->dlx + (size_t)V * in : p->ldx, dy, w[1], V, in, out, 0, 0, 1.0f, 0.0f);
            float *de = g[0] ? g[0] : p->lde;
            if (!p->dlx) {
                st_plstm_backward(p->ls, w[0], lw, lg, p->ldx, de);
                break;
            }
            /* a device backend: on the host mirror (weights mirrored by this forward's encode), the
             * gradients accumulated there and copied back */
            be->copy_to_host(p->ldx, p->dlx + (size_t)V * in, (size_t)V * in * sizeof(float));
            for (int k = 0; k < 17; k++) lstm_down(m, k, 1);
            for (int k = 0; k < 16; k++) {
                lw[k] = p->hw + p->mo[1 + k];
                lg[k] = lg[k] ? p->hg + p->mo[1 + k] : NULL;
            }
            st_plstm_backward(p->ls, p->hw, lw, lg, p->ldx, g[0] ? p->hg : p->lde);
            for (int k = 0; k < 17; k++) {
                const st_param *q = &m->params[p->param + k];
                if (q->grad_offset >= 0)
                    be->copy_to_device(st_model_param_grad(m, p->param + k), p->hg + p->mo[k], q->numel * sizeof(float));
            }
            break;
        }
        if (j == 0) {
            if (g[0]) be->matmul(g[0], dy, w[1], V, in, out, 0, 0, 1.0f, 1.0f); /* dE += dy W0 */
            break;
        }
        float *dx = p->d[j - 1]; /* through the activation before linear j */
        be->matmul(dx, dy, w[1 + 2 * j], V, in, out, 0, 0, 1.0f, 0.0f);
        be->prompt_act_bwd(dx, p->a[j - 1], p->r[j - 1], (size_t)V * H, p->tanh_act);
        dy = dx;
    }
}

void st_prompt_backward(st_model *m, const float *dx) {
    const st_prompt *p = m->prompt;
    const st_param *pp = &m->params[p->param];
    if (!m->grads) return;
    if (p->prefix) { /* its gradient came from st_prefix_layer_backward (into dtab with a projection) */
        if (p->enc) encoder_backward(m, p->dtab);
        return;
    }
    if (!p->enc && pp->grad_offset < 0) return;
    int V = p->V, C = m->cfg.d_model, Tm = V + p->T;
    float *g = p->enc ? p->dtab : st_model_param_grad(m, p->param);
    if (p->enc) m->be->memset0(g, (size_t)V * C * sizeof(float));
    for (int b = 0; b < p->B; b++) m->be->copy_cols(g, C, dx + (size_t)b * Tm * C, C, V, C, 1);
    if (p->enc) encoder_backward(m, g);
}

/* The encoder's output [V, cout] into out (backend memory); keeps the activations for backward. */
static void encode(const st_model *m, float *out) {
    st_prompt *p = m->prompt;
    const st_backend *be = m->be;
    int V = p->V, H = p->hid, n = p->enc, l0 = lin0(p);
    const float *x = st_model_param_weights(m, p->param);
    if (p->lstm) {
        const float *lw[16];
        lstm_tensors(m, lw, NULL);
        if (p->dlx) { /* a device backend: the host mirror of this step's weights (lstm_mirrors) */
            for (int k = 0; k < 17; k++) lstm_down(m, k, 0);
            for (int k = 0; k < 16; k++) lw[k] = p->hw + p->mo[1 + k];
            x = p->hw;
        }
        st_plstm_forward(p->ls, x, lw, p->lx);
        x = p->lx;
        if (p->dlx) {
            be->copy_to_device(p->dlx, p->lx, (size_t)V * p->cin * sizeof(float));
            x = p->dlx;
        }
    }
    for (int j = 0; j < n; j++) {
        const float *w = st_model_param_weights(m, p->param + l0 + 2 * j);
        const float *b = st_model_param_weights(m, p->param + l0 + 1 + 2 * j);
        int in = j == 0 ? p->cin : H, o = j == n - 1 ? p->cout : H;
        float *y = j == n - 1 ? out : p->a[j];
        be->matmul(y, x, w, V, o, in, 0, 1, 1.0f, 0.0f); /* y = x W^T + b */
        be->bias_add(y, b, V, o);
        if (j == n - 1) break;
        be->prompt_act(p->r[j], y, (size_t)V * H, p->tanh_act);
        x = p->r[j];
    }
}

void st_prompt_encode(const st_model *m, float *out) {
    const st_prompt *p = m->prompt;
    if (m->be->host_memory) {
        encode(m, out);
        return;
    }
    encode(m, p->table);
    m->be->copy_to_host(out, p->table, (size_t)p->V * p->cout * sizeof(float));
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
    const float *tab = p->enc ? p->table : st_model_param_weights(m, p->param);
    for (int b = 0; b < p->B; b++)
        for (int kv = 0; kv < 2; kv++)
            m->be->copy_cols(qkv + (size_t)b * Tm * Q + qd + (size_t)kv * KVD, (int)Q, tab + prefix_col(m, l, kv), W, V,
                             KVD, 0);
}

void st_prefix_layer_backward(st_model *m, int l, float *dqkv) {
    const st_prompt *p = m->prompt;
    if (!p || !p->prefix) return;
    const st_model_config *c = &m->cfg;
    int V = p->V, Tm = V + p->T, W = st_prefix_width(c), KVD = c->n_kv_head * c->head_dim;
    size_t Q = (size_t)(c->n_head + 2 * c->n_kv_head) * c->head_dim, qd = (size_t)c->n_head * c->head_dim;
    float *g = !m->grads ? NULL : p->enc ? p->dtab : st_model_param_grad(m, p->param);
    for (int b = 0; b < p->B; b++) {
        float *rows = dqkv + (size_t)b * Tm * Q + qd;
        for (int kv = 0; g && kv < 2; kv++)
            m->be->copy_cols(g + prefix_col(m, l, kv), W, rows + (size_t)kv * KVD, (int)Q, V, KVD, 1);
        /* the virtual rows' own keys/values were replaced: nothing flows back into their residual */
        m->be->copy_cols(rows, (int)Q, p->zeros, 0, V, 2 * KVD, 0);
    }
}
