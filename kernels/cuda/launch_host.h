/* launch_host.h — host-side launch geometry and scratch sizing for the CUDA kernels.
 *
 * Plain C (no CUDA headers), built into the CPU library too, so the numbers that decide grid sizes,
 * shared memory and scratch use are unit-tested on machines without a GPU (tests/unit/test_cuda_host.c).
 * Every function is pure: same shape in, same geometry out. That is what makes the GPU reductions
 * deterministic: the partition of work into blocks depends only on the shape, never on the device. */
#ifndef ST_CUDA_LAUNCH_HOST_H
#define ST_CUDA_LAUNCH_HOST_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

enum {
    ST_CUDA_THREADS = 256,            /* default block size for elementwise and row kernels */
    ST_CUDA_MAX_GRID = 4096,          /* cap for grid-stride elementwise kernels */
    ST_CUDA_REDUCE_BLOCKS = 256,      /* max partial blocks of a deterministic full reduction */
    ST_CUDA_COLSUM_MAX_PARTIALS = 256,/* max row chunks (partial rows) of a column-sum reduction */
    ST_CUDA_COLSUM_MIN_ROWS = 16,     /* fewest rows a partial-sum block handles (less is overhead) */
    ST_CUDA_ATTN_MAX_HD = 128,        /* head_dim limit of the attention kernels (4 values per lane) */
    ST_CUDA_ATTN_ROWS = 8,            /* query (fwd, dq) or key (dk/dv) rows per block: one warp each */
    ST_CUDA_ATTN_TILE = 32,           /* keys (fwd, dq) or queries (dk/dv) per shared-memory tile */
    ST_CUDA_SMEM_LIMIT = 48 * 1024,   /* dynamic shared memory usable without an opt-in attribute */
    ST_CUDA_EMB_VOCAB_SPLIT = 8,      /* embedding bwd: token-id residue classes handled in parallel */
    ST_CUDA_MT_MAX_TENSORS = 24,      /* tensors per launch of the multi-tensor AdamW */
};

/* Blocks for a grid-stride loop over n elements (at least 1, at most ST_CUDA_MAX_GRID). */
int st_cuda_grid_1d(size_t n, int threads);

/* Partial blocks of a deterministic full reduction (sumsq, loss sum) over n elements. */
int st_cuda_reduce_blocks(size_t n);

/* Row chunks of a column-sum reduction over rows [n, c] (bias and norm weight gradients), so that the
 * partial rows fit in `scratch_floats` floats with `arrays` partial arrays (layernorm: 2, dw and db).
 * Returns the chunk count (>= 1), or 0 when even one partial row per array does not fit. */
int st_cuda_colsum_partials(int n, int c, int arrays, size_t scratch_floats);
/* Rows each of `partials` chunks covers (the last may be shorter). */
int st_cuda_colsum_rows_per_chunk(int n, int partials);

/* Attention: dynamic shared memory (bytes) of the forward / dq kernel and of the dk/dv kernel for a
 * head_dim; and whether a shape is supported (0) or not (ST_EINVAL/ST_ESHAPE with st_error() set). */
size_t st_cuda_attn_fwd_smem(int hd);
size_t st_cuda_attn_bwd_kv_smem(int hd);
int st_cuda_attn_check(int b, int t, int h, int kvh, int hd);
/* Scratch floats attention_bwd needs (the per-row dot(dout, out) term D[B,H,T]). */
size_t st_cuda_attn_bwd_scratch_floats(int b, int t, int h);

/* Scratch bytes of the cross-entropy reduction over n rows: n doubles (weighted row losses),
 * the partial sums and one int flag for an out-of-range target. */
size_t st_cuda_xent_scratch_bytes(int n);

/* Launches (groups of at most ST_CUDA_MT_MAX_TENSORS) the multi-tensor AdamW needs for `count` tensors. */
int st_cuda_mt_launches(int count);

/* The device a rank uses: it is rank `local_rank` of the `local_size` ranks on its node and sees
 * `visible` devices. One visible device (the launcher bound one GPU per task, e.g. srun --gpus-per-task=1
 * or CUDA_VISIBLE_DEVICES per rank): device 0. Otherwise the node's ranks take devices 0..local_size-1,
 * one each, because NCCL refuses two ranks on one GPU: more ranks than devices is ST_EDEVICE with a line
 * saying so. Returns 0 and sets *device, or ST_EDEVICE / ST_EINVAL with st_error() set. */
int st_cuda_pick_device(int local_rank, int local_size, int visible, int *device);

/* Two node-local ranks on one GPU (NCCL rejects that): ids holds n device UUIDs of 16 bytes, one per
 * node-local rank. Returns 1 and the first pair (*a < *b) with equal ids, else 0. */
int st_cuda_shared_device(const unsigned char *ids, int n, int *a, int *b);

#ifdef __cplusplus
}
#endif
#endif
