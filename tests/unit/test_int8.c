/* test_int8.c — the CPU backend's int8 forward matmul (kernels.h matmul_w8a8, kernels/cpu/cpu_int8.c; the int8
 * distillation teacher) against references computed here in double.
 *
 * 1. Semantics: the test quantizes W per output row and A per token itself (the documented rule: scale absmax /
 *    127, codes clamp(rint(x / scale))) and sums the codes' products in double; the kernel's result may differ
 *    only by its two fp32 roundings (the int32 sum to float, the scale product, their product: <= 3 u |ref|,
 *    u = 2^-24) and, with beta / bias, the two additions' roundings.
 * 2. Quantization error bound, from the steps: with s_j = absmax(W_j) / 127 and t_i = absmax(A_i) / 127,
 *    |A - t p| <= t / 2 and |W - s q| <= s / 2 elementwise, so |C8 - A W^T|_ij <= sum_k (t_i / 2) |W_jk| +
 *    (|A_ik| + t_i / 2) (s_j / 2) (+ the fp32 rounding of 1.). Checked against A W^T in double.
 * 3. The VNNI and the scalar path give bit-identical results (when the CPU has VNNI), for 1 and 2 threads.
 * Odd shapes (K not a multiple of 4, N not of 16), an all-zero activation row and weight row. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cpu/cpu_kernels.h"
#include "common/util.h"
#include "kernels/kernels.h"

static uint64_t rng_state = 0x2545F4914F6CDD1DULL;
static double urand(void) { /* uniform [-1, 1) */
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (double)(rng_state >> 11) / (double)(1ULL << 53) * 2.0 - 1.0;
}

/* The documented rule, written independently of the kernel: codes and scale of one row. */
static float quant(const float *x, int n, int *q) {
    float amax = 0.0f;
    for (int k = 0; k < n; k++) amax = fabsf(x[k]) > amax ? fabsf(x[k]) : amax;
    float s = amax / 127.0f;
    for (int k = 0; k < n; k++) {
        float v = s > 0.0f ? rintf(x[k] / s) : 0.0f;
        q[k] = v > 127.0f ? 127 : v < -127.0f ? -127 : (int)v;
    }
    return s;
}

typedef struct {
    float *c;
    int m, n, k;
} result;

static result run(const float *a, const float *w, const float *bias, const float *c0, int m, int n, int k, float beta) {
    void *packed = st_calloc_aligned(st_cpu_w8_bytes(n, k));
    void *scratch = st_calloc_aligned(st_cpu_w8_scratch_bytes(m, k));
    st_cpu_w8_pack(packed, w, n, k);
    result r = {malloc((size_t)m * n * sizeof(float)), m, n, k};
    memcpy(r.c, c0, (size_t)m * n * sizeof(float));
    st_cpu_matmul_w8a8(r.c, a, packed, bias, m, n, k, beta, scratch);
    free(packed);
    free(scratch);
    return r;
}

static void check_shape(int m, int n, int k, float beta, int with_bias) {
    float *a = malloc((size_t)m * k * sizeof(float)), *w = malloc((size_t)n * k * sizeof(float));
    float *c0 = malloc((size_t)m * n * sizeof(float)), *bias = malloc((size_t)n * sizeof(float));
    for (int i = 0; i < m * k; i++) a[i] = (float)(urand() * (1 + i % 7)); /* rows with outliers */
    for (int i = 0; i < n * k; i++) w[i] = (float)(urand() * 0.05);
    for (int i = 0; i < m * n; i++) c0[i] = (float)urand();
    for (int j = 0; j < n; j++) bias[j] = (float)urand();
    memset(a + (size_t)(m / 2) * k, 0, (size_t)k * sizeof(float)); /* an all-zero token */
    memset(w + (size_t)(n / 3) * k, 0, (size_t)k * sizeof(float)); /* an all-zero output row */
    const float *b = with_bias ? bias : NULL;

    st_cpu_int8_force(0);
    omp_set_num_threads(1);
    result ref_path = run(a, w, b, c0, m, n, k, beta);
    omp_set_num_threads(2);
    result two = run(a, w, b, c0, m, n, k, beta);
    assert_memory_equal(ref_path.c, two.c, (size_t)m * n * sizeof(float));
    st_cpu_int8_force(-1);
    if (st_cpu_int8_vnni()) { /* the AVX-512 VNNI path: the same integers, the same fp32 epilogue */
        result v = run(a, w, b, c0, m, n, k, beta);
        assert_memory_equal(ref_path.c, v.c, (size_t)m * n * sizeof(float));
        omp_set_num_threads(1);
        result v1 = run(a, w, b, c0, m, n, k, beta);
        assert_memory_equal(ref_path.c, v1.c, (size_t)m * n * sizeof(float));
        free(v.c), free(v1.c);
    } else {
        print_message("  (no AVX-512 VNNI here: the scalar path only)\n");
    }

    int *p = malloc((size_t)m * k * sizeof(int)), *q = malloc((size_t)n * k * sizeof(int));
    float *t = malloc((size_t)m * sizeof(float)), *s = malloc((size_t)n * sizeof(float));
    for (int i = 0; i < m; i++) t[i] = quant(a + (size_t)i * k, k, p + (size_t)i * k);
    for (int j = 0; j < n; j++) s[j] = quant(w + (size_t)j * k, k, q + (size_t)j * k);
    const double u = ldexp(1.0, -24);
    double worst_sem = 0, worst_bound = 0;
    for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++) {
            double isum = 0, exact = 0, bound = 0;
            for (int kk = 0; kk < k; kk++) {
                isum += (double)p[(size_t)i * k + kk] * q[(size_t)j * k + kk];
                double av = a[(size_t)i * k + kk], wv = w[(size_t)j * k + kk];
                exact += av * wv;
                bound += t[i] / 2.0 * fabs(wv) + (fabs(av) + t[i] / 2.0) * (s[j] / 2.0);
            }
            double prod = isum * ((double)t[i] * s[j]);
            double bc = beta != 0.0f ? beta * (double)c0[(size_t)i * n + j] : 0.0, bj = b ? b[j] : 0.0;
            double add = bc + bj, mag = fabs(bc) + fabs(bj); /* the additions round partial sums up to mag */
            double ours = ref_path.c[(size_t)i * n + j];
            /* 1. the quantized product: three roundings of the product, two of the additions */
            double tol_sem = 3 * u * fabs(prod) + 2 * u * (fabs(prod) + mag) + 1e-30;
            double e_sem = fabs(ours - (prod + add));
            if (e_sem / tol_sem > worst_sem) worst_sem = e_sem / tol_sem;
            if (e_sem > tol_sem)
                fail_msg("[%d,%d] (m %d n %d k %d): %.9g vs quantized reference %.9g (tol %.3g)", i, j, m, n, k, ours,
                         prod + add, tol_sem);
            /* 2. against the unquantized product, within the steps' bound (+ the rounding above) */
            double e = fabs(ours - (exact + add));
            if (e / (bound + tol_sem) > worst_bound) worst_bound = e / (bound + tol_sem);
            if (e > bound + tol_sem)
                fail_msg("[%d,%d]: %.9g vs fp64 %.9g: error %.3g above the step bound %.3g", i, j, ours, exact + add,
                         e, bound);
        }
    print_message("  m %d n %d k %d beta %g bias %d: max err / rounding tol %.3f, max err / step bound %.3f\n", m, n,
                  k, (double)beta, with_bias, worst_sem, worst_bound);
    free(ref_path.c), free(two.c), free(a), free(w), free(c0), free(bias), free(p), free(q), free(t), free(s);
}

static void test_matmul_w8a8(void **state) {
    (void)state;
    check_shape(37, 83, 70, 0.0f, 0);
    check_shape(64, 48, 96, 1.0f, 1);   /* the residual add and a bias */
    check_shape(130, 200, 257, 0.0f, 1); /* several tiles, parallel */
    check_shape(1, 16, 4, 0.0f, 0);
    check_shape(5, 700, 33, 1.0f, 0);
}

int main(void) {
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_matmul_w8a8)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
