/* kernels_cpu.c — times the CPU backend: sgemm peak at 2048^3, then every kernel at GPT-2 / Llama
 * training sizes. Usage: kernels_cpu [threads] (default: st_num_threads()). Prints one line per kernel;
 * numbers only, no assertions (correctness lives in tests/unit/test_kernels_cpu.c). */
#include "common/util.h"
#include "kernels/kernels.h"

#include <stdio.h>
#include <stdlib.h>

static const st_backend *be;

static float *buf(size_t n, float scale) {
    float *p = be->alloc(n * sizeof(float));
    if (!p) {
        fprintf(stderr, "kernels_cpu: out of memory (%zu floats)\n", n);
        exit(1);
    }
    uint64_t s = 88172645463325252ULL ^ n;
    for (size_t i = 0; i < n; i++) {
        s ^= s << 13, s ^= s >> 7, s ^= s << 17;
        p[i] = scale * ((float)(s >> 40) / (float)(1 << 24) * 2.0f - 1.0f);
    }
    return p;
}

/* Runs body `reps` times after one warm-up and prints the best time (ms). */
#define TIME(label, flops, bytes, body)                                                                      \
    do {                                                                                                     \
        body;                                                                                                \
        double best_ = 1e30;                                                                                 \
        for (int r_ = 0; r_ < reps; r_++) {                                                                  \
            double t0_ = st_now();                                                                           \
            body;                                                                                            \
            double dt_ = st_now() - t0_;                                                                     \
            if (dt_ < best_) best_ = dt_;                                                                    \
        }                                                                                                    \
        printf("%-44s %9.3f ms", label, best_ * 1e3);                                                        \
        if ((flops) > 0) printf("  %7.1f GFLOP/s", (double)(flops) / best_ * 1e-9);                          \
        if ((bytes) > 0) printf("  %7.1f GB/s", (double)(bytes) / best_ * 1e-9);                             \
        printf("\n");                                                                                        \
    } while (0)

static void bench_matmul(const char *label, int m, int n, int k, int ta, int tb, int reps) {
    float *a = buf((size_t)m * k, 1), *b = buf((size_t)k * n, 1), *c = buf((size_t)m * n, 1);
    char name[96];
    snprintf(name, sizeof name, "matmul %s %dx%dx%d", label, m, n, k);
    TIME(name, 2.0 * m * n * k, 0, be->matmul(c, a, b, m, n, k, ta, tb, 1.0f, 0.0f));
    be->free(a), be->free(b), be->free(c);
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 0;
    be = st_backend_cpu(threads);
    printf("kernels_cpu: threads=%d\n", threads > 0 ? threads : st_num_threads());
    int reps = 5;
    bench_matmul("peak NN", 2048, 2048, 2048, 0, 0, 3);
    /* GPT-2 small MLP at B*T = 1024: forward x W^T, backward dY W and dY^T X */
    bench_matmul("fwd  x@W^T", 1024, 3072, 768, 0, 1, reps);
    bench_matmul("dx   dY@W ", 1024, 768, 3072, 0, 0, reps);
    bench_matmul("dW   dY^T@X", 3072, 768, 1024, 1, 0, reps);
    bench_matmul("fwd  small", 512, 256, 256, 0, 1, reps);
    bench_matmul("lm head fwd", 1024, 50257, 768, 0, 1, 2);
    bench_matmul("lm head fwd llama", 1024, 32000, 256, 0, 1, 2);

    const int N = 1024, C = 768;
    size_t nc = (size_t)N * C;
    float *x = buf(nc, 1), *out = buf(nc, 1), *dout = buf(nc, 1), *dx = buf(nc, 1);
    float *w = buf(C, 1), *bb = buf(C, 1), *dw = buf(C, 1), *db = buf(C, 1), *mean = buf(N, 1), *rstd = buf(N, 1);
    TIME("layernorm_fwd 1024x768", 0, 2 * nc * 4, be->layernorm_fwd(out, mean, rstd, x, w, bb, N, C, 1e-5f));
    TIME("layernorm_bwd 1024x768", 0, 4 * nc * 4, be->layernorm_bwd(dx, dw, db, dout, x, w, mean, rstd, N, C));
    TIME("rmsnorm_fwd 1024x768", 0, 2 * nc * 4, be->rmsnorm_fwd(out, rstd, x, w, N, C, 1e-5f));
    TIME("rmsnorm_bwd 1024x768", 0, 4 * nc * 4, be->rmsnorm_bwd(dx, dw, dout, x, w, rstd, N, C));
    TIME("bias_add 1024x768", 0, 2 * nc * 4, be->bias_add(out, bb, N, C));
    TIME("bias_bwd 1024x768", 0, nc * 4, be->bias_bwd(db, dout, N, C));
    volatile double sink = 0;
    TIME("sumsq 1024x768", 0, nc * 4, sink += be->sumsq(x, nc));

    /* attention: GPT-2 small heads at B=8, T=128 and one long sequence */
    int shapes[3][5] = {{8, 128, 12, 12, 64}, {1, 1024, 12, 12, 64}, {8, 128, 4, 2, 64}};
    for (int s = 0; s < 3; s++) {
        int B = shapes[s][0], T = shapes[s][1], H = shapes[s][2], KV = shapes[s][3], HD = shapes[s][4];
        size_t nqkv = (size_t)B * T * (H + 2 * KV) * HD, no = (size_t)B * T * H * HD;
        float *qkv = buf(nqkv, 1), *o = buf(no, 1), *lse = buf((size_t)B * H * T, 1), *dq = buf(nqkv, 1);
        float *cs = buf((size_t)T * HD / 2, 1), *sn = buf((size_t)T * HD / 2, 1);
        st_rope_tables(cs, sn, T, HD, 10000.0f);
        double fl = 2.0 * B * H * (double)T * T * HD; /* causal: half of 4 B H T^2 hd */
        char name[96];
        snprintf(name, sizeof name, "rope_fwd B%d T%d H%d KV%d hd%d", B, T, H, KV, HD);
        TIME(name, 0, 0, be->rope_fwd(qkv, cs, sn, B, T, H, KV, HD));
        snprintf(name, sizeof name, "attention_fwd B%d T%d H%d KV%d hd%d", B, T, H, KV, HD);
        TIME(name, fl, 0, be->attention_fwd(o, lse, qkv, B, T, H, KV, HD));
        snprintf(name, sizeof name, "attention_bwd B%d T%d H%d KV%d hd%d", B, T, H, KV, HD);
        TIME(name, 2.5 * fl, 0, be->attention_bwd(dq, o, qkv, o, lse, B, T, H, KV, HD));
        be->free(qkv), be->free(o), be->free(lse), be->free(dq), be->free(cs), be->free(sn);
    }

    size_t ng = (size_t)1024 * 3072;
    float *g = buf(ng, 3), *go = buf(ng, 1), *gd = buf(ng, 1), *gu = buf(2 * ng, 3), *dgu = buf(2 * ng, 1);
    TIME("gelu_fwd 1024x3072", 0, 2 * ng * 4, be->gelu_fwd(go, g, ng));
    TIME("gelu_bwd 1024x3072", 0, 3 * ng * 4, be->gelu_bwd(gd, go, g, ng));
    TIME("swiglu_fwd 1024x3072", 0, 3 * ng * 4, be->swiglu_fwd(go, gu, 1024, 3072));
    TIME("swiglu_bwd 1024x3072", 0, 6 * ng * 4, be->swiglu_bwd(dgu, go, gu, 1024, 3072));

    const int V = 50257;
    float *wte = buf((size_t)V * C, 1), *wpe = buf((size_t)1024 * C, 1);
    int32_t *tok = malloc(N * sizeof(int32_t));
    for (int i = 0; i < N; i++) tok[i] = (int32_t)((i * 7919) % V);
    TIME("embedding_fwd 1024x768", 0, 3 * nc * 4, be->embedding_fwd(out, tok, wte, wpe, 8, 128, C));
    TIME("embedding_bwd 1024x768", 0, 5 * nc * 4, be->embedding_bwd(wte, wpe, dout, tok, 8, 128, C));

    int vs[2] = {50257, 32000};
    for (int s = 0; s < 2; s++) {
        size_t nl = (size_t)N * vs[s];
        float *logits = buf(nl, 4), *keep = buf(nl, 4), *loss = buf(N, 1), *wt = buf(N, 1);
        char name[96];
        snprintf(name, sizeof name, "cross_entropy 1024x%d", vs[s]);
        TIME(name, 0, 2 * nl * 4, { be->copy(logits, keep, nl * 4); sink += be->cross_entropy(logits, loss, tok, wt, N, vs[s]); });
        TIME("  (of which the copy)", 0, 2 * nl * 4, be->copy(logits, keep, nl * 4));
        be->free(logits), be->free(keep), be->free(loss), be->free(wt);
    }

    size_t np = (size_t)16 << 20;
    float *p = buf(np, 1), *pg = buf(np, 1), *pm = buf(np, 0), *pv = buf(np, 0);
    TIME("adamw 16M", 0, 7 * np * 4, be->adamw(p, pg, pm, pv, np, 1e-4f, 0.9f, 0.95f, 1e-8f, 0.1f, 1.0f, 3));
    /* the optimizer's tail over the gradients of one step, three times in turn (a shared machine): zeroing,
     * sum of squares and AdamW as separate passes, against AdamW zeroing what it reads (zero_grad) with
     * the sum of squares still a pass (in training it is taken as backward finishes each range) */
    st_adamw_range tail = {p, pg, pm, pv, NULL, np, 1e-4f, 0.1f, 3, NULL};
    for (int round = 0; round < 3; round++) {
        tail.zero_grad = NULL;
        TIME("tail 16M: zero + sumsq + adamw_multi", 0, 9 * np * 4, {
            be->memset0(pg, np * 4);
            sink += be->sumsq(pg, np);
            be->adamw_multi(&tail, 1, 0.9f, 0.95f, 1e-8f, 1.0f);
        });
        tail.zero_grad = pg;
        TIME("tail 16M: sumsq + adamw_multi(zero_grad)", 0, 8 * np * 4, {
            sink += be->sumsq(pg, np);
            be->adamw_multi(&tail, 1, 0.9f, 0.95f, 1e-8f, 1.0f);
        });
    }
    int8_t *q8 = (int8_t *)be->alloc(np);
    TIME("dequant_int8 16M", 0, 5 * np, be->dequant_int8(p, q8, pg, np, 64));
    TIME("dequant_nf4 16M", 0, 4.5 * np, be->dequant_nf4(p, (const uint8_t *)q8, pg, np, 64));
    (void)sink;
    return 0;
}
