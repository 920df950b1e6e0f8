/* cuda_extras.h — CUDA-only entry points beyond the fp32 backend table (kernels/kernels.h).
 *
 * Plain C declarations (callable from the C worker when built with ST_HAVE_CUDA). Pointers are device
 * pointers owned by the caller; every call is queued on the backend's compute stream (st_cuda_stream())
 * and needs st_backend_cuda() to have succeeded first. Functions returning int return 0 or ST_E* with
 * st_error() set for bad arguments; launch failures are sticky and reported by st_cuda_status(). */
#ifndef ST_CUDA_EXTRAS_H
#define ST_CUDA_EXTRAS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* 0 when every CUDA call since the last check succeeded; else ST_EDEVICE with st_error() naming the
 * first failing kernel/call. Clears the sticky error. Does not synchronize (call synchronize first to
 * catch asynchronous faults). */
int st_cuda_status(void);

/* The backend table itself, without selecting a device (for tests/unit/test_cuda_host.c: every slot
 * set). Calling its functions before st_backend_cuda() succeeded is undefined. */
struct st_backend;
const struct st_backend *st_cuda_table(void);

/* The 16-byte UUID of the device the backend is bound to (tells two ranks that share one GPU apart from
 * two ranks whose CUDA_VISIBLE_DEVICES each show "device 0"). 0 or ST_EDEVICE. */
int st_cuda_device_uuid(unsigned char uuid[16]);

/* The compute stream as a cudaStream_t (void * here to keep this header free of CUDA types). */
void *st_cuda_stream(void);

/* Fused residual add + RMSNorm forward over rows [n, c]:
 *   residual += delta;  out = residual * rstd * w;  rstd[i] = 1/sqrt(mean(residual_i^2) + eps).
 * Equals backend add(residual, residual, delta) then rmsnorm_fwd(out, rstd, residual, w), in one pass. */
int st_cuda_residual_rmsnorm_fwd(float *residual, float *out, float *rstd, const float *delta, const float *w,
                                 int n, int c, float eps);

/* Tensor-core causal GQA attention (kernels/cuda/attention_tc.cu; UNVERIFIED: never run): the contract of
 * the table's attention_fwd / attention_bwd with bf16 operands and fp32 accumulation, head_dim 64 or 128
 * (else ST_EINVAL). The table uses it only with SHARDTUNE_CUDA_ATTN=tc; these entry points are for
 * gpu_check, which compares them with the CPU twin at a bf16 tolerance. */
int st_cuda_attention_tc_fwd(float *out, float *lse, const float *qkv, int b, int t, int h, int kvh, int hd);
int st_cuda_attention_tc_bwd(float *dqkv, const float *dout, const float *qkv, const float *out, const float *lse,
                             int b, int t, int h, int kvh, int hd);

#ifdef __cplusplus
}
#endif
#endif
