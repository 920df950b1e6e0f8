/* backend_cuda.cu — the CUDA backend: device state, memory, matmul (cuBLASLt), elementwise kernels,
 * deterministic reductions, and the st_backend table.
 *
 * One process-wide state: the device chosen by the first st_backend_cuda() call, a non-blocking compute
 * stream, a cuBLASLt handle with its workspace, a scratch buffer for partial sums and a pinned host slot
 * for scalar results. All owned here and kept for the life of the process (a worker uses one device).
 * Every operation is queued on the compute stream; copies to the host and scalar-returning reductions
 * (sumsq, cross_entropy) synchronize that stream. */
#include "kernels/cuda/cuda_ops.cuh"
#include "kernels/cuda/cuda_extras.h"

#include <cublasLt.h>
#include <cuda_bf16.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------- state & errors */

enum { MATMUL_CACHE = 32 };

struct matmul_plan { /* cuBLASLt descriptors + algorithm for one (m, n, k, ta, tb, lda, ldb, align, type, epilogue) */
    int m, n, k, ta, tb, align, valid; /* align: bytes all pointers (and the bias) are aligned to (2..16) */
    int lda, ldb;                      /* row pitch (elements) of A's and B's memory: >= their row length */
    cudaDataType_t ab_type;            /* CUDA_R_32F (matmul) or CUDA_R_16BF (matmul_bf16) */
    int bias;                          /* 1: CUBLASLT_EPILOGUE_BIAS (fp32 bias, pointer set per call) */
    cublasLtMatmulDesc_t op;
    cublasLtMatrixLayout_t la, lb, lc;
    cublasLtMatmulAlgo_t algo;
};

static struct {
    int ready, device;
    cudaStream_t stream;
    cublasLtHandle_t lt;
    cublasComputeType_t compute; /* CUBLAS_COMPUTE_32F: exact fp32 (TF32 only if asked) */
    void *lt_workspace;
    size_t lt_workspace_bytes;
    void *scratch;
    size_t scratch_bytes;
    double *host_scalar; /* pinned */
    struct matmul_plan plans[MATMUL_CACHE];
    int next_plan;
    char error[512]; /* first sticky failure, "" if none */
    int sync_each;   /* SHARDTUNE_CUDA_SYNC=1: synchronize after every launch (names a faulting kernel) */
    int *bad_target; /* device: first cross-entropy row with an out-of-vocabulary target (INT_MAX: none) */
    int bad_target_v; /* the vocabulary size of the last cross_entropy call (for the message) */
    /* copy_to_device stages every copy through a ring of pinned slots (STAGE_SLOTS), so it returns without
     * waiting for the stream (the caller may reuse its buffer at once): a slot is reused after its event */
    void *stage[32];
    cudaEvent_t stage_done[32];
    int stage_next;
} g;

void st_cuda_note(const char *what, const char *msg) {
    if (g.error[0]) return; /* keep the first: later failures are usually consequences */
    snprintf(g.error, sizeof g.error, "CUDA %s: %s", what, msg);
}

void st_cuda_note_err(const char *what, cudaError_t err) { st_cuda_note(what, cudaGetErrorString(err)); }

extern "C" int st_cuda_status(void) {
    if (!g.error[0]) return 0;
    st_fail(ST_EDEVICE, "%s", g.error);
    g.error[0] = 0;
    return ST_EDEVICE;
}

cudaStream_t st_cuda_stream_internal(void) { return g.stream; }

extern "C" int st_cuda_device_uuid(unsigned char uuid[16]) {
    cudaDeviceProp prop;
    cudaError_t e = cudaGetDeviceProperties(&prop, g.device);
    if (e != cudaSuccess) return st_fail(ST_EDEVICE, "cudaGetDeviceProperties(%d): %s", g.device, cudaGetErrorString(e));
    memcpy(uuid, prop.uuid.bytes, 16);
    return 0;
}
extern "C" void *st_cuda_stream(void) { return (void *)g.stream; }

void *st_cuda_scratch(size_t *bytes) {
    *bytes = g.scratch_bytes;
    return g.scratch;
}

/* ---------------------------------------------------------------- memory */

static void *cu_alloc(size_t bytes) {
    void *p = NULL;
    if (bytes == 0) bytes = 1;
    if (cudaMalloc(&p, bytes) != cudaSuccess) {
        (void)cudaGetLastError(); /* an out-of-memory is reported by the NULL, not sticky */
        return NULL;
    }
    ST_CUDA_CK("alloc memset", cudaMemsetAsync(p, 0, bytes, g.stream));
    return p;
}

static void cu_free(void *p) {
    if (!p) return;
    ST_CUDA_CK("free (sync)", cudaStreamSynchronize(g.stream));
    ST_CUDA_CK("free", cudaFree(p));
}

static void cu_memset0(void *p, size_t bytes) { ST_CUDA_CK("memset0", cudaMemsetAsync(p, 0, bytes, g.stream)); }

enum { STAGE_SLOTS = 32, STAGE_BYTES = 1u << 20 };

/* The caller may reuse its host buffer as soon as we return, and we never wait for the stream as a whole:
 * every copy goes through a ring of pinned slots in pieces of at most STAGE_BYTES, each piece's slot reused
 * once its previous copy (STAGE_SLOTS pieces earlier) completed. A step's tokens, targets and loss weights
 * take a slot each, so the host only waits when the GPU is that many copies behind; a large copy (loading
 * weights) streams through the ring, the host's memcpy into one slot overlapping the DMA of the others. */
static void cu_copy_to_device(void *dst, const void *src, size_t bytes) {
    for (size_t off = 0; off < bytes; off += STAGE_BYTES) {
        size_t piece = bytes - off < (size_t)STAGE_BYTES ? bytes - off : (size_t)STAGE_BYTES;
        int i = g.stage_next;
        g.stage_next = (i + 1) % STAGE_SLOTS;
        ST_CUDA_CK("copy_to_device (slot)", cudaEventSynchronize(g.stage_done[i])); /* its last copy is done */
        memcpy(g.stage[i], (const char *)src + off, piece);
        ST_CUDA_CK("copy_to_device",
                   cudaMemcpyAsync((char *)dst + off, g.stage[i], piece, cudaMemcpyHostToDevice, g.stream));
        ST_CUDA_CK("copy_to_device (event)", cudaEventRecord(g.stage_done[i], g.stream));
    }
}

static void cu_copy_to_host(void *dst, const void *src, size_t bytes) {
    ST_CUDA_CK("copy_to_host", cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, g.stream));
    ST_CUDA_CK("copy_to_host (sync)", cudaStreamSynchronize(g.stream));
}

static void cu_copy(void *dst, const void *src, size_t bytes) {
    ST_CUDA_CK("copy", cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, g.stream));
}

static void cu_synchronize(void) { ST_CUDA_CK("synchronize", cudaStreamSynchronize(g.stream)); }

/* kernels.h `status`: an asynchronous fault (illegal address, a kernel trap) shows up at this
 * synchronization without a kernel name; SHARDTUNE_CUDA_SYNC=1 synchronizes after every launch so the
 * record names the kernel that faulted. */
static int cu_status(void) {
    int bad = ST_CUDA_NO_ROW;
    cudaError_t e = cudaMemcpyAsync(g.host_scalar, g.bad_target, sizeof(int), cudaMemcpyDeviceToHost, g.stream);
    if (e == cudaSuccess) e = cudaStreamSynchronize(g.stream);
    if (e != cudaSuccess)
        st_cuda_note("an earlier kernel (asynchronous fault; SHARDTUNE_CUDA_SYNC=1 names it)", cudaGetErrorString(e));
    else
        memcpy(&bad, g.host_scalar, sizeof bad);
    if (bad != ST_CUDA_NO_ROW) {
        char msg[160];
        snprintf(msg, sizeof msg, "the target of row %d of a chunk is outside the vocabulary [0, %d)", bad,
                 g.bad_target_v);
        st_cuda_note("cross_entropy", msg);
        ST_CUDA_CK("cross_entropy (flag reset)", cudaMemsetAsync(g.bad_target, 0x7f, sizeof(int), g.stream));
    }
    return st_cuda_status();
}

int *st_cuda_bad_target_flag(int v) {
    g.bad_target_v = v;
    return g.bad_target;
}

void st_cuda_launched(const char *what) {
    cudaError_t e = cudaGetLastError();
    if (e == cudaSuccess && g.sync_each) e = cudaStreamSynchronize(g.stream);
    if (e != cudaSuccess) st_cuda_note_err(what, e);
}

/* ---------------------------------------------------------------- elementwise */

__global__ void scale_kernel(float *x, float s, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        x[i] *= s;
}

static void cu_scale(float *x, float s, size_t n) {
    if (n == 0) return;
    scale_kernel<<<st_cuda_grid_1d(n, ST_CUDA_THREADS), ST_CUDA_THREADS, 0, g.stream>>>(x, s, n);
    ST_CUDA_LAUNCHED("scale");
}

/* ---------------------------------------------------------------- deterministic reductions */

/* Stage 1: block b sums elements b*T + tid, stepping by gridDim*T (a partition fixed by n), in double. */
__global__ void sumsq_partials_kernel(double *partial, const float *x, size_t n) {
    __shared__ double sh[32];
    double acc = 0.0;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        double v = (double)x[i];
        acc += v * v;
    }
    acc = st_block_sum(acc, sh);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

__global__ void sum_partials_kernel(double *partial, const double *x, size_t n) {
    __shared__ double sh[32];
    double acc = 0.0;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        acc += x[i];
    acc = st_block_sum(acc, sh);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

/* Stage 2: one block folds the partials in a fixed tree. */
__global__ void sum_final_kernel(double *result, const double *partial, int count) {
    __shared__ double sh[32];
    double acc = 0.0;
    for (int i = threadIdx.x; i < count; i += blockDim.x) acc += partial[i];
    acc = st_block_sum(acc, sh);
    if (threadIdx.x == 0) *result = acc;
}

__global__ void sum_final_add_kernel(double *acc, const double *partial, int count) {
    __shared__ double sh[32];
    double v = 0.0;
    for (int i = threadIdx.x; i < count; i += blockDim.x) v += partial[i];
    v = st_block_sum(v, sh);
    if (threadIdx.x == 0) *acc += v;
}

void st_cuda_add_sum_doubles(double *acc, const double *x, size_t n, double *scratch) {
    int blocks = st_cuda_reduce_blocks(n);
    sum_partials_kernel<<<blocks, ST_CUDA_THREADS, 0, g.stream>>>(scratch, x, n);
    sum_final_add_kernel<<<1, ST_CUDA_THREADS, 0, g.stream>>>(acc, scratch, blocks);
    ST_CUDA_LAUNCHED("sum (reduce, add)");
}

static double fetch_scalar(const double *dev, const char *what) {
    *g.host_scalar = 0.0;
    ST_CUDA_CK(what, cudaMemcpyAsync(g.host_scalar, dev, sizeof(double), cudaMemcpyDeviceToHost, g.stream));
    ST_CUDA_CK(what, cudaStreamSynchronize(g.stream));
    return *g.host_scalar;
}

double st_cuda_sum_doubles(const double *x, size_t n, double *scratch) {
    int blocks = st_cuda_reduce_blocks(n);
    sum_partials_kernel<<<blocks, ST_CUDA_THREADS, 0, g.stream>>>(scratch + 1, x, n);
    sum_final_kernel<<<1, ST_CUDA_THREADS, 0, g.stream>>>(scratch, scratch + 1, blocks);
    ST_CUDA_LAUNCHED("sum (reduce)");
    return fetch_scalar(scratch, "sum (fetch)");
}

static double cu_sumsq(const float *x, size_t n) {
    if (n == 0) return 0.0;
    double *scratch = (double *)g.scratch; /* [0] result, [1..blocks] partials */
    int blocks = st_cuda_reduce_blocks(n);
    sumsq_partials_kernel<<<blocks, ST_CUDA_THREADS, 0, g.stream>>>(scratch + 1, x, n);
    sum_final_kernel<<<1, ST_CUDA_THREADS, 0, g.stream>>>(scratch, scratch + 1, blocks);
    ST_CUDA_LAUNCHED("sumsq");
    return fetch_scalar(scratch, "sumsq (fetch)");
}

/* Column sums in two deterministic stages: partial[r][j] = sum of rows in chunk r (in order), then
 * out[j] += sum over r (in order). Threads own columns, so reads are coalesced along rows. */
__global__ void colsum_partial_kernel(float *partial, const float *x, int n, int c, int rows_per_chunk) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= c) return;
    int r0 = blockIdx.y * rows_per_chunk, r1 = min(n, r0 + rows_per_chunk);
    float acc = 0.0f;
    for (int r = r0; r < r1; r++) acc += x[(size_t)r * c + j];
    partial[(size_t)blockIdx.y * c + j] = acc;
}

__global__ void colsum_finish_kernel(float *out, const float *partial, int rows, int c) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= c) return;
    float acc = 0.0f;
    for (int r = 0; r < rows; r++) acc += partial[(size_t)r * c + j];
    out[j] += acc;
}

void st_cuda_colsum_finish(float *out, const float *partial, int rows, int c) {
    dim3 grid((c + ST_CUDA_THREADS - 1) / ST_CUDA_THREADS);
    colsum_finish_kernel<<<grid, ST_CUDA_THREADS, 0, g.stream>>>(out, partial, rows, c);
    ST_CUDA_LAUNCHED("column-sum finish");
}

/* ---------------------------------------------------------------- bias */

__global__ void bias_add_kernel(float *y, const float *bias, int n, int c) {
    size_t total = (size_t)n * c;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x)
        y[i] += bias[i % c];
}

static void cu_bias_add(float *y, const float *bias, int n, int c) {
    if (n <= 0 || c <= 0) return;
    size_t total = (size_t)n * c;
    bias_add_kernel<<<st_cuda_grid_1d(total, ST_CUDA_THREADS), ST_CUDA_THREADS, 0, g.stream>>>(y, bias, n, c);
    ST_CUDA_LAUNCHED("bias_add");
}

/* a column block of a row-major matrix: dst[i * ldd + j] (+)= src[i * lds + j] (worker/lora.c's packed sites) */
__global__ void copy_cols_kernel(float *dst, int ldd, const float *src, int lds, int rows, int cols, int accumulate) {
    size_t total = (size_t)rows * cols;
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < total; e += (size_t)gridDim.x * blockDim.x) {
        size_t i = e / cols, j = e % cols;
        float v = src[i * lds + j];
        dst[i * ldd + j] = accumulate ? dst[i * ldd + j] + v : v;
    }
}

static void cu_copy_cols(float *dst, int ldd, const float *src, int lds, int rows, int cols, int accumulate) {
    if (rows <= 0 || cols <= 0) return;
    size_t total = (size_t)rows * cols;
    copy_cols_kernel<<<st_cuda_grid_1d(total, ST_CUDA_THREADS), ST_CUDA_THREADS, 0, g.stream>>>(dst, ldd, src, lds,
                                                                                                 rows, cols, accumulate);
    ST_CUDA_LAUNCHED("copy_cols");
}

__global__ void add_scalar_kernel(float *x, float v, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        x[i] += v;
}

static void cu_add_scalar(float *x, float v, size_t n) {
    if (!n) return;
    add_scalar_kernel<<<st_cuda_grid_1d(n, ST_CUDA_THREADS), ST_CUDA_THREADS, 0, g.stream>>>(x, v, n);
    ST_CUDA_LAUNCHED("add_scalar");
}

__device__ static uint64_t mix64_dev(uint64_t z) { /* splitmix64's finalizer, as kernels/cpu */
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

__global__ void lora_dropout_kernel(float *out, const float *x, const float *add, int rows, int in, int t,
                                    uint64_t key, int64_t sample0, int k, uint64_t thresh, float inv) {
    size_t total = (size_t)rows * in;
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < total; e += (size_t)gridDim.x * blockDim.x) {
        int i = (int)(e / in), j = (int)(e % in);
        uint64_t rk = mix64_dev(key ^ mix64_dev((uint64_t)(sample0 + (int64_t)(i / t)) * 0x9e3779b97f4a7c15ull +
                                                (uint64_t)(i % t)));
        rk = mix64_dev(rk ^ (uint64_t)k);
        float v = mix64_dev(rk + (uint64_t)j) >= thresh ? __fmul_rn(x[e], inv) : 0.0f;
        out[e] = add ? __fadd_rn(add[e], v) : v;
    }
}

static void cu_lora_dropout(float *out, const float *x, const float *add, int rows, int in, int t, uint64_t key,
                            int64_t sample0, int k, uint64_t thresh, float inv) {
    if (rows <= 0 || in <= 0) return;
    size_t total = (size_t)rows * in;
    lora_dropout_kernel<<<st_cuda_grid_1d(total, ST_CUDA_THREADS), ST_CUDA_THREADS, 0, g.stream>>>(
        out, x, add, rows, in, t, key, sample0, k, thresh, inv);
    ST_CUDA_LAUNCHED("lora_dropout");
}

/* DoRA (kernels/kernels.h): one thread a row / column for the double sums (their order is the CPU twin's),
 * every operation rounded on its own (no FMA contraction) */
__global__ void dora_norm_kernel(float *c, float *inv, const float *w, const float *ba, const float *mg, int out,
                                 int in, float scale) {
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < out; j += gridDim.x * blockDim.x) {
        const float *wr = w + (size_t)j * in, *d = ba + (size_t)j * in;
        double ss = 0;
        for (int i = 0; i < in; i++) {
            double v = __dadd_rn((double)wr[i], __dmul_rn((double)scale, (double)d[i]));
            ss = __dadd_rn(ss, __dmul_rn(v, v));
        }
        inv[j] = (float)__ddiv_rn(1.0, __dsqrt_rn(ss));
        c[j] = __fmul_rn(mg[j], inv[j]);
    }
}
static void cu_dora_norm(float *c, float *inv, const float *w, const float *ba, const float *mg, int out, int in,
                         float scale) {
    if (out <= 0) return;
    dora_norm_kernel<<<st_cuda_grid_1d((size_t)out, 128), 128, 0, g.stream>>>(c, inv, w, ba, mg, out, in, scale);
    ST_CUDA_LAUNCHED("dora_norm");
}
__global__ void dora_apply_kernel(float *y, int ldy, const float *z, const float *base, const float *c, int rows,
                                  int out) {
    size_t total = (size_t)rows * out;
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < total; e += (size_t)gridDim.x * blockDim.x) {
        size_t i = e / out, j = e % out;
        float *yp = y + i * ldy + j;
        *yp = __fadd_rn(*yp, __fsub_rn(__fmul_rn(c[j], z[e]), base[e]));
    }
}
static void cu_dora_apply(float *y, int ldy, const float *z, const float *base, const float *c, int rows, int out) {
    if (rows <= 0 || out <= 0) return;
    size_t total = (size_t)rows * out;
    dora_apply_kernel<<<st_cuda_grid_1d(total, ST_CUDA_THREADS), ST_CUDA_THREADS, 0, g.stream>>>(y, ldy, z, base, c,
                                                                                                  rows, out);
    ST_CUDA_LAUNCHED("dora_apply");
}
__global__ void dora_dm_kernel(float *gm, const float *dy, const float *z, const float *inv, int rows, int out) {
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < out; j += gridDim.x * blockDim.x) {
        double s = 0;
        for (int i = 0; i < rows; i++)
            s = __dadd_rn(s, __dmul_rn((double)dy[(size_t)i * out + j], (double)z[(size_t)i * out + j]));
        gm[j] = __fadd_rn(gm[j], (float)__dmul_rn(s, (double)inv[j]));
    }
}
__global__ void dora_dz_kernel(float *base, float *dy, const float *c, int rows, int out) {
    size_t total = (size_t)rows * out;
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < total; e += (size_t)gridDim.x * blockDim.x) {
        float cj = c[e % out], d = dy[e];
        base[e] = __fmul_rn(__fsub_rn(cj, 1.0f), d);
        dy[e] = __fmul_rn(d, cj);
    }
}
static void cu_dora_bwd(float *gm, float *base, float *dy, const float *z, const float *c, const float *inv, int rows,
                        int out) {
    if (rows <= 0 || out <= 0) return;
    if (gm) {
        dora_dm_kernel<<<st_cuda_grid_1d((size_t)out, 128), 128, 0, g.stream>>>(gm, dy, z, inv, rows, out);
        ST_CUDA_LAUNCHED("dora_bwd (magnitude)");
    }
    size_t total = (size_t)rows * out;
    dora_dz_kernel<<<st_cuda_grid_1d(total, ST_CUDA_THREADS), ST_CUDA_THREADS, 0, g.stream>>>(base, dy, c, rows, out);
    ST_CUDA_LAUNCHED("dora_bwd");
}
__global__ void scale_rows_kernel(float *w, const float *c, int out, int in) {
    size_t total = (size_t)out * in;
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < total; e += (size_t)gridDim.x * blockDim.x)
        w[e] = __fmul_rn(w[e], c[e / in]);
}
static void cu_scale_rows(float *w, const float *c, int out, int in) {
    if (out <= 0 || in <= 0) return;
    size_t total = (size_t)out * in;
    scale_rows_kernel<<<st_cuda_grid_1d(total, ST_CUDA_THREADS), ST_CUDA_THREADS, 0, g.stream>>>(w, c, out, in);
    ST_CUDA_LAUNCHED("scale_rows");
}

/* the prompt encoders' activation (kernels/kernels.h); tanhf is CUDA's (within 2 ulp of the CPU's) */
__global__ void prompt_act_kernel(float *r, const float *a, size_t n, int tanh_act) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        r[i] = tanh_act ? tanhf(a[i]) : (a[i] > 0 ? a[i] : 0.0f);
}
static void cu_prompt_act(float *r, const float *a, size_t n, int tanh_act) {
    if (!n) return;
    prompt_act_kernel<<<st_cuda_grid_1d(n, ST_CUDA_THREADS), ST_CUDA_THREADS, 0, g.stream>>>(r, a, n, tanh_act);
    ST_CUDA_LAUNCHED("prompt_act");
}
__global__ void prompt_act_bwd_kernel(float *dx, const float *a, const float *r, size_t n, int tanh_act) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        dx[i] = __fmul_rn(dx[i], tanh_act ? __fsub_rn(1.0f, __fmul_rn(r[i], r[i])) : (a[i] > 0 ? 1.0f : 0.0f));
}
static void cu_prompt_act_bwd(float *dx, const float *a, const float *r, size_t n, int tanh_act) {
    if (!n) return;
    prompt_act_bwd_kernel<<<st_cuda_grid_1d(n, ST_CUDA_THREADS), ST_CUDA_THREADS, 0, g.stream>>>(dx, a, r, n,
                                                                                                  tanh_act);
    ST_CUDA_LAUNCHED("prompt_act_bwd");
}

static void cu_bias_bwd(float *dbias, const float *dy, int n, int c) {
    if (n <= 0 || c <= 0) return;
    int parts = st_cuda_colsum_partials(n, c, 1, g.scratch_bytes / sizeof(float));
    if (parts == 0) { st_cuda_note("bias_bwd", "scratch too small for one row of partials"); return; }
    int rpc = st_cuda_colsum_rows_per_chunk(n, parts);
    float *partial = (float *)g.scratch;
    dim3 grid((c + ST_CUDA_THREADS - 1) / ST_CUDA_THREADS, parts);
    colsum_partial_kernel<<<grid, ST_CUDA_THREADS, 0, g.stream>>>(partial, dy, n, c, rpc);
    ST_CUDA_LAUNCHED("bias_bwd");
    st_cuda_colsum_finish(dbias, partial, parts, c);
}

/* ---------------------------------------------------------------- matmul (cuBLASLt) */

static const char *lt_status(cublasStatus_t s) {
    const char *name = cublasGetStatusString(s);
    return name ? name : "cuBLAS error";
}

/* Row-major C[M,N] = op(A) op(B) is column-major C^T[N,M] = op(B)^T op(A)^T: we hand cuBLASLt B as its
 * "A" and A as its "B". A row-major [r, c] matrix is a column-major [c, r] one with ld = c.
 * ab_type is the element type of A and B; C/D and the scale type are always fp32. bf16 inputs run with
 * CUBLAS_COMPUTE_32F (fp32 accumulation) whatever SHARDTUNE_CUDA_TF32 says.
 * bias: CUBLASLT_EPILOGUE_BIAS. cuBLASLt adds a bias vector whose length is the number of ROWS of D,
 * broadcast over D's columns, after alpha*AB + beta*C (cublasLt.h, CUBLASLT_EPILOGUE_BIAS). Our D is the
 * column-major C^T [N, M]: its rows are the N columns of the row-major C, so bias[j] lands on column j of
 * every row of C — exactly bias_add(C, bias, M, N). The bias element type is D's type (fp32) unless
 * IMMA/fp8 (cublasLt.h, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE); we set CUDA_R_32F explicitly anyway. The
 * bias pointer is set on the descriptor before the heuristic (which looks at its alignment) and again
 * before every call; the pointer is not part of the key, its alignment is (through `align`). */
static struct matmul_plan *matmul_plan_for(int m, int n, int k, int ta, int tb, int lda, int ldb, int align,
                                           cudaDataType_t ab_type, const float *bias_ptr) {
    int bias = bias_ptr != NULL;
    for (int i = 0; i < MATMUL_CACHE; i++) {
        struct matmul_plan *p = &g.plans[i];
        if (p->valid && p->m == m && p->n == n && p->k == k && p->ta == ta && p->tb == tb && p->lda == lda &&
            p->ldb == ldb && p->align == align && p->ab_type == ab_type && p->bias == bias)
            return p;
    }
    struct matmul_plan *p = &g.plans[g.next_plan];
    g.next_plan = (g.next_plan + 1) % MATMUL_CACHE;
    if (p->valid) {
        cublasLtMatrixLayoutDestroy(p->la);
        cublasLtMatrixLayoutDestroy(p->lb);
        cublasLtMatrixLayoutDestroy(p->lc);
        cublasLtMatmulDescDestroy(p->op);
        p->valid = 0;
    }
    cublasOperation_t op_first = tb ? CUBLAS_OP_T : CUBLAS_OP_N;  /* applied to B's memory */
    cublasOperation_t op_second = ta ? CUBLAS_OP_T : CUBLAS_OP_N; /* applied to A's memory */
    cublasComputeType_t compute = ab_type == CUDA_R_16BF ? CUBLAS_COMPUTE_32F : g.compute;
    cublasStatus_t s = cublasLtMatmulDescCreate(&p->op, compute, CUDA_R_32F);
    if (s == CUBLAS_STATUS_SUCCESS)
        s = cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_TRANSA, &op_first, sizeof op_first);
    if (s == CUBLAS_STATUS_SUCCESS)
        s = cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_TRANSB, &op_second, sizeof op_second);
    if (bias) {
        uint32_t epilogue = CUBLASLT_EPILOGUE_BIAS;
        int32_t bias_type = CUDA_R_32F;
        if (s == CUBLAS_STATUS_SUCCESS)
            s = cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof epilogue);
        if (s == CUBLAS_STATUS_SUCCESS)
            s = cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type,
                                               sizeof bias_type);
        if (s == CUBLAS_STATUS_SUCCESS)
            s = cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias_ptr, sizeof bias_ptr);
    }
    /* B memory: [K,N] row-major = col-major [N,K] (ld N); transposed: [N,K] row-major = col-major [K,N]
     * (ld K). ldb >= that row length: a padded copy (see pad_ld) keeps the same layout with a wider pitch. */
    if (s == CUBLAS_STATUS_SUCCESS)
        s = tb ? cublasLtMatrixLayoutCreate(&p->la, ab_type, k, n, ldb)
               : cublasLtMatrixLayoutCreate(&p->la, ab_type, n, k, ldb);
    /* A memory: [M,K] row-major = col-major [K,M] (ld K); transposed: [K,M] = col-major [M,K] (ld M) */
    if (s == CUBLAS_STATUS_SUCCESS)
        s = ta ? cublasLtMatrixLayoutCreate(&p->lb, ab_type, m, k, lda)
               : cublasLtMatrixLayoutCreate(&p->lb, ab_type, k, m, lda);
    if (s == CUBLAS_STATUS_SUCCESS) s = cublasLtMatrixLayoutCreate(&p->lc, CUDA_R_32F, n, m, n);
    cublasLtMatmulPreference_t pref = NULL;
    if (s == CUBLAS_STATUS_SUCCESS) s = cublasLtMatmulPreferenceCreate(&pref);
    if (s == CUBLAS_STATUS_SUCCESS)
        s = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                 &g.lt_workspace_bytes, sizeof g.lt_workspace_bytes);
    /* sub-tensors of a flat weight buffer may be only 4-byte (bf16: 2-byte) aligned: ask only for kernels
     * that cope */
    uint32_t align_bytes = (uint32_t)align;
    cublasLtMatmulPreferenceAttributes_t align_attrs[] = {
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
    for (int i = 0; i < 4 && s == CUBLAS_STATUS_SUCCESS; i++)
        s = cublasLtMatmulPreferenceSetAttribute(pref, align_attrs[i], &align_bytes, sizeof align_bytes);
    cublasLtMatmulHeuristicResult_t heur;
    int found = 0;
    memset(&heur, 0, sizeof heur);
    if (s == CUBLAS_STATUS_SUCCESS)
        s = cublasLtMatmulAlgoGetHeuristic(g.lt, p->op, p->la, p->lb, p->lc, p->lc, pref, 1, &heur, &found);
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (s != CUBLAS_STATUS_SUCCESS || found == 0) {
        char msg[192];
        snprintf(msg, sizeof msg, "no cuBLASLt algorithm for m=%d n=%d k=%d ta=%d tb=%d lda=%d ldb=%d %s%s align=%d (%s)",
                 m, n, k, ta, tb, lda, ldb, ab_type == CUDA_R_16BF ? "bf16" : "fp32", bias ? " +bias" : "", align,
                 s != CUBLAS_STATUS_SUCCESS ? lt_status(s) : "heuristic found none");
        st_cuda_note("matmul", msg);
        return NULL; /* descriptors of a half-built plan leak once per failure; failures are sticky */
    }
    p->m = m, p->n = n, p->k = k, p->ta = ta, p->tb = tb, p->align = align, p->ab_type = ab_type, p->bias = bias;
    p->lda = lda, p->ldb = ldb;
    p->algo = heur.algo;
    p->valid = 1;
    return p;
}

/* Largest power of two (16, 8, 4 or 2) every pointer whose bits are or-ed into `bits` is aligned to. */
static int pointer_align(uintptr_t bits) {
    return (bits & 15) == 0 ? 16 : (bits & 7) == 0 ? 8 : (bits & 3) == 0 ? 4 : 2;
}

static void cu_matmul(float *c, const float *a, const float *b, int m, int n, int k, int trans_a, int trans_b,
                      float alpha, float beta) {
    if (m <= 0 || n <= 0) return;
    if (k <= 0) { /* empty product: C = beta * C (beta 0 clears, even NaN) */
        if (beta == 0.0f) cu_memset0(c, sizeof(float) * (size_t)m * n);
        else cu_scale(c, beta, (size_t)m * n);
        return;
    }
    int align = pointer_align((uintptr_t)a | (uintptr_t)b | (uintptr_t)c);
    struct matmul_plan *p = matmul_plan_for(m, n, k, trans_a ? 1 : 0, trans_b ? 1 : 0, trans_a ? m : k, trans_b ? k : n,
                                            align, CUDA_R_32F, NULL);
    if (!p) return;
    cublasStatus_t s = cublasLtMatmul(g.lt, p->op, &alpha, b, p->la, a, p->lb, &beta, c, p->lc, c, p->lc, &p->algo,
                                      g.lt_workspace, g.lt_workspace_bytes, g.stream);
    if (s != CUBLAS_STATUS_SUCCESS) st_cuda_note("matmul", lt_status(s));
}

/* ---------------------------------------------------------------- bf16 storage and matmul_bf16 */

/* dst[i] = bf16 bits of src[i], round to nearest even (the rule of kernels/bf16.h). */
__global__ void to_bf16_kernel(uint16_t *dst, const float *src, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        dst[i] = st_bf16_bits_rn(src[i]);
}

/* dst[i] = src[i] widened to fp32: the bf16 bits become the upper half of the fp32 bits (exact). */
__global__ void from_bf16_kernel(float *dst, const uint16_t *src, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        dst[i] = __uint_as_float((uint32_t)src[i] << 16);
}

/* x[i] = bf16(x[i]), kept as fp32 (the same rounding as to_bf16). */
__global__ void round_bf16_kernel(float *x, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        x[i] = __uint_as_float((uint32_t)st_bf16_bits_rn(x[i]) << 16);
}

static void cu_round_bf16(float *x, size_t n) {
    if (n == 0) return;
    round_bf16_kernel<<<st_cuda_grid_1d(n, ST_CUDA_THREADS), ST_CUDA_THREADS, 0, g.stream>>>(x, n);
    ST_CUDA_LAUNCHED("round_bf16");
}

static void cu_to_bf16(uint16_t *dst, const float *src, size_t n) {
    if (n == 0) return;
    to_bf16_kernel<<<st_cuda_grid_1d(n, ST_CUDA_THREADS), ST_CUDA_THREADS, 0, g.stream>>>(dst, src, n);
    ST_CUDA_LAUNCHED("to_bf16");
}

static void cu_from_bf16(float *dst, const uint16_t *src, size_t n) {
    if (n == 0) return;
    from_bf16_kernel<<<st_cuda_grid_1d(n, ST_CUDA_THREADS), ST_CUDA_THREADS, 0, g.stream>>>(dst, src, n);
    ST_CUDA_LAUNCHED("from_bf16");
}

/* dst[r * ld_dst + c] = bf16(src[r * cols + c]) (or the bf16 bits copied, src16): a pitched copy. */
__global__ void to_bf16_pitched_kernel(uint16_t *dst, int ld_dst, const float *src, const uint16_t *src16, int rows,
                                       int cols) {
    size_t total = (size_t)rows * cols;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        size_t r = i / (size_t)cols, c = i % (size_t)cols;
        dst[r * (size_t)ld_dst + c] = src ? st_bf16_bits_rn(src[i]) : src16[i];
    }
}

/* One bf16 operand as cuBLASLt reads it: memory of `rows` rows of `cols` elements with pitch `ld`. */
typedef struct {
    const uint16_t *p;
    int ld;
} bf16_view;

/* The bf16 operand cuBLASLt reads. A bf16 operand with a pitch that is a multiple of 8 (16 bytes) is used
 * as given (no pass over it); an fp32 one is rounded into `slot`. A pitch that is not a multiple of 8
 * (GPT-2's vocabulary 50257: the dlogits operand of the LM head's backward GEMMs) leaves cuBLASLt only
 * slow 2-byte-aligned kernels, or none: such an operand is written into `slot` with its pitch rounded up
 * to 8, when that fits in `room` bytes (the caller's scratch is sized for fp32 copies, so it does unless
 * the row is shorter than 8). A `rounded` fp32 operand converts exactly either way. */
static bf16_view operand_bf16(st_mm_in x, uint16_t *slot, int rows, int cols, size_t room) {
    bf16_view v = {x.bf16, cols};
    int padded = (cols + 7) / 8 * 8;
    int pad = padded != cols && (size_t)rows * padded * sizeof(uint16_t) <= room;
    if (x.bf16 && !pad) return v;
    size_t n = (size_t)rows * cols;
    v.p = slot;
    if (!pad) { /* plain conversion, same layout */
        cu_to_bf16(slot, x.f32, n);
        return v;
    }
    v.ld = padded;
    to_bf16_pitched_kernel<<<st_cuda_grid_1d(n, ST_CUDA_THREADS), ST_CUDA_THREADS, 0, g.stream>>>(slot, padded, x.f32,
                                                                                                   x.bf16, rows, cols);
    ST_CUDA_LAUNCHED("matmul_bf16 (padded operand)");
    return v;
}

/* Bytes a padded copy of [rows, cols] bf16 takes in a slot (pitch rounded up to 8 elements). */
static size_t padded_bytes(int rows, int cols) { return (size_t)rows * ((cols + 7) / 8 * 8) * sizeof(uint16_t); }

/* Mixed-precision matmul: cuBLASLt multiplies bf16 x bf16 with fp32 accumulation into the fp32 C, then
 * (bias != NULL) its BIAS epilogue adds bias[j] to column j. Scratch layout (st_matmul_bf16_scratch_floats
 * counts fp32 copies of both operands; bf16 copies, even padded ones, take at most about half): A's bf16
 * copy at the start, B's at the next 16-byte boundary after A's largest (padded) size; a slot stays unused
 * when that operand is used in place. */
static void cu_matmul_bf16(float *c, st_mm_in a, st_mm_in b, const float *bias, int m, int n, int k, int trans_a,
                           int trans_b, float alpha, float beta, float *scratch) {
    if (m <= 0 || n <= 0) return;
    if ((a.f32 == NULL) == (a.bf16 == NULL) || (b.f32 == NULL) == (b.bf16 == NULL)) {
        st_cuda_note("matmul_bf16", "each operand needs exactly one of f32 / bf16");
        return;
    }
    if (k <= 0) { /* empty product: beta * C, then the bias, as the CPU twin does */
        cu_matmul(c, NULL, NULL, m, n, k, trans_a, trans_b, alpha, beta);
        if (bias) cu_bias_add(c, bias, m, n);
        return;
    }
    /* memory shapes: A is [M,K] (or [K,M] transposed), B is [K,N] (or [N,K]) */
    int a_rows = trans_a ? k : m, a_cols = trans_a ? m : k, b_rows = trans_b ? n : k, b_cols = trans_b ? k : n;
    size_t room = st_matmul_bf16_scratch_floats(m, n, k) * sizeof(float);
    size_t a_plain = ((size_t)m * k * sizeof(uint16_t) + 15) / 16 * 16, b_plain = (size_t)k * n * sizeof(uint16_t);
    size_t a_slot = (padded_bytes(a_rows, a_cols) + 15) / 16 * 16;
    if (a_slot + b_plain > room) a_slot = a_plain; /* A unpadded: both plain copies always fit */
    uint16_t *slot_a = (uint16_t *)scratch, *slot_b = (uint16_t *)((char *)scratch + a_slot);
    bf16_view ra = operand_bf16(a, slot_a, a_rows, a_cols, a_slot);
    bf16_view rb = operand_bf16(b, slot_b, b_rows, b_cols, room - a_slot);
    int align = pointer_align((uintptr_t)ra.p | (uintptr_t)rb.p | (uintptr_t)c | (uintptr_t)bias);
    struct matmul_plan *p =
        matmul_plan_for(m, n, k, trans_a ? 1 : 0, trans_b ? 1 : 0, ra.ld, rb.ld, align, CUDA_R_16BF, bias);
    if (!p) return;
    cublasStatus_t s = CUBLAS_STATUS_SUCCESS;
    if (bias) s = cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias);
    if (s == CUBLAS_STATUS_SUCCESS)
        s = cublasLtMatmul(g.lt, p->op, &alpha, rb.p, p->la, ra.p, p->lb, &beta, c, p->lc, c, p->lc, &p->algo,
                           g.lt_workspace, g.lt_workspace_bytes, g.stream);
    if (s != CUBLAS_STATUS_SUCCESS) st_cuda_note("matmul_bf16", lt_status(s));
}

/* ---------------------------------------------------------------- the table */

/* Designated initializers: a slot added to kernels.h and missed here is NULL, which
 * tests/unit/test_cuda_host.c (every slot set) catches on any CUDA build, GPU or not. */
static const st_backend cuda_backend = {
    .name = "cuda",
    .host_memory = 0,
    .alloc = cu_alloc,
    .free = cu_free,
    .memset0 = cu_memset0,
    .copy_to_device = cu_copy_to_device,
    .copy_to_host = cu_copy_to_host,
    .copy = cu_copy,
    .synchronize = cu_synchronize,
    .status = cu_status,
    .device_id = st_cuda_device_uuid,
    .matmul = cu_matmul,
    .matmul_bf16 = cu_matmul_bf16,
    .to_bf16 = cu_to_bf16,
    .from_bf16 = cu_from_bf16,
    .bias_add = cu_bias_add,
    .bias_bwd = cu_bias_bwd,
    .sumsq = cu_sumsq,
    .layernorm_fwd = st_cu_layernorm_fwd,
    .layernorm_bwd = st_cu_layernorm_bwd,
    .rmsnorm_fwd = st_cu_rmsnorm_fwd,
    .rmsnorm_bwd = st_cu_rmsnorm_bwd,
    .rope_fwd = st_cu_rope_fwd,
    .rope_bwd = st_cu_rope_bwd,
    .attention_fwd = st_cu_attention_fwd_any, /* fp32 kernels; tensor cores with SHARDTUNE_CUDA_ATTN=tc */
    .attention_bwd = st_cu_attention_bwd_any,
    .gelu_fwd = st_cu_gelu_fwd,
    .gelu_bwd = st_cu_gelu_bwd,
    .swiglu_fwd = st_cu_swiglu_fwd,
    .swiglu_bwd = st_cu_swiglu_bwd,
    .embedding_fwd = st_cu_embedding_fwd,
    .embedding_bwd = st_cu_embedding_bwd,
    .cross_entropy = st_cu_cross_entropy,
    .cross_entropy_acc = st_cu_cross_entropy_acc,
    .kd_loss = st_cu_kd_loss,
    .xent_block_stats = st_cu_xent_block_stats,
    .xent_block_loss = st_cu_xent_block_loss,
    .xent_block_grad = st_cu_xent_block_grad,
    .adamw = st_cu_adamw,
    .dequant_int8 = st_cu_dequant_int8,
    .dequant_nf4 = st_cu_dequant_nf4,
    .adamw_multi = st_cu_adamw_multi,
    .round_bf16 = cu_round_bf16,
    .kv_store = st_cu_kv_store,
    .attention_cached = st_cu_attention_cached,
    .decode_mm = st_cu_decode_mm,
    .head_rmsnorm_fwd = st_cu_head_rmsnorm_fwd,
    .head_rmsnorm_bwd = st_cu_head_rmsnorm_bwd,
    .attention_window_fwd = st_cu_attention_window_fwd,
    .attention_window_bwd = st_cu_attention_window_bwd,
    .attention_docs_fwd = st_cu_attention_docs_fwd,
    .attention_docs_bwd = st_cu_attention_docs_bwd,
    .rope_pos_fwd = st_cu_rope_pos_fwd,
    .rope_pos_bwd = st_cu_rope_pos_bwd,
    .embedding_pos_fwd = st_cu_embedding_pos_fwd,
    .embedding_pos_bwd = st_cu_embedding_pos_bwd,
    .copy_cols = cu_copy_cols,
    .add_scalar = cu_add_scalar,
    .lora_dropout = cu_lora_dropout,
    .dora_norm = cu_dora_norm,
    .dora_apply = cu_dora_apply,
    .dora_bwd = cu_dora_bwd,
    .scale_rows = cu_scale_rows,
    .prompt_act = cu_prompt_act,
    .prompt_act_bwd = cu_prompt_act_bwd,
    .w8_bytes = st_cu_w8_bytes, /* int8.cu: the int8 distillation teacher */
    .w8_scratch_bytes = st_cu_w8_scratch_bytes,
    .w8_pack = st_cu_w8_pack,
    .matmul_w8a8 = st_cu_matmul_w8a8,
    .qmatmul = st_cu_qmatmul, /* qmatmul.cu: QLoRA's fused dequantize-matmul */
};

extern "C" const st_backend *st_cuda_table(void) { return &cuda_backend; }

static size_t env_mib(const char *name, size_t fallback) {
    const char *s = getenv(name);
    if (!s || !*s) return fallback;
    char *end = NULL;
    unsigned long v = strtoul(s, &end, 10);
    if (*end || v == 0 || v > 65536) return fallback;
    return (size_t)v << 20;
}

static int init_fail(const char *what, const char *msg) {
    return st_fail(ST_EDEVICE, "CUDA backend on device %d: %s failed: %s", g.device, what, msg);
}

static int init_state(int device) {
    g.device = device;
    cudaError_t e = cudaSetDevice(device);
    if (e != cudaSuccess) return init_fail("cudaSetDevice", cudaGetErrorString(e));
    cudaDeviceProp prop;
    e = cudaGetDeviceProperties(&prop, device);
    if (e != cudaSuccess) return init_fail("cudaGetDeviceProperties", cudaGetErrorString(e));
    if (prop.major < 8) /* bf16 kernels and the build's sm_80/sm_90 images: an older GPU would fail every launch */
        return st_fail(ST_EDEVICE, "CUDA device %d (%s) is sm_%d%d; shardtune needs sm_80 or newer (A100, H100)",
                       device, prop.name, prop.major, prop.minor);
    const char *sync = getenv("SHARDTUNE_CUDA_SYNC");
    g.sync_each = sync && strcmp(sync, "1") == 0;
    e = cudaStreamCreateWithFlags(&g.stream, cudaStreamNonBlocking);
    if (e != cudaSuccess) return init_fail("stream creation", cudaGetErrorString(e));
    cublasStatus_t s = cublasLtCreate(&g.lt);
    if (s != CUBLAS_STATUS_SUCCESS) return init_fail("cublasLtCreate", lt_status(s));
    const char *tf32 = getenv("SHARDTUNE_CUDA_TF32");
    g.compute = (tf32 && strcmp(tf32, "1") == 0) ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
    g.lt_workspace_bytes = 32u << 20;
    g.scratch_bytes = env_mib("SHARDTUNE_CUDA_SCRATCH_MB", 64u << 20);
    e = cudaMalloc(&g.lt_workspace, g.lt_workspace_bytes);
    if (e == cudaSuccess) e = cudaMalloc(&g.scratch, g.scratch_bytes);
    if (e == cudaSuccess) e = cudaMallocHost((void **)&g.host_scalar, 64);
    if (e == cudaSuccess) e = cudaMalloc((void **)&g.bad_target, sizeof(int));
    if (e == cudaSuccess) e = cudaMemset(g.bad_target, 0x7f, sizeof(int)); /* 0x7f7f7f7f: no row */
    for (int i = 0; i < STAGE_SLOTS && e == cudaSuccess; i++) {
        e = cudaMallocHost(&g.stage[i], STAGE_BYTES);
        if (e == cudaSuccess) e = cudaEventCreateWithFlags(&g.stage_done[i], cudaEventDisableTiming);
    }
    if (e != cudaSuccess) return init_fail("workspace allocation", cudaGetErrorString(e));
    return 0;
}

extern "C" const st_backend *st_backend_cuda_for_rank(int local_rank, int local_size) {
    int count = 0, device = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        st_fail(ST_EDEVICE, "no CUDA device/driver: %s", cudaGetErrorString(e));
        return NULL;
    }
    if (st_cuda_pick_device(local_rank, local_size, count, &device) != 0) return NULL;
    return st_backend_cuda(device);
}

extern "C" const st_backend *st_backend_cuda(int device) {
    if (g.ready) {
        if (device == g.device) return &cuda_backend;
        st_fail(ST_EDEVICE, "CUDA backend already bound to device %d (asked for %d)", g.device, device);
        return NULL;
    }
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        st_fail(ST_EDEVICE, "no CUDA device/driver: %s", cudaGetErrorString(e));
        return NULL;
    }
    if (count == 0) {
        st_fail(ST_EDEVICE, "no CUDA device/driver: cudaGetDeviceCount found 0 devices");
        return NULL;
    }
    if (device < 0 || device >= count) {
        st_fail(ST_EDEVICE, "CUDA device %d does not exist (%d device%s visible)", device, count,
                count == 1 ? "" : "s");
        return NULL;
    }
    if (init_state(device) != 0) return NULL; /* partial state is kept; a process retries at most once */
    g.ready = 1;
    return &cuda_backend;
}
