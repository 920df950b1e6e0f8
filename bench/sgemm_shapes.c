/* sgemm_shapes.c — times the sgemm shapes one training step of bench/cpu_train's llama-small and gpt2-124m
 * rows sends to st_cpu_matmul, under each sgemm library this build has: oneDNN (dnnl_sgemm), OpenBLAS
 * (cblas_sgemm) and BLIS (bli_sgemm, its native typed API; Debian libblis-dev; "blis-nosup" forces its packed
 * path where a dimension is under its small-matrix "sup" thresholds), plus 2048^3 as the peak.
 * mode=split (default) calls them as st_cpu_matmul does: an OpenMP team of `threads` splits C into row
 * blocks (column blocks when C is wider than tall), multiples of 16, and each thread runs the library
 * single-threaded on its block. mode=native hands the whole product to the library with `threads` threads.
 * The shapes are the ones logged from `shardtune train` (2 threads, B*T = 1024 / 256 rows), with their calls
 * per step; the step's FLOP-weighted GFLOP/s is sum(flops) / sum(time) over them.
 * For a shared machine: libraries alternate within each round (the first one rotates), each cell keeps its
 * best round, and GFLOP/s are printed by wall time, by process CPU time / threads (OpenMP spinning included)
 * and, in split mode, by the CPU time the threads spent inside the library's calls / threads ("call": what
 * a library's kernels and packing cost, least disturbed by other processes; 0 in native mode).
 * mmap=cli (default) sets glibc's mmap threshold to 128 KiB as the shardtune CLI does (then every packing
 * buffer of 128 KiB or more a library mallocs per call is a fresh mmap); mmap=glibc keeps glibc's default.
 * Each row's step line also prints the minor page faults per step (getrusage): load-independent evidence of
 * per-call mappings.
 * Usage: sgemm_shapes [threads=2] [rounds=5] [min_ms=40] [mode=split|native] [mmap=cli|glibc]
 *                     [libs=onednn,openblas,blis,blis-nosup] [rows=llama-small,gpt2-124m]
 * Numbers only, no assertions; before timing, every library's result is compared with OpenBLAS's. */
#include <cblas.h>
#ifdef ST_HAVE_DNNL
#include <dnnl.h>
#endif
#ifdef ST_HAVE_BLIS /* its own cblas/BLAS declarations would clash with OpenBLAS's cblas.h */
#define BLIS_DISABLE_CBLAS
#define BLIS_DISABLE_BLAS
#include <blis.h>
#endif
#include <dlfcn.h>
#include <malloc.h>
#include <math.h>
#include <sys/resource.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct {
    const char *row, *what;
    int m, n, k, ta, tb, per_step;
} shape_t;

/* From ST_LOG_SGEMM of `shardtune train` (one step); ldA/ldB/ldC are st_cpu_matmul's (packed operands). */
static const shape_t SHAPES[] = {
    {"llama-small", "qkv fwd x Wqkv^T", 1024, 512, 256, 0, 1, 4},
    {"llama-small", "o fwd", 1024, 256, 256, 0, 1, 4},
    {"llama-small", "gate|up fwd", 1024, 1376, 256, 0, 1, 4},
    {"llama-small", "down fwd", 1024, 256, 688, 0, 1, 4},
    {"llama-small", "qkv dX", 1024, 256, 512, 0, 0, 4},
    {"llama-small", "o dX", 1024, 256, 256, 0, 0, 4},
    {"llama-small", "gate|up dX", 1024, 256, 1376, 0, 0, 4},
    {"llama-small", "down dX", 1024, 688, 256, 0, 0, 4},
    {"llama-small", "qkv dW", 512, 256, 1024, 1, 0, 4},
    {"llama-small", "o dW", 256, 256, 1024, 1, 0, 4},
    {"llama-small", "gate|up dW", 1376, 256, 1024, 1, 0, 4},
    {"llama-small", "down dW", 256, 688, 1024, 1, 0, 4},
    {"llama-small", "head fwd", 1024, 32000, 256, 0, 1, 1},
    {"llama-small", "head dX", 1024, 256, 32000, 0, 0, 1},
    {"llama-small", "head dW", 32000, 256, 1024, 1, 0, 1},
    {"gpt2-124m", "qkv fwd", 256, 2304, 768, 0, 1, 12},
    {"gpt2-124m", "proj fwd", 256, 768, 768, 0, 1, 12},
    {"gpt2-124m", "fc fwd", 256, 3072, 768, 0, 1, 12},
    {"gpt2-124m", "fcproj fwd", 256, 768, 3072, 0, 1, 12},
    {"gpt2-124m", "qkv dX", 256, 768, 2304, 0, 0, 12},
    {"gpt2-124m", "proj dX", 256, 768, 768, 0, 0, 12},
    {"gpt2-124m", "fc dX", 256, 768, 3072, 0, 0, 12},
    {"gpt2-124m", "fcproj dX", 256, 3072, 768, 0, 0, 12},
    {"gpt2-124m", "qkv dW", 2304, 768, 256, 1, 0, 12},
    {"gpt2-124m", "proj dW", 768, 768, 256, 1, 0, 12},
    {"gpt2-124m", "fc dW", 3072, 768, 256, 1, 0, 12},
    {"gpt2-124m", "fcproj dW", 768, 3072, 256, 1, 0, 12},
    {"gpt2-124m", "head fwd", 256, 50257, 768, 0, 1, 1},
    {"gpt2-124m", "head dX", 256, 768, 50257, 0, 0, 1},
    {"gpt2-124m", "head dW", 50257, 768, 256, 1, 0, 1},
    {"peak", "2048^3", 2048, 2048, 2048, 0, 0, 1},
};
#define NSHAPES ((int)(sizeof SHAPES / sizeof SHAPES[0]))

enum { LIB_ONEDNN, LIB_OPENBLAS, LIB_BLIS, LIB_BLIS_NOSUP, NLIBS };
static const char *LIB_NAMES[NLIBS] = {"onednn", "openblas", "blis", "blis-nosup"};

static int lib_built(int lib) {
    (void)lib;
#ifndef ST_HAVE_DNNL
    if (lib == LIB_ONEDNN) return 0;
#endif
#ifndef ST_HAVE_BLIS
    if (lib == LIB_BLIS || lib == LIB_BLIS_NOSUP) return 0;
#endif
    return 1;
}

static int blis_threads = 1; /* blis-nosup's own runtime object takes its thread count from here */

/* One row-major sgemm C = op(A) op(B) (beta 0) with the library's threads as set by set_threads. */
static void lib_sgemm(int lib, int ta, int tb, int m, int n, int k, const float *a, int lda, const float *b, int ldb,
                      float *c, int ldc) {
    switch (lib) {
#ifdef ST_HAVE_DNNL
    case LIB_ONEDNN:
        dnnl_sgemm(ta ? 'T' : 'N', tb ? 'T' : 'N', m, n, k, 1.0f, a, lda, b, ldb, 0.0f, c, ldc);
        return;
#endif
#ifdef ST_HAVE_BLIS
    case LIB_BLIS: { /* strides of the stored (untransposed) operands: row stride ld, column stride 1 */
        float one = 1.0f, zero = 0.0f;
        bli_sgemm(ta ? BLIS_TRANSPOSE : BLIS_NO_TRANSPOSE, tb ? BLIS_TRANSPOSE : BLIS_NO_TRANSPOSE, m, n, k, &one,
                  (float *)a, lda, 1, (float *)b, ldb, 1, &zero, c, ldc, 1);
        return;
    }
    case LIB_BLIS_NOSUP: { /* its packed (conventional) path even where a dimension is under the "sup" thresholds */
        float one = 1.0f, zero = 0.0f;
        rntm_t rntm = BLIS_RNTM_INITIALIZER;
        bli_rntm_set_num_threads(blis_threads, &rntm);
        bli_rntm_disable_l3_sup(&rntm);
        bli_sgemm_ex(ta ? BLIS_TRANSPOSE : BLIS_NO_TRANSPOSE, tb ? BLIS_TRANSPOSE : BLIS_NO_TRANSPOSE, m, n, k, &one,
                     (float *)a, lda, 1, (float *)b, ldb, 1, &zero, c, ldc, 1, NULL, &rntm);
        return;
    }
#endif
    default:
        cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, m, n, k, 1.0f, a,
                    lda, b, ldb, 0.0f, c, ldc);
    }
}

/* Threads each library opens for one call: 1 inside st_cpu_matmul's team (split), `threads` for native. */
static void set_threads(int lib, int t) {
    if (lib == LIB_OPENBLAS) openblas_set_num_threads(t);
#ifdef ST_HAVE_BLIS
    if (lib == LIB_BLIS) bli_thread_set_num_threads(t);
    blis_threads = t;
#endif
    omp_set_num_threads(t); /* oneDNN opens omp_get_max_threads() */
}

static double clock_s(clockid_t id) {
    struct timespec ts;
    clock_gettime(id, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* CPU seconds the team's threads spent inside the library's calls (split mode): no barrier spin, so a thread
 * preempted by another process does not bill its partner's waiting. */
static double call_cpu;

/* st_cpu_matmul's split (kernels/cpu/cpu_backend.c): row or column blocks, multiples of 16. */
static void matmul(int lib, int native, int threads, const shape_t *s, const float *a, const float *b, float *c) {
    const int lda = s->ta ? s->m : s->k, ldb = s->tb ? s->k : s->n;
    if (native) {
        lib_sgemm(lib, s->ta, s->tb, s->m, s->n, s->k, a, lda, b, ldb, c, s->n);
        return;
    }
    const int by_rows = s->m >= s->n, len = by_rows ? s->m : s->n;
#pragma omp parallel num_threads(threads)
    {
        int nt = omp_get_num_threads(), id = omp_get_thread_num();
        omp_set_num_threads(1); /* this thread's nested calls (oneDNN, BLIS's OpenMP) stay on it */
        int per = ((len + nt - 1) / nt + 15) / 16 * 16;
        int lo = id * per < len ? id * per : len, hi = lo + per < len ? lo + per : len;
        double t0 = clock_s(CLOCK_THREAD_CPUTIME_ID);
        if (hi > lo && by_rows)
            lib_sgemm(lib, s->ta, s->tb, hi - lo, s->n, s->k, s->ta ? a + lo : a + (size_t)lo * s->k, lda, b, ldb,
                      c + (size_t)lo * s->n, s->n);
        else if (hi > lo)
            lib_sgemm(lib, s->ta, s->tb, s->m, hi - lo, s->k, a, lda, s->tb ? b + (size_t)lo * s->k : b + lo, ldb,
                      c + lo, s->n);
        double dt = clock_s(CLOCK_THREAD_CPUTIME_ID) - t0;
#pragma omp atomic
        call_cpu += dt;
    }
}

static float *buf(size_t n, unsigned mul) {
    float *p = malloc(n * sizeof(float));
    if (!p) {
        fprintf(stderr, "sgemm_shapes: out of memory (%zu floats)\n", n);
        exit(1);
    }
    for (size_t i = 0; i < n; i++) p[i] = (float)((i * mul) % 1000) / 1000.0f - 0.5f;
    return p;
}

static int listed(const char *list, const char *name) {
    size_t n = strlen(name);
    for (const char *p = list; (p = strstr(p, name)) != NULL; p += n)
        if ((p == list || p[-1] == ',') && (p[n] == ',' || p[n] == '\0')) return 1;
    return 0;
}

static long minflt(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_minflt;
}

static const char *arg(int argc, char **argv, const char *key, const char *dflt) {
    size_t n = strlen(key);
    for (int i = 1; i < argc; i++)
        if (strncmp(argv[i], key, n) == 0 && argv[i][n] == '=') return argv[i] + n + 1;
    return dflt;
}

/* Which shared object cblas_sgemm resolved to: BLIS exports one too, OpenBLAS's must win. */
static const char *cblas_owner(void) {
    Dl_info info;
    return dladdr((void *)cblas_sgemm, &info) && info.dli_fname ? info.dli_fname : "?";
}

int main(int argc, char **argv) {
    int threads = atoi(arg(argc, argv, "threads", "2")), rounds = atoi(arg(argc, argv, "rounds", "5"));
    double min_s = atof(arg(argc, argv, "min_ms", "40")) / 1e3;
    int native = strcmp(arg(argc, argv, "mode", "split"), "native") == 0;
    const char *libs = arg(argc, argv, "libs", "onednn,openblas,blis,blis-nosup"), *rows = arg(argc, argv, "rows", "llama-small,gpt2-124m");
    if (threads < 1 || rounds < 1 || min_s <= 0) {
        fprintf(stderr, "usage: sgemm_shapes [threads=N] [rounds=N] [min_ms=X] [mode=split|native] [mmap=cli|glibc] "
                        "[libs=onednn,openblas,blis,blis-nosup] [rows=llama-small,gpt2-124m]\n");
        return 2;
    }
    if (strcmp(arg(argc, argv, "mmap", "cli"), "cli") == 0) mallopt(M_MMAP_THRESHOLD, 128 * 1024);
    int use[NLIBS], nuse = 0;
    for (int l = 0; l < NLIBS; l++) nuse += use[l] = lib_built(l) && listed(libs, LIB_NAMES[l]);
    int on[NSHAPES];
    size_t amax = 0, bmax = 0, cmax = 0;
    for (int i = 0; i < NSHAPES; i++) {
        const shape_t *s = &SHAPES[i];
        on[i] = strcmp(s->row, "peak") == 0 || listed(rows, s->row);
        if (!on[i]) continue;
        size_t ma = (size_t)s->m * s->k, mb = (size_t)s->k * s->n, mc = (size_t)s->m * s->n;
        amax = ma > amax ? ma : amax, bmax = mb > bmax ? mb : bmax, cmax = mc > cmax ? mc : cmax;
    }
    float *a = buf(amax, 7919), *b = buf(bmax, 104729), *c = buf(cmax, 1), *ref = buf(cmax, 1);
    double load[3] = {0};
    getloadavg(load, 3);
    printf("sgemm_shapes: threads=%d mode=%s rounds=%d mmap=%s cblas_sgemm from %s, load %.2f %.2f %.2f\n", threads,
           native ? "native" : "split", rounds, arg(argc, argv, "mmap", "cli"), cblas_owner(), load[0], load[1], load[2]);

    /* correctness first: each library against OpenBLAS (max |diff| / max |ref|) */
    for (int i = 0; i < NSHAPES; i++) {
        if (!on[i]) continue;
        set_threads(LIB_OPENBLAS, native ? threads : 1);
        matmul(LIB_OPENBLAS, native, threads, &SHAPES[i], a, b, ref);
        size_t mc = (size_t)SHAPES[i].m * SHAPES[i].n;
        for (int l = 0; l < NLIBS; l++) {
            if (!use[l] || l == LIB_OPENBLAS) continue;
            set_threads(l, native ? threads : 1);
            memset(c, 0xff, mc * sizeof(float)); /* NaN: a block left unwritten shows */
            matmul(l, native, threads, &SHAPES[i], a, b, c);
            double dmax = 0, rmax = 0;
            for (size_t j = 0; j < mc; j++) {
                double d = fabs((double)c[j] - ref[j]);
                if (!(d <= dmax)) dmax = d; /* NaN sticks */
                if (fabs(ref[j]) > rmax) rmax = fabs(ref[j]);
            }
            if (!(dmax <= 1e-4 * rmax)) {
                fprintf(stderr, "sgemm_shapes: %s differs from openblas on %s %s: %g of %g\n", LIB_NAMES[l],
                        SHAPES[i].row, SHAPES[i].what, dmax, rmax);
                return 1;
            }
        }
    }

    static double wall[NLIBS][NSHAPES], cpu[NLIBS][NSHAPES], ccpu[NLIBS][NSHAPES], faults[NLIBS][NSHAPES];
    for (int l = 0; l < NLIBS; l++)
        for (int i = 0; i < NSHAPES; i++) wall[l][i] = cpu[l][i] = ccpu[l][i] = 1e30;
    for (int r = 0; r < rounds; r++) {
        for (int j = 0; j < NLIBS; j++) {
            int l = (j + r) % NLIBS;
            if (!use[l]) continue;
            set_threads(l, native ? threads : 1);
            for (int i = 0; i < NSHAPES; i++) {
                if (!on[i]) continue;
                matmul(l, native, threads, &SHAPES[i], a, b, c); /* warm-up (JIT, caches, pools) */
                int reps = 0;
                call_cpu = 0;
                long f0 = minflt();
                double w0 = clock_s(CLOCK_MONOTONIC), c0 = clock_s(CLOCK_PROCESS_CPUTIME_ID), w;
                do {
                    matmul(l, native, threads, &SHAPES[i], a, b, c);
                    reps++;
                } while ((w = clock_s(CLOCK_MONOTONIC) - w0) < min_s);
                double cp = (clock_s(CLOCK_PROCESS_CPUTIME_ID) - c0) / threads;
                faults[l][i] = (double)(minflt() - f0) / reps; /* page faults per call: load-independent */
                if (w / reps < wall[l][i]) wall[l][i] = w / reps;
                if (cp / reps < cpu[l][i]) cpu[l][i] = cp / reps;
                if (!native && call_cpu / threads / reps < ccpu[l][i]) ccpu[l][i] = call_cpu / threads / reps;
            }
        }
    }

    printf("%-12s %-17s %6s %6s %6s %2s %2s %5s %6s", "row", "shape", "M", "N", "K", "tA", "tB", "calls", "%flop");
    for (int l = 0; l < NLIBS; l++)
        if (use[l]) printf(" %20s", LIB_NAMES[l]);
    printf("\n%-12s %-17s %45s", "", "GFLOP/s by:", "");
    for (int l = 0; l < NLIBS; l++)
        if (use[l]) printf("   wall   cpu  call");
    printf("\n");
    const char *row = "";
    double fl_row = 0, tw[NLIBS] = {0}, tc[NLIBS] = {0}, tk[NLIBS] = {0}, pf[NLIBS] = {0};
    for (int i = 0; i <= NSHAPES; i++) {
        if (i < NSHAPES && !on[i]) continue;
        if (i == NSHAPES || strcmp(SHAPES[i].row, row) != 0) { /* a row's total, then the next row's share */
            if (*row) {
                printf("%-12s %-17s %45s", row, "step (weighted)", "");
                for (int l = 0; l < NLIBS; l++)
                    if (use[l]) printf(" %6.1f %6.1f %6.1f", fl_row / tw[l] / 1e9, fl_row / tc[l] / 1e9, fl_row / tk[l] / 1e9);
                printf("   (%.2f GFLOP of sgemm per step; page faults per step:", fl_row / 1e9);
                for (int l = 0; l < NLIBS; l++)
                    if (use[l]) printf(" %s %.0f", LIB_NAMES[l], pf[l]);
                printf(")\n");
            }
            if (i == NSHAPES) break;
            row = SHAPES[i].row, fl_row = 0;
            memset(tw, 0, sizeof tw), memset(tc, 0, sizeof tc), memset(tk, 0, sizeof tk), memset(pf, 0, sizeof pf);
            for (int j = i; j < NSHAPES && strcmp(SHAPES[j].row, row) == 0; j++)
                fl_row += 2.0 * SHAPES[j].m * SHAPES[j].n * (double)SHAPES[j].k * SHAPES[j].per_step;
        }
        const shape_t *s = &SHAPES[i];
        double fl = 2.0 * s->m * s->n * (double)s->k;
        printf("%-12s %-17s %6d %6d %6d %2d %2d %5d %5.1f%%", s->row, s->what, s->m, s->n, s->k, s->ta, s->tb,
               s->per_step, 100.0 * fl * s->per_step / fl_row);
        for (int l = 0; l < NLIBS; l++) {
            if (!use[l]) continue;
            printf(" %6.1f %6.1f %6.1f", fl / wall[l][i] / 1e9, fl / cpu[l][i] / 1e9, fl / ccpu[l][i] / 1e9);
            tw[l] += wall[l][i] * s->per_step, tc[l] += cpu[l][i] * s->per_step, tk[l] += ccpu[l][i] * s->per_step;
            pf[l] += faults[l][i] * s->per_step;
        }
        printf("\n");
    }
    getloadavg(load, 3);
    printf("load at end %.2f %.2f %.2f\n", load[0], load[1], load[2]);
    free(a), free(b), free(c), free(ref);
    return 0;
}
