/* cuda_common.cuh — what every CUDA kernel file shares: the backend's stream and scratch buffer,
 * sticky error recording, and deterministic block reductions.
 *
 * The CUDA backend keeps one state per process (one device, one compute stream): every kernel is
 * launched on st_cuda_stream() so kernels, copies and NCCL waits are ordered. Scratch memory is one
 * device buffer allocated at backend creation and owned by backend_cuda.cu; kernels that need partial
 * sums carve it per call (calls are stream-ordered, so no two calls use it at once). */
#ifndef ST_CUDA_COMMON_CUH
#define ST_CUDA_COMMON_CUH

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

extern "C" {
#include "common/error.h"
#include "kernels/kernels.h"
}
#include "kernels/cuda/launch_host.h"

/* The compute stream and scratch of the current backend (valid after st_backend_cuda succeeded). */
cudaStream_t st_cuda_stream_internal(void);
void *st_cuda_scratch(size_t *bytes);

/* Records the first failure (sticky) as "what: message"; st_cuda_status() reports and clears it.
 * Used by the void functions of the backend table, which have no return code. */
void st_cuda_note(const char *what, const char *msg);
void st_cuda_note_err(const char *what, cudaError_t err);

/* The device word where cross_entropy records the first row (of a call) with an out-of-vocabulary
 * target, as an atomicMin; ST_CUDA_NO_ROW (a memset of 0x7f bytes) when none. The backend's status()
 * reads and resets it at the step boundary, so cross_entropy never waits for it. `v` is remembered for
 * the message. */
enum { ST_CUDA_NO_ROW = 0x7f7f7f7f };
int *st_cuda_bad_target_flag(int v);

/* Checks a runtime call / the last launch and notes a failure. */
#define ST_CUDA_CK(what, call)                                      \
    do {                                                            \
        cudaError_t st_ck_err_ = (call);                            \
        if (st_ck_err_ != cudaSuccess) st_cuda_note_err(what, st_ck_err_); \
    } while (0)
/* After a launch: notes a launch error naming the kernel (and, with SHARDTUNE_CUDA_SYNC=1, synchronizes
 * first so an asynchronous fault is attributed to this kernel too). */
void st_cuda_launched(const char *what);
#define ST_CUDA_LAUNCHED(what) st_cuda_launched(what)

/* ---- device helpers ---- */

/* bf16 bits of f, round to nearest even: __float2bfloat16_rn, except that a NaN keeps its sign and payload
 * top bits with the quiet bit forced (the hardware returns one canonical NaN). This is exactly
 * st_float_to_bf16_bits() of kernels/bf16.h, so bf16 copies are bit-identical to the CPU's. */
__device__ __forceinline__ uint16_t st_bf16_bits_rn(float f) {
    uint32_t u = __float_as_uint(f);
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu) != 0) return (uint16_t)((u >> 16) | 0x0040u);
    return __bfloat16_as_ushort(__float2bfloat16_rn(f));
}

template <typename T>
__device__ __forceinline__ T st_warp_sum(T v) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

__device__ __forceinline__ float st_warp_max(float v) {
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    return v;
}

/* Block-wide sum with a fixed tree (warp butterflies then warp 0 over the warp totals): deterministic.
 * `shared` needs 32 slots. Every thread gets the result. blockDim.x must be a multiple of 32. */
template <typename T>
__device__ T st_block_sum(T v, T *shared) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = st_warp_sum(v);
    __syncthreads(); /* shared may still be read by a previous call */
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    T total = lane < nwarps ? shared[lane] : (T)0;
    total = st_warp_sum(total);
    return total;
}

__device__ inline float st_block_max(float v, float *shared) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = st_warp_max(v);
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    float m = lane < nwarps ? shared[lane] : -INFINITY;
    return st_warp_max(m);
}

/* Sums partial[r][j] over r = 0..rows-1 in order and adds it to out[j] (out += colsum). Used for
 * the deterministic second stage of bias / norm weight gradients. */
void st_cuda_colsum_finish(float *out, const float *partial, int rows, int c);

/* Deterministic sum of n doubles (device) into one double returned to the host, via `scratch`
 * (at least ST_CUDA_REDUCE_BLOCKS + 1 doubles). */
double st_cuda_sum_doubles(const double *x, size_t n, double *scratch);
/* The same sum added to *acc on the device (acc in device memory; no host wait). */
void st_cuda_add_sum_doubles(double *acc, const double *x, size_t n, double *scratch);

#endif
