/* int8_matmul.c — the CPU backend's int8 forward matmul (matmul_w8a8: the int8 distillation teacher's linear
 * layers and head, distill.teacher_dtype: int8) against its fp32 matmul on the same shapes: the teacher of
 * bench/distill_bench.sh (Llama C320 H4 KV2 F864 V8192, 512 tokens). fp32, int8 (VNNI where the CPU has it,
 * including the per-token activation quantization) and the scalar int8 path alternate REPEATS times; each
 * prints its best (lowest) process CPU time as a rate (GFLOP/s, one multiply-add = 2) and the int8 / fp32
 * speed-up, with the load average. Prints numbers only.
 *
 *   int8_matmul [REPEATS (7)]        OMP_NUM_THREADS as usual (1 gives the per-core rate) */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "common/util.h"
#include "kernels/cpu/cpu_kernels.h"
#include "kernels/kernels.h"

static double cpu_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
    return (double)t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    int reps = argc > 1 ? atoi(argv[1]) : 7;
    const st_backend *be = st_backend_cpu(0);
    static const int shapes[][4] = {/* M, N (out), K (in), name index */
                                    {512, 640, 320, 0}, {512, 320, 320, 1}, {512, 1728, 320, 2},
                                    {512, 320, 864, 3}, {512, 8192, 320, 4}};
    static const char *names[] = {"q/k/v", "o_proj", "gate|up", "down", "lm_head"};
    char load[64] = "?";
    FILE *f = fopen("/proc/loadavg", "r");
    if (f && fgets(load, sizeof load, f)) load[14] = 0;
    if (f) fclose(f);
    printf("%-8s %5s %5s %5s %10s %10s %10s %8s   load %s (%d repeats, best CPU time)\n", "matmul", "M", "N", "K",
           "fp32_GF/s", "int8_GOP/s", "scalar", "int8/fp32", load, reps);
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int M = shapes[s][0], N = shapes[s][1], K = shapes[s][2];
        float *a = st_calloc_aligned((size_t)M * K * 4), *w = st_calloc_aligned((size_t)N * K * 4);
        float *c = st_calloc_aligned((size_t)M * N * 4);
        void *pk = st_calloc_aligned(be->w8_bytes(N, K)), *sc = st_calloc_aligned(be->w8_scratch_bytes(M, K));
        if (!a || !w || !c || !pk || !sc) return 1;
        srand(1);
        for (size_t i = 0; i < (size_t)M * K; i++) a[i] = (float)(rand() % 2001 - 1000) / 1000.0f;
        for (size_t i = 0; i < (size_t)N * K; i++) w[i] = (float)(rand() % 2001 - 1000) / 1000.0f;
        be->w8_pack(pk, w, N, K);
        double b32 = 1e30, b8 = 1e30, bs = 1e30;
        for (int r = 0; r < reps; r++) {
            double t0 = cpu_s();
            be->matmul(c, a, w, M, N, K, 0, 1, 1.0f, 0.0f);
            double t1 = cpu_s();
            be->matmul_w8a8(c, a, pk, NULL, M, N, K, 0.0f, sc);
            double t2 = cpu_s();
            if (r < 2) { /* the scalar path is ~50x slower: two rounds */
                st_cpu_int8_force(0);
                be->matmul_w8a8(c, a, pk, NULL, M, N, K, 0.0f, sc);
                st_cpu_int8_force(-1);
                double t3 = cpu_s();
                bs = t3 - t2 < bs ? t3 - t2 : bs;
            }
            b32 = t1 - t0 < b32 ? t1 - t0 : b32;
            b8 = t2 - t1 < b8 ? t2 - t1 : b8;
        }
        double fl = 2.0 * M * N * K;
        printf("%-8s %5d %5d %5d %10.1f %10.1f %10.2f %7.2fx\n", names[shapes[s][3]], M, N, K, fl / b32 / 1e9,
               fl / b8 / 1e9, fl / bs / 1e9, b32 / b8);
        free(a), free(w), free(c), free(pk), free(sc);
    }
    printf("int8 path: %s\n", st_cpu_int8_vnni() ? "AVX-512 VNNI" : "scalar (no AVX-512 VNNI)");
    return 0;
}
