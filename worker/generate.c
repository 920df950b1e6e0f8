/* generate.c — KV-cache decoding and token choice (see generate.h).
 *
 * One forward over `rows` tokens (prefill chunk or decode step), each token i of sequence seq[i] at
 * position pos[i]:
 *   x = wte[tok] (+ wpe[pos], GPT-2)
 *   per layer: ln = norm(x); qkv = ln @ Wqkv^T (+ b); rope(qkv) at pos (Llama); kv_store(qkv);
 *              att = attention_cached(qkv); x += att @ Wo^T (+ b); ln = norm(x);
 *              h1 = ln @ W1^T (+ b); h2 = gelu(h1) | swiglu(h1); x += h2 @ W2^T (+ b)
 *   logits of the selected rows only: norm(x[sel]) @ Whead^T
 * the same math as model.c's forward, in fp32, without the saved activations. Weights are found by
 * their HF names, and a registry tensor this file does not use is an error (a new architecture
 * feature must not be silently skipped).
 *
 * Threads: a one-row decode step runs on the whole OpenMP team or on one thread, picked by measuring
 * (team_pick below; the same bits either way).
 *
 * Residency: each forward acquires the weight groups it reads in the training forward's order and
 * releases them after (st_model_acquire: embeddings, each layer, final norm + head), so a ZeRO-3 rank
 * holds its shard plus one gathered group (QLoRA: one dequantized layer). Those gathers are collective:
 * with st_gen_params.sync set every forward of every rank is preceded by sync(ctx, 1), and a rank out of
 * work answers sync(ctx, 0) and runs the same acquires without computing until no rank has work.
 *
 * Prompt learning (worker/prompt.h), as the training forward applies it: the table (prompt tuning's
 * embeddings, P-tuning's encoder output, prefix tuning's per-layer keys/values) is taken once per call.
 * Prompt / P-tuning: each sequence's prefill starts with V virtual rows at positions 0..V-1 whose
 * embedding is the table row (+ wpe[v], GPT-2); prefix tuning: the V prefix keys/values of every layer
 * are stored in the cache at positions 0..V-1 (as past_key_values enter it). Either way the real tokens
 * sit at positions V.. and attend to the virtual ones.
 *
 * bf16 holding (st_gen_hold_bf16, `generate` / `compare`): the matmul weights of a bf16 source model are held
 * as bf16 only, half the bytes each decode step streams (host memory, or device memory on a device backend). Products of at most
 * GEN_MM_ROWS rows (decode steps, the LM head on the selected rows, short prompts) go through the backend's
 * decode_mm whichever way a weight is held (one fixed-order dot product per output, the bf16 weight widened
 * exactly); a prefill chunk of more rows widens a held unit into an fp32 scratch and makes the same matmul
 * call as fp32 holding. Either way the logits are bit-identical to holding the same weights as fp32
 * (SHARDTUNE_DECODE_FP32=1). */
#include "worker/generate.h"

#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include "common/error.h"
#include "common/util.h"
#include "kernels/bf16.h"
#include "worker/prompt.h"

/* Prefill chunk: at most this many token rows per forward (bounds the scratch). 512 (a 512-token prompt in
 * one forward, each weight packed for sgemm once) measured the same prefill CPU time as 256. */
#define GEN_MAX_ROWS 256
/* Products of at most this many rows go through decode_mm (each weight row read once for all the rows). */
#define GEN_MM_ROWS 8

typedef struct {
    const float *n1w, *n1b, *wqkv, *bqkv, *qn, *kn, *wo, *bo, *n2w, *n2b, *w1, *b1, *w2, *b2;
    const uint16_t *wqkv16, *wo16, *w116, *w216; /* the unit held in bf16 only (st_gen_hold_bf16), or NULL */
} gen_layer;

typedef struct {
    const st_model *m;
    const st_backend *be;
    int S, max_t, R;
    int L, C, H, KVH, hd, Q, A, KVD, F, F1, V;
    gen_layer *layers;
    const float *wte, *wpe, *nfw, *nfb, *head;
    const uint16_t *wte16, *head16;                  /* held in bf16 only, or NULL */
    const st_gen_hold *hold;                         /* st_gen_params.hold */
    float *wide;                                     /* backend: a held layer unit widened (prefill chunks) */
    float *kc, *vc;                                  /* [L, S, KVH, max_t, hd] */
    float *x, *ln, *qkv, *att, *h1, *h2, *mean, *rstd, *selx, *seln, *logits; /* backend, per row */
    float *qk_x, *qk_rstd;                           /* backend: Qwen3 q/k norm scratch (qk_norm only) */
    float *gcos, *gsin;                              /* backend [R, hd/2]: the rows' rotations */
    float *cos_tab, *sin_tab, *hcos, *hsin;          /* host: [max_t, hd/2] tables, [R, hd/2] staging */
    int32_t *d_tok, *d_seq, *d_pos;                  /* backend [R] */
    int (*sync)(void *ctx, int busy);                /* st_gen_params.sync (lockstep), or NULL */
    void *sync_ctx;
    const float *ptab;                               /* host [PV, width]: the prompt table, or NULL */
    int PV, prefix;                                  /* virtual tokens (real tokens start there); prefix */
    int *vrow;                                       /* host [R]: a prefill row's virtual index, or -1 */
} gen_state;

/* ---------------- weights ---------------- */

static const float *find_w(const st_model *m, const char *name, unsigned char *used, int *rc) {
    int i = st_model_find(m, name);
    if (i < 0) {
        if (!*rc) *rc = st_fail(ST_ECONFIG, "generate: the model has no tensor %s", name);
        return NULL;
    }
    used[i] = 1;
    return m->weights + m->params[i].offset;
}

static int bind_weights(gen_state *g) {
    const st_model *m = g->m;
    int gpt2 = m->cfg.family == ST_FAMILY_GPT2, rc = 0;
    unsigned char *used = calloc((size_t)m->n_params, 1);
    g->layers = calloc((size_t)g->L, sizeof *g->layers);
    if (!used || !g->layers) { free(used); return st_fail(ST_ENOMEM, "out of memory binding weights"); }
    char n[160];
#define W(field, fmt, ...) (snprintf(n, sizeof n, fmt, __VA_ARGS__), (field) = find_w(m, n, used, &rc))
    for (int l = 0; l < g->L; l++) {
        gen_layer *w = &g->layers[l];
        if (gpt2) {
            W(w->n1w, "h.%d.ln_1.weight", l); W(w->n1b, "h.%d.ln_1.bias", l);
            W(w->wqkv, "h.%d.attn.c_attn.weight", l); W(w->bqkv, "h.%d.attn.c_attn.bias", l);
            W(w->wo, "h.%d.attn.c_proj.weight", l); W(w->bo, "h.%d.attn.c_proj.bias", l);
            W(w->n2w, "h.%d.ln_2.weight", l); W(w->n2b, "h.%d.ln_2.bias", l);
            W(w->w1, "h.%d.mlp.c_fc.weight", l); W(w->b1, "h.%d.mlp.c_fc.bias", l);
            W(w->w2, "h.%d.mlp.c_proj.weight", l); W(w->b2, "h.%d.mlp.c_proj.bias", l);
        } else {
            const float *k, *v, *up;
            W(w->n1w, "model.layers.%d.input_layernorm.weight", l);
            /* q, k, v (and gate, up) are adjacent in the weight buffer: one packed matmul each */
            W(w->wqkv, "model.layers.%d.self_attn.q_proj.weight", l);
            W(k, "model.layers.%d.self_attn.k_proj.weight", l);
            W(v, "model.layers.%d.self_attn.v_proj.weight", l);
            if (m->cfg.qkv_bias) {
                W(w->bqkv, "model.layers.%d.self_attn.q_proj.bias", l);
                W(k, "model.layers.%d.self_attn.k_proj.bias", l);
                W(v, "model.layers.%d.self_attn.v_proj.bias", l);
            }
            W(w->wo, "model.layers.%d.self_attn.o_proj.weight", l);
            if (m->cfg.qk_norm) {
                W(w->qn, "model.layers.%d.self_attn.q_norm.weight", l);
                W(w->kn, "model.layers.%d.self_attn.k_norm.weight", l);
            }
            W(w->n2w, "model.layers.%d.post_attention_layernorm.weight", l);
            W(w->w1, "model.layers.%d.mlp.gate_proj.weight", l);
            W(up, "model.layers.%d.mlp.up_proj.weight", l);
            W(w->w2, "model.layers.%d.mlp.down_proj.weight", l);
            (void)k; (void)v; (void)up;
        }
    }
    if (gpt2) {
        W(g->wte, "%s", "wte.weight"); W(g->wpe, "%s", "wpe.weight");
        W(g->nfw, "%s", "ln_f.weight"); W(g->nfb, "%s", "ln_f.bias");
    } else {
        W(g->wte, "%s", "model.embed_tokens.weight");
        W(g->nfw, "%s", "model.norm.weight");
    }
    if (m->cfg.tied_embeddings) g->head = g->wte;
    else W(g->head, "%s", "lm_head.weight");
#undef W
    for (int i = 0; i < st_prompt_param_count(m); i++) used[st_prompt_param(m) + i] = 1; /* the table, taken apart */
    for (int i = 0; !rc && i < m->n_params; i++)
        if (!used[i])
            rc = st_fail(ST_ECONFIG, "generate: tensor %s belongs to an architecture feature that generation does "
                                     "not implement yet", m->params[i].name);
    free(used);
    return rc;
}

/* ---------------- 2 MB pages ---------------- */

#if defined(__linux__) && !defined(MADV_COLLAPSE)
#define MADV_COLLAPSE 25 /* Linux 6.1; older kernels refuse it (EINVAL), which is ignored */
#endif

/* The large host buffers a decode step streams (the weights held in bf16, an fp32 model's weights, the KV
 * cache) are asked for 2 MB pages where the kernel offers them (transparent huge pages "madvise" or
 * "always"): a 4 KB page ends each run of the hardware prefetcher and costs a TLB entry, so with 4 KB pages
 * one core reads a stream of weights well below its memory bandwidth (bf16 weights through decode_mm,
 * 1 thread, AMD EPYC VM: 1.15x the rate on 2 MB pages, besides the 4 streams decode_mm reads side by side).
 * Advice only: the contents do not change and a refusal is ignored. collapse: the range is written
 * already and is moved to 2 MB pages now (MADV_COLLAPSE); otherwise pages are made 2 MB as they are first
 * written. The range is rounded inward to whole 2 MB blocks. */
static void huge_pages(const void *p, size_t bytes, int collapse) {
#ifdef MADV_HUGEPAGE
    const uintptr_t huge = (uintptr_t)2 << 20;
    uintptr_t lo = ((uintptr_t)p + huge - 1) & ~(huge - 1), hi = ((uintptr_t)p + bytes) & ~(huge - 1);
    if (!p || hi <= lo || madvise((void *)lo, hi - lo, MADV_HUGEPAGE) != 0) return;
#ifdef MADV_COLLAPSE
    if (collapse) (void)madvise((void *)lo, hi - lo, MADV_COLLAPSE);
#endif
#else
    (void)p, (void)bytes, (void)collapse;
#endif
}

/* ---------------- state ---------------- */

/* RoPE tables for positions 0..max_t-1 (host): the model's own builder (every RoPE variant, attention
 * scaling included). max_t never exceeds st_gen_max_positions, where the tables do not depend on the
 * sequence length, as transformers' do for dynamic and longrope past their original length. */
static int rope_host_tables(const st_model *m, float *cos_t, float *sin_t, int max_t) {
    return st_model_rope_tables(&m->cfg, max_t, cos_t, sin_t);
}

static void state_free(gen_state *g) {
    const st_backend *be = g->be;
    float *dev[] = {g->kc, g->vc, g->x, g->ln, g->qkv, g->att, g->h1, g->h2, g->mean, g->rstd,
                    g->selx, g->seln, g->logits, g->gcos, g->gsin, g->qk_x, g->qk_rstd};
    for (size_t i = 0; i < sizeof dev / sizeof dev[0]; i++) be->free(dev[i]);
    be->free(g->d_tok);
    be->free(g->d_seq);
    be->free(g->d_pos);
    free(g->cos_tab); free(g->sin_tab); free(g->hcos); free(g->hsin);
    free(g->layers);
    free(g->vrow);
    be->free(g->wide);
}

static void state_dims(gen_state *g, const st_model *m) {
    const st_model_config *c = &m->cfg;
    g->m = m;
    g->be = m->be;
    g->L = c->n_layer; g->C = c->d_model; g->H = c->n_head; g->KVH = c->n_kv_head; g->hd = c->head_dim;
    g->A = g->H * g->hd; g->KVD = g->KVH * g->hd; g->Q = g->A + 2 * g->KVD;
    g->F = c->d_ff; g->F1 = c->family == ST_FAMILY_GPT2 ? g->F : 2 * g->F; g->V = c->vocab;
}

/* Layer l's matmul unit k = 0..3 (list_units' order): its fp32 field, its bf16 field (*w16) and floats (*n). */
static const float **layer_unit(gen_state *g, int l, int k, const uint16_t ***w16, size_t *n) {
    gen_layer *w = &g->layers[l];
    const float **f[] = {&w->wqkv, &w->wo, &w->w1, &w->w2};
    const uint16_t **h[] = {&w->wqkv16, &w->wo16, &w->w116, &w->w216};
    size_t sz[] = {(size_t)g->Q * g->C, (size_t)g->C * g->A, (size_t)g->F1 * g->C, (size_t)g->C * g->F};
    if (w16) *w16 = h[k];
    *n = sz[k];
    return f[k];
}

/* The bf16 copy of the unit starting at fp32 weight w when the hold holds it, else NULL. */
static const uint16_t *held16(const gen_state *g, const float *w) {
    const st_gen_hold *h = g->hold;
    if (!h || !w) return NULL;
    size_t off = (size_t)(w - g->m->weights);
    for (int i = 0; i < g->m->n_params; i++)
        if (g->m->params[i].offset == off) return h->held[i] ? h->w16 + off : NULL;
    return NULL;
}

/* Binds the held units' bf16 copies; the widening scratch for prefill chunks (largest held layer unit). */
static int bind_held(gen_state *g) {
    size_t wide = 0, n;
    const uint16_t **u16;
    for (int l = 0; g->hold && l < g->L; l++)
        for (int k = 0; k < 4; k++) {
            const float **u = layer_unit(g, l, k, &u16, &n);
            if ((*u16 = held16(g, *u)) != NULL && n > wide) wide = n;
        }
    g->wte16 = held16(g, g->wte);
    g->head16 = held16(g, g->head);
    if (wide && !(g->wide = g->be->alloc(wide * sizeof(float))))
        return st_fail(ST_ENOMEM, "out of memory for generation scratch");
    return 0;
}

static int state_init(gen_state *g, const st_model *m, const st_gen_hold *hold, int S, int max_t) {
    memset(g, 0, sizeof *g);
    const st_model_config *c = &m->cfg;
    state_dims(g, m);
    g->hold = hold && hold->floats && m->be->decode_mm ? hold : NULL;
    g->S = S;
    g->max_t = max_t;
    g->R = GEN_MAX_ROWS > S ? GEN_MAX_ROWS : S;
    int rc = bind_weights(g);
    if (!rc) rc = bind_held(g);
    if (rc) return rc;
    const st_backend *be = g->be;
    size_t R = (size_t)g->R, cache = (size_t)g->L * S * max_t * g->KVD, half = (size_t)g->hd / 2;
    g->kc = be->alloc(cache * sizeof(float));
    g->vc = be->alloc(cache * sizeof(float));
    if (!g->kc || !g->vc)
        return st_fail(ST_ENOMEM, "cannot allocate %.1f MB of KV cache for %d sequences of %d positions "
                                  "(lower --batch or --max-new)", 2.0 * cache * 4 / 1e6, S, max_t);
    if (be->host_memory) huge_pages(g->kc, cache * sizeof(float), 0), huge_pages(g->vc, cache * sizeof(float), 0);
    struct { float **p; size_t n; } bufs[] = {
        {&g->x, R * g->C}, {&g->ln, R * g->C}, {&g->qkv, R * g->Q}, {&g->att, R * g->A},
        {&g->h1, R * g->F1}, {&g->h2, R * g->F}, {&g->mean, R}, {&g->rstd, R},
        {&g->selx, (size_t)S * g->C}, {&g->seln, (size_t)S * g->C}, {&g->logits, (size_t)S * g->V},
        {&g->gcos, R * half + 1}, {&g->gsin, R * half + 1}};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        if (!(*bufs[i].p = be->alloc(bufs[i].n * sizeof(float))))
            return st_fail(ST_ENOMEM, "out of memory for generation scratch");
    if (c->qk_norm) {
        g->qk_x = be->alloc(R * (size_t)(g->H + g->KVH) * g->hd * sizeof(float));
        g->qk_rstd = be->alloc(R * (size_t)(g->H + g->KVH) * sizeof(float));
        if (!g->qk_x || !g->qk_rstd) return st_fail(ST_ENOMEM, "out of memory for generation scratch");
    }
    if (!(g->vrow = malloc(R * sizeof(int)))) return st_fail(ST_ENOMEM, "out of memory for generation scratch");
    g->d_tok = be->alloc(R * sizeof(int32_t));
    g->d_seq = be->alloc(R * sizeof(int32_t));
    g->d_pos = be->alloc(R * sizeof(int32_t));
    if (!g->d_tok || !g->d_seq || !g->d_pos) return st_fail(ST_ENOMEM, "out of memory for generation scratch");
    if (c->family == ST_FAMILY_LLAMA) {
        g->cos_tab = malloc((size_t)max_t * half * sizeof(float));
        g->sin_tab = malloc((size_t)max_t * half * sizeof(float));
        g->hcos = malloc(R * half * sizeof(float));
        g->hsin = malloc(R * half * sizeof(float));
        if (!g->cos_tab || !g->sin_tab || !g->hcos || !g->hsin) return st_fail(ST_ENOMEM, "out of memory for RoPE");
        return rope_host_tables(m, g->cos_tab, g->sin_tab, max_t);
    }
    return 0;
}

/* ---------------- bf16 holding (generate.h st_gen_hold_bf16) ---------------- */

/* Whether x[0, n) are all bf16 values (low 16 bits zero). */
static int bf16_values(const float *x, size_t n) {
    for (size_t k = 0; k < n; k++) {
        uint32_t u;
        memcpy(&u, x + k, sizeof u);
        if (u & 0xffffu) return 0;
    }
    return 1;
}

/* Host pieces of a device load or check (floats or halves). */
#define HOLD_PIECE ((size_t)1 << 20)

/* The matmul units st_gen_hold_bf16 considers: layer l's packed q/k/v (c_attn), output projection, packed
 * gate/up (c_fc) and down projection, then the token embedding and an untied head, each as its first parameter
 * (-1 when missing: generation's bind_weights names it) and its floats. From the registry alone: a device model
 * is planned before its weights exist. Returns the count (at most 4 L + 2). */
static int list_units(const st_model *m, int *first, size_t *n) {
    static const char *llama[4] = {"model.layers.%d.self_attn.q_proj.weight", "model.layers.%d.self_attn.o_proj.weight",
                                   "model.layers.%d.mlp.gate_proj.weight", "model.layers.%d.mlp.down_proj.weight"};
    static const char *gpt2[4] = {"h.%d.attn.c_attn.weight", "h.%d.attn.c_proj.weight", "h.%d.mlp.c_fc.weight",
                                  "h.%d.mlp.c_proj.weight"};
    gen_state g;
    memset(&g, 0, sizeof g);
    state_dims(&g, m);
    int is_gpt2 = m->cfg.family == ST_FAMILY_GPT2, k = 0;
    size_t sz[4] = {(size_t)g.Q * g.C, (size_t)g.C * g.A, (size_t)g.F1 * g.C, (size_t)g.C * g.F};
    char name[160];
    for (int l = 0; l < g.L; l++)
        for (int u = 0; u < 4; u++, k++) {
            snprintf(name, sizeof name, is_gpt2 ? gpt2[u] : llama[u], l);
            first[k] = st_model_find(m, name);
            n[k] = sz[u];
        }
    first[k] = st_model_find(m, is_gpt2 ? "wte.weight" : "model.embed_tokens.weight");
    n[k++] = (size_t)g.V * g.C;
    if (!m->cfg.tied_embeddings) {
        first[k] = st_model_find(m, "lm_head.weight");
        n[k++] = (size_t)g.V * g.C;
    }
    return k;
}

/* Whether parameter i lies in the unit [off, off + n) of the weight space. */
static int in_unit(const st_model *m, int i, size_t off, size_t n) {
    return m->params[i].offset >= off && m->params[i].offset < off + n;
}

/* Whether unit [off, off + n) of the weight space is held already (tied: as the other unit; or loaded so). */
static int unit_held(const st_model *m, const st_gen_hold *h, size_t off, size_t n) {
    for (int i = 0; i < m->n_params; i++)
        if (in_unit(m, i, off, n) && h->held[i]) return 1;
    return 0;
}

/* Whether the source has every parameter of unit [off, off + n) in bf16. */
static int unit_can16(const st_model *m, size_t off, size_t n, const st_gen_hold_source *src) {
    for (int i = 0; i < m->n_params; i++)
        if (in_unit(m, i, off, n) && !src->can16(src->ctx, i)) return 0;
    return 1;
}

/* Host: unit [off, off + n) held when exact: its bf16 copy at the same offset, its fp32 memory given back, every
 * parameter inside it marked. */
static void hold_unit(st_model *m, st_gen_hold *h, size_t off, size_t n) {
    if (!bf16_values(m->weights + off, n)) return;
    for (int i = 0; i < m->n_params; i++)
        if (in_unit(m, i, off, n)) h->held[i] = 1;
    m->be->to_bf16(h->w16 + off, m->weights + off, n); /* exact: the values are bf16 values */
    st_give_back(m->weights, sizeof(float), off, off + n);
    h->floats += n;
}

/* Host: unit [off, off + n) read straight into the hold when the source has every parameter of it in bf16: its
 * fp32 memory never touched. */
static int load_unit(st_model *m, st_gen_hold *h, size_t off, size_t n, const st_gen_hold_source *src) {
    if (!unit_can16(m, off, n, src)) return 0;
    for (int i = 0; i < m->n_params; i++)
        if (in_unit(m, i, off, n)) {
            int rc = src->read16(src->ctx, i, 0, m->params[i].numel, h->w16 + m->params[i].offset);
            if (rc) return rc;
            h->held[i] = 1;
        }
    h->floats += n;
    return 0;
}

/* Device: whether unit [off, off + n)'s fp32 values are bf16 values (read back in host pieces into buf). */
static int unit_exact_device(const st_model *m, size_t off, size_t n, float *buf) {
    for (size_t a = 0; a < n; a += HOLD_PIECE) {
        size_t k = n - a < HOLD_PIECE ? n - a : HOLD_PIECE;
        m->be->copy_to_host(buf, m->weights + off + a, k * sizeof(float));
        if (!bf16_values(buf, k)) return 0;
    }
    return 1;
}

/* Device: parameter i's bf16 values into dst (device) in bounded host pieces from the source. */
static int read_device(const st_model *m, int i, uint16_t *dst, const st_gen_hold_source *src, uint16_t *piece) {
    size_t n = m->params[i].numel;
    for (size_t a = 0; a < n; a += HOLD_PIECE) {
        size_t k = n - a < HOLD_PIECE ? n - a : HOLD_PIECE;
        int rc = src->read16(src->ctx, i, a, k, piece);
        if (rc) return rc;
        m->be->copy_to_device(dst + a, piece, k * sizeof(uint16_t));
    }
    return 0;
}

/* Device: the model laid out anew, the parameters held (h->held, or want: newly held) first, [0, n16) in registry
 * order, the others after in registry order (a unit's parameters stay adjacent: they are held together). The held
 * ones' bf16 copy goes to a new device buffer of n16 halves (the old copy's moved; want's read from src, or
 * converted from their fp32 values: exact), the others' fp32 values to an allocation of n_weights - n16 floats
 * (nothing to move from a model never allocated). On failure the model and h are as they were. */
static int relayout(st_model *m, st_gen_hold *h, const unsigned char *want, const st_gen_hold_source *src) {
    const st_backend *be = m->be;
    size_t n16 = 0, lo = 0, hi;
    for (int i = 0; i < m->n_params; i++)
        if (h->held[i] || want[i]) n16 += m->params[i].numel;
    hi = n16;
    size_t *old = malloc((size_t)m->n_params * sizeof *old);
    uint16_t *w16 = be->alloc(n16 * sizeof(uint16_t)), *piece = src ? malloc(HOLD_PIECE * sizeof(uint16_t)) : NULL;
    float *w32 = be->alloc((m->n_weights - n16) * sizeof(float)); /* > 0: the norms stay fp32 */
    int rc = 0;
    if (!old || !w16 || !w32 || (src && !piece)) {
        rc = st_fail(ST_ENOMEM, "cannot allocate %.1f MB for model weights (%.1f MB of them in bf16 only)",
                     (m->n_weights - n16) * 4.0 / 1e6 + n16 * 2.0 / 1e6, n16 * 2.0 / 1e6);
        goto out;
    }
    for (int i = 0; i < m->n_params; i++) {
        old[i] = m->params[i].offset;
        size_t *at = h->held[i] || want[i] ? &lo : &hi;
        m->params[i].offset = *at;
        *at += m->params[i].numel;
    }
    for (int i = 0; i < m->n_params && !rc; i++) {
        size_t at = m->params[i].offset, n = m->params[i].numel;
        if (h->held[i]) be->copy(w16 + at, h->w16 + old[i], n * sizeof(uint16_t));
        else if (want[i] && src) rc = read_device(m, i, w16 + at, src, piece);
        else if (want[i]) be->to_bf16(w16 + at, m->weights + old[i], n); /* exact: bf16 values */
        else if (m->weights) be->copy(w32 + (at - n16), m->weights + old[i], n * sizeof(float));
    }
    if (rc) {
        for (int i = 0; i < m->n_params; i++) m->params[i].offset = old[i];
        goto out;
    }
    for (int i = 0; i < m->n_params; i++) h->held[i] |= want[i];
    be->free(h->w16);
    if (m->weights) be->free(m->weights + m->n_w16);
    h->w16 = w16, h->be = be, h->floats = n16;
    m->weights = w32 - n16; /* nothing reads below n_w16 (model.h) */
    m->n_w16 = n16;
    w16 = NULL, w32 = NULL;
out:
    be->free(w16);
    be->free(w32);
    free(piece);
    free(old);
    return rc;
}

/* Device: the units to hold now (src: every parameter in bf16 in the source; else fp32 values that are bf16
 * values), then the model laid out anew when there are any; a model bound without weights gets them all in fp32
 * when there are none. */
static int hold_device(st_model *m, st_gen_hold *h, const st_gen_hold_source *src, const int *first,
                       const size_t *n, int nu) {
    unsigned char *want = calloc((size_t)m->n_params, 1);
    float *buf = src ? NULL : malloc(HOLD_PIECE * sizeof(float));
    int rc = want && (src || buf) ? 0 : st_fail(ST_ENOMEM, "out of memory holding the weights in bf16"), any = 0;
    for (int u = 0; u < nu && !rc; u++) {
        if (first[u] < 0) continue;
        size_t off = m->params[first[u]].offset;
        if (unit_held(m, h, off, n[u]) || (src ? !unit_can16(m, off, n[u], src) : !unit_exact_device(m, off, n[u], buf)))
            continue;
        for (int i = 0; i < m->n_params; i++)
            if (in_unit(m, i, off, n[u])) want[i] = 1, any = 1;
    }
    if (!rc && any) rc = relayout(m, h, want, src);
    else if (!rc && !m->weights && !(m->weights = m->be->alloc(m->n_weights * sizeof(float))))
        rc = st_fail(ST_ENOMEM, "cannot allocate %.1f MB for model weights", m->n_weights * 4.0 / 1e6);
    free(want);
    free(buf);
    return rc;
}

static int hold_env_fp32(void) {
    const char *e = getenv("SHARDTUNE_DECODE_FP32"); /* tests: 1 holds every weight as fp32 */
    return e && !strcmp(e, "1");
}

/* Holds (src NULL: the exact units of the loaded weights) or loads into the hold (src: the units the source has
 * in bf16) every matmul unit not held yet; h's buffers made on the first call. */
static int hold_units(st_model *m, st_gen_hold *h, const st_gen_hold_source *src) {
    int device = !m->be->host_memory;
    if (!m->be->decode_mm || m->acquire || m->prompt || m->qlora || m->w8 || (m->n_w16 && !h->be) || m->windowed ||
        m->buffers_external || m->part_base || m->n_params < 1 || hold_env_fp32()) {
        if (device && !m->weights && !(m->weights = m->be->alloc(m->n_weights * sizeof(float)))) /* a load: all fp32 */
            return st_fail(ST_ENOMEM, "cannot allocate %.1f MB for model weights", m->n_weights * 4.0 / 1e6);
        if (!device && !src && hold_env_fp32()) /* every weight read as fp32: on 2 MB pages once loaded (every page
                                                 * is written: no memory added) */
            huge_pages(m->weights, m->n_weights * sizeof(float), 1);
        return 0;
    }
    int *first = malloc((size_t)(4 * m->cfg.n_layer + 2) * sizeof *first), rc = 0;
    size_t *n = malloc((size_t)(4 * m->cfg.n_layer + 2) * sizeof *n);
    if (!h->held) h->held = calloc((size_t)m->n_params, 1);
    if (!device && !h->w16) h->w16 = st_calloc_aligned(m->n_weights * sizeof(uint16_t)); /* resident where written */
    if (!first || !n || !h->held || (!device && !h->w16)) {
        free(first);
        free(n);
        st_gen_hold_free(h);
        return st_fail(ST_ENOMEM, "out of memory holding the weights in bf16");
    }
    int nu = list_units(m, first, n);
    if (device) {
        rc = hold_device(m, h, src, first, n, nu);
    } else {
        huge_pages(h->w16, m->n_weights * sizeof(uint16_t), 0);
        for (int u = 0; u < nu && !rc; u++) {
            if (first[u] < 0) continue;
            size_t off = m->params[first[u]].offset;
            if (unit_held(m, h, off, n[u])) continue;
            if (src) rc = load_unit(m, h, off, n[u], src);
            else hold_unit(m, h, off, n[u]);
        }
    }
    free(first);
    free(n);
    if (rc) {
        st_gen_hold_free(h);
        return rc;
    }
    if (!device && !src && !h->floats) { /* nothing held (an fp32 source): the fp32 weights on 2 MB pages */
        st_gen_hold_free(h);
        huge_pages(m->weights, m->n_weights * sizeof(float), 1);
    }
    return 0;
}

int st_gen_hold_load(st_model *m, st_gen_hold *h, const st_gen_hold_source *src) {
    memset(h, 0, sizeof *h);
    return hold_units(m, h, src);
}

int st_gen_hold_bf16(st_model *m, st_gen_hold *h) {
    if (!h->held) memset(h, 0, sizeof *h);
    return hold_units(m, h, NULL);
}

void st_gen_hold_free(st_gen_hold *h) {
    if (h->be) h->be->free(h->w16);
    else free(h->w16);
    free(h->held);
    memset(h, 0, sizeof *h);
}

/* ---------------- one forward over token rows ---------------- */

static void norm(const gen_state *g, float *out, const float *x, const float *w, const float *b, int rows) {
    const st_model_config *c = &g->m->cfg;
    if (c->family == ST_FAMILY_GPT2)
        g->be->layernorm_fwd(out, g->mean, g->rstd, x, w, b, rows, g->C, c->norm_eps);
    else
        g->be->rmsnorm_fwd(out, g->rstd, x, w, rows, g->C, c->norm_eps);
}

/* y (+)= x @ W^T (+ b): beta 1 adds into y (the residual stream). W is fp32 w, or held as bf16 w16 (the
 * same values): decode_mm for a few rows, else the matmul on W (widened into g->wide when held). */
static void linear(const gen_state *g, float *y, const float *x, const float *w, const uint16_t *w16, const float *b,
                   int rows, int out, int in, float beta) {
    const st_backend *be = g->be;
    if (be->decode_mm && rows <= GEN_MM_ROWS) {
        be->decode_mm(y, x, w16 ? NULL : w, w16, rows, out, in, beta);
    } else {
        if (w16) {
            be->from_bf16(g->wide, w16, (size_t)out * in);
            w = g->wide;
        }
        be->matmul(y, x, w, rows, out, in, 0, 1, 1.0f, beta);
    }
    if (b) be->bias_add(y, b, rows, out);
}

static void embed(gen_state *g, const int32_t *tok, const int32_t *seq, const int32_t *pos, const int *vrow, int rows) {
    const st_backend *be = g->be;
    if (g->wte16) { /* held in bf16: each row widened exactly (+ wpe[pos], one add: embedding_fwd's sum) */
        for (int r = 0; r < rows; r++) {
            float *x = g->x + (size_t)r * g->C;
            be->from_bf16(x, g->wte16 + (size_t)tok[r] * g->C, (size_t)g->C);
            if (g->wpe) be->bias_add(x, g->wpe + (size_t)pos[r] * g->C, 1, g->C);
        }
    } else if (!g->wpe) {
        be->embedding_fwd(g->x, g->d_tok, g->wte, NULL, 1, rows, g->C);
    } else { /* learned positions: one lookup per run of consecutive positions of one sequence, with the
              * position table offset to the run's first position */
        for (int r0 = 0; r0 < rows;) {
            int r1 = r0 + 1;
            while (r1 < rows && seq[r1] == seq[r0] && pos[r1] == pos[r1 - 1] + 1) r1++;
            be->embedding_fwd(g->x + (size_t)r0 * g->C, g->d_tok + r0, g->wte, g->wpe + (size_t)pos[r0] * g->C, 1,
                              r1 - r0, g->C);
            r0 = r1;
        }
    }
    for (int r = 0; vrow && r < rows; r++) { /* prompt / P-tuning: a virtual row is the table row (+ wpe) */
        if (vrow[r] < 0) continue;
        const float *pe = g->ptab + (size_t)vrow[r] * g->C;
        float *x = g->x + (size_t)r * g->C; /* host memory: prompt learning runs on the CPU backend */
        for (int j = 0; j < g->C; j++) x[j] = pe[j] + (g->wpe ? g->wpe[(size_t)pos[r] * g->C + j] : 0.0f);
    }
    if (g->cos_tab) { /* each row's rotation, so rope_fwd (positions 0..rows-1 of one sequence) applies it */
        size_t half = (size_t)g->hd / 2;
        for (int r = 0; r < rows; r++) {
            memcpy(g->hcos + r * half, g->cos_tab + (size_t)pos[r] * half, half * sizeof(float));
            memcpy(g->hsin + r * half, g->sin_tab + (size_t)pos[r] * half, half * sizeof(float));
        }
        be->copy_to_device(g->gcos, g->hcos, (size_t)rows * half * sizeof(float));
        be->copy_to_device(g->gsin, g->hsin, (size_t)rows * half * sizeof(float));
    }
}

/* The sliding window of layer l (0: it sees every earlier key): the cache keeps every position and the
 * attention masks the keys past the window, as transformers' sliding-window mask does. */
static int layer_window(const st_model_config *c, int l) {
    return c->sliding_window > 0 && l >= c->window_first_layer ? c->sliding_window : 0;
}

/* The weight groups a forward reads, acquired just before and released after their use (training's
 * order: a tied wte stays until the head has run). step: 0 embeddings, 1..L layer step-1, L+1 the head;
 * acquire 1 / release 0. */
static void residency(const st_model *m, int step, int acquire) {
    int L = m->cfg.n_layer, e0 = st_model_layer_first_param(m, 0), tied = m->cfg.tied_embeddings;
    int first = step == 0 ? 0 : st_model_layer_first_param(m, step - 1);
    int last = step == 0 ? e0 : step <= L ? st_model_layer_first_param(m, step) : st_model_base_params(m);
    if (acquire) {
        st_model_acquire(m, first, last);
        return;
    }
    if (step > 0 || !tied) st_model_release(m, first, last);
    if (step == L + 1 && tied) st_model_release(m, 0, e0);
}

/* A rank without work while others generate: the same collective acquires, no compute. */
static void idle_pass(const st_model *m) {
    for (int step = 0; step <= m->cfg.n_layer + 1; step++) {
        residency(m, step, 1);
        residency(m, step, 0);
    }
}

/* Runs rows tokens through the model; writes the logits of rows sel[0..n_sel) to host[n_sel, V]. */
static void forward_rows(gen_state *g, const int32_t *tok, const int32_t *seq, const int32_t *pos, const int *vrow,
                         int rows, const int *sel, int n_sel, float *host) {
    const st_backend *be = g->be;
    if (g->sync) g->sync(g->sync_ctx, 1);
    be->copy_to_device(g->d_tok, tok, (size_t)rows * sizeof(int32_t));
    be->copy_to_device(g->d_seq, seq, (size_t)rows * sizeof(int32_t));
    be->copy_to_device(g->d_pos, pos, (size_t)rows * sizeof(int32_t));
    residency(g->m, 0, 1);
    embed(g, tok, seq, pos, vrow, rows);
    residency(g->m, 0, 0);
    size_t layer_cache = (size_t)g->S * g->max_t * g->KVD;
    for (int l = 0; l < g->L; l++) {
        const gen_layer *w = &g->layers[l];
        residency(g->m, l + 1, 1);
        float *kc = g->kc + l * layer_cache, *vc = g->vc + l * layer_cache;
        norm(g, g->ln, g->x, w->n1w, w->n1b, rows);
        linear(g, g->qkv, g->ln, w->wqkv, w->wqkv16, w->bqkv, rows, g->Q, g->C, 0.0f);
        if (w->qn) /* Qwen3: per-head RMSNorm of q and k before RoPE */
            be->head_rmsnorm_fwd(g->qkv, g->qk_x, g->qk_rstd, w->qn, w->kn, rows, g->H, g->KVH, g->hd,
                                 g->m->cfg.norm_eps);
        if (g->cos_tab) be->rope_fwd(g->qkv, g->gcos, g->gsin, 1, rows, g->H, g->KVH, g->hd);
        be->kv_store(kc, vc, g->qkv, g->d_seq, g->d_pos, rows, g->H, g->KVH, g->hd, g->max_t);
        be->attention_cached(g->att, g->qkv, kc, vc, g->d_seq, g->d_pos, rows, g->H, g->KVH, g->hd, g->max_t,
                             layer_window(&g->m->cfg, l));
        linear(g, g->x, g->att, w->wo, w->wo16, w->bo, rows, g->C, g->A, 1.0f);
        norm(g, g->ln, g->x, w->n2w, w->n2b, rows);
        linear(g, g->h1, g->ln, w->w1, w->w116, w->b1, rows, g->F1, g->C, 0.0f);
        if (g->wpe) be->gelu_fwd(g->h2, g->h1, (size_t)rows * g->F);
        else be->swiglu_fwd(g->h2, g->h1, rows, g->F);
        linear(g, g->x, g->h2, w->w2, w->w216, w->b2, rows, g->C, g->F, 1.0f);
        residency(g->m, l + 1, 0);
    }
    residency(g->m, g->L + 1, 1);
    if (n_sel > 0) {
        for (int k = 0; k < n_sel; k++)
            be->copy(g->selx + (size_t)k * g->C, g->x + (size_t)sel[k] * g->C, (size_t)g->C * sizeof(float));
        norm(g, g->seln, g->selx, g->nfw, g->nfb, n_sel);
        int step = be->decode_mm ? GEN_MM_ROWS : n_sel; /* never the widened head: a few rows at a time */
        for (int k0 = 0; k0 < n_sel; k0 += step) {
            int n = n_sel - k0 < step ? n_sel - k0 : step;
            linear(g, g->logits + (size_t)k0 * g->V, g->seln + (size_t)k0 * g->C, g->head, g->head16, NULL, n, g->V,
                   g->C, 0.0f);
        }
        be->copy_to_host(host, g->logits, (size_t)n_sel * g->V * sizeof(float));
    }
    residency(g->m, g->L + 1, 0);
}

/* ---------------- token choice ---------------- */

static const float *g_sort_keys; /* qsort has no context argument; choice runs on one thread per process */

static int by_logit_desc(const void *a, const void *b) {
    float x = g_sort_keys[*(const int *)a], y = g_sort_keys[*(const int *)b];
    if (x != y) return x > y ? -1 : 1;
    return *(const int *)a - *(const int *)b; /* ties: lower id first (stable, deterministic) */
}

int st_gen_choose(float *logits, int V, const int32_t *history, int n_hist, const st_gen_params *p, st_rng *rng,
                  unsigned char *mark, int *order) {
    if (p->repetition_penalty != 1.0f) { /* transformers' RepetitionPenaltyLogitsProcessor, once per id */
        memset(mark, 0, (size_t)V);
        for (int i = 0; i < n_hist; i++) {
            int id = history[i];
            if (id < 0 || id >= V || mark[id]) continue;
            mark[id] = 1;
            float s = logits[id];
            logits[id] = s < 0 ? s * p->repetition_penalty : s / p->repetition_penalty;
        }
    }
    if (!(p->temperature > 0)) {
        int best = 0;
        for (int i = 1; i < V; i++)
            if (logits[i] > logits[best]) best = i;
        return best;
    }
    /* temperature, then top-k, then top-p (transformers' warper order); removed logits become -inf */
    for (int i = 0; i < V; i++) logits[i] /= p->temperature;
    int filter = (p->top_k > 0 && p->top_k < V) || p->top_p < 1.0f;
    if (filter) {
        for (int i = 0; i < V; i++) order[i] = i;
        g_sort_keys = logits;
        qsort(order, (size_t)V, sizeof *order, by_logit_desc);
        int keep = V;
        if (p->top_k > 0 && p->top_k < V) {
            float kth = logits[order[p->top_k - 1]];
            keep = p->top_k;
            while (keep < V && logits[order[keep]] >= kth) keep++; /* ties with the k-th stay */
        }
        if (p->top_p < 1.0f) {
            double mx = logits[order[0]], z = 0, prefix = 0;
            for (int r = 0; r < keep; r++) z += exp((double)logits[order[r]] - mx);
            int r = 0;
            for (; r < keep; r++) { /* keep while the mass above this token is below top_p */
                if (r > 0 && prefix >= p->top_p) break;
                prefix += exp((double)logits[order[r]] - mx) / z;
            }
            keep = r;
        }
        for (int r = keep; r < V; r++) logits[order[r]] = -INFINITY;
    }
    double mx = -INFINITY, z = 0;
    for (int i = 0; i < V; i++)
        if (logits[i] > mx) mx = logits[i];
    for (int i = 0; i < V; i++) z += exp((double)logits[i] - mx);
    double u = st_rng_uniform(rng) * z, acc = 0;
    int last = 0;
    for (int i = 0; i < V; i++) {
        if (logits[i] == -INFINITY) continue;
        last = i;
        acc += exp((double)logits[i] - mx);
        if (acc > u) return i;
    }
    return last; /* rounding left u at the very top: the last kept id */
}

/* ---------------- team size of one-row decode steps ---------------- */

/* A decode step of one row (batch 1) splits each matrix-vector product by output rows across the OpenMP
 * team, ~5 joins per layer: on a quiet machine both cores stream half of every matrix, but where other
 * jobs share the cores a descheduled thread stalls its partner at each join and one thread decodes faster
 * (2.5-5x at load average 8-10 on 2 cores, bench/RESULTS.md). A one-row forward gives the same bits on any
 * team (each output is one dot product; test_generate_torch checks 1 vs 2 threads), so with
 * SHARDTUNE_DECODE_TEAM=auto (the default) the steps try both: TEAM_PROBE steps on the full team,
 * TEAM_PROBE on one thread, then TEAM_RUN steps on the faster by wall time, and again. "full" keeps the
 * team, "1" one thread. Steps of several rows always use the team (their sgemm split depends on it). */
#define TEAM_PROBE 4
#define TEAM_RUN 120

typedef struct {
    int mode;      /* 0 auto, 1 full team, 2 one thread */
    int full;      /* the team size outside one-row steps */
    int step;      /* position in the probe / run cycle */
    int use1;      /* the run phase uses one thread */
    double sum[2]; /* the probe phase's seconds: [0] full team, [1] one thread */
} team_pick;

static int team_init(team_pick *t) {
    memset(t, 0, sizeof *t);
    t->full = omp_get_max_threads();
    const char *e = getenv("SHARDTUNE_DECODE_TEAM");
    if (!e || !*e || !strcmp(e, "auto")) t->mode = 0;
    else if (!strcmp(e, "full")) t->mode = 1;
    else if (!strcmp(e, "1")) t->mode = 2;
    else return st_fail(ST_EINVAL, "SHARDTUNE_DECODE_TEAM=%s: expected auto, full or 1", e);
    return 0;
}

/* Whether this one-row step runs on one thread (sets the team size for it). */
static int team_begin(team_pick *t) {
    int one;
    if (t->full <= 1 || t->mode == 1) one = 0;
    else if (t->mode == 2) one = 1;
    else if (t->step < 2 * TEAM_PROBE) one = t->step >= TEAM_PROBE;
    else one = t->use1;
    omp_set_num_threads(one ? 1 : t->full);
    return one;
}

/* After the step: its wall seconds feed the probe; the team size goes back to the full team. */
static void team_end(team_pick *t, int one, double seconds) {
    omp_set_num_threads(t->full);
    if (t->mode != 0 || t->full <= 1) return;
    if (t->step < 2 * TEAM_PROBE) t->sum[one] += seconds;
    if (++t->step == 2 * TEAM_PROBE) t->use1 = t->sum[1] < t->sum[0];
    if (t->step == 2 * TEAM_PROBE + TEAM_RUN) t->step = 0, t->sum[0] = t->sum[1] = 0.0;
}

/* ---------------- driver ---------------- */

int st_gen_max_positions(const st_model_config *c) {
    int n = c->max_seq; /* sliding windows: windowed attention over the full cache, no limit of their own */
    if (c->family == ST_FAMILY_LLAMA && c->rope.type == ST_ROPE_LONGROPE && c->rope.original_max > 0 &&
        c->rope.original_max < n)
        n = c->rope.original_max; /* transformers switches to the long factors mid-sequence past it */
    return n;
}

int st_gen_prompt_positions(const st_model *m) { return st_gen_max_positions(&m->cfg) - st_prompt_tokens(m); }

int st_gen_params_check(const st_gen_params *p, const st_model *m) {
    if (p->max_new < 1) return st_fail(ST_EINVAL, "--max-new %d must be at least 1", p->max_new);
    if (!(p->temperature >= 0) || !isfinite(p->temperature))
        return st_fail(ST_EINVAL, "--temperature %g must be >= 0 (0 = greedy)", (double)p->temperature);
    if (p->top_k < 0) return st_fail(ST_EINVAL, "--top-k %d must be >= 0 (0 = off)", p->top_k);
    if (!(p->top_p > 0 && p->top_p <= 1)) return st_fail(ST_EINVAL, "--top-p %g must be in (0, 1]", (double)p->top_p);
    if (!(p->repetition_penalty > 0) || !isfinite(p->repetition_penalty))
        return st_fail(ST_EINVAL, "--repetition-penalty %g must be > 0", (double)p->repetition_penalty);
    if (p->batch < 1) return st_fail(ST_EINVAL, "--batch %d must be at least 1", p->batch);
    if (!m->be->kv_store || !m->be->attention_cached || (m->cfg.qk_norm && !m->be->head_rmsnorm_fwd))
        return st_fail(ST_EDEVICE, "the %s backend has no decode kernels", m->be->name);
    return 0;
}

typedef struct {
    int32_t *hist; /* prompt + output ids */
    int n_hist, active;
    st_rng rng;
} seq_state;

static int is_eos(const st_gen_params *p, int32_t id) {
    for (int i = 0; i < p->n_eos; i++)
        if (p->eos[i] == id) return 1;
    return 0;
}

/* Appends the token chosen from logits (host row) to sequence k; marks it finished when it must stop. */
static void take_token(const gen_state *g, const st_gen_params *p, st_gen_seq *s, seq_state *st, int index,
                       float *row, unsigned char *mark, int *order) {
    if (s->logits) memcpy(s->logits + (size_t)s->n_out * g->V, row, (size_t)g->V * sizeof(float));
    int id = st_gen_choose(row, g->V, st->hist, st->n_hist, p, &st->rng, mark, order);
    s->out[s->n_out++] = id;
    st->hist[st->n_hist++] = id;
    if (is_eos(p, id)) { s->finish = ST_GEN_EOS; st->active = 0; }
    else if (p->stop && p->stop(p->stop_ctx, index, s->out, s->n_out)) { s->finish = ST_GEN_STOP; st->active = 0; }
    else if (s->n_out >= p->max_new) { s->finish = ST_GEN_LENGTH; st->active = 0; }
    else if (g->PV + st->n_hist > g->max_t) { s->finish = ST_GEN_MAXPOS; st->active = 0; } /* next feed: no position */
}

/* Prefix tuning: layer l's V prefix keys/values of sequences 0..nb-1 into the cache at positions 0..V-1
 * (the q part of the staged rows is unused by kv_store). */
static void store_prefix(gen_state *g, int nb, int32_t *seq, int32_t *pos) {
    const st_backend *be = g->be;
    size_t layer_cache = (size_t)g->S * g->max_t * g->KVD, W = (size_t)g->L * 2 * g->KVD;
    float *row = malloc((size_t)g->Q * sizeof(float));
    if (!row) return; /* cannot happen in practice; the answers then come without the prefix */
    memset(row, 0, (size_t)g->Q * sizeof(float));
    for (int l = 0; l < g->L; l++)
        for (int k = 0; k < nb; k++)
            for (int v0 = 0; v0 < g->PV; v0 += g->R) {
                int rows = g->PV - v0 < g->R ? g->PV - v0 : g->R;
                for (int r = 0; r < rows; r++) {
                    const float *t = g->ptab + (size_t)(v0 + r) * W + (size_t)2 * l * g->KVD;
                    memcpy(row + g->A, t, (size_t)g->KVD * sizeof(float));
                    memcpy(row + g->A + g->KVD, t + g->KVD, (size_t)g->KVD * sizeof(float));
                    be->copy_to_device(g->qkv + (size_t)r * g->Q, row, (size_t)g->Q * sizeof(float));
                    seq[r] = k;
                    pos[r] = v0 + r;
                }
                be->copy_to_device(g->d_seq, seq, (size_t)rows * sizeof(int32_t));
                be->copy_to_device(g->d_pos, pos, (size_t)rows * sizeof(int32_t));
                be->kv_store(g->kc + l * layer_cache, g->vc + l * layer_cache, g->qkv, g->d_seq, g->d_pos, rows, g->H,
                             g->KVH, g->hd, g->max_t);
            }
    free(row);
}

/* Prefill: every prompt token of the batch (after its virtual rows under prompt / P-tuning), in chunks of
 * at most R rows; then the first tokens. */
static void prefill(gen_state *g, const st_gen_params *p, st_gen_seq *s, seq_state *st, int nb, int first,
                    int32_t *tok, int32_t *seq, int32_t *pos, int *sel, float *lg, unsigned char *mark, int *order) {
    int rows = 0, n_sel = 0, sel_seq[g->S];
    if (g->prefix) store_prefix(g, nb, seq, pos);
    int virt = g->ptab && !g->prefix ? g->PV : 0;
    for (int k = 0; k < nb; k++) {
        for (int t = -virt; t < s[k].prompt_len; t++) {
            tok[rows] = t < 0 ? 0 : s[k].prompt[t];
            g->vrow[rows] = t < 0 ? t + virt : -1;
            seq[rows] = k;
            pos[rows] = g->PV + t;
            if (t == s[k].prompt_len - 1) { sel_seq[n_sel] = k; sel[n_sel++] = rows; }
            rows++;
            int last = k == nb - 1 && t == s[k].prompt_len - 1;
            if (rows < g->R && !last) continue;
            forward_rows(g, tok, seq, pos, g->vrow, rows, sel, n_sel, lg);
            for (int j = 0; j < n_sel; j++)
                take_token(g, p, &s[sel_seq[j]], &st[sel_seq[j]], first + sel_seq[j], lg + (size_t)j * g->V, mark,
                           order);
            rows = n_sel = 0;
        }
    }
}

/* CPU seconds of every thread of this process (timing only: on a shared machine, with one thread, the
 * time it actually ran). */
static double cpu_seconds(void) {
    struct timespec ts;
    if (clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts) != 0) return 0.0;
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* This process's resident memory now (VmRSS), MB; 0 when unknown. */
static double resident_mb(void) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    double kb = 0;
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, "VmRSS:", 6)) kb = atof(line + 6);
    if (f) fclose(f);
    return kb / 1024.0;
}

static int run_batch(gen_state *g, const st_gen_params *p, st_gen_seq *s, seq_state *st, int nb, int first,
                     team_pick *team) {
    int R = g->R, V = g->V;
    int32_t *tok = malloc((size_t)R * sizeof *tok), *seq = malloc((size_t)R * sizeof *seq);
    int32_t *pos = malloc((size_t)R * sizeof *pos);
    int *sel = malloc((size_t)R * sizeof *sel), *order = malloc((size_t)V * sizeof *order);
    float *lg = malloc((size_t)g->S * V * sizeof *lg);
    unsigned char *mark = malloc((size_t)V);
    int rc = 0;
    if (!tok || !seq || !pos || !sel || !order || !lg || !mark) {
        rc = st_fail(ST_ENOMEM, "out of memory for generation");
        goto out;
    }
    double t0 = st_now(), c0 = cpu_seconds();
    prefill(g, p, s, st, nb, first, tok, seq, pos, sel, lg, mark, order);
    if (p->stats) {
        g->be->synchronize();
        p->stats->prefill_s += st_now() - t0;
        p->stats->prefill_cpu_s += cpu_seconds() - c0;
        for (int k = 0; k < nb; k++) p->stats->prefill_tokens += s[k].prompt_len;
        t0 = st_now();
        c0 = cpu_seconds();
    }
    for (;;) { /* one decode step: the last token of every unfinished sequence */
        int rows = 0;
        for (int k = 0; k < nb; k++) {
            if (!st[k].active) continue;
            tok[rows] = st[k].hist[st[k].n_hist - 1];
            seq[rows] = k;
            pos[rows] = g->PV + st[k].n_hist - 1;
            sel[rows] = rows;
            rows++;
        }
        if (rows == 0) break;
        int one = rows == 1 && g->be->host_memory ? team_begin(team) : 0;
        double ts = st_now();
        forward_rows(g, tok, seq, pos, NULL, rows, sel, rows, lg);
        if (rows == 1 && g->be->host_memory) team_end(team, one, st_now() - ts);
        if (p->stats) p->stats->decode_tokens += rows, p->stats->decode_steps++, p->stats->decode_team1_steps += one;
        for (int r = 0; r < rows; r++)
            take_token(g, p, &s[seq[r]], &st[seq[r]], first + seq[r], lg + (size_t)r * V, mark, order);
    }
    if (p->stats) {
        p->stats->decode_s += st_now() - t0;
        p->stats->decode_cpu_s += cpu_seconds() - c0;
    }
out:
    free(tok); free(seq); free(pos); free(sel); free(order); free(lg); free(mark);
    return rc;
}

static int generate(const st_model *m, const st_gen_params *p, st_gen_seq *seqs, int n, const float *ptab) {
    int rc = st_gen_params_check(p, m);
    if (rc) return rc;
    int PV = st_prompt_tokens(m), max_t = 0, limit = st_gen_max_positions(&m->cfg) - PV;
    for (int i = 0; i < n; i++) {
        seqs[i].out = NULL;
        seqs[i].n_out = 0;
        if (seqs[i].prompt_len < 1)
            return st_fail(ST_EINVAL, "prompt %llu is empty", (unsigned long long)seqs[i].stream);
        if (seqs[i].prompt_len > limit)
            return st_fail(ST_EINVAL, "prompt %llu has %d tokens, more than the %d positions generation can use "
                                      "with this model (max positions, sliding window, virtual tokens)",
                           (unsigned long long)seqs[i].stream, seqs[i].prompt_len, limit);
        for (int t = 0; t < seqs[i].prompt_len; t++)
            if (seqs[i].prompt[t] < 0 || seqs[i].prompt[t] >= m->cfg.vocab)
                return st_fail(ST_EINVAL, "prompt %llu: token %d is outside the model's vocabulary (%d)",
                               (unsigned long long)seqs[i].stream, seqs[i].prompt[t], m->cfg.vocab);
        int need = seqs[i].prompt_len + p->max_new - 1; /* the last token is never fed back */
        if (need > max_t) max_t = need;
    }
    if (n == 0) return 0;
    if (max_t > limit) max_t = limit;
    int S = p->batch < n ? p->batch : n;
    team_pick team;
    if ((rc = team_init(&team))) return rc;
    gen_state g;
    rc = state_init(&g, m, p->hold, S, max_t + PV);
    g.sync = p->sync;
    g.sync_ctx = p->sync_ctx;
    g.ptab = ptab;
    g.PV = PV;
    g.prefix = st_prompt_is_prefix(m);
    seq_state *st = calloc((size_t)S, sizeof *st);
    if (!rc && !st) rc = st_fail(ST_ENOMEM, "out of memory for generation");
    for (int b0 = 0; !rc && b0 < n; b0 += S) {
        int nb = n - b0 < S ? n - b0 : S;
        for (int k = 0; k < nb && !rc; k++) {
            st_gen_seq *s = &seqs[b0 + k];
            s->out = malloc((size_t)p->max_new * sizeof(int32_t));
            st[k].hist = malloc((size_t)(s->prompt_len + p->max_new) * sizeof(int32_t));
            if (!s->out || !st[k].hist) { rc = st_fail(ST_ENOMEM, "out of memory for outputs"); break; }
            memcpy(st[k].hist, s->prompt, (size_t)s->prompt_len * sizeof(int32_t));
            st[k].n_hist = s->prompt_len;
            st[k].active = 1;
            st_rng_seed(&st[k].rng, p->seed, s->stream);
        }
        if (!rc) rc = run_batch(&g, p, seqs + b0, st, nb, b0, &team);
        for (int k = 0; k < nb; k++) { free(st[k].hist); st[k].hist = NULL; }
    }
    if (!rc && p->stats) {
        p->stats->hold_bf16_floats = g.hold ? (long)g.hold->floats : 0;
        p->stats->rss_mb = resident_mb();
    }
    free(st);
    state_free(&g);
    return rc;
}

/* The prompt table [V, width] (host, caller frees): acquired (collective), copied or encoded, released. */
static int prompt_table(const st_model *m, float **out) {
    *out = NULL;
    if (!m->prompt) return 0;
    int pp = st_prompt_param(m), np = st_prompt_param_count(m);
    size_t n = (size_t)st_prompt_tokens(m) * st_prompt_table_width(m);
    float *t = malloc(n * sizeof(float) + 1);
    st_model_acquire(m, pp, pp + np);
    if (t && st_prompt_has_encoder(m)) st_prompt_encode(m, t);
    else if (t) m->be->copy_to_host(t, m->weights + m->params[pp].offset, n * sizeof(float));
    st_model_release(m, pp, pp + np);
    if (!t) return st_fail(ST_ENOMEM, "out of memory for the prompt table");
    if (!m->be->host_memory) {
        free(t);
        return st_fail(ST_ECONFIG, "generation with a prompt runs on the cpu backend only");
    }
    *out = t;
    return 0;
}

int st_generate(const st_model *m, const st_gen_params *p, st_gen_seq *seqs, int n) {
    float *ptab = NULL;
    int rc = prompt_table(m, &ptab);
    if (!rc) rc = generate(m, p, seqs, n, ptab);
    free(ptab);
    /* lockstep: this rank is done (or failed); it keeps taking part in the others' gathers */
    while (p->sync && p->sync(p->sync_ctx, 0)) idle_pass(m);
    return rc;
}
