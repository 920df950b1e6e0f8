/* test_gguf_kquant.c — the Q2_K, Q4_K, Q5_K and Q6_K encoders' vector form (the 8 / 16 sub-blocks of a super-block fitted in
 * SIMD lanes, what `export --quant` runs) gives exactly the bytes of its one-sub-block-at-a-time
 * form, which follows ggml's quantize_row_q2_K_ref / q4_K_ref / q5_K_ref / q6_K_ref loop for loop; likewise the AVX2 Q8_0 / Q4_0
 * block encoders and their scalar forms (quantize_row_q8_0_ref / q4_0_ref). The scalar forms are checked
 * against llama.cpp's own quantizer by tests/reference/llamacpp_gguf.py. Over 8000 random super-blocks of mixed scales and shapes — Gaussian,
 * uniform, all positive, all negative, constant (positive, zero, negative), one spike among zeros, tiny
 * (f16-subnormal scales), sub-blocks of very different magnitudes, signed zeros, repeated values with ties of
 * magnitude in both signs (Q4_0 takes the first), huge values whose squares and sums overflow to inf, values
 * near FLT_MAX, float subnormals, huge constants — the two agree byte for byte, for both vector builds (the
 * AVX-512 one where the CPU has it, and the default one: SHARDTUNE_GGUF_SIMD=avx2). NaN / inf weights never
 * reach the encoders (`export` refuses them by name: st_model_check_finite). Both forms' times are printed
 * (not asserted: the machine is shared). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "checkpoints/gguf.h"
#include "common/util.h"

static uint64_t rs = 0x9E3779B97F4A7C15ULL;
static double urand(void) {
    rs ^= rs << 13;
    rs ^= rs >> 7;
    rs ^= rs << 17;
    return (double)(rs >> 11) / 9007199254740992.0;
}
static float gauss(void) {
    double u = urand() + 1e-300, v = urand();
    return (float)(sqrt(-2 * log(u)) * cos(6.283185307179586 * v));
}

static void fill(float *x, int kind) {
    float s = (float)pow(10.0, -4 + 4 * urand());
    for (int i = 0; i < 256; i++) {
        switch (kind) {
        case 0: x[i] = s * gauss(); break;
        case 1: x[i] = s * (float)(2 * urand() - 1); break;
        case 2: x[i] = s * fabsf(gauss()); break;
        case 3: x[i] = -s * fabsf(gauss()); break;
        case 4: x[i] = (i / 32) % 3 == 0 ? 0.5f : (i / 32) % 3 == 1 ? 0.0f : -0.25f; break;
        case 5: x[i] = i == 77 ? 3.0f : 0.0f; break;
        case 6: x[i] = 1e-7f * gauss(); break;
        case 7: x[i] = (float)pow(10.0, (i / 32) - 4) * gauss(); break;
        case 8: x[i] = (i / 32) % 2 ? -0.0f : (i % 7 == 0 ? -0.0f : 0.0f); break;
        case 10: x[i] = (float)pow(10.0, 15 + 23 * urand()) * gauss(); break; /* huge: x^2 and sums overflow */
        case 11: x[i] = i % 5 == 0 ? 3.0e38f * (float)(2 * urand() - 1) : s * gauss(); break; /* near FLT_MAX */
        case 12: x[i] = 1e-39f * gauss(); break; /* float subnormals */
        case 13: x[i] = (i / 16) % 2 ? -1e30f : 1e30f; break; /* huge constants */
        default: x[i] = s * (float)((int)(urand() * 5) - 2); break; /* ties of magnitude, both signs */
        }
    }
}

#define NKIND 14

static void lanes_equal_scalar_once(st_ggml_type t) {
    enum { NB = 8000 };
    const size_t bs = st_ggml_row_bytes(t, 256); /* bytes per 256 elements (8 blocks for q8_0 / q4_0) */
    float *x = malloc((size_t)NB * 256 * sizeof(float));
    uint8_t *a = malloc((size_t)NB * bs), *b = malloc((size_t)NB * bs);
    assert_non_null(x);
    for (int k = 0; k < NB; k++) fill(x + (size_t)k * 256, k % NKIND);
    double t0 = st_now();
    /* rows of 7994, 3, 2 and 1 super-blocks: q4_K / q5_K fit two super-blocks at a time, an odd last one next to
     * a copy of itself */
    static const int rows[] = {NB - 6, 3, 2, 1};
    for (int r = 0, at = 0; r < 4; at += rows[r++])
        st_ggml_encode(t, x + (size_t)at * 256, (int64_t)rows[r] * 256, a + (size_t)at * bs);
    double t1 = st_now();
    st_ggml_encode_reference(t, x, (int64_t)NB * 256, b);
    double t2 = st_now();
    if (st_ggml_block_size(t) == 32) { /* also in rows of 13 blocks: groups of 8 and a tail of 5 one at a time */
        uint8_t *c = malloc((size_t)NB * bs);
        assert_non_null(c);
        const int64_t total = (int64_t)NB * 256, row = 13 * 32, rb = (int64_t)st_ggml_row_bytes(t, row);
        for (int64_t at = 0, k = 0; at < total; at += row, k++)
            st_ggml_encode(t, x + at, total - at < row ? total - at : row, c + k * rb);
        assert_memory_equal(c, b, (size_t)NB * bs);
        free(c);
    }
    int bad = 0;
    for (int k = 0; k < NB; k++)
        if (memcmp(a + (size_t)k * bs, b + (size_t)k * bs, bs) != 0 && bad++ < 5)
            fprintf(stderr, "super-block %d (kind %d) differs\n", k, k % NKIND);
    printf("%s (%s build): %d of %d super-blocks differ; vector %.3f s, scalar %.3f s\n", st_ggml_type_name(t),
           st_ggml_simd_wide() ? "AVX-512" : "default", bad, NB, t1 - t0, t2 - t1);
    assert_int_equal(bad, 0);
    free(x);
    free(a);
    free(b);
}

/* Both vector builds: the one the CPU picks (AVX-512 where it has it) and the default one. */
static void lanes_equal_scalar(st_ggml_type t) {
    unsetenv("SHARDTUNE_GGUF_SIMD");
    st_ggml_simd_reset();
    lanes_equal_scalar_once(t);
    if (st_ggml_simd_wide()) {
        setenv("SHARDTUNE_GGUF_SIMD", "avx2", 1);
        st_ggml_simd_reset();
        lanes_equal_scalar_once(t);
        unsetenv("SHARDTUNE_GGUF_SIMD");
        st_ggml_simd_reset();
    }
}

static void test_q4_K_lanes_equal_scalar(void **state) {
    (void)state;
    lanes_equal_scalar(ST_GGML_Q4_K);
}
static void test_q5_K_lanes_equal_scalar(void **state) {
    (void)state;
    lanes_equal_scalar(ST_GGML_Q5_K);
}
static void test_q2_K_lanes_equal_scalar(void **state) {
    (void)state;
    lanes_equal_scalar(ST_GGML_Q2_K);
}
static void test_q6_K_lanes_equal_scalar(void **state) {
    (void)state;
    lanes_equal_scalar(ST_GGML_Q6_K);
}
static void test_q8_0_simd_equal_scalar(void **state) {
    (void)state;
    lanes_equal_scalar(ST_GGML_Q8_0);
}
static void test_q4_0_simd_equal_scalar(void **state) {
    (void)state;
    lanes_equal_scalar(ST_GGML_Q4_0);
}

int main(void) {
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_q4_K_lanes_equal_scalar),
                                       cmocka_unit_test(test_q5_K_lanes_equal_scalar),
                                       cmocka_unit_test(test_q6_K_lanes_equal_scalar),
                                       cmocka_unit_test(test_q2_K_lanes_equal_scalar),
                                       cmocka_unit_test(test_q8_0_simd_equal_scalar),
                                       cmocka_unit_test(test_q4_0_simd_equal_scalar)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
