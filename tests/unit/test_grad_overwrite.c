/* test_grad_overwrite.c — first-write gradients (st_model.grad_overwrite, worker/model.c grad_beta).
 *
 * With grad_overwrite the weight-gradient matmuls of the linear weights and the LM head write their
 * gradient with beta 0 on its first contribution after st_model_zero_grad, so those gradients are not zeroed
 * between steps (st_model_zero_grad and the ZeRO 0-1 optimizer leave them). Checked against the plain
 * accumulate-into-zeros model (grad_overwrite 0, every gradient zeroed), same weights and batches:
 *  - after a first step, the overwritten parameters' gradients are filled with NaN (the stale values a
 *    step leaves; beta 0 must never read them) and the rest zeroed by st_model_zero_grad; a second step of
 *    1 and of 3 accumulated micro-batches then gives every gradient bit for bit (memcmp): 0 + x = x, and
 *    each later micro-batch adds as before. GPT-2 with tied embeddings (the head's matmul writes wte first,
 *    the lookup's backward adds after), Llama (q/k/v and gate/up written together as one matmul), fp32 and
 *    bf16 with the head in vocabulary blocks (SHARDTUNE_HEAD_WIDEN_FLOATS: each block its own rows) and
 *    activation checkpointing with the MLP in token blocks (SHARDTUNE_MLP_BLOCK_FLOATS: several
 *    contributions per weight in one backward), top layer only and every layer trained.
 *  - st_model_grad_overwritten names exactly the linear weights and the head (a tied wte), never a norm,
 *    bias or an untied embedding, and nothing without grad_overwrite; st_model_zero_grad leaves the
 *    overwritten ones and zeroes every other gradient element (NaN-filled before). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/kernels.h"
#include "worker/model.h"
#include "worker/train_kinds.h"

enum { B = 2, T = 24, N = B * T, L = 3 };

static st_model_config config(st_family family) {
    st_model_config c;
    memset(&c, 0, sizeof c);
    c.family = family;
    snprintf(c.model_type, sizeof c.model_type, family == ST_FAMILY_GPT2 ? "gpt2" : "llama");
    c.n_layer = L; c.d_model = 32; c.n_head = 4; c.n_kv_head = family == ST_FAMILY_GPT2 ? 4 : 2;
    c.head_dim = 8; c.d_ff = 40; c.vocab = 53; c.max_seq = 32; c.norm_eps = 1e-5f; c.rope_theta = 10000.0f;
    c.qkv_bias = family == ST_FAMILY_GPT2; c.tied_embeddings = family == ST_FAMILY_GPT2;
    c.bos_id = c.eos_id = -1;
    return c;
}

static void build(st_model *m, const st_model_config *c, st_precision prec, int ckpt, int top_only, int overwrite) {
    assert_int_equal(st_model_build(m, c, st_backend_cpu(2)), 0);
    assert_int_equal(st_model_init_random(m, 7), 0);
    unsigned char layers[L];
    for (int l = 0; l < L; l++) layers[l] = !top_only || l == L - 1;
    m->grad_align = 1;
    assert_int_equal(st_model_set_trainable(m, layers, top_only ? ST_MOD_ATTN | ST_MOD_MLP | ST_MOD_HEAD : ST_MOD_ALL), 0);
    assert_int_equal(st_model_alloc_activations(m, B, T), 0);
    assert_int_equal(st_model_set_precision(m, prec), 0);
    assert_int_equal(st_model_set_activation_checkpointing(m, ckpt), 0);
    m->grad_overwrite = overwrite;
}

/* micro-batch a's inputs, targets and loss weights */
static void batch(int a, int32_t *in, int32_t *tg, float *w) {
    for (int i = 0; i < N; i++) {
        in[i] = (i * 7 + 3 + 11 * a) % 53;
        tg[i] = (i * 5 + 1 + 13 * a) % 53;
        w[i] = (i % 5 ? 1.0f : 0.0f) / N;
    }
}

/* One step of `accum` micro-batches (starting at micro-batch `first`): st_model_zero_grad, then forward and
 * backward each. */
static void step(st_model *m, int first, int accum) {
    int32_t in[N], tg[N];
    float w[N];
    st_model_zero_grad(m);
    for (int a = 0; a < accum; a++) {
        batch(first + a, in, tg, w);
        st_model_forward(m, in, tg, w, 1);
        st_model_backward(m);
    }
}

/* Whether parameter i is a linear weight or the head (what grad_beta writes first). */
static int is_matmul_weight(const st_model *m, int i) {
    const st_param *p = &m->params[i];
    if (p->ndim != 2) return 0;
    if (p->layer >= 0) return 1;
    if (!strcmp(p->name, "lm_head.weight")) return 1;
    return i == 0 && m->cfg.tied_embeddings; /* the tied head */
}

static void check(st_family family, st_precision prec, int ckpt, int top_only, int accum) {
    st_model_config c = config(family);
    st_model a, b;
    build(&a, &c, prec, ckpt, top_only, 0);
    build(&b, &c, prec, ckpt, top_only, 1);
    step(&a, 0, 1);
    step(&b, 0, 1);
    const char *what = family == ST_FAMILY_GPT2 ? "gpt2" : "llama";
    for (int i = 0; i < b.n_params; i++) {
        if (b.params[i].grad_offset < 0) continue;
        if (st_model_grad_overwritten(&a, i)) fail_msg("%s: overwritten without grad_overwrite", a.params[i].name);
        if (st_model_grad_overwritten(&b, i) != is_matmul_weight(&b, i))
            fail_msg("%s %s: %s overwritten %d, expected %d", what, prec == ST_PRECISION_BF16 ? "bf16" : "fp32",
                     b.params[i].name, st_model_grad_overwritten(&b, i), is_matmul_weight(&b, i));
    }
    /* the stale state a step leaves: NaN everywhere; st_model_zero_grad must zero all but the overwritten */
    for (size_t j = 0; j < b.grad_alloc; j++) b.grads[j] = NAN;
    int overwritten[b.n_params];
    for (int i = 0; i < b.n_params; i++) overwritten[i] = st_model_grad_overwritten(&b, i);
    st_model_zero_grad(&b);
    for (int i = 0; i < b.n_params; i++) {
        const st_param *p = &b.params[i];
        if (p->grad_offset < 0) continue;
        for (size_t j = 0; j < p->numel; j++) {
            float g = b.grads[p->grad_offset + j];
            if (overwritten[i] ? !isnan(g) : g != 0.0f)
                fail_msg("%s: st_model_zero_grad left %g at %zu (overwritten %d)", p->name, g, j, overwritten[i]);
        }
    }
    for (size_t j = b.n_grads; j < b.grad_alloc; j++) assert_true(b.grads[j] == 0.0f);
    for (int i = 0; i < b.n_params; i++) assert_false(st_model_grad_overwritten(&b, i)); /* a new accumulation */
    /* the second step: stale NaN under the overwritten gradients, none anywhere in a's */
    for (int i = 0; i < b.n_params; i++) {
        const st_param *p = &b.params[i];
        if (p->grad_offset >= 0 && overwritten[i])
            for (size_t j = 0; j < p->numel; j++) b.grads[p->grad_offset + j] = NAN;
    }
    b.grads_zero_lo = 0; /* as after a zeroing update of everything else: st_model_zero_grad zeroes nothing */
    b.grads_zero_hi = b.grad_alloc;
    for (int i = 0; i < b.n_params; i++) /* the marks of the first step, as the optimizer saw them */
        if (overwritten[i]) b.grad_state[i] = 3;
    step(&a, 1, accum);
    step(&b, 1, accum);
    double s = 0;
    for (int i = 0; i < a.n_params; i++) {
        const st_param *p = &a.params[i];
        if (p->grad_offset < 0) continue;
        if (memcmp(a.grads + p->grad_offset, b.grads + p->grad_offset, p->numel * sizeof(float)))
            fail_msg("%s %s ckpt %d top %d accum %d: gradient of %s differs with first writes", what,
                     prec == ST_PRECISION_BF16 ? "bf16" : "fp32", ckpt, top_only, accum, p->name);
        for (size_t j = 0; j < p->numel; j++) s += (double)a.grads[p->grad_offset + j] * a.grads[p->grad_offset + j];
    }
    assert_true(s > 0 && isfinite(s)); /* not trivially zero */
    st_model_free(&a);
    st_model_free(&b);
}

static void check_all(st_family family) {
    for (int prec = 0; prec < 2; prec++)
        for (int top = 0; top < 2; top++)
            for (int accum = 1; accum <= 3; accum += 2) {
                st_precision p = prec ? ST_PRECISION_BF16 : ST_PRECISION_FP32;
                check(family, p, 0, top, accum);
                check(family, p, 1, top, accum);
            }
}

static void test_gpt2_tied(void **state) {
    (void)state;
    check_all(ST_FAMILY_GPT2);
}

static void test_llama(void **state) {
    (void)state;
    check_all(ST_FAMILY_LLAMA);
}

int main(void) {
    /* small blocks: the bf16 head in vocabulary blocks, the checkpointed MLP in token blocks */
    setenv("SHARDTUNE_HEAD_WIDEN_FLOATS", "512", 1);
    setenv("SHARDTUNE_MLP_BLOCK_FLOATS", "1280", 1);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_gpt2_tied),
        cmocka_unit_test(test_llama),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
