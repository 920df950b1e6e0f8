/* step_matmuls.c — replays the matmuls of one GPT-2 training step (no activation checkpointing) through
 * the CPU backend's st_cpu_matmul, with the model's shapes and layouts: per layer qkv / proj / fc / fc-proj
 * forward (x W^T), input gradients (dY W) and weight gradients (dY^T x, accumulated), then the LM head
 * (logits, dx, dW over the full vocabulary). Prints GFLOP/s by wall time and by process CPU time (CPU time
 * / threads: less sensitive to other processes on a shared machine), best of reps, and the sgemm library
 * (shardtune's default for this CPU, or SHARDTUNE_SGEMM=onednn|openblas, as for shardtune itself). Run it twice, alternating the
 * library, for a side-by-side ratio. Usage: step_matmuls [threads=2] [reps=3] [N=256 C=768 F=3072 V=50257
 * L=12] (the defaults: bench/cpu_train's gpt2-124m row, B*T = 4*64). Numbers only, no assertions. */
#include "kernels/cpu/cpu_kernels.h"
#include "kernels/kernels.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double clock_s(clockid_t id) {
    struct timespec ts;
    clock_gettime(id, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static float *buf(size_t n) {
    float *p = malloc(n * sizeof(float));
    if (!p) {
        fprintf(stderr, "step_matmuls: out of memory (%zu floats)\n", n);
        exit(1);
    }
    for (size_t i = 0; i < n; i++) p[i] = (float)((i * 7919) % 1000) / 1000.0f - 0.5f;
    return p;
}

/* One matmul call; adds its FLOPs to *flops. */
static void mm(double *flops, float *c, const float *a, const float *b, int m, int n, int k, int ta, int tb, float beta) {
    st_cpu_matmul(c, a, b, m, n, k, ta, tb, 1.0f, beta);
    *flops += 2.0 * m * n * (double)k;
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 2, reps = argc > 2 ? atoi(argv[2]) : 3;
    int N = argc > 3 ? atoi(argv[3]) : 256, C = argc > 4 ? atoi(argv[4]) : 768, F = argc > 5 ? atoi(argv[5]) : 3072;
    int V = argc > 6 ? atoi(argv[6]) : 50257, L = argc > 7 ? atoi(argv[7]) : 12;
    if (threads < 1 || reps < 1 || N < 1 || C < 1 || F < 1 || V < 1 || L < 1) {
        fprintf(stderr, "usage: step_matmuls [threads] [reps] [N C F V L], all >= 1\n");
        return 2;
    }
    st_backend_cpu(threads); /* OpenMP threads, OpenBLAS single-threaded: as shardtune train runs */
    const char *lib = st_cpu_sgemm_library();
    int Q = 3 * C, W = F > Q ? F : Q;
    /* one weight set per layer (the step streams 12 layers' weights, as training does) */
    float **wq = malloc(L * sizeof *wq), **wf = malloc(L * sizeof *wf), **wo = malloc(L * sizeof *wo);
    float **wp = malloc(L * sizeof *wp), **gq = malloc(L * sizeof *gq), **gf = malloc(L * sizeof *gf);
    float **go = malloc(L * sizeof *go), **gp = malloc(L * sizeof *gp);
    for (int l = 0; l < L; l++) {
        wq[l] = buf((size_t)Q * C), wo[l] = buf((size_t)C * C), wf[l] = buf((size_t)F * C), wp[l] = buf((size_t)C * F);
        gq[l] = buf((size_t)Q * C), go[l] = buf((size_t)C * C), gf[l] = buf((size_t)F * C), gp[l] = buf((size_t)C * F);
    }
    float *x = buf((size_t)N * C), *y = buf((size_t)N * W), *dy = buf((size_t)N * W), *dx = buf((size_t)N * W);
    float *head = buf((size_t)V * C), *ghead = buf((size_t)V * C), *logits = buf((size_t)N * V);
    double best_wall = 1e30, best_cpu = 1e30, flops = 0.0;
    for (int r = 0; r <= reps; r++) { /* r = 0: warm-up */
        double f = 0.0, w0 = clock_s(CLOCK_MONOTONIC), c0 = clock_s(CLOCK_PROCESS_CPUTIME_ID);
        for (int l = 0; l < L; l++) { /* forward */
            mm(&f, y, x, wq[l], N, Q, C, 0, 1, 0.0f);
            mm(&f, x, y, wo[l], N, C, C, 0, 1, 1.0f);
            mm(&f, y, x, wf[l], N, F, C, 0, 1, 0.0f);
            mm(&f, x, y, wp[l], N, C, F, 0, 1, 1.0f);
        }
        mm(&f, logits, x, head, N, V, C, 0, 1, 0.0f); /* LM head */
        mm(&f, dx, logits, head, N, C, V, 0, 0, 0.0f);
        mm(&f, ghead, logits, x, V, C, N, 1, 0, 1.0f);
        for (int l = L - 1; l >= 0; l--) { /* backward: input then weight gradient of each linear */
            mm(&f, dy, dx, wp[l], N, F, C, 0, 0, 0.0f);
            mm(&f, gp[l], dx, y, C, F, N, 1, 0, 1.0f);
            mm(&f, dx, dy, wf[l], N, C, F, 0, 0, 0.0f);
            mm(&f, gf[l], dy, x, F, C, N, 1, 0, 1.0f);
            mm(&f, dy, dx, wo[l], N, C, C, 0, 0, 0.0f);
            mm(&f, go[l], dx, x, C, C, N, 1, 0, 1.0f);
            mm(&f, dx, dy, wq[l], N, C, Q, 0, 0, 0.0f);
            mm(&f, gq[l], dy, x, Q, C, N, 1, 0, 1.0f);
        }
        double wall = clock_s(CLOCK_MONOTONIC) - w0, cpu = clock_s(CLOCK_PROCESS_CPUTIME_ID) - c0;
        flops = f;
        if (r && wall < best_wall) best_wall = wall;
        if (r && cpu < best_cpu) best_cpu = cpu;
    }
    printf("lib=%s threads=%d N=%d C=%d F=%d V=%d L=%d gflop=%.2f wall_s=%.3f cpu_s=%.3f gflops_wall=%.1f "
           "gflops_cpu=%.1f\n",
           lib, threads, N, C, F, V, L, flops / 1e9, best_wall, best_cpu,
           flops / best_wall / 1e9, flops / (best_cpu / threads) / 1e9);
    return 0;
}
