/* ref_model.c — runs shardtune's model math on a given batch and dumps everything a reference
 * implementation needs to compare (tests/reference/test_model_torch.py).
 *
 *   ref_model --model DIR --batch BATCH.safetensors --out OUT.safetensors
 *             [--steps K --lr LR --beta1 B1 --beta2 B2 --eps E --wd WD --clip C
 *              --schedule constant|cosine|linear --warmup W --total S --min-lr-ratio R]
 *             [--precision fp32|bf16]
 *
 * BATCH holds "inputs" (I32 [B,T]), "targets" (I32 [B,T]) and "weight" (F32 [B,T], already divided by
 * the normalizer). OUT gets "logits" [B*T,V], "loss" [1] (sum of weight*loss), "loss_per_pos" [B*T],
 * "grad.<name>" (HF layout) of the first step, and with --steps K the weights after each AdamW step,
 * "step<k>.<name>", the unclipped gradients that step k used, "grad<k>.<name>" (k >= 2; step 1 used
 * "grad."), and "lr<k>" [1]. Every step reuses the same batch. No-decay set: norms, biases,
 * embeddings. --precision bf16 runs every matmul with bf16-rounded operands (kernels.h matmul_bf16).
 * --teacher DIR [--temperature T] [--alpha A]: the loss is knowledge distillation from that model
 * (worker/distill.h); OUT also gets "kd" and "ce" [1] (sums of weight * kd, weight * ce).
 * --teacher-precision fp32|bf16|int8 (default fp32): the teacher's own precision (bf16: its bf16 weight copy;
 * int8: distill.teacher_dtype int8, worker/model.h st_model_set_int8); OUT also gets "teacher_logits" [B*T,V].
 * --adapter DIR: a PEFT LoRA adapter directory applied on the model; the adapters are then the only
 * trainable tensors (grad.<name>.lora_A.weight ...; no base weight gradient exists).
 * --lora-dropout P,SEED,STEP,SAMPLE: the adapters train with LoRA dropout P (worker/lora.h), masks keyed by
 * SEED, STEP and the batch's first global sample index SAMPLE.
 * --qlora nf4|int8|nf4-dq|int8-dq [--qblock N]: after the adapter, the base's layer weights are quantized
 * (worker/qlora.h, -dq: double quantization); the dump adds "dequant.<name>" (HF layout) of every
 * quantized weight as the model dequantizes it and "qlora_bytes" [2] (quantized bytes, fp32 bytes they
 * replaced). Not with --steps.
 * BATCH may also hold "doc_pos" (I32 [B,T]): each token's position inside its document, so the model runs
 * document-packed (st_model_set_doc_positions). --act-ckpt 1 turns on activation checkpointing. */
#include <stdio.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>

#include "checkpoints/model_io.h"
#include "checkpoints/peft_dir.h"
#include "checkpoints/safetensors.h"
#include "common/error.h"
#include "worker/distill.h"
#include "worker/model.h"
#include "worker/optim.h"
#include "worker/lora.h"
#include "worker/qlora.h"

typedef struct {
    st_st_write_item *items;
    int n, cap;
    float **owned;
} outlist;

static char *dupname(const char *prefix, const char *name) {
    size_t n = strlen(prefix) + strlen(name) + 1;
    char *s = malloc(n);
    snprintf(s, n, "%s%s", prefix, name);
    return s;
}

static void add(outlist *o, char *name, float *data, int ndim, int64_t d0, int64_t d1) {
    if (o->n == o->cap) {
        o->cap = o->cap ? 2 * o->cap : 256;
        o->items = realloc(o->items, (size_t)o->cap * sizeof *o->items);
        o->owned = realloc(o->owned, (size_t)o->cap * sizeof *o->owned);
    }
    st_st_write_item *it = &o->items[o->n];
    memset(it, 0, sizeof *it);
    it->name = name;
    it->data = data;
    it->ndim = ndim;
    it->shape[0] = d0;
    it->shape[1] = d1;
    o->owned[o->n++] = data;
}

static void add_params(outlist *o, const st_model *m, const float *src, const char *prefix, int grads) {
    for (int i = 0; i < m->n_params; i++) {
        const st_param *p = &m->params[i];
        if (grads && p->grad_offset < 0) continue;
        float *hf = malloc(p->numel * sizeof(float));
        if (grads) {
            /* gradients share the weights' layout rules: reuse the HF conversion on a shifted base */
            const float *g = src + p->grad_offset - (long)p->offset;
            st_model_param_to_hf(m, i, g, hf);
        } else {
            st_model_param_to_hf(m, i, src, hf);
        }
        int64_t d0 = p->ndim == 2 && p->transpose_io ? p->shape[1] : p->shape[0];
        int64_t d1 = p->ndim == 2 && p->transpose_io ? p->shape[0] : p->shape[1];
        add(o, dupname(prefix, p->name), hf, p->ndim, d0, d1);
    }
}

static int read_batch(const char *path, int32_t **in, int32_t **tg, float **w, int32_t **pos, int *B, int *T) {
    st_safetensors *s;
    int rc = st_safetensors_open(path, &s);
    if (rc) return rc;
    const st_st_tensor *ti = st_safetensors_find(s, "inputs"), *tt = st_safetensors_find(s, "targets"),
                       *tw = st_safetensors_find(s, "weight");
    if (!ti || !tt || !tw || ti->ndim != 2) { st_safetensors_close(s); return st_fail(ST_EFORMAT, "%s: needs inputs, targets, weight [B,T]", path); }
    *B = (int)ti->shape[0];
    *T = (int)ti->shape[1];
    size_t n = (size_t)*B * *T;
    *in = malloc(n * 4);
    *tg = malloc(n * 4);
    *w = malloc(n * 4);
    rc = st_safetensors_read_raw(s, ti, *in, n * 4);
    if (!rc) rc = st_safetensors_read_raw(s, tt, *tg, n * 4);
    if (!rc) rc = st_safetensors_read_f32(s, tw, *w, n);
    const st_st_tensor *tp = st_safetensors_find(s, "doc_pos");
    if (!rc && tp) {
        *pos = malloc(n * 4);
        rc = *pos ? st_safetensors_read_raw(s, tp, *pos, n * 4) : st_fail(ST_ENOMEM, "out of memory");
    }
    st_safetensors_close(s);
    return rc;
}

int main(int argc, char **argv) {
    const char *model_dir = NULL, *batch = NULL, *out = NULL, *sched = "constant", *precision = "fp32";
    const char *teacher_dir = NULL, *adapter = NULL, *qlora = NULL, *t_precision = "fp32", *dropout = NULL;
    int qblock = 64, act_ckpt = 0;
    float kd_t = 2.0f, kd_alpha = 0.5f;
    int steps = 0;
    st_optim_config oc = {1e-3f, 0.9f, 0.999f, 1e-8f, 0.0f, ST_SCHED_CONSTANT, 0, 0, 0.0f, 1.0f};
    float clip = 0;
    for (int i = 1; i + 1 < argc; i += 2) {
        const char *a = argv[i], *v = argv[i + 1];
        if (!strcmp(a, "--model")) model_dir = v;
        else if (!strcmp(a, "--batch")) batch = v;
        else if (!strcmp(a, "--out")) out = v;
        else if (!strcmp(a, "--steps")) steps = atoi(v);
        else if (!strcmp(a, "--lr")) oc.lr = (float)atof(v);
        else if (!strcmp(a, "--beta1")) oc.beta1 = (float)atof(v);
        else if (!strcmp(a, "--beta2")) oc.beta2 = (float)atof(v);
        else if (!strcmp(a, "--eps")) oc.eps = (float)atof(v);
        else if (!strcmp(a, "--wd")) oc.weight_decay = (float)atof(v);
        else if (!strcmp(a, "--clip")) clip = (float)atof(v);
        else if (!strcmp(a, "--schedule")) sched = v;
        else if (!strcmp(a, "--warmup")) oc.warmup_steps = atoi(v);
        else if (!strcmp(a, "--total")) oc.total_steps = atoi(v);
        else if (!strcmp(a, "--min-lr-ratio")) oc.min_lr_ratio = (float)atof(v);
        else if (!strcmp(a, "--precision")) precision = v;
        else if (!strcmp(a, "--teacher")) teacher_dir = v;
        else if (!strcmp(a, "--teacher-precision")) t_precision = v;
        else if (!strcmp(a, "--adapter")) adapter = v;
        else if (!strcmp(a, "--qlora")) qlora = v;
        else if (!strcmp(a, "--lora-dropout")) dropout = v;
        else if (!strcmp(a, "--qblock")) qblock = atoi(v);
        else if (!strcmp(a, "--temperature")) kd_t = (float)atof(v);
        else if (!strcmp(a, "--alpha")) kd_alpha = (float)atof(v);
        else if (!strcmp(a, "--act-ckpt")) act_ckpt = atoi(v);
        else { fprintf(stderr, "ref_model: unknown flag %s\n", a); return 2; }
    }
    if (!model_dir || !batch || !out) { fprintf(stderr, "usage: ref_model --model DIR --batch F --out F [...]\n"); return 2; }
    oc.schedule = !strcmp(sched, "cosine") ? ST_SCHED_COSINE : !strcmp(sched, "linear") ? ST_SCHED_LINEAR : ST_SCHED_CONSTANT;
    const st_backend *be = st_backend_cpu(0);
    st_model m;
    int32_t *in = NULL, *tg = NULL, *pos = NULL;
    float *w = NULL;
    int B = 0, T = 0;
    int rc = st_model_load_dir(model_dir, be, &m);
    if (!rc) rc = read_batch(batch, &in, &tg, &w, &pos, &B, &T);
    unsigned char *all = calloc((size_t)m.cfg.n_layer, 1);
    memset(all, 1, (size_t)m.cfg.n_layer);
    if (!rc && adapter) rc = st_peft_load_dir(&m, adapter);
    if (!rc && dropout) {
        double p = 0;
        unsigned long long seed = 0;
        long long step = 0, sample = 0;
        rc = sscanf(dropout, "%lf,%llu,%lld,%lld", &p, &seed, &step, &sample) != 4
                 ? st_fail(ST_EINVAL, "--lora-dropout %s: expected P,SEED,STEP,SAMPLE", dropout)
                 : st_lora_set_dropout(&m, p, seed);
        if (!rc) st_lora_dropout_batch(&m, step, sample);
    }
    if (!rc && qlora) {
        st_qlora_spec qs = {.quant = strncmp(qlora, "int8", 4) ? ST_QLORA_NF4 : ST_QLORA_INT8,
                            .double_quant = strstr(qlora, "-dq") != NULL, .block = qblock};
        rc = steps ? st_fail(ST_EINVAL, "--qlora with --steps is not supported") : st_qlora_quantize(&m, &qs);
    }
    if (!rc) rc = st_model_set_trainable(&m, all, adapter ? (m.prompt ? ST_MOD_PROMPT : ST_MOD_LORA) : ST_MOD_ALL);
    if (!rc && act_ckpt) rc = st_model_set_activation_checkpointing(&m, 1);
    if (!rc) rc = st_model_alloc_activations(&m, B, T);
    if (!rc && strcmp(precision, "fp32") && strcmp(precision, "bf16"))
        rc = st_fail(ST_EINVAL, "--precision %s: expected fp32 or bf16", precision);
    if (!rc) rc = st_model_set_precision(&m, strcmp(precision, "bf16") ? ST_PRECISION_FP32 : ST_PRECISION_BF16);
    st_model teacher;
    st_distill kd = {0};
    if (!rc && teacher_dir && !(rc = st_model_load_dir(teacher_dir, be, &teacher))) {
        rc = st_model_set_activation_checkpointing(&teacher, 1); /* as the trainer's teacher */
        if (!rc) rc = st_model_alloc_activations(&teacher, B, T);
        if (!rc)
            rc = st_model_set_precision(&teacher, strcmp(t_precision, "bf16") ? ST_PRECISION_FP32 : ST_PRECISION_BF16);
        if (!rc && !strcmp(t_precision, "int8")) rc = st_model_set_int8(&teacher, NULL);
        if (!rc) rc = st_distill_init(&kd, &teacher, &m, kd_t, kd_alpha);
    }
    if (!rc && pos) rc = st_model_set_doc_positions(&m, pos);
    if (rc) { fprintf(stderr, "ref_model: %s\n", st_error()); return 1; }
    size_t N = (size_t)B * m.T; /* a prompt (worker/prompt.h) widens the rows */
    float *t_logits = teacher_dir ? malloc((size_t)B * T * (size_t)m.cfg.vocab * sizeof(float)) : NULL;
    kd.capture_t_logits = t_logits;
    if (teacher_dir) st_distill_attach(&kd, &m, in);
    outlist o = {0};
    float *logits = malloc(N * (size_t)m.cfg.vocab * sizeof(float));
    m.capture_logits = logits;
    st_model_zero_grad(&m);
    float *loss = malloc(sizeof(float));
    *loss = (float)st_model_forward(&m, in, tg, w, 1);
    m.capture_logits = NULL;
    st_model_backward(&m);
    float *lpp = malloc((size_t)B * T * sizeof(float)); /* the batch's positions (a prompt's rows dropped) */
    memcpy(lpp, m.loss_per_pos, (size_t)B * T * sizeof(float));
    add(&o, dupname("", "logits"), logits, 2, (int64_t)N, m.cfg.vocab);
    add(&o, dupname("", "loss"), loss, 1, 1, 0);
    add(&o, dupname("", "loss_per_pos"), lpp, 1, (int64_t)B * T, 0);
    if (teacher_dir) {
        float *kdv = malloc(sizeof(float)), *cev = malloc(sizeof(float));
        double kds, ces;
        st_distill_parts(&kd, &kds, &ces);
        *kdv = (float)kds;
        *cev = (float)ces;
        add(&o, dupname("", "kd"), kdv, 1, 1, 0);
        add(&o, dupname("", "ce"), cev, 1, 1, 0);
        add(&o, dupname("", "teacher_logits"), t_logits, 2, (int64_t)B * T, m.cfg.vocab);
        kd.capture_t_logits = NULL;
    }
    add_params(&o, &m, m.grads, "grad.", 1);
    for (int i = 0; qlora && i < m.n_params; i++) {
        if (!st_qlora_holds(&m, i)) continue;
        const st_param *p = &m.params[i];
        float *hf = malloc(p->numel * sizeof(float)), *dq = malloc(p->numel * sizeof(float));
        st_qlora_dequant_param(&m, i, dq, 0); /* no place in m.weights (worker/qlora.h): its own buffer */
        if (p->ndim == 2 && p->transpose_io) /* HF layout, as st_model_param_to_hf */
            for (int64_t r = 0; r < p->shape[0]; r++)
                for (int64_t k = 0; k < p->shape[1]; k++) hf[k * p->shape[0] + r] = dq[r * p->shape[1] + k];
        else
            memcpy(hf, dq, p->numel * sizeof(float));
        free(dq);
        int64_t d0 = p->transpose_io ? p->shape[1] : p->shape[0], d1 = p->transpose_io ? p->shape[0] : p->shape[1];
        add(&o, dupname("dequant.", p->name), hf, 2, d0, d1);
    }
    if (qlora) {
        size_t qb, fb;
        st_qlora_bytes(&m, &qb, &fb);
        float *v = malloc(2 * sizeof(float));
        v[0] = (float)qb;
        v[1] = (float)fb;
        add(&o, dupname("", "qlora_bytes"), v, 1, 2, 0);
    }
    st_optim opt;
    rc = st_optim_init(&opt, &oc, 0, m.grad_alloc, &m, be);
    for (int k = 1; k <= steps && !rc; k++) {
        if (k > 1) {
            st_model_zero_grad(&m);
            st_model_forward(&m, in, tg, w, 1);
            st_model_backward(&m);
            char gprefix[32];
            snprintf(gprefix, sizeof gprefix, "grad%d.", k);
            add_params(&o, &m, m.grads, gprefix, 1);
        }
        double norm = sqrt(be->sumsq(m.grads, m.n_grads));
        float lr = st_lr_at(&oc, k - 1);
        st_optim_update(&opt, &m, m.grads, lr, st_clip_scale(norm, clip));
        char prefix[32];
        snprintf(prefix, sizeof prefix, "step%d.", k);
        add_params(&o, &m, m.weights, prefix, 0);
        float *lrv = malloc(sizeof(float));
        *lrv = lr;
        snprintf(prefix, sizeof prefix, "lr%d", k);
        add(&o, dupname("", prefix), lrv, 1, 1, 0);
    }
    if (!rc) rc = st_safetensors_write(out, o.n, o.items, NULL);
    if (rc) { fprintf(stderr, "ref_model: %s\n", st_error()); return 1; }
    for (int i = 0; i < o.n; i++) { free((void *)o.items[i].name); free(o.owned[i]); }
    free(o.items); free(o.owned); free(all); free(in); free(tg); free(w); free(pos);
    st_optim_free(&opt, be);
    free(opt.param_step);
    st_model_free(&m);
    return 0;
}
