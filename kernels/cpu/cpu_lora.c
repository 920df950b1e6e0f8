/* cpu_lora.c — the CPU twins of the LoRA dropout mask, DoRA's kernels and the prompt encoders' activation
 * (st_backend.lora_dropout, dora_norm, dora_apply, dora_bwd, scale_rows, prompt_act, prompt_act_bwd:
 * kernels/kernels.h; the CUDA kernels are in
 * kernels/cuda/backend_cuda.cu). Built with -ffp-contract=off (CMakeLists.txt): every product and sum is
 * rounded on its own, as the CUDA kernels' __fmul_rn / __dmul_rn ..., on any -march. */
#include "kernels/cpu/cpu_kernels.h"

#include <math.h>

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

void st_cpu_dora_norm(float *c, float *inv, const float *w, const float *ba, const float *mg, int out, int in,
                      float scale) {
    for (int j = 0; j < out; j++) {
        const float *wr = w + (size_t)j * in, *d = ba + (size_t)j * in;
        double ss = 0;
        for (int i = 0; i < in; i++) {
            double v = (double)wr[i] + (double)scale * d[i];
            ss += v * v;
        }
        inv[j] = (float)(1.0 / sqrt(ss));
        c[j] = mg[j] * inv[j];
    }
}

void st_cpu_dora_apply(float *y, int ldy, const float *z, const float *base, const float *c, int rows, int out) {
    for (int i = 0; i < rows; i++) {
        float *yr = y + (size_t)i * ldy;
        const float *zr = z + (size_t)i * out, *br = base + (size_t)i * out;
        for (int j = 0; j < out; j++) yr[j] += c[j] * zr[j] - br[j];
    }
}

void st_cpu_dora_bwd(float *gm, float *base, float *dy, const float *z, const float *c, const float *inv, int rows,
                     int out) {
    for (int j = 0; gm && j < out; j++) {
        double s = 0;
        for (int i = 0; i < rows; i++) s += (double)dy[(size_t)i * out + j] * z[(size_t)i * out + j];
        gm[j] += (float)(s * inv[j]);
    }
    for (size_t e = 0; e < (size_t)rows * out; e++) {
        float cj = c[e % (size_t)out];
        base[e] = (cj - 1.0f) * dy[e];
        dy[e] *= cj;
    }
}

void st_cpu_scale_rows(float *w, const float *c, int out, int in) {
    for (int j = 0; j < out; j++)
        for (int i = 0; i < in; i++) w[(size_t)j * in + i] *= c[j];
}

void st_cpu_prompt_act(float *r, const float *a, size_t n, int tanh_act) {
    for (size_t i = 0; i < n; i++) r[i] = tanh_act ? tanhf(a[i]) : (a[i] > 0 ? a[i] : 0.0f);
}

void st_cpu_prompt_act_bwd(float *dx, const float *a, const float *r, size_t n, int tanh_act) {
    for (size_t i = 0; i < n; i++) dx[i] *= tanh_act ? 1.0f - r[i] * r[i] : (a[i] > 0 ? 1.0f : 0.0f);
}
