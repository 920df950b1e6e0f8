/* cpu_bf16.c — the CPU twins of the mixed-precision entries (see kernels/kernels.h): matmul_bf16,
 * to_bf16 and from_bf16. They define the numerics every backend must reproduce.
 *
 * matmul_bf16: each operand becomes an fp32 copy of its bf16 value in the caller's scratch (fp32
 * operands are rounded with kernels/bf16.h, the project's one rounding rule; bf16 operands are
 * widened exactly), then the ordinary fp32 matmul runs on the copies and the bias, if any, is added
 * after it. Every product of two bf16 values is exact in fp32 (8 + 8 significant bits), so this is
 * "bf16 inputs, fp32 accumulation, fp32 output" — what cuBLASLt computes with CUDA_R_16BF inputs,
 * CUBLAS_COMPUTE_32F and the bias epilogue, up to the order of the fp32 additions. Nothing is allocated;
 * the copies keep A's and B's layout, so the transpose flags pass through unchanged. */
#include "kernels/cpu/cpu_kernels.h"
#include "kernels/bf16.h"
#include "kernels/kernels.h"

#include <stddef.h>

void st_cpu_to_bf16(uint16_t *restrict dst, const float *restrict src, size_t n) {
#pragma omp parallel for schedule(static) if (n >= ST_CPU_PAR_MIN)
    for (size_t i = 0; i < n; i++) dst[i] = st_float_to_bf16_bits(src[i]);
}

void st_cpu_from_bf16(float *restrict dst, const uint16_t *restrict src, size_t n) {
#pragma omp parallel for schedule(static) if (n >= ST_CPU_PAR_MIN)
    for (size_t i = 0; i < n; i++) dst[i] = st_bf16_bits_to_float(src[i]);
}

void st_cpu_round_bf16(float *x, size_t n) {
#pragma omp parallel for schedule(static) if (n >= ST_CPU_PAR_MIN)
    for (size_t i = 0; i < n; i++) x[i] = st_bf16_round(x[i]);
}

/* The operand's bf16 values as fp32 for sgemm: in place when they already are (`rounded`), else a copy
 * into `slot` (bf16 widened exactly, fp32 rounded). */
static const float *operand_fp32(st_mm_in src, float *restrict slot, size_t n) {
    if (src.f32 && src.rounded) return src.f32;
    if (src.bf16) {
        st_cpu_from_bf16(slot, src.bf16, n);
        return slot;
    }
    const float *restrict s = src.f32;
#pragma omp parallel for schedule(static) if (n >= ST_CPU_PAR_MIN)
    for (size_t i = 0; i < n; i++) slot[i] = st_bf16_round(s[i]);
    return slot;
}

void st_cpu_matmul_bf16(float *c, st_mm_in a, st_mm_in b, const float *bias, int m, int n, int k, int trans_a,
                        int trans_b, float alpha, float beta, float *scratch) {
    if (m <= 0 || n <= 0) return;
    if (k <= 0) { /* empty product: only the beta * C part, exactly as the fp32 matmul does it */
        st_cpu_matmul(c, NULL, NULL, m, n, k, trans_a, trans_b, alpha, beta);
    } else {
        size_t na = (size_t)m * (size_t)k, nb = (size_t)k * (size_t)n;
        float *slot_a = scratch, *slot_b = scratch + (na + 15) / 16 * 16; /* st_matmul_bf16_scratch_floats */
        const float *ra = operand_fp32(a, slot_a, na), *rb = operand_fp32(b, slot_b, nb);
        st_cpu_matmul(c, ra, rb, m, n, k, trans_a, trans_b, alpha, beta);
    }
    if (bias) st_cpu_bias_add(c, bias, m, n);
}
