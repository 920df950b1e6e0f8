/* test_kernels_cpu.c — the CPU backend against independent double-precision references.
 *
 * Forwards are compared with naive double implementations written here. Backwards are compared with
 * central finite differences (in double, on those references) of J = sum(out * R) for a random R.
 * Shapes are tiny and odd so tails of every vector loop run; a separate test uses sizes large enough
 * to go parallel and checks bit-identical results across runs and thread counts. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <omp.h>
#include <pthread.h>
#include <signal.h>
#include <time.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/bf16.h"
#include "kernels/cpu/cpu_kernels.h"
#include "kernels/kernels.h"

/* ---- helpers ---- */

static uint64_t rng_state = 0x9E3779B97F4A7C15ULL;
static double urand(void) { /* uniform [-1, 1) */
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (double)(rng_state >> 11) / (double)(1ULL << 53) * 2.0 - 1.0;
}
static float *frand(size_t n, double scale) {
    float *p = malloc((n ? n : 1) * sizeof(float));
    for (size_t i = 0; i < n; i++) p[i] = (float)(urand() * scale);
    return p;
}
static double *dcopy(const float *x, size_t n) {
    double *d = malloc((n ? n : 1) * sizeof(double));
    for (size_t i = 0; i < n; i++) d[i] = x[i];
    return d;
}
static float *fdup(const float *x, size_t n) {
    float *p = malloc((n ? n : 1) * sizeof(float));
    memcpy(p, x, n * sizeof(float));
    return p;
}
static double *dzeros(size_t n) { return calloc(n ? n : 1, sizeof(double)); }

/* max |got - want| / max |want| (scale floor 1e-6), printed on failure. */
static double rel_err(const float *got, const double *want, size_t n) {
    double num = 0.0, den = 1e-6;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)got[i] - want[i]);
        if (d > num || isnan(d)) num = isnan(d) ? INFINITY : d;
        if (fabs(want[i]) > den) den = fabs(want[i]);
    }
    return num / den;
}
#define ASSERT_CLOSE(got, want, n, tol, what)                                                             \
    do {                                                                                                  \
        double e_ = rel_err((got), (want), (n));                                                          \
        if (!(e_ <= (tol))) fail_msg("%s: relative error %.3g > %.3g", (what), e_, (double)(tol));        \
    } while (0)

/* Central differences of obj() with respect to every entry of p. */
typedef double (*objective_fn)(void *ctx);
static void fd_grad(double *p, size_t n, objective_fn obj, void *ctx, double *g) {
    for (size_t i = 0; i < n; i++) {
        double keep = p[i], h = 1e-5 * (fabs(keep) > 1.0 ? fabs(keep) : 1.0);
        p[i] = keep + h;
        double fp = obj(ctx);
        p[i] = keep - h;
        double fm = obj(ctx);
        p[i] = keep;
        g[i] = (fp - fm) / (2.0 * h);
    }
}
static double dot_d(const double *a, const double *b, size_t n) {
    double s = 0.0;
    for (size_t i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

static const st_backend *be;
static int setup(void **state) {
    (void)state;
    be = st_backend_cpu(2);
    return be ? 0 : -1;
}

/* ---- exp helper ---- */

static void test_expf(void **state) {
    (void)state;
    double worst = 0.0;
    for (int i = 0; i <= 200000; i++) {
        float x = -87.0f + 175.0f * (float)i / 200000.0f;
        double want = exp((double)x);
        double e = fabs((double)st_cpu_expf(x) - want) / want;
        if (e > worst) worst = e;
    }
    if (worst > 4e-7) fail_msg("st_cpu_expf relative error %.3g", worst);
    assert_true(st_cpu_expf(-200.0f) == 0.0f);
    assert_true(isinf(st_cpu_expf(100.0f)));
    assert_true(isnan(st_cpu_expf(NAN)));
    assert_true(st_cpu_expf(0.0f) == 1.0f);
}

/* ---- decode attention over the KV cache ---- */

/* kv_store + attention_cached against a float64 loop: a prefill run of 300 rows of sequence 2 (positions
 * 0..299: the sgemm-tile path, cut into tiles of 128, 128 and 44 rows) followed by 3 lone rows (decode
 * steps: the row path) of sequences 0 and 1 whose earlier keys are already cached, GQA 4/2, without and
 * with a sliding window. */
static void test_attention_cached(void **state) {
    (void)state;
    enum { S = 3, MT = 320, H = 4, KVH = 2, HD = 8, RUN = 300, ROWS = RUN + 3 };
    size_t stride = (size_t)(H + 2 * KVH) * HD, kvd = (size_t)KVH * HD, cache = (size_t)S * MT * kvd;
    int32_t seq[ROWS], pos[ROWS];
    for (int r = 0; r < RUN; r++) seq[r] = 2, pos[r] = r;
    seq[RUN] = 0, pos[RUN] = 30, seq[RUN + 1] = 1, pos[RUN + 1] = 5, seq[RUN + 2] = 0, pos[RUN + 2] = 31;
    for (int window = 0; window <= 7; window += 7) {
        float *qkv = frand((size_t)ROWS * stride, 2.0), *kc = frand(cache, 2.0), *vc = frand(cache, 1.0);
        float *out = frand((size_t)ROWS * H * HD, 1.0);
        be->kv_store(kc, vc, qkv, seq, pos, ROWS, H, KVH, HD, MT);
        for (int i = 0; i < ROWS; i++) /* the layout [S, KVH, MT, HD]: row i's kv head g at its own slot */
            for (int g = 0; g < KVH; g++) {
                size_t slot = (((size_t)seq[i] * KVH + (size_t)g) * MT + (size_t)pos[i]) * HD;
                const float *k = qkv + (size_t)i * stride + (size_t)(H + g) * HD;
                assert_memory_equal(kc + slot, k, HD * sizeof(float));
                assert_memory_equal(vc + slot, k + kvd, HD * sizeof(float));
            }
        double *want = dzeros((size_t)ROWS * H * HD);
        for (int i = 0; i < ROWS; i++)
            for (int hi = 0; hi < H; hi++) {
                int lo = window > 0 && pos[i] >= window ? pos[i] - window + 1 : 0, nk = pos[i] + 1 - lo;
                double sc[MT], mx = -INFINITY, z = 0;
                const float *q = qkv + (size_t)i * stride + (size_t)hi * HD;
                size_t base = (((size_t)seq[i] * KVH + (size_t)(hi / (H / KVH))) * MT + (size_t)lo) * HD; /* [S, KVH, MT, HD] */
                for (int j = 0; j < nk; j++) {
                    double d = 0;
                    for (int t = 0; t < HD; t++) d += (double)q[t] * kc[base + (size_t)j * HD + t];
                    sc[j] = d / sqrt((double)HD);
                    if (sc[j] > mx) mx = sc[j];
                }
                for (int j = 0; j < nk; j++) z += sc[j] = exp(sc[j] - mx);
                for (int j = 0; j < nk; j++)
                    for (int t = 0; t < HD; t++)
                        want[((size_t)i * H + hi) * HD + t] += sc[j] / z * vc[base + (size_t)j * HD + t];
            }
        be->attention_cached(out, qkv, kc, vc, seq, pos, ROWS, H, KVH, HD, MT, window);
        ASSERT_CLOSE(out, want, (size_t)ROWS * H * HD, 1e-5, window ? "attention_cached (window 7)" : "attention_cached");
        free(qkv), free(kc), free(vc), free(out), free(want);
    }
}

/* ---- matmul ---- */

static void test_matmul(void **state) {
    (void)state;
    const int n = 7, k = 9;
    for (int m = 5; m >= 1; m -= 4) /* m = 1: the matrix-vector path (a decode step) */
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++) {
            float *a = frand((size_t)m * k, 1), *b = frand((size_t)k * n, 1), *c = frand((size_t)m * n, 1);
            double *want = dzeros((size_t)m * n);
            for (int i = 0; i < m; i++)
                for (int j = 0; j < n; j++) {
                    double s = 0;
                    for (int p = 0; p < k; p++) {
                        double av = ta ? a[p * m + i] : a[i * k + p];
                        double bv = tb ? b[j * k + p] : b[p * n + j];
                        s += av * bv;
                    }
                    want[i * n + j] = 0.7 * s + 0.3 * c[i * n + j];
                }
            be->matmul(c, a, b, m, n, k, ta, tb, 0.7f, 0.3f);
            ASSERT_CLOSE(c, want, (size_t)m * n, 1e-6, "matmul");
            /* k = 0: C = beta * C */
            float *c2 = fdup(c, (size_t)m * n);
            be->matmul(c2, a, b, m, n, 0, ta, tb, 1.0f, 0.5f);
            for (int i = 0; i < m * n; i++) assert_true(c2[i] == c[i] * 0.5f);
            free(a), free(b), free(c), free(c2), free(want);
        }
    /* one row over many columns (split across threads), beta 0 on a C full of NaN: C is overwritten */
    const int N = 3001, K = 777;
    for (int tb = 0; tb < 2; tb++) {
        float *a = frand((size_t)K, 2), *b = frand((size_t)K * N, 3), *c = frand((size_t)N, 4);
        for (int j = 0; j < N; j++) c[j] = NAN;
        double *want = dzeros((size_t)N);
        for (int j = 0; j < N; j++)
            for (int p = 0; p < K; p++) want[j] += 1.5 * (double)a[p] * (tb ? b[(size_t)j * K + p] : b[(size_t)p * N + j]);
        be->matmul(c, a, b, 1, N, K, 0, tb, 1.5f, 0.0f);
        ASSERT_CLOSE(c, want, (size_t)N, 1e-5, "matmul one row");
        free(a), free(b), free(c), free(want);
    }
}

/* Model-sized matmuls (above the parallel threshold, split by rows and by columns) with 1 and 2 threads,
 * every transpose, against float64. Each element's bound is the fp32 dot product's: (k + 2) u times
 * alpha sum |a b| + |beta c| (u = 2^-24), whatever order the sgemm library (oneDNN or OpenBLAS) sums in.
 * beta 0 on a C of NaN must overwrite it; alpha 0.7, beta 1 accumulates. */
static void test_matmul_split(void **state) {
    (void)state;
    const int shapes[2][3] = {{300, 257, 130}, {70, 400, 200}}; /* by rows; by columns (n > m) */
    int keep = omp_get_max_threads();
    for (int nt = 1; nt <= 2; nt++) {
        omp_set_num_threads(nt);
        for (int s = 0; s < 2; s++)
            for (int t = 0; t < 4; t++)
                for (int acc = 0; acc < 2; acc++) {
                    int m = shapes[s][0], n = shapes[s][1], k = shapes[s][2], ta = t & 1, tb = t >> 1;
                    float alpha = acc ? 0.7f : 1.0f, beta = acc ? 1.0f : 0.0f;
                    float *a = frand((size_t)m * k, 1), *b = frand((size_t)k * n, 1), *c = frand((size_t)m * n, 1);
                    if (!acc)
                        for (size_t i = 0; i < (size_t)m * n; i++) c[i] = NAN;
                    double *want = dzeros((size_t)m * n), *bound = dzeros((size_t)m * n);
                    for (int i = 0; i < m; i++)
                        for (int j = 0; j < n; j++) {
                            double sum = 0, mag = 0;
                            for (int p = 0; p < k; p++) {
                                double av = ta ? a[(size_t)p * m + i] : a[(size_t)i * k + p];
                                double bv = tb ? b[(size_t)j * k + p] : b[(size_t)p * n + j];
                                sum += av * bv, mag += fabs(av * bv);
                            }
                            double c0 = acc ? c[(size_t)i * n + j] : 0.0;
                            want[(size_t)i * n + j] = alpha * sum + beta * c0;
                            bound[(size_t)i * n + j] = (k + 2) * ldexp(1.0, -24) * (alpha * mag + fabs(c0)) + 1e-30;
                        }
                    st_cpu_matmul(c, a, b, m, n, k, ta, tb, alpha, beta);
                    for (size_t i = 0; i < (size_t)m * n; i++)
                        if (!(fabs(c[i] - want[i]) <= bound[i]))
                            fail_msg("matmul %dx%dx%d ta %d tb %d beta %g, %d threads: element %zu = %.9g, want %.9g (bound %.3g)",
                                     m, n, k, ta, tb, beta, nt, i, c[i], want[i], bound[i]);
                    free(a), free(b), free(c), free(want), free(bound);
                }
    }
    omp_set_num_threads(keep);
}

/* A signal handled on a thread inside the sgemm library must not corrupt anything: oneDNN 2.6.3's AVX-512
 * sgemm corrupted the heap when one arrived mid-call (glibc "corrupted size vs. prev_size", within 0.3 s of
 * this loop before st_cpu_matmul blocked signals around it; the checkpoint signal or SIGTERM reaching a rank
 * during a matmul did it once in CI). Another thread signals this one every ~20 us through the training
 * step's shapes (tiny Llama: N = 32 tokens); every product is checked against double with its fp32 bound. */
static volatile sig_atomic_t sig_hits;
static volatile int sig_stop;
static pthread_t sig_victim;
static void sig_count(int sig) { (void)sig; sig_hits++; }
static void *sig_pinger(void *arg) {
    (void)arg;
    struct timespec ts = {0, 20000};
    while (!sig_stop) {
        pthread_kill(sig_victim, SIGUSR2);
        nanosleep(&ts, NULL);
    }
    return NULL;
}

static void test_matmul_signals(void **state) {
    (void)state;
    const int shapes[][6] = {/* m, n, k, trans_a, trans_b, accumulate */
                             {128, 64, 32, 1, 0, 1}, {32, 128, 64, 0, 1, 0}, {32, 64, 128, 0, 0, 0}, {384, 64, 32, 1, 0, 1},
                             {32, 64, 192, 0, 1, 1}, {32, 384, 64, 0, 1, 0}, {32, 64, 384, 0, 0, 0}, {32, 192, 64, 0, 0, 0}};
    const int ns = (int)(sizeof shapes / sizeof shapes[0]);
    struct sigaction sa, old;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = sig_count;
    sa.sa_flags = SA_RESTART; /* as the trainer's handlers (coordinator/trainer/train.c) */
    sigemptyset(&sa.sa_mask);
    sigaction(SIGUSR2, &sa, &old);
    sig_victim = pthread_self();
    sig_stop = 0;
    sig_hits = 0;
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, sig_pinger, NULL), 0);
    for (int it = 0; it < 1000; it++) {
        const int *s = shapes[it % ns];
        int m = s[0], n = s[1], k = s[2], ta = s[3], tb = s[4], acc = s[5];
        float *a = frand((size_t)m * k, 1), *b = frand((size_t)k * n, 1), *c = frand((size_t)m * n, 1);
        double *want = dzeros((size_t)m * n), *bound = dzeros((size_t)m * n);
        for (int i = 0; i < m; i++)
            for (int j = 0; j < n; j++) {
                double sum = 0, mag = 0;
                for (int p = 0; p < k; p++) {
                    double av = ta ? a[(size_t)p * m + i] : a[(size_t)i * k + p];
                    double bv = tb ? b[(size_t)j * k + p] : b[(size_t)p * n + j];
                    sum += av * bv, mag += fabs(av * bv);
                }
                double c0 = acc ? c[(size_t)i * n + j] : 0.0;
                want[(size_t)i * n + j] = sum + c0;
                bound[(size_t)i * n + j] = (k + 2) * ldexp(1.0, -24) * (mag + fabs(c0)) + 1e-30;
            }
        st_cpu_matmul(c, a, b, m, n, k, ta, tb, 1.0f, acc ? 1.0f : 0.0f);
        for (size_t i = 0; i < (size_t)m * n; i++)
            if (!(fabs(c[i] - want[i]) <= bound[i]))
                fail_msg("matmul %dx%dx%d ta %d tb %d under signals, iteration %d: element %zu = %.9g, want %.9g", m, n, k,
                         ta, tb, it, i, c[i], want[i]);
        free(a), free(b), free(c), free(want), free(bound);
    }
    sig_stop = 1;
    pthread_join(th, NULL);
    sigaction(SIGUSR2, &old, NULL);
    if (sig_hits < 100) fail_msg("only %d signals arrived: the test did not interrupt the matmuls", (int)sig_hits);
}

/* ---- bias and elementwise ---- */

static void test_bias_and_elementwise(void **state) {
    (void)state;
    const int n = 7, c = 70; /* 70 crosses the 64-column block */
    float *y = frand((size_t)n * c, 1), *bias = frand(c, 1), *db = frand(c, 1);
    double *want = dcopy(y, (size_t)n * c), *wdb = dcopy(db, c);
    for (int i = 0; i < n; i++)
        for (int j = 0; j < c; j++) {
            want[i * c + j] += bias[j];
            wdb[j] += y[i * c + j];
        }
    be->bias_bwd(db, y, n, c); /* before bias_add: dy = original y */
    be->bias_add(y, bias, n, c);
    ASSERT_CLOSE(y, want, (size_t)n * c, 1e-7, "bias_add");
    ASSERT_CLOSE(db, wdb, c, 1e-6, "bias_bwd");

    size_t len = 40000 + 13; /* above the parallel threshold, odd tail */
    float *a = frand(len, 2), *b = frand(len, 2), *o = frand(len, 1);
    double *w = dzeros(len);
    for (size_t i = 0; i < len; i++) w[i] = (double)o[i] * 0.37;
    st_cpu_scale(o, 0.37f, len); /* the empty-product path of matmul */
    ASSERT_CLOSE(o, w, len, 1e-7, "scale");

    size_t big = (size_t)8192 * 256 + 8192 * 3 + 5; /* more than one super block of chunks */
    float *s = frand(big, 3);
    double ws = 0.0;
    for (size_t i = 0; i < big; i++) ws += (double)s[i] * s[i];
    double got = be->sumsq(s, big);
    if (fabs(got - ws) > 1e-12 * ws) fail_msg("sumsq %.17g vs %.17g", got, ws);
    assert_true(be->sumsq(s, 0) == 0.0);
    free(y), free(bias), free(db), free(want), free(wdb), free(a), free(b), free(o), free(w), free(s);
}

/* ---- norms ---- */

static void ref_layernorm(double *out, double *mean, double *rstd, const double *x, const double *w,
                          const double *b, int n, int c, double eps) {
    for (int i = 0; i < n; i++) {
        double mu = 0, var = 0;
        for (int j = 0; j < c; j++) mu += x[i * c + j];
        mu /= c;
        for (int j = 0; j < c; j++) var += (x[i * c + j] - mu) * (x[i * c + j] - mu);
        var /= c;
        double rs = 1.0 / sqrt(var + eps);
        for (int j = 0; j < c; j++) out[i * c + j] = (x[i * c + j] - mu) * rs * w[j] + (b ? b[j] : 0.0);
        if (mean) mean[i] = mu;
        if (rstd) rstd[i] = rs;
    }
}
static void ref_rmsnorm(double *out, double *rstd, const double *x, const double *w, int n, int c, double eps) {
    for (int i = 0; i < n; i++) {
        double ms = 0;
        for (int j = 0; j < c; j++) ms += x[i * c + j] * x[i * c + j];
        double rs = 1.0 / sqrt(ms / c + eps);
        for (int j = 0; j < c; j++) out[i * c + j] = w[j] * x[i * c + j] * rs;
        if (rstd) rstd[i] = rs;
    }
}

struct norm_ctx {
    int rms, n, c;
    double *x, *w, *b, *r, *out;
};
static double norm_obj(void *p) {
    struct norm_ctx *k = p;
    if (k->rms)
        ref_rmsnorm(k->out, NULL, k->x, k->w, k->n, k->c, 1e-5);
    else
        ref_layernorm(k->out, NULL, NULL, k->x, k->w, k->b, k->n, k->c, 1e-5);
    return dot_d(k->out, k->r, (size_t)k->n * k->c);
}

static void check_norm(int rms, int n, int c) {
    size_t nc = (size_t)n * c;
    float *x = frand(nc, 2), *w = frand(c, 1), *b = frand(c, 1), *r = frand(nc, 1);
    for (size_t i = 0; i < nc; i++) x[i] += 0.5f; /* non-zero mean */
    float *out = frand(nc, 1), *mean = frand(n, 1), *rstd = frand(n, 1);
    struct norm_ctx k = {rms, n, c, dcopy(x, nc), dcopy(w, c), dcopy(b, c), dcopy(r, nc), dzeros(nc)};
    double *wmean = dzeros(n), *wrstd = dzeros(n), *wout = dzeros(nc);
    if (rms) {
        ref_rmsnorm(wout, wrstd, k.x, k.w, n, c, 1e-5);
        be->rmsnorm_fwd(out, rstd, x, w, n, c, 1e-5f);
    } else {
        ref_layernorm(wout, wmean, wrstd, k.x, k.w, k.b, n, c, 1e-5);
        be->layernorm_fwd(out, mean, rstd, x, w, b, n, c, 1e-5f);
        ASSERT_CLOSE(mean, wmean, n, 1e-6, "norm mean");
    }
    ASSERT_CLOSE(out, wout, nc, 2e-6, rms ? "rmsnorm out" : "layernorm out");
    ASSERT_CLOSE(rstd, wrstd, n, 2e-6, "norm rstd");

    /* backward: dx, dw, db accumulate onto existing values */
    float *dx = frand(nc, 1), *dw = frand(c, 1), *db = frand(c, 1);
    double *gx = dzeros(nc), *gw = dzeros(c), *gb = dzeros(c);
    fd_grad(k.x, nc, norm_obj, &k, gx);
    fd_grad(k.w, c, norm_obj, &k, gw);
    if (!rms) fd_grad(k.b, c, norm_obj, &k, gb);
    for (size_t i = 0; i < nc; i++) gx[i] += dx[i];
    for (int j = 0; j < c; j++) gw[j] += dw[j], gb[j] += db[j];
    if (rms)
        be->rmsnorm_bwd(dx, dw, r, x, w, rstd, n, c);
    else
        be->layernorm_bwd(dx, dw, db, r, x, w, mean, rstd, n, c);
    ASSERT_CLOSE(dx, gx, nc, 1e-4, "norm dx");
    ASSERT_CLOSE(dw, gw, c, 1e-4, "norm dw");
    if (!rms) ASSERT_CLOSE(db, gb, c, 1e-4, "norm db");
    free(x), free(w), free(b), free(r), free(out), free(mean), free(rstd), free(dx), free(dw), free(db);
    free(k.x), free(k.w), free(k.b), free(k.r), free(k.out), free(wmean), free(wrstd), free(wout);
    free(gx), free(gw), free(gb);
}
static void test_layernorm(void **state) {
    (void)state;
    check_norm(0, 3, 13);
    check_norm(0, 4, 70);
}
static void test_rmsnorm(void **state) {
    (void)state;
    check_norm(1, 3, 13);
    check_norm(1, 4, 70);
}

/* ---- rope and attention ---- */

static void ref_rope(double *qkv, const float *cs, const float *sn, int b, int t, int h, int kvh, int hd) {
    int half = hd / 2, stride = (h + 2 * kvh) * hd;
    for (int r = 0; r < b * t; r++)
        for (int hh = 0; hh < h + kvh; hh++) {
            double *x = qkv + (size_t)r * stride + hh * hd;
            int pos = r % t;
            for (int i = 0; i < half; i++) {
                double c = cs[pos * half + i], s = sn[pos * half + i];
                double x1 = x[i], x2 = x[i + half];
                x[i] = x1 * c - x2 * s;
                x[i + half] = x2 * c + x1 * s;
            }
        }
}

static void ref_attention(double *out, double *lse, const double *qkv, int b, int t, int h, int kvh, int hd) {
    int stride = (h + 2 * kvh) * hd, group = h / kvh;
    double *s = malloc(sizeof(double) * t);
    for (int bi = 0; bi < b; bi++)
        for (int hi = 0; hi < h; hi++)
            for (int ti = 0; ti < t; ti++) {
                const double *q = qkv + ((size_t)bi * t + ti) * stride + hi * hd;
                double mx = -INFINITY, sum = 0;
                for (int j = 0; j <= ti; j++) {
                    const double *k = qkv + ((size_t)bi * t + j) * stride + h * hd + (hi / group) * hd;
                    s[j] = dot_d(q, k, hd) / sqrt((double)hd);
                    if (s[j] > mx) mx = s[j];
                }
                for (int j = 0; j <= ti; j++) sum += exp(s[j] - mx);
                double *o = out + ((size_t)bi * t + ti) * h * hd + hi * hd;
                for (int d = 0; d < hd; d++) {
                    double acc = 0;
                    for (int j = 0; j <= ti; j++) {
                        const double *v =
                            qkv + ((size_t)bi * t + j) * stride + (h + kvh) * hd + (hi / group) * hd;
                        acc += exp(s[j] - mx) / sum * v[d];
                    }
                    o[d] = acc;
                }
                if (lse) lse[((size_t)bi * h + hi) * t + ti] = mx + log(sum);
            }
    free(s);
}

struct attn_ctx {
    int b, t, h, kvh, hd;
    double *qkv, *r, *out;
};
static double attn_obj(void *p) {
    struct attn_ctx *k = p;
    ref_attention(k->out, NULL, k->qkv, k->b, k->t, k->h, k->kvh, k->hd);
    return dot_d(k->out, k->r, (size_t)k->b * k->t * k->h * k->hd);
}

static void check_attention(int b, int t, int h, int kvh, int hd) {
    size_t nqkv = (size_t)b * t * (h + 2 * kvh) * hd, nout = (size_t)b * t * h * hd, nlse = (size_t)b * h * t;
    float *qkv = frand(nqkv, 1.5), *r = frand(nout, 1), *out = frand(nout, 1), *lse = frand(nlse, 1);
    struct attn_ctx k = {b, t, h, kvh, hd, dcopy(qkv, nqkv), dcopy(r, nout), dzeros(nout)};
    double *wout = dzeros(nout), *wlse = dzeros(nlse);
    ref_attention(wout, wlse, k.qkv, b, t, h, kvh, hd);
    be->attention_fwd(out, lse, qkv, b, t, h, kvh, hd);
    ASSERT_CLOSE(out, wout, nout, 2e-6, "attention out");
    ASSERT_CLOSE(lse, wlse, nlse, 2e-6, "attention lse");

    float *dqkv = frand(nqkv, 100); /* garbage: bwd must overwrite */
    double *g = dzeros(nqkv);
    fd_grad(k.qkv, nqkv, attn_obj, &k, g);
    be->attention_bwd(dqkv, r, qkv, out, lse, b, t, h, kvh, hd);
    ASSERT_CLOSE(dqkv, g, nqkv, 1e-4, "attention dqkv");
    free(qkv), free(r), free(out), free(lse), free(k.qkv), free(k.r), free(k.out), free(wout), free(wlse);
    free(dqkv), free(g);
}
static void test_attention(void **state) {
    (void)state;
    check_attention(2, 5, 4, 2, 8); /* GQA */
    check_attention(1, 7, 3, 1, 6); /* MQA, hd not a multiple of the lanes */
    check_attention(2, 3, 2, 2, 20); /* MHA, hd crosses one lane block */
    check_attention(1, 100, 2, 1, 4); /* two query tiles (81 + 19 rows): the tiled sgemm path's seams */
}

struct rope_ctx {
    int b, t, h, kvh, hd;
    const float *cs, *sn;
    double *qkv, *r, *work;
    size_t n;
};
static double rope_obj(void *p) {
    struct rope_ctx *k = p;
    memcpy(k->work, k->qkv, k->n * sizeof(double));
    ref_rope(k->work, k->cs, k->sn, k->b, k->t, k->h, k->kvh, k->hd);
    return dot_d(k->work, k->r, k->n);
}

static void test_rope(void **state) {
    (void)state;
    const int b = 2, t = 5, h = 4, kvh = 2, hd = 8, half = hd / 2;
    size_t n = (size_t)b * t * (h + 2 * kvh) * hd;
    float cs[5 * 4], sn[5 * 4];
    st_rope_tables(cs, sn, t, hd, 10000.0f);
    for (int pos = 0; pos < t; pos++)
        for (int i = 0; i < half; i++) {
            double ang = pos * pow(10000.0, -2.0 * i / hd);
            assert_true(fabs(cs[pos * half + i] - cos(ang)) < 1e-6);
            assert_true(fabs(sn[pos * half + i] - sin(ang)) < 1e-6);
        }
    float *x = frand(n, 1), *y = fdup(x, n);
    double *want = dcopy(x, n);
    ref_rope(want, cs, sn, b, t, h, kvh, hd);
    be->rope_fwd(y, cs, sn, b, t, h, kvh, hd);
    ASSERT_CLOSE(y, want, n, 1e-6, "rope fwd");
    /* v heads are untouched */
    for (int r = 0; r < b * t; r++)
        for (int d = (h + kvh) * hd; d < (h + 2 * kvh) * hd; d++)
            assert_true(y[(size_t)r * (h + 2 * kvh) * hd + d] == x[(size_t)r * (h + 2 * kvh) * hd + d]);
    /* inverse property */
    be->rope_bwd(y, cs, sn, b, t, h, kvh, hd);
    double *xd = dcopy(x, n);
    ASSERT_CLOSE(y, xd, n, 1e-6, "rope bwd(fwd(x)) == x");
    /* bwd is the gradient of the forward */
    float *r = frand(n, 1);
    struct rope_ctx k = {b, t, h, kvh, hd, cs, sn, dcopy(x, n), dcopy(r, n), dzeros(n), n};
    double *g = dzeros(n);
    fd_grad(k.qkv, n, rope_obj, &k, g);
    be->rope_bwd(r, cs, sn, b, t, h, kvh, hd);
    ASSERT_CLOSE(r, g, n, 1e-5, "rope dqkv");
    free(x), free(y), free(want), free(xd), free(r), free(k.qkv), free(k.r), free(k.work), free(g);
}

/* ---- activations ---- */

static double ref_gelu(double x) { return 0.5 * x * (1.0 + tanh(sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x))); }
static double ref_silu(double x) { return x / (1.0 + exp(-x)); }

static void test_gelu(void **state) {
    (void)state;
    const size_t n = 1001;
    float *x = frand(n, 6), *out = frand(n, 1), *dout = frand(n, 1), *dx = frand(n, 1);
    x[0] = -30.0f, x[1] = 30.0f, x[2] = 0.0f;
    double *want = dzeros(n), *g = dzeros(n);
    for (size_t i = 0; i < n; i++) {
        want[i] = ref_gelu(x[i]);
        double h = 1e-5;
        g[i] = dout[i] * (ref_gelu(x[i] + h) - ref_gelu(x[i] - h)) / (2 * h);
    }
    be->gelu_fwd(out, x, n);
    ASSERT_CLOSE(out, want, n, 1e-6, "gelu fwd");
    be->gelu_bwd(dx, dout, x, n);
    ASSERT_CLOSE(dx, g, n, 1e-5, "gelu bwd");
    free(x), free(out), free(dout), free(dx), free(want), free(g);
}

static void test_swiglu(void **state) {
    (void)state;
    const int n = 3, f = 21;
    float *gu = frand((size_t)n * 2 * f, 5), *out = frand((size_t)n * f, 1), *dout = frand((size_t)n * f, 1);
    float *dgu = frand((size_t)n * 2 * f, 1);
    double *want = dzeros((size_t)n * f), *g = dzeros((size_t)n * 2 * f);
    for (int i = 0; i < n; i++)
        for (int j = 0; j < f; j++) {
            double a = gu[i * 2 * f + j], u = gu[i * 2 * f + f + j], h = 1e-5, d = dout[i * f + j];
            want[i * f + j] = ref_silu(a) * u;
            g[i * 2 * f + j] = d * u * (ref_silu(a + h) - ref_silu(a - h)) / (2 * h);
            g[i * 2 * f + f + j] = d * ref_silu(a);
        }
    be->swiglu_fwd(out, gu, n, f);
    ASSERT_CLOSE(out, want, (size_t)n * f, 1e-6, "swiglu fwd");
    be->swiglu_bwd(dgu, dout, gu, n, f);
    ASSERT_CLOSE(dgu, g, (size_t)n * 2 * f, 1e-5, "swiglu bwd");
    free(gu), free(out), free(dout), free(dgu), free(want), free(g);
}

/* ---- embeddings ---- */

static void test_embedding(void **state) {
    (void)state;
    const int b = 2, t = 5, c = 37, vocab = 4; /* tiny vocab: tokens repeat */
    int32_t tok[10];
    for (int i = 0; i < b * t; i++) tok[i] = (int32_t)((i * 7 + 3) % vocab);
    float *wte = frand((size_t)vocab * c, 1), *wpe = frand((size_t)t * c, 1), *out = frand((size_t)b * t * c, 1);
    double *want = dzeros((size_t)b * t * c);
    for (int pass = 0; pass < 2; pass++) {
        const float *pe = pass ? NULL : wpe;
        for (int r = 0; r < b * t; r++)
            for (int j = 0; j < c; j++) want[r * c + j] = (double)wte[tok[r] * c + j] + (pe ? pe[(r % t) * c + j] : 0.0);
        be->embedding_fwd(out, tok, wte, pe, b, t, c);
        ASSERT_CLOSE(out, want, (size_t)b * t * c, 1e-7, pass ? "embedding fwd (no wpe)" : "embedding fwd");
    }
    float *dout = frand((size_t)b * t * c, 1), *dwte = frand((size_t)vocab * c, 1), *dwpe = frand((size_t)t * c, 1);
    double *gte = dcopy(dwte, (size_t)vocab * c), *gpe = dcopy(dwpe, (size_t)t * c);
    for (int r = 0; r < b * t; r++)
        for (int j = 0; j < c; j++) {
            gte[tok[r] * c + j] += dout[r * c + j];
            gpe[(r % t) * c + j] += dout[r * c + j];
        }
    be->embedding_bwd(dwte, dwpe, dout, tok, b, t, c);
    ASSERT_CLOSE(dwte, gte, (size_t)vocab * c, 1e-6, "embedding dwte");
    ASSERT_CLOSE(dwpe, gpe, (size_t)t * c, 1e-6, "embedding dwpe");
    float *dwte2 = fdup(dwte, (size_t)vocab * c);
    for (int r = 0; r < b * t; r++)
        for (int j = 0; j < c; j++) gte[tok[r] * c + j] += dout[r * c + j];
    be->embedding_bwd(dwte2, NULL, dout, tok, b, t, c); /* dwpe optional */
    ASSERT_CLOSE(dwte2, gte, (size_t)vocab * c, 1e-6, "embedding dwte (no wpe)");
    free(wte), free(wpe), free(out), free(want), free(dout), free(dwte), free(dwpe), free(gte), free(gpe);
    free(dwte2);
}

/* ---- cross entropy ---- */

static double ref_ce(double *loss, const double *logits, const int32_t *target, const float *weight, int n, int v) {
    double total = 0;
    for (int i = 0; i < n; i++) {
        if (weight[i] == 0.0f) {
            if (loss) loss[i] = 0;
            continue;
        }
        const double *x = logits + (size_t)i * v;
        double mx = -INFINITY, s = 0;
        for (int j = 0; j < v; j++) mx = x[j] > mx ? x[j] : mx;
        for (int j = 0; j < v; j++) s += exp(x[j] - mx);
        double l = mx + log(s) - x[target[i]];
        if (loss) loss[i] = l;
        total += weight[i] * l;
    }
    return total;
}
struct ce_ctx {
    int n, v;
    double *logits;
    const int32_t *target;
    const float *weight;
};
static double ce_obj(void *p) {
    struct ce_ctx *k = p;
    return ref_ce(NULL, k->logits, k->target, k->weight, k->n, k->v);
}

static void test_cross_entropy(void **state) {
    (void)state;
    const int n = 6, v = 37;
    float *logits = frand((size_t)n * v, 4), loss[6];
    for (int j = 0; j < v; j++) logits[1 * v + j] += 1000.0f; /* stability: huge logits */
    int32_t target[6] = {3, 36, -7, 0, 99999, 17};             /* rows 2 and 4 are masked: garbage targets */
    float weight[6] = {0.5f, 1.0f, 0.0f, 0.25f, 0.0f, 2.0f};
    struct ce_ctx k = {n, v, dcopy(logits, (size_t)n * v), target, weight};
    double wloss[6];
    double want_total = ref_ce(wloss, k.logits, target, weight, n, v);
    double *g = dzeros((size_t)n * v);
    fd_grad(k.logits, (size_t)n * v, ce_obj, &k, g);
    float *l2 = fdup(logits, (size_t)n * v);
    double total = be->cross_entropy(logits, loss, target, weight, n, v);
    if (fabs(total - want_total) > 1e-5 * fabs(want_total)) fail_msg("ce total %.9g vs %.9g", total, want_total);
    ASSERT_CLOSE(loss, wloss, n, 1e-5, "ce loss");
    ASSERT_CLOSE(logits, g, (size_t)n * v, 1e-4, "ce dlogits");
    for (int j = 0; j < v; j++) assert_true(logits[2 * v + j] == 0.0f && logits[4 * v + j] == 0.0f);
    /* a masked row's target is never read: changing it changes nothing */
    target[2] = 5;
    target[4] = -1;
    float loss2[6];
    double total2 = be->cross_entropy(l2, loss2, target, weight, n, v);
    assert_true(total2 == total);
    assert_memory_equal(l2, logits, (size_t)n * v * sizeof(float));
    assert_memory_equal(loss2, loss, sizeof loss);
    /* an invalid target on a live row is reported as NaN, not an out-of-bounds read */
    float l3[3] = {1, 2, 3}, loss3[1], w1 = 1.0f;
    int32_t bad = 3;
    assert_true(isnan(be->cross_entropy(l3, loss3, &bad, &w1, 1, 3)));
    free(logits), free(k.logits), free(g), free(l2);
}

/* xent_block_* (cross_entropy_acc by vocabulary blocks, the block-outer LM head) against the float64 softmax,
 * with a bound derived from the arithmetic (u = 2^-24, e = st_cpu_expf's relative error, test_expf's 4e-7; R the
 * widest |x - max| of a row; nb blocks): each exponential is off by at most e + u (R + 1) relative (x - max rounded,
 * then exp), the sum adds (v / ST_LANES + ST_LANES + nb) u (lanes, their total, one add per block) and each of
 * the nb rescales another e + u (R + 1); so |loss - ref| <= rel(S) + 2 u (|max| + |log S| + |loss|) and each
 * dlogit is off by at most |w| (p (e + u (R + 2) + rel(S)) + u). Also: one block holding the whole row is
 * cross_entropy_acc bit for bit; the bf16 dlogits are the fp32 ones rounded once; weight-0 rows are zeros and
 * their targets never read; an out-of-range target on a live row makes its loss NaN. */
static void xent_blocks(const float *logits, float *dl, uint16_t *dl16, float *loss, double *total,
                        const int32_t *target, const float *weight, int n, int v, int vb) {
    float *stats = malloc(3 * (size_t)n * sizeof(float)), *blk = malloc((size_t)n * vb * sizeof(float));
    for (int pass = 0; pass < 2; pass++)
        for (int j0 = 0; j0 < v; j0 += vb) {
            int nv = v - j0 < vb ? v - j0 : vb;
            for (int i = 0; i < n; i++) memcpy(blk + (size_t)i * nv, logits + (size_t)i * v + j0, nv * sizeof(float));
            if (!pass) {
                be->xent_block_stats(blk, stats, target, weight, n, nv, j0);
                continue;
            }
            uint16_t *b16 = dl16 ? malloc((size_t)n * nv * sizeof(uint16_t)) : NULL;
            be->xent_block_grad(blk, b16, stats, target, weight, n, nv, j0);
            for (int i = 0; i < n; i++)
                for (int j = 0; j < nv; j++) {
                    if (b16) dl16[(size_t)i * v + j0 + j] = b16[(size_t)i * nv + j];
                    else dl[(size_t)i * v + j0 + j] = blk[(size_t)i * nv + j];
                }
            free(b16);
        }
    be->xent_block_loss(stats, loss, target, weight, n, v, total);
    free(stats), free(blk);
}

static void test_xent_blocks(void **state) {
    (void)state;
    enum { n = 7, v = 101 };
    const double u = 1.0 / (1 << 24), e = 4e-7;
    float *logits = frand((size_t)n * v, 8), loss[n], dl[n * v];
    for (int j = 0; j < v; j++) logits[1 * v + j] += 1000.0f;           /* huge logits */
    for (int j = 0; j < v; j++) logits[3 * v + j] += 0.2f * (float)j;  /* the max grows block by block */
    int32_t target[n] = {3, 100, -100, 0, 99999, 57, 16};             /* rows 2 and 4 masked: garbage targets */
    float weight[n] = {0.5f, 1.0f, 0.0f, 0.25f, 0.0f, 2.0f, 1.0f};
    double *x = dcopy(logits, (size_t)n * v), wloss[n];
    double want_total = ref_ce(wloss, x, target, weight, n, v);
    const int vbs[] = {16, 7, 100};
    for (size_t k = 0; k < sizeof vbs / sizeof vbs[0]; k++) {
        int vb = vbs[k], nb = (v + vb - 1) / vb;
        double total = 0.0;
        xent_blocks(logits, dl, NULL, loss, &total, target, weight, n, v, vb);
        double tot_bound = 0.0;
        for (int i = 0; i < n; i++) {
            const double *r = x + (size_t)i * v;
            double mx = -INFINITY, mn = INFINITY, S = 0;
            for (int j = 0; j < v; j++) mx = r[j] > mx ? r[j] : mx, mn = r[j] < mn ? r[j] : mn;
            for (int j = 0; j < v; j++) S += exp(r[j] - mx);
            double R = mx - mn, step = e + u * (R + 1);
            double relS = step + (v / ST_LANES + ST_LANES + nb) * u + nb * step;
            double lb = relS + 2 * u * (fabs(mx) + fabs(log(S)) + fabs(wloss[i])), w = weight[i];
            tot_bound += fabs(w) * lb + 1e-12;
            if (w == 0.0f) {
                assert_true(loss[i] == 0.0f);
                for (int j = 0; j < v; j++) assert_true(dl[(size_t)i * v + j] == 0.0f);
                continue;
            }
            if (fabs(loss[i] - wloss[i]) > lb)
                fail_msg("blocks of %d: row %d loss %.9g vs %.9g (bound %.3g)", vb, i, loss[i], wloss[i], lb);
            for (int j = 0; j < v; j++) {
                double p = exp(r[j] - mx) / S, want = w * (p - (j == target[i])), got = dl[(size_t)i * v + j];
                double db = fabs(w) * (p * (e + u * (R + 2) + relS) + u);
                if (fabs(got - want) > db)
                    fail_msg("blocks of %d: row %d dlogit %d %.9g vs %.9g (bound %.3g)", vb, i, j, got, want, db);
            }
        }
        if (fabs(total - want_total) > tot_bound)
            fail_msg("blocks of %d: total %.12g vs %.12g (bound %.3g)", vb, total, want_total, tot_bound);
        /* bf16: the fp32 dlogits rounded once */
        uint16_t d16[n * v];
        double t16 = 0.0;
        float l16[n];
        xent_blocks(logits, NULL, d16, l16, &t16, target, weight, n, v, vb);
        for (size_t i = 0; i < (size_t)n * v; i++) assert_int_equal(d16[i], st_float_to_bf16_bits(dl[i]));
        assert_memory_equal(l16, loss, sizeof loss);
    }
    /* one block holding the whole row: cross_entropy_acc bit for bit */
    float *l2 = fdup(logits, (size_t)n * v), loss2[n];
    double t1 = 0.0, t2 = 0.0;
    xent_blocks(logits, dl, NULL, loss, &t1, target, weight, n, v, v);
    be->cross_entropy_acc(l2, NULL, loss2, target, weight, n, v, &t2);
    assert_true(t1 == t2);
    assert_memory_equal(loss, loss2, sizeof loss);
    assert_memory_equal(dl, l2, sizeof dl);
    /* masked rows' targets never read; a live row's out-of-range target: NaN */
    float loss3[n], dl3[n * v];
    double t3 = 0.0;
    t1 = 0.0;
    xent_blocks(logits, dl, NULL, loss, &t1, target, weight, n, v, 16);
    target[2] = 5, target[4] = -1;
    xent_blocks(logits, dl3, NULL, loss3, &t3, target, weight, n, v, 16);
    assert_memory_equal(dl3, dl, sizeof dl);
    assert_memory_equal(loss3, loss, sizeof loss);
    assert_true(t3 == t1);
    target[0] = v;
    t3 = 0.0;
    xent_blocks(logits, dl3, NULL, loss3, &t3, target, weight, n, v, 16);
    assert_true(isnan(loss3[0]) && isnan(t3));
    free(logits), free(x), free(l2);
}

/* ---- AdamW ---- */

static void test_adamw(void **state) {
    (void)state;
    const size_t n = 1003;
    const float lr = 1e-2f, b1 = 0.9f, b2 = 0.95f, eps = 1e-8f, wd = 0.1f, gs = 0.5f;
    float *p = frand(n, 1), *m = calloc(n, 4), *v = calloc(n, 4);
    double *dp = dcopy(p, n), *dm = dzeros(n), *dv = dzeros(n);
    for (int step = 1; step <= 3; step++) {
        float *grad = frand(n, 2);
        for (size_t i = 0; i < n; i++) {
            double g = (double)grad[i] * gs;
            dp[i] -= (double)lr * wd * dp[i];
            dm[i] = b1 * dm[i] + (1.0 - b1) * g;
            dv[i] = b2 * dv[i] + (1.0 - b2) * g * g;
            double mhat = dm[i] / (1.0 - pow(b1, step)), vhat = dv[i] / (1.0 - pow(b2, step));
            dp[i] -= lr * mhat / (sqrt(vhat) + eps);
        }
        be->adamw(p, grad, m, v, n, lr, b1, b2, eps, wd, gs, step);
        free(grad);
    }
    ASSERT_CLOSE(p, dp, n, 2e-6, "adamw param");
    ASSERT_CLOSE(m, dm, n, 2e-6, "adamw m");
    ASSERT_CLOSE(v, dv, n, 2e-6, "adamw v");
    free(p), free(m), free(v), free(dp), free(dm), free(dv);
}

/* ---- dequantization ---- */

static void test_dequant(void **state) {
    (void)state;
    const size_t n = 51;
    const int block = 8; /* last block partial */
    int8_t q[51];
    uint8_t packed[26] = {0};
    float scale[7], out[51];
    for (size_t i = 0; i < n; i++) {
        q[i] = (int8_t)(((int)i * 37) % 256 - 128);
        packed[i / 2] |= (uint8_t)(((i * 5) % 16) << ((i % 2) * 4));
    }
    for (int bi = 0; bi < 7; bi++) scale[bi] = 0.01f * (float)(bi + 1);
    be->dequant_int8(out, q, scale, n, block);
    for (size_t i = 0; i < n; i++) assert_true(out[i] == (float)q[i] * scale[i / block]);
    be->dequant_nf4(out, packed, scale, n, block);
    for (size_t i = 0; i < n; i++) assert_true(out[i] == ST_NF4_LEVELS[(i * 5) % 16] * scale[i / block]);
    assert_true(ST_NF4_LEVELS[0] == -1.0f && ST_NF4_LEVELS[7] == 0.0f && ST_NF4_LEVELS[15] == 1.0f);
}

/* ---- memory ---- */

static void test_memory(void **state) {
    (void)state;
    float *p = be->alloc(1000 * sizeof(float));
    assert_non_null(p);
    assert_true(((uintptr_t)p & 63) == 0);
    for (int i = 0; i < 1000; i++) assert_true(p[i] == 0.0f);
    float src[1000];
    for (int i = 0; i < 1000; i++) src[i] = (float)i;
    be->copy_to_device(p, src, sizeof src);
    float *q = be->alloc(sizeof src);
    be->copy(q, p, sizeof src);
    float back[1000];
    be->copy_to_host(back, q, sizeof src);
    be->synchronize();
    assert_memory_equal(back, src, sizeof src);
    be->memset0(q, sizeof src);
    for (int i = 0; i < 1000; i++) assert_true(q[i] == 0.0f);
    be->free(p), be->free(q);
    assert_string_equal(be->name, "cpu");
}

/* ---- determinism: sizes above the parallel thresholds; 2 threads twice, then 1 thread ---- */

struct det_out {
    float *mm, *mm2, *attn_dqkv, *ce, *ln_dx, *ln_dw, *emb, *bias, *adam;
    double ce_total, ss;
};
enum { MM = 203, MN = 151, MK = 133, DB = 2, DT = 64, DH = 4, DKV = 2, DHD = 32, DN = 128, DC = 320, DV = 2000, DVOC = 50 };

static void det_run(struct det_out *o, int threads) {
    const st_backend *k = st_backend_cpu(threads);
    rng_state = 12345;
    size_t nqkv = (size_t)DB * DT * (DH + 2 * DKV) * DHD, nout = (size_t)DB * DT * DH * DHD;
    float *qkv = frand(nqkv, 1), *dout = frand(nout, 1), *out = frand(nout, 1), *lse = frand((size_t)DB * DH * DT, 1);
    o->attn_dqkv = frand(nqkv, 1);
    k->attention_fwd(out, lse, qkv, DB, DT, DH, DKV, DHD);
    k->attention_bwd(o->attn_dqkv, dout, qkv, out, lse, DB, DT, DH, DKV, DHD);

    o->ce = frand((size_t)DN * DV, 3);
    float *loss = frand(DN, 1), *w = frand(DN, 1);
    int32_t *tg = malloc(DN * sizeof(int32_t));
    for (int i = 0; i < DN; i++) tg[i] = (int32_t)((i * 131) % DV);
    o->ce_total = k->cross_entropy(o->ce, loss, tg, w, DN, DV);

    float *x = frand((size_t)DN * DC, 1), *lw = frand(DC, 1), *lb = frand(DC, 1), *mean = frand(DN, 1);
    float *rstd = frand(DN, 1), *lo = frand((size_t)DN * DC, 1), *ld = frand((size_t)DN * DC, 1);
    o->ln_dx = frand((size_t)DN * DC, 1), o->ln_dw = frand(DC, 1);
    float *ldb = frand(DC, 1);
    k->layernorm_fwd(lo, mean, rstd, x, lw, lb, DN, DC, 1e-5f);
    k->layernorm_bwd(o->ln_dx, o->ln_dw, ldb, ld, x, lw, mean, rstd, DN, DC);

    int32_t *tok = malloc((size_t)DN * sizeof(int32_t));
    for (int i = 0; i < DN; i++) tok[i] = (int32_t)((i * 17) % DVOC);
    o->emb = frand((size_t)DVOC * DC, 1);
    k->embedding_bwd(o->emb, NULL, ld, tok, 1, DN, DC);
    o->bias = frand(DC, 1);
    k->bias_bwd(o->bias, ld, DN, DC);
    o->adam = frand((size_t)DN * DC, 1);
    float *m = calloc((size_t)DN * DC, 4), *v = calloc((size_t)DN * DC, 4);
    k->adamw(o->adam, ld, m, v, (size_t)DN * DC, 1e-3f, 0.9f, 0.999f, 1e-8f, 0.01f, 1.0f, 1);
    o->ss = k->sumsq(o->ce, (size_t)DN * DV);
    /* matmul: odd sizes above the parallel threshold, split across threads */
    float *ma = frand((size_t)MM * MK, 1), *mb = frand((size_t)MK * MN, 1);
    o->mm = frand((size_t)MM * MN, 1);
    k->matmul(o->mm, ma, mb, MM, MN, MK, 0, 1, 1.0f, 0.5f);
    o->mm2 = frand((size_t)MK * MN, 1);
    k->matmul(o->mm2, ma, o->mm, MK, MN, MM, 1, 0, 1.0f, 0.0f); /* trans_a, split by columns */
    free(ma), free(mb);
    free(qkv), free(dout), free(out), free(lse), free(loss), free(w), free(tg), free(x), free(lw), free(lb);
    free(mean), free(rstd), free(lo), free(ld), free(ldb), free(tok), free(m), free(v);
}
static void det_free(struct det_out *o) {
    free(o->mm), free(o->mm2), free(o->attn_dqkv), free(o->ce), free(o->ln_dx), free(o->ln_dw), free(o->emb), free(o->bias), free(o->adam);
}
/* matmul is compared only between runs with the same thread count: BLAS edge tiles sum differently
 * when C is split differently. Every other kernel uses thread-count-independent partitions. */
static void det_equal(const struct det_out *a, const struct det_out *b, int same_threads) {
    size_t nqkv = (size_t)DB * DT * (DH + 2 * DKV) * DHD;
    if (same_threads) {
        assert_memory_equal(a->mm, b->mm, (size_t)MM * MN * 4);
        assert_memory_equal(a->mm2, b->mm2, (size_t)MK * MN * 4);
    }
    assert_memory_equal(a->attn_dqkv, b->attn_dqkv, nqkv * 4);
    assert_memory_equal(a->ce, b->ce, (size_t)DN * DV * 4);
    assert_memory_equal(a->ln_dx, b->ln_dx, (size_t)DN * DC * 4);
    assert_memory_equal(a->ln_dw, b->ln_dw, (size_t)DC * 4);
    assert_memory_equal(a->emb, b->emb, (size_t)DVOC * DC * 4);
    assert_memory_equal(a->bias, b->bias, (size_t)DC * 4);
    assert_memory_equal(a->adam, b->adam, (size_t)DN * DC * 4);
    assert_true(a->ce_total == b->ce_total);
    assert_true(a->ss == b->ss);
}

static void test_determinism(void **state) {
    (void)state;
    struct det_out r1, r2, r3;
    det_run(&r1, 2);
    det_run(&r2, 2);
    det_equal(&r1, &r2, 1);
    det_run(&r3, 1); /* the partitions do not depend on the thread count */
    det_equal(&r1, &r3, 0);
    det_free(&r1), det_free(&r2), det_free(&r3);
    be = st_backend_cpu(2);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_expf),
        cmocka_unit_test(test_memory),
        cmocka_unit_test(test_attention_cached),
        cmocka_unit_test(test_matmul),
        cmocka_unit_test(test_matmul_split),
        cmocka_unit_test(test_matmul_signals),
        cmocka_unit_test(test_bias_and_elementwise),
        cmocka_unit_test(test_layernorm),
        cmocka_unit_test(test_rmsnorm),
        cmocka_unit_test(test_rope),
        cmocka_unit_test(test_attention),
        cmocka_unit_test(test_gelu),
        cmocka_unit_test(test_swiglu),
        cmocka_unit_test(test_embedding),
        cmocka_unit_test(test_cross_entropy),
        cmocka_unit_test(test_xent_blocks),
        cmocka_unit_test(test_adamw),
        cmocka_unit_test(test_dequant),
        cmocka_unit_test(test_determinism),
    };
    return cmocka_run_group_tests(tests, setup, NULL);
}
