/* qmatmul.cu — QLoRA's fused dequantize-matmul on the device (the backend's qmatmul, kernels/kernels.h; CPU twin
 * kernels/cpu/cpu_qmatmul.c). No dequantized matrix exists in device memory: each block of threads owns a
 * 64 x 64 tile of C and walks the sum dimension in steps of 32, loading a tile of X (fp32 or bf16) and the
 * matching 32 x 64 tile of W's codes straight from the quantized tensor, dequantizing it in shared memory (the
 * NF4 code table or int8 codes, times the block's absmax; double-quantized absmax rebuilt in place as
 * q8 * scale2, rounded, + mean, the CPU's dequant_int8 + add_scalar), then multiplying:
 *   bf16 1: both tiles rounded to bf16 (kernels/bf16.h's rule, st_bf16_bits_rn) and multiplied on the tensor
 *           cores (WMMA 16x16x16, bf16 in, fp32 accumulate; 4 warps of 32 x 32) — the CPU twin's values up to
 *           the order of the fp32 additions (gpu_check bounds it);
 *   bf16 0: fp32 FMA tiles (256 threads, 4 x 4 outputs each) — matmul's fp32 product, up to summation order;
 *   bf16 2 (ST_QMM_W16): the same fp32 tiles with W's tile rounded to bf16 (X fp32 as is, never bf16).
 * Forward (trans 0) reads W[n][k] (tile loads walk k, along W's rows); the input gradient (trans 1) reads
 * W[k][n] (loads walk n). C = tile + beta * C (beta 0 never reads C). Compiled for sm_80 / sm_90. */
#include "kernels/cuda/cuda_ops.cuh"

#include <mma.h>
#include <string.h>

using namespace nvcuda;

enum { QM_BM = 64, QM_BN = 64, QM_BK = 32, QM_LDA = QM_BK + 8, QM_LDB = QM_BN + 8, QM_LDC = QM_BN + 4 };

typedef __nv_bfloat16 qbf16;
typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> qfrag_acc;
typedef wmma::fragment<wmma::matrix_a, 16, 16, 16, qbf16, wmma::row_major> qfrag_a;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, qbf16, wmma::row_major> qfrag_b;

struct qmm_levels {
    float v[16]; /* ST_NF4_LEVELS by value: no device-global state to initialize */
};

__device__ __forceinline__ void qput(qbf16 &d, float v) { d = __ushort_as_bfloat16(st_bf16_bits_rn(v)); }
__device__ __forceinline__ void qput(float &d, float v) { d = v; }
__device__ __forceinline__ void qput_bits(qbf16 &d, uint16_t h) { d = __ushort_as_bfloat16(h); }
__device__ __forceinline__ void qput_bits(float &d, uint16_t h) { d = __uint_as_float((uint32_t)h << 16); }

/* W[row][col] of the stacked parts, dequantized (fp32, as the CPU's dequant kernels give it). */
__device__ __forceinline__ float qw_at(const st_qweight &w, const float *lv, int row, int col) {
    int p = 0;
    while (p < w.nparts - 1 && row >= w.part[p].rows) row -= w.part[p++].rows;
    const st_qw_part &pt = w.part[p];
    size_t i = (size_t)row * (size_t)w.cols + (size_t)col, b = i / (size_t)w.block;
    float s = pt.scales ? pt.scales[b]
                        : __fadd_rn(__fmul_rn((float)pt.q8[b], pt.scale2[b / ST_QW_DQ_BLOCK]), pt.mean);
    if (w.nf4) {
        uint8_t byte = pt.codes[i >> 1];
        return __fmul_rn(lv[(i & 1) ? byte >> 4 : byte & 15], s); /* low nibble first */
    }
    return __fmul_rn((float)(int8_t)pt.codes[i], s);
}

/* X[m0 .. m0 + 64)[k0 .. k0 + 32) -> As (zeros outside X) */
template <typename S, int LD>
__device__ void load_x(S *as, const float *xf, const uint16_t *xh, int m, int len, int m0, int k0) {
    for (int i = threadIdx.x; i < QM_BM * QM_BK; i += blockDim.x) {
        int r = i / QM_BK, k = i % QM_BK, gr = m0 + r, gk = k0 + k;
        S &d = as[r * LD + k];
        if (gr < m && gk < len) {
            size_t at = (size_t)gr * (size_t)len + (size_t)gk;
            if (xh) qput_bits(d, xh[at]);
            else qput(d, xf[at]);
        } else {
            qput(d, 0.0f);
        }
    }
}

/* B[k0 .. k0 + 32)[n0 .. n0 + 64) of the product, B = W^T (trans 0) or W (trans 1), dequantized -> Bs */
template <typename S, int LD>
__device__ void load_w(S *bs, const st_qweight &w, const float *lv, int trans, int n, int len, int k0, int n0,
                       int round16) {
    for (int i = threadIdx.x; i < QM_BK * QM_BN; i += blockDim.x) {
        int k = trans ? i / QM_BN : i % QM_BK, j = trans ? i % QM_BN : i / QM_BK; /* walk W's rows */
        int gk = k0 + k, gn = n0 + j;
        float v = 0.0f;
        if (gk < len && gn < n) v = trans ? qw_at(w, lv, gk, gn) : qw_at(w, lv, gn, gk);
        if (round16) v = __uint_as_float((uint32_t)st_bf16_bits_rn(v) << 16); /* ST_QMM_W16 */
        qput(bs[k * LD + j], v);
    }
}

__device__ __forceinline__ void store_one(float *c, int n, int gr, int gn, float v, float beta) {
    float *d = c + (size_t)gr * (size_t)n + gn;
    *d = beta == 0.0f ? v : __fadd_rn(__fmul_rn(beta, *d), v);
}

__global__ void __launch_bounds__(128) qmm_tc_kernel(float *c, const float *xf, const uint16_t *xh, st_qweight w,
                                                     int m, int n, int len, int trans, float beta, qmm_levels lvp) {
    __shared__ __align__(32) qbf16 as[QM_BM * QM_LDA];
    __shared__ __align__(32) qbf16 bs[QM_BK * QM_LDB];
    __shared__ __align__(32) float cs[QM_BM * QM_LDC];
    __shared__ float lv[16];
    if (threadIdx.x < 16) lv[threadIdx.x] = lvp.v[threadIdx.x];
    __syncthreads();
    const int m0 = blockIdx.y * QM_BM, n0 = blockIdx.x * QM_BN, warp = threadIdx.x >> 5, wr = warp >> 1, wc = warp & 1;
    qfrag_acc acc[2][2];
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 2; j++) wmma::fill_fragment(acc[i][j], 0.0f);
    for (int k0 = 0; k0 < len; k0 += QM_BK) {
        load_x<qbf16, QM_LDA>(as, xf, xh, m, len, m0, k0);
        load_w<qbf16, QM_LDB>(bs, w, lv, trans, n, len, k0, n0, 0);
        __syncthreads();
        for (int kk = 0; kk < QM_BK / 16; kk++) {
            qfrag_a fa[2];
            qfrag_b fb[2];
            for (int i = 0; i < 2; i++) wmma::load_matrix_sync(fa[i], as + (wr * 32 + i * 16) * QM_LDA + kk * 16, QM_LDA);
            for (int j = 0; j < 2; j++) wmma::load_matrix_sync(fb[j], bs + kk * 16 * QM_LDB + wc * 32 + j * 16, QM_LDB);
            for (int i = 0; i < 2; i++)
                for (int j = 0; j < 2; j++) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
        }
        __syncthreads();
    }
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 2; j++)
            wmma::store_matrix_sync(cs + (wr * 32 + i * 16) * QM_LDC + wc * 32 + j * 16, acc[i][j], QM_LDC,
                                    wmma::mem_row_major);
    __syncthreads();
    for (int i = threadIdx.x; i < QM_BM * QM_BN; i += blockDim.x) {
        int r = i / QM_BN, j = i % QM_BN;
        if (m0 + r < m && n0 + j < n) store_one(c, n, m0 + r, n0 + j, cs[r * QM_LDC + j], beta);
    }
}

__global__ void __launch_bounds__(256) qmm_f32_kernel(float *c, const float *xf, const uint16_t *xh, st_qweight w,
                                                      int m, int n, int len, int trans, float beta, qmm_levels lvp,
                                                      int round16) {
    __shared__ float as[QM_BM * (QM_BK + 1)];
    __shared__ float bs[QM_BK * (QM_BN + 1)];
    __shared__ float lv[16];
    if (threadIdx.x < 16) lv[threadIdx.x] = lvp.v[threadIdx.x];
    __syncthreads();
    const int m0 = blockIdx.y * QM_BM, n0 = blockIdx.x * QM_BN, tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    float acc[4][4];
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++) acc[i][j] = 0.0f;
    for (int k0 = 0; k0 < len; k0 += QM_BK) {
        load_x<float, QM_BK + 1>(as, xf, xh, m, len, m0, k0);
        load_w<float, QM_BN + 1>(bs, w, lv, trans, n, len, k0, n0, round16);
        __syncthreads();
        for (int k = 0; k < QM_BK; k++) {
            float a[4], b[4];
            for (int i = 0; i < 4; i++) a[i] = as[(ty + 16 * i) * (QM_BK + 1) + k];
            for (int j = 0; j < 4; j++) b[j] = bs[k * (QM_BN + 1) + tx + 16 * j];
            for (int i = 0; i < 4; i++)
                for (int j = 0; j < 4; j++) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++) {
            int gr = m0 + ty + 16 * i, gn = n0 + tx + 16 * j;
            if (gr < m && gn < n) store_one(c, n, gr, gn, acc[i][j], beta);
        }
}

void st_cu_qmatmul(float *c, st_mm_in x, const st_qweight *w, int m, int trans, int bf16, float beta, float *scratch,
                   size_t scratch_floats) {
    (void)scratch, (void)scratch_floats; /* tiles live in shared memory */
    if (w->block <= 0 || w->nparts < 1 || w->nparts > ST_QW_PARTS) {
        st_cuda_note("qmatmul", "the quantized weight needs a positive block and 1-4 parts");
        return;
    }
    int rows = 0;
    for (int p = 0; p < w->nparts; p++) rows += w->part[p].rows;
    const int n = trans ? w->cols : rows, len = trans ? rows : w->cols;
    if (m <= 0 || n <= 0) return;
    if ((!x.f32 && !x.bf16) || (bf16 != 1 && !x.f32)) {
        st_cuda_note("qmatmul", "no X operand (fp32 math and ST_QMM_W16 read fp32 X)");
        return;
    }
    if ((m + QM_BM - 1) / QM_BM > 65535) {
        st_cuda_note("qmatmul", "more than 4 Mi rows of X");
        return;
    }
    qmm_levels lv;
    memcpy(lv.v, ST_NF4_LEVELS, sizeof lv.v);
    dim3 grid((unsigned)((n + QM_BN - 1) / QM_BN), (unsigned)((m + QM_BM - 1) / QM_BM));
    if (bf16 == 1)
        qmm_tc_kernel<<<grid, 128, 0, st_cuda_stream_internal()>>>(c, x.f32, x.bf16, *w, m, n, len, trans, beta, lv);
    else
        qmm_f32_kernel<<<grid, 256, 0, st_cuda_stream_internal()>>>(c, x.f32, NULL, *w, m, n, len, trans, beta, lv,
                                                                    bf16 == ST_QMM_W16);
    ST_CUDA_LAUNCHED("qmatmul");
}
