/* launch_host.c — launch geometry and scratch sizing for the CUDA kernels (see launch_host.h). */
#include "kernels/cuda/launch_host.h"
#include "common/error.h"

#include <string.h>

static size_t ceil_div(size_t a, size_t b) { return (a + b - 1) / b; }

int st_cuda_grid_1d(size_t n, int threads) {
    if (threads <= 0) threads = ST_CUDA_THREADS;
    size_t blocks = ceil_div(n, (size_t)threads);
    if (blocks < 1) blocks = 1;
    if (blocks > ST_CUDA_MAX_GRID) blocks = ST_CUDA_MAX_GRID;
    return (int)blocks;
}

int st_cuda_reduce_blocks(size_t n) {
    /* each thread of a partial block sums at least 4 elements before the tree */
    size_t blocks = ceil_div(n, (size_t)ST_CUDA_THREADS * 4);
    if (blocks < 1) blocks = 1;
    if (blocks > ST_CUDA_REDUCE_BLOCKS) blocks = ST_CUDA_REDUCE_BLOCKS;
    return (int)blocks;
}

int st_cuda_colsum_partials(int n, int c, int arrays, size_t scratch_floats) {
    if (n <= 0 || c <= 0 || arrays <= 0) return 1;
    size_t per_partial = (size_t)c * (size_t)arrays;
    size_t fit = scratch_floats / per_partial;
    if (fit == 0) return 0;
    size_t want = ceil_div((size_t)n, ST_CUDA_COLSUM_MIN_ROWS);
    if (want > ST_CUDA_COLSUM_MAX_PARTIALS) want = ST_CUDA_COLSUM_MAX_PARTIALS;
    if (want > fit) want = fit;
    if (want < 1) want = 1;
    return (int)want;
}

int st_cuda_colsum_rows_per_chunk(int n, int partials) {
    if (partials <= 0 || n <= 0) return n > 0 ? n : 0;
    return (int)ceil_div((size_t)n, (size_t)partials);
}

/* Row stride of a [tile][hd] shared array: hd + 1 so that lane j reading row j hits distinct banks. */
static size_t padded(int hd) { return (size_t)hd + 1; }

size_t st_cuda_attn_fwd_smem(int hd) {
    /* K and V tiles (padded) + one q row, one dout row and one probability row per warp */
    return sizeof(float) * (2 * ST_CUDA_ATTN_TILE * padded(hd) +
                            ST_CUDA_ATTN_ROWS * (2 * (size_t)hd + ST_CUDA_ATTN_TILE));
}

size_t st_cuda_attn_bwd_kv_smem(int hd) {
    /* Q and dout tiles (padded) + lse and D of the tile + one k row, one v row and two coefficient rows
     * (probabilities, score gradients) per warp */
    return sizeof(float) * (2 * ST_CUDA_ATTN_TILE * padded(hd) + 2 * ST_CUDA_ATTN_TILE +
                            ST_CUDA_ATTN_ROWS * (2 * (size_t)hd + 2 * ST_CUDA_ATTN_TILE));
}

int st_cuda_attn_check(int b, int t, int h, int kvh, int hd) {
    if (b <= 0 || t <= 0 || h <= 0 || kvh <= 0 || hd <= 0)
        return st_fail(ST_EINVAL, "attention: non-positive shape b=%d t=%d h=%d kvh=%d hd=%d", b, t, h, kvh, hd);
    if (h % kvh != 0)
        return st_fail(ST_ESHAPE, "attention: %d query heads not a multiple of %d kv heads", h, kvh);
    if (hd > ST_CUDA_ATTN_MAX_HD)
        return st_fail(ST_ESHAPE, "attention: head_dim %d > %d, the CUDA kernels' limit", hd, ST_CUDA_ATTN_MAX_HD);
    if (st_cuda_attn_fwd_smem(hd) > ST_CUDA_SMEM_LIMIT || st_cuda_attn_bwd_kv_smem(hd) > ST_CUDA_SMEM_LIMIT)
        return st_fail(ST_ESHAPE, "attention: head_dim %d needs more than %d bytes of shared memory", hd,
                       ST_CUDA_SMEM_LIMIT);
    return 0;
}

size_t st_cuda_attn_bwd_scratch_floats(int b, int t, int h) {
    if (b <= 0 || t <= 0 || h <= 0) return 0;
    return (size_t)b * (size_t)t * (size_t)h;
}

size_t st_cuda_xent_scratch_bytes(int n) {
    if (n < 0) n = 0;
    return sizeof(double) * ((size_t)n + ST_CUDA_REDUCE_BLOCKS + 1) + sizeof(int) * 2;
}

int st_cuda_mt_launches(int count) {
    if (count <= 0) return 0;
    return (int)ceil_div((size_t)count, ST_CUDA_MT_MAX_TENSORS);
}

int st_cuda_pick_device(int local_rank, int local_size, int visible, int *device) {
    if (local_rank < 0 || local_size < 1 || local_rank >= local_size)
        return st_fail(ST_EINVAL, "node-local rank %d of %d is not a valid placement", local_rank, local_size);
    if (visible < 1) return st_fail(ST_EDEVICE, "no CUDA device visible to node-local rank %d", local_rank);
    if (visible == 1) {
        *device = 0;
        return 0;
    }
    if (local_size > visible)
        return st_fail(ST_EDEVICE, "%d ranks on this node but only %d CUDA devices visible: run at most %d "
                                   "ranks per node (one GPU per rank)", local_size, visible, visible);
    *device = local_rank;
    return 0;
}

int st_cuda_shared_device(const unsigned char *ids, int n, int *a, int *b) {
    for (int i = 0; i < n; i++)
        for (int j = i + 1; j < n; j++)
            if (memcmp(ids + 16 * (size_t)i, ids + 16 * (size_t)j, 16) == 0) {
                *a = i;
                *b = j;
                return 1;
            }
    return 0;
}
