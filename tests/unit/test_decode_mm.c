/* test_decode_mm.c — the CPU backend's decode_mm (generation's small-batch products, kernels.h): every
 * output against a float64 dot product within the fp32 summation bound (in x eps x sum |x w|), for widths
 * that hit each part of the kernel (whole 4-chunk steps, single chunks, the scalar tail, widths under one
 * chunk), 1 to 8 rows, writing and accumulating (beta 1 adds the old y); and the properties generation's
 * bit-identity rests on: a weight held as bf16 bits gives the same bits as the same values held as fp32,
 * each output is the same whatever the number of rows beside it and whether its weight row is read beside
 * another (decode_mm's pairs of streams) or alone, and 1 and 2 threads agree bit for bit. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/kernels.h"

static uint64_t rng = 88172645463325252ull;
static float frand(void) { /* uniform in [-1, 1) */
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return (float)((double)(rng >> 40) / (double)(1ull << 24) * 2.0 - 1.0);
}

/* A weight matrix of bf16 values: as fp32 and as bf16 bits. */
static void bf16_weights(float *w, uint16_t *w16, size_t n) {
    for (size_t i = 0; i < n; i++) {
        float f = frand();
        uint32_t u;
        memcpy(&u, &f, 4);
        u &= 0xffff0000u;
        memcpy(&w[i], &u, 4);
        w16[i] = (uint16_t)(u >> 16);
    }
}

static void test_against_float64(void **state) {
    (void)state;
    const st_backend *be = st_backend_cpu(0);
    assert_non_null(be);
    assert_non_null(be->decode_mm);
    const int widths[] = {1, 7, 15, 16, 17, 48, 63, 64, 65, 100, 300, 1376};
    const int out = 70;
    for (size_t wi = 0; wi < sizeof widths / sizeof widths[0]; wi++) {
        int in = widths[wi];
        for (int rows = 1; rows <= 8; rows += 3) {
            float *w = malloc((size_t)out * in * 4), *x = malloc((size_t)rows * in * 4);
            float *y = malloc((size_t)rows * out * 4), *y0 = malloc((size_t)rows * out * 4);
            uint16_t *w16 = malloc((size_t)out * in * 2);
            bf16_weights(w, w16, (size_t)out * in);
            for (int i = 0; i < rows * in; i++) x[i] = frand();
            for (int beta = 0; beta <= 1; beta++) {
                for (int i = 0; i < rows * out; i++) y[i] = y0[i] = frand();
                be->decode_mm(y, x, w, NULL, rows, out, in, (float)beta);
                for (int r = 0; r < rows; r++)
                    for (int o = 0; o < out; o++) {
                        double d = beta ? y0[r * out + o] : 0.0, mag = fabs(d);
                        for (int k = 0; k < in; k++) {
                            d += (double)x[r * in + k] * w[(size_t)o * in + k];
                            mag += fabs((double)x[r * in + k] * w[(size_t)o * in + k]);
                        }
                        double bound = (in + 2) * 6e-8 * mag + 1e-30;
                        if (fabs(y[r * out + o] - d) > bound)
                            fail_msg("in %d rows %d beta %d: y[%d,%d] = %.9g, float64 %.9g (bound %.3g)", in, rows, beta,
                                     r, o, (double)y[r * out + o], d, bound);
                    }
            }
            free(w), free(x), free(y), free(y0), free(w16);
        }
    }
}

static void test_bits(void **state) {
    (void)state;
    const st_backend *be = st_backend_cpu(0);
    enum { OUT = 777, IN = 321, ROWS = 6 }; /* > 2^16 weights: split across the team */
    float *w = malloc((size_t)OUT * IN * 4), *x = malloc((size_t)ROWS * IN * 4);
    uint16_t *w16 = malloc((size_t)OUT * IN * 2);
    float *a = malloc((size_t)ROWS * OUT * 4), *b = malloc((size_t)ROWS * OUT * 4), *c = malloc((size_t)OUT * 4);
    bf16_weights(w, w16, (size_t)OUT * IN);
    for (int i = 0; i < ROWS * IN; i++) x[i] = frand();
    int threads = omp_get_max_threads();
    omp_set_num_threads(2);
    be->decode_mm(a, x, w, NULL, ROWS, OUT, IN, 0.0f);
    be->decode_mm(b, x, NULL, w16, ROWS, OUT, IN, 0.0f);
    assert_memory_equal(a, b, (size_t)ROWS * OUT * 4); /* bf16 holding == fp32 holding */
    omp_set_num_threads(1);
    be->decode_mm(b, x, NULL, w16, ROWS, OUT, IN, 0.0f);
    assert_memory_equal(a, b, (size_t)ROWS * OUT * 4); /* 1 thread == 2 threads */
    for (int r = 0; r < ROWS; r++) { /* one row alone == that row among six */
        be->decode_mm(c, x + (size_t)r * IN, w, NULL, 1, OUT, IN, 0.0f);
        assert_memory_equal(c, a + (size_t)r * OUT, (size_t)OUT * 4);
    }
    for (int o = 0; o < OUT; o++) { /* an output read beside another weight row == its weight row alone */
        float one;
        be->decode_mm(&one, x, w + (size_t)o * IN, NULL, 1, 1, IN, 0.0f);
        assert_memory_equal(&one, a + o, 4);
        be->decode_mm(&one, x, NULL, w16 + (size_t)o * IN, 1, 1, IN, 0.0f);
        assert_memory_equal(&one, a + o, 4);
    }
    omp_set_num_threads(threads);
    free(w), free(x), free(w16), free(a), free(b), free(c);
}

int main(void) {
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_against_float64), cmocka_unit_test(test_bits)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
