/* attention_tc.cu — tensor-core causal GQA attention: bf16 operands, fp32 accumulation (WMMA 16x16x16),
 * FlashAttention-2 style. UNVERIFIED: compiled for sm_80/sm_90, never run (no GPU where it was written).
 *
 * Same contract as the backend's attention_fwd / attention_bwd (kernels/kernels.h: packed qkv [B,T,
 * (H+2*KVH)*hd] fp32, out [B,T,H*hd], lse [B,H,T] of the scaled scores, bwd overwrites dqkv), but not the
 * CPU twin's arithmetic: q, k, v, dout and the probability tiles are rounded to bf16 before each product,
 * so it differs from the fp32 kernels (attention.cu, the CPU-twin-exact path) by about bf16's precision.
 * It is therefore opt-in: SHARDTUNE_CUDA_ATTN=tc routes the table's attention through it for head_dim 64
 * and 128 (other head dims keep the fp32 kernels). gpu_check compares it with the CPU twin at a bf16
 * tolerance (st_cuda_attention_tc_fwd/bwd, cuda_extras.h).
 *
 * Forward: a block of 4 warps owns 64 query rows of one (batch, head); each warp 16 rows. Per key tile of
 * 64: S = Q K^T (WMMA into shared memory), then per row (two lanes per row, 32 keys each) the online
 * softmax: scale, causal mask, running max and sum, P = exp(S - max) stored as bf16, the row's output
 * registers rescaled; then P V (WMMA, into the warp's shared tile, which the lanes add to their registers).
 * Backward (deterministic, no atomics): D = rowsum(dO * O); a dK/dV kernel (block: 64 keys of one kv head,
 * warps 16 keys each, looping over the group's query heads and the query tiles at or after the keys,
 * accumulating dV += P^T dO and dK += dS^T Q in WMMA accumulators) and a dQ kernel (block: 64 queries,
 * looping over key tiles, dQ += dS K), each recomputing P from the saved lse. */
#include "kernels/cuda/cuda_extras.h"
#include "kernels/cuda/cuda_ops.cuh"

#include <mma.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

using namespace nvcuda;

enum { TC_ROWS = 64, TC_WARPS = 4, TC_THREADS = 128 };

typedef __nv_bfloat16 bf16;
typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> frag_acc;
typedef wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> frag_a;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> frag_b_row;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> frag_b_col;

/* rows [r0, r0 + 64) of one head slice (offset `col` in a packed row of `stride` floats) -> bf16 tile
 * [64][HD]; rows at or past T are zeros */
template <int HD>
__device__ void load_tile(bf16 *dst, const float *base, size_t stride, int col, int r0, int T) {
    for (int i = threadIdx.x; i < TC_ROWS * HD; i += blockDim.x) {
        int r = i / HD, d = i % HD, t = r0 + r;
        dst[i] = __float2bfloat16_rn(t < T ? base[(size_t)t * stride + col + d] : 0.0f);
    }
}

/* C[16 x 16*nt] (fp32, ld ldc) = A[16 x K] B; A row-major (lda), B given by `b_at(n_tile, k_step)`. */
template <int K, typename FragB, typename BAt>
__device__ void warp_gemm_store(float *c, int ldc, const bf16 *a, int lda, int n_tiles, BAt b_at, int b_ld) {
    for (int nt = 0; nt < n_tiles; nt++) {
        frag_acc acc;
        wmma::fill_fragment(acc, 0.0f);
        for (int kk = 0; kk < K / 16; kk++) {
            frag_a fa;
            FragB fb;
            wmma::load_matrix_sync(fa, a + kk * 16, lda);
            wmma::load_matrix_sync(fb, b_at(nt, kk), b_ld);
            wmma::mma_sync(acc, fa, fb, acc);
        }
        wmma::store_matrix_sync(c + nt * 16, acc, ldc, wmma::mem_row_major);
    }
}

/* ---------------------------------------------------------------- forward */

template <int HD>
struct fwd_smem {
    static constexpr int SW = HD > TC_ROWS ? HD : TC_ROWS; /* floats per row of a warp's S / PV tile */
    static constexpr size_t bytes = 3 * sizeof(bf16) * TC_ROWS * HD + sizeof(bf16) * TC_ROWS * TC_ROWS +
                                    sizeof(float) * TC_WARPS * 16 * SW;
};

template <int HD>
__global__ void __launch_bounds__(TC_THREADS) attn_tc_fwd_kernel(float *out, float *lse, const float *qkv, int T,
                                                                 int H, int KVH, float scale) {
    extern __shared__ __align__(128) unsigned char smem[];
    constexpr int SW = fwd_smem<HD>::SW;
    bf16 *sq = (bf16 *)smem, *sk = sq + TC_ROWS * HD, *sv = sk + TC_ROWS * HD, *sp = sv + TC_ROWS * HD;
    float *ss = (float *)(sp + TC_ROWS * TC_ROWS);
    int q0 = blockIdx.x * TC_ROWS, h = blockIdx.y, b = blockIdx.z, kvh = h / (H / KVH);
    size_t stride = (size_t)(H + 2 * KVH) * HD;
    const float *base = qkv + (size_t)b * T * stride;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, lr = lane >> 1, half = lane & 1;
    int my_row = warp * 16 + lr, tq = q0 + my_row;
    float *sw = ss + (size_t)warp * 16 * SW;
    load_tile<HD>(sq, base, stride, h * HD, q0, T);
    float o[HD / 2];
#pragma unroll
    for (int j = 0; j < HD / 2; j++) o[j] = 0.0f;
    float m_run = -INFINITY, l_run = 0.0f;
    int last_q = min(q0 + TC_ROWS, T) - 1, n_tiles = last_q / TC_ROWS + 1;
    for (int kt = 0; kt < n_tiles; kt++) {
        int k0 = kt * TC_ROWS;
        __syncthreads(); /* the previous tile's K, V, P are consumed */
        load_tile<HD>(sk, base, stride, (H + kvh) * HD, k0, T);
        load_tile<HD>(sv, base, stride, (H + KVH + kvh) * HD, k0, T);
        __syncthreads();
        /* S = Q K^T: B(k = d, n = key) = K[key][d], column-major with ld HD */
        warp_gemm_store<HD, frag_b_col>(sw, SW, sq + warp * 16 * HD, HD, TC_ROWS / 16,
                                        [&](int nt, int kk) { return sk + nt * 16 * HD + kk * 16; }, HD);
        __syncwarp();
        /* online softmax for this lane's half of its row */
        float s[32], mx = -INFINITY;
#pragma unroll
        for (int j = 0; j < 32; j++) {
            int key = k0 + half * 32 + j;
            float v = sw[lr * SW + half * 32 + j] * scale;
            s[j] = (key > tq || key >= T) ? -INFINITY : v;
            mx = fmaxf(mx, s[j]);
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        float m_new = fmaxf(m_run, mx);
        float alpha = m_new == -INFINITY ? 1.0f : __expf(m_run - m_new);
        float sum = 0.0f;
#pragma unroll
        for (int j = 0; j < 32; j++) {
            bf16 p = __float2bfloat16_rn(s[j] == -INFINITY ? 0.0f : __expf(s[j] - m_new));
            sp[my_row * TC_ROWS + half * 32 + j] = p;
            sum += __bfloat162float(p); /* the sum of what P V multiplies */
        }
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        l_run = l_run * alpha + sum;
        m_run = m_new;
#pragma unroll
        for (int j = 0; j < HD / 2; j++) o[j] *= alpha;
        __syncwarp(); /* S read by every lane, P written */
        /* P V: B(k = key, n = d) = V[key][d], row-major with ld HD */
        warp_gemm_store<TC_ROWS, frag_b_row>(sw, SW, sp + warp * 16 * TC_ROWS, TC_ROWS, HD / 16,
                                             [&](int nt, int kk) { return sv + kk * 16 * HD + nt * 16; }, HD);
        __syncwarp();
#pragma unroll
        for (int j = 0; j < HD / 2; j++) o[j] += sw[lr * SW + half * (HD / 2) + j];
    }
    if (tq >= T) return;
    float inv = 1.0f / l_run;
    float *orow = out + ((size_t)b * T + tq) * H * HD + h * HD + half * (HD / 2);
#pragma unroll
    for (int j = 0; j < HD / 2; j++) orow[j] = o[j] * inv;
    if (half == 0) lse[((size_t)b * H + h) * T + tq] = m_run + logf(l_run);
}

/* ---------------------------------------------------------------- backward */

/* D[b, h, t] = sum_d dout * out (fp32). One warp per row. */
__global__ void attn_tc_d_kernel(float *dsum, const float *dout, const float *out, int B, int T, int H, int hd) {
    size_t row = blockIdx.x * (size_t)(blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= (size_t)B * H * T) return;
    int t = (int)(row % T), h = (int)((row / T) % H), b = (int)(row / ((size_t)T * H));
    size_t off = ((size_t)b * T + t) * H * hd + (size_t)h * hd;
    float acc = 0.0f;
    for (int d = threadIdx.x & 31; d < hd; d += 32) acc += dout[off + d] * out[off + d];
    acc = st_warp_sum(acc);
    if ((threadIdx.x & 31) == 0) dsum[row] = acc;
}

template <int HD>
struct bwd_smem {
    static constexpr size_t bytes = 4 * sizeof(bf16) * TC_ROWS * HD       /* two fixed tiles, two moving */
                                    + 2 * sizeof(float) * TC_ROWS * TC_ROWS /* S and dP tiles */
                                    + 2 * sizeof(bf16) * TC_ROWS * TC_ROWS  /* P and dS in bf16 */
                                    + 2 * sizeof(float) * TC_ROWS;          /* lse and D of the query rows */
};

/* dK, dV of 64 keys of one kv head: over the group's query heads and the query tiles from the keys on. */
template <int HD>
__global__ void __launch_bounds__(TC_THREADS) attn_tc_dkv_kernel(float *dqkv, const float *qkv, const float *dout,
                                                                 const float *lse, const float *dsum, int T, int H,
                                                                 int KVH, float scale) {
    extern __shared__ __align__(128) unsigned char smem[];
    bf16 *sk = (bf16 *)smem, *sv = sk + TC_ROWS * HD, *sq = sv + TC_ROWS * HD, *sdo = sq + TC_ROWS * HD;
    float *s_st = (float *)(sdo + TC_ROWS * HD), *s_dpt = s_st + TC_ROWS * TC_ROWS;
    bf16 *s_pt = (bf16 *)(s_dpt + TC_ROWS * TC_ROWS), *s_dst = s_pt + TC_ROWS * TC_ROWS;
    float *s_lse = (float *)(s_dst + TC_ROWS * TC_ROWS), *s_d = s_lse + TC_ROWS;
    int k0 = blockIdx.x * TC_ROWS, kvh = blockIdx.y, b = blockIdx.z, group = H / KVH;
    size_t stride = (size_t)(H + 2 * KVH) * HD, ostride = (size_t)H * HD;
    const float *base = qkv + (size_t)b * T * stride, *dbase = dout + (size_t)b * T * ostride;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, lr = lane >> 1, half = lane & 1;
    int my_key = k0 + warp * 16 + lr;
    load_tile<HD>(sk, base, stride, (H + kvh) * HD, k0, T);
    load_tile<HD>(sv, base, stride, (H + KVH + kvh) * HD, k0, T);
    frag_acc dk[HD / 16], dv[HD / 16];
    for (int i = 0; i < HD / 16; i++) wmma::fill_fragment(dk[i], 0.0f), wmma::fill_fragment(dv[i], 0.0f);
    float *wst = s_st + warp * 16 * TC_ROWS, *wdpt = s_dpt + warp * 16 * TC_ROWS;
    bf16 *wpt = s_pt + warp * 16 * TC_ROWS, *wdst = s_dst + warp * 16 * TC_ROWS;
    for (int g = 0; g < group; g++) {
        int h = kvh * group + g;
        for (int q0 = k0 / TC_ROWS * TC_ROWS; q0 < T; q0 += TC_ROWS) {
            __syncthreads(); /* the previous query tile is consumed */
            load_tile<HD>(sq, base, stride, h * HD, q0, T);
            load_tile<HD>(sdo, dbase, ostride, h * HD, q0, T);
            for (int i = threadIdx.x; i < TC_ROWS; i += blockDim.x) {
                int t = q0 + i;
                s_lse[i] = t < T ? lse[((size_t)b * H + h) * T + t] : 0.0f;
                s_d[i] = t < T ? dsum[((size_t)b * H + h) * T + t] : 0.0f;
            }
            __syncthreads();
            /* S^T = K Q^T and dP^T = V dO^T for the warp's 16 keys (B = Q^T / dO^T: column-major, ld HD) */
            warp_gemm_store<HD, frag_b_col>(wst, TC_ROWS, sk + warp * 16 * HD, HD, TC_ROWS / 16,
                                            [&](int nt, int kk) { return sq + nt * 16 * HD + kk * 16; }, HD);
            warp_gemm_store<HD, frag_b_col>(wdpt, TC_ROWS, sv + warp * 16 * HD, HD, TC_ROWS / 16,
                                            [&](int nt, int kk) { return sdo + nt * 16 * HD + kk * 16; }, HD);
            __syncwarp();
            for (int j = half * 32; j < half * 32 + 32; j++) {
                int tq = q0 + j;
                float p = (my_key > tq || tq >= T || my_key >= T) ? 0.0f
                                                                   : __expf(wst[lr * TC_ROWS + j] * scale - s_lse[j]);
                wpt[lr * TC_ROWS + j] = __float2bfloat16_rn(p);
                wdst[lr * TC_ROWS + j] = __float2bfloat16_rn(p * (wdpt[lr * TC_ROWS + j] - s_d[j]));
            }
            __syncwarp();
            /* dV += P^T dO, dK += dS^T Q (B = dO / Q: row-major, ld HD) */
            for (int nt = 0; nt < HD / 16; nt++)
                for (int kk = 0; kk < TC_ROWS / 16; kk++) {
                    frag_a fa;
                    frag_b_row fb;
                    wmma::load_matrix_sync(fa, wpt + kk * 16, TC_ROWS);
                    wmma::load_matrix_sync(fb, sdo + kk * 16 * HD + nt * 16, HD);
                    wmma::mma_sync(dv[nt], fa, fb, dv[nt]);
                    wmma::load_matrix_sync(fa, wdst + kk * 16, TC_ROWS);
                    wmma::load_matrix_sync(fb, sq + kk * 16 * HD + nt * 16, HD);
                    wmma::mma_sync(dk[nt], fa, fb, dk[nt]);
                }
        }
    }
    /* out: through the warp's S^T tile (16 x 64 floats; HD <= 128 takes two passes of 64 columns) */
    float *dst = dqkv + (size_t)b * T * stride;
    for (int which = 0; which < 2; which++) {
        frag_acc *f = which ? dv : dk;
        float mul = which ? 1.0f : scale;
        int col = (which ? H + KVH + kvh : H + kvh) * HD;
        for (int c0 = 0; c0 < HD; c0 += 64) {
            __syncwarp();
            for (int nt = c0 / 16; nt < min(HD, c0 + 64) / 16; nt++)
                wmma::store_matrix_sync(wst + (nt * 16 - c0), f[nt], TC_ROWS, wmma::mem_row_major);
            __syncwarp();
            if (my_key < T)
                for (int j = half * 32; j < half * 32 + 32 && c0 + j < HD; j++)
                    dst[(size_t)my_key * stride + col + c0 + j] = wst[lr * TC_ROWS + j] * mul;
        }
    }
}

/* dQ of 64 queries of one head: over the key tiles up to the diagonal. */
template <int HD>
__global__ void __launch_bounds__(TC_THREADS) attn_tc_dq_kernel(float *dqkv, const float *qkv, const float *dout,
                                                                const float *lse, const float *dsum, int T, int H,
                                                                int KVH, float scale) {
    extern __shared__ __align__(128) unsigned char smem[];
    bf16 *sq = (bf16 *)smem, *sdo = sq + TC_ROWS * HD, *sk = sdo + TC_ROWS * HD, *sv = sk + TC_ROWS * HD;
    float *s_s = (float *)(sv + TC_ROWS * HD), *s_dp = s_s + TC_ROWS * TC_ROWS;
    bf16 *s_ds = (bf16 *)(s_dp + TC_ROWS * TC_ROWS);
    int q0 = blockIdx.x * TC_ROWS, h = blockIdx.y, b = blockIdx.z, kvh = h / (H / KVH);
    size_t stride = (size_t)(H + 2 * KVH) * HD, ostride = (size_t)H * HD;
    const float *base = qkv + (size_t)b * T * stride;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, lr = lane >> 1, half = lane & 1;
    int tq = q0 + warp * 16 + lr;
    load_tile<HD>(sq, base, stride, h * HD, q0, T);
    load_tile<HD>(sdo, dout + (size_t)b * T * ostride, ostride, h * HD, q0, T);
    float my_lse = tq < T ? lse[((size_t)b * H + h) * T + tq] : 0.0f;
    float my_d = tq < T ? dsum[((size_t)b * H + h) * T + tq] : 0.0f;
    frag_acc dq[HD / 16];
    for (int i = 0; i < HD / 16; i++) wmma::fill_fragment(dq[i], 0.0f);
    float *ws = s_s + warp * 16 * TC_ROWS, *wdp = s_dp + warp * 16 * TC_ROWS;
    bf16 *wds = s_ds + warp * 16 * TC_ROWS;
    int last_q = min(q0 + TC_ROWS, T) - 1;
    for (int k0 = 0; k0 <= last_q; k0 += TC_ROWS) {
        __syncthreads();
        load_tile<HD>(sk, base, stride, (H + kvh) * HD, k0, T);
        load_tile<HD>(sv, base, stride, (H + KVH + kvh) * HD, k0, T);
        __syncthreads();
        warp_gemm_store<HD, frag_b_col>(ws, TC_ROWS, sq + warp * 16 * HD, HD, TC_ROWS / 16,
                                        [&](int nt, int kk) { return sk + nt * 16 * HD + kk * 16; }, HD);
        warp_gemm_store<HD, frag_b_col>(wdp, TC_ROWS, sdo + warp * 16 * HD, HD, TC_ROWS / 16,
                                        [&](int nt, int kk) { return sv + nt * 16 * HD + kk * 16; }, HD);
        __syncwarp();
        for (int j = half * 32; j < half * 32 + 32; j++) {
            int key = k0 + j;
            float p = (key > tq || key >= T || tq >= T) ? 0.0f : __expf(ws[lr * TC_ROWS + j] * scale - my_lse);
            wds[lr * TC_ROWS + j] = __float2bfloat16_rn(p * (wdp[lr * TC_ROWS + j] - my_d));
        }
        __syncwarp();
        /* dQ += dS K (B = K: row-major, ld HD) */
        for (int nt = 0; nt < HD / 16; nt++)
            for (int kk = 0; kk < TC_ROWS / 16; kk++) {
                frag_a fa;
                frag_b_row fb;
                wmma::load_matrix_sync(fa, wds + kk * 16, TC_ROWS);
                wmma::load_matrix_sync(fb, sk + kk * 16 * HD + nt * 16, HD);
                wmma::mma_sync(dq[nt], fa, fb, dq[nt]);
            }
    }
    float *dst = dqkv + (size_t)b * T * stride;
    for (int c0 = 0; c0 < HD; c0 += 64) {
        __syncwarp();
        for (int nt = c0 / 16; nt < min(HD, c0 + 64) / 16; nt++)
            wmma::store_matrix_sync(ws + (nt * 16 - c0), dq[nt], TC_ROWS, wmma::mem_row_major);
        __syncwarp();
        if (tq < T)
            for (int j = half * 32; j < half * 32 + 32 && c0 + j < HD; j++)
                dst[(size_t)tq * stride + h * HD + c0 + j] = ws[lr * TC_ROWS + j] * scale;
    }
}

/* ---------------------------------------------------------------- host side */

/* Dynamic shared memory above 48 KiB needs the opt-in attribute, set once per kernel. */
template <typename K>
static int allow_smem(K kernel, size_t bytes, const char *what) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
    if (e != cudaSuccess) {
        st_cuda_note_err(what, e);
        return -1;
    }
    return 0;
}

static int tc_supported(int b, int t, int h, int kvh, int hd) {
    return (hd == 64 || hd == 128) && b > 0 && t > 0 && h > 0 && kvh > 0 && h % kvh == 0 && b <= 65535 &&
           h <= 65535;
}

template <int HD>
static void fwd_launch(float *out, float *lse, const float *qkv, int b, int t, int h, int kvh) {
    size_t bytes = fwd_smem<HD>::bytes;
    if (allow_smem(attn_tc_fwd_kernel<HD>, bytes, "attention_fwd (tensor cores, smem)")) return;
    dim3 grid((t + TC_ROWS - 1) / TC_ROWS, h, b);
    attn_tc_fwd_kernel<HD><<<grid, TC_THREADS, bytes, st_cuda_stream_internal()>>>(out, lse, qkv, t, h, kvh,
                                                                                     1.0f / sqrtf((float)HD));
    ST_CUDA_LAUNCHED("attention_fwd (tensor cores)");
}

template <int HD>
static void bwd_launch(float *dqkv, const float *dout, const float *qkv, const float *lse, float *dsum, int b, int t,
                       int h, int kvh) {
    size_t bytes = bwd_smem<HD>::bytes;
    if (allow_smem(attn_tc_dkv_kernel<HD>, bytes, "attention_bwd (tensor cores, smem)") ||
        allow_smem(attn_tc_dq_kernel<HD>, bytes, "attention_bwd (tensor cores, smem)"))
        return;
    float scale = 1.0f / sqrtf((float)HD);
    cudaStream_t st = st_cuda_stream_internal();
    dim3 gkv((t + TC_ROWS - 1) / TC_ROWS, kvh, b), gq((t + TC_ROWS - 1) / TC_ROWS, h, b);
    attn_tc_dkv_kernel<HD><<<gkv, TC_THREADS, bytes, st>>>(dqkv, qkv, dout, lse, dsum, t, h, kvh, scale);
    ST_CUDA_LAUNCHED("attention_bwd dk/dv (tensor cores)");
    attn_tc_dq_kernel<HD><<<gq, TC_THREADS, bytes, st>>>(dqkv, qkv, dout, lse, dsum, t, h, kvh, scale);
    ST_CUDA_LAUNCHED("attention_bwd dq (tensor cores)");
}

extern "C" int st_cuda_attention_tc_fwd(float *out, float *lse, const float *qkv, int b, int t, int h, int kvh,
                                        int hd) {
    if (!tc_supported(b, t, h, kvh, hd))
        return st_fail(ST_EINVAL, "tensor-core attention: head_dim %d (64 or 128), B=%d, H=%d/%d not supported", hd,
                       b, h, kvh);
    if (hd == 64) fwd_launch<64>(out, lse, qkv, b, t, h, kvh);
    else fwd_launch<128>(out, lse, qkv, b, t, h, kvh);
    return 0;
}

extern "C" int st_cuda_attention_tc_bwd(float *dqkv, const float *dout, const float *qkv, const float *out,
                                        const float *lse, int b, int t, int h, int kvh, int hd) {
    if (!tc_supported(b, t, h, kvh, hd))
        return st_fail(ST_EINVAL, "tensor-core attention: head_dim %d (64 or 128), B=%d, H=%d/%d not supported", hd,
                       b, h, kvh);
    size_t scratch_bytes, rows = (size_t)b * h * t;
    float *dsum = (float *)st_cuda_scratch(&scratch_bytes);
    if (rows * sizeof(float) > scratch_bytes) {
        char msg[160];
        snprintf(msg, sizeof msg, "tensor-core attention_bwd needs %zu bytes of scratch, have %zu", rows * 4,
                 scratch_bytes);
        st_cuda_note("attention_bwd", msg);
        return ST_EDEVICE;
    }
    unsigned blocks = (unsigned)((rows + 7) / 8);
    attn_tc_d_kernel<<<blocks, 256, 0, st_cuda_stream_internal()>>>(dsum, dout, out, b, t, h, hd);
    ST_CUDA_LAUNCHED("attention_bwd D (tensor cores)");
    if (hd == 64) bwd_launch<64>(dqkv, dout, qkv, lse, dsum, b, t, h, kvh);
    else bwd_launch<128>(dqkv, dout, qkv, lse, dsum, b, t, h, kvh);
    return 0;
}

/* The table's attention: the tensor-core kernels when SHARDTUNE_CUDA_ATTN=tc and the shape is theirs,
 * else the fp32 kernels (the CPU twin's arithmetic). */
static int use_tc(int b, int t, int h, int kvh, int hd) {
    static int mode = -1;
    if (mode < 0) {
        const char *s = getenv("SHARDTUNE_CUDA_ATTN");
        mode = s && strcmp(s, "tc") == 0;
    }
    return mode && tc_supported(b, t, h, kvh, hd);
}

void st_cu_attention_fwd_any(float *out, float *lse, const float *qkv, int b, int t, int h, int kvh, int hd) {
    if (use_tc(b, t, h, kvh, hd)) (void)st_cuda_attention_tc_fwd(out, lse, qkv, b, t, h, kvh, hd);
    else st_cu_attention_fwd(out, lse, qkv, b, t, h, kvh, hd);
}

void st_cu_attention_bwd_any(float *dqkv, const float *dout, const float *qkv, const float *out, const float *lse,
                             int b, int t, int h, int kvh, int hd) {
    if (use_tc(b, t, h, kvh, hd)) (void)st_cuda_attention_tc_bwd(dqkv, dout, qkv, out, lse, b, t, h, kvh, hd);
    else st_cu_attention_bwd(dqkv, dout, qkv, out, lse, b, t, h, kvh, hd);
}
