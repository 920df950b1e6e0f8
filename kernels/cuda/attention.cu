/* attention.cu — RoPE and causal grouped-query attention (forward and backward), fp32.
 *
 * Attention is flash-style: scores never reach global memory. Forward: a block holds ST_CUDA_ATTN_ROWS
 * query rows of one (batch, head), one warp per row, and streams the causal prefix of K/V through shared
 * memory in tiles of ST_CUDA_ATTN_TILE keys; lane j scores key j of the tile, and the warp keeps an
 * online softmax (running max m, running sum l, rescaled accumulator; lane d owns output dims d, d+32,
 * ...). It saves lse = m + log(l) per row. Backward recomputes probabilities from lse:
 *   D_i = dout_i . out_i                 (one warp per row)
 *   dq  kernel: warp per query row, loops key tiles:   dS = P (dout.v - D),  dq = scale * sum dS k
 *   dkv kernel: warp per key row, loops the group's query heads and query tiles in order:
 *               dv = sum P dout,  dk = scale * sum dS q
 * Each output element has one writer and a fixed summation order: no atomics, reproducible.
 * A sliding window (attention_window_*) masks keys j < i - window + 1 as well and skips the key (query)
 * tiles no row of a block can see.
 * Shared-memory sizes and shape limits come from launch_host.c (head_dim <= 128). */
#include "kernels/cuda/cuda_ops.cuh"

#include <stdio.h>

#define ROWS ST_CUDA_ATTN_ROWS
#define TILE ST_CUDA_ATTN_TILE
#define MAX_PER_LANE (ST_CUDA_ATTN_MAX_HD / 32)

/* ---------------------------------------------------------------- RoPE */

/* rotate_half pairs (i, i + hd/2): fwd (x1, x2) -> (x1 c - x2 s, x2 c + x1 s); bwd applies the transpose
 * (the inverse rotation) to the gradient. */
__global__ void rope_kernel(float *qkv, const float *cos, const float *sin, int b, int t, int h, int kvh, int hd,
                            float dir) {
    int half = hd / 2, heads = h + kvh;
    size_t total = (size_t)b * t * heads * half;
    size_t stride = (size_t)(h + 2 * kvh) * hd;
    for (size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x; idx < total;
         idx += (size_t)gridDim.x * blockDim.x) {
        int i = (int)(idx % half);
        int head = (int)((idx / half) % heads);
        size_t bt = idx / ((size_t)half * heads);
        int pos = (int)(bt % t);
        float c = cos[(size_t)pos * half + i], s = dir * sin[(size_t)pos * half + i];
        float *x = qkv + bt * stride + (size_t)head * hd; /* q heads then k heads are contiguous */
        float x1 = x[i], x2 = x[i + half];
        x[i] = x1 * c - x2 * s;
        x[i + half] = x2 * c + x1 * s;
    }
}

static void rope(const char *name, float *qkv, const float *cos, const float *sin, int b, int t, int h, int kvh,
                 int hd, float dir) {
    if (b <= 0 || t <= 0 || hd <= 1) return;
    size_t total = (size_t)b * t * (h + kvh) * (hd / 2);
    rope_kernel<<<st_cuda_grid_1d(total, ST_CUDA_THREADS), ST_CUDA_THREADS, 0, st_cuda_stream_internal()>>>(
        qkv, cos, sin, b, t, h, kvh, hd, dir);
    ST_CUDA_LAUNCHED(name);
}

void st_cu_rope_fwd(float *qkv, const float *cos, const float *sin, int b, int t, int h, int kvh, int hd) {
    rope("rope_fwd", qkv, cos, sin, b, t, h, kvh, hd, 1.0f);
}

void st_cu_rope_bwd(float *dqkv, const float *cos, const float *sin, int b, int t, int h, int kvh, int hd) {
    rope("rope_bwd", dqkv, cos, sin, b, t, h, kvh, hd, -1.0f);
}

/* ---------------------------------------------------------------- per-head q/k RMSNorm (Qwen3) */

/* One warp per (token, q/k head) row of hd values; lane i owns elements i, i+32, ... */
__global__ void head_rmsnorm_fwd_kernel(float *qkv, float *xs, float *rstd, const float *wq, const float *wk,
                                        int n, int h, int kvh, int hd, float eps) {
    int heads = h + kvh, lane = threadIdx.x & 31;
    size_t row = (size_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= (size_t)n * heads) return;
    size_t r = row / heads;
    int j = (int)(row % heads);
    float *x = qkv + r * (size_t)(h + 2 * kvh) * hd + (size_t)j * hd;
    float *keep = xs + row * hd;
    const float *w = j < h ? wq : wk;
    float ss = 0.0f;
    for (int i = lane; i < hd; i += 32) {
        keep[i] = x[i];
        ss += x[i] * x[i];
    }
    float rs = 1.0f / sqrtf(st_warp_sum(ss) / hd + eps);
    for (int i = lane; i < hd; i += 32) x[i] = x[i] * rs * w[i];
    if (lane == 0) rstd[row] = rs;
}

/* dx = rs * (w dy) - x * rs^3 * mean(w dy x), in place over the q/k part of dqkv. */
__global__ void head_rmsnorm_dx_kernel(float *dqkv, const float *xs, const float *rstd, const float *wq,
                                       const float *wk, int n, int h, int kvh, int hd) {
    int heads = h + kvh, lane = threadIdx.x & 31;
    size_t row = (size_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= (size_t)n * heads) return;
    size_t r = row / heads;
    int j = (int)(row % heads);
    float *d = dqkv + r * (size_t)(h + 2 * kvh) * hd + (size_t)j * hd;
    const float *x = xs + row * hd;
    const float *w = j < h ? wq : wk;
    float rs = rstd[row], dot = 0.0f;
    for (int i = lane; i < hd; i += 32) dot += d[i] * w[i] * x[i];
    float c = rs * rs * rs * st_warp_sum(dot) / hd;
    for (int i = lane; i < hd; i += 32) d[i] = rs * w[i] * d[i] - x[i] * c;
}

/* Partial weight gradients: block p sums rows [p*rpc, (p+1)*rpc) of the (token, head) rows of heads
 * [j0, j0 + nh), in order; thread i owns column i (and i + blockDim.x, ...). */
__global__ void head_rmsnorm_dw_kernel(float *partial, const float *dqkv, const float *xs, const float *rstd, int n,
                                       int h, int kvh, int hd, int j0, int nh, int rpc) {
    int heads = h + kvh;
    size_t rows = (size_t)n * nh, r0 = (size_t)blockIdx.x * rpc, r1 = r0 + rpc < rows ? r0 + rpc : rows;
    for (int i = threadIdx.x; i < hd; i += blockDim.x) {
        float acc = 0.0f;
        for (size_t q = r0; q < r1; q++) {
            size_t r = q / nh;
            int j = j0 + (int)(q % nh);
            size_t hr = r * heads + j;
            acc += dqkv[r * (size_t)(h + 2 * kvh) * hd + (size_t)j * hd + i] * xs[hr * hd + i] * rstd[hr];
        }
        partial[(size_t)blockIdx.x * hd + i] = acc;
    }
}

void st_cu_head_rmsnorm_fwd(float *qkv, float *xs, float *rstd, const float *wq, const float *wk, int n, int h,
                            int kvh, int hd, float eps) {
    if (n <= 0 || hd <= 0) return;
    size_t rows = (size_t)n * (h + kvh), per = ST_CUDA_THREADS / 32;
    head_rmsnorm_fwd_kernel<<<(unsigned)((rows + per - 1) / per), ST_CUDA_THREADS, 0, st_cuda_stream_internal()>>>(
        qkv, xs, rstd, wq, wk, n, h, kvh, hd, eps);
    ST_CUDA_LAUNCHED("head_rmsnorm_fwd");
}

void st_cu_head_rmsnorm_bwd(float *dqkv, float *dwq, float *dwk, const float *xs, const float *rstd,
                            const float *wq, const float *wk, int n, int h, int kvh, int hd) {
    if (n <= 0 || hd <= 0) return;
    /* weight gradients read the output gradient, so they run before dx overwrites it */
    for (int k = 0; k < 2; k++) {
        float *dw = k ? dwk : dwq;
        int j0 = k ? h : 0, nh = k ? kvh : h;
        if (!dw || nh == 0) continue;
        size_t scratch_bytes;
        float *scratch = (float *)st_cuda_scratch(&scratch_bytes);
        int rows = n * nh;
        int parts = st_cuda_colsum_partials(rows, hd, 1, scratch_bytes / sizeof(float));
        if (parts == 0) { st_cuda_note("head_rmsnorm_bwd", "scratch too small for one row of partials"); return; }
        int rpc = st_cuda_colsum_rows_per_chunk(rows, parts);
        head_rmsnorm_dw_kernel<<<parts, 128, 0, st_cuda_stream_internal()>>>(scratch, dqkv, xs, rstd, n, h, kvh, hd,
                                                                             j0, nh, rpc);
        ST_CUDA_LAUNCHED("head_rmsnorm_dw");
        st_cuda_colsum_finish(dw, scratch, parts, hd);
    }
    size_t rows = (size_t)n * (h + kvh), per = ST_CUDA_THREADS / 32;
    head_rmsnorm_dx_kernel<<<(unsigned)((rows + per - 1) / per), ST_CUDA_THREADS, 0, st_cuda_stream_internal()>>>(
        dqkv, xs, rstd, wq, wk, n, h, kvh, hd);
    ST_CUDA_LAUNCHED("head_rmsnorm_dx");
}

/* ---------------------------------------------------------------- shared helpers */

struct attn_shape {
    int b, t, h, kvh, hd;
    int window;    /* sliding window: query i sees keys j with i - j < window; 0 = all earlier keys */
    size_t stride; /* floats per token in packed qkv */
    float scale;   /* 1/sqrt(hd) */
};

__device__ __forceinline__ size_t q_off(const attn_shape &s, int bi, int ti, int hi) {
    return ((size_t)bi * s.t + ti) * s.stride + (size_t)hi * s.hd;
}
__device__ __forceinline__ size_t k_off(const attn_shape &s, int bi, int ti, int gi) {
    return ((size_t)bi * s.t + ti) * s.stride + (size_t)(s.h + gi) * s.hd;
}
__device__ __forceinline__ size_t v_off(const attn_shape &s, int bi, int ti, int gi) {
    return ((size_t)bi * s.t + ti) * s.stride + (size_t)(s.h + s.kvh + gi) * s.hd;
}

/* Loads rows [row0, row0 + TILE) of one head (src offset by `off(row)`) into a padded [TILE][hd+1] tile;
 * rows past the sequence are zeros so masked lanes never multiply garbage. */
template <typename Off>
__device__ void load_tile(float *tile, const float *src, int row0, int t, int hd, Off off) {
    int ld = hd + 1;
    for (int e = threadIdx.x; e < TILE * hd; e += blockDim.x) {
        int r = e / hd, d = e % hd, row = row0 + r;
        tile[r * ld + d] = row < t ? src[off(row) + d] : 0.0f;
    }
}

__device__ __forceinline__ float dot_rows(const float *a, const float *b, int hd) {
    float s = 0.0f;
    for (int d = 0; d < hd; d++) s += a[d] * b[d];
    return s;
}

/* First key tile any query row of the block starting at row0 can see (0 without a window). Uniform over
 * the block, so every thread runs the same tiles (the loops synchronize per tile). */
__device__ __forceinline__ int first_tile(const attn_shape &s, int row0) {
    if (s.window <= 0) return 0;
    int lo = row0 - s.window + 1;
    return lo > 0 ? lo / TILE * TILE : 0;
}

/* ---------------------------------------------------------------- forward */

__global__ void attn_fwd_kernel(float *out, float *lse, const float *qkv, attn_shape s) {
    extern __shared__ float smem[];
    int hd = s.hd, ld = hd + 1;
    float *ks = smem, *vs = ks + TILE * ld, *qs = vs + TILE * ld, *ps = qs + 2 * ROWS * hd;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int bi = blockIdx.z, hi = blockIdx.y, gi = hi / (s.h / s.kvh);
    int i = blockIdx.x * ROWS + warp; /* this warp's query row */
    bool active = i < s.t;
    float *q = qs + warp * hd, *p = ps + warp * TILE;
    if (active)
        for (int d = lane; d < hd; d += 32) q[d] = qkv[q_off(s, bi, i, hi) + d];

    float m = -INFINITY, l = 0.0f, acc[MAX_PER_LANE] = {0.0f, 0.0f, 0.0f, 0.0f};
    int last = min(s.t - 1, (int)blockIdx.x * ROWS + ROWS - 1);
    int lo = s.window > 0 ? i - s.window + 1 : 0; /* this row's first visible key (may be < 0) */
    for (int kt = first_tile(s, blockIdx.x * ROWS); kt <= last; kt += TILE) {
        __syncthreads(); /* previous tile fully consumed */
        load_tile(ks, qkv, kt, s.t, hd, [&](int row) { return k_off(s, bi, row, gi); });
        load_tile(vs, qkv, kt, s.t, hd, [&](int row) { return v_off(s, bi, row, gi); });
        __syncthreads();
        if (!active || kt > i || kt + TILE - 1 < lo) continue; /* warp-uniform: no visible key here */
        int j = kt + lane;
        bool ok = j <= i && j >= lo;
        float sc = ok ? dot_rows(q, ks + lane * ld, hd) * s.scale : -INFINITY;
        float m_new = fmaxf(m, st_warp_max(sc)); /* finite: the tile holds a key in [lo, i] */
        float pj = ok ? expf(sc - m_new) : 0.0f;
        float corr = expf(m - m_new); /* 0 on the first tile (m = -inf) */
        l = l * corr + st_warp_sum(pj);
        p[lane] = pj;
        __syncwarp();
        for (int r = 0; r < MAX_PER_LANE; r++) {
            int d = lane + 32 * r;
            if (d >= hd) break;
            float a = 0.0f;
            for (int jj = 0; jj < TILE; jj++) a += p[jj] * vs[jj * ld + d];
            acc[r] = acc[r] * corr + a;
        }
        __syncwarp();
        m = m_new;
    }
    if (!active) return;
    float inv_l = 1.0f / l;
    float *o = out + ((size_t)bi * s.t + i) * (size_t)s.h * hd + (size_t)hi * hd;
    for (int r = 0; r < MAX_PER_LANE; r++) {
        int d = lane + 32 * r;
        if (d < hd) o[d] = acc[r] * inv_l;
    }
    if (lane == 0) lse[((size_t)bi * s.h + hi) * s.t + i] = m + logf(l);
}

static int shape_ok(const char *name, attn_shape *s, int b, int t, int h, int kvh, int hd) {
    if (st_cuda_attn_check(b, t, h, kvh, hd) != 0) {
        st_cuda_note(name, st_error());
        return 0;
    }
    s->b = b, s->t = t, s->h = h, s->kvh = kvh, s->hd = hd;
    s->window = 0;
    s->stride = (size_t)(h + 2 * kvh) * hd;
    s->scale = 1.0f / sqrtf((float)hd);
    return 1;
}

static void attention_fwd(float *out, float *lse, const float *qkv, int b, int t, int h, int kvh, int hd,
                          int window) {
    attn_shape s;
    if (!shape_ok("attention_fwd", &s, b, t, h, kvh, hd)) return;
    s.window = window > 0 && window < t ? window : 0;
    dim3 grid((t + ROWS - 1) / ROWS, h, b);
    attn_fwd_kernel<<<grid, ROWS * 32, st_cuda_attn_fwd_smem(hd), st_cuda_stream_internal()>>>(out, lse, qkv, s);
    ST_CUDA_LAUNCHED("attention_fwd");
}

void st_cu_attention_fwd(float *out, float *lse, const float *qkv, int b, int t, int h, int kvh, int hd) {
    attention_fwd(out, lse, qkv, b, t, h, kvh, hd, 0);
}

void st_cu_attention_window_fwd(float *out, float *lse, const float *qkv, int b, int t, int h, int kvh, int hd,
                                int window) {
    attention_fwd(out, lse, qkv, b, t, h, kvh, hd, window);
}

/* ---------------------------------------------------------------- backward */

/* D[b,h,i] = dout_i . out_i over the head's hd values: one warp per (token, head). */
__global__ void attn_bwd_dot_kernel(float *dsum, const float *dout, const float *out, attn_shape s) {
    size_t row = (blockIdx.x * (size_t)blockDim.x + threadIdx.x) >> 5; /* (b*T + t)*H + h */
    int lane = threadIdx.x & 31;
    size_t rows = (size_t)s.b * s.t * s.h;
    if (row >= rows) return; /* warp-uniform: all lanes share row */
    const float *a = dout + row * s.hd, *o = out + row * s.hd;
    float acc = 0.0f;
    for (int d = lane; d < s.hd; d += 32) acc += a[d] * o[d];
    acc = st_warp_sum(acc);
    int hi = (int)(row % s.h);
    size_t bt = row / s.h;
    int bi = (int)(bt / s.t), ti = (int)(bt % s.t);
    if (lane == 0) dsum[((size_t)bi * s.h + hi) * s.t + ti] = acc;
}

__global__ void attn_bwd_dq_kernel(float *dqkv, const float *dout, const float *qkv, const float *lse,
                                   const float *dsum, attn_shape s) {
    extern __shared__ float smem[];
    int hd = s.hd, ld = hd + 1;
    float *ks = smem, *vs = ks + TILE * ld, *qs = vs + TILE * ld, *dos = qs + ROWS * hd, *ps = dos + ROWS * hd;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int bi = blockIdx.z, hi = blockIdx.y, gi = hi / (s.h / s.kvh);
    int i = blockIdx.x * ROWS + warp;
    bool active = i < s.t;
    float *q = qs + warp * hd, *dq_row = dos + warp * hd, *ds = ps + warp * TILE;
    float lse_i = 0.0f, d_i = 0.0f;
    if (active) {
        const float *dor = dout + ((size_t)bi * s.t + i) * (size_t)s.h * hd + (size_t)hi * hd;
        for (int d = lane; d < hd; d += 32) {
            q[d] = qkv[q_off(s, bi, i, hi) + d];
            dq_row[d] = dor[d]; /* holds dout_i */
        }
        lse_i = lse[((size_t)bi * s.h + hi) * s.t + i];
        d_i = dsum[((size_t)bi * s.h + hi) * s.t + i];
    }
    float acc[MAX_PER_LANE] = {0.0f, 0.0f, 0.0f, 0.0f};
    int last = min(s.t - 1, (int)blockIdx.x * ROWS + ROWS - 1);
    int lo = s.window > 0 ? i - s.window + 1 : 0;
    for (int kt = first_tile(s, blockIdx.x * ROWS); kt <= last; kt += TILE) {
        __syncthreads();
        load_tile(ks, qkv, kt, s.t, hd, [&](int row) { return k_off(s, bi, row, gi); });
        load_tile(vs, qkv, kt, s.t, hd, [&](int row) { return v_off(s, bi, row, gi); });
        __syncthreads();
        if (!active || kt > i || kt + TILE - 1 < lo) continue;
        int j = kt + lane;
        float dsj = 0.0f;
        if (j <= i && j >= lo) {
            float pj = expf(dot_rows(q, ks + lane * ld, hd) * s.scale - lse_i);
            float dpj = dot_rows(dq_row, vs + lane * ld, hd);
            dsj = pj * (dpj - d_i);
        }
        ds[lane] = dsj;
        __syncwarp();
        for (int r = 0; r < MAX_PER_LANE; r++) {
            int d = lane + 32 * r;
            if (d >= hd) break;
            float a = 0.0f;
            for (int jj = 0; jj < TILE; jj++) a += ds[jj] * ks[jj * ld + d];
            acc[r] += a;
        }
        __syncwarp();
    }
    if (!active) return;
    float *dq = dqkv + q_off(s, bi, i, hi);
    for (int r = 0; r < MAX_PER_LANE; r++) {
        int d = lane + 32 * r;
        if (d < hd) dq[d] = acc[r] * s.scale;
    }
}

__global__ void attn_bwd_dkv_kernel(float *dqkv, const float *dout, const float *qkv, const float *lse,
                                    const float *dsum, attn_shape s) {
    extern __shared__ float smem[];
    int hd = s.hd, ld = hd + 1;
    float *qt_s = smem, *dot_s = qt_s + TILE * ld, *lse_s = dot_s + TILE * ld, *d_s = lse_s + TILE;
    float *krow = d_s + TILE, *vrow = krow + ROWS * hd, *ps = vrow + ROWS * hd, *dss = ps + ROWS * TILE;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int bi = blockIdx.z, gi = blockIdx.y, group = s.h / s.kvh;
    int j = blockIdx.x * ROWS + warp; /* this warp's key row */
    bool active = j < s.t;
    float *k = krow + warp * hd, *v = vrow + warp * hd, *p = ps + warp * TILE, *ds = dss + warp * TILE;
    if (active)
        for (int d = lane; d < hd; d += 32) {
            k[d] = qkv[k_off(s, bi, j, gi) + d];
            v[d] = qkv[v_off(s, bi, j, gi) + d];
        }
    float dk[MAX_PER_LANE] = {0.0f, 0.0f, 0.0f, 0.0f}, dv[MAX_PER_LANE] = {0.0f, 0.0f, 0.0f, 0.0f};
    int first = blockIdx.x * ROWS; /* causal: only queries i >= the block's first key row see it */
    /* with a window, only queries i < the block's last key row + window do */
    int qend = s.window > 0 ? min(s.t, first + ROWS - 1 + s.window) : s.t;
    size_t dout_stride = (size_t)s.h * hd;
    for (int hq = gi * group; hq < (gi + 1) * group; hq++) {
        for (int qt = first; qt < qend; qt += TILE) {
            __syncthreads();
            load_tile(qt_s, qkv, qt, s.t, hd, [&](int row) { return q_off(s, bi, row, hq); });
            load_tile(dot_s, dout, qt, s.t, hd,
                      [&](int row) { return ((size_t)bi * s.t + row) * dout_stride + (size_t)hq * hd; });
            for (int r = threadIdx.x; r < TILE; r += blockDim.x) {
                int row = qt + r;
                size_t li = ((size_t)bi * s.h + hq) * s.t + row;
                lse_s[r] = row < s.t ? lse[li] : 0.0f;
                d_s[r] = row < s.t ? dsum[li] : 0.0f;
            }
            __syncthreads();
            if (!active || qt + TILE - 1 < j) continue; /* whole tile before this key: masked */
            int i = qt + lane;
            float pi = 0.0f, dsi = 0.0f;
            if (i < s.t && i >= j && (s.window <= 0 || i - j < s.window)) {
                pi = expf(dot_rows(qt_s + lane * ld, k, hd) * s.scale - lse_s[lane]);
                float dpi = dot_rows(dot_s + lane * ld, v, hd);
                dsi = pi * (dpi - d_s[lane]);
            }
            p[lane] = pi;
            ds[lane] = dsi;
            __syncwarp();
            for (int r = 0; r < MAX_PER_LANE; r++) {
                int d = lane + 32 * r;
                if (d >= hd) break;
                float a = 0.0f, b = 0.0f;
                for (int ii = 0; ii < TILE; ii++) {
                    a += p[ii] * dot_s[ii * ld + d];
                    b += ds[ii] * qt_s[ii * ld + d];
                }
                dv[r] += a;
                dk[r] += b;
            }
            __syncwarp();
        }
    }
    if (!active) return;
    float *dkr = dqkv + k_off(s, bi, j, gi), *dvr = dqkv + v_off(s, bi, j, gi);
    for (int r = 0; r < MAX_PER_LANE; r++) {
        int d = lane + 32 * r;
        if (d >= hd) break;
        dkr[d] = dk[r] * s.scale;
        dvr[d] = dv[r];
    }
}

static void attention_bwd(float *dqkv, const float *dout, const float *qkv, const float *out, const float *lse,
                          int b, int t, int h, int kvh, int hd, int window) {
    attn_shape s;
    if (!shape_ok("attention_bwd", &s, b, t, h, kvh, hd)) return;
    s.window = window > 0 && window < t ? window : 0;
    size_t scratch_bytes;
    float *dsum = (float *)st_cuda_scratch(&scratch_bytes);
    size_t need = st_cuda_attn_bwd_scratch_floats(b, t, h);
    if (need * sizeof(float) > scratch_bytes) {
        char msg[160];
        snprintf(msg, sizeof msg, "needs %zu bytes of scratch, have %zu (raise SHARDTUNE_CUDA_SCRATCH_MB)",
                 need * sizeof(float), scratch_bytes);
        st_cuda_note("attention_bwd", msg);
        return;
    }
    cudaStream_t st = st_cuda_stream_internal();
    size_t warps = (size_t)b * t * h;
    int dot_blocks = (int)((warps * 32 + ST_CUDA_THREADS - 1) / ST_CUDA_THREADS);
    attn_bwd_dot_kernel<<<dot_blocks, ST_CUDA_THREADS, 0, st>>>(dsum, dout, out, s);
    ST_CUDA_LAUNCHED("attention_bwd (dout.out)");
    dim3 grid_q((t + ROWS - 1) / ROWS, h, b), grid_kv((t + ROWS - 1) / ROWS, kvh, b);
    attn_bwd_dq_kernel<<<grid_q, ROWS * 32, st_cuda_attn_fwd_smem(hd), st>>>(dqkv, dout, qkv, lse, dsum, s);
    ST_CUDA_LAUNCHED("attention_bwd (dq)");
    attn_bwd_dkv_kernel<<<grid_kv, ROWS * 32, st_cuda_attn_bwd_kv_smem(hd), st>>>(dqkv, dout, qkv, lse, dsum, s);
    ST_CUDA_LAUNCHED("attention_bwd (dk, dv)");
}

void st_cu_attention_bwd(float *dqkv, const float *dout, const float *qkv, const float *out, const float *lse,
                         int b, int t, int h, int kvh, int hd) {
    attention_bwd(dqkv, dout, qkv, out, lse, b, t, h, kvh, hd, 0);
}

void st_cu_attention_window_bwd(float *dqkv, const float *dout, const float *qkv, const float *out,
                                const float *lse, int b, int t, int h, int kvh, int hd, int window) {
    attention_bwd(dqkv, dout, qkv, out, lse, b, t, h, kvh, hd, window);
}
