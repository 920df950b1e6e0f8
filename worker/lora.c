/* lora.c — LoRA adapters on a st_model (see lora.h).
 *
 * Forward at a site: u = x @ A^T [N, r] (saved), y[:, col0:col0+out] += scale * u @ B^T.
 * Backward from dy (the site output's gradient, columns col0..col0+out):
 *   dB += scale * dy^T @ u ; du = scale * dy @ B ; dA += du^T @ x ; dx += du @ A.
 * No base weight gradient is ever formed. DoRA (c = m / ||W + scale B A||_row, the norm constant in backward):
 *   forward  z = x W^T + scale * u B^T (saved), y[:, block] += c * z - x W^T  (the base term is already in y)
 *   backward dz = c * dy ; dm += sum_rows dy * z / n ; A, B gradients from dz as above ;
 *            dx += (dz - dy) @ W  (the base projection's own dx used dy).
 * With LoRA dropout (training forwards) x above is the dropped input xd = mask * x / (1 - p), one mask for the
 * LoRA branch and DoRA's base term alike, as peft's DoRA forward (F.linear(dropout(x), W) replaces the base
 * result): the base projection's own y keeps the undropped x, and dx += mask * ((dz - dy) @ W + du @ A) / (1 - p).
 * Under precision bf16 (model.c: the base matmuls read the bf16 weight copy) W here is that copy widened to
 * fp32 — the base weight as the base matmul sees it, what peft's DoRA reads from a bf16 base layer
 * (weight.to(x.dtype)) — in the norms and the DoRA term alike; the rest of the adapter math is fp32 on the
 * bf16-rounded input the base matmul reads (as LoRA under bf16).
 * A packed site (Llama q/k/v, gate/up) writes and reads a column
 * block of a wider row-major matrix: the backend has no strided matmul, so such an adapter goes through a
 * contiguous scratch tensor copied by the backend's copy_cols; the dropout mask is the backend's
 * lora_dropout, DoRA's norms and scalings its dora_* kernels. The working memory is backend memory, so
 * LoRA, DoRA (and QLoRA's adapters) run on a device backend. */
#include "worker/lora.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/error.h"
#include "common/rng.h"
#include "worker/qlora.h"

const char *const st_lora_target_names[] = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj", "c_attn", "c_proj", "c_fc", NULL};

typedef struct {
    int a, b;           /* registry indices of lora_A [r, in] and lora_B [out, r] */
    int mag;            /* DoRA: registry index of lora_magnitude_vector [out], else -1 */
    int end;            /* registry index after the adapter's last tensor */
    int base;           /* registry index of the adapted weight */
    int layer;
    st_lora_site site;
    int col0, out, in;  /* output columns [col0, col0 + out) of the site's packed output; input features */
} adapter;

struct st_lora {
    st_lora_spec spec;  /* as attached; spec.layers points at `layers` */
    unsigned char *layers; /* [n_layer] */
    int r;
    float scale;
    int n;
    adapter *ad;        /* registry order, layer-major */
    int *layer_first;   /* [L + 1]: index into ad of each layer's first adapter */
    size_t rows;        /* N the working memory is sized for */
    size_t win0, win_n; /* st_lora_set_rows: the row window [win0, win0 + win_n) of the calls (win_n 0: all rows) */
    float *u;           /* [n][rows * r]: x @ A^T of the last forward */
    float *tmp, *du;    /* [tmp_floats] (tmp_floats()), [rows * r] */
    size_t tmp_floats;
    int max_out;
    size_t max_w;       /* largest out * in of an adapted weight */
    /* DoRA */
    float *z;           /* [n][rows * out_k] (offsets zoff) pre-scale outputs of the last forward */
    size_t *zoff;       /* [n] */
    float *c, *inv_n;   /* [n][max_out]: m / norm and 1 / norm of the last forward */
    float *base, *ba;   /* [rows * max_out] x W^T ; [ba_floats] B @ A (whole, or a panel of rows: dora_scale) */
    size_t ba_floats;
    /* dropout */
    int drop_on;        /* the current forward trains with dropout > 0 */
    int64_t drop_step, drop_sample; /* the micro-batch's key: step and its first global sample */
    float *xd;          /* [rows * max_in] the dropped input (forward) / du @ A (backward) */
    int max_in;
    float *wf;          /* DoRA under bf16: [max_w] an adapted weight's bf16 copy widened to fp32 (not over a
                         * fused QLoRA base: its products and norms read the codes, q_base) */
    const st_backend *be; /* the backend the working memory (u .. xd, wf) came from; NULL before any */
};

unsigned st_lora_target_bit(const char *name) {
    for (int i = 0; name && st_lora_target_names[i]; i++)
        if (!strcmp(name, st_lora_target_names[i])) return 1u << i;
    return 0;
}

/* One projection of a layer a target selects: its HF weight name suffix, site and packed column offset. */
typedef struct {
    unsigned bit;
    const char *suffix; /* after "<layer prefix>." */
    st_lora_site site;
} target_def;

static const target_def llama_targets[] = {
    {ST_LORA_Q, "self_attn.q_proj.weight", ST_LORA_SITE_QKV}, {ST_LORA_K, "self_attn.k_proj.weight", ST_LORA_SITE_QKV},
    {ST_LORA_V, "self_attn.v_proj.weight", ST_LORA_SITE_QKV}, {ST_LORA_O, "self_attn.o_proj.weight", ST_LORA_SITE_O},
    {ST_LORA_GATE, "mlp.gate_proj.weight", ST_LORA_SITE_UP},  {ST_LORA_UP, "mlp.up_proj.weight", ST_LORA_SITE_UP},
    {ST_LORA_DOWN, "mlp.down_proj.weight", ST_LORA_SITE_DOWN},
};
static const target_def gpt2_targets[] = {
    {ST_LORA_C_ATTN, "attn.c_attn.weight", ST_LORA_SITE_QKV}, {ST_LORA_C_PROJ, "attn.c_proj.weight", ST_LORA_SITE_O},
    {ST_LORA_C_FC, "mlp.c_fc.weight", ST_LORA_SITE_UP},       {ST_LORA_C_PROJ, "mlp.c_proj.weight", ST_LORA_SITE_DOWN},
};

static void valid_list(unsigned all, char *buf, size_t cap) {
    buf[0] = 0;
    for (int i = 0; st_lora_target_names[i]; i++)
        if (all & (1u << i))
            snprintf(buf + strlen(buf), cap - strlen(buf), "%s%s", buf[0] ? ", " : "", st_lora_target_names[i]);
}

static int check_spec(const st_model *m, const st_lora_spec *s) {
    if (!(s->dropout >= 0 && s->dropout < 1))
        return st_fail(ST_ECONFIG, "finetune.lora.dropout must be in [0, 1), got %g", s->dropout);
    int gpt2 = m->cfg.family == ST_FAMILY_GPT2;
    unsigned all = gpt2 ? ST_LORA_GPT2_ALL : ST_LORA_LLAMA_ALL;
    char valid[160];
    valid_list(all, valid, sizeof valid);
    if (s->r < 1) return st_fail(ST_ECONFIG, "finetune.lora.r must be >= 1, got %d", s->r);
    if (!(s->alpha > 0)) return st_fail(ST_ECONFIG, "finetune.lora.alpha must be > 0, got %g", s->alpha);
    if (!s->targets) return st_fail(ST_ECONFIG, "finetune.lora.targets is empty (valid: %s)", valid);
    for (int i = 0; st_lora_target_names[i]; i++)
        if ((s->targets & (1u << i)) && !(all & (1u << i)))
            return st_fail(ST_ECONFIG, "finetune.lora.targets: %s is not a projection of a %s model (valid: %s)",
                           st_lora_target_names[i], gpt2 ? "gpt2" : "llama-family", valid);
    int any = 0;
    for (int l = 0; l < m->cfg.n_layer; l++) any |= !s->layers || s->layers[l];
    if (!any) return st_fail(ST_ECONFIG, "finetune.lora.layers selects no layer of a %d-layer model", m->cfg.n_layer);
    if (m->lora) return st_fail(ST_EINVAL, "the model already has LoRA adapters");
    if (m->weights_bf16 && !m->n_w16) /* the bf16 copy is sized for the weights before the adapters (a bf16-only
                                         part's copy came with the weights and grows with them: st_model_grow_bf16) */
        return st_fail(ST_EINVAL, "LoRA adapters must be attached before precision bf16 is set");
    return 0;
}

/* Column offset of a projection inside its site's packed output. */
static int packed_col0(const st_model *m, unsigned bit) {
    int hd = m->cfg.head_dim, QD = m->cfg.n_head * hd, KVD = m->cfg.n_kv_head * hd;
    if (bit == ST_LORA_K) return QD;
    if (bit == ST_LORA_V) return QD + KVD;
    if (bit == ST_LORA_UP) return m->cfg.d_ff;
    return 0;
}

static int append_param(st_model *m, int *cap, const char *name, int64_t d0, int64_t d1, int layer, size_t offset) {
    /* d1 == 0: a vector (DoRA magnitude) */
    if (m->n_params == *cap) {
        int nc = *cap * 2;
        st_param *np = realloc(m->params, (size_t)nc * sizeof *np);
        if (!np) return st_fail(ST_ENOMEM, "out of memory adding LoRA adapters to the registry");
        m->params = np;
        *cap = nc;
    }
    st_param *p = &m->params[m->n_params++];
    memset(p, 0, sizeof *p);
    snprintf(p->name, sizeof p->name, "%s", name);
    p->ndim = d1 > 0 ? 2 : 1;
    p->shape[0] = d0;
    p->shape[1] = d1;
    p->numel = (size_t)d0 * (size_t)(d1 > 0 ? d1 : 1);
    p->offset = offset;
    p->layer = layer;
    p->kind = ST_MOD_LORA;
    p->grad_offset = -1;
    return 0;
}

/* Adds the registry entries of every adapter; returns the floats they need. */
static int add_adapters(st_model *m, st_lora *lo, const st_lora_spec *s, size_t *extra) {
    int gpt2 = m->cfg.family == ST_FAMILY_GPT2;
    const target_def *defs = gpt2 ? gpt2_targets : llama_targets;
    int n_defs = gpt2 ? 4 : 7, cap = m->n_params + 1;
    size_t off = m->n_weights;
    char base[96], name[128];
    lo->ad = calloc((size_t)m->cfg.n_layer * (size_t)n_defs, sizeof *lo->ad);
    lo->layer_first = calloc((size_t)m->cfg.n_layer + 1, sizeof *lo->layer_first);
    if (!lo->ad || !lo->layer_first) return st_fail(ST_ENOMEM, "out of memory for LoRA adapters");
    for (int l = 0; l < m->cfg.n_layer; l++) {
        lo->layer_first[l] = lo->n;
        if (s->layers && !s->layers[l]) continue;
        for (int t = 0; t < n_defs; t++) {
            if (!(s->targets & defs[t].bit)) continue;
            snprintf(base, sizeof base, gpt2 ? "h.%d.%s" : "model.layers.%d.%s", l, defs[t].suffix);
            int bi = st_model_find(m, base);
            if (bi < 0) return st_fail(ST_ECONFIG, "LoRA target %s: the model has no %s", defs[t].suffix, base);
            adapter *a = &lo->ad[lo->n++];
            a->base = bi;
            a->layer = l;
            a->site = defs[t].site;
            a->out = (int)m->params[bi].shape[0];
            a->in = (int)m->params[bi].shape[1];
            a->col0 = packed_col0(m, defs[t].bit);
            if (a->out > lo->max_out) lo->max_out = a->out;
            if ((size_t)a->out * a->in > lo->max_w) lo->max_w = (size_t)a->out * a->in;
            size_t stem = strlen(base) - strlen(".weight");
            snprintf(name, sizeof name, "%.*s.lora_A.weight", (int)stem, base);
            a->a = m->n_params;
            int rc = append_param(m, &cap, name, s->r, a->in, l, off);
            off += (size_t)s->r * a->in;
            snprintf(name, sizeof name, "%.*s.lora_B.weight", (int)stem, base);
            a->b = m->n_params;
            if (!rc) rc = append_param(m, &cap, name, a->out, s->r, l, off);
            off += (size_t)a->out * s->r;
            a->mag = -1;
            if (!rc && s->dora) {
                snprintf(name, sizeof name, "%.*s.lora_magnitude_vector", (int)stem, base);
                a->mag = m->n_params;
                rc = append_param(m, &cap, name, a->out, 0, l, off);
                off += (size_t)a->out;
            }
            a->end = m->n_params;
            if (rc) return rc;
        }
    }
    lo->layer_first[m->cfg.n_layer] = lo->n;
    *extra = off - m->n_weights;
    return 0;
}

/* A ~ U(-1/sqrt(in), 1/sqrt(in)) per tensor stream, B = 0, DoRA's m = the base rows' norms (with_mag) into
 * host[extra] (the adapters' floats, from n_base_weights on). */
static int fill_host(st_model *m, st_lora *lo, float *host, uint64_t seed, int with_mag) {
    for (int k = 0; k < lo->n; k++) {
        const st_param *p = &m->params[lo->ad[k].a];
        st_rng rng;
        st_rng_seed(&rng, seed, 0x4c6f5241ull + (uint64_t)lo->ad[k].a); /* "LoRA" + index: its own stream */
        double bound = 1.0 / sqrt((double)lo->ad[k].in);
        float *w = host + (p->offset - m->n_base_weights);
        for (size_t j = 0; j < p->numel; j++) w[j] = (float)((2.0 * st_rng_uniform(&rng) - 1.0) * bound);
        if (with_mag && lo->ad[k].mag >= 0) { /* DoRA: m = ||W + scale B A||_row = ||W||_row while B = 0 */
            const adapter *a = &lo->ad[k];
            float *row = malloc((size_t)a->in * sizeof(float)), *mg = host + (m->params[a->mag].offset - m->n_base_weights);
            if (!row) return st_fail(ST_ENOMEM, "out of memory initializing DoRA");
            for (int j = 0; j < a->out; j++) { /* a base held in bf16 only: widened, exactly (worker/model.h) */
                st_model_param_fp32_host(m, a->base, (size_t)j * a->in, (size_t)a->in, row);
                double ss = 0;
                for (int i = 0; i < a->in; i++) ss += (double)row[i] * row[i];
                mg[j] = (float)sqrt(ss);
            }
            free(row);
        }
    }
    return 0;
}

/* The adapters' initial values into the grown weight buffer. */
static int init_weights(st_model *m, st_lora *lo, size_t extra, uint64_t seed) {
    float *host = calloc(extra ? extra : 1, sizeof(float));
    if (!host) return st_fail(ST_ENOMEM, "out of memory initializing LoRA adapters");
    int rc = fill_host(m, lo, host, seed, !m->weights_unread); /* unread: st_lora_init_magnitudes_kept later */
    if (rc) { free(host); return rc; }
    /* a model bound without weights (ZeRO-3 on a device, buffers_external): the adapters' floats only */
    int tail = m->buffers_external && !m->weights;
    size_t w16 = m->n_w16; /* a bf16-only part (st_model_bind_frozen_bf16) has no fp32 place: not allocated */
    float *nw = m->be->alloc((tail ? extra + 1 : m->n_weights - w16) * sizeof(float));
    if (!nw) { free(host); return st_fail(ST_ENOMEM, "cannot allocate %.1f MB for weights with LoRA adapters", m->n_weights * 4.0 / 1e6); }
    if (tail) {
        m->be->copy_to_device(nw, host, extra * sizeof(float));
        m->weights = nw - m->n_base_weights; /* element offset n_base_weights is the allocation's first */
        m->weights_tail_only = 1;
        free(host);
        return 0;
    }
    nw -= w16;
    if (!m->weights_unread) m->be->copy(nw + w16, m->weights + w16, (m->n_base_weights - w16) * sizeof(float)); /* else zeros */
    m->be->copy_to_device(nw + m->n_base_weights, host, extra * sizeof(float));
    m->be->free(m->weights + w16);
    m->weights = nw;
    free(host);
    return st_model_grow_bf16(m, m->n_base_weights);
}

int st_lora_init_adapters(st_model *m) {
    st_lora *lo = m->lora;
    if (!lo || !m->be || !m->weights) return st_fail(ST_EINVAL, "st_lora_init_adapters: no adapters or no weight buffer");
    size_t extra = m->n_weights - m->n_base_weights;
    float *host = calloc(extra ? extra : 1, sizeof(float));
    if (!host) return st_fail(ST_ENOMEM, "out of memory initializing LoRA adapters");
    int rc = fill_host(m, lo, host, lo->spec.seed, 0);
    if (!rc) m->be->copy_to_device(m->weights + m->n_base_weights, host, extra * sizeof(float));
    free(host);
    st_model_weights_changed(m);
    return rc;
}

size_t st_lora_dora_base_floats(const st_model *m) {
    size_t most = 0;
    for (int k = 0; m->lora && k < m->lora->n; k++)
        if (m->lora->ad[k].mag >= 0 && m->params[m->lora->ad[k].base].numel > most) most = m->params[m->lora->ad[k].base].numel;
    return most;
}

int st_lora_init_magnitudes(st_model *m) { return st_lora_init_magnitudes_kept(m, NULL, NULL); }

/* DoRA's m = ||W||_row of every adapted weight, W its dequantized values when the base is quantized: read
 * a row at a time after the acquire (a sharded base, ZeRO-3: gathered whole), or (a quantized base, whose
 * tensors have no fp32 place: worker/qlora.h) a panel of rows at a time, st_qlora_rows (its fp32 values, the
 * acquire first: ZeRO-3 gathers the quantized bytes). */
int st_lora_init_magnitudes_kept(st_model *m, void (*keep)(void *ctx, const st_model *m, int i, size_t *a, size_t *b),
                                 void *ctx) {
    st_lora *lo = m->lora;
    size_t most = 0;
    for (int k = 0; lo && k < lo->n; k++) {
        const adapter *a = &lo->ad[k];
        size_t f = st_qlora_holds(m, a->base) ? (size_t)st_qlora_panel_rows(m, a->base) * (size_t)a->in : (size_t)a->in;
        most = f > most ? f : most;
    }
    float *row = malloc(most * sizeof(float) + 1), *mg = malloc((size_t)(lo ? lo->max_out : 0) * sizeof(float) + 1);
    int rc = row && mg ? 0 : st_fail(ST_ENOMEM, "out of memory initializing DoRA");
    for (int k = 0; !rc && lo && k < lo->n; k++) {
        const adapter *a = &lo->ad[k];
        if (a->mag < 0) continue;
        int q = st_qlora_holds(m, a->base), P = q ? st_qlora_panel_rows(m, a->base) : 1;
        st_model_acquire(m, a->base, a->base + 1); /* ZeRO-3: gathered (a quantized base: its bytes) */
        for (int j0 = 0; !rc && j0 < a->out; j0 += P) {
            int n = a->out - j0 < P ? a->out - j0 : P;
            const float *src = q ? st_qlora_rows(m, a->base, j0, n, 0)
                                 : st_model_param_weights(m, a->base) + (size_t)j0 * a->in;
            if (!src) { rc = st_fail_context(ST_ENOMEM, "initializing DoRA"); break; }
            if (!q && st_model_fp32_dropped(m, a->base)) /* held in bf16 only (loaded so): widened, exactly */
                st_model_param_fp32(m, a->base, (size_t)j0 * a->in, (size_t)n * a->in, row);
            else m->be->copy_to_host(row, src, (size_t)n * a->in * sizeof(float));
            for (int j = 0; j < n; j++) {
                const float *r = row + (size_t)j * a->in;
                double ss = 0;
                for (int i = 0; i < a->in; i++) ss += (double)r[i] * r[i];
                mg[j0 + j] = (float)sqrt(ss);
            }
        }
        st_model_release(m, a->base, a->base + 1);
        size_t s = 0, e = (size_t)a->out;
        if (keep) keep(ctx, m, a->mag, &s, &e);
        if (!rc && e > s) m->be->copy_to_device(st_model_part(m, a->mag) + s, mg + s, (e - s) * sizeof(float)); /* its kept part */
    }
    free(row);
    free(mg);
    st_model_weights_changed(m);
    return rc;
}

int st_lora_attach(st_model *m, const st_lora_spec *s) {
    int rc = check_spec(m, s);
    if (rc) return rc;
    st_lora *lo = calloc(1, sizeof *lo);
    if (!lo) return st_fail(ST_ENOMEM, "out of memory for LoRA adapters");
    lo->spec = *s;
    lo->layers = malloc((size_t)m->cfg.n_layer);
    if (!lo->layers) { free(lo); return st_fail(ST_ENOMEM, "out of memory for LoRA adapters"); }
    for (int l = 0; l < m->cfg.n_layer; l++) lo->layers[l] = !s->layers || s->layers[l];
    lo->spec.layers = lo->layers;
    lo->r = s->r;
    lo->scale = (float)(s->rslora ? s->alpha / sqrt((double)s->r) : s->alpha / s->r);
    int n_base = m->n_params;
    size_t extra = 0;
    rc = add_adapters(m, lo, s, &extra);
    if (rc) { /* drop any entries added so far: the model stays as it was */
        m->n_params = n_base;
        st_lora_free(lo);
        return rc;
    }
    m->n_base_params = n_base;
    m->n_base_weights = m->n_weights;
    m->n_weights += extra;
    m->lora = lo;
    if (m->be && (rc = init_weights(m, lo, extra, s->seed))) return rc;
    return 0;
}

/* The working memory: backend memory (+1 float: never a zero-size allocation). */
static float *work_alloc(const st_backend *be, size_t floats) { return be->alloc((floats + 1) * sizeof(float)); }
static void work_free(const st_backend *be, float **p) {
    if (*p) be->free(*p);
    *p = NULL;
}

static void free_rows(st_lora *l) {
    float **bufs[] = {&l->u, &l->tmp, &l->du, &l->z, &l->c, &l->inv_n, &l->base, &l->ba, &l->xd};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) work_free(l->be, bufs[i]);
    free(l->zoff);
    l->zoff = NULL;
    l->rows = 0;
}

void st_lora_free(st_lora *l) {
    if (!l) return;
    if (l->be) {
        free_rows(l);
        work_free(l->be, &l->wf);
    }
    free(l->ad);
    free(l->layer_first);
    free(l->layers);
    free(l);
}

int st_lora_spec_of(const st_model *m, st_lora_spec *out) {
    if (!m->lora) return st_fail(ST_EINVAL, "the model has no LoRA adapters");
    *out = m->lora->spec;
    return 0;
}

double st_lora_scale(const st_model *m) { return m->lora ? m->lora->scale : 0.0; }
int st_lora_rank(const st_model *m) { return m->lora ? m->lora->r : 0; }

int st_lora_base_of(const st_model *m, int idx, int *is_b) {
    const st_lora *lo = m->lora;
    for (int k = 0; lo && k < lo->n; k++) {
        if (lo->ad[k].a == idx || lo->ad[k].b == idx || lo->ad[k].mag == idx) {
            if (is_b) *is_b = lo->ad[k].b == idx;
            return lo->ad[k].base;
        }
    }
    return -1;
}

void st_lora_peft_name(const st_model *m, int idx, char *out, size_t cap) {
    /* peft prefixes the module path of the task model: LlamaForCausalLM's is already model.layers...,
     * GPT2LMHeadModel's is transformer.h... (our registry drops "transformer.") */
    snprintf(out, cap, "base_model.model.%s%s", m->cfg.family == ST_FAMILY_GPT2 ? "transformer." : "",
             m->params[idx].name);
}

void st_lora_layer_params(const st_model *m, int l, int *first, int *last) {
    const st_lora *lo = m->lora;
    *first = *last = 0;
    if (!lo || l < 0 || l >= m->cfg.n_layer) return;
    int k0 = lo->layer_first[l], k1 = lo->layer_first[l + 1];
    if (k1 > k0) { *first = lo->ad[k0].a; *last = lo->ad[k1 - 1].end; }
}

/* Floats of lo->tmp: a site's output columns of one adapter for the rows a call covers (N, or at the MLP's
 * sites under model.c's token blocks mlp_rows), DoRA's dz for N rows. */
static size_t tmp_floats(const st_lora *lo, size_t N, size_t mlp_rows) {
    size_t f = 0;
    for (int k = 0; k < lo->n; k++) {
        const adapter *a = &lo->ad[k];
        int mlp = a->site == ST_LORA_SITE_UP || a->site == ST_LORA_SITE_DOWN;
        size_t need = (mlp && !lo->spec.dora ? mlp_rows : N) * (size_t)a->out;
        f = need > f ? need : f;
    }
    return f;
}

size_t st_lora_work_floats(const st_model *m, size_t rows, size_t mlp_rows) {
    const st_lora *lo = m->lora;
    if (!lo) return 0;
    size_t f = rows * ((size_t)lo->n * lo->r + (size_t)lo->r) + tmp_floats(lo, rows, mlp_rows);
    if (lo->spec.dropout > 0)
        for (int k = 0, mx = 0; k < lo->n; k++)
            if (lo->ad[k].in > mx) { f += rows * (size_t)(lo->ad[k].in - mx); mx = lo->ad[k].in; }
    if (lo->spec.dora) {
        for (int k = 0; k < lo->n; k++) f += rows * (size_t)lo->ad[k].out + 2 * (size_t)lo->max_out;
        f += rows * (size_t)lo->max_out;
    }
    return f;
}

/* Floats of lo->ba: B A whole (max_w), or over a fused QLoRA base one panel of rows (st_qlora_panel_rows). */
static size_t ba_floats(const st_model *m, const st_lora *lo, int qfused) {
    if (!qfused) return lo->max_w;
    size_t f = 0;
    for (int k = 0; k < lo->n; k++) {
        const adapter *a = &lo->ad[k];
        size_t p = a->mag >= 0 ? (size_t)st_qlora_panel_rows(m, a->base) * (size_t)a->in : 0;
        f = p > f ? p : f;
    }
    return f;
}

size_t st_lora_dora_weight_floats(const st_model *m, int qfused, int bf16) {
    const st_lora *lo = m->lora;
    if (!lo || !lo->spec.dora) return 0;
    return ba_floats(m, lo, qfused) + (bf16 && !qfused ? lo->max_w : 0);
}

/* Working memory for N rows (backend memory; zoff, an index table, is host memory). */
static int ensure_rows(const st_model *m, st_lora *lo, size_t N) {
    const st_backend *be = m->be;
    size_t tf = tmp_floats(lo, N, (size_t)st_model_mlp_rows(m));
    if (lo->rows == N && lo->be == be && lo->tmp_floats == tf) return 0;
    if (lo->be) free_rows(lo);
    lo->be = be;
    lo->u = work_alloc(be, (size_t)lo->n * N * lo->r);
    lo->tmp = work_alloc(be, tf);
    lo->tmp_floats = tf;
    lo->du = work_alloc(be, N * (size_t)lo->r);
    int bad = !lo->u || !lo->tmp || !lo->du;
    if (!bad && lo->spec.dropout > 0) {
        for (int k = 0; k < lo->n; k++) lo->max_in = lo->ad[k].in > lo->max_in ? lo->ad[k].in : lo->max_in;
        lo->xd = work_alloc(be, N * (size_t)lo->max_in);
        bad = !lo->xd;
    }
    if (!bad && lo->spec.dora) {
        size_t zn = 0;
        lo->zoff = malloc((size_t)lo->n * sizeof *lo->zoff + 1);
        for (int k = 0; lo->zoff && k < lo->n; k++) { lo->zoff[k] = zn; zn += N * (size_t)lo->ad[k].out; }
        lo->z = work_alloc(be, zn);
        lo->c = work_alloc(be, (size_t)lo->n * lo->max_out);
        lo->inv_n = work_alloc(be, (size_t)lo->n * lo->max_out);
        lo->base = work_alloc(be, N * (size_t)lo->max_out);
        lo->ba_floats = ba_floats(m, lo, st_qlora_fused(m));
        lo->ba = work_alloc(be, lo->ba_floats);
        bad = !lo->zoff || !lo->z || !lo->c || !lo->inv_n || !lo->base || !lo->ba;
    }
    lo->rows = bad ? 0 : N;
    return bad ? st_fail(ST_ENOMEM, "out of memory for LoRA activations (%zu rows)", N) : 0;
}

int st_lora_reserve(st_model *m, size_t rows) { return m->lora ? ensure_rows(m, m->lora, rows) : 0; }

int st_lora_rows_whole(const st_model *m) {
    return m->lora && (m->lora->spec.dora || m->lora->spec.dropout > 0);
}

void st_lora_set_rows(st_model *m, size_t r0, size_t n) {
    if (!m->lora) return;
    m->lora->win0 = r0;
    m->lora->win_n = n;
}

/* The rows the next forward / backward call covers (the window, else all) and adapter k's saved u for them. */
static size_t win_rows(const st_lora *lo, size_t N) { return lo->win_n ? lo->win_n : N; }
static float *win_u(const st_lora *lo, int k, size_t N) {
    return lo->u + (size_t)k * N * lo->r + (lo->win_n ? lo->win0 * lo->r : 0);
}

/* Whether the adapter covers whole rows of its site's output (no strided copy needed). */
static int contiguous(const adapter *a, int ystride) { return a->col0 == 0 && a->out == ystride; }

/* Whether adapter k's base is held by a fused QLoRA base (worker/qlora.h): no dequantized matrix exists, DoRA
 * reads it through qmatmul (st_qlora_param_mm) and row panels (st_qlora_rows). */
static int q_base(const st_model *m, int k) {
    return st_qlora_fused(m) && st_qlora_holds(m, m->lora->ad[k].base);
}

/* The adapted weight of adapter k as DoRA reads it: the fp32 weights, or under bf16 the bf16 copy the base
 * matmul reads, widened into lo->wf (allocated by st_lora_forward). Not for q_base. */
static const float *dora_weight(const st_model *m, int k) {
    const st_lora *lo = m->lora;
    const st_param *p = &m->params[lo->ad[k].base];
    if (m->qlora) st_qlora_load(m, lo->ad[k].base); /* its matmul unit into the scratch (worker/qlora.h) */
    /* the bf16 copy: the model's, or (ZeRO-3 on a device) the gather buffer's */
    const uint16_t *h = m->precision == ST_PRECISION_BF16 ? st_model_param_bf16(m, lo->ad[k].base) : NULL;
    if (!h) return st_model_param_weights(m, lo->ad[k].base);
    m->be->from_bf16(lo->wf, h, p->numel);
    return lo->wf;
}

/* c = m / ||W + scale B A||_row for adapter k (into lo->c, lo->inv_n), over as many rows at a time as lo->ba
 * holds: all of them (one B @ A, one dora_norm), or over a fused QLoRA base a panel of rows, W NULL: the base's
 * rows dequantized panel by panel (st_qlora_rows; rounded to bf16 under bf16, as the base matmul reads them).
 * Each row's norm is its own sum (dora_norm) and each element of B @ A its own r-term dot product, but the sgemm
 * library may order that product by the call's row count (oneDNN 2.6 on AVX2 picks its kernel, FMA or not, by
 * the shape): over any QLoRA base, fused or not, B @ A therefore runs in the same st_qlora_panel_rows panels, so
 * the fused and the unfused model make the same calls and get the same bits on every ISA. */
static int dora_scale(st_model *m, int k, const float *W) {
    st_lora *lo = m->lora;
    const adapter *a = &lo->ad[k];
    const float *mg = st_model_param_weights(m, a->mag);
    const float *A = st_model_param_weights(m, a->a), *B = st_model_param_weights(m, a->b);
    float *c = lo->c + (size_t)k * lo->max_out, *inv = lo->inv_n + (size_t)k * lo->max_out;
    size_t fit = lo->ba_floats / (size_t)a->in;
    int P = fit >= (size_t)a->out ? a->out : (int)fit, r16 = m->precision == ST_PRECISION_BF16;
    if (st_qlora_holds(m, a->base) && st_qlora_panel_rows(m, a->base) < P) P = st_qlora_panel_rows(m, a->base);
    if (P < 1) return st_fail(ST_EINVAL, "DoRA: no room for a row of B A"); /* ba_floats covers a panel */
    for (int j0 = 0; j0 < a->out; j0 += P) {
        int n = a->out - j0 < P ? a->out - j0 : P;
        const float *w = W ? W + (size_t)j0 * a->in : st_qlora_rows(m, a->base, j0, n, r16);
        if (!w) return st_fail_context(ST_ENOMEM, "DoRA over the quantized %s", m->params[a->base].name);
        m->be->matmul(lo->ba, B + (size_t)j0 * lo->r, A, n, a->in, lo->r, 0, 0, 1.0f, 0.0f); /* B @ A rows */
        m->be->dora_norm(c + j0, inv + j0, w, lo->ba, mg + j0, n, a->in, lo->scale);
    }
    return 0;
}

/* y[:, block] += c * z - x W^T with z = x W^T + scale * u B^T (u already computed; x the adapter's input,
 * dropped under LoRA dropout). */
static int dora_forward(st_model *m, int k, const float *x, float *y, int ystride) {
    st_lora *lo = m->lora;
    const adapter *a = &lo->ad[k];
    size_t N = lo->rows;
    int q = q_base(m, k);
    const float *W = q ? NULL : dora_weight(m, k), *B = st_model_param_weights(m, a->b);
    const float *u = lo->u + (size_t)k * N * lo->r;
    float *z = lo->z + lo->zoff[k], *c = lo->c + (size_t)k * lo->max_out;
    int rc = dora_scale(m, k, W);
    if (!rc && q) rc = st_qlora_param_mm(m, a->base, lo->base, x, (int)N, 0, 0.0f); /* x W^T through the codes */
    if (rc) return rc;
    if (!q) m->be->matmul(lo->base, x, W, (int)N, a->out, a->in, 0, 1, 1.0f, 0.0f);
    m->be->copy(z, lo->base, N * (size_t)a->out * sizeof(float));
    m->be->matmul(z, u, B, (int)N, a->out, lo->r, 0, 1, lo->scale, 1.0f);
    m->be->dora_apply(y + a->col0, ystride, z, lo->base, c, (int)N, a->out);
    return 0;
}

/* out[N, in] = g[N, out] W + beta out, W adapter k's base (DoRA's input gradient term): through the codes over
 * a fused QLoRA base (st_qlora_param_mm: the same product of the same values), else matmul on dora_weight. */
static void dora_dgrad(st_model *m, int k, float *out, const float *g, float beta) {
    const adapter *a = &m->lora->ad[k];
    int N = (int)m->lora->rows;
    if (q_base(m, k)) st_qlora_param_mm(m, a->base, out, g, N, 1, beta); /* fails only unfused: q_base says not */
    else m->be->matmul(out, g, dora_weight(m, k), N, a->in, a->out, 0, 0, 1.0f, beta);
}

void st_lora_dropout_batch(st_model *m, int64_t step, int64_t first_sample) {
    if (!m->lora) return;
    m->lora->drop_step = step;
    m->lora->drop_sample = first_sample;
}

int st_lora_set_dropout(st_model *m, double p, uint64_t seed) {
    st_lora *lo = m->lora;
    if (!lo) return st_fail(ST_EINVAL, "the model has no LoRA adapters");
    if (!(p >= 0 && p < 1)) return st_fail(ST_ECONFIG, "finetune.lora.dropout must be in [0, 1), got %g", p);
    lo->spec.dropout = p;
    lo->spec.seed = seed;
    lo->rows = 0; /* the next forward sizes the working memory again (with the dropout buffer) */
    return 0;
}

int st_lora_has_dora(const st_model *m) { return m->lora && m->lora->spec.dora; }

void st_lora_set_training(st_model *m, int train) {
    if (m->lora) m->lora->drop_on = train && m->lora->spec.dropout > 0;
}

/* out[i, j] = add[i, j] + keep(i, j) * x[i, j] / (1 - p) over adapter k's [N, in] input (add == out: +=;
 * add == x: the dropped input alone, zeros where dropped). keep: a hash of the micro-batch key, the row's
 * global sample and position, k and j, compared with p. Returns out. */
static uint64_t mix64(uint64_t z) { /* splitmix64's finalizer */
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static const float *dropped(st_model *m, int k, const float *x, const float *add, float *out) {
    const st_lora *lo = m->lora;
    double p = lo->spec.dropout;
    uint64_t thresh = (uint64_t)(p * 18446744073709551616.0), key = mix64(lo->spec.seed ^ 0x4c6f5241ull); /* "LoRA" */
    key = mix64(key ^ (uint64_t)lo->drop_step);
    m->be->lora_dropout(out, x, add == x ? NULL : add, (int)lo->rows, lo->ad[k].in, m->T, key, lo->drop_sample, k,
                        thresh, (float)(1.0 / (1.0 - p)));
    return out;
}

void st_lora_flops(const st_model *m, int layer, double N, double *fwd, double *fwd_down, double *bwd) {
    *fwd = *fwd_down = *bwd = 0;
    const st_lora *lo = m->lora;
    if (!lo) return;
    double r = lo->r;
    for (int k = lo->layer_first[layer]; k < lo->layer_first[layer + 1]; k++) {
        const adapter *a = &lo->ad[k];
        double in = a->in, out = a->out, f = 2 * N * r * in + 2 * N * out * r, b = 2 * N * out * r + 2 * N * r * in;
        if (a->mag >= 0) {
            f += 2 * out * in * r + 2 * N * out * in; /* B A for the norms, x W^T of the slice */
            b += 2 * N * out * in;                    /* dx += ((c - 1) dy) W */
        }
        b += m->params[a->b].grad_offset >= 0 ? 2 * N * out * r : 0;
        b += m->params[a->a].grad_offset >= 0 ? 2 * N * r * in : 0;
        *fwd += f;
        if (a->site == ST_LORA_SITE_DOWN) *fwd_down += f;
        *bwd += b;
    }
}

int st_lora_forward(st_model *m, int layer, st_lora_site site, const float *x, float *y, int ystride) {
    st_lora *lo = m->lora;
    const st_backend *be = m->be;
    size_t NT = (size_t)m->B * m->T;
    int rc = ensure_rows(m, lo, NT);
    if (rc) return rc;
    size_t N = win_rows(lo, NT);
    if (lo->spec.dora && m->precision == ST_PRECISION_BF16 && !st_qlora_fused(m) && !lo->wf &&
        !(lo->wf = work_alloc(be, lo->max_w)))
        return st_fail(ST_ENOMEM, "out of memory for DoRA under bf16 (%zu floats)", lo->max_w);
    for (int k = lo->layer_first[layer]; k < lo->layer_first[layer + 1]; k++) {
        const adapter *a = &lo->ad[k];
        if (a->site != site) continue;
        float *u = win_u(lo, k, NT);
        /* the adapters' weights where they are now (ZeRO-3 on a device: the gather buffer) */
        const float *A = st_model_param_weights(m, a->a), *B = st_model_param_weights(m, a->b);
        const float *xa = lo->drop_on ? dropped(m, k, x, x, lo->xd) : x;
        be->matmul(u, xa, A, (int)N, lo->r, a->in, 0, 1, 1.0f, 0.0f);
        if (a->mag >= 0) {
            if ((rc = dora_forward(m, k, xa, y, ystride))) return rc;
            continue;
        }
        if (contiguous(a, ystride)) {
            be->matmul(y, u, B, (int)N, a->out, lo->r, 0, 1, lo->scale, 1.0f);
            continue;
        }
        be->matmul(lo->tmp, u, B, (int)N, a->out, lo->r, 0, 1, lo->scale, 0.0f);
        be->copy_cols(y + a->col0, ystride, lo->tmp, a->out, (int)N, a->out, 1);
    }
    return 0;
}

/* DoRA part of adapter k's backward: dm += sum_rows dy * z / n ; dx += (c - 1) * dy @ W ; dy := c * dy.
 * Under dropout dx is NULL: (c - 1) * dy stays in lo->base for st_lora_backward to send through the mask. */
static void dora_backward(st_model *m, int k, float *dy, float *dx) {
    st_lora *lo = m->lora;
    const adapter *a = &lo->ad[k];
    size_t N = lo->rows;
    const float *z = lo->z + lo->zoff[k], *c = lo->c + (size_t)k * lo->max_out, *inv = lo->inv_n + (size_t)k * lo->max_out;
    m->be->dora_bwd(st_model_param_grad(m, a->mag), lo->base, dy, z, c, inv, (int)N,
                    a->out);
    if (dx) dora_dgrad(m, k, dx, lo->base, 1.0f);
}

void st_lora_backward(st_model *m, int layer, st_lora_site site, const float *x, const float *dy, int ystride,
                      float *dx) {
    st_lora *lo = m->lora;
    const st_backend *be = m->be;
    size_t N = win_rows(lo, lo->rows);
    for (int k = lo->layer_first[layer]; k < lo->layer_first[layer + 1]; k++) {
        const adapter *a = &lo->ad[k];
        if (a->site != site) continue;
        const st_param *pa = &m->params[a->a], *pb = &m->params[a->b];
        const float *A = st_model_param_weights(m, a->a), *B = st_model_param_weights(m, a->b);
        const float *u = win_u(lo, k, lo->rows), *dyc = dy;
        if (!contiguous(a, ystride) || a->mag >= 0) {
            be->copy_cols(lo->tmp, a->out, dy + a->col0, ystride, (int)N, a->out, 0);
            dyc = lo->tmp;
        }
        if (a->mag >= 0) dora_backward(m, k, lo->tmp, lo->drop_on ? NULL : dx); /* lo->tmp becomes dz */
        if (pb->grad_offset >= 0)
            be->matmul(st_model_param_grad(m, a->b), dyc, u, a->out, lo->r, (int)N, 1, 0, lo->scale, 1.0f);
        be->matmul(lo->du, dyc, B, (int)N, lo->r, a->out, 0, 0, lo->scale, 0.0f);
        const float *xa = lo->drop_on ? dropped(m, k, x, x, lo->xd) : x;
        if (pa->grad_offset >= 0)
            be->matmul(st_model_param_grad(m, a->a), lo->du, xa, lo->r, a->in, (int)N, 1, 0, 1.0f, 1.0f);
        if (!lo->drop_on) {
            be->matmul(dx, lo->du, A, (int)N, a->in, lo->r, 0, 0, 1.0f, 1.0f);
            continue;
        }
        float beta = 0.0f; /* dx += mask ((c - 1) dy @ W (DoRA) + du @ A) / (1 - p) */
        if (a->mag >= 0) {
            dora_dgrad(m, k, lo->xd, lo->base, 0.0f);
            beta = 1.0f;
        }
        be->matmul(lo->xd, lo->du, A, (int)N, a->in, lo->r, 0, 0, 1.0f, beta);
        dropped(m, k, lo->xd, dx, dx);
    }
}

/* Adapter k folded into W (its base weight's values, here or in another buffer of the same layout):
 * W += scale * B @ A, and under DoRA W := (m / ||W + scale B A||_row) * (W + scale B A), the row norms
 * taken from the model's own base weight (equal to W's values on entry). */
static int merge_adapter(st_model *m, int k, float *W) {
    st_lora *lo = m->lora;
    const adapter *a = &lo->ad[k];
    const float *A = st_model_param_weights(m, a->a), *B = st_model_param_weights(m, a->b);
    if (a->mag >= 0) {
        if (!lo->rows && ensure_rows(m, lo, 1)) return st_fail(ST_ENOMEM, "out of memory merging DoRA");
        int rc = dora_scale(m, k, W); /* the norm of the weight being merged */
        if (rc) return rc;
    }
    m->be->matmul(W, B, A, a->out, a->in, lo->r, 0, 0, lo->scale, 1.0f); /* W += scale * B @ A */
    if (a->mag >= 0) {
        m->be->scale_rows(W, lo->c + (size_t)k * lo->max_out, a->out, a->in);
    }
    return 0;
}

int st_lora_merge_range_at(const st_model *m, float *w, size_t at, int i) {
    const st_lora *lo = m->lora;
    for (int k = 0; lo && k < lo->n; k++) {
        if (lo->ad[k].base != i) continue;
        int rc = merge_adapter((st_model *)m, k, w + at);
        if (rc) return rc;
    }
    return 0;
}

int st_lora_merge(st_model *m) {
    st_lora *lo = m->lora;
    if (!lo && m->prompt)
        return st_fail(ST_EINVAL, "a prompt-tuning adapter cannot be merged into the weights and is not supported here yet");
    if (!lo) return st_fail(ST_EINVAL, "the model has no LoRA adapters to merge");
    for (int k = 0; k < lo->n; k++) {
        int rc = merge_adapter(m, k, m->weights + m->params[lo->ad[k].base].offset);
        if (rc) return rc;
    }
    /* drop the adapters: registry, weights tail and table (the buffer keeps its unused tail) */
    m->n_params = m->n_base_params;
    m->n_weights = m->n_base_weights;
    m->n_base_params = 0;
    m->n_base_weights = 0;
    m->lora = NULL;
    st_lora_free(lo);
    st_model_weights_changed(m);
    return 0;
}
