/* qmatmul_bench.c — QLoRA's fused dequantize-matmul (the CPU backend's qmatmul, kernels/cpu/cpu_qmatmul.c) side
 * by side with today's other path, dequant_nf4 of the whole matrix then matmul, on nf4 block-64 weights of the
 * peft bench model's shapes (Llama 8 x 512: q/k/v 1024 x 512, gate/up 2816 x 512, down 512 x 1408) and one
 * Llama-3-8B-sized 4096 x 4096, forward X W^T and input gradient X W over M token rows; interleaved, best of
 * REPS, fp32; prints the load average (the machine may be shared: compare the ratio of one run only).
 *   qmatmul_bench [M [REPS]]     (threads: OMP_NUM_THREADS) */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "common/util.h"
#include "kernels/kernels.h"
#include "worker/qlora.h"
int main(int argc, char **argv) {
  int M = argc > 1 ? atoi(argv[1]) : 128, shapes[][2] = {{1024, 512}, {2816, 512}, {512, 1408}, {4096, 4096}};
  int reps = argc > 2 ? atoi(argv[2]) : 5;
  if (M < 1 || reps < 1) { fprintf(stderr, "usage: qmatmul_bench [M [REPS]]\n"); return 2; }
  const st_backend *be = st_backend_cpu(0);
  FILE *la = fopen("/proc/loadavg", "r");
  char load[64] = "?";
  if (la) { if (!fgets(load, sizeof load, la)) load[0] = 0; fclose(la); }
  printf("load average: %s", load);
  printf("threads %d, M=%d rows; nf4 block 64; best of %d, interleaved\n", st_num_threads(), M, reps);
  for (int s = 0; s < 4; s++) {
    int R = shapes[s][0], K = shapes[s][1]; size_t n = (size_t)R * K, ns = n / 64;
    float *w = malloc(n * 4), *sc = malloc(ns * 4), *x = malloc((size_t)M * (R > K ? R : K) * 4), *c = malloc((size_t)M * (R > K ? R : K) * 4), *wd = malloc(n * 4);
    uint8_t *codes = malloc(n / 2 + 1);
    for (size_t i = 0; i < n; i++) w[i] = (float)((i * 2654435761u) % 1000) / 500.0f - 1.0f;
    for (size_t i = 0; i < (size_t)M * (R > K ? R : K); i++) x[i] = (float)(i % 17) / 17.0f;
    st_qlora_quant_tensor(ST_QLORA_NF4, w, n, 64, codes, sc);
    st_qweight qw; memset(&qw, 0, sizeof qw); qw.nf4 = 1; qw.block = 64; qw.cols = K; qw.nparts = 1;
    qw.part[0].codes = codes; qw.part[0].scales = sc; qw.part[0].rows = R;
    for (int trans = 0; trans <= 1; trans++) {
      size_t nsc = st_qmatmul_scratch_floats(M, R, K, trans, 0, st_num_threads()); float *scr = malloc(nsc * 4);
      double bf = 1e9, bu = 1e9;
      for (int r = 0; r < reps; r++) {
        for (int side = 0; side < 2; side++) { /* the order alternates rep to rep */
          int fused = (r + side) % 2 == 0;
          double t0 = st_now();
          if (fused) {
            be->qmatmul(c, st_mm_f32(x), &qw, M, trans, 0, 0.0f, scr, nsc);
          } else {
            be->dequant_nf4(wd, codes, sc, n, 64);
            if (!trans) be->matmul(c, x, wd, M, R, K, 0, 1, 1.0f, 0.0f);
            else be->matmul(c, x, wd, M, K, R, 0, 0, 1.0f, 0.0f);
          }
          double t = st_now() - t0;
          if (fused && t < bf) bf = t;
          if (!fused && t < bu) bu = t;
        }
      }
      printf("W [%5d, %5d] %-6s fused %8.3f ms  dequant+matmul %8.3f ms  fused/unfused %.3f\n", R, K, trans ? "dy W" : "x W^T", bf * 1e3, bu * 1e3, bf / bu);
      free(scr);
    }
    free(w), free(sc), free(x), free(c), free(wd), free(codes);
  }
  return 0;
}
