/* attention_docs.cu — document-packed sequences (train.packing: documents), CUDA twin of
 * kernels/cpu/cpu_attention_docs.c: attention that never crosses a document, RoPE and GPT-2 learned
 * positions restarted at each document, from pos[B*T] (each token's position inside its document).
 *
 * Plain warp-per-row kernels (no tiling through shared memory): correctness first; SFT sequences are
 * short next to the pretraining lengths the flash kernels in attention.cu are tuned for.
 *   fwd: one warp per (batch, head, query row): online softmax over keys i - pos[i] .. i; lane d owns
 *        output dims d, d+32, ... (head_dim <= ST_CUDA_ATTN_MAX_HD); saves lse.
 *   dq:  one warp per query row: D = dout.out, dS = P (dout.v - D), dq = scale * sum dS k.
 *   dkv: one warp per key row j: the group's query heads in order, then query rows j .. (its document's
 *        end, or the window's) in order: dv = sum P dout, dk = scale * sum dS q.
 * One writer per output element, fixed summation order: reproducible, no atomics. */
#include "kernels/cuda/cuda_ops.cuh"

#define PER_LANE (ST_CUDA_ATTN_MAX_HD / 32)

struct docs_shape {
    int b, t, h, kvh, hd, window;
    float scale;
};

static bool docs_shape_ok(const char *what, docs_shape *s, int b, int t, int h, int kvh, int hd, int window) {
    if (b <= 0 || t <= 0 || h <= 0 || kvh <= 0 || hd <= 0) return false;
    if (hd > ST_CUDA_ATTN_MAX_HD || h % kvh) {
        st_cuda_note(what, "head_dim over ST_CUDA_ATTN_MAX_HD or heads not a multiple of kv heads");
        return false;
    }
    s->b = b; s->t = t; s->h = h; s->kvh = kvh; s->hd = hd;
    s->window = window > 0 && window < t ? window : 0;
    s->scale = 1.0f / sqrtf((float)hd);
    return true;
}

__device__ __forceinline__ int docs_first_key(const int32_t *pos_row, int ti, int window) {
    int j0 = ti - pos_row[ti];
    if (window > 0 && ti - window + 1 > j0) j0 = ti - window + 1;
    return j0;
}

/* a . b over hd values, lane-strided, summed over the warp (every lane gets the sum). */
__device__ __forceinline__ float warp_dot(const float *a, const float *b, int hd, int lane) {
    float acc = 0.0f;
    for (int d = lane; d < hd; d += 32) acc += a[d] * b[d];
    return st_warp_sum(acc);
}

__global__ void docs_fwd_kernel(float *out, float *lse, const float *qkv, const int32_t *pos, docs_shape s) {
    size_t row = (blockIdx.x * (size_t)blockDim.x + threadIdx.x) >> 5; /* (b*H + h)*T + t */
    int lane = threadIdx.x & 31;
    if (row >= (size_t)s.b * s.h * s.t) return; /* warp-uniform */
    int ti = (int)(row % s.t), hi = (int)((row / s.t) % s.h), bi = (int)(row / ((size_t)s.t * s.h));
    size_t stride = (size_t)(s.h + 2 * s.kvh) * s.hd;
    const float *tok0 = qkv + (size_t)bi * s.t * stride;
    const float *q = tok0 + (size_t)ti * stride + (size_t)hi * s.hd;
    size_t koff = (size_t)(s.h + hi / (s.h / s.kvh)) * s.hd, voff = koff + (size_t)s.kvh * s.hd;
    float acc[PER_LANE] = {0.0f}, m = -INFINITY, l = 0.0f;
    for (int j = docs_first_key(pos + (size_t)bi * s.t, ti, s.window); j <= ti; j++) {
        float sc = warp_dot(q, tok0 + (size_t)j * stride + koff, s.hd, lane) * s.scale;
        float mn = fmaxf(m, sc), a = expf(m - mn), p = expf(sc - mn);
        const float *v = tok0 + (size_t)j * stride + voff;
        for (int r = 0, d = lane; d < s.hd; r++, d += 32) acc[r] = acc[r] * a + p * v[d];
        l = l * a + p;
        m = mn;
    }
    float *o = out + ((size_t)bi * s.t + ti) * (size_t)s.h * s.hd + (size_t)hi * s.hd;
    for (int r = 0, d = lane; d < s.hd; r++, d += 32) o[d] = acc[r] / l;
    if (lane == 0) lse[((size_t)bi * s.h + hi) * s.t + ti] = m + logf(l);
}

__global__ void docs_dq_kernel(float *dqkv, const float *dout, const float *qkv, const float *out, const float *lse,
                               const int32_t *pos, docs_shape s) {
    size_t row = (blockIdx.x * (size_t)blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (row >= (size_t)s.b * s.h * s.t) return;
    int ti = (int)(row % s.t), hi = (int)((row / s.t) % s.h), bi = (int)(row / ((size_t)s.t * s.h));
    size_t stride = (size_t)(s.h + 2 * s.kvh) * s.hd;
    const float *tok0 = qkv + (size_t)bi * s.t * stride;
    const float *q = tok0 + (size_t)ti * stride + (size_t)hi * s.hd;
    size_t koff = (size_t)(s.h + hi / (s.h / s.kvh)) * s.hd, voff = koff + (size_t)s.kvh * s.hd;
    size_t orow = ((size_t)bi * s.t + ti) * (size_t)s.h * s.hd + (size_t)hi * s.hd;
    float D = warp_dot(dout + orow, out + orow, s.hd, lane), L = lse[((size_t)bi * s.h + hi) * s.t + ti];
    float dq[PER_LANE] = {0.0f};
    for (int j = docs_first_key(pos + (size_t)bi * s.t, ti, s.window); j <= ti; j++) {
        const float *k = tok0 + (size_t)j * stride + koff;
        float p = expf(warp_dot(q, k, s.hd, lane) * s.scale - L);
        float ds = p * (warp_dot(dout + orow, tok0 + (size_t)j * stride + voff, s.hd, lane) - D);
        for (int r = 0, d = lane; d < s.hd; r++, d += 32) dq[r] += ds * k[d];
    }
    float *dqr = dqkv + ((size_t)bi * s.t + ti) * stride + (size_t)hi * s.hd;
    for (int r = 0, d = lane; d < s.hd; r++, d += 32) dqr[d] = dq[r] * s.scale;
}

__global__ void docs_dkv_kernel(float *dqkv, const float *dout, const float *qkv, const float *out, const float *lse,
                                const int32_t *pos, docs_shape s) {
    size_t row = (blockIdx.x * (size_t)blockDim.x + threadIdx.x) >> 5; /* (b*KVH + kv)*T + j */
    int lane = threadIdx.x & 31;
    if (row >= (size_t)s.b * s.kvh * s.t) return;
    int j = (int)(row % s.t), kv = (int)((row / s.t) % s.kvh), bi = (int)(row / ((size_t)s.t * s.kvh));
    int group = s.h / s.kvh;
    size_t stride = (size_t)(s.h + 2 * s.kvh) * s.hd;
    const float *tok0 = qkv + (size_t)bi * s.t * stride;
    const int32_t *prow = pos + (size_t)bi * s.t;
    size_t koff = (size_t)(s.h + kv) * s.hd, voff = koff + (size_t)s.kvh * s.hd;
    const float *k = tok0 + (size_t)j * stride + koff, *v = tok0 + (size_t)j * stride + voff;
    float dk[PER_LANE] = {0.0f}, dv[PER_LANE] = {0.0f};
    for (int hi = kv * group; hi < (kv + 1) * group; hi++) {
        for (int i = j; i < s.t; i++) {
            if (i > j && prow[i] == 0) break;             /* the next document starts */
            if (s.window && i - j >= s.window) break;     /* out of the window from here on */
            const float *q = tok0 + (size_t)i * stride + (size_t)hi * s.hd;
            size_t orow = ((size_t)bi * s.t + i) * (size_t)s.h * s.hd + (size_t)hi * s.hd;
            float L = lse[((size_t)bi * s.h + hi) * s.t + i];
            float p = expf(warp_dot(q, k, s.hd, lane) * s.scale - L);
            float ds = p * (warp_dot(dout + orow, v, s.hd, lane) - warp_dot(dout + orow, out + orow, s.hd, lane));
            for (int r = 0, d = lane; d < s.hd; r++, d += 32) {
                dv[r] += p * dout[orow + d];
                dk[r] += ds * s.scale * q[d];
            }
        }
    }
    float *dx = dqkv + ((size_t)bi * s.t + j) * stride;
    for (int r = 0, d = lane; d < s.hd; r++, d += 32) {
        dx[koff + d] = dk[r];
        dx[voff + d] = dv[r];
    }
}

static int warp_blocks(size_t warps) { return (int)((warps * 32 + ST_CUDA_THREADS - 1) / ST_CUDA_THREADS); }

void st_cu_attention_docs_fwd(float *out, float *lse, const float *qkv, const int32_t *pos, int b, int t, int h,
                              int kvh, int hd, int window) {
    docs_shape s;
    if (!docs_shape_ok("attention_docs_fwd", &s, b, t, h, kvh, hd, window)) return;
    docs_fwd_kernel<<<warp_blocks((size_t)b * h * t), ST_CUDA_THREADS, 0, st_cuda_stream_internal()>>>(out, lse, qkv,
                                                                                                       pos, s);
    ST_CUDA_LAUNCHED("attention_docs_fwd");
}

void st_cu_attention_docs_bwd(float *dqkv, const float *dout, const float *qkv, const float *out, const float *lse,
                              const int32_t *pos, int b, int t, int h, int kvh, int hd, int window) {
    docs_shape s;
    if (!docs_shape_ok("attention_docs_bwd", &s, b, t, h, kvh, hd, window)) return;
    cudaStream_t st = st_cuda_stream_internal();
    docs_dq_kernel<<<warp_blocks((size_t)b * h * t), ST_CUDA_THREADS, 0, st>>>(dqkv, dout, qkv, out, lse, pos, s);
    ST_CUDA_LAUNCHED("attention_docs_bwd (dq)");
    docs_dkv_kernel<<<warp_blocks((size_t)b * kvh * t), ST_CUDA_THREADS, 0, st>>>(dqkv, dout, qkv, out, lse, pos, s);
    ST_CUDA_LAUNCHED("attention_docs_bwd (dk, dv)");
}

/* ---------------------------------------------------------------- positions */

__global__ void rope_pos_kernel(float *qkv, const float *cos, const float *sin, const int32_t *pos, int b, int t,
                                int h, int kvh, int hd, float dir) {
    int half = hd / 2, heads = h + kvh;
    size_t total = (size_t)b * t * heads * half, stride = (size_t)(h + 2 * kvh) * hd;
    for (size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x; idx < total;
         idx += (size_t)gridDim.x * blockDim.x) {
        int i = (int)(idx % half), head = (int)((idx / half) % heads);
        size_t bt = idx / ((size_t)half * heads);
        size_t at = (size_t)pos[bt] * half + i;
        float c = cos[at], sn = dir * sin[at];
        float *x = qkv + bt * stride + (size_t)head * hd;
        float lo = x[i], hi = x[i + half];
        x[i] = lo * c - hi * sn;
        x[i + half] = hi * c + lo * sn;
    }
}

static void rope_pos(const char *name, float *qkv, const float *cos, const float *sin, const int32_t *pos, int b,
                     int t, int h, int kvh, int hd, float dir) {
    if (b <= 0 || t <= 0 || hd <= 1) return;
    size_t total = (size_t)b * t * (h + kvh) * (hd / 2);
    rope_pos_kernel<<<st_cuda_grid_1d(total, ST_CUDA_THREADS), ST_CUDA_THREADS, 0, st_cuda_stream_internal()>>>(
        qkv, cos, sin, pos, b, t, h, kvh, hd, dir);
    ST_CUDA_LAUNCHED(name);
}

void st_cu_rope_pos_fwd(float *qkv, const float *cos, const float *sin, const int32_t *pos, int b, int t, int h,
                        int kvh, int hd) {
    rope_pos("rope_pos_fwd", qkv, cos, sin, pos, b, t, h, kvh, hd, 1.0f);
}

void st_cu_rope_pos_bwd(float *dqkv, const float *cos, const float *sin, const int32_t *pos, int b, int t, int h,
                        int kvh, int hd) {
    rope_pos("rope_pos_bwd", dqkv, cos, sin, pos, b, t, h, kvh, hd, -1.0f);
}

__global__ void embedding_pos_fwd_kernel(float *out, const int32_t *tokens, const float *wte, const float *wpe,
                                         const int32_t *pos, size_t rows, int c) {
    size_t total = rows * c;
    for (size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x; idx < total;
         idx += (size_t)gridDim.x * blockDim.x) {
        size_t r = idx / c, j = idx % c;
        out[idx] = wte[(size_t)tokens[r] * c + j] + wpe[(size_t)pos[r] * c + j];
    }
}

/* One thread per column: rows in order, so every dwpe element sums in the same order. */
__global__ void embedding_pos_bwd_kernel(float *dwpe, const float *dout, const int32_t *pos, size_t rows, int c) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= c) return;
    for (size_t r = 0; r < rows; r++) dwpe[(size_t)pos[r] * c + j] += dout[r * c + j];
}

void st_cu_embedding_pos_fwd(float *out, const int32_t *tokens, const float *wte, const float *wpe,
                             const int32_t *pos, int b, int t, int c) {
    if (b <= 0 || t <= 0 || c <= 0) return;
    size_t rows = (size_t)b * t;
    embedding_pos_fwd_kernel<<<st_cuda_grid_1d(rows * c, ST_CUDA_THREADS), ST_CUDA_THREADS, 0,
                               st_cuda_stream_internal()>>>(out, tokens, wte, wpe, pos, rows, c);
    ST_CUDA_LAUNCHED("embedding_pos_fwd");
}

void st_cu_embedding_pos_bwd(float *dwpe, const float *dout, const int32_t *pos, int b, int t, int c) {
    if (b <= 0 || t <= 0 || c <= 0) return;
    embedding_pos_bwd_kernel<<<(c + ST_CUDA_THREADS - 1) / ST_CUDA_THREADS, ST_CUDA_THREADS, 0,
                               st_cuda_stream_internal()>>>(dwpe, dout, pos, (size_t)b * t, c);
    ST_CUDA_LAUNCHED("embedding_pos_bwd");
}
