/* cross_entropy.cu — fused softmax cross-entropy: one block per row of logits[N,V].
 *
 * Each block finds the row max and sum of exponentials (fixed-tree block reductions), writes the
 * row loss, then overwrites the logits row in place with weight * (softmax - onehot). The weighted
 * row losses go to the backend scratch as doubles and are summed by the deterministic two-stage
 * reduction, so the returned total is reproducible. A weight-0 row is zeroed and its target never read.
 * An out-of-range target zeroes its row and is reported (sticky error) naming the first bad row. */
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
    /* layout: [bad_row int, padded to 8][row_loss n doubles][reduction scratch] */
    int *bad_row = (int *)scratch;
    double *row_loss = (double *)(scratch + sizeof(double));
    double *reduce = row_loss + n;
    cudaStream_t st = st_cuda_stream_internal();
    ST_CUDA_CK("cross_entropy (flag)", cudaMemsetAsync(bad_row, 0x7f, sizeof(int), st)); /* > any row */
    cross_entropy_kernel<<<n, ST_CUDA_THREADS, 0, st>>>(logits, loss, row_loss, bad_row, target, weight, v);
    ST_CUDA_LAUNCHED("cross_entropy");
    double total = st_cuda_sum_doubles(row_loss, (size_t)n, reduce);
    int first_bad = 0;
    ST_CUDA_CK("cross_entropy (flag fetch)",
               cudaMemcpyAsync(&first_bad, bad_row, sizeof(int), cudaMemcpyDeviceToHost, st));
    ST_CUDA_CK("cross_entropy (flag sync)", cudaStreamSynchronize(st));
    if (first_bad >= 0 && first_bad < n) {
        char msg[128];
        snprintf(msg, sizeof msg, "target of row %d is outside the vocabulary [0, %d)", first_bad, v);
        st_cuda_note("cross_entropy", msg);
    }
    return total;
}
