/* cpu_bf16.c — the CPU twin of matmul_bf16 (mixed precision, see kernels/kernels.h): it defines the
 * numerics every backend must reproduce.
 *
 * Both operands are rounded to bf16 (kernels/cuda/bf16_host.h, the project's one rounding rule) into
 * fp32 copies in the caller's scratch, then the ordinary fp32 matmul runs on the copies. Every product
 * of two bf16 values is exact in fp32 (8 + 8 significant bits), so this is "bf16 inputs, fp32
 * accumulation, fp32 output" — what cuBLASLt computes with CUDA_R_16BF inputs and CUBLAS_COMPUTE_32F,
 * up to the order of the fp32 additions. Nothing is allocated; the copies keep A's and B's layout, so
 * the transpose flags pass through unchanged. */
#include "kernels/cpu/cpu_kernels.h"
#include "kernels/cuda/bf16_host.h"
#include "kernels/kernels.h"

#include <stddef.h>

/* dst[i] = bf16(src[i]) for n elements. */
static void round_copy(float *restrict dst, const float *restrict src, size_t n) {
#pragma omp parallel for schedule(static) if (n >= ST_CPU_PAR_MIN)
    for (size_t i = 0; i < n; i++) dst[i] = st_bf16_round(src[i]);
}

void st_cpu_matmul_bf16(float *c, const float *a, const float *b, int m, int n, int k, int trans_a, int trans_b,
                        float alpha, float beta, float *scratch) {
    if (m <= 0 || n <= 0) return;
    if (k <= 0) { /* empty product: only the beta * C part, exactly as the fp32 matmul does it */
        st_cpu_matmul(c, a, b, m, n, k, trans_a, trans_b, alpha, beta);
        return;
    }
    size_t na = (size_t)m * (size_t)k, nb = (size_t)k * (size_t)n;
    float *ra = scratch, *rb = scratch + (na + 15) / 16 * 16; /* layout of st_matmul_bf16_scratch_floats */
    round_copy(ra, a, na);
    round_copy(rb, b, nb);
    st_cpu_matmul(c, ra, rb, m, n, k, trans_a, trans_b, alpha, beta);
}
