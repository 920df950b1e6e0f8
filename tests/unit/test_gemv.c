/* test_gemv.c — the CPU decode GEMV (st_cpu_gemv, the backend's gemv slot) against a float64 reference,
 * with a tolerance from the dot length: summing k rounded products in any order, plus the add of y,
 * errs by at most gamma(k + 1) * (sum |w x| + |y|), gamma(m) = m u / (1 - m u), u = 2^-24. Shapes have
 * odd row counts and lengths so the 4-row and 16-lane tails run; every instruction-set body and both
 * thread counts must give the same bits. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cpu/cpu_kernels.h"
#include "kernels/kernels.h"

static uint64_t rng_state = 0x2545F4914F6CDD1DULL;
static float frand1(void) { /* uniform [-1, 1) */
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (float)((double)(rng_state >> 11) / (double)(1ULL << 53) * 2.0 - 1.0);
}
static float *frand(size_t n) {
    float *p = malloc((n ? n : 1) * sizeof(float));
    for (size_t i = 0; i < n; i++) p[i] = frand1();
    return p;
}

/* y = W x (+ y0) in float64 vs the kernel, each element within its bound. */
static void check_shape(int n, int k, float beta) {
    float *w = frand((size_t)n * k), *x = frand((size_t)k), *y0 = frand((size_t)n), *y = malloc((size_t)n * 4);
    memcpy(y, y0, (size_t)n * 4);
    st_cpu_gemv(y, x, w, n, k, beta);
    const double u = ldexp(1.0, -24), m = k + 1.0, gamma = m * u / (1.0 - m * u);
    for (int j = 0; j < n; j++) {
        double ref = beta != 0.0f ? y0[j] : 0.0, mag = beta != 0.0f ? fabs(y0[j]) : 0.0;
        for (int i = 0; i < k; i++) {
            double p = (double)w[(size_t)j * k + i] * x[i];
            ref += p;
            mag += fabs(p);
        }
        if (fabs(y[j] - ref) > gamma * mag) fail_msg("n=%d k=%d beta=%g row %d: %.9g vs %.9g (bound %.3g)", n, k,
                                                     (double)beta, j, (double)y[j], ref, gamma * mag);
    }
    free(w), free(x), free(y0), free(y);
}

static void test_reference(void **state) {
    (void)state;
    const int ns[] = {1, 3, 4, 5, 7, 64, 65, 131}, ks[] = {1, 7, 15, 16, 17, 33, 255, 512, 519};
    for (size_t a = 0; a < sizeof ns / sizeof *ns; a++)
        for (size_t b = 0; b < sizeof ks / sizeof *ks; b++) {
            check_shape(ns[a], ks[b], 0.0f);
            check_shape(ns[a], ks[b], 1.0f);
        }
    check_shape(3001, 700, 1.0f); /* over 2^21 weights: split over the team */
}

/* beta 0 never reads y: NaN there must not leak; k = 0 gives 0 (or y). */
static void test_edges(void **state) {
    (void)state;
    float w[6] = {1, 2, 3, 4, 5, 6}, x[3] = {1, 1, 1}, y[2] = {NAN, NAN};
    st_cpu_gemv(y, x, w, 2, 3, 0.0f);
    assert_true(y[0] == 6.0f && y[1] == 15.0f);
    float z[2] = {2.0f, 3.0f};
    st_cpu_gemv(z, x, w, 2, 0, 1.0f);
    assert_true(z[0] == 2.0f && z[1] == 3.0f);
    st_cpu_gemv(z, x, w, 2, 0, 0.0f);
    assert_true(z[0] == 0.0f && z[1] == 0.0f);
}

/* Same bits from every body this CPU runs and from 1 or 2 threads. */
static void test_bits(void **state) {
    (void)state;
    enum { N = 2731, K = 777 }; /* over 2^21 weights: split over the team */
    float *w = frand((size_t)N * K), *x = frand(K), *y0 = frand(N), *ref = malloc(N * 4), *y = malloc(N * 4);
    assert_non_null(st_cpu_gemv_use("portable"));
    memcpy(ref, y0, N * 4);
    omp_set_num_threads(1);
    st_cpu_gemv(ref, x, w, N, K, 1.0f);
    const char *isas[] = {"portable", "avx2", "avx512"};
    int ran = 0;
    for (int t = 1; t <= 2; t++)
        for (size_t i = 0; i < 3; i++) {
            if (!st_cpu_gemv_use(isas[i])) continue;
            omp_set_num_threads(t);
            memcpy(y, y0, N * 4);
            st_cpu_gemv(y, x, w, N, K, 1.0f);
            if (memcmp(y, ref, N * 4)) fail_msg("%s with %d threads differs from portable", isas[i], t);
            ran++;
        }
    print_message("bodies x threads compared: %d\n", ran);
    st_cpu_gemv_use(NULL);
    free(w), free(x), free(y0), free(ref), free(y);
}

/* The backend's slot is this kernel. */
static void test_slot(void **state) {
    (void)state;
    const st_backend *be = st_backend_cpu(2);
    assert_non_null(be);
    assert_ptr_equal(be->gemv, st_cpu_gemv);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_reference),
        cmocka_unit_test(test_edges),
        cmocka_unit_test(test_bits),
        cmocka_unit_test(test_slot),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
