/* cross_entropy.cu — fused softmax cross-entropy: one block per row of logits[N,V].
 *
 * Each block finds the row max and sum of exponentials (fixed-tree block reductions), writes the
 * row loss, then overwrites the logits row in place with weight * (softmax - onehot). The weighted
 * row losses go to the backend scratch as doubles and are summed by the deterministic two-stage
 * reduction, so the returned total is reproducible. A weight-0 row is zeroed and its target never read.
 * An out-of-range target zeroes its row and is recorded in the backend's flag (st_cuda_bad_target_flag),
 * which status() reports at the step boundary: no extra host synchronization per call. */
#include "kernels/cuda/cuda_ops.cuh"

#include <stdio.h>

__global__ void cross_entropy_kernel(float *logits, float *loss, double *row_loss, int *bad_row,
                                     const int32_t *target, const float *weight, int v) {
    __shared__ float sh[32];
    int row = blockIdx.x;
    float *x = logits + (size_t)row * v;
    float w = weight ? weight[row] : 1.0f;
    int tgt = w != 0.0f ? target[row] : -1;
    bool bad = w != 0.0f && (tgt < 0 || tgt >= v);
    if (w == 0.0f || bad) { /* block-uniform branch */
        for (int j = threadIdx.x; j < v; j += blockDim.x) x[j] = 0.0f;
        if (threadIdx.x == 0) {
            if (loss) loss[row] = 0.0f;
            row_loss[row] = 0.0;
            if (bad) atomicMin(bad_row, row); /* integer min: order-independent */
        }
        return;
    }
    float mx = -INFINITY;
    for (int j = threadIdx.x; j < v; j += blockDim.x) mx = fmaxf(mx, x[j]);
    mx = st_block_max(mx, sh);
    float s = 0.0f;
    for (int j = threadIdx.x; j < v; j += blockDim.x) s += expf(x[j] - mx);
    float x_tgt = x[tgt]; /* read before any thread overwrites the row (st_block_sum syncs) */
    s = st_block_sum(s, sh);
    float row_l = mx + logf(s) - x_tgt;
    float inv_s = 1.0f / s;
    for (int j = threadIdx.x; j < v; j += blockDim.x) {
        float p = expf(x[j] - mx) * inv_s;
        x[j] = w * (p - (j == tgt ? 1.0f : 0.0f));
    }
    if (threadIdx.x == 0) {
        if (loss) loss[row] = row_l;
        row_loss[row] = (double)w * (double)row_l;
    }
}

double st_cu_cross_entropy(float *logits, float *loss, const int32_t *target, const float *weight, int n, int v) {
    if (n <= 0 || v <= 0) return 0.0;
    size_t scratch_bytes;
    char *scratch = (char *)st_cuda_scratch(&scratch_bytes);
    if (st_cuda_xent_scratch_bytes(n) > scratch_bytes) {
        char msg[160];
        snprintf(msg, sizeof msg, "%d rows need %zu bytes of scratch, have %zu (raise SHARDTUNE_CUDA_SCRATCH_MB)",
                 n, st_cuda_xent_scratch_bytes(n), scratch_bytes);
        st_cuda_note("cross_entropy", msg);
        return 0.0;
    }
    /* layout: [unused, 8 bytes][row_loss n doubles][reduction scratch] */
    int *bad_row = st_cuda_bad_target_flag(v);
    double *row_loss = (double *)(scratch + sizeof(double));
    double *reduce = row_loss + n;
    cudaStream_t st = st_cuda_stream_internal();
    cross_entropy_kernel<<<n, ST_CUDA_THREADS, 0, st>>>(logits, loss, row_loss, bad_row, target, weight, v);
    ST_CUDA_LAUNCHED("cross_entropy");
    /* the one host wait of a call: the returned total (kernels.h returns it as a double) */
    return st_cuda_sum_doubles(row_loss, (size_t)n, reduce);
}
