/* norms.cu — LayerNorm and RMSNorm forward/backward, and the fused residual-add + RMSNorm forward.
 *
 * Forward: one block per row; the row statistics are block reductions with a fixed tree.
 * Backward: one kernel per direction. Each block walks a contiguous chunk of rows (geometry from
 * launch_host.c, fixed by the shape), adds dx in place and keeps its own partial row of dw (and db) in
 * the backend scratch; a second kernel folds the partial rows in order into dw/db. No float atomics,
 * so gradients are bitwise reproducible run to run. */
#include "kernels/cuda/cuda_ops.cuh"
#include "kernels/cuda/cuda_extras.h"

/* ---------------------------------------------------------------- forward */

__global__ void layernorm_fwd_kernel(float *out, float *mean, float *rstd, const float *x, const float *w,
                                     const float *b, int c, float eps) {
    __shared__ float sh[32];
    size_t row = blockIdx.x;
    const float *xr = x + row * c;
    float *outr = out + row * c;
    float s = 0.0f;
    for (int j = threadIdx.x; j < c; j += blockDim.x) s += xr[j];
    float mu = st_block_sum(s, sh) / c;
    float v = 0.0f;
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        float d = xr[j] - mu;
        v += d * d;
    }
    float var = st_block_sum(v, sh) / c;
    float rs = 1.0f / sqrtf(var + eps);
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        float o = (xr[j] - mu) * rs * w[j];
        outr[j] = b ? o + b[j] : o;
    }
    if (threadIdx.x == 0) {
        mean[row] = mu;
        rstd[row] = rs;
    }
}

/* residual (when delta != NULL) is updated in place first: each thread rereads only what it wrote. */
__global__ void rmsnorm_fwd_kernel(float *out, float *rstd, float *x, const float *delta, const float *w, int c,
                                   float eps) {
    __shared__ float sh[32];
    size_t row = blockIdx.x;
    float *xr = x + row * c;
    float *outr = out + row * c;
    float s = 0.0f;
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        float xv = xr[j];
        if (delta) {
            xv += delta[row * c + j];
            xr[j] = xv;
        }
        s += xv * xv;
    }
    float ms = st_block_sum(s, sh) / c;
    float rs = 1.0f / sqrtf(ms + eps);
    for (int j = threadIdx.x; j < c; j += blockDim.x) outr[j] = xr[j] * rs * w[j];
    if (threadIdx.x == 0) rstd[row] = rs;
}

void st_cu_layernorm_fwd(float *out, float *mean, float *rstd, const float *x, const float *w, const float *b,
                         int n, int c, float eps) {
    if (n <= 0 || c <= 0) return;
    layernorm_fwd_kernel<<<n, ST_CUDA_THREADS, 0, st_cuda_stream_internal()>>>(out, mean, rstd, x, w, b, c, eps);
    ST_CUDA_LAUNCHED("layernorm_fwd");
}

void st_cu_rmsnorm_fwd(float *out, float *rstd, const float *x, const float *w, int n, int c, float eps) {
    if (n <= 0 || c <= 0) return;
    /* x is only read when delta is NULL; the cast lets both entry points share one kernel */
    rmsnorm_fwd_kernel<<<n, ST_CUDA_THREADS, 0, st_cuda_stream_internal()>>>(out, rstd, (float *)x, NULL, w, c,
                                                                              eps);
    ST_CUDA_LAUNCHED("rmsnorm_fwd");
}

extern "C" int st_cuda_residual_rmsnorm_fwd(float *residual, float *out, float *rstd, const float *delta,
                                            const float *w, int n, int c, float eps) {
    if (n < 0 || c < 0) return st_fail(ST_EINVAL, "residual_rmsnorm_fwd: negative shape n=%d c=%d", n, c);
    if (n == 0 || c == 0) return 0;
    if (!residual || !out || !rstd || !delta || !w)
        return st_fail(ST_EINVAL, "residual_rmsnorm_fwd: NULL buffer");
    rmsnorm_fwd_kernel<<<n, ST_CUDA_THREADS, 0, st_cuda_stream_internal()>>>(out, rstd, residual, delta, w, c, eps);
    ST_CUDA_LAUNCHED("residual_rmsnorm_fwd");
    return 0;
}

/* ---------------------------------------------------------------- backward */

/* One kernel for both norms: mean == NULL means RMSNorm (no centering, no db). Block `blockIdx.x` owns
 * rows [r0, r1) and partial rows pdw[blockIdx.x], pdb[blockIdx.x]; thread j owns the same columns for
 * every row, so its partial updates need no synchronization. */
__global__ void norm_bwd_kernel(float *dx, float *pdw, float *pdb, const float *dout, const float *x,
                                const float *w, const float *mean, const float *rstd, int n, int c,
                                int rows_per_chunk) {
    __shared__ float sh[32];
    int r0 = blockIdx.x * rows_per_chunk, r1 = min(n, r0 + rows_per_chunk);
    float *my_dw = pdw + (size_t)blockIdx.x * c;
    float *my_db = pdb ? pdb + (size_t)blockIdx.x * c : NULL;
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        my_dw[j] = 0.0f;
        if (my_db) my_db[j] = 0.0f;
    }
    for (int row = r0; row < r1; row++) {
        const float *xr = x + (size_t)row * c, *dr = dout + (size_t)row * c;
        float *dxr = dx + (size_t)row * c;
        float mu = mean ? mean[row] : 0.0f, rs = rstd[row];
        float s_dn = 0.0f, s_dnx = 0.0f; /* sum(dnorm), sum(dnorm * xhat) */
        for (int j = threadIdx.x; j < c; j += blockDim.x) {
            float xhat = (xr[j] - mu) * rs, dn = dr[j] * w[j];
            s_dn += dn;
            s_dnx += dn * xhat;
        }
        float mean_dn = mean ? st_block_sum(s_dn, sh) / c : 0.0f;
        float mean_dnx = st_block_sum(s_dnx, sh) / c;
        for (int j = threadIdx.x; j < c; j += blockDim.x) {
            float xhat = (xr[j] - mu) * rs, dn = dr[j] * w[j];
            dxr[j] += rs * (dn - mean_dn - xhat * mean_dnx);
            my_dw[j] += dr[j] * xhat;
            if (my_db) my_db[j] += dr[j];
        }
    }
}

static void norm_bwd(const char *name, float *dx, float *dw, float *db, const float *dout, const float *x,
                     const float *w, const float *mean, const float *rstd, int n, int c) {
    if (n <= 0 || c <= 0) return;
    size_t scratch_bytes;
    float *scratch = (float *)st_cuda_scratch(&scratch_bytes);
    int arrays = db ? 2 : 1;
    int parts = st_cuda_colsum_partials(n, c, arrays, scratch_bytes / sizeof(float));
    if (parts == 0) { st_cuda_note(name, "scratch too small for one row of weight-gradient partials"); return; }
    int rpc = st_cuda_colsum_rows_per_chunk(n, parts);
    float *pdw = scratch, *pdb = db ? scratch + (size_t)parts * c : NULL;
    norm_bwd_kernel<<<parts, ST_CUDA_THREADS, 0, st_cuda_stream_internal()>>>(dx, pdw, pdb, dout, x, w, mean, rstd,
                                                                              n, c, rpc);
    ST_CUDA_LAUNCHED(name);
    st_cuda_colsum_finish(dw, pdw, parts, c);
    if (db) st_cuda_colsum_finish(db, pdb, parts, c);
}

void st_cu_layernorm_bwd(float *dx, float *dw, float *db, const float *dout, const float *x, const float *w,
                         const float *mean, const float *rstd, int n, int c) {
    norm_bwd("layernorm_bwd", dx, dw, db, dout, x, w, mean, rstd, n, c);
}

void st_cu_rmsnorm_bwd(float *dx, float *dw, const float *dout, const float *x, const float *w, const float *rstd,
                       int n, int c) {
    norm_bwd("rmsnorm_bwd", dx, dw, NULL, dout, x, w, NULL, rstd, n, c);
}
