/* test_qlora.c — the QLoRA quantization primitives (worker/qlora.h) on hand-worked cases.
 *
 *  - NF4: codes are the nearest level of the QLoRA table (values written out here from bitsandbytes'
 *    published table, worked by hand: 0.5 sits 0.0593 from 0.4407 and 0.0626 from 0.5626), packed low
 *    nibble first, one absmax per block; an all-zero block gets code 7 (the 0.0 level) and absmax 0; an odd
 *    element count leaves the last high nibble 0; dequant_nf4 of the codes gives level * absmax.
 *  - int8: q = rint(w / (absmax / 127)), clamped; dequant_int8 inverts it within half a step.
 *  - double quantization: scales minus their mean, 127 steps of max |d| per 256 scales; scales all equal
 *    come back exactly (the step is 0); otherwise each within half a step; more than 256 scales use one
 *    step per 256. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <string.h>

#include "kernels/kernels.h"
#include "worker/qlora.h"

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

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_nf4_codes),
        cmocka_unit_test(test_nf4_zero_block_odd_n),
        cmocka_unit_test(test_int8),
        cmocka_unit_test(test_double_quant),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
