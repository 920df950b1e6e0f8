/* qlora.c — quantized frozen base for QLoRA (see qlora.h).
 *
 * Layout after st_qlora_quantize: m->weights = [kept base params | scratch (one layer's quantized weights) |
 * adapters]. Every quantized parameter's offset points into the scratch at its place in its layer, so the
 * model's weight pointers (wptr, the packed q/k/v and gate/up matmuls) work unchanged once the layer is
 * acquired. */
#include "worker/qlora.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/error.h"
#include "kernels/kernels.h"

#define DQ_BLOCK 256 /* scales per double-quantization block (bitsandbytes' blocksize for the absmax) */

typedef struct {
    int param;        /* registry index */
    size_t n;         /* elements */
    uint8_t *codes;   /* nf4: (n + 1) / 2 bytes; int8: n */
    size_t ns;        /* scales */
    float *scales;    /* ns floats, or NULL with double_quant */
    int8_t *q8;       /* double_quant: ns codes */
    float *scale2;    /* double_quant: ceil(ns / 256) */
    float mean;       /* double_quant: the scales' mean */
} qtensor;

struct st_qlora {
    st_qlora_spec spec;
    int n;
    qtensor *t;       /* registry order */
    float *sbuf;      /* [max ns]: dequantized scales of the tensor being acquired */
    size_t fp32_bytes;
    const st_backend *dev; /* a device backend: codes, scales, q8, scale2 and sbuf are its memory; else NULL */
};

static size_t n_blocks(size_t n, int block) { return (n + (size_t)block - 1) / (size_t)block; }

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

static void free_tensor(qtensor *t) {
    free(t->codes);
    free(t->scales);
    free(t->q8);
    free(t->scale2);
}

/* A device backend: the quantized tensor moves to device memory (quantized on the host, as on the CPU). */
static void *upload(const st_backend *be, void **host, size_t bytes, int *bad) {
    void *d = *host ? be->alloc(bytes + 1) : NULL;
    if (d) be->copy_to_device(d, *host, bytes);
    if (*host && !d) *bad = 1;
    free(*host);
    *host = NULL;
    return d;
}

static int upload_tensor(const st_backend *be, int nf4, qtensor *t) {
    int bad = 0;
    size_t nc = nf4 ? (t->n + 1) / 2 : t->n, n2 = n_blocks(t->ns, DQ_BLOCK);
    t->codes = upload(be, (void **)&t->codes, nc, &bad);
    t->scales = upload(be, (void **)&t->scales, t->ns * sizeof(float), &bad);
    t->q8 = upload(be, (void **)&t->q8, t->ns, &bad);
    t->scale2 = upload(be, (void **)&t->scale2, n2 * sizeof(float), &bad);
    return bad ? st_fail(ST_ENOMEM, "out of device memory for the quantized base") : 0;
}

void st_qlora_free(st_qlora *q) {
    if (!q) return;
    for (int i = 0; i < q->n; i++) {
        if (!q->dev) { free_tensor(&q->t[i]); continue; }
        void *p[] = {q->t[i].codes, q->t[i].scales, q->t[i].q8, q->t[i].scale2};
        for (int j = 0; j < 4; j++) if (p[j]) q->dev->free(p[j]);
    }
    free(q->t);
    if (q->dev && q->sbuf) q->dev->free(q->sbuf);
    else free(q->sbuf);
    free(q);
}

/* What QLoRA quantizes: the 2-D weights inside the layers (not the adapters, embeddings or head). */
static int quantizable(const st_param *p) {
    return p->layer >= 0 && p->ndim == 2 && (p->kind == ST_MOD_ATTN || p->kind == ST_MOD_MLP);
}

static int quantize_one(const st_model *m, const st_qlora_spec *s, int idx, qtensor *t, float *host) {
    const st_param *p = &m->params[idx];
    t->param = idx;
    t->n = p->numel;
    t->ns = n_blocks(p->numel, s->block);
    t->codes = malloc(s->quant == ST_QLORA_NF4 ? (t->n + 1) / 2 : t->n);
    t->scales = malloc(t->ns * sizeof(float));
    if (!t->codes || !t->scales) return st_fail(ST_ENOMEM, "out of memory quantizing %s", p->name);
    m->be->copy_to_host(host, m->weights + p->offset, p->numel * sizeof(float));
    st_qlora_quant_tensor(s->quant, host, t->n, s->block, t->codes, t->scales);
    if (!s->double_quant) return 0;
    t->q8 = malloc(t->ns);
    t->scale2 = malloc(n_blocks(t->ns, DQ_BLOCK) * sizeof(float));
    if (!t->q8 || !t->scale2) return st_fail(ST_ENOMEM, "out of memory quantizing %s", p->name);
    st_qlora_double_quant(t->scales, t->ns, t->q8, t->scale2, &t->mean);
    free(t->scales);
    t->scales = NULL;
    return 0;
}

/* Moves every kept parameter to its new offset in a new, smaller buffer; quantized ones point at the
 * scratch. */
static int compact(st_model *m, const st_qlora *q) {
    int n = m->n_params, nb = st_model_base_params(m);
    size_t *off = malloc((size_t)n * sizeof *off), at = 0, scratch = 0, layer_at = 0;
    unsigned char *isq = calloc((size_t)n, 1);
    if (!off || !isq) { free(off); free(isq); return st_fail(ST_ENOMEM, "out of memory"); }
    for (int k = 0; k < q->n; k++) isq[q->t[k].param] = 1;
    for (int i = 0; i < nb; i++)
        if (!isq[i]) { off[i] = at; at += m->params[i].numel; }
    size_t scratch0 = at;
    int cur = -1;
    for (int i = 0; i < nb; i++) { /* per layer, in registry order */
        if (!isq[i]) continue;
        if (m->params[i].layer != cur) { cur = m->params[i].layer; layer_at = 0; }
        off[i] = scratch0 + layer_at;
        layer_at += m->params[i].numel;
        if (layer_at > scratch) scratch = layer_at;
    }
    size_t base_end = scratch0 + scratch;
    for (int i = nb; i < n; i++) off[i] = base_end + (m->params[i].offset - m->n_base_weights);
    size_t total = base_end + (m->n_weights - (m->lora ? m->n_base_weights : m->n_weights));
    float *nw = m->be->alloc(total * sizeof(float) + sizeof(float));
    if (!nw) { free(off); free(isq); return st_fail(ST_ENOMEM, "out of memory for the QLoRA weight buffer"); }
    for (int i = 0; i < n; i++)
        if (i >= nb || !isq[i]) m->be->copy(nw + off[i], m->weights + m->params[i].offset, m->params[i].numel * sizeof(float));
    m->be->free(m->weights);
    m->weights = nw;
    for (int i = 0; i < n; i++) m->params[i].offset = off[i];
    if (m->lora) m->n_base_weights = base_end;
    m->n_weights = total;
    free(off);
    free(isq);
    return 0;
}

int st_qlora_quantize(st_model *m, const st_qlora_spec *s) {
    if (!m->be) return st_fail(ST_EINVAL, "the model has no backend to quantize on");
    if (m->acquire) return st_fail(ST_ECONFIG, "finetune.mode qlora with sharding.stage 3 is not supported yet");
    if (m->weights_bf16) /* the bf16 copy is sized for the fp32 buffer that compact() shrinks */
        return st_fail(ST_EINVAL, "the base must be quantized before precision bf16 is set");
    if (s->block < 1) return st_fail(ST_ECONFIG, "finetune.qlora.block must be >= 1, got %d", s->block);
    if (m->qlora) return st_fail(ST_EINVAL, "the model's base is already quantized");
    st_qlora *q = calloc(1, sizeof *q);
    if (q) q->t = calloc((size_t)m->n_params, sizeof *q->t);
    float *host = NULL;
    size_t max_n = 0, max_ns = 0;
    for (int i = 0; i < st_model_base_params(m); i++)
        if (quantizable(&m->params[i]) && m->params[i].numel > max_n) max_n = m->params[i].numel;
    if (q && q->t) host = malloc(max_n * sizeof(float) + 1);
    int rc = host ? 0 : st_fail(ST_ENOMEM, "out of memory quantizing the base model");
    if (q) q->spec = *s;
    if (q && !m->be->host_memory) q->dev = m->be;
    for (int i = 0; !rc && i < st_model_base_params(m); i++) {
        if (!quantizable(&m->params[i])) continue;
        rc = quantize_one(m, s, i, &q->t[q->n], host);
        if (q->dev && rc) { free_tensor(&q->t[q->n]); memset(&q->t[q->n], 0, sizeof q->t[q->n]); }
        if (q->dev && !rc) rc = upload_tensor(q->dev, s->quant == ST_QLORA_NF4, &q->t[q->n]);
        q->fp32_bytes += m->params[i].numel * sizeof(float);
        if (q->t[q->n].ns > max_ns) max_ns = q->t[q->n].ns;
        q->n++;
    }
    free(host);
    if (!rc && !(q->sbuf = q->dev ? q->dev->alloc(max_ns * sizeof(float) + 1) : malloc(max_ns * sizeof(float) + 1)))
        rc = st_fail(ST_ENOMEM, "out of memory");
    if (!rc) rc = compact(m, q);
    if (rc) { st_qlora_free(q); return rc; }
    m->qlora = q;
    st_model_weights_changed(m);
    return 0;
}

void st_qlora_acquire(const st_model *m, int first, int last) {
    st_qlora *q = m->qlora;
    const st_backend *be = m->be;
    for (int k = 0; k < q->n; k++) {
        const qtensor *t = &q->t[k];
        if (t->param < first || t->param >= last) continue;
        const float *s = t->scales;
        if (!s) { /* double quantization: the scales first */
            be->dequant_int8(q->sbuf, t->q8, t->scale2, t->ns, DQ_BLOCK);
            be->add_scalar(q->sbuf, t->mean, t->ns);
            s = q->sbuf;
        }
        float *out = m->weights + m->params[t->param].offset;
        if (q->spec.quant == ST_QLORA_NF4)
            be->dequant_nf4(out, t->codes, s, t->n, q->spec.block);
        else
            be->dequant_int8(out, (const int8_t *)t->codes, s, t->n, q->spec.block);
        /* precision bf16: the matmuls read the dequantized layer rounded to bf16 (the fused dequant's output
         * precision); the fp32 values stay for the adapters and DoRA */
        if (m->weights_bf16) be->to_bf16(m->weights_bf16 + m->params[t->param].offset, out, t->n);
    }
}

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
        b += q->spec.quant == ST_QLORA_NF4 ? (t->n + 1) / 2 : t->n;
        b += t->scales ? t->ns * sizeof(float) : t->ns + n_blocks(t->ns, DQ_BLOCK) * sizeof(float) + sizeof(float);
    }
    *quantized = b;
    *fp32 = q ? q->fp32_bytes : 0;
}

int st_qlora_materialize(st_model *m) {
    st_qlora *q = m->qlora;
    if (!q) return 0;
    size_t total = 0, nb = 0;
    for (int i = 0; i < m->n_params; i++) {
        total += m->params[i].numel;
        if (i < st_model_base_params(m)) nb += m->params[i].numel;
    }
    float *nw = m->be->alloc(total * sizeof(float) + sizeof(float));
    if (!nw) return st_fail(ST_ENOMEM, "cannot allocate %.1f MB for the dequantized base", total * 4.0 / 1e6);
    size_t at = 0;
    for (int i = 0; i < m->n_params; i++) { /* registry order: q/k/v and gate/up stay adjacent */
        st_param *p = &m->params[i];
        if (st_qlora_holds(m, i)) st_qlora_acquire(m, i, i + 1);
        m->be->copy(nw + at, m->weights + p->offset, p->numel * sizeof(float));
        p->offset = at;
        at += p->numel;
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
                        size_t *scratch) {
    size_t qb = 0, fb = 0, layer = 0, most = 0;
    int cur = -1;
    for (int i = 0; i < st_model_base_params(m); i++) {
        const st_param *p = &m->params[i];
        if (!quantizable(p)) continue;
        size_t ns = n_blocks(p->numel, s->block);
        qb += s->quant == ST_QLORA_NF4 ? (p->numel + 1) / 2 : p->numel;
        qb += s->double_quant ? ns + n_blocks(ns, DQ_BLOCK) * sizeof(float) + sizeof(float) : ns * sizeof(float);
        fb += p->numel * sizeof(float);
        if (p->layer != cur) { cur = p->layer; layer = 0; }
        layer += p->numel;
        if (layer > most) most = layer;
    }
    *quantized = qb;
    *fp32 = fb;
    *scratch = most;
}
