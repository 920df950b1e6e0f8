/* bf16_host.c — fp32 <-> bf16 bit conversion (see bf16_host.h). */
#include "kernels/cuda/bf16_host.h"

#include <string.h>

uint16_t st_float_to_bf16_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu) != 0)
        return (uint16_t)((u >> 16) | 0x0040u); /* NaN: keep sign, force a quiet mantissa bit */
    uint32_t lsb = (u >> 16) & 1u;
    u += 0x7fffu + lsb; /* round to nearest, ties to even; overflow to inf is the right answer */
    return (uint16_t)(u >> 16);
}

float st_bf16_bits_to_float(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
