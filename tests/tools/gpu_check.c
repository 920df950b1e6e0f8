/* gpu_check.c — checks every CUDA kernel against its CPU twin, then a training step, and times both.
 *
 *   gpu_check [--device N] [--seed S] [--self-test] [model/step flags, see usage()]
 *
 * Kernels: for each entry of the backend table (and the CUDA-only extras) it builds random inputs, runs
 * the CPU backend on host copies and the backend under test on device copies, and prints one line:
 *   kernel name, max relative error, backend time (ms), CPU time (ms), tolerance, ok/FAIL.
 * Relative error of an output element: |gpu - cpu| / max(|cpu|, 1e-3 * max|cpu|, 1e-20), so values
 * near zero are judged against the scale of the whole tensor. to_bf16/from_bf16 are bit-exact checks:
 * their "error" is the number of differing elements (tolerance 0). matmul_bf16 runs every operand kind
 * (fp32 / bf16 for A and B), every transpose, with and without the bias epilogue. The dequant group also
 * runs QLoRA's per-matmul path end to end (one nf4 + double-quantized matrix dequantized, rounded to bf16,
 * read by the forward and input-gradient matmuls: check_qlora_matmul). The int8 group (a distillation teacher's
 * w8_pack + matmul_w8a8) is a bit-exact check, then a bound against the fp64 product of the unquantized
 * operands (check_w8a8_case). The fused dequantize-matmul qmatmul (nf4 / int8 tiles dequantized in shared
 * memory, tensor cores under bf16) is checked against its CPU twin, bounded per output by 2 K 2^-24 sum |x w|
 * (check_qmatmul; --self-test runs its host side on the twin).
 * Training step: the same small Llama (identical random weights, tokens and AdamW settings) trains a few
 * steps on the backend under test and on the CPU backend, for precision fp32 and bf16; prints each step's
 * loss on both sides, the max relative loss difference (FAIL above tolerance), the backend's median step
 * time, tokens/s and MFU = flops_per_token * tokens/s / peak, with the peak measured in the same run by
 * timing a large matmul on the backend (fp32 matmul for fp32, matmul_bf16 on bf16 operands for bf16).
 * --self-test (no GPU needed; CI runs it): the backend under test is "cpu+noise", the CPU backend whose
 * matmul / matmul_bf16 outputs get a deterministic relative noise of up to 4 fp32 ulps per element — what
 * another summation order (a GPU's) does — so the errors and loss differences are small but not 0 and the
 * tolerances are exercised, including the training losses after several AdamW steps. It also checks that
 * the comparisons can fail: a perturbed matmul_bf16 output, a perturbed to_bf16 result and a perturbed
 * loss must each be reported as a failure. Default sizes are small in this mode.
 * Exit status: 0 all within tolerance, 1 some check failed (or a CUDA error), 2 no check possible (no
 * device/driver, bad arguments): then one line says why. Times are for
 * orientation, not benchmarks. Builds without CUDA too (then only --self-test can check anything). */
#include "common/error.h"
#include "common/util.h"
#include "kernels/bf16.h" /* plain C: the host rounding rule */
#include "kernels/kernels.h"
#include "worker/model.h"
#include "worker/optim.h"
#ifdef ST_HAVE_CUDA
#include "kernels/cuda/cuda_extras.h"
#endif

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const st_backend *G, *C; /* backend under test ("gpu"), CPU reference */
static int failures, checked;
static int self_test; /* G is cpu+noise: no CUDA-only extras, and the failure paths are tested */

/* ---------------------------------------------------------------- helpers */

static uint64_t rng_state = 0x9E3779B97F4A7C15ULL;
static float frand(void) { /* uniform [-1, 1) */
    rng_state ^= rng_state << 13, rng_state ^= rng_state >> 7, rng_state ^= rng_state << 17;
    return (float)((rng_state >> 40) * (1.0 / 8388608.0)) - 1.0f;
}

static uint32_t rand_bits(void) {
    rng_state ^= rng_state << 13, rng_state ^= rng_state >> 7, rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state >> 32);
}

static void *xmalloc(size_t bytes) {
    void *p = malloc(bytes + 1);
    if (!p) { fprintf(stderr, "gpu_check: out of host memory\n"); exit(2); }
    return p;
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

/* Every check ends here: the backend's status (kernels.h: synchronizes, then the first recorded failure)
 * must be clean too, so a kernel that failed (no cuBLASLt algorithm, a shape it refuses, a launch error)
 * is a FAIL naming it even when its output happened to compare well. */
static void report(const char *name, double err, double gpu_s, double cpu_s, double tol) {
    int status = G->status();
    int ok = err <= tol && status == 0;
    checked++;
    if (!ok) failures++;
    printf("%-36s max_rel_err %9.2e  gpu %9.3f ms  cpu %9.3f ms  tol %.0e  %s\n", name, err, gpu_s * 1e3,
           cpu_s * 1e3, tol, ok ? "ok" : "FAIL");
    if (status) printf("%-36s device failure: %s  FAIL\n", name, st_error());
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

/* Self-test only: a check fed a deliberately wrong result must report a failure. */
static void expect_caught(const char *what, double err, double tol) {
    checked++;
    if (err > tol) {
        printf("self-test: a perturbed %s was caught (%.1e > tol %.0e)\n", what, err, tol);
    } else {
        failures++;
        printf("self-test: FAIL: a perturbed %s was not caught (%.1e <= tol %.0e)\n", what, err, tol);
    }
}

/* Elements whose bit patterns differ (the "error" of a bit-exact check). */
static double bit_diffs(const void *x, const void *y, size_t n, size_t elem_bytes) {
    const unsigned char *a = x, *b = y;
    size_t diffs = 0;
    for (size_t i = 0; i < n; i++) diffs += memcmp(a + i * elem_bytes, b + i * elem_bytes, elem_bytes) != 0;
    return (double)diffs;
}

/* to_bf16 over random fp32 bit patterns (NaNs with payloads, infinities, subnormals) led by the edge cases
 * of round-to-nearest-even; from_bf16 over all 65536 bf16 patterns. Both bit-exact against the CPU twin
 * (kernels/bf16.h is the rule). */
static void check_bf16_storage(void) {
    static const uint32_t edges[] = {
        0x3f808000u, 0x3f818000u, 0x3f80ffffu, 0x3f807fffu, /* ties to even (down, up), just above/below */
        0x7f7fffffu, 0x7f7f7fffu, 0x7f7f8000u,              /* FLT_MAX overflows to inf; below; tie -> inf */
        0x00000001u, 0x00008000u, 0x00018000u, 0x007fffffu, /* subnormals, subnormal ties */
        0x80000000u, 0x00000000u, 0x7f800000u, 0xff800000u, /* zeros, infinities */
        0x7fc00000u, 0x7f800001u, 0xffffffffu, 0x7fa00000u, 0xff812345u, /* quiet and signalling NaNs */
    };
    size_t n = 200003, ne = sizeof edges / sizeof edges[0];
    float *src = xmalloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) {
        uint32_t u = i < ne ? edges[i] : rand_bits();
        memcpy(&src[i], &u, sizeof u);
    }
    uint16_t *ref = xmalloc(n * 2), *got = xmalloc(n * 2);
    float *gsrc = dev_from(src, n * sizeof(float));
    uint16_t *gdst = dev_from(NULL, n * 2);
    double tg, tc;
    tick(); G->to_bf16(gdst, gsrc, n); tg = tock_gpu();
    tick(); C->to_bf16(ref, src, n); tc = tock_cpu();
    G->copy_to_host(got, gdst, n * 2);
    report("to_bf16 (bits differ)", bit_diffs(got, ref, n, 2), tg, tc, 0);
    if (self_test) {
        got[ne + 7] ^= 1; /* one bf16 ulp off on one element */
        expect_caught("to_bf16 result", bit_diffs(got, ref, n, 2), 0);
    }
    /* round_bf16: the same inputs rounded in place, kept as fp32 */
    float *rref = xmalloc(n * sizeof(float)), *rgot = xmalloc(n * sizeof(float));
    memcpy(rref, src, n * sizeof(float));
    tick(); G->round_bf16(gsrc, n); tg = tock_gpu();
    tick(); C->round_bf16(rref, n); tc = tock_cpu();
    G->copy_to_host(rgot, gsrc, n * sizeof(float));
    report("round_bf16 (bits differ)", bit_diffs(rgot, rref, n, 4), tg, tc, 0);
    G->free(gsrc), G->free(gdst), free(src), free(ref), free(got), free(rref), free(rgot);

    size_t nb = 65536;
    uint16_t *bits = xmalloc(nb * 2);
    for (size_t i = 0; i < nb; i++) bits[i] = (uint16_t)i;
    float *wide = xmalloc(nb * sizeof(float)), *gwide_h = xmalloc(nb * sizeof(float));
    uint16_t *gbits = dev_from(bits, nb * 2);
    float *gwide = dev_from(NULL, nb * sizeof(float));
    tick(); G->from_bf16(gwide, gbits, nb); tg = tock_gpu();
    tick(); C->from_bf16(wide, bits, nb); tc = tock_cpu();
    G->copy_to_host(gwide_h, gwide, nb * sizeof(float));
    report("from_bf16 (bits differ)", bit_diffs(gwide_h, wide, nb, 4), tg, tc, 0);
    G->free(gbits), G->free(gwide), free(bits), free(wide), free(gwide_h);
}

/* One matmul_bf16 operand: the fp32 values, and when `as_bf16` their bf16 bits (host and device). The
 * device copy starts `odd` elements into its buffer (odd = 1: a 2-byte aligned bf16 sub-tensor). */
typedef struct {
    float *f32;       /* host, unrounded */
    uint16_t *bits;   /* host bf16 bits (as_bf16) */
    void *dbuf;       /* device allocation */
    st_mm_in dev, host;
} mm_operand;

static void operand_make(mm_operand *o, size_t n, int as_bf16, int odd) {
    o->f32 = hrand(n, 1);
    o->bits = NULL;
    if (as_bf16) {
        o->bits = xmalloc(n * 2);
        for (size_t i = 0; i < n; i++) o->bits[i] = st_float_to_bf16_bits(o->f32[i]);
        o->dbuf = dev_from(NULL, (n + 1) * 2);
        uint16_t *d = (uint16_t *)o->dbuf + odd;
        G->copy_to_device(d, o->bits, n * 2);
        o->dev = st_mm_bf16(d), o->host = st_mm_bf16(o->bits);
    } else {
        o->dbuf = dev_from(NULL, (n + 1) * sizeof(float));
        float *d = (float *)o->dbuf + odd;
        G->copy_to_device(d, o->f32, n * sizeof(float));
        o->dev = st_mm_f32(d), o->host = st_mm_f32(o->f32);
    }
}

static void operand_free(mm_operand *o) { G->free(o->dbuf), free(o->f32), free(o->bits); }

typedef struct { double err, vs_fp32, tg, tc; } mm_result;

/* One matmul_bf16 case against the CPU twin. Both sides multiply the same bf16 values exactly and differ
 * only in the order of fp32 additions. off: C and the bias sit 4 bytes into their buffers and a bf16 A 2
 * bytes into its own (sub-tensors of flat buffers). vs_fp32 is the distance from the unrounded fp32
 * product (+ bias): it must be clearly non-zero, or the backend did not round. perturb (self-test): the
 * backend's result is deliberately damaged before comparison. */
static mm_result mm_bf16_case(int a16, int b16, int ta, int tb, int use_bias, int off, int perturb) {
    const int m = 96, n = 80, k = 136;
    size_t nc = (size_t)m * n;
    mm_operand a, b;
    operand_make(&a, (size_t)m * k, a16, off && a16);
    operand_make(&b, (size_t)k * n, b16, 0);
    float *c = hrand(nc, 1), *bias = hrand(n, 1), *c32 = xmalloc(nc * sizeof(float));
    memcpy(c32, c, nc * sizeof(float));
    size_t ns = st_matmul_bf16_scratch_floats(m, n, k);
    float *hs = xmalloc(ns * sizeof(float)), *ds = dev_from(NULL, ns * sizeof(float));
    float *dcbuf = dev_from(NULL, sizeof(float) * (nc + 1)), *dc = dcbuf + off;
    float *dbbuf = dev_from(NULL, sizeof(float) * (n + 1)), *dbias = dbbuf + off;
    G->copy_to_device(dbias, bias, sizeof(float) * n);
    const float *gb = use_bias ? dbias : NULL, *cb = use_bias ? bias : NULL;
    mm_result r;
    G->copy_to_device(dc, c, sizeof(float) * nc);
    G->matmul_bf16(dc, a.dev, b.dev, gb, m, n, k, ta, tb, 0.5f, 1.0f, ds); /* warm-up: cuBLASLt heuristics */
    G->copy_to_device(dc, c, sizeof(float) * nc);
    tick();
    G->matmul_bf16(dc, a.dev, b.dev, gb, m, n, k, ta, tb, 0.5f, 1.0f, ds);
    r.tg = tock_gpu();
    tick();
    C->matmul_bf16(c, a.host, b.host, cb, m, n, k, ta, tb, 0.5f, 1.0f, hs);
    r.tc = tock_cpu();
    C->matmul(c32, a.f32, b.f32, m, n, k, ta, tb, 0.5f, 1.0f);
    if (use_bias) C->bias_add(c32, bias, m, n);
    float *got = fetch(dc, nc);
    r.vs_fp32 = rel_err(got, c32, nc);
    if (perturb) {
        double maxabs = 0;
        for (size_t i = 0; i < nc; i++) maxabs = fmax(maxabs, fabs(c[i]));
        got[nc / 2] += (float)(1.2e-2 * maxabs);
    }
    r.err = rel_err(got, c, nc);
    operand_free(&a), operand_free(&b);
    G->free(ds), G->free(dcbuf), G->free(dbbuf);
    free(c), free(bias), free(c32), free(hs), free(got);
    return r;
}

static void check_matmul_bf16(void) {
    const double tol = 1e-4;
    for (int v = 0; v < 33; v++) { /* 32 = (A kind, B kind, bias, ta, tb); the 33rd: offsets */
        int off = v == 32, a16 = off || (v >> 4 & 1), b16 = !off && (v >> 3 & 1), use_bias = off || (v >> 2 & 1);
        int ta = !off && (v >> 1 & 1), tb = !off && (v & 1);
        mm_result r = mm_bf16_case(a16, b16, ta, tb, use_bias, off, 0);
        char name[48];
        snprintf(name, sizeof name, "matmul_bf16_%c%c A%s B%s%s%s", ta ? 'T' : 'N', tb ? 'T' : 'N', a16 ? "16" : "32",
                 b16 ? "16" : "32", use_bias ? " +bias" : "", off ? " offsets" : "");
        if (r.vs_fp32 < 1e-3) { /* no rounding happened: make the line fail */
            printf("  %s: only %.2e from the unrounded fp32 product: operands were not rounded\n", name, r.vs_fp32);
            r.err = INFINITY;
        }
        report(name, r.err, r.tg, r.tc, tol);
    }
    if (self_test) expect_caught("matmul_bf16 output", mm_bf16_case(0, 1, 1, 0, 1, 0, 1).err, tol);
}

/* DoRA's kernels on a [FF, CH] weight and [NROWS, FF] activations written into columns 5.. of a
 * [NROWS, FF + 9] output: every operation rounded on its own on both sides, so exact */
static void check_dora(void) {
    const int out = FF, in = CH, ld = FF + 9;
    size_t nw = (size_t)out * in, na = (size_t)NROWS * out, ny = (size_t)NROWS * ld;
    float *w = hrand(nw, 1), *ba = hrand(nw, 1), *mg = hrand(out, 1), *c = malloc(out * 4), *inv = malloc(out * 4);
    float *dw = dev_from(w, nw * 4), *dba = dev_from(ba, nw * 4), *dmg = dev_from(mg, out * 4);
    float *dc = G->alloc(out * 4), *dinv = G->alloc(out * 4);
    tick(); G->dora_norm(dc, dinv, dw, dba, dmg, out, in, 0.75f); double tg = tock_gpu();
    tick(); C->dora_norm(c, inv, w, ba, mg, out, in, 0.75f); double tc = tock_cpu();
    report("dora_norm (c)", dev_err(dc, c, out), tg, tc, 0);
    report("dora_norm (1 / norm)", dev_err(dinv, inv, out), tg, tc, 0);
    float *y = hrand(ny, 1), *z = hrand(na, 1), *base = hrand(na, 1), *dy = hrand(na, 1), *gm = hrand(out, 1);
    float *gy = dev_from(y, ny * 4), *gz = dev_from(z, na * 4), *gbase = dev_from(base, na * 4);
    float *gdy = dev_from(dy, na * 4), *ggm = dev_from(gm, out * 4);
    tick(); G->dora_apply(gy + 5, ld, gz, gbase, dc, NROWS, out); tg = tock_gpu();
    tick(); C->dora_apply(y + 5, ld, z, base, c, NROWS, out); tc = tock_cpu();
    report("dora_apply", dev_err(gy, y, ny), tg, tc, 0);
    tick(); G->dora_bwd(ggm, gbase, gdy, gz, dc, dinv, NROWS, out); tg = tock_gpu();
    tick(); C->dora_bwd(gm, base, dy, z, c, inv, NROWS, out); tc = tock_cpu();
    report("dora_bwd (magnitude gradient)", dev_err(ggm, gm, out), tg, tc, 0);
    report("dora_bwd ((c - 1) dy)", dev_err(gbase, base, na), tg, tc, 0);
    report("dora_bwd (c dy)", dev_err(gdy, dy, na), tg, tc, 0);
    tick(); G->scale_rows(dw, dc, out, in); tg = tock_gpu();
    tick(); C->scale_rows(w, c, out, in); tc = tock_cpu();
    report("scale_rows", dev_err(dw, w, nw), tg, tc, 0);
    float *hp[] = {w, ba, mg, c, inv, y, z, base, dy, gm}, *dp[] = {dw, dba, dmg, dc, dinv, gy, gz, gbase, gdy, ggm};
    for (int i = 0; i < 10; i++) free(hp[i]), G->free(dp[i]);
    /* the prompt encoders' activation: ReLU exact; tanh within CUDA tanhf's 2 ulp (and the backward's
     * 1 - r^2 of those values, relative to its size near 0 for |a| large: inputs in [-1, 1]) */
    for (int th = 0; th < 2; th++) {
        float *a = hrand(na, 1), *r = malloc(na * 4), *d = hrand(na, 1);
        float *ga = dev_from(a, na * 4), *gr = G->alloc(na * 4), *gd = dev_from(d, na * 4);
        tick(); G->prompt_act(gr, ga, na, th); tg = tock_gpu();
        tick(); C->prompt_act(r, a, na, th); tc = tock_cpu();
        report(th ? "prompt_act (tanh)" : "prompt_act (relu)", dev_err(gr, r, na), tg, tc, th ? 1e-6 : 0);
        G->copy_to_device(gr, r, na * 4); /* the backward from the same activations */
        tick(); G->prompt_act_bwd(gd, ga, gr, na, th); tg = tock_gpu();
        tick(); C->prompt_act_bwd(d, a, r, na, th); tc = tock_cpu();
        report(th ? "prompt_act_bwd (tanh)" : "prompt_act_bwd (relu)", dev_err(gd, d, na), tg, tc, 0);
        free(a), free(r), free(d), G->free(ga), G->free(gr), G->free(gd);
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
    /* copy_cols: a 37-column block at column 11 of a [NROWS, CH] matrix from a [NROWS, 37] one, copied and
     * accumulated (exact: one add per element) */
    const int cols = 37, col0 = 11;
    float *m = hrand(n, 1), *blk = hrand((size_t)NROWS * cols, 1);
    float *dm = dev_from(m, n * 4), *dblk = dev_from(blk, (size_t)NROWS * cols * 4);
    for (int acc = 0; acc < 2; acc++) {
        tick(); G->copy_cols(dm + col0, CH, dblk, cols, NROWS, cols, acc); tg = tock_gpu();
        tick(); C->copy_cols(m + col0, CH, blk, cols, NROWS, cols, acc); tc = tock_cpu();
        report(acc ? "copy_cols (accumulate)" : "copy_cols", dev_err(dm, m, n), tg, tc, 0);
    }
    tick(); G->copy_cols(dblk, cols, dm + col0, CH, NROWS, cols, 0); tg = tock_gpu();
    tick(); C->copy_cols(blk, cols, m + col0, CH, NROWS, cols, 0); tc = tock_cpu();
    report("copy_cols (gather)", dev_err(dblk, blk, (size_t)NROWS * cols), tg, tc, 0);
    G->free(dm), G->free(dblk), free(m), free(blk);
    /* add_scalar: one fp32 add per element, exact */
    float *x = hrand(n, 1), *dx = dev_from(x, n * 4);
    tick(); G->add_scalar(dx, 0.3125f, n); tg = tock_gpu();
    tick(); C->add_scalar(x, 0.3125f, n); tc = tock_cpu();
    report("add_scalar", dev_err(dx, x, n), tg, tc, 0);
    /* lora_dropout: the mask (64-bit hashes) and x * inv, then add + v in place; exact. T = 80 rows a
     * sequence, a first sample past 2^32, p = 0.3 */
    float *a = hrand(n, 1), *da = dev_from(a, n * 4), *dout = dev_from(x, n * 4);
    uint64_t thresh = (uint64_t)(0.3 * 18446744073709551616.0);
    float inv = (float)(1.0 / 0.7);
    tick(); G->lora_dropout(dout, dx, NULL, NROWS, CH, T, 0x1234567890abcdefull, 5000000000ll, 3, thresh, inv); tg = tock_gpu();
    float *ref = malloc(n * sizeof(float));
    tick(); C->lora_dropout(ref, x, NULL, NROWS, CH, T, 0x1234567890abcdefull, 5000000000ll, 3, thresh, inv); tc = tock_cpu();
    report("lora_dropout", dev_err(dout, ref, n), tg, tc, 0);
    free(ref);
    tick(); G->lora_dropout(da, dx, da, NROWS, CH, T, 0x77ull, 1, 0, thresh, inv); tg = tock_gpu();
    tick(); C->lora_dropout(a, x, a, NROWS, CH, T, 0x77ull, 1, 0, thresh, inv); tc = tock_cpu();
    report("lora_dropout (accumulate)", dev_err(da, a, n), tg, tc, 0);
    G->free(dx), G->free(da), G->free(dout), free(x), free(a);
    check_dora();
}

static void check_elementwise(void) {
    size_t n = 100003;
    float *a = hrand(n, 1);
    float *da = dev_from(a, n * 4);
    double tg, tc;
    double sg, sc;
    tick(); sg = G->sumsq(da, n); tg = tock_gpu();
    tick(); sc = C->sumsq(a, n); tc = tock_cpu();
    report("sumsq", fabs(sg - sc) / fmax(fabs(sc), 1e-30), tg, tc, 1e-6);
    G->free(da), free(a);
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
    if (!self_test) { /* fused residual add + RMSNorm == add then rmsnorm_fwd on the CPU */
        float *delta = hrand(n, 1), *gdelta = dev_from(delta, n * 4);
        tick(); st_cuda_residual_rmsnorm_fwd(gx, gout, grstd, gdelta, gw, NROWS, CH, 1e-6f); tg = tock_gpu();
        tick(); for (size_t i = 0; i < n; i++) x[i] += delta[i];
        C->rmsnorm_fwd(out, rstd, x, w, NROWS, CH, 1e-6f); tc = tock_cpu();
        e = fmax(dev_err(gx, x, n), fmax(dev_err(gout, out, n), dev_err(grstd, rstd, NROWS)));
        report("residual_rmsnorm_fwd*", e, tg, tc, 1e-4);
        G->free(gdelta), free(delta);
    }
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

    /* sliding window shorter than T (and not a multiple of the tiles): forward and backward */
    int win = T > 3 ? T / 3 + 1 : 1;
    tick(); G->attention_window_fwd(gout, glse, gqkv, B, T, H, KVH, HD, win); tg = tock_gpu();
    tick(); C->attention_window_fwd(out, lse, qkv, B, T, H, KVH, HD, win); tc = tock_cpu();
    report("attention_window_fwd", fmax(dev_err(gout, out, nout), dev_err(glse, lse, nlse)), tg, tc, 1e-4);
    tick(); G->attention_window_bwd(gdqkv, gdout, gqkv, gout, glse, B, T, H, KVH, HD, win); tg = tock_gpu();
    tick(); C->attention_window_bwd(dqkv, dout, qkv, out, lse, B, T, H, KVH, HD, win); tc = tock_cpu();
    report("attention_window_bwd", dev_err(gdqkv, dqkv, n), tg, tc, 1e-3);

    G->free(gcs), G->free(gsn), G->free(gqkv), G->free(gout), G->free(glse), G->free(gdout), G->free(gdqkv);
    free(cs), free(sn), free(qkv), free(out), free(lse), free(dout), free(dqkv);
}

/* Document-packed sequences (train.packing: documents): pos restarts at document starts of several
 * lengths (1 token, a few, long ones, one reaching the row's end), plain and with a sliding window;
 * attention_docs_fwd/bwd, rope_pos_fwd/bwd, embedding_pos_fwd/bwd against the CPU backend. */
static void check_docs(void) {
    size_t row = (size_t)(H + 2 * KVH) * HD, n = (size_t)NROWS * row, nout = (size_t)NROWS * H * HD;
    size_t nlse = (size_t)B * H * T, half = HD / 2, ne = (size_t)NROWS * CH;
    int32_t *pos = xmalloc((size_t)NROWS * 4);
    const int lens[] = {1, 5, 2, 29, 1, 77, 3};
    for (int b = 0; b < B; b++) { /* each row starts a document; lengths cycle, shifted per row */
        int k = b, left = 0, p = 0;
        for (int t = 0; t < T; t++, left--) {
            if (left == 0) left = lens[k++ % 7], p = 0;
            pos[b * T + t] = p++;
        }
    }
    float *cs = malloc(sizeof(float) * T * half), *sn = malloc(sizeof(float) * T * half);
    st_rope_tables(cs, sn, T, HD, 10000.0f);
    float *qkv = hrand(n, 2), *out = hrand(nout, 1), *lse = hrand(nlse, 1), *dout = hrand(nout, 1);
    float *dqkv = hrand(n, 1);
    int32_t *gpos = dev_from(pos, (size_t)NROWS * 4);
    float *gcs = dev_from(cs, T * half * 4), *gsn = dev_from(sn, T * half * 4), *gqkv = dev_from(qkv, n * 4);
    float *gout = dev_from(NULL, nout * 4), *glse = dev_from(NULL, nlse * 4), *gdout = dev_from(dout, nout * 4);
    float *gdqkv = dev_from(NULL, n * 4);
    double tg, tc;
    tick(); G->rope_pos_fwd(gqkv, gcs, gsn, gpos, B, T, H, KVH, HD); tg = tock_gpu();
    tick(); C->rope_pos_fwd(qkv, cs, sn, pos, B, T, H, KVH, HD); tc = tock_cpu();
    report("rope_pos_fwd", dev_err(gqkv, qkv, n), tg, tc, 1e-5);
    for (int w = 0; w < 2; w++) {
        int win = w ? 11 : 0;
        tick(); G->attention_docs_fwd(gout, glse, gqkv, gpos, B, T, H, KVH, HD, win); tg = tock_gpu();
        tick(); C->attention_docs_fwd(out, lse, qkv, pos, B, T, H, KVH, HD, win); tc = tock_cpu();
        report(w ? "attention_docs_fwd (window)" : "attention_docs_fwd",
               fmax(dev_err(gout, out, nout), dev_err(glse, lse, nlse)), tg, tc, 1e-4);
        tick(); G->attention_docs_bwd(gdqkv, gdout, gqkv, gout, glse, gpos, B, T, H, KVH, HD, win); tg = tock_gpu();
        tick(); C->attention_docs_bwd(dqkv, dout, qkv, out, lse, pos, B, T, H, KVH, HD, win); tc = tock_cpu();
        report(w ? "attention_docs_bwd (window)" : "attention_docs_bwd", dev_err(gdqkv, dqkv, n), tg, tc, 1e-3);
    }
    tick(); G->rope_pos_bwd(gdqkv, gcs, gsn, gpos, B, T, H, KVH, HD); tg = tock_gpu();
    tick(); C->rope_pos_bwd(dqkv, cs, sn, pos, B, T, H, KVH, HD); tc = tock_cpu();
    report("rope_pos_bwd", dev_err(gdqkv, dqkv, n), tg, tc, 1e-3);
    int32_t *tokens = xmalloc((size_t)NROWS * 4);
    for (int i = 0; i < NROWS; i++) tokens[i] = (int32_t)(rand_bits() % 50);
    float *wte = hrand((size_t)V * CH, 1), *wpe = hrand((size_t)T * CH, 1), *eo = hrand(ne, 1), *edo = hrand(ne, 1);
    int32_t *gtok = dev_from(tokens, (size_t)NROWS * 4);
    float *gwte = dev_from(wte, (size_t)V * CH * 4), *gwpe = dev_from(wpe, (size_t)T * CH * 4);
    float *geo = dev_from(NULL, ne * 4), *gedo = dev_from(edo, ne * 4);
    tick(); G->embedding_pos_fwd(geo, gtok, gwte, gwpe, gpos, B, T, CH); tg = tock_gpu();
    tick(); C->embedding_pos_fwd(eo, tokens, wte, wpe, pos, B, T, CH); tc = tock_cpu();
    report("embedding_pos_fwd", dev_err(geo, eo, ne), tg, tc, 1e-7);
    tick(); G->embedding_pos_bwd(gwpe, gedo, gpos, B, T, CH); tg = tock_gpu(); /* accumulates into wpe */
    tick(); C->embedding_pos_bwd(wpe, edo, pos, B, T, CH); tc = tock_cpu();
    report("embedding_pos_bwd", dev_err(gwpe, wpe, (size_t)T * CH), tg, tc, 1e-6);
    G->free(gpos), G->free(gcs), G->free(gsn), G->free(gqkv), G->free(gout), G->free(glse), G->free(gdout);
    G->free(gdqkv), G->free(gtok), G->free(gwte), G->free(gwpe), G->free(geo), G->free(gedo);
    free(pos), free(cs), free(sn), free(qkv), free(out), free(lse), free(dout), free(dqkv), free(tokens);
    free(wte), free(wpe), free(eo), free(edo);
}

/* Generation's decode kernels (kv_store, attention_cached): a prefill-like call (every position of
 * sequence 0, then of sequence 1 of a different length) and a decode-like call (one token per sequence,
 * out of order), on caches sized for 3 sequences of T positions. */
static void check_decode(void) {
    enum { S = 3 };
    const int lens[2] = {T, T / 2 + 3};
    int rows = lens[0] + lens[1];
    size_t row = (size_t)(H + 2 * KVH) * HD, kvd = (size_t)KVH * HD, cache = (size_t)S * T * kvd;
    float *qkv = hrand((size_t)rows * row, 3), *kc = hrand(cache, 1), *vc = hrand(cache, 1);
    float *out = hrand((size_t)rows * H * HD, 1);
    int32_t *seq = xmalloc((size_t)rows * 4), *pos = xmalloc((size_t)rows * 4);
    for (int r = 0; r < rows; r++) {
        seq[r] = r < lens[0] ? 0 : 2; /* sequence slot 1 stays unused: strides must be right */
        pos[r] = r < lens[0] ? r : r - lens[0];
    }
    float *gqkv = dev_from(qkv, (size_t)rows * row * 4), *gkc = dev_from(kc, cache * 4), *gvc = dev_from(vc, cache * 4);
    float *gout = dev_from(NULL, (size_t)rows * H * HD * 4);
    int32_t *gseq = dev_from(seq, (size_t)rows * 4), *gpos = dev_from(pos, (size_t)rows * 4);
    double tg, tc, e;
    tick(); G->kv_store(gkc, gvc, gqkv, gseq, gpos, rows, H, KVH, HD, T); tg = tock_gpu();
    tick(); C->kv_store(kc, vc, qkv, seq, pos, rows, H, KVH, HD, T); tc = tock_cpu();
    report("kv_store", fmax(dev_err(gkc, kc, cache), dev_err(gvc, vc, cache)), tg, tc, 0);
    tick(); G->attention_cached(gout, gqkv, gkc, gvc, gseq, gpos, rows, H, KVH, HD, T, 0); tg = tock_gpu();
    tick(); C->attention_cached(out, qkv, kc, vc, seq, pos, rows, H, KVH, HD, T, 0); tc = tock_cpu();
    report("attention_cached (prefill)", dev_err(gout, out, (size_t)rows * H * HD), tg, tc, 1e-4);
    tick(); G->attention_cached(gout, gqkv, gkc, gvc, gseq, gpos, rows, H, KVH, HD, T, T / 4 + 1); tg = tock_gpu();
    tick(); C->attention_cached(out, qkv, kc, vc, seq, pos, rows, H, KVH, HD, T, T / 4 + 1); tc = tock_cpu();
    report("attention_cached (prefill, sliding window)", dev_err(gout, out, (size_t)rows * H * HD), tg, tc, 1e-4);
    int32_t dseq[2] = {2, 0}, dpos[2] = {lens[1] - 1, T - 1}; /* decode: last token of each, reversed */
    G->copy_to_device(gseq, dseq, sizeof dseq);
    G->copy_to_device(gpos, dpos, sizeof dpos);
    tick(); G->attention_cached(gout, gqkv, gkc, gvc, gseq, gpos, 2, H, KVH, HD, T, 0); tg = tock_gpu();
    tick(); C->attention_cached(out, qkv, kc, vc, dseq, dpos, 2, H, KVH, HD, T, 0); tc = tock_cpu();
    e = dev_err(gout, out, (size_t)2 * H * HD);
    report("attention_cached (decode)", e, tg, tc, 1e-4);
    G->free(gqkv), G->free(gkc), G->free(gvc), G->free(gout), G->free(gseq), G->free(gpos);
    free(qkv), free(kc), free(vc), free(out), free(seq), free(pos);
}

/* Generation's decode_mm: 1 and 5 rows, a width with a partial last warp pass, writing and accumulating;
 * against the CPU twin, and the device's fp32 and bf16 holdings of the same bf16 values bit for bit. */
static void check_decode_mm(void) {
    enum { OUT = 1000, IN = 300, ROWS = 5 };
    float *w = hrand((size_t)OUT * IN, 1), *x = hrand((size_t)ROWS * IN, 1), *y = hrand((size_t)ROWS * OUT, 1);
    uint16_t *w16 = xmalloc((size_t)OUT * IN * 2);
    for (size_t i = 0; i < (size_t)OUT * IN; i++) { /* bf16 values: the fp32 weight truncated to its upper half */
        uint32_t u;
        memcpy(&u, &w[i], 4);
        w16[i] = (uint16_t)(u >> 16);
        u &= 0xffff0000u;
        memcpy(&w[i], &u, 4);
    }
    float *gw = dev_from(w, (size_t)OUT * IN * 4), *gx = dev_from(x, (size_t)ROWS * IN * 4);
    uint16_t *gw16 = dev_from(w16, (size_t)OUT * IN * 2);
    float *gy = dev_from(y, (size_t)ROWS * OUT * 4), *gy16 = dev_from(y, (size_t)ROWS * OUT * 4);
    double tg, tc;
    int rows[2] = {1, ROWS};
    for (int k = 0; k < 2; k++) {
        float beta = k == 0 ? 0.0f : 1.0f;
        tick(); G->decode_mm(gy, gx, gw, NULL, rows[k], OUT, IN, beta); tg = tock_gpu();
        tick(); C->decode_mm(y, x, NULL, w16, rows[k], OUT, IN, beta); tc = tock_cpu();
        G->decode_mm(gy16, gx, NULL, gw16, rows[k], OUT, IN, beta);
        report(k == 0 ? "decode_mm (1 row)" : "decode_mm (5 rows, accumulate)", dev_err(gy, y, (size_t)ROWS * OUT), tg,
               tc, 1e-4);
        float *a = fetch(gy, (size_t)ROWS * OUT), *b = fetch(gy16, (size_t)ROWS * OUT);
        report("decode_mm bf16 holding == fp32", memcmp(a, b, (size_t)ROWS * OUT * 4) == 0 ? 0.0 : 1.0, 0, 0, 0);
        free(a), free(b);
    }
    G->free(gw), G->free(gx), G->free(gw16), G->free(gy), G->free(gy16);
    free(w), free(x), free(y), free(w16);
}

/* Qwen3's per-head q/k RMSNorm on packed qkv (v untouched), forward in place and backward. */
static void check_head_rmsnorm(void) {
    size_t row = (size_t)(H + 2 * KVH) * HD, n = (size_t)NROWS * row, nx = (size_t)NROWS * (H + KVH) * HD;
    size_t nr = (size_t)NROWS * (H + KVH);
    float *qkv = hrand(n, 2), *wq = hrand(HD, 1), *wk = hrand(HD, 1), *xs = hrand(nx, 1), *rstd = hrand(nr, 1);
    float *dqkv = hrand(n, 1), *dwq = hrand(HD, 1), *dwk = hrand(HD, 1);
    float *gqkv = dev_from(qkv, n * 4), *gwq = dev_from(wq, HD * 4), *gwk = dev_from(wk, HD * 4);
    float *gxs = dev_from(NULL, nx * 4), *grstd = dev_from(NULL, nr * 4), *gdqkv = dev_from(dqkv, n * 4);
    float *gdwq = dev_from(dwq, HD * 4), *gdwk = dev_from(dwk, HD * 4);
    double tg, tc;
    tick(); G->head_rmsnorm_fwd(gqkv, gxs, grstd, gwq, gwk, NROWS, H, KVH, HD, 1e-6f); tg = tock_gpu();
    tick(); C->head_rmsnorm_fwd(qkv, xs, rstd, wq, wk, NROWS, H, KVH, HD, 1e-6f); tc = tock_cpu();
    report("head_rmsnorm_fwd", fmax(dev_err(gqkv, qkv, n), fmax(dev_err(gxs, xs, nx), dev_err(grstd, rstd, nr))), tg,
           tc, 1e-4);
    tick(); G->head_rmsnorm_bwd(gdqkv, gdwq, gdwk, gxs, grstd, gwq, gwk, NROWS, H, KVH, HD); tg = tock_gpu();
    tick(); C->head_rmsnorm_bwd(dqkv, dwq, dwk, xs, rstd, wq, wk, NROWS, H, KVH, HD); tc = tock_cpu();
    report("head_rmsnorm_bwd", fmax(dev_err(gdqkv, dqkv, n), fmax(dev_err(gdwq, dwq, HD), dev_err(gdwk, dwk, HD))),
           tg, tc, 1e-3);
    G->free(gqkv), G->free(gwq), G->free(gwk), G->free(gxs), G->free(grstd), G->free(gdqkv), G->free(gdwq);
    G->free(gdwk);
    free(qkv), free(wq), free(wk), free(xs), free(rstd), free(dqkv), free(dwq), free(dwk);
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

/* A device double's value (one host wait). */
static double dev_double(const double *d) {
    double h = 0;
    G->copy_to_host(&h, d, sizeof h);
    return h;
}

/* cross_entropy_acc, the LM head's form: `orig` (host) holds the logits that cross_entropy turned into the
 * dlogits `gdone` (device) on the backend under test. Two chunks accumulate into one device total (no host wait between them),
 * first with fp32 dlogits in place, then with bf16 dlogits, which must be bit for bit the rounding of the
 * backend's own fp32 dlogits (the rounding is fused into the row's pass, nothing else may change). */
static void check_xent_acc(const float *orig, const float *gdone, const int32_t *target, const int32_t *gtarget,
                           const float *weight, const float *gweight) {
    size_t n = (size_t)NROWS * V;
    int h = NROWS / 2 + 3; /* uneven chunks */
    float *logits = hrand(n, 5), *loss = hrand(NROWS, 1);
    rng_state ^= 0x5bd1e995u;
    float *gl = dev_from(logits, n * 4), *gloss = dev_from(NULL, NROWS * 4);
    double *gtot = dev_from(NULL, sizeof(double)), ctot = 0, tg, tc;
    tick();
    G->cross_entropy_acc(gl, NULL, gloss, gtarget, gweight, h, V, gtot);
    G->cross_entropy_acc(gl + (size_t)h * V, NULL, gloss + h, gtarget + h, gweight + h, NROWS - h, V, gtot);
    tg = tock_gpu();
    tick();
    C->cross_entropy_acc(logits, NULL, loss, target, weight, h, V, &ctot);
    C->cross_entropy_acc(logits + (size_t)h * V, NULL, loss + h, target + h, weight + h, NROWS - h, V, &ctot);
    tc = tock_cpu();
    double e = fmax(dev_err(gl, logits, n), dev_err(gloss, loss, NROWS));
    e = fmax(e, fabs(dev_double(gtot) - ctot) / fmax(fabs(ctot), 1e-30));
    report("cross_entropy_acc (2 chunks)", e, tg, tc, 1e-4);
    /* bf16 dlogits from the first check's inputs: compare with the rounding of its fp32 results */
    float *again = fetch(gdone, n);
    uint16_t *g16 = dev_from(NULL, n * 2), *got = xmalloc(n * 2), *want = xmalloc(n * 2);
    G->copy_to_device(gl, orig, n * 4);
    G->memset0(gtot, sizeof(double));
    tick(); G->cross_entropy_acc(gl, g16, gloss, gtarget, gweight, NROWS, V, gtot); tg = tock_gpu();
    G->copy_to_host(got, g16, n * 2);
    for (size_t i = 0; i < n; i++) want[i] = st_float_to_bf16_bits(again[i]);
    report("cross_entropy_acc bf16 dlogits (bits)", bit_diffs(got, want, n, 2), tg, 0, 0);
    G->free(gl), G->free(gloss), G->free(gtot), G->free(g16);
    free(logits), free(loss), free(again), free(got), free(want);
}

/* xent_block_* (the block-outer LM head's loss, worker/model.c head_forward_outer) against the CPU twin
 * (kernels/cpu/cpu_loss.c): the logits in vocabulary blocks of 96 (the last 40), statistics folded block by
 * block, the loss once, then each block's dlogits from the final statistics: fp32 in place, and bf16 bits that
 * must be the rounding of the backend's own fp32 dlogits. Masked rows (weight 0, target -100) included. */
static void check_xent_blocks(const int32_t *target, const int32_t *gtarget, const float *weight,
                              const float *gweight) {
    enum { VB = 96 };
    size_t n = (size_t)NROWS * V;
    float *logits = hrand(n, 5), *loss = hrand(NROWS, 1), *dl = xmalloc(n * 4), *blk = xmalloc((size_t)NROWS * VB * 4);
    float *stats = xmalloc((size_t)NROWS * 3 * 4), *gstats = dev_from(NULL, (size_t)NROWS * 3 * 4);
    float *gblk = dev_from(NULL, (size_t)NROWS * VB * 4), *gloss = dev_from(NULL, NROWS * 4), *gdl = dev_from(NULL, n * 4);
    uint16_t *g16 = dev_from(NULL, (size_t)NROWS * VB * 2), *got = xmalloc(n * 2), *want = xmalloc(n * 2);
    double *gtot = dev_from(NULL, sizeof(double)), ctot = 0, tg = 0, tc = 0;
    for (int pass = 0; pass < 3; pass++) /* stats; fp32 dlogits; bf16 dlogits */
        for (int j0 = 0; j0 < V; j0 += VB) {
            int nv = V - j0 < VB ? V - j0 : VB;
            for (int i = 0; i < NROWS; i++) memcpy(blk + (size_t)i * nv, logits + (size_t)i * V + j0, (size_t)nv * 4);
            G->copy_to_device(gblk, blk, (size_t)NROWS * nv * 4);
            tick();
            if (pass == 0) G->xent_block_stats(gblk, gstats, gtarget, gweight, NROWS, nv, j0);
            else G->xent_block_grad(gblk, pass == 2 ? g16 : NULL, gstats, gtarget, gweight, NROWS, nv, j0);
            tg += tock_gpu();
            tick();
            if (pass == 0) C->xent_block_stats(blk, stats, target, weight, NROWS, nv, j0);
            else if (pass == 1) C->xent_block_grad(blk, NULL, stats, target, weight, NROWS, nv, j0);
            tc += tock_cpu();
            if (pass == 1)
                for (int i = 0; i < NROWS; i++) {
                    memcpy(dl + (size_t)i * V + j0, blk + (size_t)i * nv, (size_t)nv * 4);
                    G->copy(gdl + (size_t)i * V + j0, gblk + (size_t)i * nv, (size_t)nv * 4);
                }
            if (pass == 2)
                for (int i = 0; i < NROWS; i++)
                    G->copy_to_host(got + (size_t)i * V + j0, g16 + (size_t)i * nv, (size_t)nv * 2);
            if (pass == 0 && j0 + nv >= V) {
                tick(); G->xent_block_loss(gstats, gloss, gtarget, gweight, NROWS, V, gtot); tg += tock_gpu();
                tick(); C->xent_block_loss(stats, loss, target, weight, NROWS, V, &ctot); tc += tock_cpu();
            }
        }
    double e = fmax(dev_err(gdl, dl, n), dev_err(gloss, loss, NROWS));
    e = fmax(e, fabs(dev_double(gtot) - ctot) / fmax(fabs(ctot), 1e-30));
    report("xent_block_stats/loss/grad (11 blocks)", e, tg, tc, 1e-4);
    float *again = fetch(gdl, n);
    for (size_t i = 0; i < n; i++) want[i] = st_float_to_bf16_bits(again[i]);
    report("xent_block_grad bf16 dlogits (bits)", bit_diffs(got, want, n, 2), 0, 0, 0);
    G->free(gstats), G->free(gblk), G->free(gloss), G->free(gdl), G->free(g16), G->free(gtot);
    free(logits), free(loss), free(dl), free(blk), free(stats), free(got), free(want), free(again);
}

/* The fused distillation loss (kd_loss) against the CPU twin (kernels/cpu/cpu_kd.c): both compute each row
 * in double; fp32 dlogits and bf16 dlogits, two temperatures, masked rows, sums accumulated over 2 chunks. */
static void check_kd(int rows, int v, float temp, float alpha, float scale) {
    size_t n = (size_t)rows * v;
    float *s = hrand(n, scale), *t = hrand(n, scale), *loss = hrand((size_t)rows, 1);
    float *weight = xmalloc((size_t)rows * 4);
    int32_t *target = xmalloc((size_t)rows * 4);
    for (int i = 0; i < rows; i++) {
        weight[i] = (i % 5 == 2) ? 0.0f : (0.5f + 0.25f * (i % 3)) / rows;
        target[i] = weight[i] == 0.0f ? -100 : (int32_t)(rand_bits() % (uint32_t)v);
    }
    float *s0 = xmalloc(n * 4);
    memcpy(s0, s, n * 4);
    float *gs = dev_from(s, n * 4), *gt = dev_from(t, n * 4), *gloss = dev_from(NULL, (size_t)rows * 4);
    float *gw = dev_from(weight, (size_t)rows * 4);
    int32_t *gtg = dev_from(target, (size_t)rows * 4);
    double *gsum = dev_from(NULL, 3 * sizeof(double)), csum[3] = {0, 0, 0}, gh[3], tg, tc;
    int h = rows / 2 + 1;
    tick();
    G->kd_loss(gs, NULL, gt, gloss, gtg, gw, h, v, temp, alpha, gsum, gsum + 1);
    G->kd_loss(gs + (size_t)h * v, NULL, gt + (size_t)h * v, gloss + h, gtg + h, gw + h, rows - h, v, temp, alpha, gsum,
               gsum + 1);
    tg = tock_gpu();
    tick();
    C->kd_loss(s, NULL, t, loss, target, weight, h, v, temp, alpha, csum, csum + 1);
    C->kd_loss(s + (size_t)h * v, NULL, t + (size_t)h * v, loss + h, target + h, weight + h, rows - h, v, temp, alpha,
               csum, csum + 1);
    tc = tock_cpu();
    G->copy_to_host(gh, gsum, sizeof gh);
    double e = fmax(dev_err(gs, s, n), dev_err(gloss, loss, (size_t)rows));
    for (int k = 0; k < 3; k++) e = fmax(e, fabs(gh[k] - csum[k]) / fmax(fabs(csum[k]), 1e-30));
    char name[80];
    snprintf(name, sizeof name, "kd_loss V=%d T=%g alpha=%g x%g", v, temp, alpha, scale);
    report(name, e, tg, tc, 1e-5);
    if (self_test && v == V) { /* the comparison can fail: one gradient element off by 1e-4 of the scale */
        float *bad = fetch(gs, n);
        double mx = 0;
        for (size_t i = 0; i < n; i++) mx = fmax(mx, fabs(s[i]));
        bad[(size_t)1 * v + 3] += (float)(1e-4 * mx);
        expect_caught("kd_loss gradient", rel_err(bad, s, n), 1e-5);
        free(bad);
    }
    /* bf16 dlogits: the rounding of the fp32 gradient (a one-ulp flip where the two sides' fp32 values straddle a
     * rounding midpoint: judged as values, a bf16 ulp is 2^-8 relative) */
    uint16_t *g16 = dev_from(NULL, n * 2), *got = xmalloc(n * 2);
    G->copy_to_device(gs, s0, n * 4);
    tick(); G->kd_loss(gs, g16, gt, gloss, gtg, gw, rows, v, temp, alpha, gsum, gsum + 1); tg = tock_gpu();
    G->copy_to_host(got, g16, n * 2);
    float *wide = xmalloc(n * 4), *ref = xmalloc(n * 4);
    for (size_t i = 0; i < n; i++) wide[i] = st_bf16_bits_to_float(got[i]), ref[i] = st_bf16_round(s[i]);
    snprintf(name, sizeof name, "kd_loss bf16 dlogits V=%d", v);
    report(name, rel_err(wide, ref, n), tg, 0, 8e-3);
    G->free(gs), G->free(gt), G->free(gloss), G->free(gw), G->free(gtg), G->free(gsum), G->free(g16);
    free(s), free(t), free(loss), free(weight), free(target), free(s0), free(got), free(wide), free(ref);
}

/* copy_to_device returns before the copy ran (kernels.h: the caller may reuse its buffer at once): a 40 MiB
 * copy (more than the CUDA backend's ring of pinned slots, so it wraps) and 100 small copies from one host
 * buffer rewritten after each call must all land intact. The "error" is the number of wrong floats. */
static void check_copies(void) {
    size_t big = (size_t)10 << 20, small = 1024; /* floats */
    float *h = xmalloc(big * 4), *back = xmalloc(big * 4);
    for (size_t i = 0; i < big; i++) h[i] = (float)i;
    float *gbig = dev_from(NULL, big * 4), *gsmall = dev_from(NULL, 100 * small * 4);
    double t0_ = st_now();
    G->copy_to_device(gbig, h, big * 4);
    for (size_t i = 0; i < big; i++) h[i] = -1.0f; /* reused at once */
    for (int k = 0; k < 100; k++) {
        for (size_t i = 0; i < small; i++) h[i] = (float)(k * 100000 + (int)i);
        G->copy_to_device(gsmall + (size_t)k * small, h, small * 4);
    }
    G->synchronize();
    double tg = st_now() - t0_, wrong = 0;
    G->copy_to_host(back, gbig, big * 4);
    for (size_t i = 0; i < big; i++) wrong += back[i] != (float)i;
    G->copy_to_host(back, gsmall, 100 * small * 4);
    for (int k = 0; k < 100; k++)
        for (size_t i = 0; i < small; i++) wrong += back[(size_t)k * small + i] != (float)(k * 100000 + (int)i);
    report("copy_to_device (buffer reused at once)", wrong, tg, 0, 0);
    G->free(gbig), G->free(gsmall), free(h), free(back);
}

static void check_cross_entropy(void) {
    size_t n = (size_t)NROWS * V;
    float *logits = hrand(n, 5), *loss = hrand(NROWS, 1), weight[NROWS];
    int32_t target[NROWS];
    for (int i = 0; i < NROWS; i++) {
        weight[i] = (i % 7 == 3) ? 0.0f : (0.5f + 0.5f * (i % 3)) / NROWS; /* masked rows + task weights */
        target[i] = weight[i] == 0.0f ? -100 : (int32_t)((frand() + 1.0f) * 0.5f * V) % V;
    }
    float *orig = xmalloc(n * 4);
    memcpy(orig, logits, n * 4);
    float *glogits = dev_from(logits, n * 4), *gloss = dev_from(NULL, NROWS * 4);
    float *gweight = dev_from(weight, sizeof weight);
    int32_t *gtarget = dev_from(target, sizeof target);
    double tg, tc, sg, sc;
    tick(); sg = G->cross_entropy(glogits, gloss, gtarget, gweight, NROWS, V); tg = tock_gpu();
    tick(); sc = C->cross_entropy(logits, loss, target, weight, NROWS, V); tc = tock_cpu();
    double e = fmax(dev_err(glogits, logits, n), dev_err(gloss, loss, NROWS));
    e = fmax(e, fabs(sg - sc) / fmax(fabs(sc), 1e-30));
    report("cross_entropy", e, tg, tc, 1e-4);
    check_xent_acc(orig, glogits, target, gtarget, weight, gweight);
    check_xent_blocks(target, gtarget, weight, gweight);
    G->free(glogits), G->free(gloss), G->free(gweight), G->free(gtarget), free(logits), free(loss), free(orig);
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
    { /* multi-tensor with bf16 copies: two ranges with their own lr, decay and step == two adamw calls;
       * the second zeroes its gradient as it reads it (zero_grad), the first leaves its own */
        size_t n1 = 20000, n2 = n - n1;
        uint16_t *gbf = dev_from(NULL, n * 2);
        st_adamw_range rs[2] = {
            {gp, gg, gm, gv, gbf, n1, 2e-3f, 0.1f, 8, NULL},
            {gp + n1, gg + n1, gm + n1, gv + n1, gbf + n1, n2, 1e-3f, 0.0f, 3, gg + n1},
        };
        tick(); G->adamw_multi(rs, 2, 0.9f, 0.95f, 1e-8f, 0.5f); tg = tock_gpu();
        tick();
        C->adamw(p, g, m, v, n1, 2e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 0.5f, 8);
        C->adamw(p + n1, g + n1, m + n1, v + n1, n2, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.0f, 0.5f, 3);
        tc = tock_cpu();
        uint16_t *bf = malloc(n * 2);
        G->copy_to_host(bf, gbf, n * 2);
        float *pbf = malloc(n * 4), *pref = fetch(gp, n);
        for (size_t i = 0; i < n; i++) { /* the copy must be exactly the bf16 rounding of the GPU's fp32 value */
            pbf[i] = st_bf16_bits_to_float(bf[i]);
            pref[i] = st_bf16_round(pref[i]);
        }
        e = fmax(dev_err(gp, p, n), fmax(dev_err(gm, m, n), rel_err(pbf, pref, n)));
        float *gz = fetch(gg, n); /* exact: the first range's gradient untouched, the second's all zero */
        for (size_t i = 0; i < n; i++)
            if (gz[i] != (i < n1 ? g[i] : 0.0f)) e = fmax(e, 1.0);
        report("adamw_multi (+bf16 copy, zero_grad)", e, tg, tc, 1e-5);
        G->free(gbf), free(bf), free(pbf), free(pref), free(gz);
    }
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

/* QLoRA's per-matmul path (worker/qlora.c st_qlora_load, worker/model.c): a [FF, CH] nf4 weight with
 * double-quantized absmax (int8 codes per 256 scales + their mean) dequantized into a one-matrix scratch
 * (dequant_int8 + add_scalar for the scales, dequant_nf4), rounded to bf16, then read by the forward
 * y = x W^T and the input gradient dx = dy W through matmul_bf16 — on the device and on the CPU twin. The
 * dequantized weight is exact on both sides (1e-7 as check_dequant); the products multiply the same bf16
 * values and differ only in fp32 summation order (1e-4 as check_matmul_bf16). (check_qmatmul below: the fused
 * kernel that replaces this path where the backend has it.) */
static void check_qlora_matmul(void) {
    const int out = FF, in = CH, block = 64, m = NROWS;
    size_t n = (size_t)out * in, ns = (n + block - 1) / block, n2 = (ns + 255) / 256;
    uint8_t *codes = xmalloc(n / 2);
    int8_t *q8 = xmalloc(ns);
    for (size_t i = 0; i < n / 2; i++) codes[i] = (uint8_t)rand_bits();
    for (size_t i = 0; i < ns; i++) q8[i] = (int8_t)(frand() * 127);
    float *s2 = hrand(n2, 0.01f), mean = 0.05f, *x = hrand((size_t)m * in, 1), *dy = hrand((size_t)m * out, 1);
    for (size_t i = 0; i < n2; i++) s2[i] = fabsf(s2[i]) * 1e-2f;
    float *hs = xmalloc(ns * 4), *hw = xmalloc(n * 4), *hy = xmalloc((size_t)m * out * 4), *hdx = xmalloc((size_t)m * in * 4);
    uint16_t *hw16 = xmalloc(n * 2);
    size_t nsc = st_matmul_bf16_scratch_floats(m, out, in);
    if (st_matmul_bf16_scratch_floats(m, in, out) > nsc) nsc = st_matmul_bf16_scratch_floats(m, in, out);
    float *hsc = xmalloc(nsc * 4), *dsc = dev_from(NULL, nsc * 4);
    void *gcodes = dev_from(codes, n / 2), *gq8 = dev_from(q8, ns);
    float *gs2 = dev_from(s2, n2 * 4), *gs = dev_from(NULL, ns * 4), *gw = dev_from(NULL, n * 4);
    uint16_t *gw16 = dev_from(NULL, n * 2);
    float *gx = dev_from(x, (size_t)m * in * 4), *gdy = dev_from(dy, (size_t)m * out * 4);
    float *gy = dev_from(NULL, (size_t)m * out * 4), *gdx = dev_from(NULL, (size_t)m * in * 4);
    double tg, tc;
    tick();
    G->dequant_int8(gs, gq8, gs2, ns, 256), G->add_scalar(gs, mean, ns);
    G->dequant_nf4(gw, gcodes, gs, n, block), G->to_bf16(gw16, gw, n);
    G->matmul_bf16(gy, st_mm_f32(gx), st_mm_bf16(gw16), NULL, m, out, in, 0, 1, 1.0f, 0.0f, dsc);
    G->matmul_bf16(gdx, st_mm_f32(gdy), st_mm_bf16(gw16), NULL, m, in, out, 0, 0, 1.0f, 0.0f, dsc);
    tg = tock_gpu();
    tick();
    C->dequant_int8(hs, q8, s2, ns, 256), C->add_scalar(hs, mean, ns);
    C->dequant_nf4(hw, codes, hs, n, block), C->to_bf16(hw16, hw, n);
    C->matmul_bf16(hy, st_mm_f32(x), st_mm_bf16(hw16), NULL, m, out, in, 0, 1, 1.0f, 0.0f, hsc);
    C->matmul_bf16(hdx, st_mm_f32(dy), st_mm_bf16(hw16), NULL, m, in, out, 0, 0, 1.0f, 0.0f, hsc);
    tc = tock_cpu();
    report("qlora dequant (nf4 + dq) one matrix", dev_err(gw, hw, n), tg, tc, 1e-7);
    report("qlora matmul x W^T (bf16)", dev_err(gy, hy, (size_t)m * out), tg, tc, 1e-4);
    report("qlora matmul dy W (bf16)", dev_err(gdx, hdx, (size_t)m * in), tg, tc, 1e-4);
    G->free(gcodes), G->free(gq8), G->free(gs2), G->free(gs), G->free(gw), G->free(gw16), G->free(gx), G->free(gdy);
    G->free(gy), G->free(gdx), G->free(dsc);
    free(codes), free(q8), free(s2), free(x), free(dy), free(hs), free(hw), free(hy), free(hdx), free(hw16), free(hsc);
}

/* Rows of x [rows, in] an int8 check wants: row 0 all zero (step 0: every code 0), row 1 exact rounding ties
 * (step 0.5 exactly, values on odd multiples of 0.25: x / s lands on n + 0.5, rint goes to the even side). */
static void w8_edge_rows(float *x, int rows, int in) {
    for (int k = 0; k < in && rows > 0; k++) x[k] = 0.0f;
    for (int k = 0; k < in && rows > 1; k++) x[(size_t)in + k] = k == 0 ? 63.5f : (float)((k * 37) % 255 - 127) * 0.25f;
}

/* |int8 result - fp64 product| / its bound, worst over [m, out]: per element sum_k (|a| s/2 + |w| t/2 + 3 t s / 4)
 * (a = t p + ea, w = s q + ew with |ea| <= t/2, |ew| <= s/2), plus 8 fp32 ulps of the terms for the rescale
 * and the epilogue's adds. 1.0 or less: the int8 function is the one kernels.h describes. */
static double w8_bound_ratio(const float *c, const float *c0, const float *a, const float *w, const float *bias, int m,
                             int out, int in, float beta) {
    double worst = 0.0;
    for (int i = 0; i < m; i++) {
        double t = 0.0;
        for (int k = 0; k < in; k++) t = fmax(t, fabs(a[(size_t)i * in + k]));
        t /= 127.0;
        for (int j = 0; j < out; j++) {
            double s = 0.0, dot = 0.0, mag = 0.0, q = 0.0;
            for (int k = 0; k < in; k++) s = fmax(s, fabs(w[(size_t)j * in + k]));
            s /= 127.0;
            for (int k = 0; k < in; k++) {
                double x = a[(size_t)i * in + k], y = w[(size_t)j * in + k];
                dot += x * y, mag += fabs(x) * fabs(y);
                q += fabs(x) * s / 2 + fabs(y) * t / 2 + 0.75 * t * s;
            }
            double extra = beta * (double)c0[(size_t)i * out + j] + (bias ? bias[j] : 0.0);
            double want = dot + extra;
            double bound = q * 1.001 + 8 * 0x1p-24 * (mag + q + fabs(extra)) + 1e-30;
            worst = fmax(worst, fabs(c[(size_t)i * out + j] - want) / bound);
        }
    }
    return worst;
}

/* The int8 forward matmul of a distillation teacher (w8_pack + matmul_w8a8, kernels/cuda/int8.cu against
 * kernels/cpu/cpu_int8.c): the quantization (IEEE division, round half to even, the same clamp) and the
 * rescale are the same fp32 operations on both sides and the int32 sums are exact, so the outputs must be
 * bit-identical (the error is the number of differing elements, tolerance 0), with beta and bias and with
 * input widths off the tile sizes. Then the bound only the quantization may break: the result against the
 * fp64 product of the unquantized operands (w8_bound_ratio <= 1). */
static void check_w8a8_case(int m, int out, int in, float beta, int with_bias) {
    float *a = hrand((size_t)m * in, 2), *w = hrand((size_t)out * in, 0.1f), *c0 = hrand((size_t)m * out, 1);
    float *bias = with_bias ? hrand(out, 0.5f) : NULL, *c = xmalloc((size_t)m * out * 4);
    w8_edge_rows(a, m, in), w8_edge_rows(w, out, in);
    memcpy(c, c0, (size_t)m * out * 4);
    size_t pb = C->w8_bytes(out, in), sb = C->w8_scratch_bytes(m, in);
    void *hp = xmalloc(pb + 64), *hs = xmalloc(sb + 64); /* the CPU blob wants 64-byte alignment */
    void *hpa = (void *)(((uintptr_t)hp + 63) & ~(uintptr_t)63), *hsa = (void *)(((uintptr_t)hs + 63) & ~(uintptr_t)63);
    float *ga = dev_from(a, (size_t)m * in * 4), *gw = dev_from(w, (size_t)out * in * 4);
    float *gc = dev_from(c0, (size_t)m * out * 4), *gb = bias ? dev_from(bias, (size_t)out * 4) : NULL;
    void *gp = dev_from(NULL, G->w8_bytes(out, in)), *gs = dev_from(NULL, G->w8_scratch_bytes(m, in));
    double tg, tc;
    G->w8_pack(gp, gw, out, in), C->w8_pack(hpa, w, out, in);
    tick(); G->matmul_w8a8(gc, ga, gp, gb, m, out, in, beta, gs); tg = tock_gpu();
    tick(); C->matmul_w8a8(c, a, hpa, bias, m, out, in, beta, hsa); tc = tock_cpu();
    float *got = fetch(gc, (size_t)m * out);
    char name[80];
    snprintf(name, sizeof name, "matmul_w8a8 %dx%dx%d%s%s (bits differ)", m, out, in, beta != 0.0f ? " beta" : "",
             bias ? " bias" : "");
    report(name, bit_diffs(got, c, (size_t)m * out, 4), tg, tc, 0);
    snprintf(name, sizeof name, "matmul_w8a8 %dx%dx%d vs fp64 / bound", m, out, in);
    report(name, w8_bound_ratio(got, c0, a, w, bias, m, out, in, beta), tg, tc, 1.0);
    if (self_test && m > 2 && out > 2) {
        got[(size_t)2 * out + 2] = nextafterf(got[(size_t)2 * out + 2], INFINITY); /* one ulp off */
        expect_caught("matmul_w8a8 result", bit_diffs(got, c, (size_t)m * out, 4), 0);
        got[(size_t)2 * out + 2] += 1.0f; /* an error beyond what quantization explains */
        expect_caught("matmul_w8a8 result (bound)", w8_bound_ratio(got, c0, a, w, bias, m, out, in, beta), 1.0);
    }
    G->free(ga), G->free(gw), G->free(gc), G->free(gp), G->free(gs);
    if (gb) G->free(gb);
    free(a), free(w), free(c0), free(c), free(bias), free(hp), free(hs), free(got);
}

static void check_w8a8(void) {
    if (!G->matmul_w8a8 || !G->w8_pack || !G->w8_bytes || !G->w8_scratch_bytes) {
        report("matmul_w8a8 (slots missing)", INFINITY, 0, 0, 0);
        return;
    }
    check_w8a8_case(NROWS, 3 * CH, CH, 0.0f, 1);    /* q/k/v with biases */
    check_w8a8_case(NROWS, CH, FF, 1.0f, 0);        /* down projection, in = 344: padded codes, + C */
    check_w8a8_case(37, V, CH, 0.0f, 0);            /* the head: rows off the tile, out = 1000 */
    check_w8a8_case(5, 70, 13, 0.5f, 1);            /* tiny, everything off the tiles */
}

/* qmatmul (kernels/cuda/qmatmul.cu, CPU twin kernels/cpu/cpu_qmatmul.c): QLoRA's fused dequantize-matmul on a
 * unit of three stacked parts (rows 200 / 37 / 41, cols 259: odd, so nf4 rows start mid-byte; block 64 straddles
 * rows), part 0 with double-quantized absmax (q8 * scale2 + mean rebuilt in the kernel), the others plain fp32
 * scales; nf4 and int8; forward X W^T and input gradient X W; bf16 (tensor cores), fp32 and ST_QMM_W16 (fp32
 * tiles, W rounded to bf16: DoRA's base term under bf16); beta 1 onto a non-zero C. Device and twin multiply the same operands (bf16: both round X and the dequantized W with the one
 * rule, and products of bf16 values are exact in fp32) and differ only in the order of K fp32 additions, each
 * within K 2^-24 sum_k |x w| of the exact sum, so the bound per output is 2 K 2^-24 sum_k |x w| (+ the beta C
 * addition's half ulp, covered by the factor 2); the error reported is the worst |gpu - cpu| / bound (tol 1).
 * sum_k |x w| is matmul's product of |X| and |W| (W dequantized on the host by dequant_nf4 / dequant_int8;
 * both rounded to bf16 first under bf16). --self-test: the "device" is the CPU twin with 4-ulp output noise,
 * within the bound; one output moved by 1e-3 must be caught. */
static const int qm_rows[3] = {200, 37, 41};
enum { QM_COLS = 259, QM_BLOCK = 64 };

static void qm_host_dequant(float *w, int nf4, uint8_t *const codes[3], float *const scales[3]) {
    size_t at = 0;
    for (int p = 0; p < 3; p++) {
        size_t n = (size_t)qm_rows[p] * QM_COLS;
        if (nf4) C->dequant_nf4(w + at, codes[p], scales[p], n, QM_BLOCK);
        else C->dequant_int8(w + at, (const int8_t *)codes[p], scales[p], n, QM_BLOCK);
        at += n;
    }
}

static void check_qmatmul_case(int nf4, int trans, int bf16, int m) {
    int R = qm_rows[0] + qm_rows[1] + qm_rows[2], n = trans ? QM_COLS : R, k = trans ? R : QM_COLS;
    st_qweight hw, gw;
    memset(&hw, 0, sizeof hw);
    hw.nf4 = nf4, hw.block = QM_BLOCK, hw.cols = QM_COLS, hw.nparts = 3;
    gw = hw;
    uint8_t *codes[3];
    float *scales[3], *s2 = NULL;
    int8_t *q8 = NULL;
    for (int p = 0; p < 3; p++) {
        size_t ne = (size_t)qm_rows[p] * QM_COLS, nb = nf4 ? (ne + 1) / 2 : ne, ns = (ne + QM_BLOCK - 1) / QM_BLOCK;
        codes[p] = xmalloc(nb);
        for (size_t i = 0; i < nb; i++) codes[p][i] = (uint8_t)(nf4 ? rand_bits() : (uint32_t)(int8_t)(frand() * 127));
        scales[p] = xmalloc(ns * sizeof(float));
        st_qw_part hp = {codes[p], scales[p], NULL, NULL, 0.0f, qm_rows[p]};
        st_qw_part gp = {dev_from(codes[p], nb), NULL, NULL, NULL, 0.0f, qm_rows[p]};
        if (p == 0) { /* double-quantized absmax: scales[0] is what dequant_int8 + add_scalar rebuild */
            size_t n2 = (ns + ST_QW_DQ_BLOCK - 1) / ST_QW_DQ_BLOCK;
            q8 = xmalloc(ns), s2 = xmalloc(n2 * sizeof(float));
            for (size_t i = 0; i < ns; i++) q8[i] = (int8_t)(frand() * 127);
            for (size_t i = 0; i < n2; i++) s2[i] = 1e-4f * (1.0f + fabsf(frand()));
            hp.mean = gp.mean = 0.02f;
            C->dequant_int8(scales[0], q8, s2, ns, ST_QW_DQ_BLOCK), C->add_scalar(scales[0], hp.mean, ns);
            hp.scales = NULL, hp.q8 = q8, hp.scale2 = s2;
            gp.q8 = dev_from(q8, ns), gp.scale2 = dev_from(s2, n2 * sizeof(float));
        } else {
            for (size_t i = 0; i < ns; i++) scales[p][i] = 0.01f * (1.0f + fabsf(frand()));
            gp.scales = dev_from(scales[p], ns * sizeof(float));
        }
        hw.part[p] = hp, gw.part[p] = gp;
    }
    float *x = hrand((size_t)m * k, 1.0f), *c = hrand((size_t)m * n, 1.0f);
    float *gx = dev_from(x, (size_t)m * k * 4), *gc = dev_from(c, (size_t)m * n * 4);
    size_t nsc = st_qmatmul_scratch_floats(m, R, QM_COLS, trans, bf16, 4);
    float *hsc = xmalloc(nsc * 4);
    double tg, tc;
    float *dsc = dev_from(NULL, nsc * 4); /* CUDA needs none (shared-memory tiles); the self-test's CPU twin does */
    tick(); G->qmatmul(gc, st_mm_f32(gx), &gw, m, trans, bf16, 1.0f, dsc, nsc); tg = tock_gpu();
    G->free(dsc);
    tick(); C->qmatmul(c, st_mm_f32(x), &hw, m, trans, bf16, 1.0f, hsc, nsc); tc = tock_cpu();
    /* the bound: sum_k |x w| from the host's dequantized W (rounded to bf16 with bf16) */
    float *w = xmalloc((size_t)R * QM_COLS * 4), *ax = xmalloc((size_t)m * k * 4), *mag = xmalloc((size_t)m * n * 4);
    qm_host_dequant(w, nf4, codes, scales);
    for (size_t i = 0; i < (size_t)R * QM_COLS; i++) w[i] = fabsf(bf16 ? st_bf16_round(w[i]) : w[i]);
    for (size_t i = 0; i < (size_t)m * k; i++) ax[i] = fabsf(bf16 == 1 ? st_bf16_round(x[i]) : x[i]);
    C->matmul(mag, ax, w, m, n, k, 0, !trans, 1.0f, 0.0f);
    float *g = fetch(gc, (size_t)m * n);
    double worst = 0;
    for (size_t i = 0; i < (size_t)m * n; i++) {
        double bound = 2.0 * k * 0x1p-24 * (mag[i] + fabs(c[i])) + 1e-30, e = fabs((double)g[i] - c[i]) / bound;
        if (isnan(g[i]) || isnan(c[i])) e = INFINITY;
        if (e > worst) worst = e;
    }
    char name[64];
    snprintf(name, sizeof name, "qmatmul %s %s %s m=%d (err/bound)", nf4 ? "nf4" : "int8", trans ? "dy W" : "x W^T",
             bf16 == 1 ? "bf16" : bf16 ? "w16" : "fp32", m);
    report(name, worst, tg, tc, 1.0);
    if (self_test && nf4 && !trans && bf16) { /* one output off by 1e-3 relative: far past the bound */
        g[7] = c[7] + 1e-3f * fmaxf(fabsf(c[7]), 1.0f);
        double e = fabs((double)g[7] - c[7]) / (2.0 * k * 0x1p-24 * (mag[7] + fabs(c[7])));
        expect_caught("qmatmul output", e, 1.0);
    }
    for (int p = 0; p < 3; p++) {
        G->free((void *)gw.part[p].codes), free(codes[p]), free(scales[p]);
        if (gw.part[p].scales) G->free((void *)gw.part[p].scales);
    }
    G->free((void *)gw.part[0].q8), G->free((void *)gw.part[0].scale2), free(q8), free(s2);
    G->free(gx), G->free(gc), free(x), free(c), free(hsc), free(w), free(ax), free(mag), free(g);
}

static void check_qmatmul(void) {
    if (!G->qmatmul || !C->qmatmul) {
        printf("qmatmul: not in the %s backend table  FAIL\n", G->qmatmul ? C->name : G->name);
        checked++, failures++;
        return;
    }
    for (int nf4 = 1; nf4 >= 0; nf4--)
        for (int trans = 0; trans <= 1; trans++)
            for (int bf16 = ST_QMM_W16; bf16 >= 0; bf16--) check_qmatmul_case(nf4, trans, bf16, trans ? 77 : NROWS);
}

/* ---------------------------------------------------------------- tensor-core attention (CUDA) */

static double norm_err(const float *x, const float *ref, size_t n);

#ifdef ST_HAVE_CUDA
/* kernels/cuda/attention_tc.cu (UNVERIFIED until this passes on a GPU) against the fp32 CPU twin: bf16
 * operands make it differ by about bf16's precision, so the measure is ||gpu - cpu|| / ||cpu|| per
 * output (tolerance estimates: 2e-2 forward, 5e-2 backward; the fp32 kernel's lines above are the exact
 * path). */
static void check_attention_tc(int b, int t, int h, int kvh, int hd) {
    size_t n = (size_t)b * t * (h + 2 * kvh) * hd, nout = (size_t)b * t * h * hd, nlse = (size_t)b * h * t;
    float *qkv = hrand(n, 1), *out = hrand(nout, 1), *lse = hrand(nlse, 1), *dout = hrand(nout, 1);
    float *dqkv = hrand(n, 1);
    float *gqkv = dev_from(qkv, n * 4), *gout = dev_from(NULL, nout * 4), *glse = dev_from(NULL, nlse * 4);
    float *gdout = dev_from(dout, nout * 4), *gdqkv = dev_from(NULL, n * 4);
    double tg, tc;
    char name[80];
    int rc;
    tick(); rc = st_cuda_attention_tc_fwd(gout, glse, gqkv, b, t, h, kvh, hd); tg = tock_gpu();
    tick(); C->attention_fwd(out, lse, qkv, b, t, h, kvh, hd); tc = tock_cpu();
    float *go = fetch(gout, nout), *gl = fetch(glse, nlse);
    snprintf(name, sizeof name, "attention_fwd_tc* T=%d H=%d/%d hd=%d", t, h, kvh, hd);
    report(name, rc ? INFINITY : fmax(norm_err(go, out, nout), norm_err(gl, lse, nlse)), tg, tc, 2e-2);
    tick(); rc = st_cuda_attention_tc_bwd(gdqkv, gdout, gqkv, gout, glse, b, t, h, kvh, hd); tg = tock_gpu();
    tick(); C->attention_bwd(dqkv, dout, qkv, out, lse, b, t, h, kvh, hd); tc = tock_cpu();
    float *gd = fetch(gdqkv, n);
    snprintf(name, sizeof name, "attention_bwd_tc* T=%d H=%d/%d hd=%d", t, h, kvh, hd);
    report(name, rc ? INFINITY : norm_err(gd, dqkv, n), tg, tc, 5e-2);
    free(go), free(gl), free(gd);
    G->free(gqkv), G->free(gout), G->free(glse), G->free(gdout), G->free(gdqkv);
    free(qkv), free(out), free(lse), free(dout), free(dqkv);
}
#endif

/* ---------------------------------------------------------------- shapes real models use */

/* Shapes the fixed-size checks above do not reach: head_dim 64 and 128 with T not a multiple of 8 or 32,
 * several query heads per kv head, large-magnitude scores (the online softmax must rescale), odd C above
 * 256 for the norms, the vocabularies of Llama 2 (32000), GPT-2 (50257: odd pitch), Llama 3 (128256) and
 * Qwen 2 (151936) in the cross-entropy, called on consecutive row chunks as the LM head does, and the
 * LM head's three bf16 GEMMs at GPT-2's vocabulary (the odd-pitch dlogits operand). Self-test: smaller T
 * and fewer vocabularies, same code. */
static void check_attention_shape(int b, int t, int h, int kvh, int hd, float scale) {
    size_t row = (size_t)(h + 2 * kvh) * hd, n = (size_t)b * t * row, nout = (size_t)b * t * h * hd;
    size_t nlse = (size_t)b * h * t;
    float *qkv = hrand(n, scale), *out = hrand(nout, 1), *lse = hrand(nlse, 1), *dout = hrand(nout, 1);
    float *dqkv = hrand(n, 1);
    float *gqkv = dev_from(qkv, n * 4), *gout = dev_from(NULL, nout * 4), *glse = dev_from(NULL, nlse * 4);
    float *gdout = dev_from(dout, nout * 4), *gdqkv = dev_from(NULL, n * 4);
    double tg, tc;
    char name[80];
    tick(); G->attention_fwd(gout, glse, gqkv, b, t, h, kvh, hd); tg = tock_gpu();
    tick(); C->attention_fwd(out, lse, qkv, b, t, h, kvh, hd); tc = tock_cpu();
    snprintf(name, sizeof name, "attention_fwd T=%d H=%d/%d hd=%d x%g", t, h, kvh, hd, scale);
    report(name, fmax(dev_err(gout, out, nout), dev_err(glse, lse, nlse)), tg, tc, 1e-4);
    tick(); G->attention_bwd(gdqkv, gdout, gqkv, gout, glse, b, t, h, kvh, hd); tg = tock_gpu();
    tick(); C->attention_bwd(dqkv, dout, qkv, out, lse, b, t, h, kvh, hd); tc = tock_cpu();
    snprintf(name, sizeof name, "attention_bwd T=%d H=%d/%d hd=%d x%g", t, h, kvh, hd, scale);
    report(name, dev_err(gdqkv, dqkv, n), tg, tc, scale > 1 ? 3e-3 : 1e-3);
    G->free(gqkv), G->free(gout), G->free(glse), G->free(gdout), G->free(gdqkv);
    free(qkv), free(out), free(lse), free(dout), free(dqkv);
}

static void check_norm_shape(int n_rows, int c) {
    size_t n = (size_t)n_rows * c;
    float *x = hrand(n, 3), *w = hrand((size_t)c, 1), *bb = hrand((size_t)c, 1), *dout = hrand(n, 1);
    float *out = hrand(n, 1), *mean = hrand((size_t)n_rows, 1), *rstd = hrand((size_t)n_rows, 1);
    float *dx = hrand(n, 1), *dw = hrand((size_t)c, 1), *db = hrand((size_t)c, 1);
    float *gx = dev_from(x, n * 4), *gw = dev_from(w, (size_t)c * 4), *gb = dev_from(bb, (size_t)c * 4);
    float *gdout = dev_from(dout, n * 4), *gout = dev_from(NULL, n * 4), *gmean = dev_from(NULL, (size_t)n_rows * 4);
    float *grstd = dev_from(NULL, (size_t)n_rows * 4), *gdx = dev_from(dx, n * 4), *gdw = dev_from(dw, (size_t)c * 4);
    float *gdb = dev_from(db, (size_t)c * 4);
    double tg, tc;
    char name[64];
    tick(); G->layernorm_fwd(gout, gmean, grstd, gx, gw, gb, n_rows, c, 1e-5f); tg = tock_gpu();
    tick(); C->layernorm_fwd(out, mean, rstd, x, w, bb, n_rows, c, 1e-5f); tc = tock_cpu();
    snprintf(name, sizeof name, "layernorm_fwd C=%d", c);
    report(name, dev_err(gout, out, n), tg, tc, 1e-4);
    tick(); G->layernorm_bwd(gdx, gdw, gdb, gdout, gx, gw, gmean, grstd, n_rows, c); tg = tock_gpu();
    tick(); C->layernorm_bwd(dx, dw, db, dout, x, w, mean, rstd, n_rows, c); tc = tock_cpu();
    snprintf(name, sizeof name, "layernorm_bwd C=%d", c);
    report(name, fmax(dev_err(gdx, dx, n), fmax(dev_err(gdw, dw, (size_t)c), dev_err(gdb, db, (size_t)c))), tg, tc,
           1e-3);
    tick(); G->rmsnorm_fwd(gout, grstd, gx, gw, n_rows, c, 1e-6f); tg = tock_gpu();
    tick(); C->rmsnorm_fwd(out, rstd, x, w, n_rows, c, 1e-6f); tc = tock_cpu();
    snprintf(name, sizeof name, "rmsnorm_fwd C=%d", c);
    report(name, dev_err(gout, out, n), tg, tc, 1e-4);
    tick(); G->rmsnorm_bwd(gdx, gdw, gdout, gx, gw, grstd, n_rows, c); tg = tock_gpu();
    tick(); C->rmsnorm_bwd(dx, dw, dout, x, w, rstd, n_rows, c); tc = tock_cpu();
    snprintf(name, sizeof name, "rmsnorm_bwd C=%d", c);
    report(name, fmax(dev_err(gdx, dx, n), dev_err(gdw, dw, (size_t)c)), tg, tc, 1e-3);
    G->free(gx), G->free(gw), G->free(gb), G->free(gdout), G->free(gout), G->free(gmean), G->free(grstd);
    G->free(gdx), G->free(gdw), G->free(gdb);
    free(x), free(w), free(bb), free(dout), free(out), free(mean), free(rstd), free(dx), free(dw), free(db);
}

/* Cross-entropy over `rows` rows at vocabulary v, called on chunks of `chunk` rows (the LM head's way),
 * logits of magnitude up to `scale` (softmax of large scores). */
static void check_xent_shape(int rows, int v, int chunk, float scale) {
    size_t n = (size_t)rows * v;
    float *logits = hrand(n, scale), *loss = hrand((size_t)rows, 1), *weight = xmalloc((size_t)rows * 4);
    int32_t *target = xmalloc((size_t)rows * 4);
    for (int i = 0; i < rows; i++) {
        weight[i] = (i % 5 == 2) ? 0.0f : 1.0f / rows;
        target[i] = (int32_t)(rand_bits() % (uint32_t)v);
    }
    target[rows - 1] = v - 1; /* the last word of the vocabulary */
    float *gl = dev_from(logits, n * 4), *gloss = dev_from(NULL, (size_t)rows * 4);
    float *gw = dev_from(weight, (size_t)rows * 4);
    int32_t *gt = dev_from(target, (size_t)rows * 4);
    double sg = 0, sc = 0, tg, tc;
    tick();
    for (int r = 0; r < rows; r += chunk) {
        int k = rows - r < chunk ? rows - r : chunk;
        sg += G->cross_entropy(gl + (size_t)r * v, gloss + r, gt + r, gw + r, k, v);
    }
    tg = tock_gpu();
    tick();
    for (int r = 0; r < rows; r += chunk) {
        int k = rows - r < chunk ? rows - r : chunk;
        sc += C->cross_entropy(logits + (size_t)r * v, loss + r, target + r, weight + r, k, v);
    }
    tc = tock_cpu();
    double e = fmax(dev_err(gl, logits, n), dev_err(gloss, loss, (size_t)rows));
    e = fmax(e, fabs(sg - sc) / fmax(fabs(sc), 1e-30));
    char name[64];
    snprintf(name, sizeof name, "cross_entropy V=%d chunks of %d x%g", v, chunk, scale);
    report(name, e, tg, tc, 1e-4);
    G->free(gl), G->free(gloss), G->free(gw), G->free(gt);
    free(logits), free(loss), free(weight), free(target);
}

/* The LM head's GEMMs in bf16 at vocabulary v: logits = x W^T, dx = dlogits W, dW += dlogits^T x, with
 * dlogits a bf16 operand (pitch v: odd at GPT-2's vocabulary), as worker/model.c passes it from
 * cross_entropy_acc. */
static void check_head_gemms(int rows, int v, int c) {
    size_t nx = (size_t)rows * c, nw = (size_t)v * c, nl = (size_t)rows * v;
    float *x = hrand(nx, 1), *w = hrand(nw, 0.05f), *dl = hrand(nl, 1e-3f);
    float *logits = hrand(nl, 1), *dx = hrand(nx, 1), *dw = hrand(nw, 1e-3f);
    for (size_t i = 0; i < nx; i++) x[i] = st_bf16_round(x[i]);
    for (size_t i = 0; i < nl; i++) dl[i] = st_bf16_round(dl[i]);
    size_t sc = st_matmul_bf16_scratch_floats(v, c, rows);
    size_t s2 = st_matmul_bf16_scratch_floats(rows, v, c), s3 = st_matmul_bf16_scratch_floats(rows, c, v);
    if (s2 > sc) sc = s2;
    if (s3 > sc) sc = s3;
    float *scpu = xmalloc(sc * 4);
    float *gx = dev_from(x, nx * 4), *gw = dev_from(w, nw * 4), *gdl = dev_from(dl, nl * 4);
    float *glog = dev_from(NULL, nl * 4), *gdx = dev_from(NULL, nx * 4), *gdw = dev_from(dw, nw * 4);
    float *gs = dev_from(NULL, sc * 4);
    uint16_t *dl16 = xmalloc(nl * 2);
    for (size_t i = 0; i < nl; i++) dl16[i] = st_float_to_bf16_bits(dl[i]);
    uint16_t *gdl16 = dev_from(dl16, nl * 2);
    double tg, tc;
    char name[64];
    tick(); G->matmul_bf16(glog, st_mm_f32(gx), st_mm_f32(gw), NULL, rows, v, c, 0, 1, 1.0f, 0.0f, gs); tg = tock_gpu();
    tick(); C->matmul_bf16(logits, st_mm_f32(x), st_mm_f32(w), NULL, rows, v, c, 0, 1, 1.0f, 0.0f, scpu); tc = tock_cpu();
    snprintf(name, sizeof name, "head logits bf16 V=%d", v);
    report(name, dev_err(glog, logits, nl), tg, tc, 1e-4);
    tick(); G->matmul_bf16(gdx, st_mm_bf16(gdl16), st_mm_f32(gw), NULL, rows, c, v, 0, 0, 1.0f, 0.0f, gs); tg = tock_gpu();
    tick(); C->matmul_bf16(dx, st_mm_f32_rounded(dl), st_mm_f32(w), NULL, rows, c, v, 0, 0, 1.0f, 0.0f, scpu); tc = tock_cpu();
    snprintf(name, sizeof name, "head dx bf16 V=%d (dlogits pitch %d)", v, v);
    report(name, dev_err(gdx, dx, nx), tg, tc, 1e-3);
    tick(); G->matmul_bf16(gdw, st_mm_bf16(gdl16), st_mm_f32(gx), NULL, v, c, rows, 1, 0, 1.0f, 1.0f, gs); tg = tock_gpu();
    tick(); C->matmul_bf16(dw, st_mm_f32_rounded(dl), st_mm_f32(x), NULL, v, c, rows, 1, 0, 1.0f, 1.0f, scpu); tc = tock_cpu();
    snprintf(name, sizeof name, "head dW bf16 V=%d (dlogits^T)", v);
    report(name, dev_err(gdw, dw, nw), tg, tc, 1e-3);
    G->free(gx), G->free(gw), G->free(gdl), G->free(glog), G->free(gdx), G->free(gdw), G->free(gs), G->free(gdl16);
    free(x), free(w), free(dl), free(logits), free(dx), free(dw), free(scpu), free(dl16);
}

static void check_real_shapes(void) {
    int tq = self_test ? 37 : 515; /* not a multiple of 8 or 32 */
    check_attention_shape(1, tq, 4, 2, 64, 1.0f);
    check_attention_shape(1, tq, 8, 2, 128, 1.0f);
    check_attention_shape(2, self_test ? 29 : 131, 4, 1, 128, 6.0f); /* scores up to ~hd*36/sqrt(hd) */
    check_norm_shape(33, 771);
    static const int vocabs[4] = {32000, 50257, 128256, 151936};
    for (int i = 0; i < (self_test ? 2 : 4); i++) check_xent_shape(self_test ? 10 : 24, vocabs[i], 8, 1.0f);
    check_xent_shape(10, 50257, 4, 60.0f);
    check_kd(self_test ? 6 : 24, self_test ? 50257 : 128256, 2.0f, 0.5f, 8.0f);
    check_kd(self_test ? 6 : 16, 151936, 1.0f, 0.9f, 30.0f);
    check_head_gemms(self_test ? 8 : 48, 50257, self_test ? 32 : 256);
}

/* One elementwise kernel over more than 2^31 elements (size_t indexing, grid-stride loops): round_bf16
 * on n floats filled from a repeated host pattern; windows at the start, around 2^31 and at the end are
 * compared with the host rounding rule. Needs 4n bytes of device memory (8.6 GB at the default). */
static size_t big_elems = (size_t)1 << 31 | 4099;
static void check_big_elementwise(void) {
    const size_t chunk = (size_t)1 << 24, win = 8192;
    size_t n = big_elems;
    float *pattern = hrand(chunk, 1e3f);
    float *g = G->alloc(n * sizeof(float));
    if (!g) {
        checked++, failures++;
        printf("round_bf16 n=%zu: device allocation of %zu bytes failed  FAIL\n", n, n * sizeof(float));
        free(pattern);
        return;
    }
    for (size_t at = 0; at < n; at += chunk)
        G->copy_to_device(g + at, pattern, (n - at < chunk ? n - at : chunk) * sizeof(float));
    tick(); G->round_bf16(g, n); double tg = tock_gpu();
    size_t starts[3] = {0, ((size_t)1 << 31) - win / 2, n - win};
    float *got = xmalloc(win * 4), *want = xmalloc(win * 4);
    double worst = 0;
    for (int w = 0; w < 3; w++) {
        size_t a = starts[w] < n ? starts[w] : 0, len = n - a < win ? n - a : win;
        G->copy_to_host(got, g + a, len * sizeof(float));
        for (size_t i = 0; i < len; i++) want[i] = st_bf16_round(pattern[(a + i) % chunk]);
        worst = fmax(worst, bit_diffs(got, want, len, 4));
    }
    char name[64];
    snprintf(name, sizeof name, "round_bf16 n=%zu (> 2^31: windows)", n);
    report(name, worst, tg, 0, 0);
    G->free(g), free(pattern), free(got), free(want);
}

/* ---------------------------------------------------------------- training step */

/* The model and step of the training section (flags; -1 = the mode's default, see defaults_for()). */
static struct {
    int layers, dim, heads, kv_heads, ff, vocab, seq, batch, steps, peak_n;
} topt = {-1, -1, -1, -1, -1, -1, -1, -1, -1, -1};

static void defaults_for(int small) {
    /* full: a 4-layer Llama, d_model 256 (~11M parameters, most in the 32000-word head); small: seconds on
     * 2 CPU cores */
    const int full[10] = {4, 256, 4, 2, 688, 32000, 128, 4, 5, 4096};
    const int tiny[10] = {2, 64, 4, 2, 172, 512, 32, 2, 3, 256};
    const int *d = small ? tiny : full;
    int *f[10] = {&topt.layers, &topt.dim, &topt.heads, &topt.kv_heads, &topt.ff, &topt.vocab,
                  &topt.seq, &topt.batch, &topt.steps, &topt.peak_n};
    for (int i = 0; i < 10; i++)
        if (*f[i] < 0) *f[i] = d[i];
}

/* The architectures of the training section: Llama (RMSNorm, RoPE, SwiGLU, untied head), Llama with
 * q/k/v biases (Qwen 2's attention: the bias epilogue), GPT-2 (LayerNorm, GELU, biases everywhere, wpe,
 * tied head). */
typedef enum { ARCH_LLAMA, ARCH_QKV_BIAS, ARCH_GPT2 } arch;
static const char *arch_label(arch a) { return a == ARCH_GPT2 ? "train-gpt2" : a == ARCH_QKV_BIAS ? "train-qkvbias" : "train"; }

static int train_model(st_model *m, const st_backend *be, st_precision prec, arch a) {
    st_model_config c;
    memset(&c, 0, sizeof c);
    c.family = a == ARCH_GPT2 ? ST_FAMILY_GPT2 : ST_FAMILY_LLAMA;
    snprintf(c.model_type, sizeof c.model_type, a == ARCH_GPT2 ? "gpt2" : a == ARCH_QKV_BIAS ? "qwen2" : "llama");
    c.qkv_bias = a != ARCH_LLAMA;
    c.tied_embeddings = a == ARCH_GPT2;
    c.n_layer = topt.layers, c.d_model = topt.dim, c.n_head = topt.heads, c.n_kv_head = topt.kv_heads;
    c.head_dim = topt.heads > 0 ? topt.dim / topt.heads : 0;
    if (a == ARCH_GPT2) c.n_kv_head = c.n_head;
    c.d_ff = topt.ff, c.vocab = topt.vocab, c.max_seq = topt.seq;
    c.norm_eps = 1e-5f, c.rope_theta = 10000.0f, c.bos_id = c.eos_id = -1;
    int rc = st_model_build(m, &c, be);
    if (!rc) rc = st_model_init_random(m, 20261122);
    unsigned char *layers = xmalloc((size_t)topt.layers);
    memset(layers, 1, (size_t)topt.layers);
    m->grad_align = 1;
    if (!rc) rc = st_model_set_trainable(m, layers, ST_MOD_ALL);
    free(layers);
    if (!rc) rc = st_model_alloc_activations(m, topt.batch, topt.seq);
    if (!rc) rc = st_model_set_precision(m, prec);
    return rc;
}

/* Seconds of the fastest of 3 rounds of 4 back-to-back calls, per call. */
static double time_matmul(float *dc, const void *da, const void *db, float *scratch, int n, st_precision prec) {
    double best = INFINITY;
    for (int round = -1; round < 3; round++) { /* round -1: warm-up (cuBLASLt heuristics, page faults) */
        int reps = round < 0 ? 1 : 4;
        tick();
        for (int r = 0; r < reps; r++) {
            if (prec == ST_PRECISION_BF16)
                G->matmul_bf16(dc, st_mm_bf16(da), st_mm_bf16(db), NULL, n, n, n, 0, 0, 1.0f, 0.0f, scratch);
            else
                G->matmul(dc, da, db, n, n, n, 0, 0, 1.0f, 0.0f);
        }
        double t = tock_gpu() / reps;
        if (round >= 0 && t < best) best = t;
    }
    return best;
}

/* FLOP/s of an n x n x n matmul on the backend under test: the fp32 matmul, or matmul_bf16 on bf16
 * operands (no rounding pass: the arithmetic a bf16 training step's matmuls reach at best). */
static double measure_peak(st_precision prec, int n) {
    size_t nn = (size_t)n * n, esz = prec == ST_PRECISION_BF16 ? 2 : 4;
    float *h = hrand(nn, 1);
    void *host = h;
    uint16_t *bits = NULL;
    if (prec == ST_PRECISION_BF16) {
        bits = xmalloc(nn * 2);
        for (size_t i = 0; i < nn; i++) bits[i] = st_float_to_bf16_bits(h[i]);
        host = bits;
    }
    void *da = dev_from(host, nn * esz), *db = dev_from(host, nn * esz);
    float *dc = dev_from(NULL, nn * sizeof(float)), *ds = NULL;
    if (prec == ST_PRECISION_BF16) ds = dev_from(NULL, st_matmul_bf16_scratch_floats(n, n, n) * sizeof(float));
    double t = time_matmul(dc, da, db, ds, n, prec);
    G->free(da), G->free(db), G->free(dc), G->free(ds), free(h), free(bits);
    return 2.0 * (double)n * n * n / t;
}

static int cmp_double(const void *x, const void *y) {
    double a = *(const double *)x, b = *(const double *)y;
    return (a > b) - (a < b);
}

/* |x - ref| / |ref|; infinite when either is not finite (a diverged step is a failure). */
static double loss_rel_diff(double x, double ref) {
    if (!isfinite(x) || !isfinite(ref)) return INFINITY;
    return fabs(x - ref) / fmax(fabs(ref), 1e-30);
}

/* One training step: zero grads, forward (loss), backward, AdamW. Returns the loss; *secs its time.
 * `before_update` (may be NULL) runs between backward and AdamW, outside the timing. */
static double train_step(st_model *m, st_optim *o, const st_backend *be, const int32_t *in, const int32_t *tg,
                         const float *w, int step, double *secs, void (*before_update)(void)) {
    be->synchronize();
    double t = st_now();
    st_model_zero_grad(m);
    double loss = st_model_forward(m, in, tg, w, 1);
    st_model_backward(m);
    be->synchronize();
    *secs = st_now() - t;
    if (before_update) before_update();
    t = st_now();
    st_optim_update(o, m, m->grads, st_lr_at(&o->cfg, step), 1.0f);
    be->synchronize();
    *secs += st_now() - t;
    return loss;
}

/* Gradients after the first backward, tensor by tensor (AdamW's update hides a gradient off by a constant
 * factor: m/sqrt(v) cancels it, so the losses alone would not show it). */
/* ||x - ref|| / ||ref|| over a tensor (infinite when x has a NaN): a whole gradient's error. Elementwise
 * relative errors are not the measure here: under bf16 a gradient element that is a near-cancelling sum
 * may flip sign when one operand rounds the other way, while the tensor is right. */
static double norm_err(const float *x, const float *ref, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)x[i] - ref[i];
        if (isnan(x[i]) != isnan(ref[i])) return INFINITY;
        num += d * d, den += (double)ref[i] * ref[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

static const st_model *grads_g, *grads_c;
static const char *grads_label;
static double grads_tol;
static void compare_grads(void) {
    const st_model *mg = grads_g, *mc = grads_c;
    float *g = fetch(mg->grads, mg->grad_alloc);
    double worst = 0;
    const char *worst_name = "-";
    for (int i = 0; i < mc->n_params; i++) {
        const st_param *p = &mc->params[i];
        if (p->grad_offset < 0) continue;
        double e = norm_err(g + p->grad_offset, mc->grads + p->grad_offset, p->numel);
        if (e > worst) worst = e, worst_name = p->name;
    }
    char name[256];
    snprintf(name, sizeof name, "%s grads after backward 1 (worst %s)", grads_label, worst_name);
    report(name, worst, 0, 0, grads_tol);
    if (self_test) { /* a gradient scaled by a constant (what AdamW hides) must be caught */
        for (size_t k = 0; k < mg->grad_alloc; k++) g[k] *= (float)(1.0 + 3.0 * grads_tol);
        expect_caught("gradient (scaled by 1 + 3 tol)", norm_err(g, mc->grads, mc->grad_alloc), grads_tol);
    }
    free(g);
}

/* Loss tolerances (estimates; nothing has run on a GPU yet): fp32 differs only in summation order; bf16
 * adds operands that land on the other side of a rounding boundary (one bf16 ulp = 2^-8 relative). */
static void check_training(st_precision prec, arch a) {
    const char *pn = prec == ST_PRECISION_BF16 ? "bf16" : "fp32", *label = arch_label(a);
    const double tol = prec == ST_PRECISION_BF16 ? 2e-3 : 2e-4;
    st_model mg, mc;
    memset(&mg, 0, sizeof mg), memset(&mc, 0, sizeof mc);
    int rc = train_model(&mg, G, prec, a);
    if (!rc) rc = train_model(&mc, C, prec, a);
    if (rc) {
        checked++, failures++;
        printf("%s %s: model setup failed: %s  FAIL\n", label, pn, st_error());
        st_model_free(&mg), st_model_free(&mc);
        return;
    }
    st_optim_config oc = {1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, ST_SCHED_CONSTANT, 0, topt.steps, 0.0f, 1.0f};
    st_optim og, ocpu;
    memset(&og, 0, sizeof og), memset(&ocpu, 0, sizeof ocpu);
    rc = st_optim_init(&og, &oc, 0, mg.grad_alloc, &mg, G);
    if (!rc) rc = st_optim_init(&ocpu, &oc, 0, mc.grad_alloc, &mc, C);
    int N = topt.batch * topt.seq;
    int32_t *in = xmalloc((size_t)N * 4), *tg = xmalloc((size_t)N * 4);
    float *w = xmalloc((size_t)N * 4);
    for (int i = 0; i < N; i++) {
        in[i] = (int32_t)(rand_bits() % (uint32_t)topt.vocab);
        tg[i] = (int32_t)(rand_bits() % (uint32_t)topt.vocab);
        w[i] = 1.0f / (float)N;
    }
    double *tstep = xmalloc(sizeof(double) * (size_t)topt.steps), worst = 0, last_g = 0, last_c = 0;
    /* gradients, ||g - ref|| / ||ref|| per tensor: fp32 differs by summation order (1e-6 typical); bf16 also
     * by operands rounded to the other side (2^-8 each, averaging out over a dot product): estimates,
     * like the loss tolerances */
    char glabel[48];
    snprintf(glabel, sizeof glabel, "%s %s", label, pn);
    grads_g = &mg, grads_c = &mc, grads_label = glabel, grads_tol = prec == ST_PRECISION_BF16 ? 2e-2 : 1e-4;
    for (int s = 0; s < topt.steps && !rc; s++) {
        double tcpu;
        double lg = train_step(&mg, &og, G, in, tg, w, s, &tstep[s], NULL);
        double lc = train_step(&mc, &ocpu, C, in, tg, w, s, &tcpu, s == 0 ? compare_grads : NULL);
        double d = loss_rel_diff(lg, lc);
        worst = fmax(worst, d);
        last_g = lg, last_c = lc;
        printf("%s %s step %d  loss %.7f (%s)  %.7f (cpu ref)  rel_diff %.2e  time %.1f ms (%s), %.1f ms (cpu ref)"
               "\n", label, pn, s + 1, lg, G->name, lc, d, tstep[s] * 1e3, G->name, tcpu * 1e3);
    }
    if (rc) {
        checked++, failures++;
        printf("%s %s: optimizer setup failed: %s  FAIL\n", label, pn, st_error());
    } else {
        checked++;
        int ok = worst <= tol && G->status() == 0;
        if (!ok) failures++;
        printf("%s %s max_rel_loss_diff %9.2e  tol %.0e  %s\n", label, pn, worst, tol, ok ? "ok" : "FAIL");
        if (self_test && a == ARCH_LLAMA) /* the same comparison must fail for a loss off by 3x the tolerance */
            expect_caught("training loss", loss_rel_diff(last_g * (1.0 + 3.0 * tol), last_c), tol);
    }
    if (!rc && a == ARCH_LLAMA) {
        qsort(tstep, (size_t)topt.steps, sizeof(double), cmp_double);
        double median = tstep[topt.steps / 2];
        double tps = (double)N / median, fpt = st_model_flops_per_token(&mg, topt.seq);
        double peak = measure_peak(prec, topt.peak_n);
        printf("train %s step_median %.2f ms  tokens/s %.1f  flops/token %.3g  peak %.3g TFLOP/s (%s %d^3 on %s)  "
               "MFU %.2f%%\n",
               pn, median * 1e3, tps, fpt, peak * 1e-12, prec == ST_PRECISION_BF16 ? "matmul_bf16, bf16 operands"
                                                                                   : "matmul fp32",
               topt.peak_n, G->name, 100.0 * fpt * tps / peak);
    }
    st_optim_free(&og, G), st_optim_free(&ocpu, C);
    free(og.param_step), free(ocpu.param_step);
    st_model_free(&mg), st_model_free(&mc);
    free(in), free(tg), free(w), free(tstep);
}

/* ---------------------------------------------------------------- self-test backend */

static st_backend noisy; /* the CPU table with noisy matmuls (--self-test) */
static uint64_t noise_counter;

/* x * (1 + u * 4 * 2^-23), u uniform in [-1, 1) from a counter hash (splitmix64): deterministic, and
 * the same for every thread count since it runs serially after the matmul. */
static void add_noise(float *c, size_t n) {
    for (size_t i = 0; i < n; i++) {
        uint64_t z = (noise_counter++) + 0x9E3779B97F4A7C15ULL;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL, z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL, z ^= z >> 31;
        double u = (double)(z >> 11) * (2.0 / 9007199254740992.0) - 1.0;
        c[i] = (float)((double)c[i] * (1.0 + u * 4.0 * 0x1p-23));
    }
}

static void noisy_matmul(float *c, const float *a, const float *b, int m, int n, int k, int ta, int tb, float alpha,
                         float beta) {
    C->matmul(c, a, b, m, n, k, ta, tb, alpha, beta);
    if (m > 0 && n > 0) add_noise(c, (size_t)m * n);
}

static int inject_status; /* self-test: the next status() call reports a failure */
static int noisy_status(void) {
    if (!inject_status) return C->status();
    inject_status = 0;
    return st_fail(ST_EDEVICE, "cpu+noise check_me: injected failure (self-test)");
}

static void noisy_matmul_bf16(float *c, st_mm_in a, st_mm_in b, const float *bias, int m, int n, int k, int ta,
                              int tb, float alpha, float beta, float *scratch) {
    C->matmul_bf16(c, a, b, bias, m, n, k, ta, tb, alpha, beta, scratch);
    if (m > 0 && n > 0) add_noise(c, (size_t)m * n);
}

static void noisy_qmatmul(float *c, st_mm_in x, const st_qweight *w, int m, int trans, int bf16, float beta,
                          float *scratch, size_t scratch_floats) {
    C->qmatmul(c, x, w, m, trans, bf16, beta, scratch, scratch_floats);
    int rows = 0;
    for (int p = 0; p < w->nparts; p++) rows += w->part[p].rows;
    if (m > 0) add_noise(c, (size_t)m * (size_t)(trans ? w->cols : rows));
}

/* ---------------------------------------------------------------- main */

static int usage(const char *bad) {
    if (bad) printf("gpu_check: bad argument '%s'\n", bad);
    printf("usage: gpu_check [--device N] [--seed S] [--self-test] [--layers L] [--dim C] [--heads H]\n"
           "                 [--kv-heads KVH] [--ff F] [--vocab V] [--seq T] [--batch B] [--steps S]\n"
           "                 [--peak-size N] [--no-train] [--no-big] [--big-elems N] [--only GROUP]\n"
           "groups: matmul bf16 norms attention pointwise xent adamw dequant int8 shapes big train\n");
    return 2;
}

static int parse_int(const char *s, int lo, int hi, int *out) {
    char *end = NULL;
    long v = strtol(s, &end, 10);
    if (!*s || *end || v < lo || v > hi) return -1;
    *out = (int)v;
    return 0;
}

int main(int argc, char **argv) {
    int device = 0, train = 1, big = 1;
    const char *only = NULL;
    struct { const char *flag; int *dst, lo, hi; } iflags[] = {
        {"--device", &device, 0, 1024},        {"--layers", &topt.layers, 1, 1024},
        {"--dim", &topt.dim, 1, 65536},        {"--heads", &topt.heads, 1, 1024},
        {"--kv-heads", &topt.kv_heads, 1, 1024}, {"--ff", &topt.ff, 1, 1 << 20},
        {"--vocab", &topt.vocab, 2, 1 << 22},  {"--seq", &topt.seq, 1, 1 << 16},
        {"--batch", &topt.batch, 1, 1 << 16},  {"--steps", &topt.steps, 1, 1000},
        {"--peak-size", &topt.peak_n, 16, 32768},
    };
    for (int i = 1; i < argc; i++) {
        int done = 0;
        for (size_t f = 0; f < sizeof iflags / sizeof iflags[0] && !done; f++) {
            if (strcmp(argv[i], iflags[f].flag) != 0) continue;
            if (i + 1 >= argc || parse_int(argv[i + 1], iflags[f].lo, iflags[f].hi, iflags[f].dst))
                return usage(i + 1 < argc ? argv[i + 1] : argv[i]);
            i++, done = 1;
        }
        if (done) continue;
        if (strcmp(argv[i], "--seed") == 0 && i + 1 < argc) rng_state = strtoull(argv[++i], NULL, 10) | 1;
        else if (strcmp(argv[i], "--self-test") == 0) self_test = 1;
        else if (strcmp(argv[i], "--no-train") == 0) train = 0;
        else if (strcmp(argv[i], "--no-big") == 0) big = 0;
        else if (strcmp(argv[i], "--big-elems") == 0 && i + 1 < argc) big_elems = strtoull(argv[++i], NULL, 10);
        else if (strcmp(argv[i], "--only") == 0 && i + 1 < argc) only = argv[++i];
        else return usage(argv[i]);
    }
    defaults_for(self_test);
    if (self_test) {
        C = st_backend_cpu(0);
        if (C) {
            noisy = *C;
            noisy.name = "cpu+noise";
            noisy.matmul = noisy_matmul;
            noisy.matmul_bf16 = noisy_matmul_bf16;
            noisy.qmatmul = noisy_qmatmul;
            noisy.status = noisy_status;
            G = &noisy;
        }
    } else {
        G = st_backend_cuda(device);
        if (!G) {
            printf("gpu_check: nothing checked: %s\n", st_error());
            return 2;
        }
        C = st_backend_cpu(0);
    }
    if (!C) {
        printf("gpu_check: nothing checked: CPU backend failed: %s\n", st_error());
        return 2;
    }
    if (self_test)
        printf("gpu_check --self-test: backend under test = cpu+noise (the CPU backend, matmul outputs off by up "
               "to 4 fp32 ulps); the perturbed results must be caught\n");
    else
        printf("gpu_check: CUDA device %d vs CPU; * = CUDA-only extra checked against a CPU composition\n", device);
#define GROUP(g) (!only || strcmp(only, g) == 0)
    if (self_test && !only) big_elems = (size_t)1 << 20 | 4099; /* the same code, a size a CPU runs in ms */
    if (GROUP("matmul")) check_matmul();
    if (GROUP("bf16")) check_matmul_bf16(), check_bf16_storage();
    if (GROUP("norms")) check_bias(), check_elementwise(), check_norms();
    if (GROUP("attention")) check_rope_attention(), check_docs();
#ifdef ST_HAVE_CUDA
    if (GROUP("attention") && !self_test) /* tensor cores: CUDA only */
        check_attention_tc(2, 80, 4, 2, 64), check_attention_tc(1, 515, 8, 2, 128), check_attention_tc(1, 77, 4, 1, 64);
#endif
    if (GROUP("decode")) check_decode(), check_decode_mm();
    if (GROUP("norms")) check_head_rmsnorm();
    if (GROUP("pointwise")) check_activations(), check_embedding(), check_copies();
    if (GROUP("xent")) check_cross_entropy(), check_kd(NROWS, V, 2.0f, 0.5f, 5.0f), check_kd(NROWS, V, 0.7f, 1.0f, 20.0f);
    if (GROUP("adamw")) check_adamw();
    if (GROUP("dequant")) check_dequant(), check_qlora_matmul();
    if (GROUP("int8")) check_w8a8();
    if (GROUP("dequant")) check_dequant(), check_qlora_matmul(), check_qmatmul();
    if (GROUP("shapes")) check_real_shapes();
    if (big && GROUP("big")) check_big_elementwise();
    if (train && GROUP("train")) {
        printf("train: llama L=%d C=%d H=%d KVH=%d F=%d V=%d, B=%d T=%d, %d AdamW steps, same weights/tokens on %s "
               "and cpu; then Llama with q/k/v biases and GPT-2 (tied head, wpe, LayerNorm, GELU, biases)\n",
               topt.layers, topt.dim, topt.heads, topt.kv_heads, topt.ff, topt.vocab, topt.batch, topt.seq, topt.steps,
               G->name);
        check_training(ST_PRECISION_FP32, ARCH_LLAMA);
        check_training(ST_PRECISION_BF16, ARCH_LLAMA);
        check_training(ST_PRECISION_FP32, ARCH_QKV_BIAS);
        check_training(ST_PRECISION_BF16, ARCH_GPT2);
    }
#undef GROUP
    if (self_test) { /* a device failure recorded by a kernel must fail its check even when numbers agree */
        inject_status = 1;
        int before = failures;
        report("check_me", 0.0, 0, 0, 1.0);
        int caught = failures > before;
        failures = before + !caught;
        printf("self-test: %s\n", caught ? "an injected device failure was caught" : "FAIL: an injected device failure was not caught");
    }
    int final = G->status(); /* anything recorded after the last check */
    if (final) {
        printf("gpu_check: device failure: %s\n", st_error());
        return 1;
    }
    printf("gpu_check: %d of %d checks within tolerance\n", checked - failures, checked);
    return failures ? 1 : 0;
}
