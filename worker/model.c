/* model.c — registry, init, forward and backward of the decoder (see model.h).
 *
 * Forward of one layer (Llama; GPT-2 differs in the places marked):
 *   ln1 = norm(res[l])                       (GPT-2: LayerNorm, Llama: RMSNorm)
 *   qkv = ln1 @ Wqkv^T (+ b)  ; [qk_norm(qkv)] ; rope(qkv)   (rope: Llama only; qk_norm: Qwen3's per-head
 *                                          RMSNorm of q and k, its inputs saved in fp32)
 *   atty = causal_attention(qkv)
 *   resmid = res[l] + atty @ Wo^T (+ b)
 *   ln2 = norm(resmid)
 *   h1 = ln2 @ Wgu^T ; h2 = swiglu(h1)       (GPT-2: h1 = ln2 @ Wfc^T + b ; h2 = gelu(h1))
 *   res[l+1] = resmid + h2 @ Wdown^T (+ b)
 * Backward walks the same steps in reverse, accumulating into the residual gradient `dres`.
 *
 * Mixed precision (precision: bf16): every mm() reads its weight from the bf16 copy (weights_bf16) and
 * rounds fp32 operands to bf16; ln1, qkv, atty, ln2, h1 and h2 are saved as bf16 (save()), and backward
 * widens the ones non-matmul kernels need (restore()). Residual stream, statistics and gradients stay fp32.
 * LoRA adapters (worker/lora.c) compute in fp32 on the bf16-rounded matmul inputs (forward rounds ln1, atty,
 * ln2 and h2 in place when adapters exist; backward widens them for the adapter gradients); the frozen base
 * reads its bf16 copy like any weight (QLoRA: the dequantized layer, rounded as it is acquired).
 *
 * Memory (docs/finetune.md, activation checkpointing): under checkpointing the MLP runs over token blocks
 * (mlp_rows; mlp_forward / mlp_backward), the kept layer inputs may be bf16 (kept_bf16), and on host backends
 * under bf16 large weights go through their matmuls in blocks of rows (wblock_rows), as the LM head does. */
#include "worker/model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/error.h"
#include "common/rng.h"
#include "common/util.h"
#include "kernels/bf16.h"
#include "worker/lora.h"
#include "worker/qlora.h"
#include "worker/prompt.h"

/* ---------------- registry ---------------- */

typedef struct {
    int n, cap;
    st_param *p;
    size_t offset;
} registry;

static int reg_add(registry *r, const char *name, int64_t d0, int64_t d1, int layer, int kind, int no_decay,
                   int transpose_io) {
    if (r->n == r->cap) {
        int nc = r->cap ? r->cap * 2 : 64;
        st_param *np = realloc(r->p, (size_t)nc * sizeof *np);
        if (!np) return st_fail(ST_ENOMEM, "out of memory building the parameter registry");
        r->p = np;
        r->cap = nc;
    }
    st_param *p = &r->p[r->n++];
    memset(p, 0, sizeof *p);
    snprintf(p->name, sizeof p->name, "%s", name);
    p->ndim = d1 > 0 ? 2 : 1;
    p->shape[0] = d0;
    p->shape[1] = d1 > 0 ? d1 : 0;
    p->numel = (size_t)d0 * (size_t)(d1 > 0 ? d1 : 1);
    p->offset = r->offset;
    /* no padding: q/k/v (and gate/up) must stay adjacent to form one packed matrix */
    r->offset += p->numel;
    p->layer = layer;
    p->kind = kind;
    p->no_decay = no_decay;
    p->transpose_io = transpose_io;
    p->grad_offset = -1;
    return 0;
}

#define ADD(name, d0, d1, layer, kind, nd, tr)                                                                \
    do {                                                                                                   \
        int rc_ = reg_add(r, name, d0, d1, layer, kind, nd, tr);                                           \
        if (rc_) return rc_;                                                                               \
    } while (0)

static int build_gpt2(registry *r, const st_model_config *c) {
    char n[96];
    int C = c->d_model, F = c->d_ff, V = c->vocab;
    ADD("wte.weight", V, C, -1, ST_MOD_EMBED, 1, 0);
    ADD("wpe.weight", c->max_seq, C, -1, ST_MOD_EMBED, 1, 0);
    for (int l = 0; l < c->n_layer; l++) {
#define L(fmt) (snprintf(n, sizeof n, "h.%d." fmt, l), n)
        ADD(L("ln_1.weight"), C, 0, l, ST_MOD_NORM, 1, 0);
        ADD(L("ln_1.bias"), C, 0, l, ST_MOD_NORM, 1, 0);
        ADD(L("attn.c_attn.weight"), 3 * C, C, l, ST_MOD_ATTN, 0, 1);
        ADD(L("attn.c_attn.bias"), 3 * C, 0, l, ST_MOD_ATTN, 1, 0);
        ADD(L("attn.c_proj.weight"), C, C, l, ST_MOD_ATTN, 0, 1);
        ADD(L("attn.c_proj.bias"), C, 0, l, ST_MOD_ATTN, 1, 0);
        ADD(L("ln_2.weight"), C, 0, l, ST_MOD_NORM, 1, 0);
        ADD(L("ln_2.bias"), C, 0, l, ST_MOD_NORM, 1, 0);
        ADD(L("mlp.c_fc.weight"), F, C, l, ST_MOD_MLP, 0, 1);
        ADD(L("mlp.c_fc.bias"), F, 0, l, ST_MOD_MLP, 1, 0);
        ADD(L("mlp.c_proj.weight"), C, F, l, ST_MOD_MLP, 0, 1);
        ADD(L("mlp.c_proj.bias"), C, 0, l, ST_MOD_MLP, 1, 0);
#undef L
    }
    ADD("ln_f.weight", C, 0, -1, ST_MOD_HEAD, 1, 0);
    ADD("ln_f.bias", C, 0, -1, ST_MOD_HEAD, 1, 0);
    if (!c->tied_embeddings) ADD("lm_head.weight", V, C, -1, ST_MOD_HEAD, 0, 0);
    return 0;
}

static int build_llama(registry *r, const st_model_config *c) {
    char n[96];
    int C = c->d_model, F = c->d_ff, V = c->vocab, hd = c->head_dim;
    int QD = c->n_head * hd, KVD = c->n_kv_head * hd;
    ADD("model.embed_tokens.weight", V, C, -1, ST_MOD_EMBED, 1, 0);
    for (int l = 0; l < c->n_layer; l++) {
#define L(fmt) (snprintf(n, sizeof n, "model.layers.%d." fmt, l), n)
        ADD(L("input_layernorm.weight"), C, 0, l, ST_MOD_NORM, 1, 0);
        ADD(L("self_attn.q_proj.weight"), QD, C, l, ST_MOD_ATTN, 0, 0);
        ADD(L("self_attn.k_proj.weight"), KVD, C, l, ST_MOD_ATTN, 0, 0);
        ADD(L("self_attn.v_proj.weight"), KVD, C, l, ST_MOD_ATTN, 0, 0);
        if (c->qkv_bias) {
            ADD(L("self_attn.q_proj.bias"), QD, 0, l, ST_MOD_ATTN, 1, 0);
            ADD(L("self_attn.k_proj.bias"), KVD, 0, l, ST_MOD_ATTN, 1, 0);
            ADD(L("self_attn.v_proj.bias"), KVD, 0, l, ST_MOD_ATTN, 1, 0);
        }
        ADD(L("self_attn.o_proj.weight"), C, QD, l, ST_MOD_ATTN, 0, 0);
        if (c->qk_norm) { /* Qwen3: RMSNorm weights over head_dim, shared by all q (k) heads */
            ADD(L("self_attn.q_norm.weight"), hd, 0, l, ST_MOD_NORM, 1, 0);
            ADD(L("self_attn.k_norm.weight"), hd, 0, l, ST_MOD_NORM, 1, 0);
        }
        ADD(L("post_attention_layernorm.weight"), C, 0, l, ST_MOD_NORM, 1, 0);
        ADD(L("mlp.gate_proj.weight"), F, C, l, ST_MOD_MLP, 0, 0);
        ADD(L("mlp.up_proj.weight"), F, C, l, ST_MOD_MLP, 0, 0);
        ADD(L("mlp.down_proj.weight"), C, F, l, ST_MOD_MLP, 0, 0);
#undef L
    }
    ADD("model.norm.weight", C, 0, -1, ST_MOD_HEAD, 1, 0);
    if (!c->tied_embeddings) ADD("lm_head.weight", V, C, -1, ST_MOD_HEAD, 0, 0);
    return 0;
}
#undef ADD

static int validate_config(const st_model_config *c) {
    if (c->n_layer < 1 || c->d_model < 1 || c->n_head < 1 || c->vocab < 2 || c->max_seq < 2 || c->d_ff < 1)
        return st_fail(ST_ECONFIG, "model config: layers, dim, heads, ffn, vocab and max_seq must be positive "
                                   "(got layers=%d dim=%d heads=%d ffn=%d vocab=%d max_seq=%d)",
                       c->n_layer, c->d_model, c->n_head, c->d_ff, c->vocab, c->max_seq);
    if (c->n_kv_head < 1 || c->n_head % c->n_kv_head != 0)
        return st_fail(ST_ECONFIG, "model config: heads (%d) must be a multiple of kv heads (%d)", c->n_head,
                       c->n_kv_head);
    if (c->head_dim < 2 || (c->family == ST_FAMILY_LLAMA && c->head_dim % 2))
        return st_fail(ST_ECONFIG, "model config: head_dim %d must be even and >= 2", c->head_dim);
    if (c->family == ST_FAMILY_GPT2 && (c->n_head * c->head_dim != c->d_model || c->n_kv_head != c->n_head))
        return st_fail(ST_ECONFIG, "model config: GPT-2 needs heads*head_dim == dim and kv_heads == heads");
    if (c->family != ST_FAMILY_GPT2 && c->family != ST_FAMILY_LLAMA)
        return st_fail(ST_ECONFIG, "model config: unknown family %d", (int)c->family);
    if (c->qk_norm && c->family != ST_FAMILY_LLAMA)
        return st_fail(ST_ECONFIG, "model config: q/k norms need the Llama family");
    return 0;
}

int st_model_build_registry(st_model *m, const st_model_config *cfg) {
    memset(m, 0, sizeof *m);
    int rc = validate_config(cfg);
    if (rc) return rc;
    m->cfg = *cfg;
    registry r = {0};
    rc = cfg->family == ST_FAMILY_GPT2 ? build_gpt2(&r, cfg) : build_llama(&r, cfg);
    if (rc) { free(r.p); return rc; }
    m->params = r.p;
    m->n_params = r.n;
    m->n_weights = r.offset;
    m->lowest_trained_layer = cfg->n_layer;
    return 0;
}

int st_model_bind(st_model *m, const st_backend *be, int alloc_weights) {
    const st_model_config *cfg = &m->cfg;
    if (cfg->sliding_window > 0 && (!be->attention_window_fwd || !be->attention_window_bwd))
        return st_fail(ST_ECONFIG, "model has sliding_window %d, which the %s backend cannot attend with",
                       cfg->sliding_window, be->name);
    if (cfg->qk_norm && (!be->head_rmsnorm_fwd || !be->head_rmsnorm_bwd))
        return st_fail(ST_ECONFIG, "model_type %s needs q/k norms, which the %s backend does not have",
                       cfg->model_type, be->name);
    m->be = be;
    if (!alloc_weights) return 0;
    m->weights = be->alloc(m->n_weights * sizeof(float));
    if (!m->weights) return st_fail(ST_ENOMEM, "cannot allocate %.1f MB for model weights", m->n_weights * 4.0 / 1e6);
    return 0;
}

int st_model_build(st_model *m, const st_model_config *cfg, const st_backend *be) {
    int rc = st_model_build_registry(m, cfg);
    if (!rc) rc = st_model_bind(m, be, 1);
    if (rc) st_model_free(m);
    return rc;
}

int st_model_set_doc_positions(st_model *m, const int32_t *pos_host) {
    const st_backend *be = m->be;
    m->doc_pos_on = 0;
    if (!pos_host) return 0;
    if (!be->attention_docs_fwd || !be->attention_docs_bwd || !be->rope_pos_fwd || !be->rope_pos_bwd ||
        !be->embedding_pos_fwd || !be->embedding_pos_bwd)
        return st_fail(ST_ECONFIG, "train.packing documents: the %s backend has no document attention kernels",
                       be->name);
    size_t n = (size_t)m->B * (size_t)m->T;
    if (n == 0) return st_fail(ST_EINVAL, "st_model_set_doc_positions before st_model_alloc_activations");
    for (size_t i = 0; i < n; i++) { /* the kernels trust these: a bad one would read outside the sequence */
        int32_t p = pos_host[i], t = (int32_t)(i % (size_t)m->T);
        if (p < 0 || p > t || (p > 0 && pos_host[i - 1] != p - 1))
            return st_fail(ST_EINVAL, "document position %d at token %d of sequence %zu is not a document position",
                           (int)p, (int)t, i / (size_t)m->T);
    }
    if (m->doc_pos_n != n) {
        be->free(m->doc_pos);
        m->doc_pos = be->alloc(n * sizeof(int32_t));
        m->doc_pos_n = m->doc_pos ? n : 0;
        if (!m->doc_pos) return st_fail(ST_ENOMEM, "out of backend memory for %zu document positions", n);
    }
    be->copy_to_device(m->doc_pos, pos_host, n * sizeof(int32_t));
    m->doc_pos_on = 1;
    m->doc_pairs[0] = m->doc_pairs[1] = 0;
    for (size_t i = 0; i < n; i++) {
        double k = pos_host[i] + 1.0, w = m->cfg.sliding_window;
        m->doc_pairs[0] += k;
        m->doc_pairs[1] += w > 0 && w < k ? w : k;
    }
    return 0;
}

static void w8_free(st_model *m);

void st_model_free(st_model *m) {
    if (!m->be) { /* registry only (st_model_build_registry) */
        free(m->params);
        st_lora_free(m->lora);
        st_prompt_free(m->prompt);
        st_qlora_free(m->qlora);
        memset(m, 0, sizeof *m);
        return;
    }
    m->be->free(!m->weights ? NULL : m->weights_tail_only ? m->weights + m->n_base_weights : m->weights + m->n_w16);
    m->be->free(m->grads);
    m->be->free(m->act_arena);
    m->be->free(m->rope_cos);
    m->be->free(m->rope_sin);
    m->be->free(m->doc_pos);
    m->be->free(m->mm_scratch);
    m->be->free(m->weights_bf16);
    free(m->w32_dropped);
    free(m->loss_per_pos);
    free(m->layer_acts);
    free(m->grad_state);
    free(m->params);
    st_lora_free(m->lora);
    st_prompt_free(m->prompt);
    st_qlora_free(m->qlora);
    w8_free(m);
    memset(m, 0, sizeof *m);
}

int st_model_find(const st_model *m, const char *name) {
    for (int i = 0; i < m->n_params; i++)
        if (strcmp(m->params[i].name, name) == 0) return i;
    return -1;
}

static int is_residual_projection(const st_param *p) {
    return strstr(p->name, "attn.c_proj.weight") || strstr(p->name, "mlp.c_proj.weight") ||
           strstr(p->name, "o_proj.weight") || strstr(p->name, "down_proj.weight");
}

int st_model_init_random(st_model *m, uint64_t seed) {
    float *host = malloc(m->n_weights * sizeof(float));
    if (!host) return st_fail(ST_ENOMEM, "out of memory initializing weights");
    memset(host, 0, m->n_weights * sizeof(float));
    float proj_std = 0.02f / sqrtf(2.0f * (float)m->cfg.n_layer);
    for (int i = 0; i < m->n_params; i++) {
        const st_param *p = &m->params[i];
        float *w = host + p->offset;
        int is_norm = p->ndim == 1 && (p->kind == ST_MOD_NORM || p->kind == ST_MOD_HEAD) && strstr(p->name, "weight");
        if (is_norm) {
            for (size_t j = 0; j < p->numel; j++) w[j] = 1.0f;
        } else if (p->ndim == 2) {
            st_rng rng;
            st_rng_seed(&rng, seed, (uint64_t)i + 1); /* one stream per tensor: order-independent */
            float std = is_residual_projection(p) ? proj_std : 0.02f;
            for (size_t j = 0; j < p->numel; j++) w[j] = (float)(st_rng_normal(&rng) * std);
        } /* biases stay 0 */
    }
    m->be->copy_to_device(m->weights, host, m->n_weights * sizeof(float));
    st_model_weights_changed(m);
    free(host);
    return 0;
}

/* ---------------- trainable set ---------------- */

static int param_selected(const st_model *m, int idx, const unsigned char *layer_mask, unsigned mods) {
    const st_param *p = &m->params[idx];
    if (p->layer >= 0) return layer_mask[p->layer] && (mods & (unsigned)p->kind);
    if (p->kind == ST_MOD_HEAD || p->kind == ST_MOD_PROMPT) return (mods & (unsigned)p->kind) != 0;
    /* embeddings; index 0 (wte / embed_tokens) doubles as the head when tied */
    int as_embed = (mods & ST_MOD_EMBED) && layer_mask[0];
    int as_head = idx == 0 && m->cfg.tied_embeddings && (mods & ST_MOD_HEAD);
    return as_embed || as_head;
}

size_t st_model_count_trainable(const st_model *m, const unsigned char *layer_mask, unsigned module_mask) {
    return st_model_grad_offsets(m, layer_mask, module_mask, NULL);
}

size_t st_model_grad_offsets(const st_model *m, const unsigned char *layer_mask, unsigned module_mask,
                             long *grad_offset) {
    size_t n = 0;
    for (int i = 0; i < m->n_params; i++) {
        int on = param_selected(m, i, layer_mask, module_mask);
        if (grad_offset) grad_offset[i] = on ? (long)n : -1;
        if (on) n += m->params[i].numel;
    }
    return n;
}

int st_model_set_trainable(st_model *m, const unsigned char *layer_mask, unsigned module_mask) {
    for (int i = 0; i < m->n_params; i++) /* st_model_bind_frozen_bf16: no fp32 place, for the whole run */
        if (st_model_fp32_dropped(m, i) && m->params[i].offset < m->n_w16 && param_selected(m, i, layer_mask, module_mask))
            return st_fail(ST_EINVAL, "%s is held in bf16 only (frozen for the whole run) and cannot train",
                           m->params[i].name);
    size_t off = 0;
    int lowest = m->cfg.n_layer;
    m->embed_trained = 0;
    for (int i = 0; i < m->n_params; i++) {
        st_param *p = &m->params[i];
        if (param_selected(m, i, layer_mask, module_mask)) {
            if (st_model_fp32_dropped(m, i)) { /* held in bf16 only while frozen: its fp32 master, exactly */
                m->be->from_bf16(m->weights + p->offset, m->weights_bf16 + p->offset, p->numel);
                m->w32_dropped[i] = 0;
            }
            p->grad_offset = (long)off;
            off += p->numel;
            if (p->layer >= 0 && p->layer < lowest) lowest = p->layer;
            /* a trained embedding (also a tied head) needs the gradient through every layer */
            if (p->kind == ST_MOD_EMBED || p->kind == ST_MOD_PROMPT) lowest = 0;
            if (p->kind == ST_MOD_EMBED) m->embed_trained = 1;
        } else {
            p->grad_offset = -1;
        }
    }
    if (m->embed_trained) lowest = 0;
    if (!m->buffers_external) m->be->free(m->grads);
    m->grads = NULL;
    m->grads_zero_lo = m->grads_zero_hi = 0;
    free(m->grad_state); /* fresh (zeroed) gradients: nothing written yet */
    m->grad_state = calloc((size_t)m->n_params + 1, 1);
    m->grad_state_n = m->grad_state ? m->n_params : 0;
    if (!m->grad_state) return st_fail(ST_ENOMEM, "out of memory");
    m->n_grads = off;
    m->lowest_trained_layer = lowest;
    size_t align = m->grad_align > 0 ? (size_t)m->grad_align : 1;
    m->grad_alloc = (off + align - 1) / align * align;
    if (off == 0 || m->buffers_external) return 0;
    m->grads = m->be->alloc(m->grad_alloc * sizeof(float));
    if (!m->grads) return st_fail(ST_ENOMEM, "cannot allocate %.1f MB for gradients", off * 4.0 / 1e6);
    return 0;
}

/* grad_state bits (st_model.grad_overwrite) */
#define ST_GRAD_WRITTEN 1
#define ST_GRAD_FIRST_WRITE 2

int st_model_grad_overwritten(const st_model *m, int i) {
    return m->grad_overwrite && i >= 0 && i < m->grad_state_n && (m->grad_state[i] & ST_GRAD_FIRST_WRITE);
}

/* Zeroes grads[a, b) outside [lo, hi) (what the optimizer zeroed already). */
static void zero_outside(const st_model *m, size_t a, size_t b, size_t lo, size_t hi) {
    if (b <= a) return;
    if (lo < a) lo = a;
    if (hi > b) hi = b;
    if (hi <= lo) { m->be->memset0(m->grads + a, (b - a) * sizeof(float)); return; }
    m->be->memset0(m->grads + a, (lo - a) * sizeof(float));
    m->be->memset0(m->grads + hi, (b - hi) * sizeof(float));
}

void st_model_zero_grad(st_model *m) {
    size_t lo = m->grads_zero_lo < m->grad_alloc ? m->grads_zero_lo : m->grad_alloc;
    size_t hi = m->grads_zero_hi < m->grad_alloc ? m->grads_zero_hi : m->grad_alloc;
    if (hi <= lo) lo = hi = 0;
    m->grads_zero_lo = m->grads_zero_hi = 0;
    if (m->grads && !m->release && !m->grads_managed) {
        /* runs of the gradient space between the parameters the next first write overwrites (registry
         * order is gradient-offset order), each zeroed around what the optimizer zeroed already */
        size_t run = 0;
        for (int i = 0; i < m->n_params; i++) {
            const st_param *p = &m->params[i];
            if (p->grad_offset < 0 || !st_model_grad_overwritten(m, i)) continue;
            zero_outside(m, run, (size_t)p->grad_offset, lo, hi);
            run = (size_t)p->grad_offset + p->numel;
        }
        zero_outside(m, run, m->grad_alloc, lo, hi);
    }
    if (m->grad_state) memset(m->grad_state, 0, (size_t)m->grad_state_n); /* a new accumulation */
}

/* beta of a weight-gradient matmul that writes the gradients of parameters [i, i + n) (adjacent, written
 * together): 0 on their first write since st_model_zero_grad under grad_overwrite (marked, so the optimizer
 * and the next st_model_zero_grad leave them), else 1 (accumulate). Any other writer of the same gradient
 * (a tied embedding's lookup) comes after it within a backward. */
static float grad_beta(const st_model *m, int i, int n) {
    if (!m->grad_overwrite || i < 0 || i + n > m->grad_state_n) return 1.0f;
    if (m->grad_state[i] & ST_GRAD_WRITTEN) return 1.0f;
    for (int k = i; k < i + n; k++) m->grad_state[k] = ST_GRAD_WRITTEN | ST_GRAD_FIRST_WRITE;
    return 0.0f;
}

void st_model_acquire(const st_model *m, int first, int last) {
    /* the residency hook first: under ZeRO-3 it gathers the quantized bytes st_qlora_acquire reads */
    if (m->acquire && last > first) m->acquire(m->residency_ctx, first, last);
    if (m->qlora) st_qlora_acquire(m, first, last);
}

void st_model_release(const st_model *m, int first, int last) {
    if (m->release && last > first) m->release(m->residency_ctx, first, last);
}

void st_model_prefetch(const st_model *m, int first, int last) {
    if (m->prefetch && last > first) m->prefetch(m->residency_ctx, first, last);
}

void st_model_set_residency(st_model *m, const st_residency_hooks *h) {
    static const st_residency_hooks none;
    if (!h) h = &none;
    m->acquire = h->acquire;
    m->release = h->release;
    m->prefetch = h->prefetch;
    m->progress = h->progress;
    m->embed_rows = h->embed_rows;
    m->head_rows = h->head_rows;
    m->head_block = h->head_rows ? h->head_block : 0;
    m->residency_ctx = h->ctx;
    m->grad_ready = h->grad_ready;
    m->grad_ready_ctx = h->grad_ready ? h->ctx : NULL;
}

int st_model_param_bf16_only(const st_model *m, int i) {
    const st_param *p = &m->params[i];
    if (p->ndim != 2 || m->lora || m->prompt || m->qlora) return 0;
    return p->layer >= 0 || (!m->cfg.tied_embeddings && i == st_model_base_params(m) - 1);
}

/* Layer l's parameters and its LoRA adapters (appended after the base registry, per layer). */
static void layer_acquire(const st_model *m, int l, int p0, int p1) {
    int lf, ll;
    st_model_acquire(m, p0, p1);
    st_lora_layer_params(m, l, &lf, &ll);
    st_model_acquire(m, lf, ll);
}

/* Layer l's base group and then its adapters prefetched: ZeRO-3 starts their gathers while the layer before
 * computes (a hook that prefetches one group at a time keeps the base's; no adapters: the second is empty). */
static void layer_prefetch(const st_model *m, int l) {
    int lf, ll;
    st_model_prefetch(m, st_model_layer_first_param(m, l), st_model_layer_first_param(m, l + 1));
    st_lora_layer_params(m, l, &lf, &ll);
    st_model_prefetch(m, lf, ll);
}

static void layer_release(const st_model *m, int l, int p0, int p1) {
    int lf, ll;
    st_model_release(m, p0, p1);
    st_lora_layer_params(m, l, &lf, &ll);
    st_model_release(m, lf, ll);
}

/* ---------------- activations ---------------- */

/* Per-layer saved activations, as pointers into the arena. Under precision bf16 the six tensors that are
 * matmul or attention inputs (ln1, qkv, atty, ln2, h1, h2) are saved as bf16 in the *_h fields and their
 * float pointers are NULL; the residual stream (res_in, resmid) and the norm statistics stay fp32.
 * Under fp32 the *_h fields are NULL. */
typedef struct {
    float *res_in, *ln1, *ln1_mean, *ln1_rstd, *qkv, *atty, *lse, *resmid, *ln2, *ln2_mean, *ln2_rstd, *h1, *h2;
    float *qk_x, *qk_rstd; /* Qwen3 q/k norms: their inputs [N, (H+KVH)*hd] and rstd [N, H+KVH] (fp32) */
    uint16_t *ln1_h, *qkv_h, *atty_h, *ln2_h, *h1_h, *h2_h;
    uint16_t *res_in_h; /* kept_bf16: the layer's kept input as bf16 (res_in NULL; the work set reads res_w) */
} layer_acts;

/* Model-wide buffers in the arena after the layers. */
typedef struct {
    float *res_out, *lnf, *lnf_mean, *lnf_rstd;
    float *dres, *dln, *dqkv, *datt, *dh1, *dh2, *dlnf, *logits, *norm_scratch;
    /* bf16 only: one layer's fp32 working copies of the bf16-saved qkv, atty and h1 (forward computes
     * into them before saving; backward widens the saved values back into them). NULL under fp32. */
    float *qkv_w, *atty_w, *h1_w;
    float *res_w;        /* kept_bf16: the current layer's input, widened (fp32 [N, C]); NULL otherwise */
    float *wtmp;         /* bf16 with a blocked layer weight (wblock_rows): one block's [M, rows] product / operand */
    uint16_t *dlogits_h; /* bf16 only: one head chunk's dlogits as bf16, written by the loss kernel */
    float *head_tmp;     /* a blocked head (head_vblock < V): [R, vblock], one vocabulary block (NULL: the
                            head_rows hook's scratch) */
    double *loss_acc;    /* the head's loss total, accumulated on the backend over the chunks */
    float *head_stats;   /* [N, 3]: each row's running max, sum of exponentials and target logit (head_outer) */
    int32_t *tokens, *targets;
    float *weight, *loss;
} model_bufs;

static int qkv_dim(const st_model_config *c) { return (c->n_head + 2 * c->n_kv_head) * c->head_dim; }

/* Rows of logits per LM-head chunk. Each chunk runs three GEMMs, and the weight-gradient one
 * (dW[V,C] += dlogits^T @ x) streams all of dW through memory with only `rows` of inner dimension,
 * so small chunks cost both GEMM efficiency and V*C read-modify-write traffic per chunk. ~64 MB of
 * logits per chunk measured ~10% faster on the head than 16 MB (GPT-2 V=50257, B*T=1024); chunks are
 * equal-sized (multiples of 16 rows) so no tiny tail chunk. On host memory (the CPU backend) with a
 * vocabulary of at most 32768, chunks hold up to ~256 MB: Llama-small (V = 32000, B*T = 1024) then runs
 * its head as one chunk of 1024 rows instead of two of 512 (dW streamed once, twice the rows per thread
 * in dlogits @ W) and its step was faster in 3 of 3 interleaved runs; GPT-2's V = 50257 was slower with
 * 512- or 1024-row chunks than with 256 in 3 of 4 (probably: its 51 MB chunk nearly fits the 48 MB L3 the next GEMM
 * reads it from), so it keeps the 64 MB chunk (2026-12-06, bench/RESULTS.md). Device memory keeps it too. */
#define ST_HEAD_CHUNK_FLOATS (1L << 24)
#define ST_HEAD_CHUNK_FLOATS_HOST (1L << 26)
#define ST_HEAD_CHUNK_HOST_MAX_VOCAB 32768
static int head_chunk_rows(const st_model *m) {
    int N = m->B * m->T;
    int host = m->be ? m->be->host_memory : !m->sizing_device; /* no backend: registry-only sizing */
    int big = host && m->cfg.vocab <= ST_HEAD_CHUNK_HOST_MAX_VOCAB;
    long rows = (big ? ST_HEAD_CHUNK_FLOATS_HOST : ST_HEAD_CHUNK_FLOATS) / m->cfg.vocab;
    if (rows < 128) rows = 128;
    const char *e = getenv("SHARDTUNE_HEAD_CHUNK_ROWS"); /* tests: several row chunks on a small batch */
    if (e && atol(e) > 0) return atol(e) < N ? (int)atol(e) : N;
    if (rows >= N) return N;
    long chunks = (N + rows - 1) / rows;
    rows = ((N + chunks - 1) / chunks + 15) / 16 * 16;
    return rows < N ? (int)rows : N;
}

size_t st_model_head_chunk_floats(const st_model_config *cfg, int B, int T, int device) {
    st_model tmp;
    memset(&tmp, 0, sizeof tmp);
    tmp.cfg = *cfg;
    tmp.B = B;
    tmp.T = T;
    tmp.sizing_device = device != 0;
    return (size_t)head_chunk_rows(&tmp) * (size_t)cfg->vocab;
}

/* Vocabulary rows of the LM head per matmul under bf16. mm_scratch is sized by st_matmul_bf16_scratch_floats
 * (room for fp32 copies of both operands: the CPU twin widens both; CUDA lays out bf16 copies of its fp32
 * operands in the same room), so a head weight [V, C] above ST_HEAD_WIDEN_FLOATS goes through the head
 * matmuls in blocks of this many rows (a multiple of 16), each block's output moved into place: the scratch
 * then holds one block, not the whole head (Llama-3-8B: 2 GiB otherwise, on a device too). V when not
 * blocked (fp32 or a small head). */
#define ST_HEAD_WIDEN_FLOATS (1L << 24)
/* The untied head gathered by vocabulary blocks (st_model.head_rows: device ZeRO-3), never resident whole. */
static int head_by_rows(const st_model *m) { return m->head_rows && m->head_block > 0 && !m->cfg.tied_embeddings; }
static int head_vblock_own(const st_model *m) {
    long V = m->cfg.vocab, C = m->cfg.d_model, most = ST_HEAD_WIDEN_FLOATS, vb = V;
    const char *e = getenv("SHARDTUNE_HEAD_WIDEN_FLOATS"); /* tests: block small heads too */
    if (e && atol(e) > 0) most = atol(e);
    if (m->precision == ST_PRECISION_BF16 && V * C > most) {
        long rows = most / C / 16 * 16;
        vb = rows < 16 ? 16 : rows < V ? rows : V;
    }
    const char *r = getenv("SHARDTUNE_HEAD_BLOCK_ROWS"); /* tests: blocks of this many rows at any precision */
    if (r && atol(r) > 0 && atol(r) < vb) vb = atol(r);
    return (int)vb;
}

/* The head's vocabulary blocks as run: head_vblock_own's, or a device ZeRO-3's fewer rows (head_by_rows; their
 * block scratch is then the hook's when the arena, laid out by head_vblock_own, has none). */
static int head_vblock(const st_model *m) {
    int vb = head_vblock_own(m);
    return head_by_rows(m) && m->head_block < vb ? m->head_block : vb;
}

/* Rows of a layer weight [out, in] per matmul under bf16 (any backend: mm_scratch is sized for both operands,
 * head_vblock). The CPU twin widens every matmul_bf16 operand into mm_scratch, so a weight above
 * ST_W_WIDEN_FLOATS goes through its forward (output columns) and input-gradient (inner dimension) matmuls in
 * blocks of this many rows (a multiple of 16), as the LM head does (head_vblock): the scratch then holds one
 * block (Llama-3-8B: [14336, 4096] widened whole otherwise, 224 MiB). out when not blocked (fp32 or a small
 * weight). A blocked forward adds each block's product into its columns (as the whole one would: the same sums);
 * a blocked input gradient sums the blocks' products in block order (float rounding). */
#define ST_W_WIDEN_FLOATS (1L << 23)
static int wblock_rows(const st_model *m, int out, int in) {
    long most = ST_W_WIDEN_FLOATS;
    if (m->precision != ST_PRECISION_BF16) return out;
    const char *e = getenv("SHARDTUNE_W_WIDEN_FLOATS"); /* tests: block small weights too */
    if (e && atol(e) > 0) most = atol(e);
    if ((long)out * in <= most) return out;
    long rows = most / in / 16 * 16;
    return (int)(rows < 16 ? 16 : rows < out ? rows : out);
}

/* Floats of the [M, rows] block product a blocked weight of [out, in] over M rows needs (0: not blocked). */
static size_t wblock_tmp(const st_model *m, int M, int out, int in) {
    int nb = wblock_rows(m, out, in);
    return nb < out ? (size_t)M * nb : 0;
}

/* Token rows per MLP block. The MLP is per token, so under activation checkpointing (where backward recomputes
 * it anyway) forward and backward run gate/up, the activation and down over blocks of this many rows, and its
 * [N, 2 d_ff] buffers (h1, h2, dh1, dh2, h1_w) hold one block: Llama-3-8B at T = 2048, ~1 GiB less. Blocks
 * hold ~ST_MLP_BLOCK_FLOATS of [rows, 2 d_ff] (a multiple of 16 rows, equal-sized). N when not blocked:
 * without checkpointing (every layer keeps its tensors whole for backward) and with adapters that need whole
 * batches (DoRA, LoRA dropout: st_lora_rows_whole). */
#define ST_MLP_BLOCK_FLOATS (1L << 23)
static int mlp_rows(const st_model *m) {
    long N = (long)m->B * m->T, most = ST_MLP_BLOCK_FLOATS;
    if (!m->act_ckpt || m->mlp_whole || st_lora_rows_whole(m)) return (int)N;
    const char *e = getenv("SHARDTUNE_MLP_BLOCK_FLOATS"); /* tests: block small models too */
    if (e && atol(e) > 0) most = atol(e);
    long rows = most / (2L * m->cfg.d_ff) / 16 * 16;
    if (rows < 16) rows = 16;
    if (rows >= N) return (int)N;
    long blocks = (N + rows - 1) / rows;
    rows = ((N + blocks - 1) / blocks + 15) / 16 * 16;
    return rows < N ? (int)rows : (int)N;
}

int st_model_mlp_rows(const st_model *m) { return mlp_rows(m); }

int st_model_mlp_block_rows(const st_model_config *cfg, int B, int T, int act_ckpt, int mlp_whole) {
    st_model tmp;
    memset(&tmp, 0, sizeof tmp);
    tmp.cfg = *cfg;
    tmp.B = B;
    tmp.T = T;
    tmp.act_ckpt = act_ckpt != 0;
    tmp.mlp_whole = mlp_whole != 0;
    return mlp_rows(&tmp);
}

/* Whether gate and up run as two matmuls (blocked MLP under bf16, Llama family): the CPU twin then widens one
 * [d_ff, d_model] weight per matmul instead of the fused [2 d_ff, d_model] one. Always when a QLoRA base has
 * gate and up as units of their own (worker/qlora.h spec.mlp_apart: the scratch holds one of them). */
static int mlp_split(const st_model *m) {
    if (m->cfg.family == ST_FAMILY_GPT2) return 0;
    if (st_qlora_mlp_apart(m)) return 1; /* the QLoRA scratch holds gate or up, not both */
    return m->precision == ST_PRECISION_BF16 && mlp_rows(m) < m->B * m->T;
}

int st_model_mlp_splits(const st_model_config *cfg, int B, int T, int act_ckpt, int mlp_whole, int bf16) {
    return bf16 && cfg->family != ST_FAMILY_GPT2 && st_model_mlp_block_rows(cfg, B, T, act_ckpt, mlp_whole) < B * T;
}

/* Whether the kept layer inputs are bf16 (memory.checkpoint_dtype: bf16, under precision bf16). */
static int kept_bf16(const st_model *m) {
    return m->act_ckpt && m->ckpt_bf16 && m->precision == ST_PRECISION_BF16;
}

/* Lays out the arena; with base == NULL only counts floats. */
static size_t layout(const st_model *m, float *base, layer_acts *la, model_bufs *mb) {
    const st_model_config *c = &m->cfg;
    size_t N = (size_t)m->B * m->T, C = c->d_model, F = c->d_ff, Q = qkv_dim(c);
    size_t A = (size_t)c->n_head * c->head_dim, H = c->n_head, RM = (size_t)mlp_rows(m); /* MLP block rows */
    size_t off = 0;
#define TAKE(ptr, n)                                                                                         \
    do {                                                                                                   \
        if (base) (ptr) = base + off;                                                                       \
        off += ((size_t)(n) + 15) & ~(size_t)15;                                                            \
    } while (0)
    /* a saved activation of n elements: fp32, or bf16 (two per float slot) under mixed precision */
#define SAVED(f32, h16, n)                                                                                   \
    do {                                                                                                   \
        if (!bf16) { TAKE(f32, n); break; }                                                                 \
        float *p_ = NULL;                                                                                   \
        TAKE(p_, ((size_t)(n) + 1) / 2);                                                                    \
        if (base) (h16) = (uint16_t *)p_;                                                                   \
    } while (0)
    const int bf16 = m->precision == ST_PRECISION_BF16, ckpt = m->act_ckpt;
    /* activation checkpointing: every layer keeps its input residual only, and one more set (index L, the
     * work set) holds the rest of one layer's tensors, recomputed for each layer in backward */
    for (int l = 0; l < c->n_layer + ckpt; l++) {
        layer_acts dummy, *a = la ? &la[l] : &dummy;
        memset(a, 0, sizeof *a);
        if (l < c->n_layer && kept_bf16(m)) {
            float *p_ = NULL;
            TAKE(p_, (N * C + 1) / 2);
            if (base) a->res_in_h = (uint16_t *)p_;
        } else if (l < c->n_layer) {
            TAKE(a->res_in, N * C);
        }
        if (ckpt && l < c->n_layer) continue;
        SAVED(a->ln1, a->ln1_h, N * C);
        TAKE(a->ln1_mean, N);
        TAKE(a->ln1_rstd, N);
        SAVED(a->qkv, a->qkv_h, N * Q);
        if (c->qk_norm) {
            TAKE(a->qk_x, N * (H + c->n_kv_head) * c->head_dim);
            TAKE(a->qk_rstd, N * (H + c->n_kv_head));
        }
        SAVED(a->atty, a->atty_h, N * A);
        TAKE(a->lse, N * H);
        TAKE(a->resmid, N * C);
        SAVED(a->ln2, a->ln2_h, N * C);
        TAKE(a->ln2_mean, N);
        TAKE(a->ln2_rstd, N);
        SAVED(a->h1, a->h1_h, RM * 2 * F);
        SAVED(a->h2, a->h2_h, RM * F);
    }
    model_bufs dummyb, *b = mb ? mb : &dummyb;
    memset(b, 0, sizeof *b);
    size_t R = (size_t)head_chunk_rows(m);
    TAKE(b->res_out, N * C);
    if (kept_bf16(m)) TAKE(b->res_w, N * C);
    TAKE(b->lnf, N * C);
    TAKE(b->lnf_mean, N);
    TAKE(b->lnf_rstd, N);
    TAKE(b->dres, N * C);
    TAKE(b->dln, N * C);
    TAKE(b->dqkv, N * Q);
    TAKE(b->datt, N * A);
    TAKE(b->dh1, RM * 2 * F);
    TAKE(b->dh2, RM * F);
    TAKE(b->dlnf, N * C);
    TAKE(b->logits, R * (size_t)c->vocab);
    size_t VB = (size_t)head_vblock_own(m); /* not the hooks' blocks: the layout stays the one allocated */
    if (VB < (size_t)c->vocab) TAKE(b->head_tmp, R * VB); /* one vocabulary block of logits or dlogits */
    TAKE(b->norm_scratch, 2 * C);
    TAKE(b->head_stats, 3 * N);
    if (bf16) {
        TAKE(b->qkv_w, N * Q);
        TAKE(b->atty_w, N * A);
        TAKE(b->h1_w, RM * 2 * F);
        float *p_ = NULL;
        TAKE(p_, (R * (size_t)c->vocab + 1) / 2);
        b->dlogits_h = (uint16_t *)p_;
        int FU = mlp_split(m) ? (int)F : c->family == ST_FAMILY_GPT2 ? (int)F : 2 * (int)F, n = (int)N, rm = (int)RM;
        size_t wt = wblock_tmp(m, n, (int)Q, (int)C), t;
        if ((t = wblock_tmp(m, n, (int)C, (int)A)) > wt) wt = t;
        if ((t = wblock_tmp(m, rm, FU, (int)C)) > wt) wt = t;
        if ((t = wblock_tmp(m, rm, (int)C, (int)F)) > wt) wt = t;
        if (wt) TAKE(b->wtmp, wt);
    }
    float *tok = NULL, *tgt = NULL, *acc = NULL;
    TAKE(acc, 2); /* one double (the arena's 64-byte alignment keeps it aligned) */
    b->loss_acc = (double *)acc;
    TAKE(tok, N);
    TAKE(tgt, N);
    b->tokens = (int32_t *)tok;
    b->targets = (int32_t *)tgt;
    TAKE(b->weight, N);
    TAKE(b->loss, N);
#undef SAVED
#undef TAKE
    return off;
}

/* Largest st_matmul_bf16_scratch_floats over every matmul shape the model runs (forward, LM head
 * chunks, backward): the list mirrors the mm() calls below, (m, n, k) each. */
static size_t bf16_scratch_for(const st_model *m) {
    const st_model_config *c = &m->cfg;
    int N = m->B * m->T, C = c->d_model, Q = qkv_dim(c), A = c->n_head * c->head_dim, V = c->vocab;
    int R = head_chunk_rows(m), F1 = c->family == ST_FAMILY_GPT2 ? c->d_ff : 2 * c->d_ff, F = c->d_ff;
    V = head_vblock_own(m); /* the head's matmuls run on vocabulary blocks of at most this many rows */
    int RM = mlp_rows(m), FU = mlp_split(m) ? F : F1; /* MLP blocks; gate and up apart or fused */
    /* the layer weights [out, in] over M rows, forward and input gradient, in blocks of wblock_rows */
    const int wts[][3] = {{N, Q, C}, {N, C, A}, {RM, FU, C}, {RM, C, F}}; /* qkv, o, up(+gate), down */
    const int shapes[][3] = {
        {R, V, C}, {R, C, V}, {V, C, R},                  /* head: logits, dlnf, dW */
        {C, F, RM}, {F1, C, RM}, {C, A, N}, {Q, C, N},    /* weight gradients: down, up(+gate), o, qkv */
    };
    size_t most = 0;
    for (size_t i = 0; i < sizeof wts / sizeof wts[0]; i++) {
        int M = wts[i][0], out = wts[i][1], in = wts[i][2], nb = wblock_rows(m, out, in);
        size_t f = st_matmul_bf16_scratch_floats(M, nb, in), d = st_matmul_bf16_scratch_floats(M, in, nb);
        if (f > most) most = f;
        if (d > most) most = d;
    }
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
        size_t f = st_matmul_bf16_scratch_floats(shapes[i][0], shapes[i][1], shapes[i][2]);
        if (f > most) most = f;
    }
    return most;
}

size_t st_model_bf16_scratch_floats(const st_model_config *cfg, int B, int T) {
    st_model tmp;
    memset(&tmp, 0, sizeof tmp);
    tmp.precision = ST_PRECISION_BF16;
    tmp.cfg = *cfg;
    tmp.B = B;
    tmp.T = T;
    return bf16_scratch_for(&tmp);
}

/* (Re)allocates mm_scratch for the current B x T when precision is bf16 (frees it otherwise). */
static int alloc_mm_scratch(st_model *m) {
    m->be->free(m->mm_scratch);
    m->mm_scratch = NULL;
    m->mm_scratch_floats = 0;
    if (m->precision != ST_PRECISION_BF16 || m->B < 1) return 0;
    size_t n = bf16_scratch_for(m);
    m->mm_scratch = m->be->alloc(n * sizeof(float));
    if (!m->mm_scratch)
        return st_fail(ST_ENOMEM, "cannot allocate %.1f MB of bf16 matmul scratch (precision: bf16)", n * 4.0 / 1e6);
    m->mm_scratch_floats = n;
    return 0;
}

/* ---------------- RoPE variants (transformers' modeling_rope_utils, one function per rope_type) ---------------- */

/* Every formula is evaluated in double and rounded to fp32 once at the end (transformers evaluates the same
 * formulas in fp32 step by step: the two agree to a few ulp, tests/reference/ref_rope_models.py). */

/* default: inv_freq[i] = 1 / theta^(2i/hd) */
static double rope_base_inv(double theta, int i, int hd) { return 1.0 / pow(theta, 2.0 * i / hd); }

static double yarn_get_mscale(double scale, double mscale) {
    return scale <= 1.0 ? 1.0 : 0.1 * mscale * log(scale) + 1.0;
}

/* yarn: interpolated frequencies below the correction range, extrapolated above, a linear ramp between.
 * Returns the attention factor. */
static double rope_yarn(const st_model_config *c, float *inv) {
    const st_rope_config *r = &c->rope;
    int hd = c->head_dim, half = hd / 2;
    double base = c->rope_theta, omax = r->original_max > 0 ? r->original_max : c->max_seq;
    double factor = r->factor > 0 ? r->factor : c->max_seq / omax;
    double att = r->attention_factor;
    if (!(att > 0))
        att = (r->mscale != 0 && r->mscale_all_dim != 0)
                  ? yarn_get_mscale(factor, r->mscale) / yarn_get_mscale(factor, r->mscale_all_dim)
                  : yarn_get_mscale(factor, 1.0);
    double bf = r->beta_fast != 0 ? r->beta_fast : 32.0, bs = r->beta_slow != 0 ? r->beta_slow : 1.0;
    /* find_correction_dim(n_rot) = hd * ln(omax / (n_rot * 2 pi)) / (2 ln base) */
    double lo = hd * log(omax / (bf * 2.0 * M_PI)) / (2.0 * log(base));
    double hi = hd * log(omax / (bs * 2.0 * M_PI)) / (2.0 * log(base));
    if (!r->no_truncate) { lo = floor(lo); hi = ceil(hi); }
    if (lo < 0) lo = 0;
    if (hi > hd - 1) hi = hd - 1;
    if (lo == hi) hi += 0.001; /* transformers: prevent a singular ramp */
    for (int i = 0; i < half; i++) {
        double pos_freq = pow(base, 2.0 * i / hd);
        double extra = 1.0 / pos_freq, inter = 1.0 / (factor * pos_freq);
        double ramp = (i - lo) / (hi - lo);
        ramp = ramp < 0 ? 0 : ramp > 1 ? 1 : ramp;
        double ef = 1.0 - ramp; /* extrapolation weight */
        inv[i] = (float)(inter * (1.0 - ef) + extra * ef);
    }
    return att;
}

/* llama3: low frequencies divided by factor, high ones kept, a smooth blend between the two wavelengths. */
static void rope_llama3(const st_model_config *c, float *inv) {
    const st_rope_config *r = &c->rope;
    int hd = c->head_dim;
    double omax = r->original_max > 0 ? r->original_max : c->max_seq;
    double lo_wl = omax / r->low_freq_factor, hi_wl = omax / r->high_freq_factor;
    for (int i = 0; i < hd / 2; i++) {
        double f = rope_base_inv(c->rope_theta, i, hd), wl = 2.0 * M_PI / f, v = f;
        if (wl > lo_wl) v = f / r->factor;
        else if (wl >= hi_wl) {
            double smooth = (omax / wl - r->low_freq_factor) / (r->high_freq_factor - r->low_freq_factor);
            v = (1.0 - smooth) * f / r->factor + smooth * f;
        }
        inv[i] = (float)v;
    }
}

int st_model_rope_inv_freq(const st_model_config *c, int T, float *inv, double *att_out) {
    const st_rope_config *r = &c->rope;
    int hd = c->head_dim, half = hd / 2;
    double theta = c->rope_theta, att = 1.0;
    if (c->family != ST_FAMILY_LLAMA || hd < 2 || hd % 2 || !(theta > 0))
        return st_fail(ST_ECONFIG, "RoPE needs a Llama-family config with an even head_dim and rope_theta > 0");
    switch (r->type) {
    case ST_ROPE_DEFAULT:
        for (int i = 0; i < half; i++) inv[i] = (float)rope_base_inv(theta, i, hd);
        break;
    case ST_ROPE_LINEAR:
        for (int i = 0; i < half; i++) inv[i] = (float)(rope_base_inv(theta, i, hd) / r->factor);
        break;
    case ST_ROPE_DYNAMIC: { /* NTK: the base grows once the sequence is longer than max_position_embeddings */
        double L = T > c->max_seq ? T : c->max_seq;
        double b = theta * pow(r->factor * L / c->max_seq - (r->factor - 1.0), (double)hd / (hd - 2));
        for (int i = 0; i < half; i++) inv[i] = (float)rope_base_inv(b, i, hd);
        break;
    }
    case ST_ROPE_YARN:
        att = rope_yarn(c, inv);
        break;
    case ST_ROPE_LLAMA3:
        rope_llama3(c, inv);
        break;
    case ST_ROPE_LONGROPE: {
        double omax = r->original_max > 0 ? r->original_max : c->max_seq;
        double factor = r->factor > 0 ? r->factor : c->max_seq / omax;
        att = r->attention_factor > 0 ? r->attention_factor
              : factor <= 1.0         ? 1.0
                                      : sqrt(1.0 + log(factor) / log(omax));
        if (r->n_factors != half)
            return st_fail(ST_ECONFIG, "rope longrope: short_factor/long_factor have %d entries, head_dim/2 is %d",
                           r->n_factors, half);
        const float *ext = T > omax ? r->long_factor : r->short_factor;
        for (int i = 0; i < half; i++) inv[i] = (float)(1.0 / (ext[i] * pow(theta, 2.0 * i / hd)));
        break;
    }
    default:
        return st_fail(ST_ECONFIG, "rope_type %d is not implemented", r->type);
    }
    if (att_out) *att_out = (double)(float)att; /* transformers multiplies the fp32 cos/sin by an fp32 factor */
    return 0;
}

int st_model_rope_tables(const st_model_config *c, int T, float *cos_out, float *sin_out) {
    int half = c->head_dim / 2;
    float inv[ST_ROPE_MAX_FACTORS * 4];
    double att;
    if (half > (int)(sizeof inv / sizeof inv[0]))
        return st_fail(ST_ECONFIG, "head_dim %d is larger than RoPE supports (%d)", c->head_dim,
                       (int)(2 * sizeof inv / sizeof inv[0]));
    int rc = st_model_rope_inv_freq(c, T, inv, &att);
    if (rc) return rc;
    for (int pos = 0; pos < T; pos++)
        for (int i = 0; i < half; i++) {
            double ang = (double)pos * inv[i];
            cos_out[(size_t)pos * half + i] = (float)(cos(ang) * att);
            sin_out[(size_t)pos * half + i] = (float)(sin(ang) * att);
        }
    return 0;
}

/* Floats of RoPE tables (cos + sin) for T positions; Llama family only. */
static size_t rope_floats(const st_model_config *c, int T) {
    return c->family == ST_FAMILY_LLAMA ? 2 * (size_t)T * (size_t)(c->head_dim / 2) : 0;
}

size_t st_model_activation_floats(const st_model_config *cfg, int B, int T, st_precision precision) {
    return st_model_activation_floats_ckpt(cfg, B, T, precision, 0);
}

size_t st_model_activation_floats_ckpt(const st_model_config *cfg, int B, int T, st_precision precision, int act_ckpt) {
    return st_model_activation_floats_dev(cfg, B, T, precision, act_ckpt, 0);
}

size_t st_model_activation_floats_dev(const st_model_config *cfg, int B, int T, st_precision precision, int act_ckpt,
                                      int device) {
    return st_model_activation_floats_opts(cfg, B, T, precision, act_ckpt, device, 0);
}

size_t st_model_activation_floats_opts(const st_model_config *cfg, int B, int T, st_precision precision, int act_ckpt,
                                       int device, int mlp_whole) {
    st_model tmp;
    memset(&tmp, 0, sizeof tmp);
    tmp.sizing_device = device != 0;
    tmp.mlp_whole = mlp_whole != 0;
    tmp.cfg = *cfg;
    tmp.B = B;
    tmp.T = T;
    tmp.precision = precision;
    tmp.act_ckpt = act_ckpt != 0;
    tmp.ckpt_bf16 = act_ckpt == ST_MODEL_CKPT_BF16;
    size_t mm = precision == ST_PRECISION_BF16 ? bf16_scratch_for(&tmp) : 0;
    return layout(&tmp, NULL, NULL, NULL) + (size_t)B * T /* loss_per_pos */ + rope_floats(cfg, T) + mm;
}

/* (Re)allocates the activation arena and the per-layer pointer table for the current B, T and
 * precision (the layout depends on all three). */
static int alloc_arena(st_model *m) {
    m->be->free(m->act_arena);
    m->act_floats = layout(m, NULL, NULL, NULL);
    m->act_arena = m->be->alloc(m->act_floats * sizeof(float));
    free(m->layer_acts);
    m->layer_acts = calloc((size_t)m->cfg.n_layer + 1, sizeof(layer_acts)); /* + the checkpointing work set */
    if (!m->act_arena || !m->layer_acts)
        return st_fail(ST_ENOMEM, "cannot allocate %.1f MB of activations for micro_batch %d x seq_len %d",
                       m->act_floats * 4.0 / 1e6, m->B, m->T);
    return 0;
}

int st_model_set_precision(st_model *m, st_precision precision) {
    if (precision != ST_PRECISION_FP32 && precision != ST_PRECISION_BF16)
        return st_fail(ST_EINVAL, "precision %d is not fp32 (0) or bf16 (1)", (int)precision);
    if (precision == ST_PRECISION_BF16 &&
        (!m->be->matmul_bf16 || !m->be->to_bf16 || !m->be->from_bf16 || !m->be->cross_entropy_acc))
        return st_fail(ST_ECONFIG, "precision: bf16 is not supported by the %s backend", m->be->name);
    if (m->n_w16 && precision != ST_PRECISION_BF16) /* worker/qlora.h: that part exists in bf16 only */
        return st_fail(ST_EINVAL, "the model's frozen base is held in bf16 only: precision must stay bf16");
    st_model_restore_fp32(m); /* the bf16 copy is about to go: no weight may live there only */
    m->precision = precision;
    if (!m->n_w16) { /* else the bf16 copy came with the weights (st_qlora_begin) */
        m->be->free(m->weights_bf16);
        m->weights_bf16 = NULL;
    }
    if (precision == ST_PRECISION_BF16 && !m->weights_bf16 && !m->buffers_external) {
        m->weights_bf16 = m->be->alloc(m->n_weights * sizeof(uint16_t));
        if (!m->weights_bf16)
            return st_fail(ST_ENOMEM, "cannot allocate %.1f MB for the bf16 weight copy (precision: bf16)",
                           m->n_weights * 2.0 / 1e6);
    }
    m->weights_bf16_stale = 1;
    int rc = m->B > 0 ? alloc_arena(m) : 0;
    return rc ? rc : alloc_mm_scratch(m);
}

void st_model_weights_changed(st_model *m) { m->weights_bf16_stale = 1; }

/* ---------------- frozen weights in bf16 only (model.h st_model_drop_frozen_fp32) ---------------- */

/* The kinds of parameter nothing reads in fp32 under bf16: the base's matmul weights (the layers' and an untied
 * head's 2-D weights: st_model_param_bf16_only's set, here with adapters too — LoRA's base matmuls and DoRA's
 * weight norms read the bf16 copy, worker/lora.c dora_weight; the prompt family reads only its own tensors and
 * the embedding's rows) and an untied Llama-family token embedding (forward widens its rows from the bf16
 * copy). QLoRA keeps its own layout (worker/qlora.h). */
static int bf16_storable(const st_model *m, int i) {
    if (m->qlora || i >= st_model_base_params(m)) return 0;
    const st_param *p = &m->params[i];
    if (p->ndim == 2 && (p->layer >= 0 || (!m->cfg.tied_embeddings && i == st_model_base_params(m) - 1))) return 1;
    return i == 0 && m->cfg.family == ST_FAMILY_LLAMA && !m->cfg.tied_embeddings && m->params[0].kind == ST_MOD_EMBED;
}

/* Whether this model may hold frozen weights in bf16 only at all (see model.h). */
static int bf16_storage_on(const st_model *m) {
    const char *keep = getenv("SHARDTUNE_FROZEN_FP32"); /* tests: 1 keeps every fp32 copy */
    if (keep && !strcmp(keep, "1")) return 0;
    return m->precision == ST_PRECISION_BF16 && m->weights_bf16 && m->be->host_memory && !m->acquire &&
           !m->qlora && !m->windowed && !m->grads_windowed && !m->buffers_external && !m->part_base && !m->n_w16 && !m->w8;
}

/* Whether x[0, n) are all bf16 values (low 16 bits zero), so their bf16 copy widens back to them exactly. */
static int bf16_exact(const float *x, size_t n) {
    for (size_t k = 0; k < n; k++) {
        uint32_t u;
        memcpy(&u, x + k, sizeof u);
        if (u & 0xffffu) return 0;
    }
    return 1;
}

/* The bf16 copy of every parameter that still has fp32 weights, in runs of adjacent ones (the ones held in
 * bf16 only are their own value and are never rounded from their given-back fp32 memory). */
static void refresh_bf16(st_model *m) {
    if (!m->w32_dropped) {
        m->be->to_bf16(m->weights_bf16 + m->n_w16, m->weights + m->n_w16, m->n_weights - m->n_w16);
    } else {
        size_t lo = 0, hi = 0;
        for (int i = 0; i <= m->n_params; i++) {
            const st_param *p = i < m->n_params ? &m->params[i] : NULL;
            if (p && !m->w32_dropped[i] && p->offset == hi && hi > lo) {
                hi += p->numel;
                continue;
            }
            if (hi > lo) m->be->to_bf16(m->weights_bf16 + lo, m->weights + lo, hi - lo);
            lo = hi = 0;
            if (p && !m->w32_dropped[i]) {
                lo = p->offset;
                hi = lo + p->numel;
            }
        }
    }
    m->weights_bf16_stale = 0;
}

int st_model_fp32_dropped(const st_model *m, int i) { return m->w32_dropped && m->w32_dropped[i]; }

size_t st_model_drop_frozen_fp32(st_model *m) {
    if (!m->w32_dropped && !bf16_storage_on(m)) return 0;
    if (!m->w32_dropped && !(m->w32_dropped = calloc((size_t)m->n_params, 1))) return 0; /* a saving, not a need */
    size_t n = 0;
    int on = bf16_storage_on(m);
    for (int i = 0; i < m->n_params; i++) { /* one tensor at a time: its bf16 copy made (when stale), then its
                                               fp32 given back, so the two never coexist whole */
        const st_param *p = &m->params[i];
        if (!m->w32_dropped[i] && on && p->grad_offset < 0 && bf16_storable(m, i) &&
            bf16_exact(m->weights + p->offset, p->numel)) {
            if (m->weights_bf16_stale) m->be->to_bf16(m->weights_bf16 + p->offset, m->weights + p->offset, p->numel);
            st_give_back(m->weights, sizeof(float), p->offset, p->offset + p->numel);
            m->w32_dropped[i] = 1;
        }
        if (m->w32_dropped[i]) n += p->numel;
    }
    return n;
}

/* A load that reads a frozen bf16 tensor straight into the bf16 copy (coordinator/trainer/train.c
 * load_late): the same rule as st_model_drop_frozen_fp32, decided before the values exist. */
int st_model_bf16_load_planned(const st_model *m, int i, const long *goff) {
    return goff[i] < 0 && bf16_storage_on(m) && bf16_storable(m, i);
}

int st_model_mark_bf16_only(st_model *m, int i) {
    if (!m->w32_dropped && !(m->w32_dropped = calloc((size_t)m->n_params, 1)))
        return st_fail(ST_ENOMEM, "out of memory marking %s as held in bf16 only", m->params[i].name);
    m->w32_dropped[i] = 1;
    return 0;
}

void st_model_param_fp32(const st_model *m, int i, size_t a, size_t n, float *dst) {
    size_t at = m->params[i].offset + a;
    if (st_model_fp32_dropped(m, i)) m->be->from_bf16(dst, m->weights_bf16 + at, n);
    else m->be->copy(dst, m->weights + at, n * sizeof(float));
}

void st_model_param_fp32_host(const st_model *m, int i, size_t a, size_t n, float *host) {
    size_t at = m->params[i].offset + a;
    if (m->be->host_memory) { st_model_param_fp32(m, i, a, n, host); return; }
    if (!st_model_fp32_dropped(m, i)) { m->be->copy_to_host(host, m->weights + at, n * sizeof(float)); return; }
    uint16_t piece[4096];
    for (size_t k = 0; k < n; k += 4096) { /* widening is exact: the bits from_bf16 gives */
        size_t c = n - k < 4096 ? n - k : 4096;
        m->be->copy_to_host(piece, m->weights_bf16 + at + k, c * sizeof(uint16_t));
        for (size_t j = 0; j < c; j++) host[k + j] = st_bf16_bits_to_float(piece[j]);
    }
}

int st_model_bf16_storable(const st_model *m, int i) { return bf16_storable(m, i); }

int st_model_bind_frozen_bf16(st_model *m, const st_backend *be, const unsigned char *w16) {
    if (m->be || m->lora || m->prompt || m->qlora) return st_fail(ST_EINVAL, "st_model_bind_frozen_bf16: not a bare registry");
    size_t n16 = 0;
    for (int i = 0; i < m->n_params; i++)
        if (w16[i] && bf16_storable(m, i)) n16 += m->params[i].numel;
    if (!n16) return st_model_bind(m, be, 1);
    if (!be->to_bf16 || !be->from_bf16) return st_fail(ST_ECONFIG, "precision: bf16 is not supported by the %s backend", be->name);
    int rc = st_model_bind(m, be, 0);
    if (rc) return rc;
    size_t lo = 0, hi = n16;
    for (int i = 0; i < m->n_params; i++) { /* [bf16 only | fp32], each in registry order */
        size_t *at = w16[i] && bf16_storable(m, i) ? &lo : &hi;
        m->params[i].offset = *at;
        *at += m->params[i].numel;
    }
    m->w32_dropped = calloc((size_t)m->n_params, 1);
    float *w32 = be->alloc((m->n_weights - n16) * sizeof(float)); /* > 0: norms keep fp32 */
    m->weights_bf16 = be->alloc(m->n_weights * sizeof(uint16_t));
    if (!m->w32_dropped || !w32 || !m->weights_bf16) {
        be->free(w32);
        be->free(m->weights_bf16);
        m->weights_bf16 = NULL;
        return st_fail(ST_ENOMEM, "cannot allocate %.1f MB for model weights (%.1f MB of them in bf16 only)",
                       (m->n_weights - n16) * 4.0 / 1e6 + m->n_weights * 2.0 / 1e6, n16 * 2.0 / 1e6);
    }
    for (int i = 0; i < m->n_params; i++) m->w32_dropped[i] = m->params[i].offset < n16;
    m->weights = w32 - n16; /* nothing reads below n_w16 (model.h) */
    m->n_w16 = n16;
    m->weights_bf16_stale = 1;
    return 0;
}

int st_model_grow_bf16(st_model *m, size_t old_n) {
    if (!m->n_w16 || !m->weights_bf16 || !m->w32_dropped) return 0; /* (QLoRA's bf16-only part: its own layout) */
    unsigned char *d = realloc(m->w32_dropped, (size_t)m->n_params);
    uint16_t *nb = d ? m->be->alloc(m->n_weights * sizeof(uint16_t)) : NULL;
    if (d) m->w32_dropped = d;
    if (!nb) return st_fail(ST_ENOMEM, "cannot allocate %.1f MB for the bf16 weight copy", m->n_weights * 2.0 / 1e6);
    for (int i = 0; i < m->n_params; i++) m->w32_dropped[i] = m->params[i].offset < m->n_w16; /* the new ones: fp32 */
    m->be->copy(nb, m->weights_bf16, old_n * sizeof(uint16_t));
    m->be->free(m->weights_bf16);
    m->weights_bf16 = nb;
    m->weights_bf16_stale = 1;
    return 0;
}

void st_model_restore_fp32(st_model *m) {
    for (int i = 0; m->w32_dropped && i < m->n_params; i++)
        if (m->w32_dropped[i] && m->params[i].offset >= m->n_w16) { /* below n_w16: no fp32 place at all */
            const st_param *p = &m->params[i];
            m->be->from_bf16(m->weights + p->offset, m->weights_bf16 + p->offset, p->numel);
            m->w32_dropped[i] = 0;
        }
}

int st_model_values_bf16(const float *x, size_t n) { return bf16_exact(x, n); }

void st_model_fp32_regain(st_model *m, int i, size_t n) {
    if (!st_model_fp32_dropped(m, i) || m->params[i].offset < m->n_w16) return;
    const st_param *p = &m->params[i];
    if (n) m->be->from_bf16(m->weights + p->offset, m->weights_bf16 + p->offset, n); /* exact */
    m->w32_dropped[i] = 0;
}

void st_model_fp32_rewritten(st_model *m) {
    for (int i = 0; m->w32_dropped && i < m->n_params; i++) /* below n_w16 they have no fp32 place to be written */
        if (m->params[i].offset >= m->n_w16) m->w32_dropped[i] = 0;
    m->weights_bf16_stale = 1;
}

size_t st_model_bf16_frozen_floats(const st_model *m, const long *goff, size_t *largest) {
    const char *keep = getenv("SHARDTUNE_FROZEN_FP32"); /* as bf16_storage_on */
    size_t n = 0, most = 0;
    for (int i = 0; !(keep && !strcmp(keep, "1")) && i < m->n_params; i++)
        if (goff[i] < 0 && bf16_storable(m, i)) {
            n += m->params[i].numel;
            if (m->params[i].numel > most) most = m->params[i].numel;
        }
    if (largest) *largest = most;
    return n;
}

/* ZeRO-3 (worker/comm.c st_comm_drop_frozen_fp32, worker/comm_zero3_dev.c st_z3dev_hold_bf16): the same kinds
 * as bf16_storable under the same model-wide conditions as bf16_storage_on, with the residency hooks that stage 3
 * installs allowed; on a device the model is windowed over its shards (its gather slots carry the bf16 copies).
 * Registry + config only, so every rank names the same set. */
int st_model_bf16_only_candidate(const st_model *m, int i) {
    const char *keep = getenv("SHARDTUNE_FROZEN_FP32"); /* tests: 1 keeps every fp32 copy */
    if (keep && !strcmp(keep, "1")) return 0;
    if (m->precision != ST_PRECISION_BF16 || m->qlora || m->n_w16 || m->w8) return 0;
    int dev3 = !m->be->host_memory && m->windowed; /* device ZeRO-3 */
    if (!dev3 && (!m->weights_bf16 || !m->be->host_memory || m->windowed || m->grads_windowed || m->buffers_external ||
                  m->part_base))
        return 0;
    return m->params[i].grad_offset < 0 && bf16_storable(m, i);
}

int st_model_bf16_exact(const float *x, size_t n) { return bf16_exact(x, n); }

int st_model_set_fp32_dropped(st_model *m, int i, int on) {
    if (!m->w32_dropped && !on) return 0;
    if (!m->w32_dropped && !(m->w32_dropped = calloc((size_t)m->n_params, 1))) return -1;
    m->w32_dropped[i] = on != 0;
    return 0;
}

int st_model_set_activation_checkpointing(st_model *m, int on) {
    m->act_ckpt = on != 0;
    m->ckpt_bf16 = on == ST_MODEL_CKPT_BF16;
    int rc = m->B > 0 ? alloc_arena(m) : 0;
    return rc ? rc : alloc_mm_scratch(m); /* the MLP's blocks change the largest matmul (mlp_rows) */
}

int st_model_check_bf16_copy(const st_model *m) {
    if (!m->weights_bf16 || m->weights_bf16_stale) return 0;
    float *w = malloc(m->n_weights * sizeof(float));
    uint16_t *copy = malloc(m->n_weights * sizeof(uint16_t)), *want = malloc(m->n_weights * sizeof(uint16_t));
    int rc = 0;
    if (!w || !copy || !want) {
        rc = st_fail(ST_ENOMEM, "out of memory checking the bf16 weight copy");
    } else {
        size_t lo = m->n_w16; /* below it the bf16 copy is the only one (worker/qlora.h) */
        m->be->copy_to_host(w + lo, m->weights + lo, (m->n_weights - lo) * sizeof(float));
        m->be->copy_to_host(copy, m->weights_bf16, m->n_weights * sizeof(uint16_t));
        for (size_t i = lo; i < m->n_weights; i++) want[i] = st_float_to_bf16_bits(w[i]);
        for (int i = 0; i < m->n_params && !rc; i++) {
            const st_param *p = &m->params[i];
            if (p->offset < lo || st_model_fp32_dropped(m, i)) continue; /* bf16 only: the copy is the value */
            if (memcmp(copy + p->offset, want + p->offset, p->numel * sizeof(uint16_t)))
                rc = st_fail(ST_ECORRUPT, "bf16 weight copy of %s is out of date with its fp32 weights", p->name);
        }
    }
    free(w);
    free(copy);
    free(want);
    return rc;
}

int st_model_check_seq_len(const st_model_config *c, int T) {
    /* dynamic RoPE exists to run past max_position_embeddings (its NTK base grows with T, as in
     * transformers' forward); every other model is limited to its positions */
    int dynamic = c->family == ST_FAMILY_LLAMA && c->rope.type == ST_ROPE_DYNAMIC;
    if (T > c->max_seq && !dynamic)
        return st_fail(ST_ECONFIG, "train.seq_len %d exceeds the model's max positions %d", T, c->max_seq);
    return 0;
}

int st_model_alloc_activations(st_model *m, int B, int T) {
    if (B < 1 || T < 1) return st_fail(ST_EINVAL, "micro batch %d x seq_len %d must be positive", B, T);
    int rc = m->prompt ? st_prompt_reserve(m, B, T) : 0;
    T += st_prompt_tokens(m); /* the virtual tokens lead every sequence */
    if (!rc) rc = st_model_check_seq_len(&m->cfg, T);
    if (rc) return rc;
    const st_backend *be = m->be;
    m->doc_pos_on = 0; /* positions were for the old B x T: set them again (st_model_set_doc_positions) */
    be->free(m->rope_cos);
    be->free(m->rope_sin);
    free(m->loss_per_pos);
    m->rope_cos = m->rope_sin = NULL;
    m->B = B;
    m->T = T;
    rc = alloc_arena(m);
    if (rc) return rc;
    m->loss_per_pos = calloc((size_t)B * T, sizeof(float));
    if (!m->loss_per_pos) return st_fail(ST_ENOMEM, "out of memory for per-position losses");
    rc = alloc_mm_scratch(m);
    if (rc) return rc;
    if (m->lora && (rc = st_lora_reserve(m, (size_t)B * T))) return rc;
    if (m->cfg.family == ST_FAMILY_LLAMA) {
        size_t n = rope_floats(&m->cfg, T) / 2;
        float *c = malloc(n * sizeof(float)), *s = malloc(n * sizeof(float));
        m->rope_cos = be->alloc(n * sizeof(float));
        m->rope_sin = be->alloc(n * sizeof(float));
        if (!c || !s || !m->rope_cos || !m->rope_sin) {
            free(c);
            free(s);
            return st_fail(ST_ENOMEM, "out of memory for RoPE tables");
        }
        rc = st_model_rope_tables(&m->cfg, T, c, s);
        if (!rc) {
            be->copy_to_device(m->rope_cos, c, n * sizeof(float));
            be->copy_to_device(m->rope_sin, s, n * sizeof(float));
        }
        free(c);
        free(s);
        if (rc) return rc;
    }
    return 0;
}

/* ---------------- forward / backward ---------------- */

/* Pointers to one layer's weights (and gradients, NULL when frozen). */
typedef struct {
    const float *n1w, *n1b, *wqkv, *bqkv, *wo, *bo, *n2w, *n2b, *w1, *b1, *w2, *b2, *qn, *kn;
    float *gn1w, *gn1b, *gwqkv, *gbqkv, *gwo, *gbo, *gn2w, *gn2b, *gw1, *gb1, *gw2, *gb2, *gqn, *gkn;
    int iqkv, io, i1, i2; /* registry indices of the projection weights (QLoRA: the unit a matmul loads) */
} layer_w;

/* The window of w[0 .. n) holding element `at` of its space, or NULL (st_model.windowed). */
static const st_res_window *window_at(const st_res_window *w, int n, size_t at) {
    for (int k = 0; k < n; k++)
        if (at >= w[k].lo && at < w[k].hi) return &w[k];
    return NULL;
}

static const float *wptr(const st_model *m, int idx) {
    if (idx < 0) return NULL;
    if (!m->windowed) return m->weights + m->params[idx].offset;
    const st_res_window *w = window_at(m->wwin, m->n_wwin, m->params[idx].offset);
    return w ? w->p + (m->params[idx].offset - w->lo) : NULL;
}
static float *gptr(const st_model *m, int idx) {
    if (idx < 0 || m->params[idx].grad_offset < 0) return NULL;
    if (!m->windowed && !m->grads_windowed) return m->grads + m->params[idx].grad_offset;
    const st_res_window *w = window_at(m->gwin, m->n_gwin, (size_t)m->params[idx].grad_offset);
    return w ? w->p + ((size_t)m->params[idx].grad_offset - w->lo) : NULL;
}

const float *st_model_param_weights(const st_model *m, int i) { return wptr(m, i); }

float *st_model_param_grad(const st_model *m, int i) { return gptr(m, i); }

float *st_model_weight_ptr(const st_model *m, size_t at) {
    if (!m->part_base) return m->weights + at;
    int lo = 0, hi = m->n_params - 1; /* registry order is offset order: the last parameter starting at or before */
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (m->params[mid].offset <= at) lo = mid;
        else hi = mid - 1;
    }
    return m->part_base[lo] + (at - m->params[lo].offset);
}

/* Registry order per layer is fixed by build_*: index arithmetic keeps this O(1). */
static int layer_first_param(const st_model *m, int l) {
    int per = m->cfg.family == ST_FAMILY_GPT2 ? 12 : 9 + (m->cfg.qkv_bias ? 3 : 0) + (m->cfg.qk_norm ? 2 : 0);
    int first = m->cfg.family == ST_FAMILY_GPT2 ? 2 : 1;
    return first + l * per;
}

int st_model_layer_first_param(const st_model *m, int l) { return layer_first_param(m, l); }

static layer_w layer_weights(const st_model *m, int l) {
    layer_w w;
    memset(&w, 0, sizeof w);
    int i = layer_first_param(m, l);
#define SET(field, idx) (w.field = wptr(m, idx), w.g##field = gptr(m, idx))
    if (m->cfg.family == ST_FAMILY_GPT2) {
        SET(n1w, i); SET(n1b, i + 1); SET(wqkv, i + 2); SET(bqkv, i + 3); SET(wo, i + 4); SET(bo, i + 5);
        SET(n2w, i + 6); SET(n2b, i + 7); SET(w1, i + 8); SET(b1, i + 9); SET(w2, i + 10); SET(b2, i + 11);
        w.iqkv = i + 2; w.io = i + 4; w.i1 = i + 8; w.i2 = i + 10;
    } else {
        SET(n1w, i);
        SET(wqkv, i + 1); /* q, then k and v adjacent */
        int j = i + 4;
        if (m->cfg.qkv_bias) { SET(bqkv, j); j += 3; }
        SET(wo, j);
        w.iqkv = i + 1; w.io = j;
        if (m->cfg.qk_norm) { SET(qn, j + 1); SET(kn, j + 2); j += 2; }
        SET(n2w, j + 1); SET(w1, j + 2); /* gate, then up adjacent */ SET(w2, j + 4);
        w.i1 = j + 2; w.i2 = j + 4;
    }
#undef SET
    return w;
}

/* QLoRA: the projection weight idx's matmul unit (worker/qlora.h: q/k/v together, any other one alone)
 * dequantized into the scratch, right before a matmul (or DoRA) reads it; a no-op when it is already there.
 * With the fused path (st_qlora_select) only noted: the next mm_fwd / mm_dgrad multiplies through its codes. */
static void qunit(const st_model *m, int idx) {
    if (m->qlora) st_qlora_select(m, idx);
}

/* Every matmul of the model goes through here: the model's precision picks the kernel (one place).
 * C = op(A) @ op(B) + beta * C (+ bias[N] on every row). Under fp32 both operands are fp32 (the bf16
 * pointers of activations and weights are NULL then); under bf16 either may be stored as bf16. */
static void mm(const st_model *m, float *c, st_mm_in a, st_mm_in b, const float *bias, int M, int N, int K, int ta,
               int tb, float beta) {
    if (m->progress) m->progress(m->residency_ctx); /* a prefetched gather in flight moves on */
    if (m->precision == ST_PRECISION_BF16) {
        m->be->matmul_bf16(c, a, b, bias, M, N, K, ta, tb, 1.0f, beta, m->mm_scratch);
    } else {
        m->be->matmul(c, a.f32, b.f32, M, N, K, ta, tb, 1.0f, beta);
        if (bias) m->be->bias_add(c, bias, M, N);
    }
}

/* A saved activation as a matmul operand: its bf16 copy when it has one. */
static st_mm_in saved(const float *f32, const uint16_t *h16) { return h16 ? st_mm_bf16(h16) : st_mm_f32(f32); }

/* A weight as a matmul operand: its place in the bf16 weight copy under bf16. */
static st_mm_in weight(const st_model *m, const float *w) {
    for (int k = 0; m->windowed && k < m->n_wwin; k++) { /* the window's bf16 copy at the same place */
        const st_res_window *r = &m->wwin[k];
        if (w >= r->p && w < r->p + (r->hi - r->lo)) return r->p16 ? st_mm_bf16(r->p16 + (w - r->p)) : st_mm_f32(w);
    }
    return m->weights_bf16 ? st_mm_bf16(m->weights_bf16 + (w - m->weights)) : st_mm_f32(w);
}

const uint16_t *st_model_param_bf16(const st_model *m, int i) {
    const float *w = wptr(m, i);
    if (!w) return NULL;
    st_mm_in in = weight(m, w);
    return in.f32 ? NULL : in.bf16;
}

/* Saves a freshly computed fp32 activation as bf16 (no-op under fp32). With `reuse`, x is replaced by its
 * rounded value, because forward goes on computing with it and backward will see only the saved copy. */
static void save(const st_model *m, uint16_t *h16, float *x, size_t n, int reuse) {
    if (!h16) return;
    m->be->to_bf16(h16, x, n);
    if (reuse) m->be->from_bf16(x, h16, n);
}

/* The fp32 value of a saved activation for backward: the fp32 tensor itself, or its bf16 copy widened
 * into the working buffer `work`. */
static const float *restore(const st_model *m, const float *f32, const uint16_t *h16, float *work, size_t n) {
    if (!h16) return f32;
    m->be->from_bf16(work, h16, n);
    return work;
}

static void norm_fwd(const st_model *m, float *out, float *mean, float *rstd, const float *x, const float *w,
                     const float *b, int N) {
    if (m->cfg.family == ST_FAMILY_GPT2)
        m->be->layernorm_fwd(out, mean, rstd, x, w, b, N, m->cfg.d_model, m->cfg.norm_eps);
    else
        m->be->rmsnorm_fwd(out, rstd, x, w, N, m->cfg.d_model, m->cfg.norm_eps);
}

/* dx += norm backward; dw/db accumulate only when non-NULL (frozen norms pass scratch). */
static void norm_bwd(const st_model *m, float *dx, float *dw, float *db, const float *dout, const float *x,
                     const float *w, const float *mean, const float *rstd, int N, float *scratch) {
    int C = m->cfg.d_model;
    /* the kernels always accumulate dw/db: frozen weights accumulate into a scratch row we ignore */
    if (!dw) { m->be->memset0(scratch, 2 * (size_t)C * sizeof(float)); dw = scratch; }
    if (!db && m->cfg.family == ST_FAMILY_GPT2) db = scratch + C;
    if (m->cfg.family == ST_FAMILY_GPT2)
        m->be->layernorm_bwd(dx, dw, db, dout, x, w, mean, rstd, N, C);
    else
        m->be->rmsnorm_bwd(dx, dw, dout, x, w, rstd, N, C);
}

/* The final norm's weight index (its bias, GPT-2 only, follows it). */
static int final_norm_index(const st_model *m) {
    return layer_first_param(m, m->cfg.n_layer);
}

static int head_index(const st_model *m) { return m->cfg.tied_embeddings ? 0 : st_model_base_params(m) - 1; }

static const float *head_weight(const st_model *m, float **grad) {
    int idx = head_index(m);
    *grad = gptr(m, idx);
    return wptr(m, idx);
}

/* The sliding window layer l attends with, or 0 when it sees every earlier key (no window, a full-attention
 * layer, or sequences no longer than the window, where both are the same). */
static int layer_window(const st_model *m, int l) {
    const st_model_config *c = &m->cfg;
    return c->sliding_window > 0 && l >= c->window_first_layer && m->T > c->sliding_window ? c->sliding_window : 0;
}

/* The saved tensors of layer l: its own set, or under activation checkpointing the shared work set
 * pointed at layer l's kept input. */
static layer_acts *acts_for(const st_model *m, layer_acts *la, int l, const model_bufs *b) {
    if (!m->act_ckpt) return &la[l];
    la[m->cfg.n_layer].res_in = la[l].res_in ? la[l].res_in : b->res_w; /* kept_bf16: the widened copy */
    return &la[m->cfg.n_layer];
}

/* kept_bf16: rounds the fp32 layer input in res_w into layer l's kept bf16 copy and res_w to that value (the
 * layer computes from exactly what backward will widen again). */
static void keep_input(const st_model *m, const layer_acts *la, int l, const model_bufs *b) {
    size_t n = (size_t)m->B * m->T * m->cfg.d_model;
    m->be->to_bf16(la[l].res_in_h, b->res_w, n);
    m->be->from_bf16(b->res_w, la[l].res_in_h, n);
}

/* ---- int8 forward matmuls (st_model_set_int8) ---- */

typedef struct {
    size_t off; /* the weight's offset in m->weights */
    int out, in;
    void *packed; /* backend memory: be->w8_bytes(out, in) */
} w8_site;

struct st_w8 {
    int n;
    w8_site site[4 * 1024 + 1];
    void *scratch; /* backend memory: be->w8_scratch_bytes(B * T, widest input) */
    size_t bytes;
    /* With residency hooks that gather packs (residency_int8: the ZeRO-3 teacher): every site's pack in one
     * space of space_bytes, site order (= weight order), each at at[i]; the hooks keep a rank's share of it
     * and gather a group's packs into place. ready: packing is done (the hooks gather packs, not fp32). */
    uint8_t *space;
    size_t space_bytes, at[4 * 1024 + 2];
    int ready;
    int windowed; /* a windowed model: no space; each resident window's p8 holds its group's packs */
};

static void w8_free(st_model *m) {
    if (!m->w8) return;
    if (m->w8->space) m->be->free(m->w8->space);
    else if (!m->w8->windowed)
        for (int i = 0; i < m->w8->n; i++) m->be->free(m->w8->site[i].packed);
    m->be->free(m->w8->scratch);
    free(m->w8);
    m->w8 = NULL;
}

/* y = x @ W^T + beta * y (+ bias) in int8 when W is one of the quantized sites of this shape; 0 otherwise. */
static int w8_mm(const st_model *m, float *y, st_mm_in x, const float *w, const float *bias, int M, int out, int in,
                 float beta) {
    if (!m->w8 || !x.f32) return 0;
    const st_res_window *r = NULL; /* windowed: the window holding w, and the pack window of its group */
    const st_pack_window *pw = NULL;
    for (int k = 0; m->windowed && k < m->n_wwin && !r; k++)
        if (w >= m->wwin[k].p && w < m->wwin[k].p + (m->wwin[k].hi - m->wwin[k].lo)) r = &m->wwin[k];
    size_t off = r ? r->lo + (size_t)(w - r->p) : (size_t)(w - m->weights);
    for (int k = 0; r && k < m->n_pwin && !pw; k++)
        if (off >= m->pwin[k].lo && off < m->pwin[k].hi) pw = &m->pwin[k];
    if (m->windowed && !pw) return 0;
    for (int i = 0; i < m->w8->n; i++) {
        const w8_site *q = &m->w8->site[i];
        if (q->off != off || q->out != out || q->in != in) continue;
        if (m->progress) m->progress(m->residency_ctx);
        const void *packed = pw ? (const void *)(pw->p + (m->w8->at[i] - pw->plo)) : q->packed;
        m->be->matmul_w8a8(y, x.f32, packed, bias, M, out, in, beta, m->w8->scratch);
        return 1;
    }
    return 0;
}

/* The quantized sites of a model: per layer q/k/v, output, up (gate|up), down; then the LM head. Fills
 * offsets and shapes (n of them); returns the count. */
static int w8_sites(const st_model *m, w8_site *s) {
    const st_model_config *c = &m->cfg;
    int n = 0, C = c->d_model, F = c->d_ff, F1 = c->family == ST_FAMILY_GPT2 ? F : 2 * F;
    int A = c->n_head * c->head_dim;
    for (int l = 0; l < c->n_layer; l++) { /* registry offsets: a windowed model's weights need not be resident */
        layer_w w = layer_weights(m, l);
        const int idx[4] = {w.iqkv, w.io, w.i1, w.i2};
        int shape[4][2] = {{qkv_dim(c), C}, {C, A}, {F1, C}, {C, F}};
        for (int k = 0; k < 4; k++) {
            s[n].off = m->params[idx[k]].offset, s[n].out = shape[k][0], s[n].in = shape[k][1];
            n++;
        }
    }
    s[n].off = m->params[head_index(m)].offset, s[n].out = c->vocab, s[n].in = C;
    return n + 1;
}

static int w8_widest(const st_model_config *c) {
    int A = c->n_head * c->head_dim, k = c->d_model > c->d_ff ? c->d_model : c->d_ff;
    return k > A ? k : A;
}

/* Residency hooks that gather packs: one space for every pack, each group's packs made from its gathered
 * fp32 weights (acquire, pack, release: collective, the hooks keep this rank's share of the space). */
static int w8_pack_sharded(st_model *m) {
    struct st_w8 *q = m->w8;
    const st_backend *be = m->be;
    size_t at = 0;
    for (int i = 0; i < q->n; i++) {
        q->at[i] = at;
        at += (be->w8_bytes(q->site[i].out, q->site[i].in) + 63) / 64 * 64;
    }
    q->at[q->n] = q->space_bytes = at;
    q->windowed = m->windowed;
    if (!q->windowed && !(q->space = be->alloc(at ? at : 1))) return -1;
    if (!q->windowed) q->bytes += at;
    for (int i = 0; i < q->n && q->space; i++) q->site[i].packed = q->space + q->at[i];
    int L = m->cfg.n_layer, nb = st_model_base_params(m), e0 = layer_first_param(m, 0);
    for (int g = -1; g <= L; g++) { /* the groups the forward acquires: embeddings, layers, norm + head */
        int first = g < 0 ? 0 : g < L ? layer_first_param(m, g) : final_norm_index(m);
        int last = g < 0 ? e0 : g < L ? layer_first_param(m, g + 1) : nb;
        size_t a = m->params[first].offset, b = m->params[last - 1].offset + m->params[last - 1].numel;
        st_model_acquire(m, first, last);
        const st_res_window *r = m->windowed ? window_at(m->wwin, m->n_wwin, a) : NULL;
        const st_pack_window *pw = NULL;
        for (int k = 0; r && k < m->n_pwin && !pw; k++)
            if (a >= m->pwin[k].lo && a < m->pwin[k].hi) pw = &m->pwin[k];
        for (int i = 0; i < q->n; i++) {
            const w8_site *t = &q->site[i];
            if (t->off < a || t->off >= b) continue;
            if (m->windowed && (!r || !pw)) return -1; /* the hooks gave the group no window or pack bytes */
            void *dst = pw ? (void *)(pw->p + (q->at[i] - pw->plo)) : t->packed;
            be->w8_pack(dst, r ? r->p + (t->off - r->lo) : m->weights + t->off, t->out, t->in);
        }
        st_model_release(m, first, last);
    }
    q->ready = 1;
    return 0;
}

int st_model_int8_packs(const st_model *m, size_t a, size_t b, uint8_t **space, size_t *pa, size_t *pb, size_t *total) {
    const struct st_w8 *q = m->w8;
    if (!q || (!q->space && !q->windowed)) return 0;
    *space = q->space, *total = q->space_bytes, *pa = *pb = 0;
    int first = -1, last = -1;
    for (int i = 0; i < q->n; i++)
        if (q->site[i].off >= a && q->site[i].off < b) {
            if (first < 0) first = i;
            last = i;
        }
    if (first >= 0) *pa = q->at[first], *pb = q->at[last + 1];
    return q->ready ? 2 : 1;
}

int st_model_set_int8(st_model *m, size_t *bytes) {
    const st_backend *be = m->be;
    if (!be->matmul_w8a8 || !be->w8_pack || !be->w8_bytes || !be->w8_scratch_bytes)
        return st_fail(ST_ECONFIG, "int8 matmuls are not available on the %s backend", be->name);
    if (m->precision != ST_PRECISION_FP32 || m->lora || m->prompt || m->qlora || (m->acquire && !m->residency_int8) ||
        (m->windowed && !m->residency_int8) || m->B * m->T <= 0 || !m->weights)
        return st_fail(ST_ECONFIG, "int8 matmuls need an fp32 model with its weights and activations, without "
                                   "adapters or residency hooks other than a sharded frozen model's");
    if (m->cfg.n_layer * 4 + 1 > (int)(sizeof m->w8->site / sizeof m->w8->site[0]))
        return st_fail(ST_ECONFIG, "int8 matmuls: %d layers is more than this build handles", m->cfg.n_layer);
    w8_free(m);
    struct st_w8 *q = calloc(1, sizeof *q);
    if (!q) return st_fail(ST_ENOMEM, "out of memory");
    m->w8 = q;
    q->n = w8_sites(m, q->site);
    size_t sb = be->w8_scratch_bytes(m->B * m->T, w8_widest(&m->cfg));
    q->scratch = be->alloc(sb);
    q->bytes = sb;
    int rc = q->scratch ? 0 : -1;
    if (!rc && m->acquire) rc = w8_pack_sharded(m);
    for (int i = 0; i < q->n && !rc && !q->space && !q->windowed; i++) {
        w8_site *t = &q->site[i];
        size_t nb = be->w8_bytes(t->out, t->in);
        if (!(t->packed = be->alloc(nb))) { rc = -1; break; }
        be->w8_pack(t->packed, m->weights + t->off, t->out, t->in);
        q->bytes += nb;
    }
    if (rc) {
        size_t want = q->bytes;
        w8_free(m);
        return st_fail(ST_ENOMEM, "cannot allocate the int8 weights (%.1f MB so far)", want / 1e6);
    }
    if (bytes) *bytes = q->bytes;
    return 0;
}

int st_model_int8_range(const st_model *m, int k, size_t *lo, size_t *hi) {
    size_t tied = m->cfg.tied_embeddings ? m->params[head_index(m)].offset : (size_t)-1;
    for (int i = 0, n = 0; m->w8 && i < m->w8->n; i++) {
        const w8_site *q = &m->w8->site[i];
        if (q->off == tied) continue;
        if (n++ < k) continue;
        *lo = q->off, *hi = q->off + (size_t)q->out * q->in;
        return 1;
    }
    return 0;
}

int st_model_int8_ranges(const st_model *m, size_t *lo, size_t *hi, int max) {
    int n = 0;
    while (n < max && st_model_int8_range(m, n, &lo[n], &hi[n])) n++;
    return n;
}

size_t st_model_int8_space(const st_model *m, int device, size_t *group_most) {
    size_t (*wb)(int, int) = device ? st_cuda_w8_bytes : st_cpu_w8_bytes, total = 0, most = 0;
    w8_site *s = malloc((size_t)(4 * m->cfg.n_layer + 1) * sizeof *s);
    if (!s) return 0;
    int n = w8_sites(m, s), L = m->cfg.n_layer, nb = st_model_base_params(m), e0 = layer_first_param(m, 0);
    for (int i = 0; i < n; i++) total += (wb(s[i].out, s[i].in) + 63) / 64 * 64;
    for (int g = -1; g <= L; g++) { /* w8_pack_sharded's groups */
        int first = g < 0 ? 0 : g < L ? layer_first_param(m, g) : final_norm_index(m);
        int last = g < 0 ? e0 : g < L ? layer_first_param(m, g + 1) : nb;
        size_t a = m->params[first].offset, b = m->params[last - 1].offset + m->params[last - 1].numel, k = 0;
        for (int i = 0; i < n; i++)
            if (s[i].off >= a && s[i].off < b) k += (wb(s[i].out, s[i].in) + 63) / 64 * 64;
        if (k > most) most = k;
    }
    free(s);
    if (group_most) *group_most = most;
    return total;
}

/* fp32 bytes of a released [out, in] weight, less a page at either end (partial pages stay) */
static size_t w8_freed(int out, int in) {
    size_t b = (size_t)out * in * sizeof(float), edge = 2 * 4096;
    return b > edge ? b - edge : 0;
}

size_t st_model_int8_bytes(const st_model_config *c, int B, int T, int device, size_t *released, size_t *layer_packs,
                           size_t *head_pack) {
    int C = c->d_model, F = c->d_ff, F1 = c->family == ST_FAMILY_GPT2 ? F : 2 * F;
    int A = c->n_head * c->head_dim;
    size_t (*wb)(int, int) = device ? st_cuda_w8_bytes : st_cpu_w8_bytes;
    size_t per = wb(qkv_dim(c), C) + wb(C, A) + wb(F1, C) + wb(C, F), head = wb(c->vocab, C);
    if (released)
        *released = device ? 0 /* one device allocation: nothing is given back */
                           : (size_t)c->n_layer * (w8_freed(qkv_dim(c), C) + w8_freed(C, A) + w8_freed(F1, C) +
                                                   w8_freed(C, F)) + (c->tied_embeddings ? 0 : w8_freed(c->vocab, C));
    if (layer_packs) *layer_packs = per;
    if (head_pack) *head_pack = head;
    return (size_t)c->n_layer * per + head +
           (device ? st_cuda_w8_scratch_bytes : st_cpu_w8_scratch_bytes)(B * T, w8_widest(c));
}

/* y[M, out] = x @ W^T + beta * y (+ bias) for a layer weight W [out, in], in blocks of wblock_rows rows of W
 * (each block's product into wtmp, added into its columns; the bias once at the end, as mm() adds it). */
static void mm_fwd(const st_model *m, const model_bufs *b, float *y, st_mm_in x, const float *w, const float *bias,
                   int M, int out, int in, float beta) {
    if (w8_mm(m, y, x, w, bias, M, out, in, beta)) return;
    if (m->qlora && st_qlora_fused(m)) { /* QLoRA's fused dequantize-matmul (qunit noted the unit) */
        if (m->progress) m->progress(m->residency_ctx);
        if (st_qlora_mm(m, y, x, w, M, out, in, 0, beta)) {
            if (bias) m->be->bias_add(y, bias, M, out); /* after the product, as mm() adds it */
            return;
        }
    }
    int nb = wblock_rows(m, out, in);
    if (nb >= out) {
        mm(m, y, x, weight(m, w), bias, M, out, in, 0, 1, beta);
        return;
    }
    for (int j0 = 0; j0 < out; j0 += nb) {
        int n = out - j0 < nb ? out - j0 : nb;
        mm(m, b->wtmp, x, weight(m, w + (size_t)j0 * in), NULL, M, n, in, 0, 1, 0.0f);
        m->be->copy_cols(y + j0, out, b->wtmp, n, M, n, beta != 0.0f);
    }
    if (bias) m->be->bias_add(y, bias, M, out);
}

/* dx[M, in] = dy[M, out] @ W + beta * dx, in blocks of wblock_rows rows of W (dy's columns packed into wtmp). */
static void mm_dgrad(const st_model *m, const model_bufs *b, float *dx, const float *dy, const float *w, int M,
                     int out, int in, float beta) {
    if (m->qlora && st_qlora_fused(m)) {
        if (m->progress) m->progress(m->residency_ctx);
        if (st_qlora_mm(m, dx, st_mm_f32(dy), w, M, out, in, 1, beta)) return;
    }
    int nb = wblock_rows(m, out, in);
    if (nb >= out) {
        mm(m, dx, st_mm_f32(dy), weight(m, w), NULL, M, in, out, 0, 0, beta);
        return;
    }
    for (int j0 = 0; j0 < out; j0 += nb) {
        int n = out - j0 < nb ? out - j0 : nb;
        m->be->copy_cols(b->wtmp, n, dy + j0, out, M, n, 0);
        mm(m, dx, st_mm_f32(b->wtmp), weight(m, w + (size_t)j0 * in), NULL, M, in, n, 0, 0, j0 ? 1.0f : beta);
    }
}

/* The MLP over rows [r0, r0 + n) (the whole batch, or one block: mlp_rows): h1, h2 (and under bf16 their
 * fp32 working copies h1_w, dh2) hold the block's rows from their start; ln2 (fp32, the adapters' input),
 * resmid and res_out the batch's. res_out NULL: a recomputation for backward (stops before the down
 * projection). Under mlp_split gate and up run apart, each through dh1 (free in forward and before a block's
 * backward) into its columns of h1. */
static void mlp_forward(st_model *m, int l, const layer_acts *a, const model_bufs *b, const layer_w *w, int r0, int n,
                        const float *ln2, float *res_out) {
    const st_backend *be = m->be;
    const st_model_config *c = &m->cfg;
    int C = c->d_model, F = c->d_ff, F1 = c->family == ST_FAMILY_GPT2 ? F : 2 * F;
    size_t o = (size_t)r0 * C;
    float *h1 = a->h1 ? a->h1 : b->h1_w, *h2 = a->h2 ? a->h2 : b->dh2;
    st_mm_in x = a->ln2_h ? st_mm_bf16(a->ln2_h + o) : st_mm_f32(ln2 + o);
    if (m->lora && n < m->B * m->T) st_lora_set_rows(m, (size_t)r0, (size_t)n);
    if (mlp_split(m)) {
        for (int h = 0; h < 2; h++) { /* gate, then up: [n, F] each into their half of h1's rows; each weight
                                        * by its own offset (QLoRA: both at the one-matrix scratch) */
            qunit(m, w->i1 + h);
            mm_fwd(m, b, b->dh1, x, wptr(m, w->i1 + h), NULL, n, F, C, 0.0f);
            be->copy_cols(h1 + (size_t)h * F, F1, b->dh1, F, n, F, 0);
        }
    } else {
        qunit(m, w->i1);
        mm_fwd(m, b, h1, x, w->w1, w->b1, n, F1, C, 0.0f);
    }
    if (m->lora) st_lora_forward(m, l, ST_LORA_SITE_UP, ln2 + o, h1, F1);
    save(m, a->h1_h, h1, (size_t)n * F1, 1);
    if (c->family == ST_FAMILY_GPT2)
        be->gelu_fwd(h2, h1, (size_t)n * F);
    else
        be->swiglu_fwd(h2, h1, n, F);
    save(m, a->h2_h, h2, (size_t)n * F, m->lora != NULL);
    if (!res_out) return;
    be->copy(res_out + o, a->resmid + o, (size_t)n * C * sizeof(float));
    qunit(m, w->i2);
    mm_fwd(m, b, res_out + o, saved(h2, a->h2_h), w->w2, w->b2, n, C, F, 1.0f);
    if (m->lora) st_lora_forward(m, l, ST_LORA_SITE_DOWN, h2, res_out + o, C);
}

/* One layer forward (see the top of this file). Under bf16 the fp32 results land in working buffers
 * (norm outputs in dln, h2 in dh2: both free during forward, and between two layers' backward) and are
 * saved as bf16. res_out NULL: a recomputation for backward, which needs everything but the output. */
static void layer_forward(st_model *m, int l, const layer_acts *a, const model_bufs *b, float *res_out) {
    const st_backend *be = m->be;
    const st_model_config *c = &m->cfg;
    layer_w w = layer_weights(m, l);
    int N = m->B * m->T, C = c->d_model, Q = qkv_dim(c), A = c->n_head * c->head_dim;
    float *ln1 = a->ln1 ? a->ln1 : b->dln, *qkv = a->qkv ? a->qkv : b->qkv_w;
    float *atty = a->atty ? a->atty : b->atty_w, *ln2 = a->ln2 ? a->ln2 : b->dln;
    /* LoRA under bf16: the adapters (fp32) read the bf16-rounded inputs the base matmuls read, the values
     * backward widens again for their A gradients */
    const int lora_in = m->lora != NULL;
    norm_fwd(m, ln1, a->ln1_mean, a->ln1_rstd, a->res_in, w.n1w, w.n1b, N);
    save(m, a->ln1_h, ln1, (size_t)N * C, lora_in);
    qunit(m, w.iqkv);
    mm_fwd(m, b, qkv, saved(ln1, a->ln1_h), w.wqkv, w.bqkv, N, Q, C, 0.0f);
    if (m->lora) st_lora_forward(m, l, ST_LORA_SITE_QKV, ln1, qkv, Q);
    if (c->qk_norm)
        be->head_rmsnorm_fwd(qkv, a->qk_x, a->qk_rstd, w.qn, w.kn, N, c->n_head, c->n_kv_head, c->head_dim, c->norm_eps);
    if (c->family == ST_FAMILY_LLAMA && m->doc_pos_on)
        be->rope_pos_fwd(qkv, m->rope_cos, m->rope_sin, m->doc_pos, m->B, m->T, c->n_head, c->n_kv_head, c->head_dim);
    else if (c->family == ST_FAMILY_LLAMA)
        be->rope_fwd(qkv, m->rope_cos, m->rope_sin, m->B, m->T, c->n_head, c->n_kv_head, c->head_dim);
    if (m->prompt) st_prefix_layer_forward(m, l, qkv); /* prefix tuning: layer l's keys/values */
    save(m, a->qkv_h, qkv, (size_t)N * Q, 1);
    int win = layer_window(m, l);
    if (m->doc_pos_on)
        be->attention_docs_fwd(atty, a->lse, qkv, m->doc_pos, m->B, m->T, c->n_head, c->n_kv_head, c->head_dim, win);
    else if (win)
        be->attention_window_fwd(atty, a->lse, qkv, m->B, m->T, c->n_head, c->n_kv_head, c->head_dim, win);
    else
        be->attention_fwd(atty, a->lse, qkv, m->B, m->T, c->n_head, c->n_kv_head, c->head_dim);
    save(m, a->atty_h, atty, (size_t)N * A, lora_in);
    /* residual add fused into the projection: resmid = res_in; resmid += atty @ Wo^T (+ b) */
    be->copy(a->resmid, a->res_in, (size_t)N * C * sizeof(float));
    qunit(m, w.io);
    mm_fwd(m, b, a->resmid, saved(atty, a->atty_h), w.wo, w.bo, N, C, A, 1.0f);
    if (m->lora) st_lora_forward(m, l, ST_LORA_SITE_O, atty, a->resmid, C);
    norm_fwd(m, ln2, a->ln2_mean, a->ln2_rstd, a->resmid, w.n2w, w.n2b, N);
    save(m, a->ln2_h, ln2, (size_t)N * C, lora_in);
    int RM = mlp_rows(m);
    if (RM < N && !res_out) return; /* blocked: layer_backward recomputes the MLP block by block */
    for (int r0 = 0; r0 < N; r0 += RM) mlp_forward(m, l, a, b, &w, r0, N - r0 < RM ? N - r0 : RM, ln2, res_out);
    if (m->lora) st_lora_set_rows(m, 0, 0);
}

/* Chunked LM head + loss; with `train`, also dlnf and the head weight gradient. The loss total stays on
 * the backend until the last chunk (one host wait per forward). Under bf16 the loss kernel writes dlogits
 * as bf16 (rounded once), the operand of both gradient matmuls. */
/* Rows [j0, j0 + n) of the head's vocabulary of a [rows, V] matrix <-> a packed [rows, n] one (elem bytes). */
static void vblock_copy(const st_model *m, void *packed, const void *full, int rows, int V, int j0, int n, size_t elem,
                        int to_full) {
    for (int i = 0; i < rows; i++) {
        char *pk = (char *)packed + (size_t)i * n * elem, *fl = (char *)full + ((size_t)i * V + j0) * elem;
        if (to_full) m->be->copy(fl, pk, (size_t)n * elem);
        else m->be->copy(pk, fl, (size_t)n * elem);
    }
}

/* Rows [j0, j0 + n) of the head's weights: w + j0 C, or (head_by_rows) the block made resident by the
 * head_rows hook, which may start gathering the block at `next` (next_n rows; -1: none follows). *tmp: the
 * block scratch when the layout has none (b->head_tmp). NULL when the block could not be gathered (the
 * hook's failure is the step's). */
static const float *head_block(st_model *m, const model_bufs *b, const float *w, int j0, int n, int next, int rows,
                               float **tmp) {
    int C = m->cfg.d_model, V = m->cfg.vocab, VB = head_vblock(m);
    *tmp = b->head_tmp;
    if (!head_by_rows(m)) return w + (size_t)j0 * C;
    int next_n = next < 0 ? 0 : V - next < VB ? V - next : VB;
    float *t = m->head_rows(m->residency_ctx, j0, n, next, next_n, b->head_tmp || n >= V ? 0 : rows);
    if (!*tmp) *tmp = t;
    size_t at = m->params[head_index(m)].offset + (size_t)j0 * C;
    const st_res_window *r = window_at(m->wwin, m->n_wwin, at);
    return r && r->hi >= at + (size_t)n * C ? r->p + (at - r->lo) : NULL;
}

/* The block after [j0, j0 + VB): the next one, else `after` (0: the head is read again from its first block,
 * -1: not any more). */
static int head_next(const st_model *m, int j0, int after) {
    int VB = head_vblock(m);
    return j0 + VB < m->cfg.vocab ? j0 + VB : after;
}

/* logits[rows, V] = x @ W^T, in vocabulary blocks when head_vblock says so (after: see head_next). */
static void head_logits(st_model *m, const model_bufs *b, float *logits, const float *x, const float *w, int rows,
                        int after) {
    int C = m->cfg.d_model, V = m->cfg.vocab, VB = head_vblock(m);
    if (!head_by_rows(m) && w8_mm(m, logits, st_mm_f32(x), w, NULL, rows, V, C, 0.0f)) return;
    float *tmp;
    if (VB >= V) {
        const float *wb = head_block(m, b, w, 0, V, after, rows, &tmp);
        if (wb) mm(m, logits, st_mm_f32(x), weight(m, wb), NULL, rows, V, C, 0, 1, 0.0f);
        return;
    }
    for (int j0 = 0; j0 < V; j0 += VB) {
        int n = V - j0 < VB ? V - j0 : VB;
        const float *wb = head_block(m, b, w, j0, n, head_next(m, j0, after), rows, &tmp);
        if (!wb || !tmp) continue;
        mm(m, tmp, st_mm_f32(x), weight(m, wb), NULL, rows, n, C, 0, 1, 0.0f);
        m->be->copy_cols(logits + j0, V, tmp, n, rows, n, 0); /* one launch on a device */
    }
}

/* dlnf[rows, C] = dlogits @ W and (gw) dW += dlogits^T @ x, in vocabulary blocks when head_vblock says so
 * (dlnf then sums the blocks' products in block order; after: see head_next). */
static void head_backward(st_model *m, const model_bufs *b, float *dlnf, const uint16_t *dl16, const float *x,
                          const float *w, float *gw, int rows, int after) {
    int C = m->cfg.d_model, V = m->cfg.vocab, VB = head_vblock(m);
    float *tmp;
    if (VB >= V) {
        st_mm_in dlogits = dl16 ? st_mm_bf16(dl16) : st_mm_f32(b->logits);
        const float *wb = head_block(m, b, w, 0, V, after, rows, &tmp);
        if (wb) mm(m, dlnf, dlogits, weight(m, wb), NULL, rows, C, V, 0, 0, 0.0f);
        if (gw) mm(m, gw, dlogits, st_mm_f32(x), NULL, V, C, rows, 1, 0, grad_beta(m, head_index(m), 1));
        return;
    }
    float gbeta = gw ? grad_beta(m, head_index(m), 1) : 1.0f; /* each block writes its own rows once */
    for (int j0 = 0; j0 < V; j0 += VB) { /* dlogits: bf16 (dl16) under bf16, else fp32 in b->logits */
        int n = V - j0 < VB ? V - j0 : VB;
        const float *wb = head_block(m, b, w, j0, n, head_next(m, j0, after), rows, &tmp);
        if (!wb || !tmp) continue;
        st_mm_in blk;
        if (!dl16) {
            m->be->copy_cols(tmp, n, b->logits + j0, V, rows, n, 0);
            blk = st_mm_f32(tmp);
        } else {
            uint16_t *b16 = (uint16_t *)tmp;
            if (V % 2 == 0 && n % 2 == 0) /* bf16 pairs moved as floats (bits kept): one launch on a device */
                m->be->copy_cols((float *)b16, n / 2, (const float *)(dl16 + j0), V / 2, rows, n / 2, 0);
            else
                vblock_copy(m, b16, dl16, rows, V, j0, n, sizeof(uint16_t), 0);
            blk = st_mm_bf16(b16);
        }
        mm(m, dlnf, blk, weight(m, wb), NULL, rows, C, n, 0, 0, j0 ? 1.0f : 0.0f);
        if (gw) mm(m, gw + (size_t)j0 * C, blk, st_mm_f32(x), NULL, n, C, rows, 1, 0, gbeta);
    }
}

/* Whether the head's loss runs blocks outermost (head_forward_outer): a head gathered by vocabulary blocks
 * (head_by_rows) in several blocks and several row chunks, where the row-chunk loop would gather every block
 * again for every chunk (Llama-3-8B at 2048 tokens: 16 chunks). SHARDTUNE_HEAD_OUTER=0 keeps the row-chunk loop
 * (A/B); =1 runs blocks outermost on any head with several blocks and chunks (tests: the CPU ranks' reference for
 * the device's, bit for bit). A distillation student (head_loss, head_loss_rows: the teacher's logits per row
 * chunk, whole rows), captured logits (whole rows) and an int8 head (w8_mm) keep the row-chunk loop. */
static int head_outer(const st_model *m) {
    const char *e = getenv("SHARDTUNE_HEAD_OUTER");
    if (m->head_loss || m->head_loss_rows || m->capture_logits || m->w8 || (e && !strcmp(e, "0"))) return 0;
    if (head_vblock(m) >= m->cfg.vocab || head_chunk_rows(m) >= m->B * m->T) return 0;
    return head_by_rows(m) || (e && !strcmp(e, "1"));
}

/* The head's loss by vocabulary blocks, blocks outermost (head_outer). Pass 1 runs each block (gathered once) over
 * every row chunk: its logits = x @ W_block^T folded into each row's statistics (xent_block_stats), then each
 * row's loss (xent_block_loss). With `train`, pass 2 gathers each block once more and recomputes its logits per
 * row chunk: dlogits from the final statistics (xent_block_grad; bf16: rounded once, as cross_entropy_acc),
 * dlnf += dlogits @ W_block (the blocks summed in order, as head_backward) and dW_block += dlogits^T @ x. Two
 * gathers of the head per micro-batch instead of two per row chunk, for one more head matmul
 * (st_model_step_flops). b->logits holds one block's [rows, n] logits, b->dlogits_h its bf16 dlogits. */
static double head_forward_outer(st_model *m, const model_bufs *b, int train) {
    const st_backend *be = m->be;
    int N = m->B * m->T, C = m->cfg.d_model, V = m->cfg.vocab, R = head_chunk_rows(m), VB = head_vblock(m);
    float *gw, *tmp;
    const float *w = head_weight(m, &gw);
    uint16_t *dl16 = m->precision == ST_PRECISION_BF16 ? b->dlogits_h : NULL;
    be->memset0(b->loss_acc, sizeof(double));
    for (int pass = 0; pass <= (train != 0); pass++) {
        float gbeta = pass && gw ? grad_beta(m, head_index(m), 1) : 1.0f; /* each row chunk adds to its block */
        int after = pass || !train ? -1 : 0; /* pass 2 reads the head again from its first block */
        for (int j0 = 0; j0 < V; j0 += VB) {
            int n = V - j0 < VB ? V - j0 : VB;
            const float *wb = head_block(m, b, w, j0, n, head_next(m, j0, after), 0, &tmp);
            if (!wb) continue; /* the hook's failure is the step's */
            for (int r0 = 0; r0 < N; r0 += R) {
                int rows = N - r0 < R ? N - r0 : R;
                const float *x = b->lnf + (size_t)r0 * C;
                float *st = b->head_stats + 3 * (size_t)r0;
                const int32_t *tg = b->targets + r0;
                mm(m, b->logits, st_mm_f32(x), weight(m, wb), NULL, rows, n, C, 0, 1, 0.0f);
                if (!pass) {
                    be->xent_block_stats(b->logits, st, tg, b->weight + r0, rows, n, j0);
                    continue;
                }
                be->xent_block_grad(b->logits, dl16, st, tg, b->weight + r0, rows, n, j0);
                st_mm_in d = dl16 ? st_mm_bf16(dl16) : st_mm_f32(b->logits);
                mm(m, b->dlnf + (size_t)r0 * C, d, weight(m, wb), NULL, rows, C, n, 0, 0, j0 ? 1.0f : 0.0f);
                if (gw) mm(m, gw + (size_t)j0 * C, d, st_mm_f32(x), NULL, n, C, rows, 1, 0, r0 ? 1.0f : gbeta);
            }
        }
        for (int r0 = 0; !pass && r0 < N; r0 += R) /* per chunk: the device's loss scratch holds a chunk's rows */
            be->xent_block_loss(b->head_stats + 3 * (size_t)r0, b->loss + r0, b->targets + r0, b->weight + r0,
                                N - r0 < R ? N - r0 : R, V, b->loss_acc);
    }
    if (head_by_rows(m)) m->head_rows(m->residency_ctx, -1, 0, -1, 0, 0);
    double total = 0.0;
    be->copy_to_host(&total, b->loss_acc, sizeof total);
    return total;
}

/* Chunked LM head + loss; with `train`, also dlnf and the head weight gradient. The loss total stays on
 * the backend until the last chunk (one host wait per forward). Under bf16 the loss kernel writes dlogits
 * as bf16 (rounded once), the operand of both gradient matmuls. A head gathered by blocks (head_by_rows) is
 * released at the end; in several blocks and chunks it runs blocks outermost instead (head_outer). */
static double head_forward(st_model *m, const model_bufs *b, int train) {
    if (head_outer(m)) return head_forward_outer(m, b, train);
    const st_backend *be = m->be;
    int N = m->B * m->T, C = m->cfg.d_model, V = m->cfg.vocab, R = head_chunk_rows(m);
    float *gw;
    const float *w = head_weight(m, &gw);
    uint16_t *dl16 = train && m->precision == ST_PRECISION_BF16 ? b->dlogits_h : NULL;
    be->memset0(b->loss_acc, sizeof(double));
    for (int r0 = 0; r0 < N; r0 += R) {
        int rows = N - r0 < R ? N - r0 : R;
        const float *x = b->lnf + (size_t)r0 * C;
        int more = r0 + rows < N ? 0 : -1; /* another row chunk reads the head again from its first block */
        head_logits(m, b, b->logits, x, w, rows, train ? 0 : more);
        if (m->capture_logits)
            be->copy_to_host(m->capture_logits + (size_t)r0 * V, b->logits, (size_t)rows * V * sizeof(float));
        if (m->head_loss)
            m->head_loss(m->head_loss_ctx, b->logits, dl16, b->loss + r0, b->targets + r0, b->weight + r0, r0, rows, V,
                         b->loss_acc);
        else
            be->cross_entropy_acc(b->logits, dl16, b->loss + r0, b->targets + r0, b->weight + r0, rows, V, b->loss_acc);
        if (!train) continue;
        head_backward(m, b, b->dlnf + (size_t)r0 * C, dl16, x, w, gw, rows, more);
    }
    if (head_by_rows(m)) m->head_rows(m->residency_ctx, -1, 0, -1, 0, 0);
    double total = 0.0;
    be->copy_to_host(&total, b->loss_acc, sizeof total);
    return total;
}

static void bind(st_model *m, layer_acts *la, model_bufs *mb) { layout(m, m->act_arena, la, mb); }

double st_model_forward(st_model *m, const int32_t *inputs, const int32_t *targets, const float *weight,
                        int train) {
    const st_backend *be = m->be;
    const st_model_config *c = &m->cfg;
    int N = m->B * m->T, L = c->n_layer;
    layer_acts *la = m->layer_acts;
    model_bufs b;
    bind(m, la, &b);
    if (m->weights_bf16 && m->weights_bf16_stale && !m->acquire) /* the bf16 copy every matmul reads (ZeRO-3:
                                                                      made per layer by the acquire hook) */
        refresh_bf16(m);
    if (m->lora) st_lora_set_training(m, train); /* LoRA dropout: training forwards only */
    if (m->prompt) st_prompt_widen(m, inputs, targets, weight, &inputs, &targets, &weight); /* [B, V + T] */
    be->copy_to_device(b.tokens, inputs, (size_t)N * sizeof(int32_t));
    be->copy_to_device(b.targets, targets, (size_t)N * sizeof(int32_t));
    be->copy_to_device(b.weight, weight, (size_t)N * sizeof(float));
    int e0 = layer_first_param(m, 0), fn = final_norm_index(m), tied = c->tied_embeddings;
    int hend = head_by_rows(m) ? head_index(m) : st_model_base_params(m); /* the final norm's group */
    m->in_compute = 1;
    const int k16 = kept_bf16(m);
    float *x0 = k16 ? b.res_w : la[0].res_in; /* the embedding's output: layer 0's input */
    /* ZeRO-3, an untied Llama-family embedding: only the batch's rows travel (embed_rows), not the table */
    int gpt2 = c->family == ST_FAMILY_GPT2;
    int rows = m->embed_rows && !tied && e0 == 1 && !gpt2 && m->params[0].offset >= m->n_w16 &&
               m->embed_rows(m->residency_ctx, inputs, N, x0);
    if (!rows) st_model_acquire(m, 0, e0); /* a tied wte stays until the head has run */
    const float *wpe = gpt2 ? wptr(m, 1) : NULL; /* resident now (windowed: found) */
    if (L > 0) layer_prefetch(m, 0);
    if (rows) { /* the batch's rows are in x0 already */
    } else if (wpe && m->doc_pos_on)
        be->embedding_pos_fwd(x0, b.tokens, wptr(m, 0), wpe, m->doc_pos, m->B, m->T, c->d_model);
    else if (m->params[0].offset < m->n_w16 || st_model_fp32_dropped(m, 0)) /* the embedding in bf16 only (Llama
                                                                               family): widened row by row */
        for (int i = 0; i < N; i++)
            be->from_bf16(x0 + (size_t)i * c->d_model, m->weights_bf16 + m->params[0].offset +
                          (size_t)inputs[i] * c->d_model, (size_t)c->d_model);
    else
        be->embedding_fwd(x0, b.tokens, wptr(m, 0), wpe, m->B, m->T, c->d_model);
    /* the virtual rows (an encoder's tensors acquired together); a prefix table without an encoder is read
     * by every layer: it stays acquired until the last one */
    int pp = st_prompt_param(m), pn = st_prompt_param_count(m);
    int hold = st_prompt_is_prefix(m) && !st_prompt_has_encoder(m);
    if (m->prompt) {
        st_model_acquire(m, pp, pp + pn);
        st_prompt_forward(m, x0);
        if (!hold) st_model_release(m, pp, pp + pn);
    }
    if (!tied && !rows) st_model_release(m, 0, e0);
    if (k16 && L > 0) keep_input(m, la, 0, &b);
    for (int l = 0; l < L; l++) {
        layer_acquire(m, l, layer_first_param(m, l), layer_first_param(m, l + 1));
        if (l + 1 < L) /* the next layer's gather travels while this one computes */
            layer_prefetch(m, l + 1);
        else
            st_model_prefetch(m, fn, hend);
        /* kept_bf16: the output overwrites res_w (the layer reads its input only before resmid exists) */
        layer_forward(m, l, acts_for(m, la, l, &b), &b, l + 1 < L ? (k16 ? b.res_w : la[l + 1].res_in) : b.res_out);
        if (k16 && l + 1 < L) keep_input(m, la, l + 1, &b);
        layer_release(m, l, layer_first_param(m, l), layer_first_param(m, l + 1));
    }
    if (hold) st_model_release(m, pp, pp + pn);
    st_model_acquire(m, fn, hend);
    const float *nfb = c->family == ST_FAMILY_GPT2 ? wptr(m, fn + 1) : NULL;
    norm_fwd(m, b.lnf, b.lnf_mean, b.lnf_rstd, b.res_out, wptr(m, fn), nfb, N);
    if (hend < st_model_base_params(m)) st_model_release(m, fn, hend); /* the head comes by blocks */
    double loss = m->hidden_only ? 0.0 : head_forward(m, &b, train);
    if (hend == st_model_base_params(m)) st_model_release(m, fn, hend);
    if (tied) st_model_release(m, 0, e0);
    m->in_compute = 0;
    if (m->hidden_only) return 0.0;
    be->copy_to_host(m->loss_per_pos, b.loss, (size_t)N * sizeof(float));
    if (m->prompt) st_prompt_real_rows(m, m->loss_per_pos); /* [B, T] as the caller's batch */
    return loss;
}

/* Weight gradient of y = x @ W^T: dW[out,in] += dy^T @ x (W: parameters [idx, idx + n), see grad_beta). */
static void linear_wgrad(const st_model *m, float *dw, const float *dy, st_mm_in x, int N, int out, int in, int idx,
                         int n) {
    if (dw) mm(m, dw, st_mm_f32(dy), x, NULL, out, in, N, 1, 0, grad_beta(m, idx, n));
}

/* Parameters written by the fused q/k/v (Llama: three adjacent) and gate/up (two) weight gradients. */
static int qkv_params(const st_model *m) { return m->cfg.family == ST_FAMILY_GPT2 ? 1 : 3; }
static int up_params(const st_model *m) { return m->cfg.family == ST_FAMILY_GPT2 ? 1 : 2; }

/* Input gradient of y = x @ W^T: dx[N,in] = dy @ W. */
static void linear_dgrad(const st_model *m, const model_bufs *b, float *dx, const float *dy, const float *w, int N,
                         int out, int in) {
    mm_dgrad(m, b, dx, dy, w, N, out, in, 0.0f);
}

/* The MLP's backward over rows [r0, r0 + n) (see mlp_forward): dres's rows in, dln's rows out (the base
 * projection's and the adapters' input gradients); weight and adapter gradients accumulate. Under mlp_split
 * dln = dh1[:, :F] @ Wgate + dh1[:, F:] @ Wup, each half copied out into h1_w (free once swiglu_bwd ran). */
static void mlp_backward(st_model *m, int l, const layer_acts *a, const model_bufs *b, const layer_w *w, int r0, int n,
                         const float *ln2) {
    const st_backend *be = m->be;
    const st_model_config *c = &m->cfg;
    int C = c->d_model, F = c->d_ff, F1 = c->family == ST_FAMILY_GPT2 ? F : 2 * F;
    size_t o = (size_t)r0 * C;
    const float *dres = b->dres + o;
    float *dln = b->dln + o;
    st_mm_in x = a->ln2_h ? st_mm_bf16(a->ln2_h + o) : st_mm_f32(a->ln2 + o);
    if (m->lora && n < m->B * m->T) st_lora_set_rows(m, (size_t)r0, (size_t)n);
    qunit(m, w->i2);
    linear_dgrad(m, b, b->dh2, dres, w->w2, n, C, F);
    if (m->lora) st_lora_backward(m, l, ST_LORA_SITE_DOWN, restore(m, a->h2, a->h2_h, b->h1_w, (size_t)n * F), dres, C, b->dh2);
    linear_wgrad(m, w->gw2, dres, saved(a->h2, a->h2_h), n, C, F, w->i2, 1);
    const float *h1 = restore(m, a->h1, a->h1_h, b->h1_w, (size_t)n * F1);
    if (c->family == ST_FAMILY_GPT2)
        be->gelu_bwd(b->dh1, b->dh2, h1, (size_t)n * F);
    else
        be->swiglu_bwd(b->dh1, b->dh2, h1, n, F);
    if (w->gb1) be->bias_bwd(w->gb1, b->dh1, n, F1);
    if (mlp_split(m)) {
        float *half = b->h1_w ? b->h1_w : b->dh2; /* fp32 (QLoRA): dh2 is free once swiglu_bwd ran */
        for (int h = 0; h < 2; h++) {
            be->copy_cols(half, F, b->dh1 + (size_t)h * F, F1, n, F, 0);
            qunit(m, w->i1 + h);
            mm_dgrad(m, b, dln, half, wptr(m, w->i1 + h), n, F, C, h ? 1.0f : 0.0f);
        }
    } else {
        qunit(m, w->i1);
        linear_dgrad(m, b, dln, b->dh1, w->w1, n, F1, C);
    }
    if (m->lora) st_lora_backward(m, l, ST_LORA_SITE_UP, ln2 ? ln2 + o : NULL, b->dh1, F1, dln);
    linear_wgrad(m, w->gw1, b->dh1, x, n, F1, C, w->i1, up_params(m));
}

static void layer_backward(st_model *m, int l, const layer_acts *a, const model_bufs *b) {
    const st_backend *be = m->be;
    const st_model_config *c = &m->cfg;
    layer_w w = layer_weights(m, l);
    int N = m->B * m->T, C = c->d_model, Q = qkv_dim(c), A = c->n_head * c->head_dim;
    float *dres = b->dres;
    /* MLP branch: dres is the gradient of res_out */
    if (w.gb2) be->bias_bwd(w.gb2, dres, N, C);
    /* LoRA under bf16: each adapter input widened from its bf16 copy into a buffer free at that point
     * (h1_w before h1 is restored, dlnf once the final norm's backward has run, atty_w) */
    const float *ln2 = m->lora ? restore(m, a->ln2, a->ln2_h, b->dlnf, (size_t)N * C) : a->ln2;
    int RM = mlp_rows(m);
    for (int r0 = 0; r0 < N; r0 += RM) {
        int n = N - r0 < RM ? N - r0 : RM;
        if (RM < N) mlp_forward(m, l, a, b, &w, r0, n, ln2, NULL); /* the block's recomputation */
        mlp_backward(m, l, a, b, &w, r0, n, ln2);
    }
    if (m->lora) st_lora_set_rows(m, 0, 0);
    norm_bwd(m, dres, w.gn2w, w.gn2b, b->dln, a->resmid, w.n2w, a->ln2_mean, a->ln2_rstd, N, b->dh2);
    /* attention branch: dres is now the gradient of resmid */
    if (w.gbo) be->bias_bwd(w.gbo, dres, N, C);
    qunit(m, w.io);
    linear_dgrad(m, b, b->datt, dres, w.wo, N, C, A);
    const float *atty = restore(m, a->atty, a->atty_h, b->atty_w, (size_t)N * A);
    if (m->lora) st_lora_backward(m, l, ST_LORA_SITE_O, atty, dres, C, b->datt);
    linear_wgrad(m, w.gwo, dres, saved(a->atty, a->atty_h), N, C, A, w.io, 1);
    const float *qkv = restore(m, a->qkv, a->qkv_h, b->qkv_w, (size_t)N * Q);
    int win = layer_window(m, l);
    if (m->doc_pos_on)
        be->attention_docs_bwd(b->dqkv, b->datt, qkv, atty, a->lse, m->doc_pos, m->B, m->T, c->n_head, c->n_kv_head,
                               c->head_dim, win);
    else if (win)
        be->attention_window_bwd(b->dqkv, b->datt, qkv, atty, a->lse, m->B, m->T, c->n_head, c->n_kv_head,
                                 c->head_dim, win);
    else
        be->attention_bwd(b->dqkv, b->datt, qkv, atty, a->lse, m->B, m->T, c->n_head, c->n_kv_head, c->head_dim);
    if (m->prompt) st_prefix_layer_backward(m, l, b->dqkv); /* prefix tuning: the prefix's gradient */
    if (c->family == ST_FAMILY_LLAMA && m->doc_pos_on)
        be->rope_pos_bwd(b->dqkv, m->rope_cos, m->rope_sin, m->doc_pos, m->B, m->T, c->n_head, c->n_kv_head,
                         c->head_dim);
    else if (c->family == ST_FAMILY_LLAMA)
        be->rope_bwd(b->dqkv, m->rope_cos, m->rope_sin, m->B, m->T, c->n_head, c->n_kv_head, c->head_dim);
    if (c->qk_norm)
        be->head_rmsnorm_bwd(b->dqkv, w.gqn, w.gkn, a->qk_x, a->qk_rstd, w.qn, w.kn, N, c->n_head, c->n_kv_head,
                             c->head_dim);
    if (w.gbqkv) be->bias_bwd(w.gbqkv, b->dqkv, N, Q);
    qunit(m, w.iqkv);
    linear_dgrad(m, b, b->dln, b->dqkv, w.wqkv, N, Q, C);
    if (m->lora) st_lora_backward(m, l, ST_LORA_SITE_QKV, restore(m, a->ln1, a->ln1_h, b->dlnf, (size_t)N * C), b->dqkv, Q, b->dln);
    linear_wgrad(m, w.gwqkv, b->dqkv, saved(a->ln1, a->ln1_h), N, Q, C, w.iqkv, qkv_params(m));
    norm_bwd(m, dres, w.gn1w, w.gn1b, b->dln, a->res_in, w.n1w, a->ln1_mean, a->ln1_rstd, N, b->norm_scratch);
}

/* Reports the gradient range of parameters [first, last) to the grad_ready hook (if any trains). */
static void report_ready(const st_model *m, int first, int last) {
    if (!m->grad_ready) return;
    size_t lo = (size_t)-1, hi = 0;
    for (int i = first; i < last; i++) {
        const st_param *p = &m->params[i];
        if (p->grad_offset < 0) continue;
        if ((size_t)p->grad_offset < lo) lo = (size_t)p->grad_offset;
        if ((size_t)p->grad_offset + p->numel > hi) hi = (size_t)p->grad_offset + p->numel;
    }
    if (hi > lo) m->grad_ready(m->grad_ready_ctx, lo, hi);
}

void st_model_backward(st_model *m) {
    const st_backend *be = m->be;
    const st_model_config *c = &m->cfg;
    int N = m->B * m->T, L = c->n_layer;
    if (!m->grads) return;
    layer_acts *la = m->layer_acts;
    model_bufs b;
    bind(m, la, &b);
    m->in_compute = 1;
    int fn = final_norm_index(m);
    be->memset0(b.dres, (size_t)N * c->d_model * sizeof(float));
    st_model_acquire(m, fn, fn + 1 + (c->family == ST_FAMILY_GPT2)); /* the final norm */
    if (L - 1 >= m->lowest_trained_layer) layer_prefetch(m, L - 1);
    norm_bwd(m, b.dres, gptr(m, fn), c->family == ST_FAMILY_GPT2 ? gptr(m, fn + 1) : NULL, b.dlnf, b.res_out,
             wptr(m, fn), b.lnf_mean, b.lnf_rstd, N, b.norm_scratch);
    st_model_release(m, fn, fn + 1 + (c->family == ST_FAMILY_GPT2));
    report_ready(m, fn, st_model_base_params(m)); /* final norm and an untied head (its gradient came in forward) */
    /* activation checkpointing recomputes each layer's forward, which reads a prefix table without encoder:
     * acquired over the layers as in forward (ZeRO-3 gathers it) */
    int pp = st_prompt_param(m), pn = st_prompt_param_count(m);
    int hold = m->act_ckpt && st_prompt_is_prefix(m) && !st_prompt_has_encoder(m) && L - 1 >= m->lowest_trained_layer;
    if (hold) st_model_acquire(m, pp, pp + pn);
    for (int l = L - 1; l >= m->lowest_trained_layer; l--) {
        int p0 = layer_first_param(m, l), p1 = layer_first_param(m, l + 1);
        const layer_acts *a = acts_for(m, la, l, &b);
        if (la[l].res_in_h) be->from_bf16(b.res_w, la[l].res_in_h, (size_t)N * c->d_model); /* kept_bf16 */
        layer_acquire(m, l, p0, p1);
        if (l - 1 >= m->lowest_trained_layer) layer_prefetch(m, l - 1);
        if (m->act_ckpt) layer_forward(m, l, a, &b, NULL); /* the same calls on the same input: same values */
        layer_backward(m, l, a, &b);
        layer_release(m, l, p0, p1);
        report_ready(m, p0, p1);
        int lf, ll;
        st_lora_layer_params(m, l, &lf, &ll);
        report_ready(m, lf, ll); /* the layer's adapters (appended after the base registry) */
    }
    if (hold) st_model_release(m, pp, pp + pn);
    m->in_compute = 0;
    int gpt2 = c->family == ST_FAMILY_GPT2;
    if (m->embed_trained) { /* wte and wpe train together (see param_selected) */
        be->embedding_bwd(gptr(m, 0), gpt2 && !m->doc_pos_on ? gptr(m, 1) : NULL, b.dres, b.tokens, m->B, m->T,
                          c->d_model);
        if (gpt2 && m->doc_pos_on) be->embedding_pos_bwd(gptr(m, 1), b.dres, m->doc_pos, m->B, m->T, c->d_model);
    }
    report_ready(m, 0, layer_first_param(m, 0));
    if (m->prompt) { /* an encoder's backward reads its tensors */
        int enc = st_prompt_has_encoder(m);
        if (enc) st_model_acquire(m, pp, pp + pn);
        st_prompt_backward(m, b.dres);
        if (enc) st_model_release(m, pp, pp + pn);
        report_ready(m, st_prompt_param(m), st_prompt_param(m) + st_prompt_param_count(m));
    }
}

/* Attended (query, key) pairs of layer l over the batch: each query sees the keys up to itself (inside
 * its document when packed, the last W with a sliding window). */
static double attention_pairs(const st_model *m, int l) {
    int win = layer_window(m, l);
    if (m->doc_pos_on) return m->doc_pairs[win > 0];
    double T = m->T, per_seq = win > 0 ? win * (win + 1) / 2.0 + (T - win) * win : T * (T + 1) / 2;
    return m->B * per_seq;
}

/* 2 N in out of each linear weight of layer l: {qkv, o, up, down}, and whether each trains. */
static void layer_linear(const st_model *m, int l, double N, double f[4], int trains[4]) {
    const st_model_config *c = &m->cfg;
    double C = c->d_model, Q = qkv_dim(c), A = (double)c->n_head * c->head_dim, F = c->d_ff;
    double F1 = c->family == ST_FAMILY_GPT2 ? F : 2 * F;
    f[0] = 2 * N * C * Q;
    f[1] = 2 * N * A * C;
    f[2] = 2 * N * C * F1;
    f[3] = 2 * N * F * C;
    layer_w w = layer_weights(m, l);
    trains[0] = w.gwqkv != NULL;
    trains[1] = w.gwo != NULL;
    trains[2] = w.gw1 != NULL;
    trains[3] = w.gw2 != NULL;
}

double st_model_step_flops(const st_model *mw, int train) {
    st_model flat = *mw; /* which gradients exist, not where they live now: without residency windows (a
                            device ZeRO-2/3 model has no layer's gradient window between steps) */
    flat.windowed = flat.grads_windowed = 0;
    const st_model *m = &flat;
    const st_model_config *c = &m->cfg;
    double N = (double)m->B * m->T, flops = 0, hd_h = (double)c->head_dim * c->n_head;
    for (int l = 0; l < c->n_layer; l++) {
        double f[4], lora_fwd, lora_down, lora_bwd;
        int trains[4];
        layer_linear(m, l, N, f, trains);
        st_lora_flops(m, l, N, &lora_fwd, &lora_down, &lora_bwd);
        double fwd = f[0] + f[1] + f[2] + f[3] + lora_fwd + 4 * hd_h * attention_pairs(m, l);
        flops += fwd;
        if (!train || !m->grads || l < m->lowest_trained_layer) continue;
        if (m->act_ckpt) flops += fwd - f[3] - lora_down; /* recomputed without the down projection */
        flops += f[0] + f[1] + f[2] + f[3] + lora_bwd + 10 * hd_h * attention_pairs(m, l); /* dgrad */
        for (int k = 0; k < 4; k++) flops += trains[k] ? f[k] : 0; /* wgrad */
    }
    if (m->hidden_only) return flops;
    double head = 2 * N * c->d_model * c->vocab;
    float *gw = NULL;
    head_weight(m, &gw);
    flops += head;
    if (train) flops += head + (gw && m->grads ? head : 0); /* dlnf always, the head's dW when it trains */
    if (train && head_outer(m)) flops += head;              /* blocks outermost: the logits recomputed */
    return flops;
}

/* Per token, for MFU (train/train_report.c). */
double st_model_flops_per_token(const st_model *m, int T) {
    (void)T; /* the batch's own T (st_model_alloc_activations) */
    double N = (double)m->B * m->T;
    return N > 0 ? st_model_step_flops(m, 1) / N : 0;
}

int st_model_layer_activations(const st_model *m, int l, const float **res_in, const float **attn, const float **mlp,
                               const float **res_out) {
    if (!m->act_arena || m->precision != ST_PRECISION_FP32 || m->act_ckpt || l < 0 || l >= m->cfg.n_layer)
        return st_fail(ST_EINVAL, "layer activations need an fp32 model with activations and no activation "
                                  "checkpointing (layer %d)", l);
    layer_acts *la = m->layer_acts;
    model_bufs b;
    bind((st_model *)m, la, &b);
    *res_in = la[l].res_in;
    *attn = la[l].atty;
    *mlp = la[l].h2;
    *res_out = l + 1 < m->cfg.n_layer ? la[l + 1].res_in : b.res_out;
    return 0;
}

const float *st_model_final_hidden(const st_model *m) {
    layer_acts *la = m->layer_acts;
    model_bufs b;
    bind((st_model *)m, la, &b);
    return b.lnf;
}

void st_model_head_logits(st_model *m, float *out, int r0, int rows) {
    model_bufs b;
    bind(m, m->layer_acts, &b);
    float *gw;
    const float *w = head_weight(m, &gw);
    int C = m->cfg.d_model;
    head_logits(m, &b, out, b.lnf + (size_t)r0 * C, w, rows, -1);
    if (head_by_rows(m)) m->head_rows(m->residency_ctx, -1, 0, -1, 0, 0);
}
