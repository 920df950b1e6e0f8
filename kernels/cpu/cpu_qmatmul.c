/* cpu_qmatmul.c — the CPU twin of qmatmul (kernels/kernels.h): QLoRA's fused dequantize-matmul.
 *
 * No whole dequantized matrix exists: W is dequantized one panel at a time into the calling thread's slot of
 * the caller's scratch (st_qmatmul_scratch_floats), and the panel's product runs right away as one
 * single-threaded sgemm (sgemv for a single row, as st_cpu_matmul does), the OpenMP team splitting the panels.
 *   forward (trans 0), C[m, R] = X W^T: a panel is P rows of W (P output columns, each with its whole K sum);
 *   input gradient (trans 1), C[m, K] = X W: a panel is P columns of W over all R rows (the sum dimension stays
 *   whole, so each output element is still one sum over R in the library's order).
 * Each output element is therefore the same sgemm dot product over the same K as dequantize-then-matmul
 * (st_cpu_matmul splits C into blocks the same way; where it splits C by rows, each panel runs in the same row
 * blocks, st_cpu_matmul_rows, since oneDNN 2.6 on AVX2 picks its kernel by the call's row count too), and the
 * result is that path's bit for bit; the tests (unit.test_qlora) hold it to that. One exception: a one-row input
 * gradient (m 1, trans 1) runs OpenBLAS's sgemv per panel, whose sum order depends on the call's length (the
 * whole-matrix path's own result changes with the thread count there): within fp32 summation error, not bit for
 * bit. The panels split the output columns near-evenly at multiples of 16 (oneDNN's AVX2 tiles) and none is small
 * enough for OpenBLAS's small-matrix kernels unless the whole product is (st_qmatmul_panel: those sum K in one
 * pass, the blocked kernels in chunks). OpenBLAS 0.3.21's Haswell/Zen sgemm kernels order a sum by the call's
 * column blocking, so with OpenBLAS on such a CPU (the default there, see sgemm_env) the bits are not guaranteed
 * (the tests probe the library and say so; unit.test_qlora_onednn holds them under oneDNN on any CPU).
 * Compiled with -ffp-contract=off: the double-quantized scale is q8 * scale2, rounded, then + mean, as dequant_int8 + add_scalar. bf16 ST_QMM_W16: W's panels rounded as under bf16 1, X read as is. */
#include "kernels/cpu/cpu_kernels.h"
#include "kernels/bf16.h"
#include "kernels/kernels.h"

#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <string.h>

/* Below this many multiply-adds one thread runs every panel (st_cpu_matmul's threshold). */
#define QMM_PAR_MIN (1L << 21)

static float part_scale(const st_qw_part *p, size_t b) {
    if (p->scales) return p->scales[b];
    float s = (float)p->q8[b] * p->scale2[b / ST_QW_DQ_BLOCK];
    return s + p->mean;
}

/* W[r, c0 .. c0 + n) dequantized into dst, rounded to bf16 (kept as fp32) with bf16. */
static void dq_row(float *restrict dst, const st_qweight *w, int r, int c0, int n, int bf16) {
    int p = 0;
    while (p < w->nparts - 1 && r >= w->part[p].rows) r -= w->part[p++].rows;
    const st_qw_part *pt = &w->part[p];
    size_t i = (size_t)r * (size_t)w->cols + (size_t)c0, end = i + (size_t)n, bk = (size_t)w->block;
    float *out = dst;
    while (i < end) {
        size_t b = i / bk, stop = (b + 1) * bk < end ? (b + 1) * bk : end;
        float s = part_scale(pt, b);
        if (w->nf4)
            for (; i < stop; i++) {
                uint8_t byte = pt->codes[i >> 1];
                *out++ = ST_NF4_LEVELS[(i & 1) ? byte >> 4 : byte & 15] * s; /* low nibble first */
            }
        else
            for (; i < stop; i++) *out++ = (float)(int8_t)pt->codes[i] * s;
    }
    if (bf16)
        for (int j = 0; j < n; j++) dst[j] = st_bf16_round(dst[j]);
}

/* X's values as the matmul reads them: fp32 as is, or (bf16 1) rounded / widened into slot. NULL: no operand. */
static const float *operand(st_mm_in x, int bf16, float *slot, size_t n) {
    if (x.bf16) {
        if (bf16 != 1) return NULL; /* fp32 math (and ST_QMM_W16) has no bf16 X (and no slot for it) */
        st_cpu_from_bf16(slot, x.bf16, n);
        return slot;
    }
    if (bf16 != 1 || !x.f32 || x.rounded) return x.f32;
    const float *restrict src = x.f32;
#pragma omp parallel for schedule(static) if (n >= ST_CPU_PAR_MIN)
    for (size_t i = 0; i < n; i++) slot[i] = st_bf16_round(src[i]);
    return slot;
}

/* Panel q of the product: dequantized into slot, then its sgemm (or sgemv) into C's columns [j0, j0 + pn). */
static void panel(float *c, const float *xa, const st_qweight *w, int m, int trans, int bf16, float beta, int R,
                  int j0, int pn, float *slot, int rb) {
    const int K = w->cols;
    if (!trans)
        for (int r = 0; r < pn; r++) dq_row(slot + (size_t)r * K, w, j0 + r, 0, K, bf16);
    else
        for (int r = 0; r < R; r++) dq_row(slot + (size_t)r * pn, w, r, j0, pn, bf16);
    const int ldc = trans ? K : R;
    if (m == 1) { /* st_cpu_matmul's one-row path: a matrix-vector product */
        if (beta == 0.0f) memset(c + j0, 0, (size_t)pn * sizeof(float)); /* never 0 x NaN */
        if (!trans)
            cblas_sgemv(CblasRowMajor, CblasNoTrans, pn, K, 1.0f, slot, K, xa, 1, beta, c + j0, 1);
        else
            cblas_sgemv(CblasRowMajor, CblasTrans, R, pn, 1.0f, slot, pn, xa, 1, beta, c + j0, 1);
    } else { /* in st_cpu_matmul's row blocks of rb rows (the whole-matrix call's row counts) */
        const int len = trans ? R : K;
        for (int i0 = 0; i0 < m; i0 += rb) {
            int mb = m - i0 < rb ? m - i0 : rb;
            const float *xi = xa + (size_t)i0 * (size_t)len;
            float *ci = c + (size_t)i0 * (size_t)ldc + j0;
            if (!trans) st_cpu_sgemm_one(0, 1, mb, pn, K, 1.0f, xi, K, slot, K, beta, ci, ldc);
            else st_cpu_sgemm_one(0, 0, mb, pn, R, 1.0f, xi, R, slot, pn, beta, ci, ldc);
        }
    }
}

void st_cpu_qmatmul(float *c, st_mm_in x, const st_qweight *w, int m, int trans, int bf16, float beta, float *scratch,
                    size_t scratch_floats) {
    int R = 0;
    for (int p = 0; p < w->nparts && p < ST_QW_PARTS; p++) R += w->part[p].rows;
    const int K = w->cols, n = trans ? K : R, len = trans ? R : K;
    if (m <= 0 || n <= 0) return;
    if (len <= 0) { /* empty sum: C = beta * C, as matmul */
        st_cpu_matmul(c, NULL, NULL, m, n, 0, 0, 0, 1.0f, beta);
        return;
    }
    const int P = st_qmatmul_panel(m, len, n), np = (n + P - 1) / P;
    const size_t xs = bf16 == 1 ? ((size_t)m * (size_t)len + 15) / 16 * 16 : 0, slot = ((size_t)P + 16) * (size_t)len;
    const size_t slots = scratch_floats > xs ? (scratch_floats - xs) / slot : 0;
    const float *xa = slots && w->block > 0 && w->nparts >= 1 && w->nparts <= ST_QW_PARTS
                          ? operand(x, bf16, scratch, (size_t)m * (size_t)len)
                          : NULL;
    if (!xa) { /* a caller's error (scratch too small, no operand, bad weight): loud, never a plausible result */
        for (size_t i = 0; i < (size_t)m * (size_t)n; i++) c[i] = NAN;
        return;
    }
    const int rb = st_cpu_matmul_rows(m, n, len); /* before the team: st_cpu_matmul's own split at this shape */
    int nt = omp_get_max_threads();
    if ((size_t)nt > slots) nt = (int)slots;
    if (nt > np) nt = np;
    if ((long)m * n * len < QMM_PAR_MIN) nt = 1;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int id = omp_get_thread_num(), team = omp_get_num_threads();
        float *mine = scratch + xs + (size_t)id * slot;
        for (int q = id; q < np; q += team) { /* panel q: columns [edge(q), edge(q + 1)) */
            int j0 = st_qmatmul_edge(q, np, n), pn = st_qmatmul_edge(q + 1, np, n) - j0;
            panel(c, xa, w, m, trans, bf16, beta, R, j0, pn, mine, rb);
        }
    }
}
