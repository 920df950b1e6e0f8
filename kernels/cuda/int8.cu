/* int8.cu — the CUDA backend's int8 forward matmul (kernels.h w8_bytes, w8_scratch_bytes, w8_pack,
 * matmul_w8a8: a distillation teacher under distill.teacher_dtype: int8). Its CPU twin is
 * kernels/cpu/cpu_int8.c; both compute the same function bit for bit:
 *  - a weight row's step s_j = absmax / 127 and codes q = clamp(rint(w / s_j), -127, 127) (0 when s_j = 0),
 *    an activation row's (token's) the same, with IEEE division and round-half-even (__fdiv_rn, rintf);
 *  - the products summed exactly in int32 (dp4a: every order gives the same integer);
 *  - the epilogue as the CPU's sequence of fp32 operations, each rounded on its own (no FMA contraction):
 *    v = (float)isum * (t_i * s_j); v = beta * C + v when beta != 0; v = v + bias[j] when bias.
 *
 * Packed weight layout (opaque to callers; device memory of st_cu_w8_bytes(out, in) bytes):
 *   scales s[out] (fp32), padded to 256 bytes, then codes [out][kp] int8, row-major, kp = in rounded up to 32
 *   (zero codes in the padding). Scratch (st_cu_w8_scratch_bytes(m, in)): token steps t[m] (fp32) padded to
 *   256 bytes, then the activation codes [m][kp] int8 (signed: dp4a multiplies s8 by s8, no offset).
 * The matmul: 64 x 64 output tiles, 256 threads of 4 x 4 outputs, 32 inputs (8 dp4a words) per stage. */
#include "kernels/cuda/cuda_ops.cuh"

namespace {

constexpr int KP_ALIGN = 32; /* codes per row rounded up to this (one tile stage) */
constexpr int TILE = 64;     /* output rows and columns per block */
constexpr int KW = KP_ALIGN / 4; /* int32 words of codes per stage */
constexpr int QUANT_THREADS = 256;

__host__ __device__ inline size_t round_up(size_t x, size_t a) { return (x + a - 1) / a * a; }
inline size_t kp_of(int in) { return round_up((size_t)in, KP_ALIGN); }
inline size_t head_bytes(int rows) { return round_up((size_t)rows * sizeof(float), 256); }

/* One code, as cpu_int8.c code_of: clamp(rint(x / s), -127, 127), 0 when s = 0. */
__device__ __forceinline__ int8_t code_of(float x, float s) {
    float v = s > 0.0f ? rintf(__fdiv_rn(x, s)) : 0.0f;
    return (int8_t)(int)fmaxf(-127.0f, fminf(127.0f, v));
}

/* Row r of x [rows, in] to int8 codes [rows][kp] (zero padding) and its step absmax / 127 into step[r];
 * one block per row. The max is exact in any order, so the step is the CPU's. */
__global__ void quant_rows_kernel(int8_t *codes, float *step, const float *x, int in, size_t kp) {
    __shared__ float red[32];
    const size_t r = blockIdx.x;
    const float *row = x + r * (size_t)in;
    float amax = 0.0f;
    for (int k = threadIdx.x; k < in; k += blockDim.x) amax = fmaxf(amax, fabsf(row[k]));
    amax = st_warp_max(amax);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = amax;
    __syncthreads();
    if (threadIdx.x < 32) {
        float v = threadIdx.x < (blockDim.x >> 5) ? red[threadIdx.x] : 0.0f;
        v = st_warp_max(v);
        if (threadIdx.x == 0) red[0] = v;
    }
    __syncthreads();
    const float s = __fdiv_rn(red[0], 127.0f);
    int8_t *q = codes + r * kp;
    for (size_t k = threadIdx.x; k < kp; k += blockDim.x) q[k] = k < (size_t)in ? code_of(row[k], s) : (int8_t)0;
    if (threadIdx.x == 0) step[r] = s;
}

/* C[m, out] = (sum_k qa[i, k] qw[j, k]) * (ta[i] * sw[j]) (+ beta C) (+ bias): 64 x 64 tile per block. */
__global__ void __launch_bounds__(256) w8a8_kernel(float *c, const int8_t *qa, const float *ta, const int8_t *qw,
                                                   const float *sw, const float *bias, int m, int out, size_t kp,
                                                   float beta) {
    __shared__ int as[KW][TILE + 1], ws[KW][TILE + 1];
    const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
    const int i0 = blockIdx.y * TILE, j0 = blockIdx.x * TILE;
    int acc[4][4] = {};
    for (size_t k0 = 0; k0 < kp; k0 += KP_ALIGN) {
        for (int e = threadIdx.x; e < TILE * KW; e += blockDim.x) { /* 512 words of each operand */
            int row = e / KW, w = e % KW;
            int i = i0 + row, j = j0 + row;
            as[w][row] = i < m ? *(const int *)(qa + (size_t)i * kp + k0 + 4 * w) : 0;
            ws[w][row] = j < out ? *(const int *)(qw + (size_t)j * kp + k0 + 4 * w) : 0;
        }
        __syncthreads();
#pragma unroll
        for (int w = 0; w < KW; w++) {
            int a[4], b[4];
#pragma unroll
            for (int r = 0; r < 4; r++) a[r] = as[w][ty + 16 * r], b[r] = ws[w][tx + 16 * r];
#pragma unroll
            for (int r = 0; r < 4; r++)
#pragma unroll
                for (int q = 0; q < 4; q++) acc[r][q] = __dp4a(a[r], b[q], acc[r][q]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int r = 0; r < 4; r++) {
        int i = i0 + ty + 16 * r;
        if (i >= m) continue;
#pragma unroll
        for (int q = 0; q < 4; q++) {
            int j = j0 + tx + 16 * q;
            if (j >= out) continue;
            float *cij = c + (size_t)i * out + j;
            float v = __fmul_rn((float)acc[r][q], __fmul_rn(ta[i], sw[j]));
            if (beta != 0.0f) v = __fadd_rn(__fmul_rn(beta, *cij), v);
            if (bias) v = __fadd_rn(v, bias[j]);
            *cij = v;
        }
    }
}

} // namespace

/* the sizes are kernels/backend.c's (the planner's too): the same layout as head_bytes and kp_of */
size_t st_cu_w8_bytes(int out, int in) { return st_cuda_w8_bytes(out, in); }
size_t st_cu_w8_scratch_bytes(int m, int in) { return st_cuda_w8_scratch_bytes(m, in); }

void st_cu_w8_pack(void *packed, const float *w, int out, int in) {
    if (out <= 0 || in < 0) return;
    float *s = (float *)packed;
    int8_t *codes = (int8_t *)packed + head_bytes(out);
    quant_rows_kernel<<<out, QUANT_THREADS, 0, st_cuda_stream_internal()>>>(codes, s, w, in, kp_of(in));
    ST_CUDA_LAUNCHED("w8_pack");
}

void st_cu_matmul_w8a8(float *c, const float *a, const void *packed, const float *bias, int m, int out, int in,
                       float beta, void *scratch) {
    if (m <= 0 || out <= 0 || in < 0) return;
    if (m > 65535 * TILE) { st_cuda_note("matmul_w8a8", "more than 4194240 rows"); return; }
    const size_t kp = kp_of(in);
    float *ta = (float *)scratch;
    int8_t *qa = (int8_t *)scratch + head_bytes(m);
    cudaStream_t st = st_cuda_stream_internal();
    quant_rows_kernel<<<m, QUANT_THREADS, 0, st>>>(qa, ta, a, in, kp);
    ST_CUDA_LAUNCHED("matmul_w8a8 (activation codes)");
    const float *sw = (const float *)packed;
    const int8_t *qw = (const int8_t *)packed + head_bytes(out);
    dim3 grid((unsigned)((out + TILE - 1) / TILE), (unsigned)((m + TILE - 1) / TILE));
    w8a8_kernel<<<grid, 256, 0, st>>>(c, qa, ta, qw, sw, bias, m, out, kp, beta);
    ST_CUDA_LAUNCHED("matmul_w8a8");
}
