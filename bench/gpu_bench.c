/* gpu_bench.c — the CUDA backend at 7B-class shapes: TFLOP/s and MFU against the bf16 peak.
 *
 *   gpu_bench [--device N] [--peak-tflops P] [--seq T] [--self-test]
 *
 * Shapes of a Llama-3-8B step (d_model 4096, 32 query / 8 kv heads of 128, d_ff 14336, vocab 128256) on
 * T tokens (default 4096, one sequence):
 *  - the bf16 peak: matmul_bf16 8192^3 on bf16 operands (the best a step's GEMMs can reach here);
 *  - each GEMM of a layer (q|k|v, o, gate|up, down) and the LM head, forward + the two backward GEMMs, on
 *    bf16 operands (the weights' bf16 copy, bf16 saved activations) with fp32 accumulation;
 *  - attention forward + backward at T, H=32, KVH=8, hd=128 (causal): the fp32 kernels and, in CUDA builds,
 *    the tensor-core ones (kernels/cuda/attention_tc.cu, unverified);
 *  - cross-entropy over T rows of 128256 logits (memory-bound: GB/s);
 *  - a projected step of the 32-layer model from those times (matmuls + attention + head), its tokens/s
 *    and MFU, so the share of attention shows.
 * MFU = useful FLOP/s / peak, peak = --peak-tflops (the datasheet's dense bf16: H100/H200 SXM 989, A100
 * 312; tests/tools/gpu_smoke.sh passes it from nvidia-smi's name) or else the measured 8192^3 peak.
 * Correctness is gpu_check's job (tests/tools/gpu_check.c), not this program's. --self-test runs tiny
 * shapes on the CPU backend so the code path is exercised without a GPU. Exit 0, or 2 (no device). */
#include "common/error.h"
#include "common/util.h"
#include "kernels/kernels.h"
#ifdef ST_HAVE_CUDA
#include "kernels/cuda/cuda_extras.h" /* the tensor-core attention */
#endif

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const st_backend *G;
static double peak_flops; /* what MFU divides by */

static void *dalloc(size_t bytes) {
    void *p = G->alloc(bytes);
    if (!p) {
        printf("gpu_bench: device allocation of %zu bytes failed\n", bytes);
        exit(2);
    }
    return p;
}

/* Best seconds per call of `reps` back-to-back calls, after one warm-up (cuBLASLt heuristics). */
#define TIME_BEST(out, reps, call)                                              \
    do {                                                                        \
        call;                                                                   \
        G->synchronize();                                                       \
        double best_ = INFINITY;                                                \
        for (int round_ = 0; round_ < 3; round_++) {                            \
            double t0_ = st_now();                                              \
            for (int r_ = 0; r_ < (reps); r_++) call;                           \
            G->synchronize();                                                   \
            double t_ = (st_now() - t0_) / (reps);                              \
            if (t_ < best_) best_ = t_;                                         \
        }                                                                       \
        (out) = best_;                                                          \
    } while (0)

static void line(const char *what, double flops, double secs) {
    printf("%-40s %9.3f ms  %8.1f TFLOP/s  MFU %5.1f%%\n", what, secs * 1e3, flops / secs * 1e-12,
           100.0 * flops / secs / peak_flops);
}

/* Seconds of C[m,n] = op(A) op(B) on bf16 operands (fp32 accumulation). */
static double gemm_secs(int m, int n, int k, int ta, int tb, int reps) {
    uint16_t *a = dalloc((size_t)m * k * 2), *b = dalloc((size_t)k * n * 2);
    float *c = dalloc((size_t)m * n * 4), *s = dalloc(st_matmul_bf16_scratch_floats(m, n, k) * 4);
    double t;
    TIME_BEST(t, reps, G->matmul_bf16(c, st_mm_bf16(a), st_mm_bf16(b), NULL, m, n, k, ta, tb, 1.0f, 0.0f, s));
    G->free(a), G->free(b), G->free(c), G->free(s);
    return t;
}

/* A linear layer y[N,out] = x[N,in] W[out,in]^T: forward, dx = dy W, dW = dy^T x. Returns the seconds
 * of all three; prints one line. */
static double linear(const char *name, int n, int out, int in, int reps) {
    double t = gemm_secs(n, out, in, 0, 1, reps) + gemm_secs(n, in, out, 0, 0, reps) +
               gemm_secs(out, in, n, 1, 0, reps);
    char what[64];
    snprintf(what, sizeof what, "%s fwd+bwd [%d x %d x %d]", name, n, out, in);
    line(what, 3 * 2.0 * n * out * in, t);
    return t;
}

int main(int argc, char **argv) {
    int device = 0, self_test = 0, T = 4096;
    double peak_tflops = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--device") && i + 1 < argc) device = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--peak-tflops") && i + 1 < argc) peak_tflops = atof(argv[++i]);
        else if (!strcmp(argv[i], "--seq") && i + 1 < argc) T = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--self-test")) self_test = 1;
        else {
            printf("usage: gpu_bench [--device N] [--peak-tflops P] [--seq T] [--self-test]\n");
            return 2;
        }
    }
    G = self_test ? st_backend_cpu(0) : st_backend_cuda(device);
    if (!G) {
        printf("gpu_bench: nothing measured: %s\n", st_error());
        return 2;
    }
    /* Llama-3-8B; the self-test divides every size by 32 (and uses T=128) */
    int div = self_test ? 32 : 1, L = 32;
    int C = 4096 / div, F = 14336 / div, V = 128256 / div, H = 32, KVH = 8, HD = 128 / (self_test ? 4 : 1);
    if (self_test) T = 128, H = 8, KVH = 2, C = H * HD;
    int reps = self_test ? 1 : 5, pn = self_test ? 256 : 8192;
    double tp = gemm_secs(pn, pn, pn, 0, 1, reps), measured = 2.0 * pn * pn * pn / tp;
    peak_flops = peak_tflops > 0 ? peak_tflops * 1e12 : measured;
    printf("gpu_bench on %s: T=%d tokens, C=%d, H=%d/%d x %d, F=%d, V=%d; MFU against %s %.1f TFLOP/s\n", G->name, T,
           C, H, KVH, HD, F, V, peak_tflops > 0 ? "the given peak" : "the measured bf16 peak", peak_flops * 1e-12);
    line("matmul_bf16 peak (square, bf16 operands)", 2.0 * pn * pn * pn, tp);

    int QKV = (H + 2 * KVH) * HD;
    double t_layer = linear("q|k|v", T, QKV, C, reps) + linear("o", T, C, H * HD, reps) +
                     linear("gate|up", T, 2 * F, C, reps) + linear("down", T, C, F, reps);
    double f_layer = 6.0 * T * ((double)QKV * C + (double)C * H * HD + 2.0 * F * C + (double)C * F);
    double t_head = linear("lm head", T, V, C, reps), f_head = 6.0 * T * (double)V * C;

    /* attention (causal: half the T x T scores), fp32 kernels on fp32 packed qkv */
    size_t nqkv = (size_t)T * QKV, nout = (size_t)T * H * HD, nlse = (size_t)H * T;
    float *qkv = dalloc(nqkv * 4), *out = dalloc(nout * 4), *lse = dalloc(nlse * 4), *dout = dalloc(nout * 4);
    float *dqkv = dalloc(nqkv * 4);
    double t_af, t_ab;
    TIME_BEST(t_af, 1, G->attention_fwd(out, lse, qkv, 1, T, H, KVH, HD));
    TIME_BEST(t_ab, 1, G->attention_bwd(dqkv, dout, qkv, out, lse, 1, T, H, KVH, HD));
    double f_af = 2.0 * 2.0 * H * (double)T * T / 2 * HD, f_ab = 2.5 * f_af;
    line("attention fwd (causal, fp32 kernel)", f_af, t_af);
    line("attention bwd (causal, fp32 kernel)", f_ab, t_ab);
#ifdef ST_HAVE_CUDA
    if (!self_test && (HD == 64 || HD == 128)) { /* UNVERIFIED kernels: gpu_check judges them */
        double t_tf, t_tb;
        TIME_BEST(t_tf, 1, (void)st_cuda_attention_tc_fwd(out, lse, qkv, 1, T, H, KVH, HD));
        TIME_BEST(t_tb, 1, (void)st_cuda_attention_tc_bwd(dqkv, dout, qkv, out, lse, 1, T, H, KVH, HD));
        line("attention fwd (causal, tensor cores)", f_af, t_tf);
        line("attention bwd (causal, tensor cores)", f_ab, t_tb);
        printf("projected step with tensor-core attention: attention %.1f ms per layer instead of %.1f\n",
               (t_tf + t_tb) * 1e3, (t_af + t_ab) * 1e3);
    }
#endif
    G->free(qkv), G->free(out), G->free(lse), G->free(dout), G->free(dqkv);

    /* cross-entropy: reads the logits twice and writes dlogits once */
    float *logits = dalloc((size_t)T * V * 4), *loss = dalloc((size_t)T * 4), *w = dalloc((size_t)T * 4);
    int32_t *tg = dalloc((size_t)T * 4); /* targets 0 */
    float *hw = malloc((size_t)T * 4);
    for (int i = 0; hw && i < T; i++) hw[i] = 1.0f / T; /* weight-0 rows would skip the softmax */
    if (hw) G->copy_to_device(w, hw, (size_t)T * 4);
    free(hw);
    double t_ce;
    TIME_BEST(t_ce, 1, (void)G->cross_entropy(logits, loss, tg, w, T, V));
    printf("%-40s %9.3f ms  %8.1f GB/s\n", "cross_entropy [T x V]", t_ce * 1e3, 3.0 * T * (double)V * 4 / t_ce * 1e-9);
    /* the LM head's bf16 form: reads the logits twice, writes bf16 dlogits; and the distillation loss, which
     * reads both models' logits three times and writes the student's gradient */
    uint16_t *dl16 = dalloc((size_t)T * V * 2);
    double *acc = dalloc(4 * sizeof(double)), t_acc, t_kd;
    float *tlog = dalloc((size_t)T * V * 4);
    TIME_BEST(t_acc, 1, G->cross_entropy_acc(logits, dl16, loss, tg, w, T, V, acc));
    printf("%-40s %9.3f ms  %8.1f GB/s\n", "cross_entropy_acc bf16 dlogits [T x V]", t_acc * 1e3,
           2.5 * T * (double)V * 4 / t_acc * 1e-9);
    TIME_BEST(t_kd, 1, G->kd_loss(logits, NULL, tlog, loss, tg, w, T, V, 2.0f, 0.5f, acc, acc + 1));
    printf("%-40s %9.3f ms  %8.1f GB/s\n", "kd_loss [T x V] (student + teacher)", t_kd * 1e3,
           7.0 * T * (double)V * 4 / t_kd * 1e-9);
    G->free(logits), G->free(loss), G->free(w), G->free(tg), G->free(dl16), G->free(acc), G->free(tlog);

    double t_step = L * (t_layer + t_af + t_ab) + t_head + t_ce, f_step = L * (f_layer + f_af + f_ab) + f_head;
    printf("projected %d-layer step (GEMMs + attention + head + loss; no norms, no communication): %.1f ms, "
           "%.0f tokens/s, MFU %.1f%% (attention %.0f%% of the time)\n",
           L, t_step * 1e3, T / t_step, 100.0 * f_step / t_step / peak_flops,
           100.0 * L * (t_af + t_ab) / t_step);
    int status = G->status();
    if (status) printf("gpu_bench: device failure: %s\n", st_error());
    return status ? 1 : 0;
}
