/* qlora.c — quantized frozen base for QLoRA (see qlora.h).
 *
 * Layout after st_qlora_begin: m->weights = [kept base params | adapters]; with spec.bf16 [bf16-only kept |
 * fp32 kept | adapters], the first without fp32 storage (m->n_w16). The quantized parameters have no storage:
 * their offsets lie in a virtual range far past the buffer (QL_VIRTUAL + their place in their matmul unit), so
 * the model's weight pointers still name them (st_qlora_mm finds a unit's tensors by them) and any read of
 * one faults. Only the unfused path (a backend without qmatmul, or SHARDTUNE_QLORA_FUSED=0) keeps the old
 * one-unit scratch between the kept parameters and the adapters (within the bf16-only part under spec.bf16). st_qlora_put then fills it a tensor at a time (the trainer's streamed load: one fp32
 * tensor in flight, never the fp32 base); st_qlora_quantize does the same from an already loaded model.
 * Unfused, every quantized parameter's offset points into the scratch at its place in its matmul unit (q/k/v
 * packed, gate/up packed unless spec.mlp_apart, any other weight alone), so the model's weight pointers (wptr,
 * the packed matmuls) work unchanged once st_qlora_load has dequantized the unit, right before its matmul.
 * Quantization always runs on the host; on a device backend quantize_one then uploads the codes and scales
 * and every dequantization (st_qlora_load, st_qlora_dequant_host) runs through the backend's kernels.
 * With the backend's qmatmul (the fused path, st_qlora_select / st_qlora_mm) the forward and input-gradient
 * matmuls read the codes directly, and the other readers never need a whole dequantized matrix: DoRA's products
 * go through qmatmul too (st_qlora_param_mm), its norms through row panels (st_qlora_rows), and the readers
 * outside a step dequantize a tensor into their own memory (st_qlora_dequant_param: eval.generate's merged
 * view, st_qlora_materialize). */
#include "worker/qlora.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/error.h"
#include "common/util.h"
#include "kernels/kernels.h"

#define DQ_BLOCK 256 /* scales per double-quantization block (bitsandbytes' blocksize for the absmax) */
#define QL_VIRTUAL ((size_t)1 << 40) /* fused layout: where the quantized parameters' (storage-less) offsets start */
#define QL_PANEL ((size_t)1 << 18)   /* st_qlora_rows: about this many floats per panel (1 MB) */

typedef struct {
    int param;        /* registry index */
    size_t n;         /* elements */
    uint8_t *codes;   /* nf4: (n + 1) / 2 bytes; int8: n */
    size_t ns;        /* scales */
    float *scales;    /* ns floats, or NULL with double_quant */
    int8_t *q8;       /* double_quant: ns codes */
    float *scale2;    /* double_quant: ceil(ns / 256) */
    float mean;       /* double_quant: the scales' mean */
    size_t at, bytes; /* its codes and scales: blob[at, at + bytes) */
    int done;         /* quantized (st_qlora_put) */
    int unit;         /* q->t index of the first tensor of its matmul unit (see unit_starts) */
} qtensor;

struct st_qlora {
    st_qlora_spec spec;
    const st_backend *be; /* owns the codes, scales, sbuf and fbuf (backend memory: device memory on a GPU) */
    int n;
    qtensor *t;       /* registry order */
    float *sbuf;      /* backend [max ns]: dequantized scales of the tensor being acquired */
    float *fbuf;      /* backend [chunk floats]: unfused spec.bf16: a piece dequantized before its rounding to bf16; a
                         device backend: also the staging of a bf16-only piece put from the host */
    size_t chunk;
    uint64_t *sums;   /* spec.bf16: [n_params] the checksums st_qlora_set_sum recorded (bf16-only params) */
    size_t fp32_bytes;
    uint8_t *blob;    /* every tensor's codes and scales, registry order (a layer's are contiguous) */
    size_t blob_bytes;
    int loaded;       /* the unit (q->t index of its first tensor) the scratch holds, -1 none */
    int sbuf_of;      /* the q->t index whose dequantized scales sbuf holds, -1 none (the codes never change) */
    int fused;        /* matmuls through be->qmatmul (st_qlora_select) */
    int pending;      /* fused: the q->t index st_qlora_select noted for the next st_qlora_mm, -1 none */
    float *qscratch;  /* fused on a host backend: qmatmul's panels (qscratch_floats) */
    size_t qscratch_floats;
    float *pbuf;      /* backend [pbuf_floats]: st_qlora_rows' panel (allocated on first use) */
    uint16_t *pbuf16; /* backend [pbuf_floats]: its bf16 rounding (and st_qlora_dequant_param's) */
    size_t pbuf_floats;
    /* unfused ZeRO-3 on a device (st_qlora_set_scratch): the scratch's weight range [zlo, ...) lives at zw (fp32) and
     * zw16 (its bf16 copy, precision bf16) instead of m->weights + offset; NULL: where the layout put it */
    float *zw;
    uint16_t *zw16;
    size_t zlo;
};

/* Where the scratch place of parameter i is (fp32; its bf16 copy): see st_qlora_set_scratch. */
static float *scratch32(const st_model *m, const st_qlora *q, int i) {
    size_t off = m->params[i].offset;
    return q->zw ? q->zw + (off - q->zlo) : m->weights + off;
}
static uint16_t *scratch16(const st_model *m, const st_qlora *q, int i) {
    size_t off = m->params[i].offset;
    if (q->zw) return q->zw16 ? q->zw16 + (off - q->zlo) : NULL;
    return m->weights_bf16 ? m->weights_bf16 + off : NULL;
}

/* A tensor's bytes in the blob: codes, then (4-byte aligned) its fp32 scales, or its int8 scale codes and
 * (aligned) their fp32 scales under double quantization; the whole padded to 4 bytes. */
static size_t align4(size_t x) { return (x + 3) / 4 * 4; }

static size_t n_blocks(size_t n, int block) { return (n + (size_t)block - 1) / (size_t)block; }

/* st_qlora_begin's chunk: whole blocks, whole bytes of nf4 codes, about 64 Ki floats */
static size_t chunk_floats(int block) { return (size_t)block * 2 * (((size_t)1 << 16) / ((size_t)block * 2) + 1); }

static int nearest_nf4(float x) {
    int best = 0;
    float bd = fabsf(x - ST_NF4_LEVELS[0]);
    for (int j = 1; j < 16; j++) {
        float d = fabsf(x - ST_NF4_LEVELS[j]);
        if (d < bd) { bd = d; best = j; }
    }
    return best;
}

void st_qlora_quant_tensor(st_qlora_quant quant, const float *w, size_t n, int block, uint8_t *codes,
                           float *scales) {
    if (quant == ST_QLORA_NF4) memset(codes, 0, (n + 1) / 2);
    for (size_t b = 0; b < n_blocks(n, block); b++) {
        size_t i0 = b * (size_t)block, i1 = i0 + (size_t)block < n ? i0 + (size_t)block : n;
        float amax = 0.0f;
        for (size_t i = i0; i < i1; i++) amax = fmaxf(amax, fabsf(w[i]));
        if (quant == ST_QLORA_NF4) {
            scales[b] = amax;
            for (size_t i = i0; i < i1; i++) {
                int c = nearest_nf4(amax > 0.0f ? w[i] / amax : 0.0f);
                codes[i >> 1] |= (uint8_t)((i & 1) ? c << 4 : c); /* low nibble first, as dequant_nf4 reads */
            }
        } else {
            float s = amax / 127.0f;
            scales[b] = s;
            for (size_t i = i0; i < i1; i++) {
                float q = s > 0.0f ? rintf(w[i] / s) : 0.0f;
                codes[i] = (uint8_t)(int8_t)fmaxf(-127.0f, fminf(127.0f, q));
            }
        }
    }
}

void st_qlora_double_quant(const float *s, size_t ns, int8_t *q8, float *scale2, float *mean) {
    double sum = 0.0;
    for (size_t i = 0; i < ns; i++) sum += s[i]; /* in order: the numpy reference sums the same way */
    float mu = ns ? (float)(sum / (double)ns) : 0.0f;
    *mean = mu;
    for (size_t b = 0; b < n_blocks(ns, DQ_BLOCK); b++) {
        size_t i0 = b * DQ_BLOCK, i1 = i0 + DQ_BLOCK < ns ? i0 + DQ_BLOCK : ns;
        float amax = 0.0f;
        for (size_t i = i0; i < i1; i++) amax = fmaxf(amax, fabsf(s[i] - mu));
        float s2 = amax / 127.0f;
        scale2[b] = s2;
        for (size_t i = i0; i < i1; i++) {
            float q = s2 > 0.0f ? rintf((s[i] - mu) / s2) : 0.0f;
            q8[i] = (int8_t)fmaxf(-127.0f, fminf(127.0f, q));
        }
    }
}

void st_qlora_double_dequant(float *s, const int8_t *q8, const float *scale2, float mean, size_t ns) {
    for (size_t i = 0; i < ns; i++) s[i] = (float)q8[i] * scale2[i / DQ_BLOCK] + mean;
}

static size_t tensor_bytes(const st_qlora_spec *s, size_t n, size_t ns) {
    size_t codes = align4(s->quant == ST_QLORA_NF4 ? (n + 1) / 2 : n);
    return codes + (s->double_quant ? align4(ns) + n_blocks(ns, DQ_BLOCK) * sizeof(float) : ns * sizeof(float));
}

/* Points t's codes and scales at its place in the blob. */
static void place(qtensor *t, const st_qlora_spec *s, uint8_t *blob) {
    uint8_t *at = blob + t->at, *sc = at + align4(s->quant == ST_QLORA_NF4 ? (t->n + 1) / 2 : t->n);
    t->codes = at;
    t->scales = s->double_quant ? NULL : (float *)sc;
    t->q8 = s->double_quant ? (int8_t *)sc : NULL;
    t->scale2 = s->double_quant ? (float *)(sc + align4(t->ns)) : NULL;
}

void st_qlora_free(st_qlora *q) {
    if (!q) return;
    if (q->blob) (q->be && !q->be->host_memory ? q->be->free : free)(q->blob);
    free(q->t);
    if (q->be) {
        q->be->free(q->sbuf);
        q->be->free(q->fbuf);
        q->be->free(q->qscratch);
        q->be->free(q->pbuf);
        q->be->free(q->pbuf16);
    }
    free(q->sums);
    free(q);
}

/* What QLoRA quantizes: the 2-D weights inside the layers (not the adapters, embeddings or head). */
static int quantizable(const st_param *p) {
    return p->layer >= 0 && p->ndim == 2 && (p->kind == ST_MOD_ATTN || p->kind == ST_MOD_MLP);
}

static int ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && !strcmp(s + n - k, suffix);
}

/* Whether quantized parameter i starts a new matmul unit: everything but the Llama family's k_proj and v_proj,
 * which follow q_proj in the same layer (the packed q/k/v matmul reads them as one [q + k + v, d_model] matrix),
 * and up_proj, which follows gate_proj unless s->mlp_apart. prev: the previous quantized parameter, -1 none. */
static int unit_starts(const st_model *m, const st_qlora_spec *s, int i, int prev) {
    const char *n = m->params[i].name;
    int packed = ends_with(n, ".k_proj.weight") || ends_with(n, ".v_proj.weight") ||
                 (!s->mlp_apart && ends_with(n, ".up_proj.weight"));
    return !packed || prev < 0 || m->params[prev].layer != m->params[i].layer;
}

/* spec.bf16: the frozen base parameters held in bf16 only besides the quantized ones: the token embedding
 * (Llama family: its rows are widened from bf16, worker/model.c) and an untied LM head (a matmul weight). */
static int bf16_only(const st_model *m, int i) {
    const st_param *p = &m->params[i];
    if (p->layer >= 0 || p->ndim != 2 || i >= st_model_base_params(m)) return 0;
    if (i == 0) return m->cfg.family != ST_FAMILY_GPT2;
    return p->kind == ST_MOD_HEAD;
}

/* Quantizes one host tensor (registry entry t->param, n floats) into its place in the blob, always on the
 * host (bit-identical on every backend); on a device backend into a host copy of its bytes, then uploaded
 * (the acquire dequantizes on the device). */
static int quantize_one(const st_model *m, const st_qlora_spec *s, qtensor *t, const float *host) {
    const st_param *p = &m->params[t->param];
    int dev = !m->be->host_memory;
    qtensor h = *t;
    uint8_t *stage = dev ? calloc(t->bytes + 1, 1) : NULL;
    if (stage) {
        h.at = 0;
        place(&h, s, stage);
    }
    float *scales = dev && !stage ? NULL : s->double_quant ? malloc(t->ns * sizeof(float) + 1) : h.scales;
    if (!scales) {
        free(stage);
        return st_fail(ST_ENOMEM, "out of memory quantizing %s", p->name);
    }
    st_qlora_quant_tensor(s->quant, host, t->n, s->block, h.codes, scales);
    if (s->double_quant) st_qlora_double_quant(scales, t->ns, h.q8, h.scale2, &t->mean);
    if (s->double_quant) free(scales);
    if (stage) m->be->copy_to_device(t->codes, stage, t->bytes); /* t->codes: its place in the device blob */
    free(stage);
    t->done = 1;
    return 0;
}

/* Whether a base quantized on backend be (NULL: the planner's, the CPU's, which has qmatmul) runs fused. */
static int want_fused(const st_backend *be) {
    const char *fz = getenv("SHARDTUNE_QLORA_FUSED"); /* "0": dequantize whole units (bench/qlora_fused.sh) */
    return (!be || be->qmatmul) && !(fz && !strcmp(fz, "0"));
}

/* The compacted layout: kept base parameters first (registry order), then (unfused only) one matmul unit's
 * scratch, then the adapters; sets every offset, n_weights (and n_base_weights with adapters). Fused, the
 * quantized parameters' offsets are QL_VIRTUAL + their place in their unit (no storage). */
static void layout(st_model *m, const st_qlora *q) {
    int n = m->n_params, nb = st_model_base_params(m), k = 0, w16 = q->spec.bf16;
    size_t at = 0, scratch = 0, layer_at = 0, adapters = m->lora ? m->n_weights - m->n_base_weights : 0;
    size_t adapter0 = m->lora ? m->n_base_weights : m->n_weights;
    for (int i = 0; w16 && i < nb; i++) /* bf16: [bf16-only kept | scratch | fp32 kept | adapters] */
        if (bf16_only(m, i)) { m->params[i].offset = at; at += m->params[i].numel; }
    size_t scratch0 = at;
    for (k = 0; k < q->n; k++) { /* per matmul unit, in registry order */
        st_param *p = &m->params[q->t[k].param];
        if (k == q->t[k].unit) layer_at = 0;
        p->offset = scratch0 + layer_at;
        layer_at += p->numel;
        if (layer_at > scratch) scratch = layer_at;
    }
    if (q->fused) { /* no scratch: the offsets name the tensors only */
        for (k = 0; k < q->n; k++) m->params[q->t[k].param].offset += QL_VIRTUAL - scratch0;
        scratch = 0;
    }
    at = scratch0 + scratch;
    m->n_w16 = w16 ? at : 0;
    if (!w16) at = 0; /* fp32: [kept | scratch | adapters] */
    k = 0;
    for (int i = 0; i < nb; i++) /* q->t is in registry order */
        if (k < q->n && q->t[k].param == i) k++;
        else if (!(w16 && bf16_only(m, i))) { m->params[i].offset = at; at += m->params[i].numel; }
    size_t base_end = w16 ? at : at + scratch;
    if (!w16 && !q->fused) { /* the scratch follows the kept parameters */
        for (k = 0; k < q->n; k++) m->params[q->t[k].param].offset += at;
    }
    for (int i = nb; i < n; i++) m->params[i].offset = base_end + (m->params[i].offset - adapter0);
    if (m->lora) m->n_base_weights = base_end;
    m->n_weights = base_end + adapters;
}

int st_qlora_begin(st_model *m, const st_qlora_spec *s) {
    if (!m->be) return st_fail(ST_EINVAL, "st_qlora_begin: the model has no backend");
    if (!m->be->dequant_nf4 || !m->be->dequant_int8 || !m->be->add_scalar)
        return st_fail(ST_ECONFIG, "finetune.mode qlora is not supported by the %s backend (no dequantization kernels)",
                       m->be->name);
    if (m->acquire) /* ZeRO-3 lays out its frozen space from the quantized registry */
        return st_fail(ST_EINVAL, "the base must be quantized before the stage-3 communicator is built");
    if (m->weights_bf16) /* the bf16 copy is sized for the fp32 buffer that compact() shrinks */
        return st_fail(ST_EINVAL, "the base must be quantized before precision bf16 is set");
    if (s->block < 1) return st_fail(ST_ECONFIG, "finetune.qlora.block must be >= 1, got %d", s->block);
    if (m->qlora) return st_fail(ST_EINVAL, "the model's base is already quantized");
    if (s->sharded && (s->bf16 || !m->lora))
        return st_fail(ST_EINVAL, "st_qlora_begin: a sharded base needs adapters and an fp32 kept base");
    if (s->bf16 && (!m->be->to_bf16 || !m->be->from_bf16))
        return st_fail(ST_ECONFIG, "precision: bf16 is not supported by the %s backend", m->be->name);
    st_qlora *q = calloc(1, sizeof *q);
    if (q) q->t = calloc((size_t)m->n_params, sizeof *q->t);
    if (!q || !q->t) { st_qlora_free(q); return st_fail(ST_ENOMEM, "out of memory quantizing the base model"); }
    q->spec = *s;
    q->be = m->be;
    q->loaded = -1;
    q->sbuf_of = -1;
    q->pending = -1;
    q->fused = want_fused(m->be);
    size_t max_ns = 0;
    for (int i = 0; i < st_model_base_params(m); i++) {
        if (!quantizable(&m->params[i])) continue;
        qtensor *t = &q->t[q->n++];
        t->unit = unit_starts(m, s, i, q->n > 1 ? t[-1].param : -1) ? q->n - 1 : t[-1].unit;
        t->param = i;
        t->n = m->params[i].numel;
        t->ns = n_blocks(t->n, s->block);
        q->fp32_bytes += t->n * sizeof(float);
        if (t->ns > max_ns) max_ns = t->ns;
        t->at = q->blob_bytes;
        t->bytes = tensor_bytes(s, t->n, t->ns);
        q->blob_bytes += t->bytes;
    }
    /* host: address space, pages come as the codes are written; a device backend: device memory; spec.sharded:
     * none (each rank's words go to the communicator's shard, st_qlora_put_bytes) */
    if (!s->sharded)
        q->blob = m->be->host_memory ? st_calloc_aligned(q->blob_bytes + 64) : m->be->alloc(q->blob_bytes + 64);
    if (!s->sharded && !q->blob) { st_qlora_free(q); return st_fail(ST_ENOMEM, "out of memory for the quantized base"); }
    for (int k = 0; q->blob && k < q->n; k++) place(&q->t[k], s, q->blob);
    layout(m, q);
    /* spec.sharded: the adapters' floats only (weights_tail_only; the communicator cuts the kept base's shard) */
    size_t n32 = s->sharded ? m->n_weights - m->n_base_weights : m->n_weights - m->n_w16;
    float *w32 = m->be->alloc(n32 * sizeof(float) + sizeof(float));
    m->weights = w32 ? w32 - (s->sharded ? m->n_base_weights : m->n_w16) : NULL; /* nothing reads below (model.h) */
    m->weights_tail_only = s->sharded;
    q->sbuf = m->be->alloc(max_ns * sizeof(float) + sizeof(float));
    int ok = w32 && q->sbuf;
    /* whole blocks, whole bytes: a piece of nf4 codes starts on a byte */
    q->chunk = chunk_floats(s->block);
    if (ok && ((s->bf16 && !q->fused) || !m->be->host_memory)) { /* the unfused bf16 scratch's pieces, staging */
        q->fbuf = m->be->alloc(q->chunk * sizeof(float));
        ok = q->fbuf != NULL;
    }
    if (ok && s->bf16) {
        q->sums = calloc((size_t)m->n_params, sizeof *q->sums);
        m->weights_bf16 = m->be->alloc(m->n_weights * sizeof(uint16_t));
        ok = q->sums && m->weights_bf16;
    }
    if (!ok) {
        m->be->free(w32);
        m->be->free(m->weights_bf16);
        m->weights = NULL;
        m->weights_bf16 = NULL;
        m->weights_tail_only = 0;
        m->n_w16 = 0;
        st_qlora_free(q);
        return st_fail(ST_ENOMEM, "cannot allocate %.1f MB for the QLoRA weight buffer", n32 * 4.0 / 1e6);
    }
    m->qlora = q;
    st_model_weights_changed(m);
    return 0;
}

static int find(const st_qlora *q, int i) {
    for (int k = 0; k < q->n; k++)
        if (q->t[k].param == i) return k;
    return -1;
}

int st_qlora_put(st_model *m, int i, const float *host) {
    st_qlora *q = m->qlora;
    int k = find(q, i);
    if (k < 0) return st_qlora_put_part(m, i, 0, m->params[i].numel, host);
    if (q->t[k].done) return st_fail(ST_EINVAL, "%s is already quantized", m->params[i].name);
    return quantize_one(m, &q->spec, &q->t[k], host);
}

int st_qlora_put_part(st_model *m, int i, size_t a, size_t n, const float *host) {
    const st_param *p = &m->params[i];
    if (find(m->qlora, i) >= 0 || a + n > p->numel)
        return st_fail(ST_EINVAL, "st_qlora_put_part: %s is quantized (whole only) or the range is outside it", p->name);
    const st_qlora *q = m->qlora;
    if (p->offset >= m->n_w16)
        m->be->copy_to_device(m->weights + p->offset + a, host, n * sizeof(float));
    else if (m->be->host_memory)
        m->be->to_bf16(m->weights_bf16 + p->offset + a, host, n);
    else /* a device backend rounds device memory: through fbuf, a piece at a time */
        for (size_t at = 0; at < n; at += q->chunk) {
            size_t k = n - at < q->chunk ? n - at : q->chunk;
            m->be->copy_to_device(q->fbuf, host + at, k * sizeof(float));
            m->be->to_bf16(m->weights_bf16 + p->offset + a + at, q->fbuf, k);
        }
    st_model_weights_changed(m);
    return 0;
}

int st_qlora_bf16_only(const st_model *m, int i) { /* (a device's frozen bf16-only part has no QLoRA: model.h) */
    return m->qlora && m->params[i].offset < m->n_w16 && !st_qlora_holds(m, i);
}

int st_qlora_held_bf16(const st_model *m) { return m->qlora && m->qlora->spec.bf16; }

void st_qlora_set_sum(st_model *m, int i, uint64_t sum) {
    if (m->qlora && m->qlora->sums) m->qlora->sums[i] = sum;
}

uint64_t st_qlora_sum(const st_model *m, int i) { return m->qlora && m->qlora->sums ? m->qlora->sums[i] : 0; }

int st_qlora_quantize(st_model *m, const st_qlora_spec *s) {
    if (m->qlora) return st_fail(ST_EINVAL, "the model's base is already quantized");
    int n = m->n_params, nb = st_model_base_params(m);
    size_t *old = malloc((size_t)n * sizeof *old + 1), most = 0;
    if (!old) return st_fail(ST_ENOMEM, "out of memory quantizing the base model");
    for (int i = 0; i < n; i++) {
        old[i] = m->params[i].offset;
        if (i < nb && m->params[i].numel > most) most = m->params[i].numel;
    }
    float *w = m->weights;
    size_t nw = m->n_weights, nbw = m->n_base_weights;
    m->weights = NULL;
    int rc = st_qlora_begin(m, s);
    float *host = rc ? NULL : malloc(most * sizeof(float) + sizeof(float));
    if (!rc && !host) rc = st_fail(ST_ENOMEM, "out of memory quantizing the base model");
    for (int i = 0; !rc && i < nb; i++) { /* through host memory: exactly what the streamed load quantizes */
        m->be->copy_to_host(host, w + old[i], m->params[i].numel * sizeof(float));
        rc = st_qlora_put(m, i, host);
    }
    for (int i = nb; !rc && i < n; i++)
        m->be->copy(m->weights + m->params[i].offset, w + old[i], m->params[i].numel * sizeof(float));
    free(host);
    if (rc) { /* the model as it was */
        if (m->qlora) { m->be->free(m->weights); st_qlora_free(m->qlora); m->qlora = NULL; }
        m->weights = w;
        m->n_weights = nw;
        m->n_base_weights = nbw;
        for (int i = 0; i < n; i++) m->params[i].offset = old[i];
    } else
        m->be->free(w);
    free(old);
    return rc;
}

/* The block scales of t in backend memory: its own, or (double quantization) dequantized into sbuf (kept for
 * the next call on the same tensor: st_qlora_rows reads one tensor in many panels). */
static const float *tensor_scales(const st_qlora *q, const st_backend *be, const qtensor *t) {
    if (t->scales) return t->scales;
    st_qlora *w = (st_qlora *)q; /* the cache only */
    int k = (int)(t - q->t);
    if (w->sbuf_of == k) return q->sbuf;
    be->dequant_int8(q->sbuf, t->q8, t->scale2, t->ns, DQ_BLOCK);
    be->add_scalar(q->sbuf, t->mean, t->ns);
    w->sbuf_of = k;
    return q->sbuf;
}

/* Elements [at, at + k) of t dequantized into fbuf (at a multiple of the chunk: whole blocks, whole bytes). */
static void dequant_piece(const st_qlora *q, const st_backend *be, const qtensor *t, const float *s, size_t at,
                          size_t k) {
    size_t sb = at / (size_t)q->spec.block;
    if (q->spec.quant == ST_QLORA_NF4)
        be->dequant_nf4(q->fbuf, t->codes + at / 2, s + sb, k, q->spec.block);
    else
        be->dequant_int8(q->fbuf, (const int8_t *)t->codes + at, s + sb, k, q->spec.block);
}

/* Dequantizes tensor t into its place in the scratch (under spec.bf16 its bf16 place, a piece at a time). */
static void dequant_tensor(const st_model *m, st_qlora *q, const qtensor *t) {
    const st_backend *be = m->be;
    const float *s = tensor_scales(q, be, t);
    if (q->spec.bf16) { /* bf16 only: a piece at a time through fbuf (whole blocks, whole bytes) */
        uint16_t *out16 = scratch16(m, q, t->param);
        for (size_t at = 0; at < t->n; at += q->chunk) {
            size_t n = t->n - at < q->chunk ? t->n - at : q->chunk;
            dequant_piece(q, be, t, s, at, n);
            be->to_bf16(out16 + at, q->fbuf, n);
        }
        return;
    }
    float *out = scratch32(m, q, t->param);
    uint16_t *out16 = scratch16(m, q, t->param);
    if (q->spec.quant == ST_QLORA_NF4)
        be->dequant_nf4(out, t->codes, s, t->n, q->spec.block);
    else
        be->dequant_int8(out, (const int8_t *)t->codes, s, t->n, q->spec.block);
    /* precision bf16: the matmuls read the dequantized matrix rounded to bf16; the fp32 values stay for
     * the adapters and DoRA */
    if (out16) be->to_bf16(out16, out, t->n);
}

void st_qlora_load(const st_model *m, int i) {
    st_qlora *q = m->qlora;
    int k = q && !q->fused ? find(q, i) : -1; /* fused: there is no scratch */
    if (k < 0 || q->loaded == q->t[k].unit) return;
    int u = q->t[k].unit;
    for (int j = u; j < q->n && q->t[j].unit == u; j++) dequant_tensor(m, q, &q->t[j]);
    q->loaded = u;
}

void st_qlora_acquire(const st_model *m, int first, int last) {
    st_qlora *q = m->qlora;
    q->loaded = -1; /* a new group: its bytes were just gathered (ZeRO-3), the scratch is filled afresh */
    if (m->in_compute || q->fused) return; /* forward / backward: each matmul loads its own unit (st_qlora_load);
                                            * fused: no scratch, the readers dequantize what they read */
    for (int k = 0; k < q->n; k++)
        if (q->t[k].param >= first && q->t[k].param < last) st_qlora_load(m, q->t[k].param);
}

int st_qlora_fused(const st_model *m) { return m->qlora && m->qlora->fused; }

int st_qlora_fuses(const st_backend *be) { return want_fused(be); }

void st_qlora_select(const st_model *m, int i) {
    st_qlora *q = m->qlora;
    int k = q ? find(q, i) : -1;
    if (k < 0) return;
    if (!q->fused) {
        st_qlora_load(m, i);
        return;
    }
    q->pending = k;
}

/* Appends tensor t (rows of `in` columns) to qw's parts. */
static void put_part(st_qweight *qw, const qtensor *t, int in) {
    st_qw_part *p = &qw->part[qw->nparts++];
    p->codes = t->codes, p->scales = t->scales, p->q8 = t->q8, p->scale2 = t->scale2, p->mean = t->mean;
    p->rows = (int)(t->n / (size_t)in);
}

/* Parts of qw: the tensors of unit u from the one at offset `off` on, while their rows add up to at most out
 * rows of `in` columns. 0 when they do not make exactly [out, in]. */
static int unit_parts(const st_model *m, const st_qlora *q, int k0, size_t off, int out, int in, st_qweight *qw) {
    int u = q->t[k0].unit, k = u, rows = 0;
    while (k < q->n && q->t[k].unit == u && m->params[q->t[k].param].offset != off) k++;
    memset(qw, 0, sizeof *qw);
    qw->nf4 = q->spec.quant == ST_QLORA_NF4, qw->block = q->spec.block, qw->cols = in;
    for (; k < q->n && q->t[k].unit == u && rows < out && qw->nparts < ST_QW_PARTS; k++) {
        const qtensor *t = &q->t[k];
        if (in <= 0 || t->n % (size_t)in) return 0;
        put_part(qw, t, in);
        rows += qw->part[qw->nparts - 1].rows;
    }
    return rows == out && qw->nparts > 0;
}

/* be->qmatmul with the host scratch grown to the shape (once per larger shape). Out of memory: the scratch
 * stays too small, and the CPU twin writes NaN (never a plausible result: the trainer's guard sees it). */
static void run_qmatmul(const st_model *m, st_qlora *q, float *c, st_mm_in x, const st_qweight *qw, int M, int trans,
                        int mode, float beta) {
    const st_backend *be = m->be;
    int rows = 0;
    for (int p = 0; p < qw->nparts; p++) rows += qw->part[p].rows;
    size_t need = be->host_memory ? st_qmatmul_scratch_floats(M, rows, qw->cols, trans, mode, st_num_threads()) : 0;
    if (need > q->qscratch_floats) {
        be->free(q->qscratch);
        q->qscratch = be->alloc(need * sizeof(float));
        q->qscratch_floats = q->qscratch ? need : 0;
    }
    be->qmatmul(c, x, qw, M, trans, mode, beta, q->qscratch, q->qscratch_floats);
}

int st_qlora_mm(const st_model *m, float *c, st_mm_in x, const float *w, int M, int out, int in, int trans,
                float beta) {
    st_qlora *q = m->qlora;
    if (!q || q->pending < 0) return 0;
    int k0 = q->pending;
    q->pending = -1;
    st_qweight qw;
    /* the noted tensor names the weight: every caller passes its own pointer (w), which a windowed model (device
     * ZeRO-3) does not have for a storage-less quantized tensor */
    (void)w;
    if (!unit_parts(m, q, k0, m->params[q->t[k0].param].offset, out, in, &qw)) /* no caller makes such a shape: loud */
        m->be->add_scalar(c, NAN, (size_t)M * (size_t)(trans ? in : out));
    else
        run_qmatmul(m, q, c, x, &qw, M, trans, m->precision == ST_PRECISION_BF16, beta);
    return 1;
}


int st_qlora_param_mm(const st_model *m, int i, float *c, const float *x, int M, int trans, float beta) {
    st_qlora *q = m->qlora;
    int k = q ? find(q, i) : -1;
    if (k < 0 || !q->fused)
        return st_fail(ST_EINVAL, "st_qlora_param_mm: %s is not a quantized parameter of a fused base", m->params[i].name);
    const st_param *p = &m->params[i];
    st_qweight qw;
    memset(&qw, 0, sizeof qw);
    qw.nf4 = q->spec.quant == ST_QLORA_NF4, qw.block = q->spec.block, qw.cols = (int)p->shape[1];
    put_part(&qw, &q->t[k], qw.cols);
    run_qmatmul(m, q, c, st_mm_f32(x), &qw, M, trans, m->precision == ST_PRECISION_BF16 ? ST_QMM_W16 : 0, beta);
    return 0;
}

/* Grows the panel buffers (pbuf, pbuf16) to `floats`. */
static int panel_room(const st_model *m, st_qlora *q, size_t floats) {
    if (floats <= q->pbuf_floats) return 0;
    m->be->free(q->pbuf);
    m->be->free(q->pbuf16);
    q->pbuf = m->be->alloc(floats * sizeof(float));
    q->pbuf16 = m->be->alloc(floats * sizeof(uint16_t));
    q->pbuf_floats = q->pbuf && q->pbuf16 ? floats : 0;
    return q->pbuf_floats ? 0 : st_fail(ST_ENOMEM, "out of memory for a QLoRA panel (%.1f MB)", floats * 6.0 / 1e6);
}

/* x[0, n) (backend memory) rounded to bf16 in place, through pbuf16 a panel at a time. */
static void round_bf16(const st_model *m, const st_qlora *q, float *x, size_t n) {
    for (size_t at = 0; at < n; at += q->pbuf_floats) {
        size_t k = n - at < q->pbuf_floats ? n - at : q->pbuf_floats;
        m->be->to_bf16(q->pbuf16, x + at, k);
        m->be->from_bf16(x + at, q->pbuf16, k);
    }
}

/* Elements [a0, a0 + n) of t dequantized into dst (a0 on a block and a byte: whole blocks, whole nf4 bytes). */
static void dequant_at(const st_model *m, const st_qlora *q, const qtensor *t, float *dst, size_t a0, size_t n) {
    const float *s = tensor_scales(q, m->be, t);
    size_t sb = a0 / (size_t)q->spec.block;
    if (q->spec.quant == ST_QLORA_NF4) m->be->dequant_nf4(dst, t->codes + a0 / 2, s + sb, n, q->spec.block);
    else m->be->dequant_int8(dst, (const int8_t *)t->codes + a0, s + sb, n, q->spec.block);
}

/* st_qlora_rows' panel size in floats: QL_PANEL, or SHARDTUNE_QLORA_PANEL_FLOATS (tests: several panels, rows
 * that start mid-block, on a small model). */
static size_t panel_floats(void) {
    const char *e = getenv("SHARDTUNE_QLORA_PANEL_FLOATS");
    long v = e ? atol(e) : 0;
    return v > 0 ? (size_t)v : QL_PANEL;
}

int st_qlora_panel_rows(const st_model *m, int i) {
    const st_param *p = &m->params[i];
    size_t r = panel_floats() / (size_t)(p->shape[1] > 0 ? p->shape[1] : 1);
    if (r < 1) r = 1;
    return (int)(r < (size_t)p->shape[0] ? r : (size_t)p->shape[0]);
}

size_t st_qlora_rows_work(const st_model *m, const st_qlora_spec *spec) {
    size_t most = 0;
    for (int i = 0; i < st_model_base_params(m); i++) {
        if (!quantizable(&m->params[i])) continue;
        size_t f = (size_t)st_qlora_panel_rows(m, i) * (size_t)m->params[i].shape[1] + 2 * (size_t)spec->block;
        if (f > most) most = f;
    }
    return most * (sizeof(float) + sizeof(uint16_t));
}

const float *st_qlora_rows(const st_model *m, int i, int r0, int nr, int round16) {
    st_qlora *q = m->qlora;
    int k = q ? find(q, i) : -1;
    const st_param *p = &m->params[i];
    if (k < 0 || r0 < 0 || nr < 1 || r0 + nr > p->shape[0]) {
        st_fail(ST_EINVAL, "st_qlora_rows: %s is not quantized or rows %d..%d are outside it", p->name, r0, r0 + nr);
        return NULL;
    }
    size_t in = (size_t)p->shape[1], g = 2 * (size_t)q->spec.block; /* whole blocks, even: a whole nf4 byte */
    size_t a = (size_t)r0 * in, a0 = a / g * g, n = (size_t)nr * in + (a - a0);
    if (panel_room(m, q, n > g ? n : g)) return NULL;
    dequant_at(m, q, &q->t[k], q->pbuf, a0, n);
    if (round16) round_bf16(m, q, q->pbuf, n);
    return q->pbuf + (a - a0);
}

int st_qlora_dequant_param(const st_model *m, int i, float *dst, int round16) {
    st_qlora *q = m->qlora;
    int k = q ? find(q, i) : -1;
    if (k < 0) return st_fail(ST_EINVAL, "st_qlora_dequant_param: %s is not a quantized parameter", m->params[i].name);
    int rc = round16 ? panel_room(m, q, panel_floats()) : 0;
    if (rc) return rc;
    dequant_at(m, q, &q->t[k], dst, 0, q->t[k].n);
    if (round16) round_bf16(m, q, dst, q->t[k].n);
    return 0;
}

int st_qlora_mlp_apart(const st_model *m) { return m->qlora && m->qlora->spec.mlp_apart; }

int st_qlora_holds(const st_model *m, int i) {
    for (int k = 0; m->qlora && k < m->qlora->n; k++)
        if (m->qlora->t[k].param == i) return 1;
    return 0;
}

void st_qlora_bytes(const st_model *m, size_t *quantized, size_t *fp32) {
    size_t b = 0;
    const st_qlora *q = m->qlora;
    for (int k = 0; q && k < q->n; k++) {
        const qtensor *t = &q->t[k];
        b += t->bytes;
    }
    *quantized = b;
    *fp32 = q ? q->fp32_bytes : 0;
}

int st_qlora_materialize(st_model *m) {
    st_qlora *q = m->qlora;
    if (!q) return 0;
    if (q->spec.bf16) return st_fail(ST_EINVAL, "a base held in bf16 only cannot be materialized in fp32");
    size_t total = 0, nb = 0;
    for (int i = 0; i < m->n_params; i++) {
        total += m->params[i].numel;
        if (i < st_model_base_params(m)) nb += m->params[i].numel;
    }
    float *nw = m->be->alloc(total * sizeof(float) + sizeof(float));
    if (!nw) return st_fail(ST_ENOMEM, "cannot allocate %.1f MB for the dequantized base", total * 4.0 / 1e6);
    size_t at = 0;
    for (int i = 0; i < m->n_params; i++) { /* registry order: q/k/v and gate/up stay adjacent */
        const st_param *p = &m->params[i];
        if (st_qlora_holds(m, i)) st_qlora_dequant_param(m, i, nw + at, 0); /* straight into its new place */
        else m->be->copy(nw + at, m->weights + p->offset, p->numel * sizeof(float));
        at += p->numel;
    }
    at = 0;
    for (int i = 0; i < m->n_params; i++) { /* the new offsets once every copy has read the old ones */
        m->params[i].offset = at;
        at += m->params[i].numel;
    }
    m->be->free(m->weights);
    m->weights = nw;
    m->n_weights = total;
    if (m->lora) m->n_base_weights = nb;
    m->qlora = NULL;
    st_qlora_free(q);
    st_model_weights_changed(m);
    return 0;
}

void st_qlora_footprint(const st_model *m, const st_qlora_spec *s, size_t *quantized, size_t *fp32,
                        size_t *scratch, size_t *w16) {
    size_t qb = 0, fb = 0, unit = 0, most = 0, kept16 = 0;
    int prev = -1;
    for (int i = 0; i < st_model_base_params(m); i++) {
        const st_param *p = &m->params[i];
        if (s->bf16 && bf16_only(m, i)) kept16 += p->numel;
        if (!quantizable(p)) continue;
        qb += tensor_bytes(s, p->numel, n_blocks(p->numel, s->block));
        fb += p->numel * sizeof(float);
        if (unit_starts(m, s, i, prev)) unit = 0; /* the scratch holds one matmul unit (layout) */
        prev = i;
        unit += p->numel;
        if (unit > most) most = unit;
    }
    if (want_fused(m->be)) most = 0; /* the fused path has no scratch (layout) */
    *quantized = qb;
    *fp32 = fb;
    *scratch = most;
    *w16 = s->bf16 ? kept16 + most : 0;
}

size_t st_qlora_fused_work(const st_model *m, const st_qlora_spec *s, int M, int bf16, int threads, int device) {
    if (device || (m->be && !m->be->qmatmul)) return 0; /* no backend (the planner): the CPU's, which has it */
    size_t most = 0;
    int prev = -1, rows = 0;
    for (int i = 0; i < st_model_base_params(m); i++) {
        const st_param *p = &m->params[i];
        if (!quantizable(p)) continue;
        if (unit_starts(m, s, i, prev)) rows = 0;
        prev = i;
        rows += (int)p->shape[0];
        for (int trans = 0; trans <= 1; trans++) {
            size_t f = st_qmatmul_scratch_floats(M, rows, (int)p->shape[1], trans, bf16, threads) * sizeof(float);
            if (f > most) most = f;
        }
    }
    return most;
}

size_t st_qlora_acquire_work(const st_model *m, const st_qlora_spec *s, int device) {
    size_t ns = 0;
    for (int i = 0; i < st_model_base_params(m); i++)
        if (quantizable(&m->params[i]) && n_blocks(m->params[i].numel, s->block) > ns) ns = n_blocks(m->params[i].numel, s->block);
    int piece = (s->bf16 && !want_fused(m->be)) || device;
    return (ns + 1) * sizeof(float) + (piece ? chunk_floats(s->block) * sizeof(float) : 0);
}

size_t st_qlora_load_work(const st_model *m, const st_qlora_spec *s, int device) {
    size_t most = 0, ns = 0, w16 = 0;
    for (int i = 0; i < st_model_base_params(m); i++) {
        const st_param *p = &m->params[i];
        if ((s->bf16 && bf16_only(m, i)) || (device && !quantizable(p))) w16 = 1;
        if (!quantizable(p) || p->numel <= most) continue;
        most = p->numel;
        ns = n_blocks(p->numel, s->block);
    }
    /* load_quantized's host tensor + quantize_one's fp32 scales of it (before double quantization) +
     * load_pieces' 1 Mi-float piece (bf16-only parameters; on a device backend every kept one) */
    return (most + 1) * sizeof(float) + ns * sizeof(float) + (w16 ? ((size_t)1 << 20) * sizeof(float) : 0);
}

void st_qlora_blob(const st_model *m, uint8_t **blob, size_t *bytes) {
    *blob = m->qlora ? m->qlora->blob : NULL;
    *bytes = m->qlora ? m->qlora->blob_bytes : 0;
}

void st_qlora_span(const st_model *m, int first, int last, size_t *a, size_t *b) {
    *a = *b = 0;
    for (int k = 0; m->qlora && k < m->qlora->n; k++) {
        const qtensor *t = &m->qlora->t[k];
        if (t->param < first || t->param >= last) continue;
        if (*b == *a) *a = t->at;
        *b = t->at + t->bytes;
    }
}

size_t st_qlora_layer_bytes_max(const st_model *m, const st_qlora_spec *s) {
    size_t most = 0, layer = 0;
    int cur = -1;
    for (int i = 0; i < st_model_base_params(m); i++) {
        const st_param *p = &m->params[i];
        if (!quantizable(p)) continue;
        if (p->layer != cur) { cur = p->layer; layer = 0; }
        layer += tensor_bytes(s, p->numel, n_blocks(p->numel, s->block));
        if (layer > most) most = layer;
    }
    return most;
}

/* ---- ZeRO-3 on a device (worker/comm_zero3_dev.c): the blob sharded; unfused, the scratch in the
 * communicator's memory ---- */

int st_qlora_quantizable(const st_model *m, int i) {
    return i >= 0 && i < st_model_base_params(m) && quantizable(&m->params[i]);
}

uint8_t *st_qlora_blob_take(st_model *m) {
    st_qlora *q = m->qlora;
    uint8_t *b = q ? q->blob : NULL;
    if (q) q->blob = NULL;
    return b;
}

void st_qlora_place(const st_model *m, int first, int last, uint8_t *bytes, size_t a) {
    st_qlora *q = m->qlora;
    for (int k = 0; q && k < q->n; k++) {
        qtensor *t = &q->t[k];
        if (t->param < first || t->param >= last) continue;
        qtensor h = *t;
        h.at = 0;
        place(&h, &q->spec, bytes + (t->at - a)); /* its bytes at bytes[t->at - a ..) */
        t->codes = h.codes, t->scales = h.scales, t->q8 = h.q8, t->scale2 = h.scale2;
    }
}

void st_qlora_scratch_range(const st_model *m, size_t *lo, size_t *hi) {
    const st_qlora *q = m->qlora;
    *lo = *hi = 0;
    for (int k = 0; q && !q->fused && k < q->n; k++) { /* fused: no scratch (the offsets only name tensors) */
        const st_param *p = &m->params[q->t[k].param];
        if (*hi == *lo || p->offset < *lo) *lo = p->offset;
        if (p->offset + p->numel > *hi) *hi = p->offset + p->numel;
    }
}

void st_qlora_set_scratch(st_model *m, float *w, uint16_t *w16, size_t lo) {
    st_qlora *q = m->qlora;
    if (!q) return;
    q->zw = w;
    q->zw16 = w ? w16 : NULL;
    q->zlo = lo;
    q->loaded = -1; /* nothing is dequantized there yet */
}

/* ---- the sharded load (spec.sharded: ZeRO-3 on a device, coordinator/trainer/train_qload.c) ---- */

/* Elements [*e0, *e1) of t (n elements), widened to multiples of 2 * block (whole blocks, whole bytes of nf4
 * codes: st_qlora_quant_tensor of such a piece gives the whole tensor's bytes there) but clipped to n. */
static void whole_pieces(const st_qlora_spec *s, size_t n, size_t *e0, size_t *e1) {
    size_t u = 2 * (size_t)s->block;
    *e0 = *e0 / u * u;
    *e1 = (*e1 + u - 1) / u * u;
    if (*e1 > n) *e1 = n;
}

/* The element ranges of t whose values bytes [lo, hi) of its blob bytes (t-relative) depend on: r[0] its codes'
 * (the blocks holding those elements), r[1] its scales' (their blocks; under double quantization every block:
 * the scales' mean); empty ranges have r[k][0] == r[k][1]. Merged into r[0] when they meet. */
static void needed(const st_qlora_spec *s, const qtensor *t, size_t lo, size_t hi, size_t r[2][2]) {
    int nf4 = s->quant == ST_QLORA_NF4;
    size_t cb = nf4 ? (t->n + 1) / 2 : t->n, sc0 = align4(cb), B = (size_t)s->block;
    memset(r, 0, 4 * sizeof(size_t));
    if (lo < cb) {
        r[0][0] = nf4 ? 2 * lo : lo;
        r[0][1] = nf4 ? 2 * (hi < cb ? hi : cb) : (hi < cb ? hi : cb);
        whole_pieces(s, t->n, &r[0][0], &r[0][1]);
    }
    if (hi > sc0 && s->double_quant) r[1][1] = t->n;
    else if (hi > sc0) { /* fp32 scales: 4 bytes each */
        size_t a = (lo > sc0 ? lo - sc0 : 0) / 4, b = (hi - sc0 + 3) / 4;
        r[1][0] = a * B;
        r[1][1] = (b < t->ns ? b : t->ns) * B;
        whole_pieces(s, t->n, &r[1][0], &r[1][1]);
    }
    if (r[1][0] < r[1][1] && r[0][0] < r[0][1] && r[1][0] <= r[0][1] && r[0][0] <= r[1][1]) {
        r[0][0] = r[0][0] < r[1][0] ? r[0][0] : r[1][0];
        r[0][1] = r[0][1] > r[1][1] ? r[0][1] : r[1][1];
        r[1][0] = r[1][1] = 0;
    }
}

void st_qlora_code_elems(const st_model *m, int i, size_t a, size_t b, size_t *e0, size_t *e1) {
    const st_qlora *q = m->qlora;
    int k = q ? find(q, i) : -1;
    *e0 = *e1 = 0;
    if (k < 0) return;
    const qtensor *t = &q->t[k];
    int nf4 = q->spec.quant == ST_QLORA_NF4;
    size_t cb = nf4 ? (t->n + 1) / 2 : t->n, lo = a > t->at ? a - t->at : 0, hi = b > t->at ? b - t->at : 0;
    if (hi > cb) hi = cb;
    if (lo >= hi) return;
    *e0 = nf4 ? 2 * lo : lo;
    *e1 = nf4 ? 2 * hi : hi;
    if (*e1 > t->n) *e1 = t->n;
}

int st_qlora_put_bytes(st_model *m, int i, size_t a, size_t b, st_qlora_read_fn rd, void *ctx, uint8_t *dst,
                       int *mean_set) {
    st_qlora *q = m->qlora;
    int k = q ? find(q, i) : -1;
    *mean_set = 0;
    if (k < 0) return st_fail(ST_EINVAL, "st_qlora_put_bytes: %s is not quantized", m->params[i].name);
    qtensor *t = &q->t[k];
    const st_qlora_spec *s = &q->spec;
    size_t ta = a > t->at ? a : t->at, tb = b < t->at + t->bytes ? b : t->at + t->bytes;
    if (ta >= tb) return 0;
    size_t lo = ta - t->at, hi = tb - t->at, r[2][2];
    needed(s, t, lo, hi, r);
    /* the tensor's bytes on the host (zeros: the padding), its fp32 scales, one piece of its values */
    qtensor h = *t;
    h.at = 0;
    uint8_t *stage = calloc(t->bytes + 1, 1);
    float *scales = NULL, *buf = malloc(q->chunk * sizeof(float));
    if (stage) place(&h, s, stage);
    if (stage) scales = s->double_quant ? calloc(t->ns + 1, sizeof(float)) : h.scales;
    int rc = stage && scales && buf ? 0 : st_fail(ST_ENOMEM, "out of memory quantizing %s", m->params[i].name);
    int nf4 = s->quant == ST_QLORA_NF4;
    for (int j = 0; !rc && j < 2; j++)
        for (size_t at = r[j][0]; !rc && at < r[j][1]; at += q->chunk) { /* at: a multiple of 2 * block */
            size_t n = r[j][1] - at < q->chunk ? r[j][1] - at : q->chunk;
            rc = rd(ctx, i, at, n, buf);
            if (!rc) st_qlora_quant_tensor(s->quant, buf, n, s->block, h.codes + (nf4 ? at / 2 : at),
                                           scales + at / (size_t)s->block);
        }
    size_t sc0 = align4(nf4 ? (t->n + 1) / 2 : t->n);
    if (!rc && s->double_quant && hi > sc0) { /* every scale is here (needed): the mean is this rank's to give */
        st_qlora_double_quant(scales, t->ns, h.q8, h.scale2, &t->mean);
        *mean_set = 1;
    }
    if (!rc) m->be->copy_to_device(dst + (ta - a), stage + lo, hi - lo);
    if (s->double_quant) free(scales);
    free(stage);
    free(buf);
    return rc;
}

float st_qlora_mean(const st_model *m, int i) {
    int k = m->qlora ? find(m->qlora, i) : -1;
    return k < 0 ? 0.0f : m->qlora->t[k].mean;
}

void st_qlora_set_mean(st_model *m, int i, float mean) {
    int k = m->qlora ? find(m->qlora, i) : -1;
    if (k >= 0) m->qlora->t[k].mean = mean;
}

size_t st_qlora_put_bytes_work(const st_model *m, const st_qlora_spec *s) {
    size_t most = 0;
    for (int i = 0; i < st_model_base_params(m); i++) {
        const st_param *p = &m->params[i];
        if (!quantizable(p)) continue;
        size_t ns = n_blocks(p->numel, s->block), b = tensor_bytes(s, p->numel, ns) + (s->double_quant ? ns * sizeof(float) : 0);
        if (b > most) most = b;
    }
    return most + chunk_floats(s->block) * sizeof(float);
}
