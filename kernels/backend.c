/* backend.c — backend-independent pieces of kernels.h: NF4 levels, RoPE tables, backend lookup, the CUDA
 * int8 layouts' sizes. */
#include "kernels/kernels.h"
#include "common/error.h"

#include <math.h>

const float ST_NF4_LEVELS[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f,
};

/* kernels/cuda/int8.cu's layouts: a 256-byte aligned head of fp32 steps (one per row), then the codes,
 * rows of `in` rounded up to 32 bytes. */
static size_t w8_cuda(int rows, int in) {
    size_t r = rows > 0 ? (size_t)rows : 0, kp = ((size_t)(in > 0 ? in : 0) + 31) / 32 * 32;
    return (r * sizeof(float) + 255) / 256 * 256 + r * kp;
}
size_t st_cuda_w8_bytes(int out, int in) { return w8_cuda(out, in); }
size_t st_cuda_w8_scratch_bytes(int m, int in) { return w8_cuda(m, in); }

st_adamw_scalars st_adamw_scalars_for(float lr, float weight_decay, float beta1, float beta2, int step) {
    st_adamw_scalars s;
    double bc1 = 1.0 - pow((double)beta1, (double)step);
    double bc2 = 1.0 - pow((double)beta2, (double)step);
    s.decay = (float)(1.0 - (double)lr * (double)weight_decay);
    s.one_m_b1 = (float)(1.0 - (double)beta1);
    s.one_m_b2 = (float)(1.0 - (double)beta2);
    s.neg_step_size = (float)(-((double)lr / bc1));
    s.bc2_sqrt = (float)sqrt(bc2);
    return s;
}

void st_rope_tables(float *cos_out, float *sin_out, int t, int hd, float theta) {
    int half = hd / 2;
    for (int pos = 0; pos < t; pos++) {
        for (int i = 0; i < half; i++) {
            /* computed in double then rounded, like HF: inv_freq in fp32 is close enough at 1e-6 */
            double inv_freq = pow((double)theta, -2.0 * i / (double)hd);
            double ang = (double)pos * (float)inv_freq;
            cos_out[pos * half + i] = (float)cos(ang);
            sin_out[pos * half + i] = (float)sin(ang);
        }
    }
}

static const st_backend *override_be;
void st_backend_set_override(const st_backend *be) { override_be = be; }
const st_backend *st_backend_override(void) { return override_be; }

#ifndef ST_HAVE_CUDA
const st_backend *st_backend_cuda(int device) {
    (void)device;
    st_fail(ST_EDEVICE, "this shardtune was built without CUDA (configure with -DSHARDTUNE_CUDA=ON)");
    return NULL;
}
const st_backend *st_backend_cuda_for_rank(int local_rank, int local_size) {
    (void)local_rank;
    (void)local_size;
    return st_backend_cuda(0);
}
#endif
