/* pointwise.cu — per-element kernels: GELU, SwiGLU, embedding forward/backward, AdamW (single range and
 * the multi-tensor fp32-master -> bf16-copy variant) and int8 / NF4 dequantization.
 *
 * All are grid-stride loops with one writer per output element. The embedding backward keeps the
 * sequential order of the CPU twin without atomics: thread (p, j) owns column j of every vocabulary row
 * whose id is p mod ST_CUDA_EMB_VOCAB_SPLIT and walks the tokens in order, so each dwte element receives
 * its additions in token order. */
#include "kernels/cuda/cuda_ops.cuh"
#include "kernels/cuda/cuda_extras.h"

#include <cuda_bf16.h>
#include <math.h>
#include <string.h>

#define GRID_STRIDE(i, n)                                                         \
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < (n);         \
         i += (size_t)gridDim.x * blockDim.x)

static dim3 grid_for(size_t n) { return dim3(st_cuda_grid_1d(n, ST_CUDA_THREADS)); }

/* ---------------------------------------------------------------- GELU (tanh approximation) */

#define GELU_K 0.7978845608028654f /* sqrt(2/pi) */
#define GELU_C 0.044715f

/* The CPU twin's form (kernels/cpu/cpu_activations.c): 0.5 * (1 + tanh(u)) = sigmoid(2u), so
 * gelu(x) = x / (1 + exp(-2u)). Not 0.5 * x * (1 + tanhf(u)): for x < -3, 1 + tanhf(u) cancels (relative
 * error 5e-4 at x = -4, 0.3 at x = -5, and exactly 0 below about -5.7 where the CPU gives -8e-11). */
__global__ void gelu_fwd_kernel(float *out, const float *x, size_t n) {
    GRID_STRIDE(i, n) {
        float v = x[i];
        float u = GELU_K * (v + GELU_C * v * v * v);
        out[i] = v / (1.0f + expf(-2.0f * u));
    }
}

/* gelu'(x) = s + 2 x s (1 - s) u'(x), s = sigmoid(2u), u' = sqrt(2/pi) (1 + 3 * 0.044715 x^2): the CPU
 * twin's form, free of the same cancellation. */
__global__ void gelu_bwd_kernel(float *dx, const float *dout, const float *x, size_t n) {
    GRID_STRIDE(i, n) {
        float v = x[i];
        float u = GELU_K * (v + GELU_C * v * v * v);
        float s = 1.0f / (1.0f + expf(-2.0f * u));
        float du = GELU_K * (1.0f + 3.0f * GELU_C * v * v);
        dx[i] = dout[i] * (s + 2.0f * v * s * (1.0f - s) * du);
    }
}

void st_cu_gelu_fwd(float *out, const float *x, size_t n) {
    if (n == 0) return;
    gelu_fwd_kernel<<<grid_for(n), ST_CUDA_THREADS, 0, st_cuda_stream_internal()>>>(out, x, n);
    ST_CUDA_LAUNCHED("gelu_fwd");
}

void st_cu_gelu_bwd(float *dx, const float *dout, const float *x, size_t n) {
    if (n == 0) return;
    gelu_bwd_kernel<<<grid_for(n), ST_CUDA_THREADS, 0, st_cuda_stream_internal()>>>(dx, dout, x, n);
    ST_CUDA_LAUNCHED("gelu_bwd");
}

/* ---------------------------------------------------------------- SwiGLU over packed gate|up rows */

__global__ void swiglu_fwd_kernel(float *out, const float *gu, int n, int f) {
    size_t total = (size_t)n * f;
    GRID_STRIDE(idx, total) {
        size_t row = idx / f, j = idx % f;
        float g = gu[row * 2 * f + j], u = gu[row * 2 * f + f + j];
        out[idx] = g / (1.0f + expf(-g)) * u;
    }
}

__global__ void swiglu_bwd_kernel(float *dgu, const float *dout, const float *gu, int n, int f) {
    size_t total = (size_t)n * f;
    GRID_STRIDE(idx, total) {
        size_t row = idx / f, j = idx % f;
        float g = gu[row * 2 * f + j], u = gu[row * 2 * f + f + j];
        float sig = 1.0f / (1.0f + expf(-g));
        float d = dout[idx];
        dgu[row * 2 * f + j] = d * u * sig * (1.0f + g * (1.0f - sig));
        dgu[row * 2 * f + f + j] = d * g * sig;
    }
}

void st_cu_swiglu_fwd(float *out, const float *gu, int n, int f) {
    if (n <= 0 || f <= 0) return;
    swiglu_fwd_kernel<<<grid_for((size_t)n * f), ST_CUDA_THREADS, 0, st_cuda_stream_internal()>>>(out, gu, n, f);
    ST_CUDA_LAUNCHED("swiglu_fwd");
}

void st_cu_swiglu_bwd(float *dgu, const float *dout, const float *gu, int n, int f) {
    if (n <= 0 || f <= 0) return;
    swiglu_bwd_kernel<<<grid_for((size_t)n * f), ST_CUDA_THREADS, 0, st_cuda_stream_internal()>>>(dgu, dout, gu,
                                                                                                   n, f);
    ST_CUDA_LAUNCHED("swiglu_bwd");
}

/* ---------------------------------------------------------------- embeddings */

__global__ void embedding_fwd_kernel(float *out, const int32_t *tokens, const float *wte, const float *wpe,
                                     int b, int t, int c) {
    size_t total = (size_t)b * t * c;
    GRID_STRIDE(idx, total) {
        size_t row = idx / c, j = idx % c;
        float v = wte[(size_t)tokens[row] * c + j];
        if (wpe) v += wpe[(row % t) * c + j];
        out[idx] = v;
    }
}

__global__ void embedding_bwd_wte_kernel(float *dwte, const float *dout, const int32_t *tokens, int rows, int c) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    unsigned p = blockIdx.y; /* token-id residue class this thread owns */
    if (j >= c) return;
    for (int r = 0; r < rows; r++) {
        int32_t tok = tokens[r];
        if ((unsigned)tok % ST_CUDA_EMB_VOCAB_SPLIT != p) continue;
        dwte[(size_t)tok * c + j] += dout[(size_t)r * c + j];
    }
}

__global__ void embedding_bwd_wpe_kernel(float *dwpe, const float *dout, int b, int t, int c) {
    size_t total = (size_t)t * c;
    GRID_STRIDE(idx, total) {
        size_t pos = idx / c, j = idx % c;
        float acc = dwpe[idx];
        for (int bi = 0; bi < b; bi++) acc += dout[((size_t)bi * t + pos) * c + j];
        dwpe[idx] = acc;
    }
}

void st_cu_embedding_fwd(float *out, const int32_t *tokens, const float *wte, const float *wpe, int b, int t,
                         int c) {
    if (b <= 0 || t <= 0 || c <= 0) return;
    embedding_fwd_kernel<<<grid_for((size_t)b * t * c), ST_CUDA_THREADS, 0, st_cuda_stream_internal()>>>(
        out, tokens, wte, wpe, b, t, c);
    ST_CUDA_LAUNCHED("embedding_fwd");
}

void st_cu_embedding_bwd(float *dwte, float *dwpe, const float *dout, const int32_t *tokens, int b, int t, int c) {
    if (b <= 0 || t <= 0 || c <= 0) return;
    cudaStream_t st = st_cuda_stream_internal();
    dim3 grid((c + ST_CUDA_THREADS - 1) / ST_CUDA_THREADS, ST_CUDA_EMB_VOCAB_SPLIT);
    embedding_bwd_wte_kernel<<<grid, ST_CUDA_THREADS, 0, st>>>(dwte, dout, tokens, b * t, c);
    ST_CUDA_LAUNCHED("embedding_bwd (wte)");
    if (dwpe) {
        embedding_bwd_wpe_kernel<<<grid_for((size_t)t * c), ST_CUDA_THREADS, 0, st>>>(dwpe, dout, b, t, c);
        ST_CUDA_LAUNCHED("embedding_bwd (wpe)");
    }
}

/* ---------------------------------------------------------------- AdamW */

/* The contract's update for one element, operation by operation as the CPU twin (kernels/cpu/cpu_optim.c)
 * with the same host-computed scalars (st_adamw_scalars_for); returns the new parameter. */
__device__ __forceinline__ float adamw_step(float param, float grad, float *m, float *v, float beta1, float beta2,
                                            float eps, float grad_scale, const st_adamw_scalars &s) {
    float g = grad * grad_scale;
    float p = param * s.decay;
    float mi = *m * beta1 + s.one_m_b1 * g;
    float vi = *v * beta2 + s.one_m_b2 * g * g;
    float denom = sqrtf(vi) / s.bc2_sqrt + eps;
    *m = mi;
    *v = vi;
    return p + s.neg_step_size * mi / denom;
}

__global__ void adamw_kernel(float *param, const float *grad, float *m, float *v, size_t n, float beta1, float beta2,
                             float eps, float grad_scale, st_adamw_scalars s) {
    GRID_STRIDE(i, n) param[i] = adamw_step(param[i], grad[i], m + i, v + i, beta1, beta2, eps, grad_scale, s);
}

void st_cu_adamw(float *param, const float *grad, float *m, float *v, size_t n, float lr, float beta1, float beta2,
                 float eps, float weight_decay, float grad_scale, int step) {
    if (n == 0) return;
    st_adamw_scalars s = st_adamw_scalars_for(lr, weight_decay, beta1, beta2, step);
    adamw_kernel<<<grid_for(n), ST_CUDA_THREADS, 0, st_cuda_stream_internal()>>>(param, grad, m, v, n, beta1, beta2,
                                                                                  eps, grad_scale, s);
    ST_CUDA_LAUNCHED("adamw");
}

/* Multi-tensor: one launch covers up to ST_CUDA_MT_MAX_TENSORS ranges, passed by value as kernel
 * parameters (~1.8 KB, under the 4 KB parameter limit); blockIdx.y picks the range. Each range has its
 * own scalars (lr, weight decay and step count differ per parameter). */
struct mt_batch {
    float *p[ST_CUDA_MT_MAX_TENSORS];
    const float *g[ST_CUDA_MT_MAX_TENSORS];
    float *m[ST_CUDA_MT_MAX_TENSORS];
    float *v[ST_CUDA_MT_MAX_TENSORS];
    uint16_t *bf[ST_CUDA_MT_MAX_TENSORS];
    float *z[ST_CUDA_MT_MAX_TENSORS]; /* zero_grad: the gradient again, zeroed once read (or NULL) */
    size_t n[ST_CUDA_MT_MAX_TENSORS];
    st_adamw_scalars s[ST_CUDA_MT_MAX_TENSORS];
};

__global__ void adamw_multi_kernel(mt_batch batch, float beta1, float beta2, float eps, float grad_scale) {
    int ti = blockIdx.y;
    float *p = batch.p[ti], *m = batch.m[ti], *v = batch.v[ti];
    const float *g = batch.g[ti];
    uint16_t *bf = batch.bf[ti];
    float *z = batch.z[ti];
    const st_adamw_scalars s = batch.s[ti];
    GRID_STRIDE(i, batch.n[ti]) {
        float np = adamw_step(p[i], g[i], m + i, v + i, beta1, beta2, eps, grad_scale, s);
        p[i] = np;
        if (bf) bf[i] = st_bf16_bits_rn(np);
        if (z) z[i] = 0.0f; /* the same thread read g[i] (z == g) */
    }
}

void st_cu_adamw_multi(const st_adamw_range *r, int count, float beta1, float beta2, float eps, float grad_scale) {
    for (int l = 0; l < st_cuda_mt_launches(count); l++) {
        int first = l * ST_CUDA_MT_MAX_TENSORS;
        int in_batch = count - first < ST_CUDA_MT_MAX_TENSORS ? count - first : ST_CUDA_MT_MAX_TENSORS;
        mt_batch batch;
        memset(&batch, 0, sizeof batch);
        size_t max_n = 0;
        for (int i = 0; i < in_batch; i++) {
            const st_adamw_range *t = &r[first + i];
            batch.p[i] = t->param, batch.g[i] = t->grad, batch.m[i] = t->m, batch.v[i] = t->v;
            batch.bf[i] = t->param_bf16, batch.z[i] = t->zero_grad, batch.n[i] = t->n;
            batch.s[i] = st_adamw_scalars_for(t->lr, t->weight_decay, beta1, beta2, t->step);
            if (t->n > max_n) max_n = t->n;
        }
        if (max_n == 0) continue;
        dim3 grid(st_cuda_grid_1d(max_n, ST_CUDA_THREADS), in_batch);
        adamw_multi_kernel<<<grid, ST_CUDA_THREADS, 0, st_cuda_stream_internal()>>>(batch, beta1, beta2, eps,
                                                                                     grad_scale);
        ST_CUDA_LAUNCHED("adamw_multi");
    }
}

/* ---------------------------------------------------------------- dequantization */

struct nf4_table {
    float level[16]; /* ST_NF4_LEVELS, passed by value: no device-global state to initialize */
};

__global__ void dequant_int8_kernel(float *out, const int8_t *q, const float *scale, size_t n, int block) {
    GRID_STRIDE(i, n) out[i] = (float)q[i] * scale[i / block];
}

__global__ void dequant_nf4_kernel(float *out, const uint8_t *packed, const float *absmax, size_t n, int block,
                                   nf4_table tab) {
    GRID_STRIDE(i, n) {
        int code = (packed[i >> 1] >> ((i & 1) * 4)) & 0xF; /* low nibble first */
        out[i] = tab.level[code] * absmax[i / block];
    }
}

void st_cu_dequant_int8(float *out, const int8_t *q, const float *scale, size_t n, int block) {
    if (n == 0) return;
    if (block <= 0) { st_cuda_note("dequant_int8", "block size must be positive"); return; }
    dequant_int8_kernel<<<grid_for(n), ST_CUDA_THREADS, 0, st_cuda_stream_internal()>>>(out, q, scale, n, block);
    ST_CUDA_LAUNCHED("dequant_int8");
}

void st_cu_dequant_nf4(float *out, const uint8_t *packed, const float *absmax, size_t n, int block) {
    if (n == 0) return;
    if (block <= 0) { st_cuda_note("dequant_nf4", "block size must be positive"); return; }
    nf4_table tab;
    memcpy(tab.level, ST_NF4_LEVELS, sizeof tab.level);
    dequant_nf4_kernel<<<grid_for(n), ST_CUDA_THREADS, 0, st_cuda_stream_internal()>>>(out, packed, absmax, n,
                                                                                        block, tab);
    ST_CUDA_LAUNCHED("dequant_nf4");
}
