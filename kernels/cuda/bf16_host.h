/* bf16_host.h — fp32 <-> bf16 bit conversion on the host (plain C, no CUDA).
 * The rounding rule the GPU uses (__float2bfloat16_rn: round to nearest, ties to even) written once,
 * so checks and tests compare the multi-tensor AdamW's bf16 copy against the same rule. */
#ifndef ST_CUDA_BF16_HOST_H
#define ST_CUDA_BF16_HOST_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

uint16_t st_float_to_bf16_bits(float f); /* NaN stays a (quiet) NaN */
float st_bf16_bits_to_float(uint16_t b);

#ifdef __cplusplus
}
#endif
#endif
