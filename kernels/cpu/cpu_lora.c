/* cpu_lora.c — the CPU twin of the LoRA dropout mask (st_backend.lora_dropout, kernels/kernels.h; the CUDA
 * kernel is in kernels/cuda/backend_cuda.cu). Built with -ffp-contract=off (CMakeLists.txt): add + x * inv
 * is two rounded operations, as the CUDA kernel's __fmul_rn / __fadd_rn, on any -march. */
#include "kernels/cpu/cpu_kernels.h"

static uint64_t mix64(uint64_t z) { /* splitmix64's finalizer */
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

void st_cpu_lora_dropout(float *out, const float *x, const float *add, int rows, int in, int t, uint64_t key,
                         int64_t sample0, int k, uint64_t thresh, float inv) {
    for (int i = 0; i < rows; i++) {
        uint64_t rk = mix64(key ^ mix64((uint64_t)(sample0 + (int64_t)(i / t)) * 0x9e3779b97f4a7c15ull + (uint64_t)(i % t)));
        rk = mix64(rk ^ (uint64_t)k);
        const float *xr = x + (size_t)i * in, *ar = add ? add + (size_t)i * in : NULL;
        float *orow = out + (size_t)i * in;
        for (int j = 0; j < in; j++) {
            float v = mix64(rk + (uint64_t)j) >= thresh ? xr[j] * inv : 0.0f;
            orow[j] = ar ? ar[j] + v : v;
        }
    }
}
