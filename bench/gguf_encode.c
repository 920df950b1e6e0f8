/* gguf_encode.c — CPU time of the GGUF block encoders alone (st_ggml_encode, the form `export` runs, and
 * st_ggml_encode_reference, the scalar ggml-shaped form), one thread, Gaussian rows of 4096 (as weights
 * are), best of R rounds of thread CPU time (not wall time: on a shared machine CPU time is what the
 * encoder costs, while wall time also counts the other processes). Prints ns per element and the input
 * rate in MB/s of f32 per core. SHARDTUNE_GGUF_SIMD=avx2 runs the default vector build instead of the
 * AVX-512 one (gguf.h: st_ggml_simd_wide).
 * usage: gguf_encode [--rows N] [--reps R] [--quant a,b,...] [--ref 0] (0: skip the reference form, for perf) */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "checkpoints/gguf.h"

static double cpu_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int main(int argc, char **argv) {
    const char *quants = "f16,bf16,q8_0,q4_0,q2_K,q3_K,q4_K,q5_K,q6_K";
    int rows = 256, reps = 5, ref = 1;
    const int64_t cols = 4096;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--rows")) rows = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--reps")) reps = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--quant")) quants = argv[i + 1];
        else if (!strcmp(argv[i], "--ref")) ref = atoi(argv[i + 1]);
    }
    if (rows < 1 || reps < 1) return 2;
    size_t n = (size_t)rows * (size_t)cols;
    float *x = malloc(n * sizeof(float));
    uint8_t *out = malloc(n * 4);
    if (!x || !out) return 1;
    uint64_t s = 0x9E3779B97F4A7C15ULL;
    for (size_t i = 0; i < n; i++) { /* Gaussian, std 0.02 (Box-Muller on xorshift) */
        double u[2];
        for (int k = 0; k < 2; k++) {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            u[k] = ((double)(s >> 11) + 0.5) / 9007199254740992.0;
        }
        x[i] = (float)(0.02 * sqrt(-2 * log(u[0])) * cos(6.283185307179586 * u[1]));
    }
    const char *e = getenv("SHARDTUNE_GGUF_SIMD");
    printf("gguf_encode: %d rows x %lld, best of %d, 1 thread, SHARDTUNE_GGUF_SIMD=%s\n", rows, (long long)cols, reps,
           e ? e : "(unset)");
    printf("| quant | encode ns/elem | encode MB/s of f32 | reference ns/elem | reference / encode |\n|---|---|---|---|---|\n");
    char list[256];
    snprintf(list, sizeof list, "%s", quants);
    for (char *q = strtok(list, ","); q; q = strtok(NULL, ",")) {
        st_ggml_type t;
        if (st_ggml_type_parse(q, &t)) return 2;
        size_t row = st_ggml_row_bytes(t, cols);
        double best[2] = {1e30, 1e30};
        for (int r = 0; r < reps; r++)
            for (int k = 0; k < 1 + (ref != 0); k++) {
                double t0 = cpu_now();
                for (int i = 0; i < rows; i++)
                    (k ? st_ggml_encode_reference : st_ggml_encode)(t, x + (size_t)i * cols, cols, out + (size_t)i * row);
                double dt = cpu_now() - t0;
                if (dt < best[k]) best[k] = dt;
            }
        int has_ref = ref && t != ST_GGML_F16 && t != ST_GGML_BF16 && t != ST_GGML_Q3_K; /* the others have one form */
        printf("| %s | %.2f | %.0f | ", q, 1e9 * best[0] / (double)n, 4.0 * (double)n / best[0] / 1e6);
        if (has_ref) printf("%.2f | %.2fx |\n", 1e9 * best[1] / (double)n, best[1] / best[0]);
        else printf("- | - |\n");
        fflush(stdout);
    }
    free(x);
    free(out);
    return 0;
}
