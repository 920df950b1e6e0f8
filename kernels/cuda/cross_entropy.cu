/* cross_entropy.cu — fused softmax cross-entropy: one block per row of logits[N,V].
 *
 * Each block finds the row max and sum of exponentials (fixed-tree block reductions), writes the
 * row loss, then overwrites the logits row in place with weight * (softmax - onehot). The weighted
 * row losses go to the backend scratch as doubles and are summed by the deterministic two-stage
 * reduction, so the returned total is reproducible. A weight-0 row is zeroed and its target never read.
 * An out-of-range target zeroes its row and is recorded in the backend's flag (st_cuda_bad_target_flag),
 * which status() reports at the step boundary: no extra host synchronization per call.
 *
 * The LM head's forms never wait for the host: cross_entropy_acc adds the chunk's total to a device double
 * (the model reads it once after its last chunk) and, under bf16, writes dlogits as bf16 bits in the same
 * pass (rounded once, the operand of both head GEMMs). kd_loss is the fused knowledge-distillation row
 * (kernels/cpu/cpu_kd.c is its twin): one block per row, exponentials in fp32 and everything summed in double,
 * exponentials recomputed per pass instead of stored; row parts summed by the same deterministic reduction into device doubles.
 * xent_block_* are cross_entropy_acc by vocabulary blocks (kernels/cpu/cpu_loss.c is their twin): the row's max
 * and sum of exponentials carried from block to block (one block per row, the block's exponentials taken against
 * the new max and the sum so far rescaled), the loss once after the last block, then each block's dlogits from
 * the final statistics (one thread per element). */
#include "kernels/cuda/cuda_ops.cuh"

#include <stdio.h>

__global__ void cross_entropy_kernel(float *logits, uint16_t *dl16, float *loss, double *row_loss, int *bad_row,
                                     const int32_t *target, const float *weight, int v) {
    __shared__ float sh[32];
    int row = blockIdx.x;
    float *x = logits + (size_t)row * v;
    float w = weight ? weight[row] : 1.0f;
    int tgt = w != 0.0f ? target[row] : -1;
    bool bad = w != 0.0f && (tgt < 0 || tgt >= v);
    uint16_t *d16 = dl16 ? dl16 + (size_t)row * v : NULL;
    if (w == 0.0f || bad) { /* block-uniform branch */
        for (int j = threadIdx.x; j < v; j += blockDim.x) {
            if (d16) d16[j] = 0;
            else x[j] = 0.0f;
        }
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
        float d = w * (p - (j == tgt ? 1.0f : 0.0f));
        if (d16) d16[j] = st_bf16_bits_rn(d); /* the one rounding of dlogits */
        else x[j] = d;
    }
    if (threadIdx.x == 0) {
        if (loss) loss[row] = row_l;
        row_loss[row] = (double)w * (double)row_l;
    }
}

/* Checks the scratch holds `per_row` doubles per row plus the reduction's; NULL (noted) when not. */
static double *xent_scratch(const char *what, int n, int per_row) {
    size_t scratch_bytes;
    char *scratch = (char *)st_cuda_scratch(&scratch_bytes);
    size_t need = st_cuda_xent_scratch_bytes(per_row * n);
    if (need > scratch_bytes) {
        char msg[160];
        snprintf(msg, sizeof msg, "%d rows need %zu bytes of scratch, have %zu (raise SHARDTUNE_CUDA_SCRATCH_MB)", n,
                 need, scratch_bytes);
        st_cuda_note(what, msg);
        return NULL;
    }
    return (double *)(scratch + sizeof(double)); /* layout: [unused, 8 bytes][row values][reduction scratch] */
}

double st_cu_cross_entropy(float *logits, float *loss, const int32_t *target, const float *weight, int n, int v) {
    if (n <= 0 || v <= 0) return 0.0;
    double *row_loss = xent_scratch("cross_entropy", n, 1);
    if (!row_loss) return 0.0;
    int *bad_row = st_cuda_bad_target_flag(v);
    double *reduce = row_loss + n;
    cudaStream_t st = st_cuda_stream_internal();
    cross_entropy_kernel<<<n, ST_CUDA_THREADS, 0, st>>>(logits, NULL, loss, row_loss, bad_row, target, weight, v);
    ST_CUDA_LAUNCHED("cross_entropy");
    /* the one host wait of a call: the returned total (kernels.h returns it as a double) */
    return st_cuda_sum_doubles(row_loss, (size_t)n, reduce);
}

void st_cu_cross_entropy_acc(float *logits, uint16_t *dlogits_bf16, float *loss, const int32_t *target,
                             const float *weight, int n, int v, double *total) {
    if (n <= 0 || v <= 0) return;
    double *row_loss = xent_scratch("cross_entropy", n, 1);
    if (!row_loss) return;
    int *bad_row = st_cuda_bad_target_flag(v);
    cudaStream_t st = st_cuda_stream_internal();
    cross_entropy_kernel<<<n, ST_CUDA_THREADS, 0, st>>>(logits, dlogits_bf16, loss, row_loss, bad_row, target,
                                                        weight, v);
    ST_CUDA_LAUNCHED("cross_entropy");
    st_cuda_add_sum_doubles(total, row_loss, (size_t)n, row_loss + n); /* stays on the device */
}

/* One row of the distillation loss (kernels/cpu/cpu_kd.c kd_row, the same arithmetic: x/T and the
 * exponentials in fp32, sums, logs, probabilities, KL and the gradient in double; the exponentials are
 * recomputed per pass instead of stored). The row's weighted parts go to rows[row] (w * loss),
 * rows[n + row] (w * kd), rows[2n + row] (w * ce). */
__global__ void kd_kernel(float *s_logits, uint16_t *dl16, const float *t_logits, float *loss, double *rows,
                          int *bad_row, const int32_t *target, const float *weight, int n, int v, float temp,
                          double alpha) {
    __shared__ float shf[32];
    __shared__ double shd[32];
    int row = blockIdx.x;
    float *s = s_logits + (size_t)row * v;
    const float *t = t_logits + (size_t)row * v;
    uint16_t *d16 = dl16 ? dl16 + (size_t)row * v : NULL;
    double w = weight[row];
    int y = w != 0.0 ? target[row] : -1;
    bool bad = w != 0.0 && (y < 0 || y >= v);
    if (w == 0.0) { /* block-uniform branch */
        for (int j = threadIdx.x; j < v; j += blockDim.x) {
            if (d16) d16[j] = 0;
            else s[j] = 0.0f;
        }
        if (threadIdx.x == 0) {
            loss[row] = 0.0f;
            rows[row] = rows[n + row] = rows[2 * (size_t)n + row] = 0.0;
        }
        return;
    }
    const float inv_t = 1.0f / temp;
    float tx = -INFINITY, sx = -INFINITY;
    for (int j = threadIdx.x; j < v; j += blockDim.x) tx = fmaxf(tx, t[j]), sx = fmaxf(sx, s[j]);
    tx = st_block_max(tx, shf);
    sx = st_block_max(sx, shf);
    /* rounding is monotonic, so max(x) / T rounded is the max of the rounded x / T (the twin's rule) */
    const float mt = tx * inv_t, mq = sx * inv_t, m1 = sx;
    double zt = 0, zq = 0, z1 = 0;
    for (int j = threadIdx.x; j < v; j += blockDim.x) {
        zt += expf(t[j] * inv_t - mt);
        zq += expf(s[j] * inv_t - mq);
        z1 += expf(s[j] - m1);
    }
    double s_y = bad ? 0.0 : (double)s[y]; /* read before any thread overwrites the row (the sums sync) */
    zt = st_block_sum(zt, shd);
    zq = st_block_sum(zq, shd);
    z1 = st_block_sum(z1, shd);
    const double lt = mt + log(zt), lq = mq + log(zq), l1 = m1 + log(z1);
    const double rt = 1.0 / zt, rq = 1.0 / zq, r1 = 1.0 / z1, T = temp;
    double kl = 0;
    for (int j = threadIdx.x; j < v; j += blockDim.x) {
        float tj = t[j] * inv_t, sq = s[j] * inv_t, sj = s[j];
        double p = expf(tj - mt) * rt, q = expf(sq - mq) * rq, sm = expf(sj - m1) * r1;
        if (p > 0) kl += p * (((double)tj - lt) - ((double)sq - lq));
        float d = (float)(w * (alpha * T * (q - p) + (1 - alpha) * (sm - (j == y))));
        if (d16) d16[j] = st_bf16_bits_rn(d);
        else s[j] = d;
    }
    kl = st_block_sum(kl, shd);
    if (threadIdx.x == 0) {
        double kd = T * T * kl, ce = bad ? (double)NAN : l1 - s_y;
        double l = alpha * kd + (1 - alpha) * ce;
        loss[row] = (float)l;
        rows[row] = w * l;
        rows[n + row] = w * kd;
        rows[2 * (size_t)n + row] = w * ce;
        if (bad) atomicMin(bad_row, row);
    }
}

void st_cu_kd_loss(float *s_logits, uint16_t *dlogits_bf16, const float *t_logits, float *loss, const int32_t *target,
                   const float *weight, int n, int v, float temperature, float alpha, double *total, double *parts) {
    if (n <= 0 || v <= 0) return;
    double *rows = xent_scratch("kd_loss", n, 3);
    if (!rows) return;
    int *bad_row = st_cuda_bad_target_flag(v);
    cudaStream_t st = st_cuda_stream_internal();
    kd_kernel<<<n, ST_CUDA_THREADS, 0, st>>>(s_logits, dlogits_bf16, t_logits, loss, rows, bad_row, target, weight, n,
                                             v, temperature, alpha);
    ST_CUDA_LAUNCHED("kd_loss");
    double *reduce = rows + 3 * (size_t)n;
    st_cuda_add_sum_doubles(total, rows, (size_t)n, reduce);
    st_cuda_add_sum_doubles(parts, rows + n, (size_t)n, reduce);
    st_cuda_add_sum_doubles(parts + 1, rows + 2 * (size_t)n, (size_t)n, reduce);
}

/* One row of a vocabulary block folded into its statistics (stats[row]: max, sum, target logit). */
__global__ void xent_block_stats_kernel(const float *logits, float *stats, const int32_t *target, const float *weight,
                                        int nv, int j0) {
    __shared__ float sh[32];
    int row = blockIdx.x;
    if (weight[row] == 0.0f) return; /* block-uniform: the target is never read */
    const float *x = logits + (size_t)row * nv;
    float *s = stats + 3 * (size_t)row;
    float bm = -INFINITY;
    for (int j = threadIdx.x; j < nv; j += blockDim.x) bm = fmaxf(bm, x[j]);
    bm = st_block_max(bm, sh);
    float m0 = j0 == 0 ? bm : s[0], mx = fmaxf(m0, bm);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < nv; j += blockDim.x) sum += expf(x[j] - mx);
    sum = st_block_sum(sum, sh);
    if (threadIdx.x == 0) {
        float before = j0 == 0 ? 0.0f : s[1] * expf(m0 - mx);
        int t = target[row] - j0;
        s[0] = mx;
        s[1] = before + sum;
        if (j0 == 0) s[2] = 0.0f;
        if (t >= 0 && t < nv) s[2] = x[t];
    }
}

/* Each row's loss from its final statistics; the weighted loss to row_loss (a bad target: 0, flagged). */
__global__ void xent_block_loss_kernel(const float *stats, float *loss, double *row_loss, int *bad_row,
                                       const int32_t *target, const float *weight, int n, int v) {
    int row = blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= n) return;
    float w = weight[row];
    int tgt = w != 0.0f ? target[row] : -1;
    bool bad = w != 0.0f && (tgt < 0 || tgt >= v);
    const float *s = stats + 3 * (size_t)row;
    float l = w == 0.0f || bad ? 0.0f : s[0] + logf(s[1]) - s[2];
    loss[row] = l;
    row_loss[row] = (double)w * (double)l;
    if (bad) atomicMin(bad_row, row);
}

/* One element of a block's dlogits from its row's final statistics (an out-of-range target: weight * softmax, as
 * the twin; the loss kernel has flagged it). */
__global__ void xent_block_grad_kernel(float *logits, uint16_t *dl16, const float *stats, const int32_t *target,
                                       const float *weight, int n, int nv, int j0) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)n * nv) return;
    int row = (int)(i / nv), j = (int)(i % nv);
    float w = weight[row], d = 0.0f;
    if (w != 0.0f) {
        const float *s = stats + 3 * (size_t)row;
        d = expf(logits[i] - s[0]) * (w / s[1]);
        if (j0 + j == target[row]) d -= w;
    }
    if (dl16) dl16[i] = st_bf16_bits_rn(d); /* the one rounding of dlogits */
    else logits[i] = d;
}

void st_cu_xent_block_stats(const float *logits, float *stats, const int32_t *target, const float *weight, int n,
                            int nv, int j0) {
    if (n <= 0 || nv <= 0) return;
    xent_block_stats_kernel<<<n, ST_CUDA_THREADS, 0, st_cuda_stream_internal()>>>(logits, stats, target, weight, nv,
                                                                                   j0);
    ST_CUDA_LAUNCHED("xent_block_stats");
}

void st_cu_xent_block_loss(const float *stats, float *loss, const int32_t *target, const float *weight, int n, int v,
                           double *total) {
    if (n <= 0 || v <= 0) return;
    double *row_loss = xent_scratch("xent_block_loss", n, 1);
    if (!row_loss) return;
    int *bad_row = st_cuda_bad_target_flag(v);
    cudaStream_t st = st_cuda_stream_internal();
    xent_block_loss_kernel<<<(n + ST_CUDA_THREADS - 1) / ST_CUDA_THREADS, ST_CUDA_THREADS, 0, st>>>(
        stats, loss, row_loss, bad_row, target, weight, n, v);
    ST_CUDA_LAUNCHED("xent_block_loss");
    st_cuda_add_sum_doubles(total, row_loss, (size_t)n, row_loss + n); /* stays on the device */
}

void st_cu_xent_block_grad(float *logits, uint16_t *dlogits_bf16, const float *stats, const int32_t *target,
                           const float *weight, int n, int nv, int j0) {
    if (n <= 0 || nv <= 0) return;
    size_t total = (size_t)n * (size_t)nv;
    unsigned blocks = (unsigned)((total + ST_CUDA_THREADS - 1) / ST_CUDA_THREADS);
    xent_block_grad_kernel<<<blocks, ST_CUDA_THREADS, 0, st_cuda_stream_internal()>>>(logits, dlogits_bf16, stats,
                                                                                       target, weight, n, nv, j0);
    ST_CUDA_LAUNCHED("xent_block_grad");
}
