/* decode.cu — the decode-step kernels of generation (CUDA twins of kernels/cpu/cpu_decode.c; layouts in
 * kernels.h): kv_store copies each token's k and v heads into the KV cache; attention_cached runs one
 * warp per (token, query head) over the token's cached keys in tiles of 32: lane j scores key j of the
 * tile against the query (kept in shared memory), the warp keeps an online softmax (running max and sum,
 * rescaled accumulator) and lane d owns output dims d, d + 32, ... Each output element has one writer
 * and a fixed summation order: reproducible. head_dim <= ST_DECODE_MAX_HD. decode_mm (generation's
 * small-batch products on fp32- or bf16-held weights): one warp per weight row, lane j summing elements
 * j, j + 32, ... of each dot product in order, then the warp's butterfly sum; a bf16 weight is widened
 * exactly (shift left 16) before the same fused multiply-add, so both holdings give the same bits. */
#include "kernels/cuda/cuda_ops.cuh"

#include <math.h>

#define ST_DECODE_WARPS 4
#define ST_DECODE_MAX_HD 256

/* A weight as fp32: itself, or a bf16 bit pattern widened exactly. */
__device__ __forceinline__ float st_decode_widen(float v) { return v; }
__device__ __forceinline__ float st_decode_widen(uint16_t b) { return __uint_as_float((uint32_t)b << 16); }

__global__ void kv_store_kernel(float *kc, float *vc, const float *qkv, const int32_t *row_seq,
                                const int32_t *row_pos, int rows, int h, int kvh, int hd, int max_t) {
    size_t kvd = (size_t)kvh * hd, total = (size_t)rows * kvd, stride = (size_t)(h + 2 * kvh) * hd;
    for (size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x; idx < total;
         idx += (size_t)gridDim.x * blockDim.x) {
        size_t i = idx / kvd, e = idx % kvd, g = e / hd; /* [S, KVH, max_t, hd]: kv head g's slice */
        size_t slot = (((size_t)row_seq[i] * kvh + g) * max_t + (size_t)row_pos[i]) * hd + e % hd;
        const float *src = qkv + i * stride + (size_t)h * hd + e;
        kc[slot] = src[0];
        vc[slot] = src[kvd];
    }
}

void st_cu_kv_store(float *kcache, float *vcache, const float *qkv, const int32_t *row_seq, const int32_t *row_pos,
                    int rows, int h, int kvh, int hd, int max_t) {
    if (rows <= 0 || kvh <= 0 || hd <= 0) return;
    size_t total = (size_t)rows * kvh * hd;
    kv_store_kernel<<<st_cuda_grid_1d(total, ST_CUDA_THREADS), ST_CUDA_THREADS, 0, st_cuda_stream_internal()>>>(
        kcache, vcache, qkv, row_seq, row_pos, rows, h, kvh, hd, max_t);
    ST_CUDA_LAUNCHED("kv_store");
}

__global__ void attention_cached_kernel(float *out, const float *qkv, const float *kc, const float *vc,
                                        const int32_t *row_seq, const int32_t *row_pos, int rows, int h, int kvh,
                                        int hd, int max_t, int window, float scale) {
    __shared__ float qs[ST_DECODE_WARPS][ST_DECODE_MAX_HD];
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    long w = (long)blockIdx.x * ST_DECODE_WARPS + warp;
    if (w >= (long)rows * h) return; /* whole warps leave together: only __syncwarp below */
    int i = (int)(w / h), hi = (int)(w % h);
    size_t stride = (size_t)(h + 2 * kvh) * hd;
    const float *q = qkv + (size_t)i * stride + (size_t)hi * hd;
    for (int d = lane; d < hd; d += 32) qs[warp][d] = q[d];
    __syncwarp();
    int k0 = window > 0 && row_pos[i] >= window ? row_pos[i] - window + 1 : 0; /* sliding window */
    int nk = row_pos[i] + 1 - k0;
    size_t base = (((size_t)row_seq[i] * kvh + (size_t)(hi / (h / kvh))) * max_t + (size_t)k0) * hd;
    const float *kb = kc + base, *vb = vc + base;
    float m = -INFINITY, l = 0.0f, acc[ST_DECODE_MAX_HD / 32];
    for (int c = 0; c < ST_DECODE_MAX_HD / 32; c++) acc[c] = 0.0f;
    for (int j0 = 0; j0 < nk; j0 += 32) {
        int j = j0 + lane;
        float s = -INFINITY;
        if (j < nk) {
            const float *k = kb + (size_t)j * hd;
            float dot = 0.0f;
            for (int d = 0; d < hd; d++) dot += qs[warp][d] * k[d];
            s = dot * scale;
        }
        float mnew = fmaxf(m, st_warp_max(s));
        float p = j < nk ? expf(s - mnew) : 0.0f;
        float corr = expf(m - mnew); /* 0 on the first tile (m = -inf) */
        l = l * corr + st_warp_sum(p);
        for (int c = 0; c < ST_DECODE_MAX_HD / 32; c++) acc[c] *= corr;
        int cnt = nk - j0 < 32 ? nk - j0 : 32;
        for (int jj = 0; jj < cnt; jj++) {
            float pj = __shfl_sync(0xffffffffu, p, jj);
            const float *v = vb + (size_t)(j0 + jj) * hd;
            for (int c = 0; c < ST_DECODE_MAX_HD / 32; c++) {
                int d = lane + 32 * c;
                if (d < hd) acc[c] += pj * v[d];
            }
        }
        m = mnew;
    }
    float inv = 1.0f / l;
    float *o = out + (size_t)i * h * hd + (size_t)hi * hd;
    for (int c = 0; c < ST_DECODE_MAX_HD / 32; c++) {
        int d = lane + 32 * c;
        if (d < hd) o[d] = acc[c] * inv;
    }
}

void st_cu_attention_cached(float *out, const float *qkv, const float *kcache, const float *vcache,
                            const int32_t *row_seq, const int32_t *row_pos, int rows, int h, int kvh, int hd,
                            int max_t, int window) {
    if (rows <= 0 || h <= 0 || kvh <= 0 || hd <= 0) return;
    if (hd > ST_DECODE_MAX_HD) {
        st_cuda_note("attention_cached", "head_dim above 256 is not supported by the CUDA decode kernel");
        return;
    }
    long work = (long)rows * h;
    int blocks = (int)((work + ST_DECODE_WARPS - 1) / ST_DECODE_WARPS);
    attention_cached_kernel<<<blocks, 32 * ST_DECODE_WARPS, 0, st_cuda_stream_internal()>>>(
        out, qkv, kcache, vcache, row_seq, row_pos, rows, h, kvh, hd, max_t, window, 1.0f / sqrtf((float)hd));
    ST_CUDA_LAUNCHED("attention_cached");
}

/* y[r, o] = dot(x[r], W[o]) (+ y[r, o] when accumulate), one warp per weight row o, every row r. */
template <typename W>
__global__ void decode_mm_kernel(float *y, const float *x, const W *w, int rows, int out, int in, int accumulate) {
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    long o = (long)blockIdx.x * ST_DECODE_WARPS + warp;
    if (o >= out) return;
    const W *wr = w + (size_t)o * in;
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * in;
        float acc = 0.0f;
        for (int k = lane; k < in; k += 32) acc = fmaf(xr[k], st_decode_widen(wr[k]), acc);
        acc = st_warp_sum(acc);
        if (lane == 0) {
            float *yo = y + (size_t)r * out + o;
            *yo = accumulate ? *yo + acc : acc;
        }
    }
}

void st_cu_decode_mm(float *y, const float *x, const float *w, const uint16_t *w16, int rows, int out, int in,
                     float beta) {
    if (rows <= 0 || out <= 0) return;
    int blocks = (out + ST_DECODE_WARPS - 1) / ST_DECODE_WARPS, acc = beta != 0.0f;
    if (w16)
        decode_mm_kernel<<<blocks, 32 * ST_DECODE_WARPS, 0, st_cuda_stream_internal()>>>(y, x, w16, rows, out, in, acc);
    else
        decode_mm_kernel<<<blocks, 32 * ST_DECODE_WARPS, 0, st_cuda_stream_internal()>>>(y, x, w, rows, out, in, acc);
    ST_CUDA_LAUNCHED("decode_mm");
}
