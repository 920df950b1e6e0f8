/* test_bf16.c — mixed precision (precision: bf16) on the CPU backend.
 *
 *  - st_bf16_round against an independent reference (frexp + rint on 8 significant bits, ties to even).
 *  - matmul_bf16 equals the fp32 matmul of bf16-rounded operands bit for bit (every transpose, alpha/beta,
 *    a shape big enough to run on the OpenMP team), leaves A and B untouched, is close to a double
 *    reference on the rounded operands, and is NOT the plain fp32 matmul (the rounding really happens).
 *  - matmul_bf16 with operands already stored as bf16 equals the same call on their fp32 values bit for
 *    bit, and its bias epilogue equals matmul + bias_add; to_bf16 / from_bf16 are the kernels/bf16.h rule.
 *  - the model in bf16 sends every matmul (forward, LM head, backward) through matmul_bf16, never through
 *    matmul, with a scratch large enough for each call, and never reads an fp32 weight or a saved fp32
 *    activation as an operand (weights come from the bf16 copy); its saved activations take less memory;
 *    its loss and gradients are near the fp32 ones but not equal; after an optimizer step the bf16 copy
 *    follows the new weights; bad precisions and backends without the bf16 entries are refused. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/error.h"
#include "kernels/bf16.h"
#include "kernels/kernels.h"
#include "worker/model.h"

static uint64_t rng_state = 0x2545F4914F6CDD1DULL;
static double urand(void) { /* uniform [-1, 1) */
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (double)(rng_state >> 11) / (double)(1ULL << 53) * 2.0 - 1.0;
}
static float *frand(size_t n, double scale) {
    float *p = malloc((n ? n : 1) * sizeof(float));
    for (size_t i = 0; i < n; i++) p[i] = (float)(urand() * scale);
    return p;
}

/* Independent bf16 rounding of a finite normal float: keep 8 significant bits, rint (ties to even). */
static float ref_bf16(float f) {
    if (f == 0.0f) return f;
    int e;
    double mant = frexp((double)f, &e); /* f = mant * 2^e, 0.5 <= |mant| < 1 */
    return (float)ldexp(rint(mant * 256.0), e - 8);
}

static void test_rounding(void **state) {
    (void)state;
    for (int i = 0; i < 200000; i++) {
        float f = (float)(urand() * pow(10.0, 6.0 * urand()));
        float got = st_bf16_round(f), want = ref_bf16(f);
        if (memcmp(&got, &want, sizeof got)) fail_msg("bf16(%.9g) = %.9g, expected %.9g", f, got, want);
    }
    /* exact ties round to the even neighbour, both directions */
    assert_true(st_bf16_round(1.0f + 1.0f / 256) == 1.0f);
    assert_true(st_bf16_round(1.0f + 3.0f / 256) == 1.0f + 4.0f / 256);
    assert_true(st_bf16_round(-(1.0f + 1.0f / 256)) == -1.0f);
    assert_true(isnan(st_bf16_round(NAN)) && isinf(st_bf16_round(INFINITY)));
    assert_true(st_bf16_round(3.4e38f) == INFINITY); /* above the largest bf16: rounds to inf */
}

/* ---- matmul_bf16 ---- */

static void check_matmul(const st_backend *be, int m, int n, int k, int ta, int tb, float alpha, float beta) {
    size_t na = (size_t)m * k, nb = (size_t)k * n, nc = (size_t)m * n;
    float *a = frand(na, 1), *b = frand(nb, 1), *c0 = frand(nc, 1);
    float *a0 = malloc(na * 4), *b0 = malloc(nb * 4), *ra = malloc(na * 4), *rb = malloc(nb * 4);
    memcpy(a0, a, na * 4);
    memcpy(b0, b, nb * 4);
    for (size_t i = 0; i < na; i++) ra[i] = st_bf16_round(a[i]);
    for (size_t i = 0; i < nb; i++) rb[i] = st_bf16_round(b[i]);
    float *got = malloc(nc * 4), *want = malloc(nc * 4), *plain = malloc(nc * 4);
    memcpy(got, c0, nc * 4);
    memcpy(want, c0, nc * 4);
    memcpy(plain, c0, nc * 4);
    size_t ns = st_matmul_bf16_scratch_floats(m, n, k);
    float *scratch = be->alloc(ns * sizeof(float));
    be->matmul_bf16(got, st_mm_f32(a), st_mm_f32(b), NULL, m, n, k, ta, tb, alpha, beta, scratch);
    be->matmul(want, ra, rb, m, n, k, ta, tb, alpha, beta);
    be->matmul(plain, a, b, m, n, k, ta, tb, alpha, beta);
    if (memcmp(got, want, nc * 4))
        fail_msg("matmul_bf16 %dx%dx%d ta=%d tb=%d differs from fp32 matmul of rounded operands", m, n, k, ta, tb);
    assert_memory_equal(a, a0, na * 4); /* operands are not modified */
    assert_memory_equal(b, b0, nb * 4);
    /* near a double reference on the rounded operands; far (relative to fp32 error) from the unrounded one */
    double err_bf = 0, err_plain = 0, scale = 0;
    for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++) {
            double s = 0, sp = 0;
            for (int p = 0; p < k; p++) {
                size_t ia = ta ? (size_t)p * m + i : (size_t)i * k + p, ib = tb ? (size_t)j * k + p : (size_t)p * n + j;
                s += (double)ra[ia] * rb[ib];
                sp += (double)a[ia] * b[ib];
            }
            double w = alpha * s + beta * (double)c0[(size_t)i * n + j];
            double wp = alpha * sp + beta * (double)c0[(size_t)i * n + j];
            err_bf = fmax(err_bf, fabs(got[(size_t)i * n + j] - w));
            err_plain = fmax(err_plain, fabs(got[(size_t)i * n + j] - wp));
            scale = fmax(scale, fabs(wp));
        }
    if (err_bf / scale > 1e-5) fail_msg("matmul_bf16 vs double on rounded operands: rel %.3g", err_bf / scale);
    if (err_plain / scale < 1e-4) /* bf16 rounding of k ~ 100 terms moves results by ~1e-3 relative */
        fail_msg("matmul_bf16 is suspiciously close to the unrounded product (rel %.3g)", err_plain / scale);
    if (!memcmp(got, plain, nc * 4)) fail_msg("matmul_bf16 equals the plain fp32 matmul: no rounding happened");
    be->free(scratch);
    free(a), free(b), free(c0), free(a0), free(b0), free(ra), free(rb), free(got), free(want), free(plain);
}

static void test_matmul_bf16(void **state) {
    (void)state;
    const st_backend *be = st_backend_cpu(2);
    assert_non_null(be->matmul_bf16);
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++) {
            check_matmul(be, 37, 29, 101, ta, tb, 0.7f, 0.3f); /* odd tails, one thread */
            check_matmul(be, 160, 140, 120, ta, tb, 1.0f, 1.0f); /* > 2^21 multiply-adds: OpenMP split */
        }
    check_matmul(be, 150, 200, 96, 0, 0, 1.0f, 0.0f); /* wider than tall: split by columns */
    /* k = 0: C = beta * C, exactly as the fp32 matmul */
    float c[6] = {1, 2, 3, 4, 5, 6}, dummy = 0;
    be->matmul_bf16(c, st_mm_f32(&dummy), st_mm_f32(&dummy), NULL, 2, 3, 0, 0, 0, 1.0f, 0.5f, NULL);
    for (int i = 0; i < 6; i++) assert_true(c[i] == 0.5f * (float)(i + 1));
    assert_int_equal(st_matmul_bf16_scratch_floats(0, 3, 4), 0);
    assert_true(st_matmul_bf16_scratch_floats(3, 5, 7) >= 3 * 7 + 7 * 5);
}

/* ---- bf16 operands, the bias epilogue and the storage conversions ---- */

static void test_bf16_operands_and_bias(void **state) {
    (void)state;
    const st_backend *be = st_backend_cpu(2);
    int m = 45, n = 70, k = 33;
    float *a = frand((size_t)m * k, 2.0), *b = frand((size_t)k * n, 0.5), *bias = frand((size_t)n, 1.0);
    uint16_t *ah = malloc((size_t)m * k * 2), *bh = malloc((size_t)k * n * 2);
    be->to_bf16(ah, a, (size_t)m * k);
    be->to_bf16(bh, b, (size_t)k * n);
    for (size_t i = 0; i < (size_t)m * k; i++)
        if (ah[i] != st_float_to_bf16_bits(a[i])) fail_msg("to_bf16 differs from kernels/bf16.h at %zu", i);
    float *back = malloc((size_t)m * k * 4);
    be->from_bf16(back, ah, (size_t)m * k);
    for (size_t i = 0; i < (size_t)m * k; i++)
        if (back[i] != st_bf16_round(a[i])) fail_msg("from_bf16(to_bf16(x)) != bf16(x) at %zu", i);
    size_t nc = (size_t)m * n;
    float *scratch = malloc(st_matmul_bf16_scratch_floats(m, n, k) * 4);
    float *c0 = frand(nc, 1.0), *want = malloc(nc * 4), *got = malloc(nc * 4);
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++) /* the same data read as op(A), op(B) in every layout */
            for (int mode = 1; mode < 4; mode++) { /* bit 0: A as bf16, bit 1: B as bf16 */
                memcpy(want, c0, nc * 4);
                be->matmul_bf16(want, st_mm_f32(a), st_mm_f32(b), NULL, m, n, k, ta, tb, 1.0f, 0.5f, scratch);
                memcpy(got, c0, nc * 4);
                be->matmul_bf16(got, mode & 1 ? st_mm_bf16(ah) : st_mm_f32(a), mode & 2 ? st_mm_bf16(bh) : st_mm_f32(b),
                                NULL, m, n, k, ta, tb, 1.0f, 0.5f, scratch);
                if (memcmp(got, want, nc * 4)) fail_msg("bf16 operands (mode %d, ta=%d tb=%d) change the result", mode, ta, tb);
            }
    /* round_bf16 in place is the same rule, and an operand marked rounded gives the same product */
    float *ar = malloc((size_t)m * k * 4);
    memcpy(ar, a, (size_t)m * k * 4);
    be->round_bf16(ar, (size_t)m * k);
    for (size_t i = 0; i < (size_t)m * k; i++)
        if (ar[i] != st_bf16_round(a[i])) fail_msg("round_bf16 differs from kernels/bf16.h at %zu", i);
    memcpy(want, c0, nc * 4);
    be->matmul_bf16(want, st_mm_f32(a), st_mm_f32(b), NULL, m, n, k, 1, 0, 1.0f, 0.5f, scratch);
    memcpy(got, c0, nc * 4);
    be->matmul_bf16(got, st_mm_f32_rounded(ar), st_mm_f32(b), NULL, m, n, k, 1, 0, 1.0f, 0.5f, scratch);
    if (memcmp(got, want, nc * 4)) fail_msg("a rounded operand changes the result");
    free(ar);
    /* the epilogue: C = A B + beta C + bias, the same as the product followed by bias_add */
    memcpy(want, c0, nc * 4);
    be->matmul_bf16(want, st_mm_bf16(ah), st_mm_f32(b), NULL, m, n, k, 0, 0, 1.0f, 1.0f, scratch);
    be->bias_add(want, bias, m, n);
    memcpy(got, c0, nc * 4);
    be->matmul_bf16(got, st_mm_bf16(ah), st_mm_f32(b), bias, m, n, k, 0, 0, 1.0f, 1.0f, scratch);
    assert_memory_equal(got, want, nc * 4);
    free(a), free(b), free(bias), free(ah), free(bh), free(back), free(scratch), free(c0), free(want), free(got);
}

/* ---- multi-tensor AdamW: each range exactly `adamw` (own lr, decay, step), plus its bf16 copy, and
 * with zero_grad its gradient zeroed in the same pass (the others' gradients untouched) ---- */

static void test_adamw_multi(void **state) {
    (void)state;
    const st_backend *be = st_backend_cpu(2);
    enum { R = 4 };
    const size_t n[R] = {1, 37, 5000, 70000}; /* the last one runs on the OpenMP team */
    st_adamw_range r[R];
    float *want_p[R], *want_m[R], *want_v[R], *grad_copy[R];
    for (int i = 0; i < R; i++) {
        float *g = frand(n[i], 0.1);
        r[i].param = frand(n[i], 1.0);
        r[i].grad = g;
        r[i].zero_grad = i == 0 || i == 3 ? g : NULL; /* one below the OpenMP threshold, one above */
        grad_copy[i] = malloc(n[i] * 4);
        memcpy(grad_copy[i], g, n[i] * 4);
        r[i].m = frand(n[i], 0.01);
        float *v = frand(n[i], 1e-4);
        for (size_t j = 0; j < n[i]; j++) v[j] = fabsf(v[j]);
        r[i].v = v;
        r[i].param_bf16 = i == 1 ? NULL : malloc(n[i] * 2); /* a range without a copy */
        r[i].n = n[i];
        r[i].lr = 1e-3f * (float)(i + 1);
        r[i].weight_decay = i % 2 ? 0.0f : 0.1f;
        r[i].step = 1 + 3 * i;
        want_p[i] = malloc(n[i] * 4), want_m[i] = malloc(n[i] * 4), want_v[i] = malloc(n[i] * 4);
        memcpy(want_p[i], r[i].param, n[i] * 4);
        memcpy(want_m[i], r[i].m, n[i] * 4);
        memcpy(want_v[i], r[i].v, n[i] * 4);
        be->adamw(want_p[i], r[i].grad, want_m[i], want_v[i], n[i], r[i].lr, 0.9f, 0.95f, 1e-8f, r[i].weight_decay,
                  0.5f, r[i].step);
    }
    be->adamw_multi(r, R, 0.9f, 0.95f, 1e-8f, 0.5f);
    for (int i = 0; i < R; i++) {
        assert_memory_equal(r[i].param, want_p[i], n[i] * 4);
        assert_memory_equal(r[i].m, want_m[i], n[i] * 4);
        assert_memory_equal(r[i].v, want_v[i], n[i] * 4);
        for (size_t j = 0; r[i].param_bf16 && j < n[i]; j++)
            if (r[i].param_bf16[j] != st_float_to_bf16_bits(want_p[i][j])) fail_msg("range %d: bf16 copy at %zu", i, j);
        for (size_t j = 0; j < n[i]; j++)
            if (r[i].grad[j] != (r[i].zero_grad ? 0.0f : grad_copy[i][j])) fail_msg("range %d: gradient at %zu", i, j);
        free(r[i].param), free((void *)r[i].grad), free(r[i].m), free(r[i].v), free(r[i].param_bf16);
        free(want_p[i]), free(want_m[i]), free(want_v[i]), free(grad_copy[i]);
    }
}

/* ---- the model in bf16: a spy backend sees every matmul ---- */

static st_backend spy;
static const st_backend *cpu;
static const st_model *spied_model;
static int fp32_calls, bf16_calls, scratch_too_small, fp32_weight_reads;

/* Does this fp32 operand point into the model's fp32 weights? (Under bf16 they must come from the copy.) */
static int is_fp32_weight(st_mm_in x) {
    const st_model *m = spied_model;
    return x.f32 && x.f32 >= m->weights && x.f32 < m->weights + m->n_weights;
}

static void spy_matmul(float *c, const float *a, const float *b, int m, int n, int k, int ta, int tb, float alpha,
                       float beta) {
    fp32_calls++;
    cpu->matmul(c, a, b, m, n, k, ta, tb, alpha, beta);
}

static void spy_matmul_bf16(float *c, st_mm_in a, st_mm_in b, const float *bias, int m, int n, int k, int ta, int tb,
                            float alpha, float beta, float *scratch) {
    bf16_calls++;
    if (scratch != spied_model->mm_scratch || st_matmul_bf16_scratch_floats(m, n, k) > spied_model->mm_scratch_floats)
        scratch_too_small++;
    if (is_fp32_weight(a) || is_fp32_weight(b)) fp32_weight_reads++;
    cpu->matmul_bf16(c, a, b, bias, m, n, k, ta, tb, alpha, beta, scratch);
}

static void build(st_model *m, st_family family, int tied, const st_backend *be) {
    st_model_config c;
    memset(&c, 0, sizeof c);
    c.family = family;
    snprintf(c.model_type, sizeof c.model_type, family == ST_FAMILY_GPT2 ? "gpt2" : "llama");
    c.n_layer = 2; c.d_model = 32; c.n_head = 4; c.n_kv_head = family == ST_FAMILY_GPT2 ? 4 : 2; c.head_dim = 8;
    c.d_ff = 48; c.vocab = 61; c.max_seq = 16; c.norm_eps = 1e-5f; c.rope_theta = 10000.0f;
    c.tied_embeddings = tied; c.qkv_bias = family == ST_FAMILY_GPT2; c.bos_id = c.eos_id = -1;
    assert_int_equal(st_model_build(m, &c, be), 0);
    assert_int_equal(st_model_init_random(m, 11), 0);
    unsigned char layers[2] = {1, 1};
    m->grad_align = 1;
    assert_int_equal(st_model_set_trainable(m, layers, ST_MOD_ALL), 0);
    assert_int_equal(st_model_alloc_activations(m, 2, 12), 0);
}

/* Loss and a copy of the gradients after one forward + backward. */
static double run_step(st_model *m, float *grads_out) {
    int32_t in[24], tg[24];
    float w[24];
    for (int i = 0; i < 24; i++) { in[i] = (i * 7 + 3) % 61; tg[i] = (i * 5 + 1) % 61; w[i] = 1.0f / 24; }
    st_model_zero_grad(m);
    double loss = st_model_forward(m, in, tg, w, 1);
    st_model_backward(m);
    memcpy(grads_out, m->grads, m->n_grads * sizeof(float));
    return loss;
}

static void check_model(st_family family, int tied) {
    cpu = st_backend_cpu(2);
    spy = *cpu;
    spy.matmul = spy_matmul;
    spy.matmul_bf16 = spy_matmul_bf16;
    st_model m;
    build(&m, family, tied, &spy);
    spied_model = &m;
    float *g32 = malloc(m.n_grads * 4), *g16 = malloc(m.n_grads * 4);
    fp32_calls = bf16_calls = scratch_too_small = 0;
    double l32 = run_step(&m, g32);
    assert_true(fp32_calls > 0 && bf16_calls == 0);
    assert_int_equal(st_model_set_precision(&m, ST_PRECISION_BF16), 0);
    assert_non_null(m.mm_scratch);
    assert_true(m.mm_scratch_floats == st_model_bf16_scratch_floats(&m.cfg, 2, 12));
    assert_non_null(m.weights_bf16);
    fp32_calls = bf16_calls = fp32_weight_reads = 0;
    double l16 = run_step(&m, g16);
    if (fp32_calls != 0) fail_msg("bf16 model still ran %d fp32 matmuls", fp32_calls);
    assert_true(bf16_calls > 0);
    assert_int_equal(scratch_too_small, 0);
    if (fp32_weight_reads) fail_msg("%d bf16 matmuls read fp32 weights instead of the bf16 copy", fp32_weight_reads);
    /* the saved activations take less memory (six of the per-layer tensors are half size) */
    size_t a32 = st_model_activation_floats(&m.cfg, 2, 12, ST_PRECISION_FP32);
    size_t a16 = st_model_activation_floats(&m.cfg, 2, 12, ST_PRECISION_BF16) - st_model_bf16_scratch_floats(&m.cfg, 2, 12);
    printf("  activations: fp32 %zu floats, bf16 %zu floats (+ matmul scratch)\n", a32, a16);
    assert_true(m.act_floats < a32);
    /* re-allocating activations keeps bf16 and re-sizes the scratch */
    assert_int_equal(st_model_alloc_activations(&m, 1, 16), 0);
    assert_true(m.mm_scratch_floats == st_model_bf16_scratch_floats(&m.cfg, 1, 16));
    /* near the fp32 result, not equal to it */
    double gd = 0, gs = 0;
    for (size_t i = 0; i < m.n_grads; i++) {
        gd = fmax(gd, fabs((double)g16[i] - g32[i]));
        gs = fmax(gs, fabs((double)g32[i]));
    }
    printf("  %s%s: loss fp32 %.7f bf16 %.7f; grad max|diff|/max|g| = %.3g\n",
           family == ST_FAMILY_GPT2 ? "gpt2" : "llama", tied ? " tied" : "", l32, l16, gd / gs);
    assert_true(l16 != l32 && fabs(l16 - l32) < 1e-2 * fabs(l32));
    assert_true(gd > 0 && gd < 5e-2 * gs);
    /* back to fp32: bit-identical to the first fp32 run, scratch released */
    assert_int_equal(st_model_alloc_activations(&m, 2, 12), 0);
    assert_int_equal(st_model_set_precision(&m, ST_PRECISION_FP32), 0);
    assert_null(m.mm_scratch);
    assert_true(run_step(&m, g16) == l32);
    assert_memory_equal(g16, g32, m.n_grads * 4);
    free(g32), free(g16);
    st_model_free(&m);
}

/* After an optimizer-style write of the weights (st_model_weights_changed), the next forward reads the new
 * values: the loss equals that of a model built fresh with those weights; without the call it would not. */
static void test_bf16_copy_follows_weights(void **state) {
    (void)state;
    cpu = st_backend_cpu(2);
    st_model m, fresh;
    build(&m, ST_FAMILY_LLAMA, 0, cpu);
    build(&fresh, ST_FAMILY_LLAMA, 0, cpu);
    assert_int_equal(st_model_set_precision(&m, ST_PRECISION_BF16), 0);
    assert_int_equal(st_model_set_precision(&fresh, ST_PRECISION_BF16), 0);
    float *g = malloc(m.n_grads * 4);
    double before = run_step(&m, g);
    for (size_t i = 0; i < m.n_weights; i++) m.weights[i] *= 1.5f; /* a big change: the loss must move */
    st_model_weights_changed(&m);
    double after = run_step(&m, g);
    memcpy(fresh.weights, m.weights, m.n_weights * 4);
    st_model_weights_changed(&fresh);
    double want = run_step(&fresh, g);
    printf("  loss before %.7f, after the write %.7f, fresh model %.7f\n", before, after, want);
    assert_true(after == want && after != before);
    free(g);
    st_model_free(&m);
    st_model_free(&fresh);
}

static void test_model_bf16(void **state) {
    (void)state;
    check_model(ST_FAMILY_LLAMA, 0);
    check_model(ST_FAMILY_LLAMA, 1);
    check_model(ST_FAMILY_GPT2, 1);
}

/* Frozen weights of a bf16 source held in bf16 only (st_model_drop_frozen_fp32): with layer 0 frozen (its
 * matmul weights and the untied embedding held, one weight with a non-bf16 element kept in fp32), the fp32
 * memory of what is held reads zero (given back), loss and gradients equal the model that keeps both copies
 * bit for bit, the widened values are the fp32 ones exactly; making layer 0 trainable gives it its fp32 masters
 * back exactly; restore gives everything back; SHARDTUNE_FROZEN_FP32=1 holds nothing. */
static void test_frozen_bf16_only(void **state) {
    (void)state;
    cpu = st_backend_cpu(2);
    st_model m, ref;
    build(&m, ST_FAMILY_LLAMA, 0, cpu);
    build(&ref, ST_FAMILY_LLAMA, 0, cpu);
    for (size_t i = 0; i < m.n_weights; i++) m.weights[i] = st_bf16_round(m.weights[i]); /* a bf16 source */
    int odd = st_model_find(&m, "model.layers.0.mlp.down_proj.weight");
    assert_true(odd > 0);
    m.weights[m.params[odd].offset + 3] += 1e-6f; /* not a bf16 value any more: stays fp32 */
    memcpy(ref.weights, m.weights, m.n_weights * 4);
    assert_int_equal(st_model_set_precision(&m, ST_PRECISION_BF16), 0);
    assert_int_equal(st_model_set_precision(&ref, ST_PRECISION_BF16), 0);
    unsigned char top[2] = {0, 1}, all[2] = {1, 1};
    assert_int_equal(st_model_set_trainable(&m, top, ST_MOD_ALL), 0);
    assert_int_equal(st_model_set_trainable(&ref, top, ST_MOD_ALL), 0);
    size_t want = 0;
    long *goff = malloc(m.n_params * sizeof(long));
    for (int i = 0; i < m.n_params; i++) {
        goff[i] = m.params[i].grad_offset;
        const st_param *p = &m.params[i];
        if (i == 0 || (p->layer == 0 && p->ndim == 2)) want += p->numel; /* embedding, layer 0's matmul weights */
    }
    assert_true(st_model_bf16_frozen_floats(&m, goff, NULL) == want); /* the planner's count ignores values */
    setenv("SHARDTUNE_FROZEN_FP32", "1", 1);
    assert_true(st_model_drop_frozen_fp32(&m) == 0);
    unsetenv("SHARDTUNE_FROZEN_FP32");
    size_t held = st_model_drop_frozen_fp32(&m);
    printf("  held in bf16 only: %zu of %zu floats (want %zu - %zu)\n", held, m.n_weights, want, m.params[odd].numel);
    assert_true(held == want - m.params[odd].numel);
    assert_true(st_model_drop_frozen_fp32(&m) == held); /* idempotent */
    assert_false(st_model_fp32_dropped(&m, odd));
    float *wide = malloc(m.n_weights * 4);
    for (int i = 0; i < m.n_params; i++) {
        const st_param *p = &m.params[i];
        int expect = i != odd && (i == 0 || (p->layer == 0 && p->ndim == 2));
        assert_int_equal(st_model_fp32_dropped(&m, i), expect);
        for (size_t k = 0; expect && k < p->numel; k++) assert_true(m.weights[p->offset + k] == 0.0f);
        st_model_param_fp32(&m, i, 0, p->numel, wide + p->offset);
    }
    assert_memory_equal(wide, ref.weights, m.n_weights * 4);
    float *g = malloc(m.n_grads * 4), *gr = malloc(m.n_grads * 4);
    for (int round = 0; round < 2; round++) { /* the second after a write of the trainable weights */
        double l = run_step(&m, g), lr = run_step(&ref, gr);
        assert_true(l == lr);
        assert_memory_equal(g, gr, m.n_grads * 4);
        assert_int_equal(st_model_check_bf16_copy(&m), 0);
        const st_param *h = &m.params[m.n_params - 1]; /* the head trains */
        for (size_t k = 0; k < h->numel; k++) m.weights[h->offset + k] = ref.weights[h->offset + k] *= 0.5f;
        st_model_weights_changed(&m);
        st_model_weights_changed(&ref);
    }
    /* layer 0 becomes trainable (a progressive stage): its fp32 masters widened back, exactly */
    unsigned no_embed = ST_MOD_ALL & ~(unsigned)ST_MOD_EMBED; /* the embedding stays frozen */
    assert_int_equal(st_model_set_trainable(&m, all, no_embed), 0);
    assert_int_equal(st_model_set_trainable(&ref, all, no_embed), 0);
    assert_true(st_model_drop_frozen_fp32(&m) == m.params[0].numel);
    for (int i = 1; i < m.n_params; i++) assert_false(st_model_fp32_dropped(&m, i));
    st_model_restore_fp32(&m);
    assert_memory_equal(m.weights, ref.weights, m.n_weights * 4);
    g = realloc(g, m.n_grads * 4), gr = realloc(gr, m.n_grads * 4); /* more trains now */
    double l = run_step(&m, g), lr = run_step(&ref, gr);
    assert_true(l == lr);
    assert_memory_equal(g, gr, m.n_grads * 4);
    free(g), free(gr), free(wide), free(goff);
    st_model_free(&m);
    st_model_free(&ref);
}

/* The device layout (st_model_bind_frozen_bf16): layer 0's matmul weights and the untied embedding of a bf16
 * source bound without fp32 storage (their offsets first, below the fp32 allocation), their values written into
 * the bf16 copy only: loss and gradients equal the model that keeps both copies bit for bit, the widened values
 * are the fp32 ones exactly, restore / rewritten leave them held, and training one is refused. */
static void test_frozen_bf16_bound(void **state) {
    (void)state;
    cpu = st_backend_cpu(2);
    st_model ref, m;
    build(&ref, ST_FAMILY_LLAMA, 0, cpu);
    for (size_t i = 0; i < ref.n_weights; i++) ref.weights[i] = st_bf16_round(ref.weights[i]); /* a bf16 source */
    st_model_weights_changed(&ref);
    memset(&m, 0, sizeof m);
    assert_int_equal(st_model_build_registry(&m, &ref.cfg), 0);
    unsigned char *w16 = calloc((size_t)m.n_params, 1);
    size_t *at = malloc((size_t)m.n_params * sizeof *at), want = 0;
    for (int i = 0; i < m.n_params; i++) {
        const st_param *p = &m.params[i];
        w16[i] = i == 0 || p->layer == 0; /* its norms too: not storable, they keep fp32 */
        if (i == 0 || (p->layer == 0 && p->ndim == 2)) want += p->numel;
        at[i] = p->offset;
    }
    assert_int_equal(st_model_bind_frozen_bf16(&m, cpu, w16), 0);
    assert_true(m.n_w16 == want);
    uint16_t *h = malloc(m.n_weights * sizeof *h);
    for (int i = 0; i < m.n_params; i++) {
        const st_param *p = &m.params[i];
        int held = i == 0 || (p->layer == 0 && p->ndim == 2);
        assert_int_equal(st_model_fp32_dropped(&m, i), held);
        assert_int_equal(p->offset < m.n_w16, held);
        for (size_t k = 0; k < p->numel; k++) h[k] = st_float_to_bf16_bits(ref.weights[at[i] + k]);
        if (held) memcpy(m.weights_bf16 + p->offset, h, p->numel * sizeof *h);
        else memcpy(m.weights + p->offset, ref.weights + at[i], p->numel * sizeof(float));
    }
    st_model_weights_changed(&m);
    unsigned char top[2] = {0, 1}, all[2] = {1, 1};
    m.grad_align = 1;
    assert_int_equal(st_model_set_trainable(&m, top, ST_MOD_ALL), 0);
    assert_int_equal(st_model_set_trainable(&ref, top, ST_MOD_ALL), 0);
    assert_int_equal(st_model_alloc_activations(&m, 2, 12), 0);
    assert_int_equal(st_model_set_precision(&m, ST_PRECISION_BF16), 0);
    assert_int_equal(st_model_set_precision(&ref, ST_PRECISION_BF16), 0);
    float *g = malloc(m.n_grads * 4), *gr = malloc(ref.n_grads * 4), *wide = malloc(ref.n_weights * 4);
    assert_true(m.n_grads == ref.n_grads);
    for (int round = 0; round < 2; round++) {
        assert_true(run_step(&m, g) == run_step(&ref, gr));
        assert_memory_equal(g, gr, m.n_grads * 4);
        assert_int_equal(st_model_check_bf16_copy(&m), 0);
        st_model_restore_fp32(&m); /* no fp32 place: still held */
        st_model_fp32_rewritten(&m);
        st_model_weights_changed(&m);
    }
    for (int i = 0; i < m.n_params; i++) {
        st_model_param_fp32_host(&m, i, 0, m.params[i].numel, wide + at[i]);
        assert_int_equal(st_model_fp32_dropped(&m, i), m.params[i].offset < m.n_w16);
    }
    assert_memory_equal(wide, ref.weights, ref.n_weights * 4);
    assert_int_equal(st_model_set_trainable(&m, all, ST_MOD_ALL), ST_EINVAL);
    assert_non_null(strstr(st_error(), "bf16 only"));
    free(g), free(gr), free(wide), free(h), free(at), free(w16);
    st_model_free(&m);
    st_model_free(&ref);
}

static void test_model_refusals(void **state) {
    (void)state;
    cpu = st_backend_cpu(2);
    spy = *cpu;
    spy.matmul_bf16 = NULL; /* a backend without the entry */
    st_model m;
    build(&m, ST_FAMILY_LLAMA, 0, &spy);
    assert_int_equal(st_model_set_precision(&m, ST_PRECISION_BF16), ST_ECONFIG);
    assert_non_null(strstr(st_error(), "bf16"));
    assert_int_equal(st_model_set_precision(&m, (st_precision)7), ST_EINVAL);
    assert_int_equal(m.precision, ST_PRECISION_FP32);
    st_model_free(&m);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rounding),
        cmocka_unit_test(test_matmul_bf16),
        cmocka_unit_test(test_bf16_operands_and_bias),
        cmocka_unit_test(test_adamw_multi),
        cmocka_unit_test(test_bf16_copy_follows_weights),
        cmocka_unit_test(test_model_bf16),
        cmocka_unit_test(test_model_refusals),
        cmocka_unit_test(test_frozen_bf16_only),
        cmocka_unit_test(test_frozen_bf16_bound),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
