/* cpu_optim.c — fused AdamW over a flat range, and dequantization of int8 / NF4 base weights.
 *
 * AdamW follows torch.optim.AdamW (single-tensor path) operation by operation in float32: scalars
 * that PyTorch computes as Python doubles (1 - lr*wd, bias corrections, step size) are computed in
 * double here and rounded to float once, exactly where PyTorch hands them to a float kernel.
 * Elementwise, so parallel over elements with no ordering concern. Caller owns every buffer. */
#include "kernels/cpu/cpu_kernels.h"
#include "kernels/bf16.h"
#include "kernels/kernels.h"

#include <math.h>

/* One AdamW element, in torch's operation order (see the top of the file). The file is built without
 * FMA contraction: the two moments' fused multiply-adds are written out (the form the compiler chose
 * for the scalar loop before it was vectorized), the weight decay is rounded before the update is added
 * (torch's param.mul_ then addcdiv_). */
#define ADAMW_ELEMENT                                                   \
    float g = grad[i] * grad_scale;                                     \
    float p = param[i] * decay;                                         \
    float mi = fmaf(m[i], beta1, one_m_b1 * g);                         \
    float vi = fmaf(v[i], beta2, one_m_b2 * g * g);                     \
    float denom = sqrtf(vi) / bc2_sqrt + eps;                           \
    float updated = p + neg_step_size * mi / denom;                     \
    param[i] = updated;                                                 \
    m[i] = mi;                                                          \
    v[i] = vi;

/* One loop of AdamW over [0, n): BF16 writes the bf16 copy of each updated value; AFTER is a statement
 * run last for element i (zeroing the gradient, or nothing). BF16 is a compile-time constant at each use,
 * so every variant is a loop without a branch inside. */
#define ADAMW_LOOP(BF16, AFTER)                                                 \
    {                                                                          \
        _Pragma("omp parallel for schedule(static) if (n >= ST_CPU_PAR_MIN)") \
        for (size_t i = 0; i < n; i++) {                                       \
            ADAMW_ELEMENT                                                      \
            if (BF16) param_bf16[i] = st_float_to_bf16_bits(updated);          \
            AFTER                                                              \
        }                                                                      \
    }

/* AdamW on one range; with param_bf16, also its bf16 copy of the updated values, and with gz (== grad)
 * the gradient zeroed, all in the same pass. Loops without a branch inside, so that the compiler
 * vectorizes them (sqrtf and the divisions are correctly rounded in vector form too: the same bits as
 * the scalar loop; the file is built with -fno-math-errno, CMakeLists.txt, or sqrtf's errno path keeps
 * the loop scalar). Without fmaf (no FMA hardware) the moments are rounded twice: still within the
 * tests' tolerances. A memory-bound pass: scalar, it ran at a third of the bandwidth of a plain loop with
 * the same loads and stores; zeroing here instead of a memset before the next backward saves a pass over
 * the gradients (the line is already in cache when the zero is stored). */
static void adamw_range(float *restrict param, uint16_t *restrict param_bf16, const float *grad_in, float *gz,
                        float *restrict m, float *restrict v, size_t n, float lr, float beta1, float beta2, float eps,
                        float weight_decay, float grad_scale, int step) {
    const st_adamw_scalars s = st_adamw_scalars_for(lr, weight_decay, beta1, beta2, step);
    const float decay = s.decay, one_m_b1 = s.one_m_b1, one_m_b2 = s.one_m_b2;
    const float neg_step_size = s.neg_step_size, bc2_sqrt = s.bc2_sqrt;
    if (gz) { /* grad and gz are one array: read element i, then zero it */
        float *restrict grad = gz;
        if (param_bf16) ADAMW_LOOP(1, grad[i] = 0.0f;)
        else ADAMW_LOOP(0, grad[i] = 0.0f;)
    } else {
        const float *restrict grad = grad_in;
        if (param_bf16) ADAMW_LOOP(1, )
        else ADAMW_LOOP(0, )
    }
}

void st_cpu_adamw(float *restrict param, const float *restrict grad, float *restrict m, float *restrict v,
                  size_t n, float lr, float beta1, float beta2, float eps, float weight_decay, float grad_scale,
                  int step) {
    adamw_range(param, NULL, grad, NULL, m, v, n, lr, beta1, beta2, eps, weight_decay, grad_scale, step);
}

void st_cpu_adamw_multi(const st_adamw_range *r, int count, float beta1, float beta2, float eps, float grad_scale) {
    for (int i = 0; i < count; i++)
        adamw_range(r[i].param, r[i].param_bf16, r[i].grad, r[i].zero_grad, r[i].m, r[i].v, r[i].n, r[i].lr, beta1, beta2, eps,
                    r[i].weight_decay, grad_scale, r[i].step);
}

void st_cpu_dequant_int8(float *restrict out, const int8_t *restrict q, const float *restrict scale, size_t n,
                         int block) {
    if (block <= 0) return;
    size_t nblocks = (n + (size_t)block - 1) / (size_t)block;
#pragma omp parallel for schedule(static) if (n >= ST_CPU_PAR_MIN)
    for (size_t bi = 0; bi < nblocks; bi++) {
        size_t i0 = bi * (size_t)block, i1 = i0 + (size_t)block < n ? i0 + (size_t)block : n;
        float s = scale[bi];
        for (size_t i = i0; i < i1; i++) out[i] = (float)q[i] * s;
    }
}

void st_cpu_dequant_nf4(float *restrict out, const uint8_t *restrict packed, const float *restrict absmax,
                        size_t n, int block) {
    if (block <= 0) return;
    size_t nblocks = (n + (size_t)block - 1) / (size_t)block;
#pragma omp parallel for schedule(static) if (n >= ST_CPU_PAR_MIN)
    for (size_t bi = 0; bi < nblocks; bi++) {
        size_t i0 = bi * (size_t)block, i1 = i0 + (size_t)block < n ? i0 + (size_t)block : n;
        float s = absmax[bi];
        for (size_t i = i0; i < i1; i++) {
            uint8_t byte = packed[i >> 1];
            int code = (i & 1) ? byte >> 4 : byte & 15; /* low nibble first */
            out[i] = ST_NF4_LEVELS[code] * s;
        }
    }
}
