/* cpu_backend.c — the CPU backend table (st_backend_cpu), host memory functions, matmul through the
 * faster sgemm on this CPU (oneDNN's on AVX-512 when built with it, else OpenBLAS's; SHARDTUNE_SGEMM picks
 * one), bias and elementwise kernels.
 *
 * Memory: alloc returns 64-byte aligned zeroed host memory owned by the caller (release with ->free).
 * Kernels never allocate. Every reduction runs over a partition that does not depend on the number
 * of threads, so results are bit-identical for any thread count and any scheduling (matmul: for a
 * given thread count). the sgemm library runs single-threaded inside the OpenMP team (see st_cpu_matmul). */
#include "kernels/cpu/cpu_kernels.h"
#include "kernels/kernels.h"
#include "common/error.h"
#include "common/util.h"

#include <cblas.h>
#ifdef ST_HAVE_DNNL
#include <dnnl.h>
#endif
#include <omp.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

/* ---- memory ---- */

static void *cpu_alloc(size_t bytes) { return st_calloc_aligned(bytes); }
static void cpu_free(void *p) { free(p); }
static void cpu_memset0(void *p, size_t bytes) {
    if (bytes) memset(p, 0, bytes);
}
static void cpu_copy(void *dst, const void *src, size_t bytes) {
    if (bytes && dst != src) memcpy(dst, src, bytes);
}
static void cpu_synchronize(void) {}
static int cpu_status(void) { return 0; } /* nothing runs asynchronously, so nothing is left to report */
static int cpu_device_id(unsigned char id[16]) { (void)id; return -1; } /* no device */

/* ---- matmul ---- */

/* Below this many multiply-adds one thread is faster than waking the team. */
#define ST_MATMUL_PAR_MIN (1L << 21)

/* The OpenMP team splits C into contiguous row blocks (or column blocks when C is wider than tall),
 * multiples of 16, and each thread runs a single-threaded sgemm on its block. One thread pool for the
 * whole backend: OpenBLAS's own pthreads would busy-wait between calls and steal the cores from the
 * OpenMP kernels that run in between. The split depends only on the shape and the thread count, so
 * results are reproducible run to run; a different thread count may round edge tiles differently. */
/* From this many weights (256 KB) a one-row product is split across the team: it streams the weights
 * from memory at a few GB/s per core, ~25 us for 256 KB against ~1-2 us to wake the spinning team, and
 * every decode GEMV of a model past the cache (Llama 8 x 512: 0.26-1.4 M weights each) must use both
 * cores' read bandwidth, not only the LM head. */
#define ST_GEMV_PAR_MIN (1L << 16)

/* One row of C (a decode step at batch 1): matrix-vector products over column blocks. OpenBLAS 0.3.21's
 * sgemm would pack the whole of B for a single row; sgemv streams it once. Each element of C is one dot
 * product whatever the block, so the thread count does not change the result. */
static void matmul_row(float *c, const float *a, const float *b, int n, int k, int trans_b, float alpha, float beta) {
#pragma omp parallel if ((long)n * k >= ST_GEMV_PAR_MIN && n >= 32)
    {
        int nt = omp_get_num_threads(), id = omp_get_thread_num();
        int per = ((n + nt - 1) / nt + 15) / 16 * 16;
        int lo = id * per < n ? id * per : n;
        int hi = lo + per < n ? lo + per : n;
        if (hi > lo) {
            if (beta == 0.0f) memset(c + lo, 0, (size_t)(hi - lo) * sizeof(float)); /* never 0 x NaN */
            if (trans_b)
                cblas_sgemv(CblasRowMajor, CblasNoTrans, hi - lo, k, alpha, b + (size_t)lo * k, k, a, 1, beta, c + lo, 1);
            else
                cblas_sgemv(CblasRowMajor, CblasTrans, k, hi - lo, alpha, b + lo, n, a, 1, beta, c + lo, 1);
        }
    }
}

/* The sgemm when SHARDTUNE_SGEMM is unset: oneDNN on a CPU with AVX-512 (its JIT sgemm is 25-35% faster than
 * OpenBLAS 0.3.21 there, 1.33x on gpt2-124m steps), OpenBLAS on the others: on an AVX2-only CPU (AMD EPYC
 * Zen 3) OpenBLAS ran the steps' sgemms 1.05-1.16x faster, with no page faults (oneDNN's per-call packing
 * buffers are fresh mappings under the CLI's fixed mmap threshold: 10.8k / 29.1k faults per llama-small /
 * gpt2-124m step), bench/sgemm_shapes and bench/cpu_train (bench/RESULTS.md, 2026-12-07). */
#ifdef ST_HAVE_DNNL
static int dnnl_by_default(void) {
#if defined(__x86_64__) || defined(__i386__)
    return __builtin_cpu_supports("avx512f");
#else
    return 0;
#endif
}
#endif

/* SHARDTUNE_SGEMM: unset (dnnl_by_default), "onednn" or "openblas"; NULL when the value is one of those, else
 * the value. Read once. */
static const char *sgemm_env(int *dnnl) {
    const char *e = getenv("SHARDTUNE_SGEMM");
    int unset = !e || !*e;
#ifdef ST_HAVE_DNNL
    *dnnl = unset ? dnnl_by_default() : strcmp(e, "onednn") == 0;
#else
    *dnnl = 0;
#endif
    if (unset || strcmp(e, "openblas") == 0 || strcmp(e, "onednn") == 0) return NULL;
    return e;
}

int st_cpu_sgemm_check(void) {
    int dnnl;
    const char *bad = sgemm_env(&dnnl);
    if (bad) return st_fail(ST_EINVAL, "SHARDTUNE_SGEMM=%s: expected onednn or openblas", bad);
#ifndef ST_HAVE_DNNL
    const char *e = getenv("SHARDTUNE_SGEMM");
    if (e && strcmp(e, "onednn") == 0)
        return st_fail(ST_EDEVICE, "SHARDTUNE_SGEMM=onednn: this build has no oneDNN (cmake -DSHARDTUNE_DNNL=ON, Debian: libdnnl-dev)");
#endif
    return 0;
}

/* 1 when st_cpu_matmul's blocks go to oneDNN (see sgemm_env; bench/cpu_train --side
 * shardtune,shardtune-openblas compares both with one binary). */
static int sgemm_dnnl(void) {
#ifdef ST_HAVE_DNNL
    static atomic_int choice = -1;
    int v = atomic_load(&choice);
    if (v < 0) {
        sgemm_env(&v);
        atomic_store(&choice, v);
    }
    return v;
#else
    return 0;
#endif
}

const char *st_cpu_sgemm_library(void) { return sgemm_dnnl() ? "onednn" : "openblas"; }

/* One single-threaded row-major sgemm C = alpha op(A) op(B) + beta C (beta 0 never reads C) through the
 * library sgemm_dnnl picks. oneDNN would open its own (nested) team of omp_get_max_threads() threads: the
 * calling thread's thread count is held at 1 around the call, so each block runs on the thread that owns it (one pool, no
 * oversubscription, results independent of scheduling). A call oneDNN refuses (it checks the arguments
 * only) goes to OpenBLAS. */
static void sgemm_block(int dnnl, int ta, int tb, int m, int n, int k, float alpha, const float *a, int lda,
                        const float *b, int ldb, float beta, float *c, int ldc) {
#ifdef ST_HAVE_DNNL
    if (dnnl) {
        int outer = omp_get_max_threads();
        if (outer > 1) omp_set_num_threads(1);
        /* no signal handler may run on this thread inside oneDNN: a signal delivered during dnnl_sgemm
         * (2.6.3, AVX-512) corrupts the heap (tests/unit/test_kernels_cpu.c, matmul under signals). A
         * process-directed one goes to another thread, or waits here until the call returns. */
        sigset_t all, old;
        sigfillset(&all);
        pthread_sigmask(SIG_BLOCK, &all, &old);
        dnnl_status_t st = dnnl_sgemm(ta ? 'T' : 'N', tb ? 'T' : 'N', m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        if (outer > 1) omp_set_num_threads(outer);
        if (st == dnnl_success) return;
    }
#else
    (void)dnnl;
#endif
    cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, m, n, k, alpha, a, lda,
                b, ldb, beta, c, ldc);
}

void st_cpu_sgemm_one(int ta, int tb, int m, int n, int k, float alpha, const float *a, int lda, const float *b,
                      int ldb, float beta, float *c, int ldc) {
    sgemm_block(sgemm_dnnl(), ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

/* The length of each of st_cpu_matmul's blocks over len rows or columns on a team of nt: a multiple of 16. */
static int matmul_block(int len, int nt) { return ((len + nt - 1) / nt + 15) / 16 * 16; }

int st_cpu_matmul_rows(int m, int n, int k) {
    if (m < n || (long)m * n * k < ST_MATMUL_PAR_MIN || m < 32 || omp_in_parallel()) return m;
    int nt = omp_get_max_threads();
    return nt > 1 ? matmul_block(m, nt) : m;
}

void st_cpu_matmul(float *c, const float *a, const float *b, int m, int n, int k, int trans_a, int trans_b,
                   float alpha, float beta) {
    if (m <= 0 || n <= 0) return;
    if (m == 1 && k > 0 && !trans_a) {
        matmul_row(c, a, b, n, k, trans_b, alpha, beta);
        return;
    }
    if (k <= 0) { /* empty product: C = beta * C (BLAS would reject the zero leading dimension) */
        st_cpu_scale(c, beta, (size_t)m * (size_t)n);
        if (beta == 0.0f) memset(c, 0, (size_t)m * (size_t)n * sizeof(float));
        return;
    }
    const int lda = trans_a ? m : k, ldb = trans_b ? k : n;
    const int dnnl = sgemm_dnnl();
    const int by_rows = m >= n;
    const int len = by_rows ? m : n;
#pragma omp parallel if ((long)m * n * k >= ST_MATMUL_PAR_MIN && len >= 32)
    {
        int nt = omp_get_num_threads(), id = omp_get_thread_num();
        int per = matmul_block(len, nt);
        int lo = id * per < len ? id * per : len;
        int hi = lo + per < len ? lo + per : len;
        if (hi > lo) {
            if (by_rows) {
                const float *as = trans_a ? a + lo : a + (size_t)lo * k;
                sgemm_block(dnnl, trans_a, trans_b, hi - lo, n, k, alpha, as, lda, b, ldb, beta, c + (size_t)lo * n, n);
            } else {
                const float *bs = trans_b ? b + (size_t)lo * k : b + lo;
                sgemm_block(dnnl, trans_a, trans_b, m, hi - lo, k, alpha, a, lda, bs, ldb, beta, c + lo, n);
            }
        }
    }
}

/* ---- bias ---- */

void st_cpu_bias_add(float *y, const float *bias, int n, int c) {
#pragma omp parallel for schedule(static) if ((long)n * c >= ST_CPU_PAR_MIN)
    for (int i = 0; i < n; i++) {
        float *restrict row = y + (size_t)i * c;
        const float *restrict bb = bias;
        for (int j = 0; j < c; j++) row[j] += bb[j];
    }
}

/* Column blocks are independent and each sums its rows in order: deterministic for any threads. */
#define ST_COL_BLOCK 64
void st_cpu_bias_bwd(float *dbias, const float *dy, int n, int c) {
    int nblocks = (c + ST_COL_BLOCK - 1) / ST_COL_BLOCK;
#pragma omp parallel for schedule(static) if ((long)n * c >= ST_CPU_PAR_MIN)
    for (int blk = 0; blk < nblocks; blk++) {
        int c0 = blk * ST_COL_BLOCK;
        int w = c - c0 < ST_COL_BLOCK ? c - c0 : ST_COL_BLOCK;
        float acc[ST_COL_BLOCK] = {0};
        for (int i = 0; i < n; i++) {
            const float *restrict row = dy + (size_t)i * c + c0;
            for (int j = 0; j < w; j++) acc[j] += row[j];
        }
        for (int j = 0; j < w; j++) dbias[c0 + j] += acc[j];
    }
}

/* ---- elementwise ---- */

void st_cpu_scale(float *restrict x, float s, size_t n) {
#pragma omp parallel for schedule(static) if (n >= ST_CPU_PAR_MIN)
    for (size_t i = 0; i < n; i++) x[i] *= s;
}

/* Sum of squares in double over fixed 8192-element chunks; chunk partials of one 256-chunk super
 * block are computed in parallel and added in chunk order. */
#define ST_SUMSQ_SUPER 256 /* ST_SUMSQ_CHUNK: kernels.h (its contract) */
static double sumsq_chunk(const float *restrict x, size_t n) {
    double acc[8] = {0};
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; l++) acc[l] += (double)x[i + l] * (double)x[i + l];
    double s = 0.0;
    for (int l = 0; l < 8; l++) s += acc[l];
    for (; i < n; i++) s += (double)x[i] * (double)x[i];
    return s;
}

double st_cpu_sumsq(const float *x, size_t n) {
    double total = 0.0;
    const size_t super = (size_t)ST_SUMSQ_CHUNK * ST_SUMSQ_SUPER;
    for (size_t base = 0; base < n; base += super) {
        size_t len = n - base < super ? n - base : super;
        int nchunks = (int)((len + ST_SUMSQ_CHUNK - 1) / ST_SUMSQ_CHUNK);
        double part[ST_SUMSQ_SUPER];
#pragma omp parallel for schedule(static) if (len >= ST_CPU_PAR_MIN)
        for (int ch = 0; ch < nchunks; ch++) {
            size_t off = (size_t)ch * ST_SUMSQ_CHUNK;
            size_t clen = len - off < ST_SUMSQ_CHUNK ? len - off : ST_SUMSQ_CHUNK;
            part[ch] = sumsq_chunk(x + base + off, clen);
        }
        for (int ch = 0; ch < nchunks; ch++) total += part[ch];
    }
    return total;
}

void st_cpu_copy_cols(float *dst, int ldd, const float *src, int lds, int rows, int cols, int accumulate) {
#pragma omp parallel for schedule(static) if ((long)rows * cols >= ST_CPU_PAR_MIN)
    for (int i = 0; i < rows; i++) {
        float *restrict d = dst + (size_t)i * ldd;
        const float *restrict r = src + (size_t)i * lds;
        if (accumulate)
            for (int j = 0; j < cols; j++) d[j] += r[j];
        else
            memcpy(d, r, (size_t)cols * sizeof(float));
    }
}

void st_cpu_add_scalar(float *x, float v, size_t n) {
    for (size_t i = 0; i < n; i++) x[i] += v;
}

/* ---- the table ---- */

static const st_backend st_cpu_table = {
    .name = "cpu",
    .host_memory = 1,
    .alloc = cpu_alloc,
    .free = cpu_free,
    .memset0 = cpu_memset0,
    .copy_to_device = cpu_copy,
    .copy_to_host = cpu_copy,
    .copy = cpu_copy,
    .synchronize = cpu_synchronize,
    .status = cpu_status,
    .device_id = cpu_device_id,
    .matmul = st_cpu_matmul,
    .matmul_bf16 = st_cpu_matmul_bf16,
    .to_bf16 = st_cpu_to_bf16,
    .from_bf16 = st_cpu_from_bf16,
    .bias_add = st_cpu_bias_add,
    .bias_bwd = st_cpu_bias_bwd,
    .sumsq = st_cpu_sumsq,
    .layernorm_fwd = st_cpu_layernorm_fwd,
    .layernorm_bwd = st_cpu_layernorm_bwd,
    .rmsnorm_fwd = st_cpu_rmsnorm_fwd,
    .rmsnorm_bwd = st_cpu_rmsnorm_bwd,
    .rope_fwd = st_cpu_rope_fwd,
    .rope_bwd = st_cpu_rope_bwd,
    .attention_fwd = st_cpu_attention_fwd,
    .attention_bwd = st_cpu_attention_bwd,
    .gelu_fwd = st_cpu_gelu_fwd,
    .gelu_bwd = st_cpu_gelu_bwd,
    .swiglu_fwd = st_cpu_swiglu_fwd,
    .swiglu_bwd = st_cpu_swiglu_bwd,
    .embedding_fwd = st_cpu_embedding_fwd,
    .embedding_bwd = st_cpu_embedding_bwd,
    .cross_entropy = st_cpu_cross_entropy,
    .cross_entropy_acc = st_cpu_cross_entropy_acc,
    .kd_loss = st_cpu_kd_loss,
    .xent_block_stats = st_cpu_xent_block_stats,
    .xent_block_loss = st_cpu_xent_block_loss,
    .xent_block_grad = st_cpu_xent_block_grad,
    .adamw = st_cpu_adamw,
    .dequant_int8 = st_cpu_dequant_int8,
    .dequant_nf4 = st_cpu_dequant_nf4,
    .adamw_multi = st_cpu_adamw_multi,
    .round_bf16 = st_cpu_round_bf16,
    .kv_store = st_cpu_kv_store,
    .attention_cached = st_cpu_attention_cached,
    .decode_mm = st_cpu_decode_mm,
    .head_rmsnorm_fwd = st_cpu_head_rmsnorm_fwd,
    .head_rmsnorm_bwd = st_cpu_head_rmsnorm_bwd,
    .attention_window_fwd = st_cpu_attention_window_fwd,
    .attention_window_bwd = st_cpu_attention_window_bwd,
    .attention_docs_fwd = st_cpu_attention_docs_fwd,
    .attention_docs_bwd = st_cpu_attention_docs_bwd,
    .rope_pos_fwd = st_cpu_rope_pos_fwd,
    .rope_pos_bwd = st_cpu_rope_pos_bwd,
    .embedding_pos_fwd = st_cpu_embedding_pos_fwd,
    .embedding_pos_bwd = st_cpu_embedding_pos_bwd,
    .copy_cols = st_cpu_copy_cols,
    .add_scalar = st_cpu_add_scalar,
    .lora_dropout = st_cpu_lora_dropout,
    .dora_norm = st_cpu_dora_norm,
    .dora_apply = st_cpu_dora_apply,
    .dora_bwd = st_cpu_dora_bwd,
    .scale_rows = st_cpu_scale_rows,
    .prompt_act = st_cpu_prompt_act,
    .prompt_act_bwd = st_cpu_prompt_act_bwd,
    .w8_bytes = st_cpu_w8_bytes,
    .w8_scratch_bytes = st_cpu_w8_scratch_bytes,
    .w8_pack = st_cpu_w8_pack,
    .matmul_w8a8 = st_cpu_matmul_w8a8,
    .qmatmul = st_cpu_qmatmul,
};

const st_backend *st_backend_cpu(int threads) {
    if (threads <= 0) threads = st_num_threads();
    if (threads <= 0) threads = 1;
    omp_set_num_threads(threads);
    openblas_set_num_threads(1); /* parallelism comes from st_cpu_matmul's OpenMP split */
    return &st_cpu_table;
}
