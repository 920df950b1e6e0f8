/* gpu_check.c — checks every CUDA kernel against its CPU twin and times both.
 *
 *   gpu_check [--device N] [--seed S]
 *
 * For each kernel of the backend table (and the CUDA-only extras) it builds random inputs, runs the
 * CPU backend on host copies and the CUDA backend on device copies, and prints one line:
 *   kernel name, max relative error, GPU time (ms), CPU time (ms), tolerance, ok/FAIL.
 * Relative error of an output element: |gpu - cpu| / max(|cpu|, 1e-3 * max|cpu|, 1e-20), so values
 * near zero are judged against the scale of the whole tensor. Exit status: 0 all within tolerance,
 * 1 some kernel failed (or a CUDA error), 2 no check possible (no device/driver, or no CPU backend
 * linked): then one line says why. matmul_bf16 is checked against the CPU twin (kernels/cpu/cpu_bf16.c). Times are single cold-ish runs (after one matmul warm-up), for
 * orientation, not benchmarks. Builds without CUDA too (it then always exits 2). */
#include "common/error.h"
#include "common/util.h"
#include "kernels/kernels.h"
#ifdef ST_HAVE_CUDA
#include "kernels/cuda/bf16_host.h"
#include "kernels/cuda/cuda_extras.h"
#endif

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The CPU backend is merged from another branch; until then this resolves to NULL instead of failing
 * the link. */
#pragma weak st_backend_cpu

static const st_backend *G, *C; /* gpu, cpu */
static int failures, checked;

/* ---------------------------------------------------------------- helpers */

static uint64_t rng_state = 0x9E3779B97F4A7C15ULL;
static float frand(void) { /* uniform [-1, 1) */
    rng_state ^= rng_state << 13, rng_state ^= rng_state >> 7, rng_state ^= rng_state << 17;
    return (float)((rng_state >> 40) * (1.0 / 8388608.0)) - 1.0f;
}

static float *hrand(size_t n, float scale) {
    float *p = malloc(n * sizeof(float) + 1);
    if (!p) { fprintf(stderr, "gpu_check: out of host memory\n"); exit(2); }
    for (size_t i = 0; i < n; i++) p[i] = frand() * scale;
    return p;
}

static void *dev_from(const void *host, size_t bytes) {
    void *d = G->alloc(bytes);
    if (!d) { fprintf(stderr, "gpu_check: device allocation of %zu bytes failed\n", bytes); exit(2); }
    if (host) G->copy_to_device(d, host, bytes);
    return d;
}

static float *fetch(const float *dev, size_t n) {
    float *h = malloc(n * sizeof(float) + 1);
    if (!h) { fprintf(stderr, "gpu_check: out of host memory\n"); exit(2); }
    G->copy_to_host(h, dev, n * sizeof(float));
    return h;
}

static double rel_err(const float *gpu, const float *cpu, size_t n) {
    double maxabs = 0.0, worst = 0.0;
    for (size_t i = 0; i < n; i++) maxabs = fmax(maxabs, fabs(cpu[i]));
    double floor_ = fmax(1e-3 * maxabs, 1e-20);
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)gpu[i] - cpu[i]);
        if (isnan(gpu[i]) != isnan(cpu[i])) return INFINITY;
        double e = d / fmax(fabs(cpu[i]), floor_);
        if (e > worst) worst = e;
    }
    return worst;
}

/* Error of a device output against a host reference (frees the fetched copy). */
static double dev_err(const float *dev, const float *cpu, size_t n) {
    float *g = fetch(dev, n);
    double e = rel_err(g, cpu, n);
    free(g);
    return e;
}

static void report(const char *name, double err, double gpu_s, double cpu_s, double tol) {
    int ok = err <= tol;
    checked++;
    if (!ok) failures++;
    printf("%-22s max_rel_err %9.2e  gpu %9.3f ms  cpu %9.3f ms  tol %.0e  %s\n", name, err, gpu_s * 1e3,
           cpu_s * 1e3, tol, ok ? "ok" : "FAIL");
}

static double t0;
static void tick(void) { G->synchronize(), t0 = st_now(); }
static double tock_gpu(void) { G->synchronize(); return st_now() - t0; }
static double tock_cpu(void) { return st_now() - t0; }

/* shapes: small enough for seconds on a laptop CPU, big enough to cross tile and block boundaries */
enum { B = 2, T = 80, H = 4, KVH = 2, HD = 64, CH = 256, V = 1000, FF = 344 };
#define NROWS (B * T)

/* ---------------------------------------------------------------- checks */

static void check_matmul(void) {
    const int m = 96, n = 80, k = 136;
    for (int ta = 0; ta <= 1; ta++)
        for (int tb = 0; tb <= 1; tb++) {
            float *a = hrand((size_t)m * k, 1), *b = hrand((size_t)k * n, 1), *c = hrand((size_t)m * n, 1);
            float *da = dev_from(a, sizeof(float) * m * k), *db = dev_from(b, sizeof(float) * k * n);
            float *dc = dev_from(c, sizeof(float) * m * n);
            G->matmul(dc, da, db, m, n, k, ta, tb, 0.5f, 1.0f); /* warm-up: cuBLASLt heuristics */
            G->copy_to_device(dc, c, sizeof(float) * m * n);
            tick();
            G->matmul(dc, da, db, m, n, k, ta, tb, 0.5f, 1.0f);
            double tg = tock_gpu();
            tick();
            C->matmul(c, a, b, m, n, k, ta, tb, 0.5f, 1.0f);
            double tc = tock_cpu();
            char name[32];
            snprintf(name, sizeof name, "matmul_%c%c", ta ? 'T' : 'N', tb ? 'T' : 'N');
            report(name, dev_err(dc, c, (size_t)m * n), tg, tc, 1e-4);
            G->free(da), G->free(db), G->free(dc), free(a), free(b), free(c);
        }
}

/* Mixed precision: GPU matmul_bf16 (bf16 operands in scratch, cuBLASLt fp32 accumulation) against the
 * CPU twin (rounded fp32 copies, fp32 sgemm). Both multiply the same bf16 values exactly and differ only
 * in the order of fp32 additions. The last case puts C at a 4-byte offset (sub-tensor outputs). To show
 * the GPU really rounded, the result must also be clearly away from the plain fp32 product. */
static void check_matmul_bf16(void) {
    const int m = 96, n = 80, k = 136;
    for (int v = 0; v < 5; v++) {
        int ta = v & 1, tb = (v >> 1) & 1, off = v == 4;
        float *a = hrand((size_t)m * k, 1), *b = hrand((size_t)k * n, 1), *c = hrand((size_t)m * n, 1);
        float *c32 = malloc(sizeof(float) * m * n);
        memcpy(c32, c, sizeof(float) * m * n);
        size_t ns = st_matmul_bf16_scratch_floats(m, n, k);
        float *hs = malloc(ns * sizeof(float)), *ds = dev_from(NULL, ns * sizeof(float));
        float *da = dev_from(a, sizeof(float) * m * k), *db = dev_from(b, sizeof(float) * k * n);
        float *dcbuf = dev_from(NULL, sizeof(float) * (m * n + 1)), *dc = dcbuf + off;
        G->copy_to_device(dc, c, sizeof(float) * m * n);
        G->matmul_bf16(dc, st_mm_f32(da), st_mm_f32(db), NULL, m, n, k, ta, tb, 0.5f, 1.0f, ds); /* warm-up: cuBLASLt heuristics */
        G->copy_to_device(dc, c, sizeof(float) * m * n);
        tick();
        G->matmul_bf16(dc, st_mm_f32(da), st_mm_f32(db), NULL, m, n, k, ta, tb, 0.5f, 1.0f, ds);
        double tg = tock_gpu();
        tick();
        C->matmul_bf16(c, st_mm_f32(a), st_mm_f32(b), NULL, m, n, k, ta, tb, 0.5f, 1.0f, hs);
        double tc = tock_cpu();
        C->matmul(c32, a, b, m, n, k, ta, tb, 0.5f, 1.0f);
        double vs_fp32 = dev_err(dc, c32, (size_t)m * n);
        char name[40];
        snprintf(name, sizeof name, "matmul_bf16_%c%c%s", ta ? 'T' : 'N', tb ? 'T' : 'N', off ? "_offC" : "");
        double err = dev_err(dc, c, (size_t)m * n);
        if (vs_fp32 < 1e-3) { /* no rounding happened on the GPU: make the line fail */
            printf("  %s: only %.2e from the unrounded fp32 product: operands were not rounded\n", name, vs_fp32);
            err = INFINITY;
        }
        report(name, err, tg, tc, 1e-4);
        G->free(da), G->free(db), G->free(dcbuf), G->free(ds);
        free(a), free(b), free(c), free(c32), free(hs);
    }
}

static void check_bias(void) {
    size_t n = (size_t)NROWS * CH;
    float *y = hrand(n, 1), *bias = hrand(CH, 1), *db = hrand(CH, 1);
    float *dy = dev_from(y, n * 4), *dbias = dev_from(bias, CH * 4), *ddb = dev_from(db, CH * 4);
    tick(); G->bias_add(dy, dbias, NROWS, CH); double tg = tock_gpu();
    tick(); C->bias_add(y, bias, NROWS, CH); double tc = tock_cpu();
    report("bias_add", dev_err(dy, y, n), tg, tc, 1e-6);
    tick(); G->bias_bwd(ddb, dy, NROWS, CH); tg = tock_gpu();
    tick(); C->bias_bwd(db, y, NROWS, CH); tc = tock_cpu();
    report("bias_bwd", dev_err(ddb, db, CH), tg, tc, 1e-5);
    G->free(dy), G->free(dbias), G->free(ddb), free(y), free(bias), free(db);
}

static void check_elementwise(void) {
    size_t n = 100003;
    float *a = hrand(n, 1), *b = hrand(n, 1), *out = hrand(n, 1);
    float *da = dev_from(a, n * 4), *db = dev_from(b, n * 4), *dout = dev_from(NULL, n * 4);
    double tg, tc;
    tick(); G->add(dout, da, db, n); tg = tock_gpu();
    tick(); C->add(out, a, b, n); tc = tock_cpu();
    report("add", dev_err(dout, out, n), tg, tc, 1e-7);
    tick(); G->accumulate(da, db, n); tg = tock_gpu();
    tick(); C->accumulate(a, b, n); tc = tock_cpu();
    report("accumulate", dev_err(da, a, n), tg, tc, 1e-7);
    tick(); G->scale(da, 0.37f, n); tg = tock_gpu();
    tick(); C->scale(a, 0.37f, n); tc = tock_cpu();
    report("scale", dev_err(da, a, n), tg, tc, 1e-7);
    double sg, sc;
    tick(); sg = G->sumsq(da, n); tg = tock_gpu();
    tick(); sc = C->sumsq(a, n); tc = tock_cpu();
    report("sumsq", fabs(sg - sc) / fmax(fabs(sc), 1e-30), tg, tc, 1e-6);
    G->free(da), G->free(db), G->free(dout), free(a), free(b), free(out);
}

static void check_norms(void) {
    size_t n = (size_t)NROWS * CH;
    float *x = hrand(n, 2), *w = hrand(CH, 1), *b = hrand(CH, 1), *out = hrand(n, 1);
    float *mean = hrand(NROWS, 1), *rstd = hrand(NROWS, 1), *dout = hrand(n, 1), *dx = hrand(n, 1);
    float *dw = hrand(CH, 1), *db = hrand(CH, 1);
    float *gx = dev_from(x, n * 4), *gw = dev_from(w, CH * 4), *gb = dev_from(b, CH * 4), *gout = dev_from(NULL, n * 4);
    float *gmean = dev_from(NULL, NROWS * 4), *grstd = dev_from(NULL, NROWS * 4), *gdout = dev_from(dout, n * 4);
    float *gdx = dev_from(dx, n * 4), *gdw = dev_from(dw, CH * 4), *gdb = dev_from(db, CH * 4);
    double tg, tc, e;

    tick(); G->layernorm_fwd(gout, gmean, grstd, gx, gw, gb, NROWS, CH, 1e-5f); tg = tock_gpu();
    tick(); C->layernorm_fwd(out, mean, rstd, x, w, b, NROWS, CH, 1e-5f); tc = tock_cpu();
    e = fmax(dev_err(gout, out, n), fmax(dev_err(gmean, mean, NROWS), dev_err(grstd, rstd, NROWS)));
    report("layernorm_fwd", e, tg, tc, 1e-4);
    tick(); G->layernorm_bwd(gdx, gdw, gdb, gdout, gx, gw, gmean, grstd, NROWS, CH); tg = tock_gpu();
    tick(); C->layernorm_bwd(dx, dw, db, dout, x, w, mean, rstd, NROWS, CH); tc = tock_cpu();
    e = fmax(dev_err(gdx, dx, n), fmax(dev_err(gdw, dw, CH), dev_err(gdb, db, CH)));
    report("layernorm_bwd", e, tg, tc, 1e-3);

    tick(); G->rmsnorm_fwd(gout, grstd, gx, gw, NROWS, CH, 1e-6f); tg = tock_gpu();
    tick(); C->rmsnorm_fwd(out, rstd, x, w, NROWS, CH, 1e-6f); tc = tock_cpu();
    report("rmsnorm_fwd", fmax(dev_err(gout, out, n), dev_err(grstd, rstd, NROWS)), tg, tc, 1e-4);
    tick(); G->rmsnorm_bwd(gdx, gdw, gdout, gx, gw, grstd, NROWS, CH); tg = tock_gpu();
    tick(); C->rmsnorm_bwd(dx, dw, dout, x, w, rstd, NROWS, CH); tc = tock_cpu();
    report("rmsnorm_bwd", fmax(dev_err(gdx, dx, n), dev_err(gdw, dw, CH)), tg, tc, 1e-3);

#ifdef ST_HAVE_CUDA
    /* fused residual add + RMSNorm == add then rmsnorm_fwd on the CPU */
    float *delta = hrand(n, 1), *gdelta = dev_from(delta, n * 4);
    tick(); st_cuda_residual_rmsnorm_fwd(gx, gout, grstd, gdelta, gw, NROWS, CH, 1e-6f); tg = tock_gpu();
    tick(); C->add(x, x, delta, n); C->rmsnorm_fwd(out, rstd, x, w, NROWS, CH, 1e-6f); tc = tock_cpu();
    e = fmax(dev_err(gx, x, n), fmax(dev_err(gout, out, n), dev_err(grstd, rstd, NROWS)));
    report("residual_rmsnorm_fwd*", e, tg, tc, 1e-4);
    G->free(gdelta), free(delta);
#endif
    G->free(gx), G->free(gw), G->free(gb), G->free(gout), G->free(gmean), G->free(grstd), G->free(gdout);
    G->free(gdx), G->free(gdw), G->free(gdb);
    free(x), free(w), free(b), free(out), free(mean), free(rstd), free(dout), free(dx), free(dw), free(db);
}

static void check_rope_attention(void) {
    size_t row = (size_t)(H + 2 * KVH) * HD, n = (size_t)NROWS * row, nout = (size_t)NROWS * H * HD;
    size_t nlse = (size_t)B * H * T, half = HD / 2;
    float *cs = malloc(sizeof(float) * T * half), *sn = malloc(sizeof(float) * T * half);
    st_rope_tables(cs, sn, T, HD, 10000.0f);
    float *qkv = hrand(n, 1), *out = hrand(nout, 1), *lse = hrand(nlse, 1), *dout = hrand(nout, 1);
    float *dqkv = hrand(n, 1);
    float *gcs = dev_from(cs, T * half * 4), *gsn = dev_from(sn, T * half * 4), *gqkv = dev_from(qkv, n * 4);
    float *gout = dev_from(NULL, nout * 4), *glse = dev_from(NULL, nlse * 4), *gdout = dev_from(dout, nout * 4);
    float *gdqkv = dev_from(NULL, n * 4);
    double tg, tc;

    tick(); G->rope_fwd(gqkv, gcs, gsn, B, T, H, KVH, HD); tg = tock_gpu();
    tick(); C->rope_fwd(qkv, cs, sn, B, T, H, KVH, HD); tc = tock_cpu();
    report("rope_fwd", dev_err(gqkv, qkv, n), tg, tc, 1e-5);

    tick(); G->attention_fwd(gout, glse, gqkv, B, T, H, KVH, HD); tg = tock_gpu();
    tick(); C->attention_fwd(out, lse, qkv, B, T, H, KVH, HD); tc = tock_cpu();
    report("attention_fwd", fmax(dev_err(gout, out, nout), dev_err(glse, lse, nlse)), tg, tc, 1e-4);

    tick(); G->attention_bwd(gdqkv, gdout, gqkv, gout, glse, B, T, H, KVH, HD); tg = tock_gpu();
    tick(); C->attention_bwd(dqkv, dout, qkv, out, lse, B, T, H, KVH, HD); tc = tock_cpu();
    report("attention_bwd", dev_err(gdqkv, dqkv, n), tg, tc, 1e-3);

    tick(); G->rope_bwd(gdqkv, gcs, gsn, B, T, H, KVH, HD); tg = tock_gpu();
    tick(); C->rope_bwd(dqkv, cs, sn, B, T, H, KVH, HD); tc = tock_cpu();
    report("rope_bwd", dev_err(gdqkv, dqkv, n), tg, tc, 1e-3);

    G->free(gcs), G->free(gsn), G->free(gqkv), G->free(gout), G->free(glse), G->free(gdout), G->free(gdqkv);
    free(cs), free(sn), free(qkv), free(out), free(lse), free(dout), free(dqkv);
}

static void check_activations(void) {
    size_t n = (size_t)NROWS * FF;
    float *x = hrand(n, 4), *out = hrand(n, 1), *dout = hrand(n, 1), *dx = hrand(n, 1);
    float *gu = hrand(2 * n, 4), *dgu = hrand(2 * n, 1);
    float *gx = dev_from(x, n * 4), *gout = dev_from(NULL, n * 4), *gdout = dev_from(dout, n * 4);
    float *gdx = dev_from(NULL, n * 4), *ggu = dev_from(gu, 2 * n * 4), *gdgu = dev_from(NULL, 2 * n * 4);
    double tg, tc;
    tick(); G->gelu_fwd(gout, gx, n); tg = tock_gpu();
    tick(); C->gelu_fwd(out, x, n); tc = tock_cpu();
    report("gelu_fwd", dev_err(gout, out, n), tg, tc, 1e-5);
    tick(); G->gelu_bwd(gdx, gdout, gx, n); tg = tock_gpu();
    tick(); C->gelu_bwd(dx, dout, x, n); tc = tock_cpu();
    report("gelu_bwd", dev_err(gdx, dx, n), tg, tc, 1e-5);
    tick(); G->swiglu_fwd(gout, ggu, NROWS, FF); tg = tock_gpu();
    tick(); C->swiglu_fwd(out, gu, NROWS, FF); tc = tock_cpu();
    report("swiglu_fwd", dev_err(gout, out, n), tg, tc, 1e-5);
    tick(); G->swiglu_bwd(gdgu, gdout, ggu, NROWS, FF); tg = tock_gpu();
    tick(); C->swiglu_bwd(dgu, dout, gu, NROWS, FF); tc = tock_cpu();
    report("swiglu_bwd", dev_err(gdgu, dgu, 2 * n), tg, tc, 1e-5);
    G->free(gx), G->free(gout), G->free(gdout), G->free(gdx), G->free(ggu), G->free(gdgu);
    free(x), free(out), free(dout), free(dx), free(gu), free(dgu);
}

static void check_embedding(void) {
    size_t n = (size_t)NROWS * CH;
    int32_t tokens[NROWS];
    for (int i = 0; i < NROWS; i++) tokens[i] = (int32_t)((frand() + 1.0f) * 0.5f * 50) % 50; /* repeats */
    float *wte = hrand((size_t)V * CH, 1), *wpe = hrand((size_t)T * CH, 1), *out = hrand(n, 1);
    float *dout = hrand(n, 1), *dwte = hrand((size_t)V * CH, 1), *dwpe = hrand((size_t)T * CH, 1);
    int32_t *gtok = dev_from(tokens, sizeof tokens);
    float *gwte = dev_from(wte, (size_t)V * CH * 4), *gwpe = dev_from(wpe, (size_t)T * CH * 4);
    float *gout = dev_from(NULL, n * 4), *gdout = dev_from(dout, n * 4);
    float *gdwte = dev_from(dwte, (size_t)V * CH * 4), *gdwpe = dev_from(dwpe, (size_t)T * CH * 4);
    double tg, tc;
    tick(); G->embedding_fwd(gout, gtok, gwte, gwpe, B, T, CH); tg = tock_gpu();
    tick(); C->embedding_fwd(out, tokens, wte, wpe, B, T, CH); tc = tock_cpu();
    report("embedding_fwd", dev_err(gout, out, n), tg, tc, 1e-7);
    tick(); G->embedding_bwd(gdwte, gdwpe, gdout, gtok, B, T, CH); tg = tock_gpu();
    tick(); C->embedding_bwd(dwte, dwpe, dout, tokens, B, T, CH); tc = tock_cpu();
    report("embedding_bwd", fmax(dev_err(gdwte, dwte, (size_t)V * CH), dev_err(gdwpe, dwpe, (size_t)T * CH)), tg,
           tc, 1e-6);
    G->free(gtok), G->free(gwte), G->free(gwpe), G->free(gout), G->free(gdout), G->free(gdwte), G->free(gdwpe);
    free(wte), free(wpe), free(out), free(dout), free(dwte), free(dwpe);
}

static void check_cross_entropy(void) {
    size_t n = (size_t)NROWS * V;
    float *logits = hrand(n, 5), *loss = hrand(NROWS, 1), weight[NROWS];
    int32_t target[NROWS];
    for (int i = 0; i < NROWS; i++) {
        weight[i] = (i % 7 == 3) ? 0.0f : (0.5f + 0.5f * (i % 3)) / NROWS; /* masked rows + task weights */
        target[i] = weight[i] == 0.0f ? -100 : (int32_t)((frand() + 1.0f) * 0.5f * V) % V;
    }
    float *glogits = dev_from(logits, n * 4), *gloss = dev_from(NULL, NROWS * 4);
    float *gweight = dev_from(weight, sizeof weight);
    int32_t *gtarget = dev_from(target, sizeof target);
    double tg, tc, sg, sc;
    tick(); sg = G->cross_entropy(glogits, gloss, gtarget, gweight, NROWS, V); tg = tock_gpu();
    tick(); sc = C->cross_entropy(logits, loss, target, weight, NROWS, V); tc = tock_cpu();
    double e = fmax(dev_err(glogits, logits, n), dev_err(gloss, loss, NROWS));
    e = fmax(e, fabs(sg - sc) / fmax(fabs(sc), 1e-30));
    report("cross_entropy", e, tg, tc, 1e-4);
    G->free(glogits), G->free(gloss), G->free(gweight), G->free(gtarget), free(logits), free(loss);
}

static void check_adamw(void) {
    size_t n = 50001;
    float *p = hrand(n, 1), *g = hrand(n, 1), *m = hrand(n, 0.1f), *v = hrand(n, 0.1f);
    for (size_t i = 0; i < n; i++) v[i] = fabsf(v[i]);
    float *gp = dev_from(p, n * 4), *gg = dev_from(g, n * 4), *gm = dev_from(m, n * 4), *gv = dev_from(v, n * 4);
    double tg, tc;
    tick(); G->adamw(gp, gg, gm, gv, n, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 0.5f, 7); tg = tock_gpu();
    tick(); C->adamw(p, g, m, v, n, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 0.5f, 7); tc = tock_cpu();
    double e = fmax(dev_err(gp, p, n), fmax(dev_err(gm, m, n), dev_err(gv, v, n)));
    report("adamw", e, tg, tc, 1e-5);
#ifdef ST_HAVE_CUDA
    /* multi-tensor fp32 master -> bf16 copy: two tensors with their own lr/wd, == two adamw calls */
    size_t n1 = 20000, n2 = n - n1;
    uint16_t *gbf = dev_from(NULL, n * 2);
    st_adamw_tensor ts[2] = {
        {gp, gg, gm, gv, gbf, n1, 2e-3f, 0.1f},
        {gp + n1, gg + n1, gm + n1, gv + n1, gbf + n1, n2, 1e-3f, 0.0f},
    };
    tick(); st_cuda_adamw_multi_bf16(ts, 2, 0.9f, 0.95f, 1e-8f, 0.5f, 8); tg = tock_gpu();
    tick();
    C->adamw(p, g, m, v, n1, 2e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 0.5f, 8);
    C->adamw(p + n1, g + n1, m + n1, v + n1, n2, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.0f, 0.5f, 8);
    tc = tock_cpu();
    uint16_t *bf = malloc(n * 2);
    G->copy_to_host(bf, gbf, n * 2);
    float *pbf = malloc(n * 4), *pref = fetch(gp, n);
    for (size_t i = 0; i < n; i++) { /* the copy must be exactly the bf16 rounding of the GPU's fp32 value */
        pbf[i] = st_bf16_bits_to_float(bf[i]);
        pref[i] = st_bf16_bits_to_float(st_float_to_bf16_bits(pref[i]));
    }
    e = fmax(dev_err(gp, p, n), rel_err(pbf, pref, n));
    report("adamw_multi_bf16*", e, tg, tc, 1e-5);
    G->free(gbf), free(bf), free(pbf), free(pref);
#endif
    G->free(gp), G->free(gg), G->free(gm), G->free(gv), free(p), free(g), free(m), free(v);
}

static void check_dequant(void) {
    size_t n = 8192 + 64;
    int block = 64;
    size_t nb = (n + block - 1) / block;
    int8_t *q = malloc(n);
    uint8_t *packed = malloc(n / 2 + 1);
    for (size_t i = 0; i < n; i++) q[i] = (int8_t)(frand() * 127);
    for (size_t i = 0; i < n / 2 + 1; i++) packed[i] = (uint8_t)((frand() + 1.0f) * 128);
    float *scale = hrand(nb, 0.05f), *out = hrand(n, 1);
    void *gq = dev_from(q, n), *gpk = dev_from(packed, n / 2 + 1);
    float *gscale = dev_from(scale, nb * 4), *gout = dev_from(NULL, n * 4);
    double tg, tc;
    tick(); G->dequant_int8(gout, gq, gscale, n, block); tg = tock_gpu();
    tick(); C->dequant_int8(out, q, scale, n, block); tc = tock_cpu();
    report("dequant_int8", dev_err(gout, out, n), tg, tc, 1e-7);
    tick(); G->dequant_nf4(gout, gpk, gscale, n, block); tg = tock_gpu();
    tick(); C->dequant_nf4(out, packed, scale, n, block); tc = tock_cpu();
    report("dequant_nf4", dev_err(gout, out, n), tg, tc, 1e-7);
    G->free(gq), G->free(gpk), G->free(gscale), G->free(gout), free(q), free(packed), free(scale), free(out);
}

int main(int argc, char **argv) {
    int device = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--device") == 0 && i + 1 < argc) device = atoi(argv[++i]);
        else if (strcmp(argv[i], "--seed") == 0 && i + 1 < argc) rng_state = strtoull(argv[++i], NULL, 10) | 1;
        else {
            fprintf(stderr, "usage: gpu_check [--device N] [--seed S]\n");
            return 2;
        }
    }
    G = st_backend_cuda(device);
    if (!G) {
        printf("gpu_check: nothing checked: %s\n", st_error());
        return 2;
    }
    if (!st_backend_cpu) {
        printf("gpu_check: nothing checked: this build has no CPU backend (kernels/cpu) to compare with\n");
        return 2;
    }
    C = st_backend_cpu(0);
    if (!C) {
        printf("gpu_check: nothing checked: CPU backend failed: %s\n", st_error());
        return 2;
    }
    printf("gpu_check: CUDA device %d vs CPU; * = CUDA-only extra checked against a CPU composition\n", device);
    check_matmul();
    check_matmul_bf16();
    check_bias();
    check_elementwise();
    check_norms();
    check_rope_attention();
    check_activations();
    check_embedding();
    check_cross_entropy();
    check_adamw();
    check_dequant();
    G->synchronize();
#ifdef ST_HAVE_CUDA
    if (st_cuda_status() != 0) {
        printf("gpu_check: CUDA error: %s\n", st_error());
        return 1;
    }
#endif
    printf("gpu_check: %d of %d kernels within tolerance\n", checked - failures, checked);
    return failures ? 1 : 0;
}
