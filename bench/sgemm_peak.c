/* sgemm_peak.c — measures the machine's fp32 matmul peak: OpenBLAS sgemm on N x N x N (default 2048)
 * with a given number of BLAS threads; prints `gflops=<best of reps>`, and when built with oneDNN (the
 * CPU backend's matmul library) also `dnnl_gflops=` for oneDNN's sgemm with as many OpenMP threads.
 * bench/cpu_train uses both as denominators of "% of peak", and prints `default=`, the library shardtune's
 * CPU matmuls use in this environment (SHARDTUNE_SGEMM, else the CPU's default). Usage: sgemm_peak [threads=2] [n=2048]
 * [reps=5]. Owns its buffers. */
#include "kernels/cpu/cpu_kernels.h"

#include <cblas.h>
#ifdef ST_HAVE_DNNL
#include <dnnl.h>
#include <omp.h>
#endif
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 2;
    int n = argc > 2 ? atoi(argv[2]) : 2048;
    int reps = argc > 3 ? atoi(argv[3]) : 5;
    if (threads < 1 || n < 16 || n > 16384 || reps < 1) {
        fprintf(stderr, "usage: sgemm_peak [threads >= 1] [n in 16..16384] [reps >= 1]\n");
        return 2;
    }
    size_t nn = (size_t)n * n;
    float *a = malloc(nn * sizeof *a), *b = malloc(nn * sizeof *b), *c = malloc(nn * sizeof *c);
    if (!a || !b || !c) {
        fprintf(stderr, "sgemm_peak: out of memory for n=%d\n", n);
        return 1;
    }
    for (size_t i = 0; i < nn; i++) {
        a[i] = (float)((i * 7) % 13) / 13.0f - 0.5f;
        b[i] = (float)((i * 5) % 11) / 11.0f - 0.5f;
        c[i] = 0.0f;
    }
#ifdef ST_HAVE_DNNL /* first: OpenBLAS's pthreads spin after its calls and would slow oneDNN's team */
    omp_set_num_threads(threads);
    dnnl_sgemm('N', 'N', n, n, n, 1.0f, a, n, b, n, 0.0f, c, n); /* warm-up (and JIT) */
    double dbest = 1e30;
    for (int r = 0; r < reps; r++) {
        double t0 = now();
        dnnl_sgemm('N', 'N', n, n, n, 1.0f, a, n, b, n, 0.0f, c, n);
        double dt = now() - t0;
        if (dt < dbest) dbest = dt;
    }
#endif
    openblas_set_num_threads(threads);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0f, a, n, b, n, 0.0f, c, n); /* warm-up */
    double best = 1e30;
    for (int r = 0; r < reps; r++) {
        double t0 = now();
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0f, a, n, b, n, 0.0f, c, n);
        double dt = now() - t0;
        if (dt < best) best = dt;
    }
    printf("gflops=%.1f threads=%d n=%d seconds=%.4f check=%.3f", 2.0 * n * (double)n * n / best / 1e9, threads,
           n, best, (double)c[nn / 2]);
#ifdef ST_HAVE_DNNL
    printf(" dnnl_gflops=%.1f", 2.0 * n * (double)n * n / dbest / 1e9);
#endif
    printf(" default=%s\n", st_cpu_sgemm_library());
    free(a);
    free(b);
    free(c);
    return 0;
}
