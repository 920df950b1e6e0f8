/* bf16.h — fp32 <-> bf16 conversion on the host (plain C, no CUDA): the project's one rounding rule.
 *
 * Round to nearest, ties to even — what the GPU's __float2bfloat16_rn does — written once here and used
 * by the CPU backend's matmul_bf16 twin (kernels/cpu/cpu_bf16.c), the multi-tensor AdamW's bf16 copy checks
 * and the tests, so every side compares against the same function. Header-only (static inline) so the CPU
 * rounding loops can be vectorized. */
#ifndef ST_CUDA_BF16_HOST_H
#define ST_CUDA_BF16_HOST_H

#include <stdint.h>
#include <string.h>

#ifdef __cplusplus
extern "C" {
#endif

/* NaN stays a (quiet) NaN with its sign; overflow rounds to inf (the correctly rounded answer). */
static inline uint16_t st_float_to_bf16_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu) != 0)
        return (uint16_t)((u >> 16) | 0x0040u); /* NaN: keep sign, force a quiet mantissa bit */
    uint32_t lsb = (u >> 16) & 1u;
    u += 0x7fffu + lsb; /* round to nearest, ties to even */
    return (uint16_t)(u >> 16);
}

static inline float st_bf16_bits_to_float(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* f rounded to the nearest bf16 value, held in an fp32. */
static inline float st_bf16_round(float f) { return st_bf16_bits_to_float(st_float_to_bf16_bits(f)); }

#ifdef __cplusplus
}
#endif
#endif
