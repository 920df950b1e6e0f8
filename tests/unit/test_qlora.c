/* test_qlora.c — the QLoRA quantization primitives (worker/qlora.h) on hand-worked cases.
 *
 *  - NF4: codes are the nearest level of the QLoRA table (values written out here from bitsandbytes'
 *    published table, worked by hand: 0.5 sits 0.0593 from 0.4407 and 0.0626 from 0.5626), packed low
 *    nibble first, one absmax per block; an all-zero block gets code 7 (the 0.0 level) and absmax 0; an odd
 *    element count leaves the last high nibble 0; dequant_nf4 of the codes gives level * absmax.
 *  - int8: q = rint(w / (absmax / 127)), clamped; dequant_int8 inverts it within half a step.
 *  - double quantization: scales minus their mean, 127 steps of max |d| per 256 scales; scales all equal
 *    come back exactly (the step is 0); otherwise each within half a step; more than 256 scales use one
 *    step per 256.
 *  - one matmul unit at a time (worker/qlora.h): the scratch is the largest unit (q + k + v together, gate +
 *    up together or, with spec.mlp_apart, each alone, every other projection alone), not a layer, and every
 *    quantized weight's place lies inside it. A LoRA training step (activation checkpointing: forward,
 *    recomputation, backward) over the quantized base against the same model materialized (every weight
 *    dequantized into its own place, st_qlora_materialize, which also renumbers the registry): packed gate/up
 *    runs the same matmuls on the same operands, so loss and adapter gradients are bit-identical; with
 *    mlp_apart the QLoRA model runs gate and up apart (the same dot products forward, the input gradient
 *    summed as two K = F halves instead of one K = 2F sum), so they agree within fp32 reordering: relative
 *    2^-24 per term times K <= 2F = 160 terms, ~1e-5 through the two layers. A unit read from the wrong
 *    matrix (the scratch aliases all of a layer's units) moves the loss by O(1e-2), the gradients by O(1). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <string.h>

#include <stdio.h>
#include <stdlib.h>

#include "kernels/kernels.h"
#include "worker/lora.h"
#include "worker/model.h"
#include "worker/qlora.h"
#include "worker/train_kinds.h"

static void test_nf4_codes(void **state) {
    (void)state;
    const float w[8] = {2.0f, -2.0f, 0.0f, 1.0f, 0.16f, -0.2f, 1.5f, -1.4f};
    /* normalized by absmax 2: 1, -1, 0, 0.5, 0.08, -0.1, 0.75, -0.7 -> levels 15, 0, 7, 12, 8, 6, 14, 1 */
    const uint8_t want[4] = {0x0F, 0xC7, 0x68, 0x1E};
    uint8_t codes[4];
    float absmax[1];
    st_qlora_quant_tensor(ST_QLORA_NF4, w, 8, 8, codes, absmax);
    assert_memory_equal(codes, want, 4);
    assert_true(absmax[0] == 2.0f);
    float out[8];
    st_backend_cpu(0)->dequant_nf4(out, codes, absmax, 8, 8);
    const int lv[8] = {15, 0, 7, 12, 8, 6, 14, 1};
    for (int i = 0; i < 8; i++) assert_true(out[i] == ST_NF4_LEVELS[lv[i]] * 2.0f);
    assert_true(ST_NF4_LEVELS[7] == 0.0f && ST_NF4_LEVELS[0] == -1.0f && ST_NF4_LEVELS[15] == 1.0f);
}

static void test_nf4_zero_block_odd_n(void **state) {
    (void)state;
    const float w[5] = {0, 0, 0, 0, -3.0f};
    uint8_t codes[3];
    float absmax[2];
    st_qlora_quant_tensor(ST_QLORA_NF4, w, 5, 4, codes, absmax);
    const uint8_t want[3] = {0x77, 0x77, 0x00};
    assert_memory_equal(codes, want, 3);
    assert_true(absmax[0] == 0.0f && absmax[1] == 3.0f);
}

static void test_int8(void **state) {
    (void)state;
    const float w[6] = {1.0f, -0.3f, 0.25f, 0.0039f, 0.0f, -4.0f};
    int8_t q[6];
    float s[2];
    st_qlora_quant_tensor(ST_QLORA_INT8, w, 6, 4, (uint8_t *)q, s);
    const int8_t want[6] = {127, -38, 32, 0, 0, -127};
    assert_memory_equal(q, want, 6);
    assert_true(s[0] == 1.0f / 127.0f && s[1] == 4.0f / 127.0f);
    float out[6];
    st_backend_cpu(0)->dequant_int8(out, q, s, 6, 4);
    for (int i = 0; i < 6; i++) assert_true(fabsf(out[i] - w[i]) <= 0.5f * s[i / 4] * 1.0001f);
}

static void test_double_quant(void **state) {
    (void)state;
    const float s[4] = {1, 2, 3, 4};
    int8_t q8[4];
    float s2[1], mean, back[4];
    st_qlora_double_quant(s, 4, q8, s2, &mean);
    assert_true(mean == 2.5f);
    assert_true(s2[0] == 1.5f / 127.0f);
    const int8_t want[4] = {-127, -42, 42, 127};
    assert_memory_equal(q8, want, 4);
    st_qlora_double_dequant(back, q8, s2, mean, 4);
    for (int i = 0; i < 4; i++) assert_true(fabsf(back[i] - s[i]) <= 0.5f * s2[0] * 1.0001f);
    const float same[3] = {2, 2, 2};
    st_qlora_double_quant(same, 3, q8, s2, &mean);
    st_qlora_double_dequant(back, q8, s2, mean, 3);
    assert_true(s2[0] == 0.0f && back[0] == 2.0f && back[2] == 2.0f);
    /* 300 scales: two blocks, the second's step from its own max |d| */
    float many[300], b2[2];
    int8_t q[300];
    for (int i = 0; i < 300; i++) many[i] = i < 256 ? 1.0f + 0.001f * (float)(i % 7) : 10.0f;
    st_qlora_double_quant(many, 300, q, b2, &mean);
    float m = 0;
    for (int i = 256; i < 300; i++) m = fmaxf(m, fabsf(many[i] - mean));
    assert_true(b2[1] == m / 127.0f && b2[0] < b2[1]);
    for (int i = 256; i < 300; i++) assert_int_equal(q[i], 127);
}

enum { UB = 2, UT = 12, UN = UB * UT };

static void unit_model(st_model *m, const st_qlora_spec *spec, int materialize) {
    st_model_config c;
    memset(&c, 0, sizeof c);
    c.family = ST_FAMILY_LLAMA;
    snprintf(c.model_type, sizeof c.model_type, "llama");
    c.n_layer = 2; c.d_model = 32; c.n_head = 4; c.n_kv_head = 2; c.head_dim = 8; c.d_ff = 80; c.vocab = 53;
    c.max_seq = 16; c.norm_eps = 1e-5f; c.rope_theta = 10000.0f; c.bos_id = c.eos_id = -1;
    assert_int_equal(st_model_build(m, &c, st_backend_cpu(1)), 0);
    assert_int_equal(st_model_init_random(m, 7), 0);
    m->grad_align = 1;
    st_lora_spec ls = {.r = 4, .alpha = 8.0, .targets = ST_LORA_LLAMA_ALL, .seed = 11};
    assert_int_equal(st_lora_attach(m, &ls), 0);
    assert_int_equal(st_qlora_quantize(m, spec), 0);
    if (materialize) assert_int_equal(st_qlora_materialize(m), 0);
    unsigned char layers[2] = {1, 1};
    assert_int_equal(st_model_set_trainable(m, layers, ST_MOD_LORA), 0);
    assert_int_equal(st_model_alloc_activations(m, UB, UT), 0);
    assert_int_equal(st_model_set_activation_checkpointing(m, 1), 0);
}

/* One step's loss and gradients; B of every adapter set to a fixed nonzero value first (B = 0 at init would
 * leave A's gradient 0). */
static double unit_step(st_model *m, float *grads) {
    for (int i = st_model_base_params(m); i < m->n_params; i++) {
        const st_param *p = &m->params[i];
        if (!strstr(p->name, "lora_B")) continue;
        for (size_t j = 0; j < p->numel; j++) m->weights[p->offset + j] = 0.01f * (float)((int)(j % 7) - 3);
    }
    st_model_weights_changed(m);
    int32_t in[UN], tg[UN];
    float w[UN];
    for (int i = 0; i < UN; i++) { in[i] = (i * 7 + 3) % 53; tg[i] = (i * 5 + 1) % 53; w[i] = 1.0f / UN; }
    st_model_zero_grad(m);
    double loss = st_model_forward(m, in, tg, w, 1);
    st_model_backward(m);
    memcpy(grads, m->grads, m->n_grads * sizeof(float));
    return loss;
}

static void matmul_units(int apart) {
    st_qlora_spec spec = {.quant = ST_QLORA_NF4, .double_quant = 1, .block = 16, .mlp_apart = apart};
    st_model q, d;
    unit_model(&q, &spec, 0);
    /* units: q + k + v 32x32 + 2 x 16x32 = 2048, o 1024, gate / up / down 80x32 = 2560 (gate + up 5120); a
     * layer 10752 */
    size_t qb, fb, scratch, w16, lo = (size_t)-1, hi = 0, want = apart ? 2560 : 5120;
    st_qlora_footprint(&q, &spec, &qb, &fb, &scratch, &w16);
    assert_int_equal(scratch, want);
    for (int i = 0; i < q.n_params; i++) {
        if (!st_qlora_holds(&q, i)) continue;
        const st_param *p = &q.params[i];
        if (p->offset < lo) lo = p->offset;
        if (p->offset + p->numel > hi) hi = p->offset + p->numel;
    }
    assert_int_equal(hi - lo, want);
    unit_model(&d, &spec, 1);
    assert_int_equal(q.n_grads, d.n_grads);
    float *gq = malloc(q.n_grads * sizeof(float)), *gd = malloc(d.n_grads * sizeof(float));
    double lq = unit_step(&q, gq), ld = unit_step(&d, gd);
    if (!apart) {
        assert_true(lq == ld);
        assert_memory_equal(gq, gd, q.n_grads * sizeof(float));
    }
    assert_true(fabs(lq - ld) <= 1e-5 * fabs(ld));
    double diff = 0, norm = 0;
    for (size_t i = 0; i < q.n_grads; i++) {
        diff += ((double)gq[i] - gd[i]) * ((double)gq[i] - gd[i]);
        norm += (double)gd[i] * gd[i];
    }
    assert_true(norm > 0 && sqrt(diff) <= 1e-4 * sqrt(norm));
    free(gq);
    free(gd);
    st_model_free(&q);
    st_model_free(&d);
}

static void test_matmul_units(void **state) {
    (void)state;
    matmul_units(0);
    matmul_units(1);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_nf4_codes),
        cmocka_unit_test(test_nf4_zero_block_odd_n),
        cmocka_unit_test(test_int8),
        cmocka_unit_test(test_double_quant),
        cmocka_unit_test(test_matmul_units),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
